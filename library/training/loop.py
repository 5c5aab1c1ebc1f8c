"""The training loop: micro-steps, optimizer steps, progress, saving. One implementation for every family."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from library import startup_gc
from library.training import faults
from library.training.ddp import data_parallel_forward, gradient_sync
from library.training.metadata import per_save_metadata
from library.training.optim import averaged_weights, max_norm_stats
from library.training.profiling import StepProfiler
from library.training.progress import MAX_NORM_KEYS, Logger, LossAverage
from library.training.run import Run, timestamp
from library.training.state import Progress, save_state
from library.training.step import diffusion_loss
from library.validate import MODEL_EXTENSIONS, output_name, tracker_init_options

log = logging.getLogger("loratrain")


class StepClock:
    """Optional per-step wall times for bench/ (env LORATRAIN_STEP_TIMES=path); costs nothing when unset."""

    def __init__(self, device: torch.device, main_process: bool = True) -> None:
        # Every rank sees the same variable; only rank 0 writes the file.
        self.path = os.environ.get("LORATRAIN_STEP_TIMES") if main_process else None
        self.sync = device.type == "cuda"
        self.ends: list[float] = []

    def tick(self) -> None:
        if self.path:
            if self.sync:
                torch.cuda.synchronize()
            self.ends.append(time.time())

    def write(self) -> None:
        if self.path:
            Path(self.path).write_text(json.dumps({"step_end_wall": self.ends}))


class EpochSampler(torch.utils.data.Sampler):
    """Yields (epoch, batch index) for this process's share of one epoch, starting mid-epoch on resume.

    Indices are produced in the main process, so `set_epoch` works with persistent workers too.
    """

    def __init__(self, num_batches: int, rank: int, world: int) -> None:
        self.num_batches, self.rank, self.world = num_batches, rank, world
        self.per_rank = math.ceil(num_batches / world)
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self):
        for k in range(self.start, self.per_rank):
            # Wrap around so every rank runs the same number of steps.
            yield (self.epoch, (k * self.world + self.rank) % self.num_batches)

    def __len__(self) -> int:
        return self.per_rank - self.start


def make_loader(run: Run) -> tuple[torch.utils.data.DataLoader, EpochSampler]:
    from library.data.loader import EpochBatchDataset

    acc = run.accelerator
    sampler = EpochSampler(run.dataset.num_batches_per_epoch, acc.process_index, acc.num_processes)
    workers = min(run.config.max_data_loader_n_workers, max(0, (torch.multiprocessing.cpu_count() or 1) - 1))
    if run.dataset.latents_in_memory():
        workers = 0  # nothing to decode: workers would only add start-up time
    loader = torch.utils.data.DataLoader(
        EpochBatchDataset(run.dataset),
        batch_size=None,
        sampler=sampler,
        num_workers=workers,
        worker_init_fn=faults.ignore_stop_signals,
        persistent_workers=run.config.persistent_data_loader_workers and workers > 0,
        pin_memory=acc.device.type == "cuda",
        # Its own generator: creating an iterator must not draw from the global RNG, or a resumed run's
        # noise would drift from an uninterrupted one.
        generator=torch.Generator().manual_seed(run.progress.seed),
    )
    return loader, sampler


def save_path(run: Run, suffix: str, kind: str = "last") -> Path:
    """`kind` ("epoch", "step", "last") picks kohya's default base name when --output_name is unset."""
    return (
        Path(run.config.output_dir)
        / f"{output_name(run.config, kind)}{suffix}{MODEL_EXTENSIONS[run.config.save_model_as]}"
    )


def save_lora(run: Run, path: Path, progress: Progress) -> None:
    from networks.lora_file import save_lora_file

    if not run.accelerator.is_main_process:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = per_save_metadata(
        run.metadata, steps=progress.global_step, epoch=progress.epoch, no_metadata=run.config.no_metadata
    )
    # Schedule-free optimizers: the averaged (eval) weights are the ones to use. States keep the training
    # point instead, so a resumed run continues exactly.
    with averaged_weights(run.optimizer):
        state = network_state_for_save(run.network, run.save_dtype)
    save_lora_file(path, state, metadata, model_format=run.config.save_model_as)
    log.info("saved %s", path)


def network_state_for_save(network: torch.nn.Module, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Detached CPU tensors to save; third-party modules (LyCORIS) lack our `state_dict_for_save`."""
    if hasattr(network, "state_dict_for_save"):
        return network.state_dict_for_save(dtype)
    return {
        k: v.detach().to(device="cpu", dtype=dtype or v.dtype, copy=True).contiguous()
        for k, v in network.state_dict().items()
    }


def state_folder(run: Run, suffix: str, kind: str = "last") -> Path:
    return Path(run.config.output_dir) / f"{output_name(run.config, kind)}{suffix}-state"


def save_training_state(run: Run, suffix: str, progress: Progress, kind: str = "last") -> None:
    if not run.accelerator.is_main_process:
        return
    folder = state_folder(run, suffix, kind)
    save_state(
        folder,
        network_state=run.network.state_dict(),
        optimizer=run.optimizer,
        scheduler=run.scheduler,
        scaler=run.accelerator.scaler,
        progress=progress,
        # family, script and network module: --resume checks them before loading weights.
        extra={
            "max_train_steps": run.max_train_steps,
            "family": run.family.name,
            "script": run.family.script,
            "network_module": run.config.network_module,
        },
    )
    log.info("saved state %s", folder)


def optimizer_step(run: Run) -> torch.Tensor | tuple | None:
    """One optimizer step; returns --scale_weight_norms statistics (a device tensor: read with the next loss)."""
    acc = run.accelerator
    # Several processes: the gradients are averaged already, by DDP during backward (library/training/ddp.py).
    # --fused_*: clipped per tensor/group inside backward, before each gradient is freed.
    if run.config.max_grad_norm and not getattr(run.optimizer, "clips_in_backward", False):
        acc.clip_grad_norm_(run.params, run.config.max_grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.config.scale_weight_norms:
        return max_norm_stats(run.network, run.config.scale_weight_norms, acc.device)
    return None


def as_device_values(values: torch.Tensor | tuple, device: torch.device) -> torch.Tensor:
    """Statistics as one device tensor, so reading them costs nothing extra; a third-party network's tuple may
    mix host numbers and device tensors (copying a number to the device does not wait for it)."""
    if isinstance(values, torch.Tensor):
        return values
    return torch.stack([torch.as_tensor(v, dtype=torch.float32, device=device).reshape(()) for v in values])


def _after_step_saves(run: Run, progress: Progress) -> None:
    every = run.config.save_every_n_steps
    if every and progress.global_step % every == 0 and progress.global_step < run.max_train_steps:
        save_lora(run, save_path(run, f"-step{progress.global_step:08d}", "step"), progress)
        if run.config.save_state:
            save_training_state(run, f"-step{progress.global_step:08d}", progress, "step")
        _prune(run, "step", progress.global_step)


def _after_epoch_saves(run: Run, progress: Progress, epoch: int) -> None:
    every = run.config.save_every_n_epochs
    if every and (epoch + 1) % every == 0 and epoch + 1 < run.num_epochs:
        save_lora(run, save_path(run, f"-{epoch + 1:06d}", "epoch"), progress)
        if run.config.save_state:
            save_training_state(run, f"-{epoch + 1:06d}", progress, "epoch")
        _prune(run, "epoch", epoch + 1)


def _prune(run: Run, kind: str, number: int) -> None:
    """--save_last_n_*: delete the save that fell out of the window."""
    from library.training.retention import prune_old_saves

    cfg = run.config
    if not run.accelerator.is_main_process:
        return
    for path in prune_old_saves(
        Path(cfg.output_dir),
        output_name(cfg, kind),
        MODEL_EXTENSIONS[cfg.save_model_as],
        number=number,
        kind=kind,
        every=cfg.save_every_n_epochs if kind == "epoch" else cfg.save_every_n_steps,
        last_n=cfg.save_last_n_epochs if kind == "epoch" else cfg.save_last_n_steps,
        last_n_state=cfg.save_last_n_epochs_state if kind == "epoch" else cfg.save_last_n_steps_state,
    ):
        log.info("removed %s (--save_last_n_%ss)", path, kind)


def _lr_values(run: Run) -> dict[str, float]:
    return {
        f"lr/{name}": group["lr"]
        for name, group in zip(run.lr_names, run.optimizer.param_groups, strict=False)
    }


def wandb_options(cfg: Any) -> dict[str, Any]:
    options = tracker_init_options(cfg.log_tracker_config) if cfg.log_tracker_config else {}
    if cfg.wandb_run_name:
        options["name"] = cfg.wandb_run_name
    if cfg.wandb_api_key:
        options["api_key"] = cfg.wandb_api_key
    return options


def step_profiler(run: Run) -> StepProfiler:
    """--profile_steps, on the main process only."""
    from library.training.profiling import parse_profile_steps

    cfg = run.config
    steps = parse_profile_steps(cfg.profile_steps) if cfg.profile_steps else None
    folder = Path(cfg.logging_dir or cfg.output_dir) / "profile"
    return StepProfiler(steps if run.accelerator.is_main_process else None, folder, run.accelerator.device)


def train_loop(run: Run) -> Path:
    from tqdm.contrib.logging import logging_redirect_tqdm

    # log lines (saves) print above the progress bar instead of through it; SIGINT/SIGTERM stop after a step
    with logging_redirect_tqdm(), faults.StopSignals() as stop:
        return _train_loop(run, stop)


def _save_and_stop(
    run: Run, stop: faults.StopSignals, guard: faults.NanGuard, nan_paths: list[str] | None
) -> faults.StopRun:
    """Save the LoRA and a resumable state under the step's name (as --save_every_n_steps would), then the
    error to exit with. After a NaN loss the optimizer has not stepped: this is the last good state."""
    progress = run.progress
    if nan_paths is not None and getattr(run.optimizer, "clips_in_backward", False):
        return guard.stepped_in_backward_error(progress.global_step + 1, nan_paths)  # nothing good to save
    from library.training.launch import deepspeed_launch

    suffix = f"-step{progress.global_step:08d}"
    lora, state = save_path(run, suffix, "step"), state_folder(run, suffix, "step")
    resumable = not deepspeed_launch()  # ZeRO partitions the optimizer state, which our states cannot hold
    stop.saving = str(state if resumable else lora)
    save_lora(run, lora, progress)
    if resumable:
        save_training_state(run, suffix, progress, "step")
    run.accelerator.wait_for_everyone()  # a rank that exits first would make the launcher kill rank 0's save
    if not run.accelerator.is_main_process:
        return faults.StopRun("", 2 if nan_paths is not None else stop.exit_code)  # rank 0 tells the user
    kept = str(state) if resumable else None
    if nan_paths is not None:
        return guard.stop_error(progress.global_step + 1, nan_paths, kept)
    signum, step = stop.exit_code - 128, progress.global_step
    return faults.interrupted_error(signum, step, run.max_train_steps, str(lora), kept)


def _train_loop(run: Run, stop: faults.StopSignals) -> Path:
    from tqdm import tqdm

    from library.data.loader import raise_if_failed

    acc, cfg, progress = run.accelerator, run.config, run.progress
    loader, sampler = make_loader(run)
    accum = cfg.gradient_accumulation_steps
    # The step as a module (DDP-wrapped with several processes); the loss function is looked up here so a
    # test's replacement of `diffusion_loss` in this module takes effect.
    forward, run.optimizer = data_parallel_forward(
        acc,
        run.network,
        run.family,
        run.bundle,
        run.step_options,
        diffusion_loss,
        optimizer=run.optimizer,
        batch_size=cfg.train_batch_size,
        max_grad_norm=cfg.max_grad_norm,
    )
    # The loop's one host read per optimizer step (`faults.step_verdict`): the step's loss, before the
    # optimizer steps, so a NaN never reaches the weights; the stop-signal agreement between ranks and the
    # previous step's max-norm statistics ride along. The epoch's mean loss (`extras`) is read once per epoch.
    average = LossAverage(run.batches_per_epoch)
    from library.config import loggable_options

    main = acc.is_main_process
    logger = Logger(
        cfg.logging_dir if main else None,
        cfg.log_prefix,
        timestamp(),
        log_with=cfg.log_with if main else None,
        tracker_name=cfg.log_tracker_name,
        config=loggable_options(cfg) if cfg.log_config and main else None,
        wandb_options=wandb_options(cfg),
    )
    log.info(
        "training: %d steps, %d epochs, %d batches per epoch%s",
        run.max_train_steps,
        run.num_epochs,
        run.batches_per_epoch,
        f", resuming at step {progress.global_step}" if progress.global_step else "",
    )
    bar = tqdm(
        total=run.max_train_steps,
        initial=progress.global_step,
        desc="steps",
        smoothing=0.1,
        disable=not acc.is_main_process,
    )
    run.network.train()
    clock = StepClock(acc.device, acc.is_main_process)
    from library.training.extras import build_extras

    extras = build_extras(run, logger, bar)  # sample images, validation loss
    extras.at_start(progress.global_step)
    profiler = step_profiler(run)
    profiler.tick(progress.global_step)

    postfix: dict[str, int] = {}

    def log_norms(values: tuple[float, ...] | list[float], step: int) -> None:
        stats = dict(zip(MAX_NORM_KEYS, values, strict=True))
        postfix["keys_scaled"] = int(stats[MAX_NORM_KEYS[0]])
        logger.log(stats, step)

    # --scale_weight_norms statistics of the last step, still on the device: read with the next step's loss.
    pending_norms: torch.Tensor | None = None

    guard = faults.NanGuard(cfg.skip_nan_steps)
    stopping: tuple[str, list[str]] | None = None  # ("signal", []) or ("nan", the step's image paths)
    startup_gc.before_training()  # full collections resume; what start-up built is frozen, not rescanned
    while progress.global_step < run.max_train_steps and progress.epoch < run.num_epochs:
        epoch = progress.epoch
        sampler.set_epoch(epoch, progress.batch_in_epoch)
        pending, step_loss, step_paths = 0, None, []
        for batch in loader:
            batch = raise_if_failed(batch)  # a worker's UserError (e.g. a corrupt image), as one clean line
            # Only the micro-step before an optimizer step all-reduces its gradients.
            steps_now = pending + 1 >= accum or progress.batch_in_epoch + 1 >= sampler.per_rank
            with gradient_sync(acc, forward, steps_now):
                loss = forward(batch)
                acc.backward(loss / accum)
            step_loss = loss.detach() if step_loss is None else step_loss + loss.detach()
            step_paths += batch.get("image_paths", [])
            progress.batch_in_epoch += 1
            pending += 1
            if pending < accum and progress.batch_in_epoch < sampler.per_rank:
                continue
            step_mean = step_loss / pending
            # Before the optimizer steps: a NaN must reach neither the weights nor the optimizer's moments. On
            # CUDA this read waits for the step's backward (the step's one host read).
            verdict = faults.step_verdict(step_mean, stop.received, acc.num_processes, pending_norms)
            if pending_norms is not None:
                log_norms(verdict.riders, progress.global_step)
                pending_norms = None
            if not verdict.finite:
                run.optimizer.zero_grad(set_to_none=True)  # the step's gradients are dropped either way
                # --fused_*: the optimizer stepped inside backward; there is nothing left to skip.
                in_backward = getattr(run.optimizer, "clips_in_backward", False)
                if in_backward or not guard.should_skip(progress.global_step + 1, step_paths):
                    stopping = ("nan", step_paths)
                    break
                pending, step_loss, step_paths = 0, None, []
                continue
            norm_stats = optimizer_step(run)
            progress.global_step += 1
            clock.tick()
            bar.update(1)
            if norm_stats is not None:
                pending_norms = as_device_values(norm_stats, acc.device)
            avg = average.add(verdict.loss)
            bar.set_postfix(avr_loss=f"{avg:.4f}", **postfix, refresh=False)
            # As kohya: the step's loss with the learning rates the scheduler set after it.
            logger.log(
                {"loss/current": verdict.loss, "loss/average": avg, **_lr_values(run)}, progress.global_step
            )
            extras.add_loss(step_mean)
            pending, step_loss, step_paths = 0, None, []
            if verdict.signal and progress.global_step < run.max_train_steps:
                stopping = ("signal", [])
                stop.received = stop.received or verdict.signal  # another rank's signal: the same exit status
                break
            _after_step_saves(run, progress)
            extras.after_step(progress.global_step)
            profiler.tick(progress.global_step)
            if progress.global_step >= run.max_train_steps:
                break
        if stopping is not None:
            break
        if progress.batch_in_epoch >= sampler.per_rank:
            progress.epoch += 1
            progress.batch_in_epoch = 0
            _after_epoch_saves(run, progress, epoch)
            extras.after_epoch(epoch + 1, progress.global_step)
    if pending_norms is not None:
        log_norms(pending_norms.tolist(), progress.global_step)
    clock.write()
    profiler.close()
    bar.close()
    logger.close()
    if stopping is not None:
        raise _save_and_stop(run, stop, guard, stopping[1] if stopping[0] == "nan" else None)
    final = save_path(run, "")
    stop.saving = str(final)  # a signal now: the run is complete once this save ends
    save_lora(run, final, progress)
    if cfg.save_state or cfg.save_state_on_train_end:
        save_training_state(run, "", progress)
    acc.wait_for_everyone()
    return final
