#!/usr/bin/env python
"""Summarise a py-spy raw (collapsed) profile recorded with --threads: where the time goes.

    py-spy record --pid PID --format raw --threads --rate 200 -o prof.txt --nonblocking
    .venv/bin/python bench/pyspy_summary.py prof.txt --seconds 10 --rate 200

Per thread: share of wall time active (py-spy samples only running threads unless --idle);
then the top frames by inclusive and by self samples, over all threads and for the event loop.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

_THREAD = re.compile(r"^thread \((\d+)\): ([^;]*);?")


def parse(path: Path) -> list[tuple[str, list[str], int]]:
    rows = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        m = _THREAD.match(stack)
        frames = stack.split(";")
        thread = "?"
        if m:
            thread = m.group(2) or m.group(1)
            frames = frames[1:]
        thread = re.sub(r"_\d+$", "_N", thread)  # decode_0, decode_1 -> decode_N
        rows.append((thread, frames, int(count)))
    return rows


def short(frame: str) -> str:
    frame = re.sub(r"\(/[^)]*/site-packages/", "(", frame)
    return re.sub(r"\(/work/main/", "(", frame)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("profile", type=Path)
    p.add_argument("--seconds", type=float, help="recording length, to turn samples into a share of wall time")
    p.add_argument("--rate", type=float, default=200)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--thread", default="MainThread", help="also detail this thread")
    args = p.parse_args()
    rows = parse(args.profile)
    total = sum(c for _, _, c in rows)
    per_thread: Counter[str] = Counter()
    for thread, _, count in rows:
        per_thread[thread] += count
    print(f"{total} samples")
    for thread, count in per_thread.most_common():
        share = f", {count / (args.seconds * args.rate):.0%} of wall time" if args.seconds else ""
        print(f"  {thread:<20s} {count:7d} ({count / total:.0%} of samples{share})")
    for scope in (None, args.thread):
        inclusive: Counter[str] = Counter()
        self_: Counter[str] = Counter()
        n = 0
        for thread, frames, count in rows:
            if scope and thread != scope:
                continue
            n += count
            for frame in set(frames):
                inclusive[short(frame)] += count
            if frames:
                self_[short(frames[-1])] += count
        title = scope or "all threads"
        print(f"\n== {title}: {n} samples; top inclusive ==")
        for frame, count in inclusive.most_common(args.top):
            print(f"  {count / max(n, 1):6.1%}  {frame}")
        print(f"== {title}: top self ==")
        for frame, count in self_.most_common(args.top):
            print(f"  {count / max(n, 1):6.1%}  {frame}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
