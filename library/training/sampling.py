"""Sample images during training (--sample_prompts): when, how, and where they go.

The family draws the images; this module decides the cadence (kohya's), names and saves them, logs them, and
leaves training exactly as it was: RNG states, network/model/optimizer modes and the devices of the VAE
and text encoders are restored, so a run with sampling trains the same LoRA as one without.
"""

from __future__ import annotations

import inspect
import logging
import random
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from library.families.base import ModelBundle, ModelFamily
from library.training.sample_prompts import SAMPLERS, SamplePrompt

log = logging.getLogger("loratrain")


def make_scheduler(name: str, base_config: Any, *, zero_terminal_snr: bool = False) -> Any:
    """A diffusers sampling scheduler of kohya's `name`, built from the family's training-schedule config
    (betas, prediction type), with clip_sample off as kohya. `zero_terminal_snr`: the training schedule was
    rescaled (--zero_terminal_snr), so the sampler rescales its betas the same way."""
    import diffusers

    class_name, extra = SAMPLERS[name.lower()]
    cls = getattr(diffusers, class_name)
    # steps_offset 1: what StableDiffusionPipeline would patch in anyway (with a deprecation warning).
    overrides = (
        {"clip_sample": False, "steps_offset": 1} if "clip_sample" in base_config else {"steps_offset": 1}
    )
    if zero_terminal_snr and "rescale_betas_zero_snr" in inspect.signature(cls.__init__).parameters:
        overrides["rescale_betas_zero_snr"] = True
    return cls.from_config(base_config, **overrides, **extra)


@contextmanager
def preserved_rng(device: torch.device) -> Iterator[None]:
    """Python, numpy, torch CPU and CUDA RNG states are put back afterwards."""
    py, npy = random.getstate(), np.random.get_state()
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


@contextmanager
def inference_mode_of(modules: list[torch.nn.Module], optimizer: Any) -> Iterator[None]:
    """Modules in eval mode and a schedule-free optimizer's averaged weights for the duration; then as before."""
    from library.training.optimizers import optimizer_eval, optimizer_train

    was = [m.training for m in modules]
    optimizer_eval(optimizer)
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, training in zip(modules, was, strict=True):
            m.train(training)
        optimizer_train(optimizer)


def image_name(
    output_name: str | None, prompt: SamplePrompt, step: int, epoch: int | None, stamp: str
) -> str:
    """kohya's `<name>_<e000001|000100>_<idx:02d>_<timestamp>_<seed>.png` (the seed is always known here)."""
    number = f"e{epoch:06d}" if epoch is not None else f"{step:06d}"
    prefix = f"{output_name}_" if output_name else ""
    return f"{prefix}{number}_{prompt.index:02d}_{stamp}_{prompt.seed}.png"


def is_due(
    step: int, epoch: int | None, *, every_steps: int | None, every_epochs: int | None, at_first: bool
) -> bool:
    """kohya's cadence: step 0 only with --sample_at_first; epoch ends when --sample_every_n_epochs is set
    (it wins over steps); otherwise every N steps (never at an epoch end)."""
    if step == 0:
        return at_first
    if every_epochs:
        return epoch is not None and epoch % every_epochs == 0
    if every_steps:
        return epoch is None and step % every_steps == 0
    return False


@dataclass
class ImageSampler:
    family: ModelFamily
    bundle: ModelBundle
    prompts: list[SamplePrompt]
    out_dir: Path
    output_name: str | None
    device: torch.device
    clip_skip: int | None
    max_token_length: int | None
    every_steps: int | None = None
    every_epochs: int | None = None
    at_first: bool = False
    autocast: Callable[[], AbstractContextManager] | None = None

    def due(self, step: int, epoch: int | None = None) -> bool:
        return is_due(
            step, epoch, every_steps=self.every_steps, every_epochs=self.every_epochs, at_first=self.at_first
        )

    def sample(
        self, step: int, epoch: int | None, modules: list[torch.nn.Module], optimizer: Any, logger: Any
    ) -> list[Path]:
        """Draw, save and log every prompt's image; returns the files written."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d%H%M%S")
        vae = self.bundle.vae
        # Both may wait on the CPU (latent / text-encoder output caching); they come back there afterwards.
        borrowed = [vae, *self.bundle.text_encoders]
        homes = [next(m.parameters()).device for m in borrowed]
        config = self.bundle.noise_scheduler.config
        # Once per sampling call: the training schedule ends at SNR 0 only after --zero_terminal_snr.
        # (Flow-matching families build their own sampler and have no alphas_cumprod.)
        alphas = getattr(self.bundle.noise_scheduler, "alphas_cumprod", None)
        zero_snr = alphas is not None and float(alphas[-1]) == 0.0
        with preserved_rng(self.device), inference_mode_of(modules, optimizer):
            # A prompt without --d gets a seed from the (restored afterwards) training RNG: reproducible for
            # a given --seed, and written into the file name.
            prompts = [
                p if p.seed is not None else _with_seed(p, int(torch.randint(0, 2**31 - 1, ()).item()))
                for p in self.prompts
            ]
            for module in borrowed:
                module.to(self.device)
            try:
                with self.autocast() if self.autocast else nullcontext():
                    images = self.family.sample_images(
                        self.bundle,
                        prompts,
                        lambda name: make_scheduler(name, config, zero_terminal_snr=zero_snr),
                        self.device,
                        clip_skip=self.clip_skip,
                        max_token_length=self.max_token_length,
                    )
            finally:
                for module, home in zip(borrowed, homes, strict=True):
                    module.to(home)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
        paths = []
        for prompt, image in zip(prompts, images, strict=True):
            path = self.out_dir / image_name(self.output_name, prompt, step, epoch, stamp)
            _save_image(image, path)
            paths.append(path)
            logger.image(f"sample/{prompt.index:02d}", image, step)
        log.info("sampled %d images at step %d into %s", len(paths), step, self.out_dir)
        return paths


def _save_image(image: Any, path: Path) -> None:
    """Atomically (temp file + fsync + rename): a run killed mid-save never leaves a truncated sample."""
    from PIL import Image

    from networks.lora_file import atomic_write

    image_format = Image.registered_extensions().get(path.suffix.lower(), "PNG")
    atomic_write(path, lambda f: image.save(f, format=image_format))


def _with_seed(prompt: SamplePrompt, seed: int) -> SamplePrompt:
    from dataclasses import replace

    return replace(prompt, seed=seed)


def pause_bar(bar: Any, seconds: float) -> None:
    """Shift a tqdm bar's clocks so `seconds` spent outside training count neither in its it/s nor its ETA."""
    if getattr(bar, "disable", False):
        return  # a disabled bar (ranks other than 0) has no clocks
    bar.start_t += seconds
    bar.last_print_t += seconds
