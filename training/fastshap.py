"""``python -m training fit-explainer``: train a version's amortised explainer.

The explainer (:mod:`shapcore.fastshap`) is by default issue 17's small network fitted with
FastSHAP's objective (below). ``network="resnet50"`` takes the version's own ResNet-50 with a
per-cell head instead (ViT-Shapley, Covert, Kim, Lee, ICLR 2023), and ``objective="labels"`` fits
it to **labels** (stochastic amortization, Covert et al., NeurIPS 2024): Leverage SHAP estimates
of each training image's values with a few hundred evaluations (:mod:`training.shapley_labels`),
noisy but unbiased, regressed on with the squared error. Labels are made as the run goes and
reused over the epochs that follow: a label is paid for once, where FastSHAP's objective pays for
fresh coalitions at every visit. Not the default yet: their quality has not been measured on a
quiet machine, and the ResNet-50 explainer's forward pass (~16 ms at batch 1 on one core here)
is over issue 26's 5 ms (BENCHMARKS.md, "Issue 26").

``objective="fastshap"`` is the paper's loss (Jethani et al., ICLR 2022, eq. 6), issue 17's fit:

    E_x E_{s ~ p_Shapley} ‖ v_x(s) − v_x(∅) − sᵀ φ(x) ‖²

with ``φ`` made efficient by the additive normalisation (:func:`shapcore.fastshap.efficient_normalize`).
Coalitions ``s`` of the 64 grid cells are drawn from the Shapley kernel's distribution (a
size k with probability ∝ (M − 1) / (k (M − k)), then a uniform subset of that size), each
with its complement (paired sampling: the paper's variance reduction). Every image gets fresh
coalitions at every visit, and a random horizontal flip (the values are those of the flipped
image, so the pair stays exact).

Both use the model's own value function (:func:`shapcore.value.masked_probabilities` with the
``mean`` fill, what the service's KernelSHAP evaluates), no surrogate: the fill is fixed, so the
classifier with the fill is the value function. Almost all the cost is the classifier's forward
passes. The run fits a wall-clock budget: the learning rate follows a cosine driven by the clock
(:class:`training.budget.BudgetProgress`), as ``train``'s does, and the best state on a fixed
validation set of held-out images (labelled, or with fixed coalitions) is kept.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import torch

from shapcore.background import summarize_background
from shapcore.errors import UserError
from shapcore.fastshap import ExplainerNet, Network, ResNetExplainer, efficient_normalize, forward_ms, save_explainer
from shapcore.inference import resolve_device
from shapcore.model import CIFAR10_MEAN, CIFAR10_STD
from shapcore.players import GRID_CELLS
from shapcore.registry import Registry
from training.budget import BudgetProgress
from training.explainer_game import Game, value_model
from training.shapley_labels import LabelValidation, label_images, label_loss


@dataclass(frozen=True)
class FitConfig:
    minutes: float = 30.0
    network: str = "small"  # "small": from scratch (default); "resnet50": the classifier's own, fine-tuned
    objective: str = "fastshap"  # "fastshap": FastSHAP's loss (default); "labels": Leverage SHAP labels
    batch_images: int = 32
    pairs: int = 4  # objective fastshap: coalition pairs (a coalition and its complement) per image and step
    label_samples: int = 256  # objective labels: evaluations per image's label
    label_until: float = 0.85  # objective labels: no new labels after this share of the budget
    train_share: float = 0.3  # objective labels: share of the time spent training while labelling
    lr: float = 1e-3  # the head's (all of a small network's)
    trunk_lr: float = 2e-4  # the classifier's layers in a resnet50 explainer
    weight_decay: float = 1e-4
    width: int | None = None  # default: 48 (small), 128 (resnet50)
    seed: int = 0
    val_images: int = 256  # at most: the labels objective labels as many as ~8 % of the budget allows
    val_pairs: int = 8
    evaluations: int = 12  # validation passes over the run (the best state is kept)
    max_steps: int | None = None  # also stop after this many training steps (a fixed amount of work: tests)
    device: str = "auto"  # where the fit runs: auto (CUDA when torch sees one), cpu, cuda or cuda:N


def shapley_sizes(m: int) -> np.ndarray:
    """P(|s| = k) for k = 1..m−1 under the Shapley kernel: ∝ (m − 1) / (k (m − k))."""
    k = np.arange(1, m)
    w = (m - 1) / (k * (m - k))
    return w / w.sum()


def sample_coalitions(n: int, pairs: int, m: int, generator: torch.Generator) -> torch.Tensor:
    """(n, 2·pairs, m) 0/1 float coalitions: ``pairs`` Shapley-kernel draws per image, each
    followed by its complement."""
    sizes = torch.from_numpy(shapley_sizes(m)).float()
    k = torch.multinomial(sizes, n * pairs, replacement=True, generator=generator) + 1  # (n·pairs,)
    ranks = torch.rand(n * pairs, m, generator=generator).argsort(dim=1).argsort(dim=1)
    s = (ranks < k.unsqueeze(1)).float().view(n, pairs, 1, m)
    return torch.cat([s, 1.0 - s], dim=2).view(n, 2 * pairs, m)


def wls_loss(phi: torch.Tensor, s: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over images and coalitions of the squared error summed over classes:
    ``phi`` (N, M, C), ``s`` (N, K, M), ``targets`` = v(s) − v(∅) (N, K, C)."""
    return ((s @ phi - targets) ** 2).sum(dim=-1).mean()


class Validation:
    """A fixed validation set: held-out images, fixed coalitions, their values computed once.

    The yardstick is the values split evenly (what efficiency alone gives). It already explains
    most of v(s) (bigger coalitions keep more), so an R² would look good for any explainer; the
    *gain* is the share of the even split's error that the explainer removes (0: learned nothing).
    """

    def __init__(self, game: Game, images: torch.Tensor, null: torch.Tensor, classes: int, cfg: FitConfig) -> None:
        m = GRID_CELLS * GRID_CELLS
        dev = game.device
        self.x = images[: cfg.val_images].to(dev).float() / 255.0
        self.s = sample_coalitions(len(self.x), cfg.val_pairs, m, torch.Generator().manual_seed(cfg.seed + 1)).to(dev)
        self.grand, self.null = game.grand(self.x), null
        self.targets = game.coalitions(self.x, self.s) - null
        even = efficient_normalize(torch.zeros(len(self.x), m, classes, device=dev), self.grand, null)
        self.even_error = float(((self.s @ even - self.targets) ** 2).sum())

    def score(self, net: ExplainerNet) -> tuple[float, float]:
        """(loss per coalition, gain over the even split)."""
        net.eval()
        with torch.no_grad():
            phi = efficient_normalize(net(self.x, self.grand), self.grand, self.null)
            residual = float(((self.s @ phi - self.targets) ** 2).sum())
        net.train()
        return residual / (len(self.x) * self.s.shape[1]), 1.0 - residual / max(self.even_error, 1e-30)


def train_step(net, opt, game: Game, x: torch.Tensor, s: torch.Tensor, null: torch.Tensor, scale: float) -> float:
    """One step of the loss on images ``x`` (float) and coalitions ``s``; returns the loss."""
    grand = game.grand(x)
    targets = game.coalitions(x, s) - null
    loss = wls_loss(efficient_normalize(net(x, grand), grand, null), s, targets) * scale
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


def new_network(cfg: FitConfig, classes: int, init: torch.nn.Module | None, normalization: dict | None) -> Network:
    """The untrained explainer ``cfg.network`` names; a resnet50 one is a copy of ``init``, the
    classifier's (unfolded) ResNet-50, with the version's input ``normalization``."""
    if cfg.network == "small":
        return ExplainerNet(classes, width=cfg.width or 48)
    if cfg.network == "resnet50":
        if init is None:
            raise UserError("a resnet50 explainer starts from the classifier's own ResNet-50: none was given")
        norm = normalization or {}
        return ResNetExplainer.from_classifier(init, classes, width=cfg.width or 128,
                                               mean=tuple(norm.get("mean", CIFAR10_MEAN)),
                                               std=tuple(norm.get("std", CIFAR10_STD)))  # fmt: skip
    raise UserError(f"unknown explainer network {cfg.network!r} (resnet50 or small)")


def _optimizer(net: Network, cfg: FitConfig) -> torch.optim.Optimizer:
    """AdamW; a resnet50 explainer's trunk (the classifier's layers) at ``trunk_lr``, the rest at ``lr``."""
    trunk = [p for n, p in net.named_parameters() if n.startswith(("stem.", "layer"))]
    rest = [p for n, p in net.named_parameters() if not n.startswith(("stem.", "layer"))]
    groups = [{"params": rest, "base_lr": cfg.lr}]
    if trunk and isinstance(net, ResNetExplainer):
        groups.append({"params": trunk, "base_lr": cfg.trunk_lr})
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _label_validation(
    game: Game, images: torch.Tensor, null: torch.Tensor, cfg: FitConfig, budget_s: float
) -> LabelValidation:
    """Label held-out images one at a time, up to ``cfg.val_images`` or 8 % of the budget (two at least)."""
    started = time.perf_counter()
    grands, labels, kept = [], [], []
    for i in range(min(cfg.val_images, len(images))):
        if i >= 2 and time.perf_counter() - started > 0.08 * budget_s:
            break
        grand, phi = label_images(game, images[i : i + 1], null, cfg.label_samples, seed=cfg.seed + 1_000_000 + i)
        grands.append(grand)
        labels.append(phi)
        kept.append(i)
    dev = game.device
    return LabelValidation(images[kept].to(dev).float() / 255.0, torch.cat(grands).to(dev), torch.cat(labels).to(dev),
                           null)  # fmt: skip


def fit(
    game: Game,
    train_images: torch.Tensor,
    val_images: torch.Tensor,
    classes: int,
    cfg: FitConfig,
    *,
    init: torch.nn.Module | None = None,
    normalization: dict | None = None,
    progress: bool = True,
) -> tuple[Network, torch.Tensor, dict[str, Any]]:
    """Train an explainer on uint8 images (N, 3, 32, 32) within ``cfg.minutes``; returns the
    best network (by validation loss), v(∅) and the run's figures.

    Objective ``labels`` (the default): label training images as the run goes (Leverage SHAP at
    ``cfg.label_samples`` evaluations each, :mod:`training.shapley_labels`) and regress the
    explainer on the labels gathered so far, spending about ``cfg.train_share`` of the time on
    training steps until ``cfg.label_until`` of the budget, then only training. Objective
    ``fastshap``: the paper's loss on fresh coalitions at every step (issue 17's fit).
    ``init``/``normalization``: the classifier's network and input normalisation, for
    ``cfg.network == "resnet50"``. Long because it is the fit's one loop, flat and explicit as
    torchvision's references write theirs: labelling, stepping, validating and the clock together.
    """
    if cfg.objective not in ("labels", "fastshap"):
        raise UserError(f"unknown objective {cfg.objective!r} (labels or fastshap)")
    started = time.perf_counter()
    budget_s = cfg.minutes * 60.0
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    m = GRID_CELLS * GRID_CELLS
    null = game.null()
    labels = cfg.objective == "labels"
    val = (
        _label_validation(game, val_images, null, cfg, budget_s)
        if labels
        else Validation(game, val_images, null, classes, cfg)
    )
    setup_s = time.perf_counter() - started
    if setup_s > 0.5 * budget_s:
        raise UserError(f"a {cfg.minutes:g}-minute budget is too short: the validation set alone took {setup_s:.0f} s")

    # The targets are differences of probabilities, often ~1e-3 per cell: the network's outputs
    # are scaled to their size and the loss divided by their variance, so that the layers work at
    # unit scale and Adam's gradients stay far above its epsilon (unscaled, a fit on a
    # low-contrast game stalled and weight decay drove the head to a constant).
    yard = val.labels if labels else val.targets
    scale = 1.0 / max(float(yard.var()), 1e-12)
    dev = game.device
    net = new_network(cfg, classes, init, normalization).to(dev)
    net.scale.fill_(float(yard.std()) / (1.0 if labels else math.sqrt(m)))
    net.train()
    opt = _optimizer(net, cfg)
    clock = BudgetProgress({"train_window_s": budget_s * 0.97 - setup_s})

    def score() -> dict[str, float]:
        got = val.score(net)
        return {"val_loss": got[0], "val_gain": got[1], **({"val_rho": got[2]} if len(got) > 2 else {})}

    best = score()
    best_state = {k: v.clone() for k, v in net.state_dict().items()}
    curve: list[dict[str, float]] = [{"seconds": 0.0, "steps": 0, "labelled": 0, **best}]
    steps, seen, next_eval = 0, 0, 1.0 / cfg.evaluations
    order = torch.randperm(len(train_images), generator=gen)
    pool_x, pool_grand, pool_phi = train_images[:0], torch.zeros(0, classes), torch.zeros(0, m, classes)
    label_s = train_s = 0.0
    bar = _bar(progress)
    while True:
        frac = clock.fraction() if cfg.max_steps is None else max(clock.fraction(), steps / cfg.max_steps)
        if frac >= next_eval or frac >= 1.0:
            now = score()
            curve.append({"seconds": clock.elapsed(), "steps": steps, "labelled": len(pool_x), **now})
            if now["val_loss"] < best["val_loss"]:
                best = now
                best_state = {k: v.clone() for k, v in net.state_dict().items()}
            next_eval += 1.0 / cfg.evaluations
            if bar is not None:
                bar.set_postfix({k: f"{v:.3f}" for k, v in now.items()})
        if frac >= 1.0:
            break
        t0 = time.perf_counter()
        labelling = labels and frac < cfg.label_until and len(pool_x) < len(order)
        if labelling and (len(pool_x) < 8 or train_s > cfg.train_share * (label_s + train_s)):
            chunk = train_images[order[len(pool_x) : len(pool_x) + 4]]
            grand, phi = label_images(game, chunk, null, cfg.label_samples, seed=cfg.seed + len(pool_x))
            pool_x, pool_grand, pool_phi = (
                torch.cat([pool_x, chunk]),
                torch.cat([pool_grand, grand]),
                torch.cat([pool_phi, phi]),
            )
            label_s += time.perf_counter() - t0
            continue
        for group in opt.param_groups:  # cosine over the clock, a short warm-up first
            group["lr"] = group["base_lr"] * min(1.0, frac / 0.05) * 0.5 * (1.0 + math.cos(math.pi * frac))
        if labels:
            idx = torch.randint(len(pool_x), (cfg.batch_images,), generator=gen)
            x, target, grand = pool_x[idx].to(dev).float() / 255.0, pool_phi[idx].to(dev), pool_grand[idx].to(dev)
            loss = label_loss(efficient_normalize(net(x, grand), grand, null), target) * scale
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        else:
            pick = torch.randint(len(train_images), (cfg.batch_images,), generator=gen)
            x = train_images[pick].to(dev).float() / 255.0
            flipped = (torch.rand(len(x), generator=gen) < 0.5).to(dev)
            x[flipped] = x[flipped].flip(-1)  # the values are the flipped image's: the pair stays exact
            train_step(net, opt, game, x, sample_coalitions(len(x), cfg.pairs, m, gen).to(dev), null, scale)
        train_s += time.perf_counter() - t0
        steps, seen = steps + 1, seen + cfg.batch_images
        if bar is not None:
            bar.update(round(100 * frac) - bar.n)
    if bar is not None:
        bar.close()
    net.load_state_dict(best_state)
    net.to("cpu").eval()  # stored, timed and served on the CPU
    figures = {
        "fit_seconds": time.perf_counter() - started,
        "objective": cfg.objective,
        "steps": steps,
        "images_seen": seen,
        "coalitions_seen": len(pool_x) * cfg.label_samples if labels else seen * 2 * cfg.pairs,
        "labelled_images": len(pool_x),
        "label_seconds": label_s,
        "train_seconds": train_s,
        "model_evaluations": game.evaluations,
        "validation_loss": best["val_loss"],
        "validation_gain": best["val_gain"],
        **({"validation_rho": best["val_rho"]} if "val_rho" in best else {}),
        "validation": {
            "images": len(val.x),
            **({"label_samples": cfg.label_samples} if labels else {"coalitions_per_image": 2 * cfg.val_pairs}),
        },
        "curve": curve,
        "config": asdict(cfg),
        "device": str(dev),
    }
    return net, null.cpu(), figures


def _bar(progress: bool):
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=100, desc="fitting the explainer", unit="%")


def run(
    registry: Registry, version: str | None, data_src: str, cfg: FitConfig, *, progress: bool = True, score=None
) -> str:
    """Fit and store the explainer of ``version`` from images of ``data_src``; returns its path.
    ``score(game, net, null, held_out_images)``: the quality figures stored with it
    (:func:`training.explainer_quality.fit_hook`)."""
    from training.data import load_images, split_train_val

    registry.check_writable()
    device = resolve_device(cfg.device, setting="--device")
    loaded = registry.load(version)
    meta = loaded.metadata
    data = load_images(data_src, split=["train"], class_names=loaded.class_names, progress=progress)
    if data.sha256 == meta["data"]["sha256"] and data.split == meta["data"]["split"]:
        hp = meta["hyperparameters"]  # the version's own split: fit on its training part
        train_idx, val_idx = split_train_val(len(data), hp["val_fraction"], hp["seed"])
        split_note = "the version's training part (validation: its held-out part)"
    else:
        train_idx, val_idx = split_train_val(len(data), 0.1, cfg.seed)
        split_note = "other data than the version's: 90 % to fit, 10 % held out"
    if len(train_idx) < cfg.batch_images or len(val_idx) == 0:
        raise UserError(f"{data_src} holds too few images to fit an explainer ({len(data)})")
    fill = summarize_background(loaded.background(), 1)
    init = copy.deepcopy(loaded.model.net)  # before value_model folds its batch norms in place
    game = Game(value_model(loaded, device), fill, device=device)
    net, null, figures = fit(game, data.images[train_idx], data.images[val_idx], len(loaded.class_names), cfg,
                             init=init, normalization=meta.get("normalization"), progress=progress)  # fmt: skip
    stored = {
        "model_version": loaded.version,
        "class_names": loaded.class_names,
        "layout": "grid",
        "players": GRID_CELLS * GRID_CELLS,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "data": {"source": str(data_src), "sha256": data.sha256, "split": split_note},
        "forward_ms": forward_ms(net),
        **figures,
    }
    if score is not None:  # before the file appears: the service never sees an unscored fit
        stored["quality"] = score(game, net, null, data.images[val_idx])
    path = save_explainer(loaded.path, net, null, stored)
    registry.attach(loaded.version, path.name)  # recorded with its sha256 (and uploaded, on a store)
    return str(path)
