"""Runs train_network.py in this process with faults made reproducible, for tests that signal or kill it.

    python tests/fault_runner.py <train_network.py arguments>

Environment:
- FAULT_STEP_SLEEP=<s>: after each optimizer step print "STEP-DONE <n> rank <rank> pid <pid>" and sleep, so
  a signal lands mid-run.
- FAULT_FSYNC_SLEEP=<s> and FAULT_FSYNC_MATCH=<text>: when a file whose path contains <text> is fsync'ed
  (its bytes are written, its rename not yet done), print "FSYNC <path>" and sleep before continuing: a kill
  then lands in the middle of a save.
"""

from __future__ import annotations

import os
import runpy
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _say(text: str) -> None:
    print(text, flush=True)


def _slow_steps(seconds: float) -> None:
    import library.training.loop as loop

    original = loop.optimizer_step
    done = 0

    def optimizer_step(run):  # type: ignore[no-untyped-def]
        nonlocal done
        result = original(run)
        done += 1
        _say(f"STEP-DONE {done} rank {os.environ.get('RANK', '0')} pid {os.getpid()}")
        time.sleep(seconds)
        return result

    loop.optimizer_step = optimizer_step


def _slow_fsync(seconds: float, match: str) -> None:
    original = os.fsync

    def fsync(fd: int) -> None:
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            path = ""
        if match in path:
            _say(f"FSYNC {path}")
            time.sleep(seconds)
        original(fd)

    os.fsync = fsync


if __name__ == "__main__":
    if step := os.environ.get("FAULT_STEP_SLEEP"):
        _slow_steps(float(step))
    if fsync := os.environ.get("FAULT_FSYNC_SLEEP"):
        _slow_fsync(float(fsync), os.environ.get("FAULT_FSYNC_MATCH", ""))
    sys.argv = [str(ROOT / "train_network.py"), *sys.argv[1:]]
    sys.path.insert(0, str(ROOT))
    runpy.run_path(str(ROOT / "train_network.py"), run_name="__main__")
