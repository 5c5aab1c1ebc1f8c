"""The seam between the shared trainer and one model family.

Everything that differs between SD 1.x/2.x, SDXL and FLUX lives behind `ModelFamily`; shared code
(data, networks, training loop) calls only these members and reads `ModelBundle`/`ModelInfo` fields.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch


@dataclass(frozen=True)
class ModelInfo:
    """What a family learns from a checkpoint *without* loading weights (headers and config files only)."""

    family: str  # "sd1" | "sd2" | "sdxl" | "flux"
    path: Path
    layout: str  # "diffusers" | "single_file"
    v2: bool = False
    v_parameterization: bool = False
    base_model_version: str = "sd_v1"  # kohya ss_base_model_version
    modelspec_architecture: str = "stable-diffusion-v1/lora"
    modelspec_implementation: str = "diffusers"
    default_resolution: int = 512
    prediction_type: str | None = None  # modelspec.prediction_type; None: from v_parameterization (SD/SDXL)
    details: dict[str, Any] = field(default_factory=dict)
    # family-specific ss_* metadata (FLUX: guidance scale, timestep sampling, ...), merged into the LoRA file
    training_metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelBundle:
    """Loaded components. `text_encoders` and `tokenizers` are parallel lists (one each for SD1/2)."""

    info: ModelInfo
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list[torch.nn.Module]
    tokenizers: list[Any]
    noise_scheduler: Any
    vae_scale: float = 0.18215
    vae_shift: float = 0.0
    # Family-private scratch (e.g. noise-schedule tables already on the training device), so that
    # families stay stateless and per-step work does no re-uploads. Not part of the model.
    cache: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)


class ModelFamily(Protocol):
    """One class per family. Stateless: all state lives in `ModelBundle`."""

    name: str
    script: str  # the entry script that trains this family, for messages
    latent_channels: int
    latent_downscale: int  # pixels per latent cell (8 for SD VAEs)
    # kohya's disk latent cache: `<stem>_<W>x<H><latent_file_suffix>.npz`; with latent_multi_resolution every
    # key carries the latent size (`latents_64x64`) so several bucket sizes share one file (FLUX).
    latent_file_suffix: str
    latent_multi_resolution: bool
    bucket_reso_steps_multiple: int  # bucket_reso_steps must be a multiple of this
    tokenizer_flags: tuple[str, ...]  # the --tokenizer_*path options this family reads, one per text encoder
    clip_skip_supported: bool  # False: --clip_skip is ignored (with a warning), as kohya does for SDXL
    weighted_captions_supported: bool  # kohya's (word:1.2) caption weights
    # encode_prompts' output keys per text encoder, e.g. FLUX (("l_pooled",), ("t5_out", "t5_attn_mask")): with
    # --cache_text_encoder_outputs a trained encoder's keys are computed live, the others come from the cache.
    text_encoder_outputs: tuple[tuple[str, ...], ...]
    # kohya's text-encoder cache file: "_te_outputs.npz" (SD, SDXL), "_flux_te.npz"
    text_cache_file_suffix: str
    # a DDPM schedule: min-SNR, debiased, v-pred loss scaling, zero terminal SNR
    snr_weighting_supported: bool
    block_swap_supported: bool  # --blocks_to_swap (families whose denoiser runs as a list of blocks)
    # TrainConfig options only this family reads (e.g. FLUX's --clip_l, --guidance_scale). `inspect` gets their
    # values; shared code rejects them for families that do not list them. Recorded as ss_<name> metadata.
    option_names: tuple[str, ...]

    def inspect(
        self,
        model_path: Path,
        *,
        v2: bool,
        v_parameterization: bool,
        options: Mapping[str, Any] | None = None,
    ) -> ModelInfo:
        """Read headers/configs only; raise UserError for missing components or a wrong family. `options`: the
        values of `option_names`, kept in `ModelInfo.details` for the other members."""

    def load(
        self,
        info: ModelInfo,
        *,
        vae_path: Path | None,
        tokenizer_path: Path | None,
        dtype: torch.dtype,
        tokenizer_cache_dir: Path | None = None,
        tokenizer_2_path: Path | None = None,
    ) -> ModelBundle:
        """Load every component on CPU in `dtype` (VAE may stay fp32).

        Tokenizers come from `tokenizer_path`, the model folder, kohya's `--tokenizer_cache_dir` layout
        (`<dir>/<hub id with / -> _>`), or the hub when online, in that order.
        """

    def encode_images(self, bundle: ModelBundle, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1], [B,3,H,W] -> unscaled latents (a posterior sample), as kohya caches them."""

    def encode_prompts(
        self,
        bundle: ModelBundle,
        captions: list[str],
        *,
        clip_skip: int | None,
        max_token_length: int | None,
        weighted: bool = False,
        encoders: Sequence[int] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Captions -> conditioning tensors for `predict` (on the text encoders' device), every one batch-first
        ([B, ...]) and depending only on its own caption, so that they can be cached per caption. `weighted`:
        parse kohya's `(text:1.3)` / `(text)` / `[text]` weights and scale the tokens' states. `encoders`:
        run only these text encoders (indices) and return only their `text_encoder_outputs` keys."""

    def batch_conditioning(
        self, bundle: ModelBundle, batch: dict[str, Any], device: torch.device
    ) -> dict[str, torch.Tensor]:
        """Conditioning that comes from the batch rather than the captions (SDXL: size/crop `time_ids` from
        `original_sizes_hw`, `crop_top_lefts`, `target_sizes_hw`), merged into `predict`'s `cond`."""

    def noisy_input_and_target(
        self,
        bundle: ModelBundle,
        latents: torch.Tensor,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        input_noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaled latents + noise at `timesteps` -> (model input, regression target). `input_noise`, when
        given, replaces `noise` in the model input only (kohya's ip_noise_gamma perturbation)."""

    def sample_timesteps(
        self,
        bundle: ModelBundle,
        latents: torch.Tensor,
        min_timestep: int,
        max_timestep: int,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Training timesteps [B] on the latents' device, drawn there (no host sync) from `generator` (one on
        that device; None: the global RNG). DDPM families: integers in [min, max); flow families: sigma *
        1000 from their own sampling scheme."""

    def timestep_loss_weights(self, bundle: ModelBundle, timesteps: torch.Tensor) -> torch.Tensor | None:
        """Per-sample loss weights [B] the family's scheme puts on these timesteps (FLUX's sigma_sqrt /
        cosmap weighting), or None."""

    def snr(self, bundle: ModelBundle, timesteps: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio [B] of each timestep, float32 on the timesteps' device (no host sync)."""

    def enforce_zero_terminal_snr(self, bundle: ModelBundle) -> None:
        """Rescale the training noise schedule so that its last timestep has zero SNR (kohya's
        --zero_terminal_snr); a family without a discrete schedule raises UserError."""

    def predict(
        self, bundle: ModelBundle, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """One denoiser forward."""

    def swap_plan(self, bundle: ModelBundle, blocks_to_swap: int) -> list[tuple[Any, int]]:
        """--blocks_to_swap N: (block list, how many of its last blocks to swap) per list; UserError when N is
        too large. Only for families with `block_swap_supported`."""

    def compile_blocks(self, bundle: ModelBundle) -> list[torch.nn.Module]:
        """--torch_compile: the denoiser's blocks, each compiled on its own (in place, so module names, hooks
        and LoRA keys stay as they are)."""

    def sample_images(
        self,
        bundle: ModelBundle,
        prompts: list[Any],
        make_scheduler: Any,
        device: torch.device,
        *,
        clip_skip: int | None,
        max_token_length: int | None,
    ) -> list[Any]:
        """One PIL image per prompt (`library.training.sample_prompts.SamplePrompt`: prompt, negative_prompt,
        width, height, steps, scale, seed, sampler) with the components as they are (LoRA applied);
        `make_scheduler(sampler name)` builds a sampling scheduler. Keeps nothing alive after returning."""
