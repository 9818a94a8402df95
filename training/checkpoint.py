"""Resumable run state, stored without pickle: tensors in safetensors, the rest in JSON.

A run in progress lives in ``<registry>/.runs/<version>/``; it is rewritten atomically
after every epoch and removed once the version is published.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from shapcore.registry import write_json_atomic

STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"
BEST = "best.safetensors"


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, slots in state["state"].items():
        for key, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"opt.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("opt."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    for idx, slots in info["scalars"].items():
        state.setdefault(int(idx), {}).update(slots)
    return {"state": state, "param_groups": info["param_groups"]}


def _state_dict_cpu(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in net.state_dict().items()}


def save_run_state(
    run_dir: Path,
    *,
    net: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    info: dict[str, Any],
) -> None:
    """Everything needed to continue after the epoch that just finished."""
    run_dir.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v for k, v in _state_dict_cpu(net).items()}
    opt_tensors, opt_info = _flatten_optimizer(optimizer.state_dict())
    tensors.update(opt_tensors)
    tmp = run_dir / f".{STATE_TENSORS}.tmp"
    save_file(tensors, str(tmp))
    os.replace(tmp, run_dir / STATE_TENSORS)
    write_json_atomic(
        run_dir / STATE_JSON,
        {**info, "optimizer": opt_info, "scheduler": scheduler.state_dict()},
    )


def save_best(run_dir: Path, net: torch.nn.Module) -> None:
    tmp = run_dir / f".{BEST}.tmp"
    save_file(_state_dict_cpu(net), str(tmp))
    os.replace(tmp, run_dir / BEST)


def load_best(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / BEST))


def read_run_info(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / STATE_JSON).read_text())


def restore_run_state(
    run_dir: Path, *, net: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
) -> dict[str, Any]:
    info = read_run_info(run_dir)
    tensors = load_file(str(run_dir / STATE_TENSORS))
    net.load_state_dict({k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")})
    optimizer.load_state_dict(_unflatten_optimizer(tensors, info["optimizer"]))
    scheduler.load_state_dict(info["scheduler"])
    return info
