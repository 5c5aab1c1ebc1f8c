"""What the loop does between steps besides saving: sample images and compute the validation loss.

Both leave training as it was (RNG, modes, devices), and their time is taken off the progress bar's clock so
it/s and the ETA describe training alone.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from library.training.sampling import ImageSampler, pause_bar
from library.training.validation import Validator

log = logging.getLogger("loratrain")


class TrainingExtras:
    def __init__(
        self,
        sampler: ImageSampler | None,
        validator: Validator | None,
        modules: list[Any],
        optimizer: Any,
        logger: Any,
        bar: Any,
        main_process: bool,
    ) -> None:
        self.sampler, self.validator = sampler, validator
        self.modules, self.optimizer, self.logger, self.bar = modules, optimizer, logger, bar
        self.main_process = main_process
        self.epoch_loss: Any = None  # sum of this epoch's step losses, on the device (read once per epoch)
        self.epoch_steps = 0
        self.validated: tuple[int, float] | None = None  # (step, loss) of the latest validation

    def add_loss(self, loss: Any) -> None:
        self.epoch_loss = loss.detach() if self.epoch_loss is None else self.epoch_loss + loss.detach()
        self.epoch_steps += 1

    def _run(self, step: int, epoch: int | None) -> None:
        started = time.perf_counter()
        if self.validator is not None and step > 0 and self.validator.due(step, epoch):
            # An epoch that ends on a validation step reuses that step's value: the weights have not moved.
            if self.validated is not None and self.validated[0] == step:
                value = self.validated[1]
            else:
                value = self.validator.loss(self.modules, self.optimizer)
                self.validated = (step, value)
                log.info("validation loss at step %d: %.6f", step, value)
            kind = "epoch_average" if epoch is not None else "step_average"
            self.logger.log({"loss/validation": value, f"loss/validation/{kind}": value}, step)
            self.bar.set_postfix(val_loss=f"{value:.4f}", refresh=False)
        if self.sampler is not None and self.main_process and self.sampler.due(step, epoch):
            self.sampler.sample(step, epoch, self.modules, self.optimizer, self.logger)
        pause_bar(self.bar, time.perf_counter() - started)

    def at_start(self, step: int) -> None:
        if step == 0:
            self._run(0, None)

    def after_step(self, step: int) -> None:
        self._run(step, None)

    def after_epoch(self, epoch: int, step: int) -> None:
        """`epoch` counts from 1, as kohya's names and cadences do."""
        if self.epoch_steps:
            mean = float(self.epoch_loss) / self.epoch_steps
            self.logger.log({"loss/epoch": mean, "loss/epoch_average": mean}, step)
            self.epoch_loss, self.epoch_steps = None, 0
        self._run(step, epoch)


def build_extras(run: Any, logger: Any, bar: Any) -> TrainingExtras:
    """Reads the run's options (the loop's level) and hands plain values to the sampler and validator."""
    from library.training.sample_prompts import load_sample_prompts, with_default_sampler

    cfg, acc = run.config, run.accelerator
    sampler = validator = None
    if cfg.sample_prompts:
        if not (cfg.sample_every_n_steps or cfg.sample_every_n_epochs or cfg.sample_at_first):
            log.warning(
                "--sample_prompts is set but no --sample_every_n_steps/--sample_every_n_epochs/--sample_at_first"
                ": no images will be sampled"
            )
        prompts = load_sample_prompts(Path(cfg.sample_prompts), run.family.latent_downscale)
        sampler = ImageSampler(
            family=run.family,
            bundle=run.bundle,
            prompts=with_default_sampler(prompts, cfg.sample_sampler),
            out_dir=Path(cfg.output_dir) / "sample",
            output_name=cfg.output_name,
            device=acc.device,
            clip_skip=cfg.clip_skip,
            max_token_length=run.step_options.max_token_length,
            every_steps=cfg.sample_every_n_steps,
            every_epochs=cfg.sample_every_n_epochs,
            at_first=cfg.sample_at_first,
            autocast=acc.autocast,
        )
    held_out = run.dataset.validation()
    if held_out is not None:
        validator = Validator(
            family=run.family,
            bundle=run.bundle,
            group=held_out,
            options=run.step_options,
            device=acc.device,
            seed=run.progress.seed if cfg.validation_seed is None else cfg.validation_seed,
            every_steps=cfg.validate_every_n_steps,
            every_epochs=cfg.validate_every_n_epochs,
            max_steps=cfg.max_validation_steps,
            autocast=acc.autocast,
        )
    elif cfg.validate_every_n_steps or cfg.validate_every_n_epochs:
        log.warning("--validate_every_n_*: no images are held out (set validation_split); no validation loss")
    modules = [run.network, run.bundle.unet, *run.bundle.text_encoders]
    return TrainingExtras(sampler, validator, modules, run.optimizer, logger, bar, acc.is_main_process)
