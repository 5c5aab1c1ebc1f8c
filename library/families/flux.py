"""FLUX.1 dev / schnell: the `ModelFamily` for `flux_train_network.py`.

Sources as kohya takes them: the transformer as a Black Forest Labs single file (optionally prefixed
`model.diffusion_model.`) plus `--clip_l`, `--t5xxl`, `--ae` files; or a diffusers FLUX folder (each of those
flags still overrides its part). dev vs schnell comes from the weights (guidance embedder), block counts from
the keys, so pruned models load. Weights are built on the meta device and adopt the memory-mapped tensors.

Training math: rectified flow (noisy = (1 - s) x + s n, target n - x), sigmas from `library.training.flow`
(kohya's --timestep_sampling etc.), latents packed 2x2 into 64-feature tokens with (0, row, col) position ids,
dev's guidance vector from --guidance_scale. The model's timestep argument is sigma; the trainer's timesteps
are sigma * 1000 (kohya's), so logs and fixed validation timesteps read the same as for SD.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from library.config.flow import FLOW_OPTION_NAMES
from library.errors import UserError
from library.families import flux_checkpoint as fc
from library.families import sd_checkpoint as ckpt
from library.families.base import ModelBundle, ModelInfo
from library.families.sd import MODEL_FLAG, from_pretrained, read_json

log = logging.getLogger(__name__)

COMPONENT_FLAGS = {"clip_l": "--clip_l", "t5xxl": "--t5xxl", "ae": "--ae"}
_FOLDER_PARTS = {
    "transformer": "transformer",
    "ae": "vae",
    "clip_l": "text_encoder",
    "t5xxl": "text_encoder_2",
}
METADATA_OPTIONS = ("apply_t5_attn_mask", "t5xxl_max_token_length", *FLOW_OPTION_NAMES)


def _folder_has_weights(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(
        p.suffix == ".safetensors" or p.name.endswith(".safetensors.index.json") for p in folder.iterdir()
    )


def _check_component(part: str, path: Path) -> None:
    """Headers only: a wrong or missing file is named with its flag before anything loads."""
    flag = COMPONENT_FLAGS[part]
    if not path.is_file():
        raise UserError(f"{flag}: {path} does not exist; pass the {part} .safetensors file")
    shapes = ckpt.read_shapes(path, flag)
    if part == "t5xxl":
        fc.t5_config_from_shapes(shapes, path, flag)
    elif part == "clip_l":
        names = {k.removeprefix("text_model.") for k in shapes}
        if "embeddings.token_embedding.weight" not in names or "encoder.layers.0.mlp.fc1.weight" not in names:
            raise UserError(
                f"{flag}: {path} is not a CLIP text encoder (no text_model.embeddings/encoder keys); pass "
                "clip_l.safetensors"
            )
    elif part == "ae":
        names = {k.removeprefix("vae.").removeprefix("first_stage_model.") for k in shapes}
        if "decoder.conv_in.weight" not in names:
            raise UserError(f"{flag}: {path} has no autoencoder weights; pass FLUX's ae.safetensors")
        channels = shapes.get("decoder.conv_in.weight", shapes.get("vae.decoder.conv_in.weight", (0, 16)))[1]
        if channels != 16:
            raise UserError(
                f"{flag}: {path} is a {channels}-channel autoencoder; FLUX.1 needs its 16-channel ae"
            )


def _inspect_transformer(path: Path) -> tuple[str, dict[str, Any]]:
    """(layout, transformer config) of a FLUX folder or BFL file; the other families are named."""
    if path.is_dir():
        if not (path / "transformer").is_dir():
            script = "sdxl_train_network.py" if (path / "text_encoder_2").is_dir() else "train_network.py"
            raise UserError(
                f"{MODEL_FLAG}: {path} has no transformer/ folder, so it is not FLUX.1; use {script}"
            )
        config = (
            read_json(path / "transformer" / "config.json")
            if (path / "transformer" / "config.json").is_file()
            else {}
        )
        if not _folder_has_weights(path / "transformer"):
            raise UserError(f"{MODEL_FLAG}: {path}/transformer has no config.json with .safetensors weights")
        return "diffusers", config
    shapes = ckpt.read_shapes(path, MODEL_FLAG)
    if not fc.is_bfl_transformer(shapes):
        if any(k.startswith("conditioner.embedders.1") for k in shapes):
            raise UserError(f"{MODEL_FLAG}: {path} is an SDXL checkpoint; use sdxl_train_network.py")
        if any(k.startswith(ckpt.UNET_PREFIX) for k in shapes):
            raise UserError(f"{MODEL_FLAG}: {path} is an SD 1.x/2.x checkpoint; use train_network.py")
        raise UserError(
            f"{MODEL_FLAG}: {path} has no FLUX transformer weights (img_in, double_blocks.*); pass "
            "flux1-dev.safetensors / flux1-schnell.safetensors or a diffusers FLUX folder"
        )
    return "single_file", fc.transformer_config_from_shapes(shapes)


def flux_model_info(
    path: Path, layout: str, variant: str, details: dict[str, Any], options: Mapping
) -> ModelInfo:
    return ModelInfo(
        family="flux",
        path=path,
        layout=layout,
        base_model_version="flux1",
        modelspec_architecture=f"flux-1-{variant}/lora",
        modelspec_implementation="https://github.com/black-forest-labs/flux",
        default_resolution=1024,
        prediction_type="flow",
        details=details,
        training_metadata={f"ss_{name}": options.get(name) for name in METADATA_OPTIONS},
    )


def _load_clip(path: Path, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    sd = {
        k if k.startswith("text_model.") else f"text_model.{k}": v
        for k, v in ckpt.read_state_dict(path, "--clip_l").items()
    }
    shapes = {ckpt.CLIP_PREFIX + k: tuple(v.shape) for k, v in sd.items()}
    config = CLIPTextConfig(**ckpt.text_encoder_config_from_shapes(shapes, "sd1"))
    return ckpt.build_module(lambda: CLIPTextModel(config), sd, "CLIP-L", path, dtype)


def _load_t5(path: Path, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import T5Config, T5EncoderModel

    sd = dict(ckpt.read_state_dict(path, "--t5xxl"))
    config = T5Config(**fc.t5_config_from_shapes({k: tuple(v.shape) for k, v in sd.items()}, path))
    # The token embedding is one tensor saved under either name (or both).
    shared = sd.get("shared.weight", sd.get("encoder.embed_tokens.weight"))
    sd.setdefault("shared.weight", shared)
    sd.setdefault("encoder.embed_tokens.weight", shared)
    sd = {k: v for k, v in sd.items() if not k.startswith("decoder.") and k != "lm_head.weight"}
    return ckpt.build_module(lambda: T5EncoderModel(config), sd, "T5-XXL", path, dtype)


class FluxFamily:
    """FLUX.1 dev/schnell with flow-matching training. Stateless; options live in `ModelInfo.details`."""

    name = "flux"
    script = "flux_train_network.py"
    latent_channels = 16
    latent_downscale = 8
    latent_file_suffix = "_flux"
    latent_multi_resolution = True  # kohya's FLUX files hold every bucket size of an image
    bucket_reso_steps_multiple = 16  # 2x2 packing of 8x latents; kohya's 64 also divides
    tokenizer_flags = ("--tokenizer_path", "--tokenizer_2_path")  # CLIP-L, T5
    clip_skip_supported = False
    weighted_captions_supported = False
    # txt_ids and apply_t5_attn_mask ride along so that kohya reads (and validates) our cache files
    text_encoder_outputs = (("l_pooled",), ("t5_out", "t5_attn_mask", "txt_ids", "apply_t5_attn_mask"))
    text_cache_file_suffix = "_flux_te.npz"
    block_swap_supported = True
    snr_weighting_supported = False
    option_names = (
        "clip_l",
        "t5xxl",
        "ae",
        "t5xxl_max_token_length",
        "apply_t5_attn_mask",
        *FLOW_OPTION_NAMES,
    )

    def inspect(
        self,
        model_path: Path,
        *,
        v2: bool,
        v_parameterization: bool,
        options: Mapping[str, Any] | None = None,
    ) -> ModelInfo:
        options = dict(options or {})
        if v2 or v_parameterization:
            flag = "--v2" if v2 else "--v_parameterization"
            raise UserError(f"{flag}: FLUX.1 is a flow-matching model; remove {flag}")
        path = Path(model_path)
        if not path.exists():
            raise UserError(
                f"{MODEL_FLAG}: {path} does not exist; pass flux1-dev.safetensors (with --clip_l, --t5xxl, --ae) "
                "or a diffusers FLUX folder (hub ids are not downloaded)"
            )
        layout, config = _inspect_transformer(path)
        components: dict[str, Path | None] = {}
        missing = []
        for part, flag in COMPONENT_FLAGS.items():
            given = options.get(part)
            if given:
                _check_component(part, Path(given))
                components[part] = Path(given)
            elif layout == "diffusers" and _folder_has_weights(path / _FOLDER_PARTS[part]):
                components[part] = None  # from the folder
            else:
                missing.append(flag)
        if missing:
            where = (
                "a BFL single file holds only the transformer"
                if layout == "single_file"
                else f"{path} lacks them"
            )
            raise UserError(
                f"{', '.join(missing)} required: {where}; pass the files as kohya's flux_train_network.py takes them"
            )
        variant = "dev" if config.get("guidance_embeds", True) else "schnell"
        log.info(
            "%s: FLUX.1 %s, %s double / %s single blocks",
            path,
            variant,
            config.get("num_layers"),
            config.get("num_single_layers"),
        )
        t5_length = options.get("t5xxl_max_token_length") or (512 if variant == "dev" else 256)
        details = {"variant": variant, "components": components, "options": options, "t5_length": t5_length}
        return flux_model_info(
            path, layout, variant, details, {**options, "t5xxl_max_token_length": t5_length}
        )

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
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
        from transformers import CLIPTextModel, T5EncoderModel

        from library.families.flux_text import resolve_tokenizers

        tokenizers = resolve_tokenizers(
            model_path=info.path,
            layout=info.layout,
            tokenizer_path=Path(tokenizer_path) if tokenizer_path else None,
            tokenizer_2_path=Path(tokenizer_2_path) if tokenizer_2_path else None,
            tokenizer_cache_dir=Path(tokenizer_cache_dir) if tokenizer_cache_dir else None,
        )
        parts = info.details["components"]
        if info.layout == "diffusers":
            transformer = from_pretrained(
                FluxTransformer2DModel, info.path / "transformer", torch_dtype=dtype
            )
        else:
            transformer = fc.build_transformer(ckpt.read_state_dict(info.path, MODEL_FLAG), info.path, dtype)
        ae_file = vae_path or parts["ae"]
        ae = (
            fc.load_ae(Path(ae_file))
            if ae_file
            else from_pretrained(AutoencoderKL, info.path / "vae", torch_dtype=torch.float32)
        )
        clip = (
            _load_clip(parts["clip_l"], dtype)
            if parts["clip_l"]
            else from_pretrained(CLIPTextModel, info.path / "text_encoder").to(dtype)
        )
        t5 = (
            _load_t5(parts["t5xxl"], dtype)
            if parts["t5xxl"]
            else from_pretrained(T5EncoderModel, info.path / "text_encoder_2").to(dtype)
        )
        for index, (tokenizer, te, flag) in enumerate(
            zip(tokenizers, (clip, t5), self.tokenizer_flags, strict=True), 1
        ):
            if len(tokenizer) > te.config.vocab_size:
                raise UserError(
                    f"tokenizer {index} has {len(tokenizer)} tokens but text encoder {index} only "
                    f"{te.config.vocab_size}; pass {flag} with the tokenizer that belongs to it"
                )
        for module in (transformer, ae, clip, t5):
            module.requires_grad_(False)
            module.eval()
        shift = float(info.details["options"].get("discrete_flow_shift") or 3.0)
        return ModelBundle(
            info=info,
            unet=transformer,
            vae=ae,
            text_encoders=[clip, t5],
            tokenizers=list(tokenizers),
            noise_scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift),
            vae_scale=fc.AE_SCALE,
            vae_shift=fc.AE_SHIFT,
        )

    def encode_images(self, bundle: ModelBundle, pixels: torch.Tensor) -> torch.Tensor:
        param = next(bundle.vae.parameters())
        with torch.no_grad():
            return bundle.vae.encode(pixels.to(param.device, param.dtype)).latent_dist.sample()

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
        from library.families.flux_text import encode_flux_prompts

        caches = (bundle.cache.setdefault("token_ids_1", {}), bundle.cache.setdefault("token_ids_2", {}))
        return encode_flux_prompts(
            bundle.text_encoders,
            bundle.tokenizers,
            captions,
            t5_length=bundle.info.details["t5_length"],
            apply_t5_attn_mask=bool(bundle.info.details["options"].get("apply_t5_attn_mask")),
            token_caches=caches,
            encoders=encoders,
        )

    def batch_conditioning(
        self, bundle: ModelBundle, batch: dict[str, Any], device: torch.device
    ) -> dict[str, torch.Tensor]:
        return {}

    def _flow(self, bundle: ModelBundle) -> Any:
        from library.training.flow import FlowOptions

        flow = bundle.cache.get("flow_options")
        if flow is None:
            given = bundle.info.details["options"]
            flow = FlowOptions(**{k: given[k] for k in FLOW_OPTION_NAMES if given.get(k) is not None})
            bundle.cache["flow_options"] = flow
        return flow

    def sample_timesteps(
        self,
        bundle: ModelBundle,
        latents: torch.Tensor,
        min_timestep: int,
        max_timestep: int,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        from library.training.flow import sample_sigmas, timesteps_from_sigmas

        sigmas = sample_sigmas(
            self._flow(bundle), latents.shape[0], tuple(latents.shape[-2:]), latents.device, generator
        )
        return timesteps_from_sigmas(sigmas)

    def timestep_loss_weights(self, bundle: ModelBundle, timesteps: torch.Tensor) -> torch.Tensor | None:
        from library.training.flow import loss_weighting

        flow = self._flow(bundle)
        if flow.model_prediction_type != "sigma_scaled":
            return None  # kohya weighs only the sigma-scaled prediction
        return loss_weighting(flow.weighting_scheme, timesteps.float() / 1000)

    def noisy_input_and_target(
        self,
        bundle: ModelBundle,
        latents: torch.Tensor,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        input_noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from library.training.flow import flow_target, noisy_latents

        sigmas = timesteps.to(latents.device, torch.float32) / 1000
        noisy = noisy_latents(latents, noise if input_noise is None else input_noise, sigmas)
        return noisy, flow_target(latents, noise)

    def snr(self, bundle: ModelBundle, timesteps: torch.Tensor) -> torch.Tensor:
        raise UserError("FLUX.1 has no DDPM noise schedule, so SNR-based loss options do not apply")

    def enforce_zero_terminal_snr(self, bundle: ModelBundle) -> None:
        raise UserError("--zero_terminal_snr: FLUX.1's flow schedule already ends in pure noise; remove it")

    def predict(
        self, bundle: ModelBundle, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        from library.families.flux_math import packed_forward
        from library.training.flow import apply_model_prediction_type

        sigmas = timesteps.to(noisy.device, torch.float32) / 1000
        options = bundle.info.details["options"]
        pred = packed_forward(
            bundle,
            noisy,
            sigmas,
            cond,
            guidance_scale=float(options.get("guidance_scale") or 3.5),
            masked=bool(options.get("apply_t5_attn_mask")),
        )
        pred, _ = apply_model_prediction_type(pred, noisy, sigmas, self._flow(bundle))
        return pred

    def swap_plan(self, bundle: ModelBundle, blocks_to_swap: int) -> list[tuple[Any, int]]:
        """kohya's split: N//2 double blocks and 2 * (N - N//2) single blocks (a double block is about twice a
        single one)."""
        double, single = bundle.unet.transformer_blocks, bundle.unet.single_transformer_blocks
        n_double, n_single = blocks_to_swap // 2, 2 * (blocks_to_swap - blocks_to_swap // 2)
        if n_double > len(double) or n_single > len(single):
            raise UserError(
                f"--blocks_to_swap {blocks_to_swap}: this model has {len(double)} double and {len(single)} single "
                "blocks, and kohya's split swaps N//2 double and 2*(N - N//2) single blocks: use a smaller number"
            )
        return [(double, n_double), (single, n_single)]

    def compile_blocks(self, bundle: ModelBundle) -> list[torch.nn.Module]:
        return [*bundle.unet.transformer_blocks, *bundle.unet.single_transformer_blocks]

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
        from library.families.flux_sample import sample_flux

        def encode(texts: list[str]) -> dict[str, torch.Tensor]:
            return self.encode_prompts(bundle, texts, clip_skip=None, max_token_length=None)

        return sample_flux(bundle, encode, prompts, device)
