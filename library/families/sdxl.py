"""SDXL (base 1.0 and derivatives such as Pony, Illustrious, NoobAI): the `ModelFamily` for `sdxl_train_network.py`.

Sources: a diffusers folder (model_index.json + unet/ vae/ text_encoder/ text_encoder_2/ [tokenizer/
tokenizer_2/]) or a Stability-layout single file (see `sdxl_checkpoint`), converted in process.
What differs from SD 1.x/2.x: two text encoders (`sdxl_text`), size/crop conditioning (`time_ids` built
per sample from the batch's bucket geometry), VAE scale 0.13025, buckets in steps of 32. The noise
schedule, targets and SNR tables are SD's (DDPM scaled-linear), so those members are inherited.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from library.errors import UserError
from library.families import sd_checkpoint as ckpt
from library.families import sdxl_checkpoint as xl
from library.families.base import ModelBundle, ModelInfo
from library.families.sd import (
    MODEL_FLAG,
    StableDiffusionFamily,
    check_folder_parts,
    from_pretrained,
    load_vae,
    make_noise_scheduler,
    read_json,
)
from library.families.sdxl_text import encode_sdxl_prompts, resolve_tokenizers

log = logging.getLogger(__name__)

FOLDER_CONTENTS = (
    "a diffusers SDXL folder holds model_index.json and unet/, vae/, text_encoder/, text_encoder_2/ (each with "
    "config.json and weights) plus tokenizer/ and tokenizer_2/"
)
_WEIGHT_STEMS = {
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
    "text_encoder_2": "model",
}


def _inspect_folder(path: Path) -> dict[str, Any]:
    index = read_json(path / "model_index.json") if (path / "model_index.json").is_file() else {}
    if (path / "transformer").is_dir() or "Flux" in index.get("_class_name", ""):
        raise UserError(
            f"{MODEL_FLAG}: {path} is a transformer-based model (FLUX?); use flux_train_network.py"
        )
    if (path / "text_encoder").is_dir() and not (path / "text_encoder_2").is_dir():
        raise UserError(f"{MODEL_FLAG}: {path} is an SD 1.x/2.x model folder; use train_network.py")
    variants = check_folder_parts(
        path, _WEIGHT_STEMS, f"{FOLDER_CONTENTS} (or pass a single .safetensors file)"
    )
    unet = read_json(path / "unet" / "config.json")
    if unet.get("addition_embed_type") != "text_time" or unet.get("in_channels", 4) != 4:
        raise UserError(
            f"{MODEL_FLAG}: {path}/unet is not an SDXL base UNet (addition_embed_type "
            f"{unet.get('addition_embed_type')!r}, in_channels {unet.get('in_channels')}); inpainting and "
            "refiner models cannot be trained"
        )
    scheduler = path / "scheduler" / "scheduler_config.json"
    prediction = read_json(scheduler).get("prediction_type") if scheduler.is_file() else None
    return {"variants": variants, "scheduler_prediction_type": prediction}


def sdxl_model_info(path: Path, layout: str, v_param: bool, details: dict[str, Any]) -> ModelInfo:
    """ModelInfo with kohya's metadata strings for SDXL LoRA (v-prediction shows only in prediction_type)."""
    return ModelInfo(
        family="sdxl",
        path=path,
        layout=layout,
        v_parameterization=v_param,
        base_model_version="sdxl_base_v1-0",
        modelspec_architecture="stable-diffusion-xl-v1-base/lora",
        modelspec_implementation="https://github.com/Stability-AI/generative-models",
        default_resolution=1024,
        details=details,
    )


def _load_folder(info: ModelInfo, dtype: torch.dtype) -> tuple[torch.nn.Module, ...]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    path, variants = info.path, info.details.get("variants", {})
    unet = from_pretrained(
        UNet2DConditionModel, path / "unet", torch_dtype=dtype, variant=variants.get("unet")
    )
    vae = from_pretrained(AutoencoderKL, path / "vae", torch_dtype=torch.float32, variant=variants.get("vae"))
    te1 = from_pretrained(CLIPTextModel, path / "text_encoder", variant=variants.get("text_encoder"))
    te2 = from_pretrained(
        CLIPTextModelWithProjection, path / "text_encoder_2", variant=variants.get("text_encoder_2")
    )
    return unet, vae, te1.to(dtype), te2.to(dtype)


def time_ids(batch: dict[str, Any], device: torch.device) -> torch.Tensor:
    """[B, 6] SDXL size conditioning: original (h, w), crop (top, left), target (h, w), as Stability trained."""
    parts = (batch["original_sizes_hw"], batch["crop_top_lefts"], batch["target_sizes_hw"])
    return torch.cat(parts, dim=1).to(device, torch.float32, non_blocking=True)


class StableDiffusionXLFamily(StableDiffusionFamily):
    """SDXL base and derivatives (epsilon or v-prediction). Stateless like SD's."""

    name = "sdxl"
    script = "sdxl_train_network.py"
    latent_file_suffix = "_sdxl"
    bucket_reso_steps_multiple = 32
    tokenizer_flags = ("--tokenizer_path", "--tokenizer_2_path")
    clip_skip_supported = False  # SDXL always conditions on the penultimate layers, as kohya
    text_encoder_outputs = (("hidden_state1",), ("hidden_state2", "pool2"))

    def inspect(
        self,
        model_path: Path,
        *,
        v2: bool,
        v_parameterization: bool,
        options: Mapping[str, Any] | None = None,
    ) -> ModelInfo:
        path = Path(model_path)
        if v2:
            raise UserError(
                "--v2: SDXL is not an SD 2.x model; remove --v2 (use train_network.py for SD 2.x)"
            )
        if not path.exists():
            raise UserError(
                f"{MODEL_FLAG}: {path} does not exist; pass a diffusers SDXL folder or a .safetensors file "
                "(hub ids are not downloaded)"
            )
        if path.is_dir():
            layout, details = "diffusers", _inspect_folder(path)
            if not v_parameterization and details["scheduler_prediction_type"] == "v_prediction":
                log.info("%s: scheduler config says v_prediction; training with v-parameterization", path)
                v_parameterization = True
        else:
            xl.check_layout(ckpt.read_shapes(path, MODEL_FLAG), path, MODEL_FLAG)
            layout, details = "single_file", {}
        return sdxl_model_info(path, layout, v_parameterization, details)

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
        tokenizers = resolve_tokenizers(
            model_path=info.path,
            layout=info.layout,
            tokenizer_path=Path(tokenizer_path) if tokenizer_path else None,
            tokenizer_2_path=Path(tokenizer_2_path) if tokenizer_2_path else None,
            tokenizer_cache_dir=Path(tokenizer_cache_dir) if tokenizer_cache_dir else None,
        )
        if info.layout == "diffusers":
            unet, vae, te1, te2 = _load_folder(info, dtype)
        else:
            unet, vae, te1, te2 = xl.load_components(info.path, dtype)
        for index, (tokenizer, te) in enumerate(zip(tokenizers, (te1, te2), strict=True), 1):
            if len(tokenizer) > te.config.vocab_size:
                flag = "--tokenizer_path" if index == 1 else "--tokenizer_2_path"
                raise UserError(
                    f"tokenizer {index} has {len(tokenizer)} tokens but text encoder {index} of {info.path} only "
                    f"{te.config.vocab_size}; pass {flag} with the tokenizer that belongs to this model"
                )
        if vae_path is not None:
            vae = load_vae(Path(vae_path))
        elif vae is None:
            raise UserError(f"{MODEL_FLAG}: {info.path} holds no VAE; pass --vae with the SDXL VAE")
        for module in (unet, vae, te1, te2):
            module.requires_grad_(False)
            module.eval()
        return ModelBundle(
            info=info,
            unet=unet,
            vae=vae,
            text_encoders=[te1, te2],
            tokenizers=list(tokenizers),
            noise_scheduler=make_noise_scheduler(info.v_parameterization),
            vae_scale=xl.VAE_SCALE,
        )

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
        caches = (bundle.cache.setdefault("token_ids_1", {}), bundle.cache.setdefault("token_ids_2", {}))
        return encode_sdxl_prompts(
            bundle.text_encoders,
            bundle.tokenizers,
            captions,
            max_token_length=max_token_length,
            token_caches=caches,
            weighted=weighted,
            encoders=encoders,
        )

    def batch_conditioning(
        self, bundle: ModelBundle, batch: dict[str, Any], device: torch.device
    ) -> dict[str, torch.Tensor]:
        return {"time_ids": time_ids(batch, device)}

    def predict(
        self, bundle: ModelBundle, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        context = torch.cat([cond["hidden_state1"], cond["hidden_state2"]], dim=-1)
        added = {"text_embeds": cond["pool2"], "time_ids": cond["time_ids"]}
        return bundle.unet(noisy, timesteps, encoder_hidden_states=context, added_cond_kwargs=added).sample

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
        from library.families.sdxl_sample import sample_sdxl

        def encode(texts: list[str]) -> dict[str, torch.Tensor]:
            return self.encode_prompts(bundle, texts, clip_skip=None, max_token_length=max_token_length)

        return sample_sdxl(bundle, encode, prompts, make_scheduler, device)
