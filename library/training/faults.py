"""Faults during training: a stop signal (SIGINT/SIGTERM) and a NaN/inf loss.

A signal only sets a flag; the loop finishes the optimizer step it is in (every micro-batch of the
accumulation), saves the LoRA and a resumable state as `<name>-stepNNNNNNNN` (the names --save_every_n_steps
uses, so `--save_last_n_steps` and tools see them as ordinary step saves), and exits with 128 + the signal
number (130 for SIGINT, 143 for SIGTERM), printing the `--resume` to add. More signals while it finishes or
saves do not cut the save short: they are reported and ignored (saves are atomic, so kill -9 is safe too).

The loss is checked before the optimizer steps, with the one host read a step makes (`StepVerdict`), so a
NaN never reaches the weights or the optimizer's moments. With several processes the flags are combined
(max) across ranks, so every rank skips, stops or saves at the same step.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
from dataclasses import dataclass
from types import FrameType
from typing import Any

import torch

from library.errors import UserError

log = logging.getLogger("loratrain")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_PATHS_SHOWN = 8


class StopRun(UserError):
    """The run stopped on purpose (a signal, a NaN loss) after saving; `exit_code` is the process's status."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class StopSignals:
    """Context manager: SIGINT/SIGTERM set `received` instead of raising; the previous handlers come back on
    exit. Only the main thread can install handlers; elsewhere (a GUI's worker thread) this does nothing."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.saving: str | None = None  # what is being written now, for the message on a further signal
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = signum
            log.warning("%s: finishing this optimizer step, then saving a resumable state", name)
        elif self.saving:
            log.warning(
                "%s: still saving %s; not stopping halfway (saves are atomic: even kill -9 keeps the previous "
                "files intact)",
                name,
                self.saving,
            )
        else:
            log.warning("%s: already stopping after this optimizer step; the state will be saved", name)

    @property
    def exit_code(self) -> int:
        return 128 + (self.received or signal.SIGINT)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: Ctrl-C reaches the whole process group; a worker that died of it would
    take the batch the main process still needs for the step it is finishing."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


@dataclass(frozen=True)
class StepVerdict:
    finite: bool  # the step's loss is a number on every rank
    signal: int  # the stop signal some rank received (the highest number), 0 for none
    loss: float  # this process's loss for the step
    riders: tuple[float, ...] = ()  # the values read along with it (see `step_verdict`)


def step_verdict(
    loss: torch.Tensor, received: int | None, num_processes: int, riders: torch.Tensor | None = None
) -> StepVerdict:
    """The step's one host read, before the optimizer steps: the (accumulated) loss, whether it is finite on
    every rank and whether any rank was sent a stop signal. `riders` (device values that would otherwise need
    a read of their own, e.g. the previous step's max-norm statistics) come back in the same read."""
    parts = [loss.detach().reshape(1).float()]
    if riders is not None:
        parts.append(riders.detach().reshape(-1).float().to(loss.device))
    if num_processes > 1:
        flags = torch.stack([(~torch.isfinite(loss.detach())).float(), loss.new_tensor(float(received or 0))])
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        bad, signum, value, *rest = torch.cat([flags.float(), *parts]).tolist()
        return StepVerdict(bad == 0, int(signum), value, tuple(rest))
    value, *rest = torch.cat(parts).tolist()
    return StepVerdict(math.isfinite(value), received or 0, value, tuple(rest))


def _paths_text(paths: list[str]) -> str:
    shown = ", ".join(paths[:_PATHS_SHOWN])
    return shown + (f" and {len(paths) - _PATHS_SHOWN} more" if len(paths) > _PATHS_SHOWN else "")


class NanGuard:
    """--skip_nan_steps N: up to N non-finite steps are skipped (no optimizer or scheduler step, gradients
    dropped, a warning); the next one stops the run."""

    ADVICE = (
        "lower the learning rate, train in bf16 instead of fp16, or pass --skip_nan_steps N to skip a few"
    )

    def __init__(self, allowed: int) -> None:
        if allowed < 0:
            raise UserError(f"--skip_nan_steps {allowed}: pass 0 or more (steps with a NaN/inf loss to skip)")
        self.allowed, self.skipped = allowed, 0

    def should_skip(self, step: int, paths: list[str]) -> bool:
        """After a non-finite loss at optimizer step `step`: True to skip it, False when the run must stop."""
        if self.skipped >= self.allowed:
            return False
        self.skipped += 1
        log.warning(
            "step %d: the loss is NaN/inf; skipped it (%d of --skip_nan_steps %d); images: %s",
            step,
            self.skipped,
            self.allowed,
            _paths_text(paths),
        )
        return True

    def stepped_in_backward_error(self, step: int, paths: list[str]) -> StopRun:
        """--fused_backward_pass / --fused_optimizer_groups step inside backward: the NaN is in the weights
        before the loss can be read, so no state is saved and nothing can be skipped."""
        return StopRun(
            f"step {step}: the loss is NaN/inf (images: {_paths_text(paths)}); with --fused_backward_pass or "
            "--fused_optimizer_groups the optimizer steps inside backward, so the weights took it and nothing was "
            "saved: resume from the last *-state folder with a lower learning rate, or in bf16 instead of fp16",
            exit_code=2,
        )

    def stop_error(self, step: int, paths: list[str], state: str | None) -> StopRun:
        saved = f"the last good state is saved in {state}; " if state else ""
        skipped = f" after {self.skipped} skipped" if self.skipped else ""
        return StopRun(
            f"step {step}: the loss is NaN/inf{skipped} (images: {_paths_text(paths)}); {saved}{self.ADVICE}",
            exit_code=2,
        )


def interrupted_error(signum: int, step: int, total: int, lora: str, state: str | None) -> StopRun:
    """`state` None: a DeepSpeed launch, whose partitioned optimizer state no state folder holds."""
    name = signal.Signals(signum).name
    if state is None:
        return StopRun(
            f"stopped by {name} after step {step} of {total}; saved {lora} (DeepSpeed runs keep no resumable "
            f"state): to continue, start a new run with --network_weights {lora}",
            exit_code=128 + signum,
        )
    return StopRun(
        f"stopped by {name} after step {step} of {total}; saved {lora} and the state {state}: to continue, run "
        f"the same command with --resume {state}",
        exit_code=128 + signum,
    )
