"""The process supervisor of ``scripts/run.py``: start children, mirror their output with a
prefix, restart the long-running ones when they crash, stop them all.

Standard library only. One thread: a selector loop copies the children's output, so that
forking with a pre-exec hook stays safe. Each child runs in a process group of its own, so
that stopping it (or cleaning up after its crash) reaches its descendants too (a worker's job
process, ...).

Restarts (the API and the workers, see :class:`RestartPolicy`): a child that ends while the
supervisor runs is started again after a delay that doubles from ``RESTART_DELAY_S`` up to
``RESTART_MAX_DELAY_S`` and falls back to the first delay once a run lasted
``RESTART_RESET_S``. A child restarted ``RESTART_LIMIT`` times within ``RESTART_WINDOW_S`` that
ends once more is in a crash loop: everything stops and the supervisor exits non-zero.

Background tasks (:meth:`Supervisor.background`: ``make run``'s explainer fit): a one-shot child,
logged and stopped like the others, whose end is neither a failure nor restarted: its
``on_exit`` callback is told its exit status.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import selectors
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PR_SET_PDEATHSIG = 1


class Stop(Exception):
    """Ctrl-C, SIGTERM or SIGHUP: stop everything."""


class Failed(Exception):
    """A step failed: the message says which and why."""


def say(msg: str) -> None:
    print(f"[run] {msg}", flush=True)


def exit_text(code: int | None) -> str:
    """How a process ended, for people: ``SIGKILL``, ``exit 2``."""
    if code is None:
        return "still running"
    if code < 0:
        with contextlib.suppress(ValueError):
            return signal.Signals(-code).name
    return f"exit {code}"


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the supervisor dies, however it dies (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _niced(increment: int) -> Callable[[], None]:
    """A pre-exec hook: :func:`_die_with_parent`, then a lower CPU priority (a background task
    must not slow the API down)."""

    def hook() -> None:
        _die_with_parent()
        with contextlib.suppress(OSError):
            os.nice(increment)

    return hook


@dataclass(frozen=True)
class RestartPolicy:
    """When a crashed child starts again, and when crashes are a loop that stops everything."""

    delay_s: float = 1.0  # the first restart's delay; it doubles with each restart ...
    max_delay_s: float = 30.0  # ... up to this
    reset_after_s: float = 60.0  # a run at least this long: the next delay is delay_s again
    limit: int = 5  # restarts of one child within window_s; one more crash is a crash loop
    window_s: float = 300.0

    @classmethod
    def checked(cls, **given: float) -> RestartPolicy:
        """The policy with the fields ``given`` (``RESTART_*``, scripts/settings.py) instead of the
        defaults above; an inconsistent one is refused."""
        policy = cls(**given)  # type: ignore[arg-type]
        if policy.delay_s < 0 or policy.max_delay_s < policy.delay_s or policy.limit < 0 or policy.window_s <= 0:
            raise Failed(f"inconsistent restart settings: {policy}")
        return policy


@dataclass
class Child:
    """One process: a restarted service gets a new Child (its own pipe and line buffer)."""

    name: str
    proc: subprocess.Popen
    log_path: Path | None
    own_group: bool
    _log: object = None
    _buf: bytes = b""
    stop_signals: tuple[int, ...] = (signal.SIGTERM,)
    tier: int = 0  # stopped in increasing order: 0 (API, workers, training), then 1 (Redis)
    started: float = field(default_factory=time.monotonic)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None


@dataclass
class Kept:
    """A service the supervisor keeps running: how to start it and its restart history."""

    name: str
    argv: list[str]
    env: dict[str, str]
    stop_signals: tuple[int, ...]
    child: Child | None = None
    delay: float = 0.0  # the next restart's delay (0: the policy's first)
    restart_at: float | None = None  # while it waits to be restarted
    restarts: deque[float] = field(default_factory=deque)  # when it was restarted, within the window


@dataclass
class Supervisor:
    """Starts children, mirrors their output, restarts the kept ones and stops them all."""

    var: Path
    mirror: bool = True
    policy: RestartPolicy = field(default_factory=RestartPolicy)
    children: list[Child] = field(default_factory=list)
    kept: list[Kept] = field(default_factory=list)
    tasks: dict[int, Callable[[int], None] | None] = field(default_factory=dict)  # background child -> on_exit
    sel: selectors.BaseSelector = field(default_factory=selectors.DefaultSelector)

    def start(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str],
        *,
        own_group: bool = True,
        capture: bool = True,
        stop_signals: tuple[int, ...] = (signal.SIGTERM,),
        tier: int = 0,
        nice: int = 0,
    ) -> Child:
        log_path = self.var / "log" / f"{name}.log" if capture else None
        proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if capture else None,
            stderr=subprocess.STDOUT if capture else None,
            start_new_session=own_group,
            preexec_fn=_niced(nice) if nice else _die_with_parent,
        )
        child = Child(name, proc, log_path, own_group, stop_signals=stop_signals, tier=tier)
        if capture:
            assert log_path is not None
            log_path.parent.mkdir(parents=True, exist_ok=True)
            child._log = log_path.open("ab")
            os.set_blocking(proc.stdout.fileno(), False)
            self.sel.register(proc.stdout, selectors.EVENT_READ, child)
        self.children.append(child)
        return child

    def keep(self, name: str, argv: list[str], env: dict[str, str], stop_signals: tuple[int, ...]) -> Kept:
        """Start a service that is restarted whenever it ends (see :meth:`tend`)."""
        kept = Kept(name, argv, env, stop_signals)
        self.kept.append(kept)
        self._spawn(kept)
        return kept

    def background(
        self, name: str, argv: list[str], env: dict[str, str], on_exit: Callable[[int], None], nice: int = 10
    ) -> Child:
        """Start a one-shot task beside the services (logged, stopped with them, at a lower CPU
        priority); when it ends, :meth:`watch` calls ``on_exit(exit status)`` once."""
        child = self.start(name, argv, env, nice=nice)
        self.tasks[id(child)] = on_exit
        say(f"started {name} in the background (pid {child.proc.pid}, log {child.log_path})")
        return child

    def _finish_tasks(self) -> None:
        for child in self.children:
            on_exit = self.tasks.get(id(child))
            if on_exit is not None and not child.alive:
                self.pump(0.2)  # its last words before ours
                self.tasks[id(child)] = None  # told once
                on_exit(child.proc.returncode)

    def _spawn(self, kept: Kept) -> None:
        if kept.child is not None:
            self.children.remove(kept.child)
        kept.child = self.start(kept.name, kept.argv, kept.env, stop_signals=kept.stop_signals)
        say(f"started {kept.name} (pid {kept.child.proc.pid})")

    def pump(self, timeout: float) -> None:
        """Copy whatever the children wrote to their logs (and the terminal), for up to ``timeout``."""
        if not self.sel.get_map():
            time.sleep(timeout)
            return
        for key, _ in self.sel.select(timeout):
            child: Child = key.data
            try:
                data = os.read(key.fd, 65536)
            except BlockingIOError:
                continue
            if not data:
                self.sel.unregister(key.fileobj)
                key.fileobj.close()
                self._emit(child, child._buf, final=True)
                child._buf = b""
                child._log.close()  # its output ends here (a restarted service logs through a new Child)
                continue
            child._buf += data
            *lines, child._buf = child._buf.split(b"\n")
            for line in lines:
                self._emit(child, line + b"\n")

    def _emit(self, child: Child, data: bytes, final: bool = False) -> None:
        if not data:
            return
        if final and not data.endswith(b"\n"):
            data += b"\n"
        child._log.write(data)
        child._log.flush()
        if self.mirror:
            text = data.decode(errors="replace").replace("\r", "")
            sys.stdout.write(f"[{child.name}] {text}")
            sys.stdout.flush()

    def wait_for(self, child: Child, timeout: float | None = None) -> int | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while child.alive and (deadline is None or time.monotonic() < deadline):
            self.pump(0.2)
        return child.proc.poll()

    def watch(self, timeout: float) -> None:
        """Pump output for up to ``timeout`` (less when a restart falls due), then tend the children:
        a child that is not kept (Redis) and ended is a failure; a kept one is restarted."""
        due = [k.restart_at for k in self.kept if k.restart_at is not None]
        self.pump(max(0.0, min([timeout, *(t - time.monotonic() for t in due)])))
        self._finish_tasks()
        self.check_alive()
        self.tend()

    def check_alive(self) -> None:
        """Raise :class:`Failed` when a child that is neither restarted nor a background task has ended."""
        kept = {id(k.child) for k in self.kept} | set(self.tasks)
        for child in self.children:
            if id(child) not in kept and not child.alive:
                self.pump(0.2)
                where = f" (log: {child.log_path})" if child.log_path else ""
                raise Failed(f"{child.name} exited with status {child.proc.returncode}{where}")

    def tend(self) -> None:
        """Restart the kept services that ended and whose delay is over; schedule the others."""
        now = time.monotonic()
        for kept in self.kept:
            if kept.restart_at is not None:
                if now >= kept.restart_at:
                    kept.restart_at = None
                    kept.restarts.append(now)
                    self._spawn(kept)
            elif not kept.child.alive:
                self._schedule_restart(kept, now)

    def _schedule_restart(self, kept: Kept, now: float) -> None:
        child, policy = kept.child, self.policy
        self.pump(0)  # its last words before ours
        self._signal(child, signal.SIGKILL)  # whatever is left in its process group
        how, ran = exit_text(child.proc.returncode), now - child.started
        while kept.restarts and now - kept.restarts[0] > policy.window_s:
            kept.restarts.popleft()
        if len(kept.restarts) >= policy.limit:
            raise Failed(
                f"{kept.name} is in a crash loop: it ended ({how}, pid {child.proc.pid}, after {ran:.1f} s) "
                f"after {len(kept.restarts)} restart(s) within {policy.window_s:g} s; stopping everything "
                f"(log: {child.log_path})"
            )
        if ran >= policy.reset_after_s:
            kept.delay = 0.0
        delay = kept.delay or policy.delay_s
        kept.delay = min(delay * 2, policy.max_delay_s)
        kept.restart_at = now + delay
        say(
            f"{kept.name} (pid {child.proc.pid}) ended: {how} after {ran:.1f} s; restarting it in {delay:g} s "
            f"(restart {len(kept.restarts) + 1}, at most {policy.limit} within {policy.window_s:g} s)"
        )

    def _signal(self, child: Child, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if child.own_group:
                os.killpg(child.proc.pid, sig)
            else:
                child.proc.send_signal(sig)

    def stop_all(self, grace: float) -> None:
        """Stop the children: the API and workers first, Redis last. Each gets its stop signals
        in turn (0: just wait), ``grace`` seconds apart, then SIGKILL to its whole process group."""
        for kept in self.kept:
            kept.restart_at = None  # a pending restart does not happen
        for tier in sorted({c.tier for c in self.children}):
            self._stop_tier([c for c in self.children if c.tier == tier and c.alive], grace)
        for child in self.children:
            if child.own_group:  # anything left in its group (a worker's job process, ...)
                self._signal(child, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.proc.wait(timeout=5)
        self.pump(0)
        for child in self.children:
            if child._log:
                child._log.close()

    def _stop_tier(self, live: list[Child], grace: float) -> None:
        steps = max((len(c.stop_signals) for c in live), default=0)
        for step in range(steps + 1):
            live = [c for c in live if c.alive]
            if not live:
                break
            for child in live:
                if step < len(child.stop_signals):
                    if child.stop_signals[step]:
                        self._signal(child, child.stop_signals[step])
                else:
                    say(f"{child.name} did not stop in time: killing it")
                    self._signal(child, signal.SIGKILL)
            deadline = time.monotonic() + grace
            while any(c.alive for c in live) and time.monotonic() < deadline:
                self.pump(0.1)
