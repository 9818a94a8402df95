"""Which amortised explainer the service serves (issue 26): the floor ``EXPLAIN_FAST_MIN_RHO`` refuses a
planted weak explainer (409 naming its figure and the command that refits it), an explainer without
figures is refused with the command that scores it, and a fit in progress answers "fitting, about
N minutes left" until its explainer appears. On the smoke version, scored for real against
KernelSHAP (:mod:`training.explainer_quality`, a small configuration).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from service.fast_explain import ExplainerSlot
from shapcore.background import summarize_background
from shapcore.errors import ShapserveError
from shapcore.explainer_status import FITTING_FILE, write_fitting
from shapcore.fastshap import ExplainerNet, save_explainer
from shapcore.registry import Registry
from training import explainer_quality as quality
from training.explainer_game import value_model


@pytest.fixture()
def version_folder(smoke_model: tuple[Path, str], tmp_path: Path) -> tuple[Path, str, list[str]]:
    registry = tmp_path / "registry"
    shutil.copytree(smoke_model[0], registry)
    loaded = Registry(registry).load(smoke_model[1])
    return loaded.path, loaded.version, loaded.class_names


def _planted_weak(folder: Path, version: str, class_names: list[str], *, scored: bool) -> float | None:
    """An explainer that learned nothing (its head outputs zeros: the even split), scored for real."""
    net = ExplainerNet(len(class_names), width=4).eval()
    with torch.no_grad():
        for p in net.head[-1].parameters():
            p.zero_()
    loaded = Registry(folder.parent).load(version)
    fill, model = summarize_background(loaded.background(), 1), value_model(loaded)
    null = model(fill.images[:1]).softmax(-1)[0].detach()
    meta = {"model_version": version, "class_names": class_names, "layout": "grid", "players": 64,
            "data": {"source": "small.tar.gz"}}  # fmt: skip
    if scored:
        images = (torch.rand(3, 3, 32, 32) * 255).to(torch.uint8)
        meta["quality"] = quality.score(model, fill, quality.net_explain(net, null), images,
                                        quality.QualityConfig(images=2, samples=64))  # fmt: skip
    save_explainer(folder, net, null, meta)
    return meta["quality"]["median_rho"] if scored else None


def _refused(slot: ExplainerSlot) -> ShapserveError:
    with pytest.raises(ShapserveError) as caught:
        slot.get()
    assert caught.value.status == 409
    return caught.value


def test_the_floor_refuses_a_planted_weak_explainer(version_folder) -> None:
    folder, version, names = version_folder
    rho = _planted_weak(folder, version, names, scored=True)
    assert rho < 0.8
    err = _refused(ExplainerSlot(folder, version, names, min_rho=0.8))
    assert err.code == "explainer_below_floor"
    assert f"median Spearman rho {rho:.3f} on 2 held-out images" in err.message
    assert "EXPLAIN_FAST_MIN_RHO=0.8" in err.message
    assert f"python -m training fit-explainer --version {version} --data small.tar.gz" in err.message
    assert err.details == [{"figure": "median_rho", "value": rho, "floor": 0.8, "command": err.details[0]["command"]}]
    info = ExplainerSlot(folder, version, names, min_rho=0.8).describe()
    assert info["served"] is False and info["quality"]["median_rho"] == rho
    assert info["refused"]["code"] == "explainer_below_floor"
    # the same explainer under a floor it clears is served, its figures with it
    slot = ExplainerSlot(folder, version, names, min_rho=-1.0)
    assert slot.get().meta["quality"]["median_rho"] == rho and slot.describe()["served"] is True


def test_an_unscored_explainer_is_refused_with_the_command_that_scores_it(version_folder) -> None:
    folder, version, names = version_folder
    _planted_weak(folder, version, names, scored=False)
    err = _refused(ExplainerSlot(folder, version, names, min_rho=-1.0))  # no figures: refused at any floor
    assert err.code == "explainer_unscored"
    assert f"python -m training score-explainer --version {version} --data small.tar.gz" in err.message


def test_a_fit_in_progress_answers_fitting_with_the_minutes_left(version_folder) -> None:
    folder, version, names = version_folder
    slot = ExplainerSlot(folder, version, names)
    assert _refused(slot).code == "no_explainer" and slot.describe() is None
    write_fitting(folder, seconds_left=150.0, phase="fitting", data="small.tar.gz")
    err = _refused(slot)
    assert err.code == "explainer_fitting" and "about 3 minute(s) left" in err.message
    assert f"fit-explainer --version {version} --data small.tar.gz" in err.message
    assert err.headers == {"Retry-After": "180"} and slot.describe()["fitting"]["minutes_left"] == 3
    # a fit that died without its clean-up (its process gone) is not reported as running
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    marker = (folder / FITTING_FILE).read_text().replace(f'"pid": {_pid(folder)}', f'"pid": {dead.pid}')
    (folder / FITTING_FILE).write_text(marker)
    assert _refused(slot).code == "no_explainer"


def _pid(folder: Path) -> int:
    import json

    return json.loads((folder / FITTING_FILE).read_text())["pid"]
