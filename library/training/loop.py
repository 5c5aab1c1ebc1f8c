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

from library.training.metadata import per_save_metadata
from library.training.optim import MaxNormReader, averaged_weights, max_norm_stats
from library.training.profiling import StepProfiler
from library.training.progress import Logger, LossAverage, LossReader
from library.training.run import Run, timestamp
from library.training.state import Progress, save_state
from library.training.step import diffusion_loss
from library.validate import MODEL_EXTENSIONS, output_name, tracker_init_options

log = logging.getLogger("loratrain")


class StepClock:
    """Optional per-step wall times for bench/ (env LORATRAIN_STEP_TIMES=path); costs nothing when unset."""

    def __init__(self, device: torch.device) -> None:
        self.path = os.environ.get("LORATRAIN_STEP_TIMES")
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


def save_training_state(run: Run, suffix: str, progress: Progress, kind: str = "last") -> None:
    if not run.accelerator.is_main_process:
        return
    folder = Path(run.config.output_dir) / f"{output_name(run.config, kind)}{suffix}-state"
    save_state(
        folder,
        network_state=run.network.state_dict(),
        optimizer=run.optimizer,
        scheduler=run.scheduler,
        scaler=run.accelerator.scaler,
        progress=progress,
        extra={"max_train_steps": run.max_train_steps},
    )
    log.info("saved state %s", folder)


def _all_reduce_grads(params: list[torch.nn.Parameter], world: int) -> None:
    """One coalesced all-reduce instead of one call per LoRA tensor."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def optimizer_step(run: Run) -> torch.Tensor | tuple | None:
    """One optimizer step; returns --scale_weight_norms statistics (a device tensor: read it one step late)."""
    acc = run.accelerator
    if acc.num_processes > 1:
        _all_reduce_grads(run.params, acc.num_processes)
    # --fused_*: clipped per tensor/group inside backward, before each gradient is freed.
    if run.config.max_grad_norm and not getattr(run.optimizer, "clips_in_backward", False):
        acc.clip_grad_norm_(run.params, run.config.max_grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.config.scale_weight_norms:
        return max_norm_stats(run.network, run.config.scale_weight_norms, acc.device)
    return None


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

    with logging_redirect_tqdm():  # log lines (saves) print above the progress bar instead of through it
        return _train_loop(run)


def _train_loop(run: Run) -> Path:
    from tqdm import tqdm

    from library.data.loader import raise_if_failed

    acc, cfg, progress = run.accelerator, run.config, run.progress
    loader, sampler = make_loader(run)
    accum = cfg.gradient_accumulation_steps
    reader, average = LossReader(acc.device), LossAverage(run.batches_per_epoch)
    norm_reader = MaxNormReader(acc.device)
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
    clock = StepClock(acc.device)
    from library.training.extras import build_extras

    extras = build_extras(run, logger, bar)  # sample images, validation loss
    extras.at_start(progress.global_step)
    profiler = step_profiler(run)
    profiler.tick(progress.global_step)

    def report(value: float | None, step: int, lrs: dict[str, float]) -> None:
        if value is None:
            return
        avg = average.add(value)
        extra = {"keys_scaled": int(lrs["max_norm/keys_scaled"])} if "max_norm/keys_scaled" in lrs else {}
        bar.set_postfix(avr_loss=f"{avg:.4f}", **extra, refresh=False)
        logger.log({"loss/current": value, "loss/average": avg, **lrs}, step)

    # The reader hands a step's loss back one step late; its lrs (as kohya, the scheduler's values after that
    # step) wait with it, so each logged point pairs a step's loss with that step's lrs.
    held_lrs: dict[str, float] = {}

    while progress.global_step < run.max_train_steps and progress.epoch < run.num_epochs:
        epoch = progress.epoch
        sampler.set_epoch(epoch, progress.batch_in_epoch)
        pending, step_loss = 0, None
        for batch in loader:
            batch = raise_if_failed(batch)  # a worker's UserError (e.g. a corrupt image), as one clean line
            loss = diffusion_loss(run.family, run.bundle, batch, run.step_options, acc.device, acc.autocast())
            acc.backward(loss / accum)
            step_loss = loss.detach() if step_loss is None else step_loss + loss.detach()
            progress.batch_in_epoch += 1
            pending += 1
            if pending < accum and progress.batch_in_epoch < sampler.per_rank:
                continue
            norm_stats = optimizer_step(run)
            progress.global_step += 1
            clock.tick()
            bar.update(1)
            norms = norm_reader.push(norm_stats) if norm_stats is not None else {}
            report(reader.push(step_loss / pending), progress.global_step - 1, {**held_lrs, **norms})
            held_lrs = _lr_values(run)
            extras.add_loss(step_loss / pending)
            pending, step_loss = 0, None
            _after_step_saves(run, progress)
            extras.after_step(progress.global_step)
            profiler.tick(progress.global_step)
            if progress.global_step >= run.max_train_steps:
                break
        if progress.batch_in_epoch >= sampler.per_rank:
            progress.epoch += 1
            progress.batch_in_epoch = 0
            _after_epoch_saves(run, progress, epoch)
            extras.after_epoch(epoch + 1, progress.global_step)
    report(reader.pop(), progress.global_step, {**held_lrs, **norm_reader.pop()})
    clock.write()
    profiler.close()
    bar.close()
    logger.close()
    final = save_path(run, "")
    save_lora(run, final, progress)
    if cfg.save_state or cfg.save_state_on_train_end:
        save_training_state(run, "", progress)
    acc.wait_for_everyone()
    return final
