"""Stable Diffusion 1.x / 2.x: the `ModelFamily` for `train_network.py`.

Sources: a diffusers folder (model_index.json + unet/ vae/ text_encoder/ [tokenizer/]) or a single
.safetensors/.ckpt file in the LDM layout (see `sd_checkpoint`). Nothing is ever fetched from the hub except,
for single files, a tokenizer when the hub is reachable (see `resolve_tokenizer`).

Differences from kohya, on purpose:
- SD2 is detected from the weights; `--v2` is not required (given with an SD1 model it is an error).
- For a diffusers folder without `--v_parameterization`, scheduler/scheduler_config.json's prediction_type
  "v_prediction" turns v-prediction on (logged). Single files carry no such hint: pass the flag.
- The noise scheduler is always built in code with kohya's numbers, never read from the folder.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from library.errors import UserError
from library.families import sd_checkpoint as ckpt
from library.families.base import ModelBundle, ModelInfo
from library.families.sd_blocks import unet_swap_units
from library.families.sd_text import encode_prompts as _encode_prompts
from library.families.sd_text import resolve_tokenizer

log = logging.getLogger(__name__)

MODEL_FLAG = "--pretrained_model_name_or_path"
FOLDER_CONTENTS = (
    "a diffusers SD folder holds model_index.json and unet/, vae/, text_encoder/ (each with config.json and "
    "weights) plus tokenizer/"
)
# Weight file stems per component; a "<stem>.fp16.*" file alone means the folder only has the fp16 variant.
_WEIGHT_STEMS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{MODEL_FLAG}: cannot read {path} ({e}); re-download the model folder") from None


def weights_variant(folder: Path, stem: str) -> tuple[bool, str | None]:
    """(has weights, variant): variant is "fp16" when only `<stem>.fp16.*` weights exist."""
    names = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    stems = (stem, "pytorch_model") if stem == "model" else (stem,)
    plain = {f"{s}{ext}" for s in stems for ext in (".safetensors", ".bin", ".safetensors.index.json")}
    if names & plain:
        return True, None
    fp16 = {f"{s}.fp16{ext}" for s in stems for ext in (".safetensors", ".bin", ".safetensors.index.json")}
    return (True, "fp16") if names & fp16 else (False, None)


def check_folder_parts(path: Path, stems: dict[str, str], contents: str) -> dict[str, str | None]:
    """Each component folder's weights variant (None, or "fp16" when only fp16 files exist); UserError listing
    everything missing (model_index.json, config.json, weights) with `contents` saying what belongs there."""
    missing = [] if (path / "model_index.json").is_file() else ["model_index.json"]
    variants: dict[str, str | None] = {}
    for part, stem in stems.items():
        if not (path / part / "config.json").is_file():
            missing.append(f"{part}/config.json")
        has_weights, variants[part] = weights_variant(path / part, stem)
        if not has_weights:
            missing.append(f"{part}/{stem}.safetensors")
    if missing:
        raise UserError(f"{MODEL_FLAG}: {path} is missing {', '.join(missing)}; {contents}")
    return variants


def _reject_other_families(path: Path) -> None:
    index = path / "model_index.json"
    cls = read_json(index).get("_class_name", "") if index.is_file() else ""
    unet_config = path / "unet" / "config.json"
    sdxl_unet = unet_config.is_file() and read_json(unet_config).get("addition_embed_type") is not None
    # FLUX first: its folders have a text_encoder_2/ too
    if (path / "transformer").is_dir() or "Flux" in cls:
        raise UserError(
            f"{MODEL_FLAG}: {path} is a transformer-based model (FLUX?); use flux_train_network.py for FLUX"
        )
    if (path / "text_encoder_2").is_dir() or "XL" in cls or sdxl_unet:
        raise UserError(f"{MODEL_FLAG}: {path} is an SDXL checkpoint; use sdxl_train_network.py")


def _inspect_folder(path: Path) -> tuple[str, dict[str, Any]]:
    _reject_other_families(path)
    variants = check_folder_parts(
        path, _WEIGHT_STEMS, f"{FOLDER_CONTENTS} (or pass a single .safetensors/.ckpt file)"
    )
    unet = read_json(path / "unet" / "config.json")
    if unet.get("in_channels", 4) != 4:
        raise UserError(
            f"{MODEL_FLAG}: {path} has a UNet with in_channels={unet['in_channels']} (inpainting/depth model); "
            "only text-to-image SD 1.x/2.x models can be trained"
        )
    te = read_json(path / "text_encoder" / "config.json")
    # OpenCLIP (SD2) uses GELU; OpenAI CLIP-L (SD1) quick_gelu, also the transformers default.
    version = "sd2" if te.get("hidden_act", "quick_gelu") == "gelu" else "sd1"
    scheduler = path / "scheduler" / "scheduler_config.json"
    prediction = read_json(scheduler).get("prediction_type") if scheduler.is_file() else None
    return version, {"variants": variants, "scheduler_prediction_type": prediction}


def _inspect_single_file(path: Path, v_parameterization: bool) -> tuple[str, dict[str, Any]]:
    shapes = ckpt.read_shapes(path, MODEL_FLAG)
    version = ckpt.detect_version(shapes, path, MODEL_FLAG)
    upcast = version == "sd2" and v_parameterization  # as in the SD 2.x 768-v diffusers configs
    unet = ckpt.unet_config_from_shapes(shapes, version, upcast_attention=upcast)
    if unet["in_channels"] != 4:
        raise UserError(
            f"{MODEL_FLAG}: {path} has a UNet with in_channels={unet['in_channels']} (inpainting/depth model); "
            "only text-to-image SD 1.x/2.x models can be trained"
        )
    return version, {
        "unet_config": unet,
        "vae_config": ckpt.vae_config_from_shapes(shapes),
        "text_encoder_config": ckpt.text_encoder_config_from_shapes(shapes, version),
    }


def model_info(path: Path, layout: str, version: str, v_param: bool, details: dict[str, Any]) -> ModelInfo:
    """ModelInfo with kohya's metadata strings for SD1/SD2 (+ v-prediction)."""
    v2 = version == "sd2"
    if v2:
        arch = "stable-diffusion-v2-768-v/lora" if v_param else "stable-diffusion-v2-512/lora"
    else:
        arch = "stable-diffusion-v1/lora"
    return ModelInfo(
        family=version,
        path=path,
        layout=layout,
        v2=v2,
        v_parameterization=v_param,
        base_model_version=("sd_v2" if v2 else "sd_v1") + ("_v" if v_param else ""),
        modelspec_architecture=arch,
        modelspec_implementation="diffusers",
        default_resolution=768 if v2 and v_param else 512,
        details=details,
    )


def make_noise_scheduler(v_parameterization: bool) -> Any:
    """kohya's training scheduler: DDPM, scaled_linear 0.00085..0.012, 1000 steps."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        prediction_type="v_prediction" if v_parameterization else "epsilon",
    )


def load_vae(vae_path: Path) -> torch.nn.Module:
    """--vae: a diffusers VAE folder (or model folder with vae/), or an LDM / diffusers-layout VAE file."""
    from diffusers import AutoencoderKL

    if not vae_path.exists():
        raise UserError(f"--vae: {vae_path} does not exist")
    if vae_path.is_dir():
        for folder in (vae_path, vae_path / "vae"):
            if (folder / "config.json").is_file():
                return from_pretrained(AutoencoderKL, folder, "--vae", torch_dtype=torch.float32)
        raise UserError(
            f"--vae: {vae_path} has no config.json; pass a diffusers VAE folder (config.json + "
            "diffusion_pytorch_model.safetensors) or a .safetensors/.ckpt VAE file"
        )
    sd = ckpt.read_state_dict(vae_path, "--vae")
    prefix = next((p for p in ("first_stage_model.", "vae.") if any(k.startswith(p) for k in sd)), "")
    sd = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    if any(".down_blocks." in k or ".up_blocks." in k for k in sd):  # diffusers layout
        sd = ckpt.vae_to_ldm(sd)
    if "encoder.conv_in.weight" not in sd or "post_quant_conv.weight" not in sd:
        raise UserError(
            f"--vae: {vae_path} has no VAE weights (expected encoder.*/decoder.* keys, optionally under "
            "first_stage_model.); pass an SD VAE file or folder"
        )
    config = ckpt.vae_config_from_shapes({k: tuple(v.shape) for k, v in sd.items()}, prefix="")
    return ckpt.ldm_to_vae(sd, config, vae_path, prefix="", dtype=torch.float32)


def from_pretrained(cls: Any, folder: Path, flag: str = MODEL_FLAG, **kwargs: Any) -> torch.nn.Module:
    """`cls.from_pretrained(folder)`; a corrupt or mismatched weights file is a UserError naming the folder."""
    import pickle

    from safetensors import SafetensorError

    try:
        return cls.from_pretrained(folder, local_files_only=True, **kwargs)
    except (OSError, ValueError, EOFError, pickle.UnpicklingError, SafetensorError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"{flag}: cannot load {folder} ({first}); its weights are truncated, corrupt or do not match its "
            "config.json: download it again"
        ) from None


def _load_folder(info: ModelInfo, dtype: torch.dtype) -> tuple[torch.nn.Module, ...]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    path, variants = info.path, info.details.get("variants", {})
    unet = from_pretrained(
        UNet2DConditionModel, path / "unet", torch_dtype=dtype, variant=variants.get("unet")
    )
    vae = from_pretrained(AutoencoderKL, path / "vae", torch_dtype=torch.float32, variant=variants.get("vae"))
    # .to() rather than a dtype kwarg: its name differs between transformers 4 and 5.
    te = from_pretrained(CLIPTextModel, path / "text_encoder", variant=variants.get("text_encoder"))
    te = te.to(dtype)
    return unet, vae, te


def _load_single_file(info: ModelInfo, dtype: torch.dtype) -> tuple[torch.nn.Module, ...]:
    path, version = info.path, info.family
    sd = ckpt.read_state_dict(path, MODEL_FLAG)
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    upcast = info.v2 and info.v_parameterization
    unet_config = ckpt.unet_config_from_shapes(shapes, version, upcast_attention=upcast)
    unet = ckpt.ldm_to_unet(sd, unet_config, path, dtype=dtype)
    vae = ckpt.ldm_to_vae(sd, ckpt.vae_config_from_shapes(shapes), path, dtype=torch.float32)
    te_config = ckpt.text_encoder_config_from_shapes(shapes, version)
    te = ckpt.ldm_to_text_encoder(sd, te_config, version, path, dtype=dtype)
    return unet, vae, te


class StableDiffusionFamily:
    """SD 1.x / 2.x (epsilon or v-prediction). Stateless; tables cached per bundle in `bundle.cache`."""

    name = "sd"
    latent_channels = 4
    latent_downscale = 8
    latent_file_suffix = "_sd"
    latent_multi_resolution = False
    bucket_reso_steps_multiple = 64
    tokenizer_flags: tuple[str, ...] = ("--tokenizer_path",)
    clip_skip_supported = True
    option_names: tuple[str, ...] = ()
    weighted_captions_supported = True
    text_encoder_outputs: tuple[tuple[str, ...], ...] = (("encoder_hidden_states",),)
    text_cache_file_suffix = "_te_outputs.npz"
    block_swap_supported = True
    snr_weighting_supported = True
    script = "train_network.py"

    def inspect(
        self,
        model_path: Path,
        *,
        v2: bool,
        v_parameterization: bool,
        options: Mapping[str, Any] | None = None,
    ) -> ModelInfo:
        path = Path(model_path)
        if not path.exists():
            raise UserError(
                f"{MODEL_FLAG}: {path} does not exist; pass a diffusers folder or a .safetensors/.ckpt file "
                "(hub ids are not downloaded)"
            )
        if path.is_dir():
            layout, (version, details) = "diffusers", _inspect_folder(path)
            if not v_parameterization and details["scheduler_prediction_type"] == "v_prediction":
                log.info("%s: scheduler config says v_prediction; training with v-parameterization", path)
                v_parameterization = True
        else:
            layout, (version, details) = "single_file", _inspect_single_file(path, v_parameterization)
        if v2 and version == "sd1":
            raise UserError(
                f"--v2: {path} is an SD 1.x model (CLIP-L text encoder); remove --v2 or pass an SD 2.x model"
            )
        if version == "sd2" and not v2:
            log.info("%s: detected SD 2.x (OpenCLIP text encoder); --v2 is implied", path)
        return model_info(path, layout, version, v_parameterization, details)

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
        # Resolve the tokenizer first: it is the cheapest thing to get wrong.
        tokenizer = resolve_tokenizer(
            info.family,
            model_path=info.path,
            layout=info.layout,
            tokenizer_path=Path(tokenizer_path) if tokenizer_path else None,
            tokenizer_cache_dir=Path(tokenizer_cache_dir) if tokenizer_cache_dir else None,
        )
        loader = _load_folder if info.layout == "diffusers" else _load_single_file
        unet, vae, te = loader(info, dtype)
        if len(tokenizer) > te.config.vocab_size:  # ids past the embedding table would fail mid-training
            raise UserError(
                f"the CLIP tokenizer has {len(tokenizer)} tokens but the text encoder of {info.path} "
                f"only {te.config.vocab_size}; pass --tokenizer_path with the tokenizer that belongs to this model"
            )
        if vae_path is not None:
            vae = load_vae(Path(vae_path))
        for module in (unet, vae, te):
            module.requires_grad_(False)
            module.eval()
        return ModelBundle(
            info=info,
            unet=unet,
            vae=vae,
            text_encoders=[te],
            tokenizers=[tokenizer],
            noise_scheduler=make_noise_scheduler(info.v_parameterization),
            vae_scale=ckpt.VAE_SCALE,
        )

    def encode_images(self, bundle: ModelBundle, pixels: torch.Tensor) -> torch.Tensor:
        vae = bundle.vae
        param = next(vae.parameters())
        with torch.no_grad():
            return vae.encode(pixels.to(param.device, param.dtype)).latent_dist.sample()

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
        hidden = _encode_prompts(
            bundle.text_encoders[0],
            bundle.tokenizers[0],
            captions,
            clip_skip=clip_skip,
            max_token_length=max_token_length,
            token_cache=bundle.cache.setdefault("token_ids", {}),
            weighted=weighted,
        )
        return {"encoder_hidden_states": hidden}

    def noisy_input_and_target(
        self,
        bundle: ModelBundle,
        latents: torch.Tensor,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        input_noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        sqrt_a, sqrt_1ma = _schedule_tables(bundle, latents.device, latents.dtype)
        t = timesteps.to(latents.device, non_blocking=True)
        shape = (-1,) + (1,) * (latents.ndim - 1)
        a, s = sqrt_a[t].view(shape), sqrt_1ma[t].view(shape)
        noisy = a * latents + s * (noise if input_noise is None else input_noise)
        target = a * noise - s * latents if bundle.info.v_parameterization else noise
        return noisy, target

    def sample_timesteps(
        self,
        bundle: ModelBundle,
        latents: torch.Tensor,
        min_timestep: int,
        max_timestep: int,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        from library.training.noise import sample_timesteps

        return sample_timesteps(min_timestep, max_timestep, latents.shape[0], latents.device, generator)

    def timestep_loss_weights(self, bundle: ModelBundle, timesteps: torch.Tensor) -> torch.Tensor | None:
        return None

    def snr(self, bundle: ModelBundle, timesteps: torch.Tensor) -> torch.Tensor:
        return _snr_table(bundle, timesteps.device)[timesteps]

    def enforce_zero_terminal_snr(self, bundle: ModelBundle) -> None:
        scheduler = bundle.noise_scheduler
        betas = zero_terminal_snr_betas(scheduler.betas)
        alphas = 1.0 - betas
        # New tensors (not in-place): the cached device tables notice the new identity and rebuild.
        scheduler.betas, scheduler.alphas, scheduler.alphas_cumprod = betas, alphas, torch.cumprod(alphas, 0)

    def batch_conditioning(
        self, bundle: ModelBundle, batch: dict[str, Any], device: torch.device
    ) -> dict[str, torch.Tensor]:
        return {}  # SD 1.x/2.x condition on text only

    def predict(
        self, bundle: ModelBundle, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        return bundle.unet(noisy, timesteps, encoder_hidden_states=cond["encoder_hidden_states"]).sample

    def swap_plan(self, bundle: ModelBundle, blocks_to_swap: int) -> list[tuple[Any, int]]:
        """The last N of the UNet's units in execution order (library/families/sd_blocks.py), so the up
        blocks, which hold most of the weights, are swapped first."""
        units = unet_swap_units(bundle.unet)
        if blocks_to_swap > len(units):
            raise UserError(
                f"--blocks_to_swap {blocks_to_swap}: this UNet has {len(units)} swappable blocks (resnets, "
                f"attentions, down/upsamplers): use {len(units)} or fewer"
            )
        return [(units, blocks_to_swap)]

    def compile_blocks(self, bundle: ModelBundle) -> list[torch.nn.Module]:
        unet = bundle.unet
        mid = [unet.mid_block] if unet.mid_block is not None else []  # configs may have none
        return [*unet.down_blocks, *mid, *unet.up_blocks]

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
        from library.families.sd_sample import sample_sd

        def encode(texts: list[str]) -> torch.Tensor:
            return self.encode_prompts(bundle, texts, clip_skip=clip_skip, max_token_length=max_token_length)[
                "encoder_hidden_states"
            ]

        return sample_sd(bundle, encode, prompts, make_scheduler, device)


def _schedule_tables(
    bundle: ModelBundle, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """sqrt(alphas_cumprod) and sqrt(1 - alphas_cumprod) on `device`, built once (kohya re-uploads per step).

    Keyed by the scheduler tensor's identity and version counter, so a trainer that rescales betas in place
    (e.g. zero-terminal-SNR) gets fresh tables without any per-step comparison of values.
    """
    ac = bundle.noise_scheduler.alphas_cumprod
    key = ("sd_schedule", str(device), dtype)
    stamp = (id(ac), ac._version)
    hit = bundle.cache.get(key)
    if hit is None or hit[0] != stamp:
        ac32 = ac.to(device=device, dtype=torch.float32)
        # Square roots in fp32 (like diffusers for fp32 latents), then cast: more exact for half latents.
        hit = (stamp, (ac32**0.5).to(dtype), ((1 - ac32) ** 0.5).to(dtype))
        bundle.cache[key] = hit
    return hit[1], hit[2]


def _snr_table(bundle: ModelBundle, device: torch.device) -> torch.Tensor:
    """alphas_cumprod / (1 - alphas_cumprod) in float32 on `device`, rebuilt only when the schedule changes."""
    ac = bundle.noise_scheduler.alphas_cumprod
    key = ("sd_snr", str(device))
    stamp = (id(ac), ac._version)
    hit = bundle.cache.get(key)
    if hit is None or hit[0] != stamp:
        ac32 = ac.to(device=device, dtype=torch.float32)
        hit = (stamp, ac32 / (1 - ac32))
        bundle.cache[key] = hit
    return hit[1]


def zero_terminal_snr_betas(betas: torch.Tensor) -> torch.Tensor:
    """Betas whose last timestep has zero SNR (Lin et al. 2023, as kohya): shift sqrt(alphas_cumprod) so its
    last value is 0 and rescale it so its first value is unchanged, then recover the betas."""
    root = torch.cumprod(1.0 - betas, 0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    cumprod = root**2
    alphas = torch.cat([cumprod[:1], cumprod[1:] / cumprod[:-1]])
    return 1.0 - alphas
