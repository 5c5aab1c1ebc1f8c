"""--profile_steps A-B: a torch.profiler trace of optimizer steps A to B, written as a Chrome trace.

Recording starts when step A-1 has finished (so step A's data loading is in the trace) and stops when step B
and its saves have, each step marked as `ProfilerStep#<n>` with the trainer's step number. Outside the range
this costs one comparison per step.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger("loratrain")


def parse_profile_steps(text: str) -> tuple[int, int]:
    """'A-B' (or 'A', one step) -> (A, B); ValueError with the reason."""
    parts = text.strip().split("-")
    if len(parts) > 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError("expected A-B, two step numbers such as 10-12")
    first, last = int(parts[0]), int(parts[-1])
    if first < 1:
        raise ValueError("steps count from 1")
    if first > last:
        raise ValueError(f"the first step ({first}) comes after the last ({last})")
    return first, last


def profile_steps_problems(text: str | None, max_train_steps: int | None) -> list[str]:
    """The format, and the range against the run's steps when they are known."""
    if text is None:
        return []
    try:
        _, last = parse_profile_steps(text)
    except ValueError as exc:
        return [f"--profile_steps {text}: {exc}"]
    if max_train_steps is not None and last > max_train_steps:
        return [
            f"--profile_steps {text}: the run has only {max_train_steps} steps; profile steps within 1-{max_train_steps}"
        ]
    return []


class StepProfiler:
    """Call `tick(steps_done)` once before the first step and after every step, `close()` at the end."""

    def __init__(self, steps: tuple[int, int] | None, folder: Path, device: torch.device) -> None:
        self.steps, self.folder, self.device = steps, folder, device
        self.profile: torch.profiler.profile | None = None
        self.marker: torch.profiler.record_function | None = None

    def _mark(self, step: int | None) -> None:
        # Our own step markers: torch.profiler only writes them when it runs a schedule.
        if self.marker is not None:
            self.marker.__exit__(None, None, None)
        self.marker = None if step is None else torch.profiler.record_function(f"ProfilerStep#{step}")
        if self.marker is not None:
            self.marker.__enter__()

    def tick(self, steps_done: int) -> None:
        if self.steps is None:
            return
        first, last = self.steps
        if self.profile is not None:
            if steps_done >= last:
                self.close()
            else:
                self._mark(steps_done + 1)
        elif first <= steps_done + 1 <= last:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profile = torch.profiler.profile(activities=activities)
            self.profile.start()
            self._mark(steps_done + 1)

    def close(self) -> Path | None:
        """Stop and write the trace (also when training ended inside the range); None when nothing ran."""
        if self.profile is None:
            return None
        self._mark(None)
        profile, self.profile = self.profile, None
        profile.stop()
        first, last = self.steps  # type: ignore[misc]
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"steps_{first}-{last}.json"
        profile.export_chrome_trace(str(path))
        self.steps = None
        log.info(
            "profile of steps %d-%d written to %s (open it in https://ui.perfetto.dev)", first, last, path
        )
        return path
