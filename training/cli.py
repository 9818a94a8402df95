"""``python -m training train|evaluate|report|fit-explainer|score-explainer|list|show|promote``.

Every user mistake ends in one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from shapcore.errors import UserError
from shapcore.registry import Registry
from training.presets import PROFILES
from training.settings import TrainingSettings

EXIT_USER_ERROR = 2


def _number(kind: type, ok, requirement: str):
    """An argparse ``type``: parse ``text`` as ``kind``, then check it."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{value} must be {requirement}")
        return value

    return parse


_positive_int = _number(int, lambda v: v >= 1, "at least 1")
_non_negative_int = _number(int, lambda v: v >= 0, "0 or more")
_positive_float = _number(float, lambda v: v > 0, "greater than 0")
_probability = _number(float, lambda v: 0.0 <= v < 1.0, "from 0 to below 1")


def _add_report(r: argparse.ArgumentParser) -> None:
    """The options of `report` (training/report.py)."""
    r.add_argument("--version", default=None, help="version id (default: promoted, else newest)")
    r.add_argument("--data", required=True, help="labelled folder or archive to score it on")
    r.add_argument("--split", help="split folder to read (default: test, val, or the only one)")
    r.add_argument(
        "--holdout", action="store_true", help="score the validation part the version held out of its training data"
    )
    r.add_argument("--out", help="HTML file to write (default: report.html in the version's folder, which "
                   "GET /model/report serves)")  # fmt: skip
    r.add_argument(
        "--explain",
        type=_non_negative_int,
        default=3,
        metavar="N",
        help="images explained per class, beside the confused pairs and confident mistakes (default 3; 0: no "
        "explanations). The running workers (python -m worker, on this registry and REDIS_URL) compute them",
    )
    r.add_argument("--segments", type=_positive_int, help="superpixels per image (default: EXPLAIN_DEFAULT_SEGMENTS)")
    r.add_argument("--samples", type=_positive_int, help="coalitions per image (default: EXPLAIN_DEFAULT_SAMPLES)")
    r.add_argument("--background", help="mean, blur, train:K or kmeans:K (default: EXPLAIN_DEFAULT_BACKGROUND)")


def _add_fit_explainer(f: argparse.ArgumentParser) -> None:
    f.add_argument("--version", default=None, help="version id (default: promoted, else newest)")
    f.add_argument("--data", required=True, help="images to fit on: the version's training data, or any like it")
    f.add_argument("--time-budget", type=_positive_float, metavar="MINUTES", default=30.0,
                   help="wall-clock budget, loading included (default: 30)")  # fmt: skip
    f.add_argument("--batch-size", type=_positive_int, help="images per step (default: 32)")
    f.add_argument("--pairs", type=_positive_int, help="coalition pairs per image and step (default: 4)")
    f.add_argument("--lr", type=_positive_float, help="peak learning rate (default: 1e-3)")
    f.add_argument("--network", choices=("resnet50", "small"),
                   help="small: a small network from scratch (default); resnet50: the classifier's own, fine-tuned")
    f.add_argument("--objective", choices=("labels", "fastshap"),
                   help="fastshap: the FastSHAP loss (default); labels: regress on Leverage SHAP labels")
    f.add_argument("--label-samples", type=_positive_int, help="evaluations per image's label (default: 256)")
    f.add_argument("--width", type=_positive_int, help="the explainer head's width (default: 48; resnet50: 128)")
    f.add_argument("--seed", type=int)
    _add_device(f)
    _add_quality(f)


def _add_device(f: argparse.ArgumentParser) -> None:
    f.add_argument("--device", default="auto", metavar="auto|cpu|cuda[:N]",
                   help="where the model's evaluations and the fit run (default auto: CUDA when torch sees one); "
                   "the explainer is stored and served on the CPU either way")  # fmt: skip


def _add_quality(f: argparse.ArgumentParser) -> None:
    """The scoring against KernelSHAP that ends a fit (training/explainer_quality.py)."""
    f.add_argument("--quality-images", type=_non_negative_int, metavar="N",
                   help="held-out images the explainer is scored on against KernelSHAP (default 8, or "
                   "EXPLAIN_QUALITY_IMAGES; 0: not scored, and the service will not serve it)")  # fmt: skip
    f.add_argument("--quality-samples", type=_positive_int, metavar="N",
                   help="KernelSHAP's coalitions for the reference and for KernelSHAP's own figures (default 2048, "
                   "or EXPLAIN_QUALITY_SAMPLES)")  # fmt: skip


def _quality_config(args: argparse.Namespace):
    from training.explainer_quality import QualityConfig

    env = TrainingSettings()
    images = env.explain_quality_images if args.quality_images is None else args.quality_images
    samples = env.explain_quality_samples if args.quality_samples is None else args.quality_samples
    return QualityConfig(images=images, samples=samples)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    parser.add_argument("--registry", help="checkpoint registry (default: $MODEL_REGISTRY or ./models)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    # The same two options after the subcommand, where people type them (`train --registry DIR`);
    # SUPPRESS keeps a subcommand that does not repeat them from resetting the ones given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--registry", default=argparse.SUPPRESS, help="checkpoint registry")
    common.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, **kwargs) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], **kwargs)

    t = add("train", help="train a model and register it as a new version")
    t.add_argument(
        "--data", help="'cifar10' (download), a folder or a .tar/.tar.gz laid out as <split>/<class>/<image>"
    )
    t.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    t.add_argument("--epochs", type=_positive_int)
    t.add_argument("--image-size", type=_positive_int)
    t.add_argument("--batch-size", type=_positive_int)
    t.add_argument("--lr", type=_positive_float)
    t.add_argument("--weight-decay", type=float)
    t.add_argument("--seed", type=int)
    t.add_argument("--dropout", type=_probability, help="dropout before the last layer (paper: 0.5)")
    t.add_argument("--label-smoothing", type=_probability)
    t.add_argument("--patience", type=_non_negative_int,
                   help="epochs without a better validation loss before stopping early (0: never)")  # fmt: skip
    t.add_argument("--amp", choices=["auto", "on", "off"], help="bf16 autocast (auto: CUDA, CPUs with native bf16)")
    t.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="replay forward+backward as CUDA graphs on a single GPU (default: on)",
    )
    t.add_argument(
        "--time-budget",
        type=_positive_float,
        metavar="MINUTES",
        help="fit the schedule to this wall-clock budget (cpu profile default: 60)",
    )
    t.add_argument("--no-time-budget", action="store_true", help="run --epochs as given, no budget fitting")
    t.add_argument(
        "--weights",
        metavar="imagenet|none|PATH",
        help="starting weights: torchvision's ImageNet ones (downloaded once), none (random init) or a "
        "local ResNet-50 state dict. Default: the profile's (cpu, paper: imagenet, and from scratch with "
        "a warning when they cannot be fetched; asked for by name, a failed download is an error)",
    )
    t.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    t.add_argument("--resume", metavar="VERSION", help="continue an interrupted run")
    t.add_argument("--promote", action="store_true", help="promote the new version when done")

    e = add("evaluate", help="score a version on a labelled folder or archive")
    e.add_argument("--version", default=None, help="version id (default: promoted, else newest)")
    e.add_argument("--data", required=True)
    e.add_argument("--split", help="split folder to read (default: test, val, or the only one)")
    e.add_argument(
        "--holdout", action="store_true", help="score the validation part the version held out of its training data"
    )
    e.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    e.add_argument("--json", action="store_true", help="print metrics.json instead of tables")

    _add_fit_explainer(add("fit-explainer", help="train a version's amortised explainer (POST /explain method=fast)"))
    q = add("score-explainer", help="score a version's fitted explainer against KernelSHAP (rewrites its figures)")
    q.add_argument("--version", default=None, help="version id (default: promoted, else newest)")
    q.add_argument("--data", required=True, help="the images it was fitted on (its held-out part is scored)")
    _add_device(q)
    _add_quality(q)
    _add_report(add("report", help="write the study's report of a version: one self-contained HTML file"))
    add("list", help="list versions")
    s = add("show", help="print a version's metadata and metrics")
    s.add_argument("version")
    p = add("promote", help="serve this version by default")
    p.add_argument("version")
    return parser


def cmd_train(args: argparse.Namespace, registry: Registry) -> int:
    from training import train

    if not args.data and not args.resume:
        raise UserError("train needs --data SRC (or --resume VERSION)")
    cfg = PROFILES[args.profile].override(
        epochs=args.epochs,
        image_size=args.image_size,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        seed=args.seed,
        time_budget_min=args.time_budget,
        weights=args.weights,
        dropout=args.dropout,
        label_smoothing=args.label_smoothing,
        early_stop_patience=args.patience,
        amp=args.amp,
        cuda_graphs=args.cuda_graphs,
    )
    if args.no_time_budget or (args.epochs and not args.time_budget):
        cfg = cfg.override(time_budget_min=0.0)
    version = train.run(cfg, args.data, registry, device=args.device, resume=args.resume, progress=not args.quiet,
                        weights_fallback=args.weights is None)  # fmt: skip
    if TrainingSettings().rank != 0:  # under torchrun, rank 0 reports
        return 0
    if args.promote:
        registry.promote(version)
    meta = registry.metadata(version)
    print(
        f"best epoch {meta['best_epoch']}: val loss {meta['best_val_loss']:.4f}, "
        f"val accuracy {meta['best_val_accuracy']:.4f}"
    )
    print(version)
    return 0


def cmd_evaluate(args: argparse.Namespace, registry: Registry) -> int:
    from shapcore.inference import resolve_device
    from training import evaluate

    metrics = evaluate.run(
        registry,
        args.version,
        args.data,
        split=args.split,
        holdout=args.holdout,
        device=str(resolve_device(args.device, setting="--device")),
        progress=not args.quiet,
    )
    print(json.dumps(metrics, indent=2) if args.json else evaluate.format_tables(metrics))
    return 0


def cmd_report(args: argparse.Namespace, registry: Registry) -> int:
    from pathlib import Path

    from shapcore.jobs.settings import ExplainSettings
    from training import report
    from training.explain_jobs import report_request

    settings = ExplainSettings()
    params = report_request(settings, args.segments, args.samples, args.background)
    out = report.build(
        registry,
        args.version,
        args.data,
        split=args.split,
        holdout=args.holdout,
        explain=args.explain,
        params=params,
        settings=settings,
        out=Path(args.out) if args.out else None,
        progress=not args.quiet,
    )
    print(out)
    return 0


def cmd_fit_explainer(args: argparse.Namespace, registry: Registry) -> int:
    from dataclasses import replace

    from shapcore.inference import resolve_device
    from training import explainer_quality as quality
    from training import fastshap

    resolve_device(args.device, setting="--device")  # before the fitting marker appears in the version
    changes = {"batch_images": args.batch_size, "pairs": args.pairs, "lr": args.lr, "width": args.width,
               "seed": args.seed, "network": args.network, "objective": args.objective,
               "label_samples": args.label_samples, "device": args.device}  # fmt: skip
    cfg = replace(fastshap.FitConfig(minutes=args.time_budget), **{k: v for k, v in changes.items() if v is not None})
    qcfg = _quality_config(args)
    print(quality.fit_scored(registry, args.version, args.data, cfg, qcfg, progress=not args.quiet))
    return 0


def cmd_score_explainer(args: argparse.Namespace, registry: Registry) -> int:
    from training import explainer_quality as quality

    qcfg = _quality_config(args)
    if qcfg.images == 0:
        raise UserError("score-explainer needs at least one image (--quality-images)")
    print(quality.rescore(registry, args.version, args.data, qcfg, progress=not args.quiet, device=args.device))
    return 0


def cmd_list(registry: Registry) -> int:
    promoted = registry.promoted()
    versions = registry.versions()
    if not versions:
        print(f"no versions in {registry.root}")
        return 0
    print(f"{'version':<24}{'profile':<8}{'input':>6}{'epochs':>7}{'val acc':>9}{'test acc':>9}")
    for v in versions:
        meta = registry.metadata(v)
        metrics = registry.metrics(v)
        acc = metrics["accuracy"] if metrics is not None else None
        mark = " *" if v == promoted else ""
        print(
            f"{v:<24}{meta['profile']:<8}{meta['input_size']:>6}{meta['epochs_run']:>7}"
            f"{meta['best_val_accuracy']:>9.4f}{(f'{acc:.4f}' if acc is not None else '-'):>9}{mark}"
        )
    if promoted:
        print("* promoted")
    return 0


def cmd_show(args: argparse.Namespace, registry: Registry) -> int:
    version = registry.resolve(args.version)
    out = {"metadata": registry.metadata(version), "promoted": registry.promoted() == version}
    metrics = registry.metrics(version)
    if metrics is not None:
        out["metrics"] = metrics
    print(json.dumps(out, indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    registry = Registry(args.registry)
    try:
        if args.command == "train":
            return cmd_train(args, registry)
        if args.command == "evaluate":
            return cmd_evaluate(args, registry)
        if args.command == "report":
            return cmd_report(args, registry)
        if args.command == "fit-explainer":
            return cmd_fit_explainer(args, registry)
        if args.command == "score-explainer":
            return cmd_score_explainer(args, registry)
        if args.command == "list":
            return cmd_list(registry)
        if args.command == "show":
            return cmd_show(args, registry)
        if args.command == "promote":
            registry.promote(args.version)
            print(f"promoted {registry.resolve(args.version)}")
            return 0
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        resume = " resume with `train --resume VERSION` (see `ls <registry>/.runs`)" if args.command == "train" else ""
        print(f"interrupted:{resume or ' nothing was written'}", file=sys.stderr)
        return 130
    return 0
