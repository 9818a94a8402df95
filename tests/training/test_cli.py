"""The CLI end to end: smoke training into a registry, evaluate, list/show/promote, resume,
and every user mistake answered with one line and a non-zero exit."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]


def cli(
    *args: str, registry: Path | None = None, check: bool = False, prefix: Sequence[str] = ()
) -> subprocess.CompletedProcess[str]:
    cmd = [*prefix, sys.executable, "-m", "training", "--quiet"]
    if registry is not None:
        cmd += ["--registry", str(registry)]
    proc = subprocess.run([*cmd, *args], capture_output=True, text=True, cwd=ROOT, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def assert_user_error(proc: subprocess.CompletedProcess[str], fragment: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and fragment in errors[0], proc.stderr


def test_smoke_training_end_to_end(small_archive: Path, small_test_archive: Path, tmp_path: Path) -> None:
    reg = tmp_path / "reg"
    proc = cli("train", "--data", str(small_archive), "--profile", "smoke", "--dropout", "0.2",
               "--label-smoothing", "0.05", registry=reg, check=True)  # fmt: skip
    version = proc.stdout.strip().splitlines()[-1]
    folder = reg / version
    assert sorted(p.name for p in folder.iterdir()) == [
        "background.safetensors", "history.json", "metadata.json", "model.safetensors",
        "validation_sample.safetensors"]
    meta = json.loads((folder / "metadata.json").read_text())
    assert meta["profile"] == "smoke" and meta["data"]["sha256"]
    assert meta["hyperparameters"]["optimizer"] == "adam"
    assert (meta["hyperparameters"]["dropout"], meta["hyperparameters"]["label_smoothing"]) == (0.2, 0.05)
    assert load_file(str(folder / "background.safetensors"))["images"].shape == (100, 3, 32, 32)

    proc = cli("evaluate", "--version", version, "--data", str(small_test_archive), registry=reg, check=True)
    assert "Table 4" in proc.stdout and "Table 5" in proc.stdout and "cat" in proc.stdout
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["num_images"] == 100 and metrics["data"]["split"] == "test"
    assert sum(map(sum, metrics["confusion_matrix"])) == 100
    assert (folder / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (folder / "training_curves.png").stat().st_size > 1000

    assert version in cli("list", registry=reg, check=True).stdout
    assert cli("promote", version, registry=reg, check=True).returncode == 0
    assert (reg / "PROMOTED").read_text().strip() == version
    shown = json.loads(cli("show", version, registry=reg, check=True).stdout)
    assert shown["promoted"] is True and shown["metrics"]["accuracy"] == metrics["accuracy"]


def test_training_is_seeded_and_resumable(small_archive: Path, tmp_path: Path) -> None:
    """An interrupted run resumed from its last epoch ends with the same weights as an unbroken one."""
    args = ["train", "--data", str(small_archive), "--profile", "smoke", "--epochs", "4"]
    reg_a = tmp_path / "a"
    version_a = cli(*args, registry=reg_a, check=True).stdout.split()[-1]

    reg_b = tmp_path / "b"
    proc = subprocess.Popen(
        [sys.executable, "-m", "training", "--quiet", "--registry", str(reg_b), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        # A shell's background job starts with SIGINT ignored, and Python then installs no
        # KeyboardInterrupt handler: give the child the default disposition, as a terminal does.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    version_b = None
    for line in proc.stdout:
        if line.startswith("run "):
            version_b = line.split()[1]
        if line.startswith("epoch 2/4"):
            proc.send_signal(signal.SIGINT)
            break
    proc.communicate(timeout=120)
    assert proc.returncode == 130 and version_b
    assert (reg_b / ".runs" / version_b / "state.json").is_file()
    assert cli("list", registry=reg_b).stdout.startswith("no versions")
    resumed = cli("train", "--resume", version_b, registry=reg_b, check=True)
    assert "resuming" in resumed.stdout and resumed.stdout.split()[-1] == version_b
    a = load_file(str(reg_a / version_a / "model.safetensors"))
    b = load_file(str(reg_b / version_b / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all((a[k] == b[k]).all() for k in a)


def test_missing_archive(tmp_path: Path) -> None:
    assert_user_error(cli("train", "--data", str(tmp_path / "nope.tar.gz"), "--profile", "smoke",
                          registry=tmp_path), "data source not found")


def test_wrong_layout(tmp_path: Path) -> None:
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.jpg").write_bytes(b"x")
    assert_user_error(cli("train", "--data", str(tmp_path / "flat"), "--profile", "smoke",
                          registry=tmp_path / "r"), "expected <split>/<class>/<image>")


def test_unknown_version(smoke_model: tuple[Path, str], small_test_archive: Path) -> None:
    root, _ = smoke_model
    assert_user_error(cli("show", "20000101-000000-000000", registry=root), "unknown version")
    assert_user_error(cli("evaluate", "--version", "nope", "--data", str(small_test_archive), registry=root),
                      "unknown version")


def test_registry_not_writable_chmod(small_archive: Path, tmp_path: Path) -> None:
    """A registry directory without write permission (EACCES) is refused before training.

    Root writes through any mode bits (CAP_DAC_OVERRIDE), so as root the CLI runs without
    the capabilities that bypass file permissions, as an ordinary user would.
    """
    reg = tmp_path / "ro"
    reg.mkdir()
    reg.chmod(0o500)
    prefix: list[str] = []
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root and util-linux's setpriv is missing: cannot drop CAP_DAC_OVERRIDE")
        prefix = [setpriv, "--bounding-set", "-dac_override,-dac_read_search", "--"]
    proc = cli("train", "--data", str(small_archive), "--profile", "smoke", registry=reg, prefix=prefix)
    assert_user_error(proc, "not writable")
    assert "Permission denied" in proc.stderr
    assert not proc.stdout.startswith("run "), "refused only after a run had begun"


def test_registry_not_writable(small_archive: Path, tmp_path: Path) -> None:
    # A registry path below a regular file can never be created, even by root (ENOTDIR).
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_user_error(cli("train", "--data", str(small_archive), "--profile", "smoke",
                          registry=blocker / "models"), "not writable")


def test_bad_arguments_exit_non_zero(tmp_path: Path) -> None:
    proc = cli("train", "--data", "x", "--epochs", "zero", registry=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "not an integer" in proc.stderr
    proc = cli("train", "--data", "x", "--dropout", "1", registry=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "from 0 to below 1" in proc.stderr


def test_time_budget_plan_fits_the_budget() -> None:
    from training.budget import plan_budget
    from training.presets import PROFILES

    cfg = PROFILES["cpu"]
    full = 40_000 // cfg.batch_size
    # 0.2 s/step, 1000 val img/s, 40k train, 10k val: 60 minutes hold many full epochs, each
    # ending in a validation pass; whole epochs are shortened by under 10 %, never cut off
    plan = plan_budget(cfg, 3600, 0.2, 1000.0, 40_000, 10_000, elapsed_s=30)
    assert plan["planned_s"] <= 3600 * 0.95 + 1
    assert plan["planned_s"] > 3600 * 0.85
    assert plan["full_epoch_steps"] == full
    assert 0.9 * full <= plan["steps_per_epoch"] <= full
    assert plan["epochs"] == plan["total_steps"] // plan["steps_per_epoch"] > 40
    # 5 minutes: less than two full epochs fit; they are shortened, not dropped
    short = plan_budget(cfg, 300, 0.7, 1000.0, 40_000, 10_000, elapsed_s=30)
    assert short["planned_s"] <= 300 * 0.95 + 1 and short["total_steps"] >= 300


def test_budget_schedule_follows_the_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """The OneCycle schedule of a budgeted run is driven by elapsed time, not by step count."""
    import torch

    from training import budget
    from training.presets import PROFILES, make_scheduler

    now = [1000.0]
    monkeypatch.setattr(budget.time, "perf_counter", lambda: now[0])
    cfg = PROFILES["cpu"]
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = make_scheduler(cfg, opt, total_steps=budget.SCHEDULE_TICKS)
    progress = budget.BudgetProgress({"train_window_s": 100.0}, elapsed_before=0.0)
    lrs = []
    for t in (0, 25, 50, 99, 100):
        now[0] = 1000.0 + t
        done = progress.advance(sched)
        lrs.append(opt.param_groups[0]["lr"])
    assert done
    assert lrs[1] == pytest.approx(cfg.lr, rel=0.01)  # the peak at 25% of the time
    assert lrs[0] < lrs[1] and lrs[2] < lrs[1] and lrs[-1] < cfg.lr / 1000
    # a resumed run continues where the interrupted one's clock stopped
    resumed = budget.BudgetProgress({"train_window_s": 100.0}, elapsed_before=60.0)
    assert resumed.fraction() == pytest.approx(0.6)


def test_no_epoch_is_begun_for_a_few_steps_at_the_end_of_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """Another epoch only when the time left holds real training: not one step followed by a
    whole validation pass that overruns the budget."""
    from training import budget

    now = [0.0]
    monkeypatch.setattr(budget.time, "perf_counter", lambda: now[0])
    progress = budget.BudgetProgress({"train_window_s": 300.0}, elapsed_before=0.0)
    now[0] = 298.7  # 1.3 s left: one 1.28-s step, then 22 s of validation
    assert progress.too_little_left(step_s=1.28, val_s=22.0)
    now[0] = 250.0  # 50 s left: 39 steps, more than the 22-s validation
    assert not progress.too_little_left(step_s=1.28, val_s=22.0)
    now[0] = 285.0  # 15 s left: 11 steps, but less than the validation they would cost
    assert progress.too_little_left(step_s=1.28, val_s=22.0)
    now[0] = 295.0  # 5 s left, a quick validation: still fewer than MIN_LAST_EPOCH_STEPS steps
    assert progress.too_little_left(step_s=1.0, val_s=1.0)


def test_global_options_work_after_the_subcommand_too(smoke_model, tmp_path: Path) -> None:
    """``train --registry DIR`` (where people type it) as well as ``--registry DIR train``; one
    given before the subcommand is not reset by a subcommand that does not repeat it."""
    from training.cli import build_parser

    registry, version = smoke_model
    after = cli("list", "--registry", str(registry), "--quiet", check=True)
    before = cli("list", registry=registry, check=True)
    assert version in after.stdout and after.stdout == before.stdout
    args = build_parser().parse_args(["--registry", "/a", "--quiet", "show", "v"])
    assert args.registry == "/a" and args.quiet is True
    args = build_parser().parse_args(["show", "v", "--registry", "/b"])
    assert args.registry == "/b" and args.quiet is False


def test_offline_cifar10_download_names_the_remedy(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys) -> None:
    """No network: one line that says how to point --data / DATA= at a local copy, and its layout.
    (The download itself is the one thing faked here: it is the internet.)"""
    import urllib.error

    import torchvision.datasets

    from training.cli import main

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    monkeypatch.setenv("SHAPSERVE_CACHE", str(tmp_path / "cache"))
    code = main(["--quiet", "--registry", str(tmp_path / "reg"), "train", "--data", "cifar10", "--profile", "smoke"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: could not download CIFAR-10"), err
    assert "DATA=" in err and "--data" in err and "<split>/<class>/<image>" in err, err
