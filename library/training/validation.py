"""Validation loss on the held-out images: fixed timesteps, fixed noise, no gradients, training untouched.

kohya evaluates each validation batch at 4 timesteps spread evenly over [min_timestep, max_timestep) and
averages. Here the timesteps and the noise are handed to the family explicitly (the noise from a CPU
generator seeded per batch), so the number is the same at every evaluation and on every device, for every
family; the RNG states are restored afterwards, so a run with validation trains the same LoRA as one without.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch

from library.families.base import ModelBundle, ModelFamily
from library.training.sampling import inference_mode_of, preserved_rng
from library.training.step import diffusion_loss

log = logging.getLogger("loratrain")

NUM_TIMESTEPS = 4


def validation_timesteps(min_timestep: int, max_timestep: int, count: int = NUM_TIMESTEPS) -> list[int]:
    """`count` integer timesteps evenly spaced from min_timestep to max_timestep - 1 (both ends included)."""
    last = max_timestep - 1
    if count == 1 or last == min_timestep:
        return [min_timestep] * count
    return [min_timestep + round(k * (last - min_timestep) / (count - 1)) for k in range(count)]


def is_due(step: int, epoch: int | None, *, every_steps: int | None, every_epochs: int | None) -> bool:
    """kohya: after a step when --validate_every_n_steps divides it; at an epoch end every
    --validate_every_n_epochs epochs, every epoch when that is unset."""
    if epoch is None:
        return bool(every_steps) and step % every_steps == 0
    return epoch % (every_epochs or 1) == 0


@dataclass
class Validator:
    family: ModelFamily
    bundle: ModelBundle
    group: Any  # DatasetGroup of the held-out images (library.data.dataset)
    options: Any  # StepOptions
    device: torch.device
    seed: int
    every_steps: int | None = None
    every_epochs: int | None = None
    max_steps: int | None = None
    autocast: Callable[[], AbstractContextManager] | None = None
    _batches: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def due(self, step: int, epoch: int | None = None) -> bool:
        return is_due(step, epoch, every_steps=self.every_steps, every_epochs=self.every_epochs)

    def _load(self) -> list[dict[str, Any]]:
        """Loaded and encoded once (in the seeded region): the same latents at every evaluation, and no image
        is decoded or encoded again."""
        if not self._batches:
            count = self.group.num_batches_per_epoch
            if self.max_steps:
                count = min(count, self.max_steps)
            vae = self.bundle.vae
            home = next(vae.parameters()).device  # the CPU after latent caching
            vae.to(self.device)
            try:
                for i in range(count):
                    batch = self.group.load_batch(0, i)
                    if batch.get("latents") is None:
                        latents = self.family.encode_images(self.bundle, batch["images"])
                        batch = {**batch, "latents": latents.float().cpu(), "images": None}
                    self._batches.append(batch)
            finally:
                vae.to(home)
        return self._batches

    def loss(self, modules: list[torch.nn.Module], optimizer: Any) -> float:
        """The mean loss over the validation batches and the fixed timesteps."""
        steps = validation_timesteps(self.options.min_timestep, self.options.max_timestep)
        total = torch.zeros((), device=self.device)
        count = 0
        with preserved_rng(self.device), inference_mode_of(modules, optimizer), torch.no_grad():
            torch.manual_seed(self.seed)  # anything a family draws beyond noise and timesteps stays fixed too
            for index, batch in enumerate(self._load()):
                shape = batch["latents"].shape
                generator = torch.Generator("cpu").manual_seed(self.seed + index)
                noise = torch.randn(shape, generator=generator).to(self.device)
                for t in steps:
                    timesteps = torch.full((shape[0],), t, dtype=torch.long, device=self.device)
                    total += diffusion_loss(
                        self.family,
                        self.bundle,
                        batch,
                        self.options,
                        self.device,
                        self.autocast() if self.autocast else None,
                        timesteps=timesteps,
                        noise=noise,
                    ).float()
                    count += 1
        return float(total) / max(1, count)
