"""Helpers for the merge/extract tests: load any tiny checkpoint as modules, random LoRAs, model outputs."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from networks.lora import create_network
from networks.lora_file import save_lora_file


def load_models(
    path: Path, clip_l: Path | None = None, t5xxl: Path | None = None
) -> tuple[nn.Module, list[nn.Module]]:
    """(denoiser, text encoders) in float32, eval mode, from a single file (FLUX: + clip_l/t5xxl) or a folder."""
    unet, tes = _load(path, clip_l, t5xxl)
    return unet.eval(), [te.eval() for te in tes]  # T5 has dropout


def _load(path: Path, clip_l: Path | None, t5xxl: Path | None) -> tuple[nn.Module, list[nn.Module]]:
    from library.families import flux, sdxl_checkpoint
    from library.families import sd_checkpoint as ckpt
    from library.families.flux_checkpoint import build_transformer

    if path.is_dir():
        return _load_folder(path)
    shapes = ckpt.read_shapes(path)
    if any(k.startswith(sdxl_checkpoint.TE2_PREFIX) for k in shapes):
        unet, _, te1, te2 = sdxl_checkpoint.load_components(path, torch.float32)
        return unet, [te1, te2]
    if any(k.startswith(("double_blocks.", "model.diffusion_model.double_blocks.")) for k in shapes):
        transformer = build_transformer(ckpt.read_state_dict(path), path, torch.float32)
        tes = [flux._load_clip(clip_l, torch.float32)] if clip_l else []
        tes += [flux._load_t5(t5xxl, torch.float32)] if t5xxl else []
        return transformer, tes
    sd = ckpt.read_state_dict(path)
    version = ckpt.detect_version(shapes, path)
    unet = ckpt.ldm_to_unet(sd, ckpt.unet_config_from_shapes(shapes, version), path, torch.float32)
    te_config = ckpt.text_encoder_config_from_shapes(shapes, version)
    return unet, [ckpt.ldm_to_text_encoder(sd, te_config, version, path, torch.float32)]


def _load_folder(path: Path) -> tuple[nn.Module, list[nn.Module]]:
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

    if (path / "transformer").is_dir():
        return FluxTransformer2DModel.from_pretrained(path / "transformer"), [
            CLIPTextModel.from_pretrained(path / "text_encoder"),
            T5EncoderModel.from_pretrained(path / "text_encoder_2"),
        ]
    tes = [CLIPTextModel.from_pretrained(path / "text_encoder")]
    if (path / "text_encoder_2").is_dir():
        tes.append(CLIPTextModelWithProjection.from_pretrained(path / "text_encoder_2"))
    return UNet2DConditionModel.from_pretrained(path / "unet"), tes


def random_lora(
    unet: nn.Module,
    tes: list[nn.Module],
    path: Path,
    seed: int,
    rank: int = 4,
    alpha: float = 2.0,
    **args: str,
) -> Path:
    """A LoRA with random non-zero up and down on every module the trainer would create, saved to `path`."""
    network = create_network(1.0, rank, alpha, None, tes, unet, **args)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in network.all_loras:
            lora.lora_down.weight.copy_(torch.randn(lora.lora_down.weight.shape, generator=gen) * 0.1)
            lora.lora_up.weight.copy_(torch.randn(lora.lora_up.weight.shape, generator=gen) * 0.1)
    save_lora_file(path, {k: v.detach().clone() for k, v in network.state_dict().items()}, {})
    return path


def _unet_inputs(unet: nn.Module) -> dict[str, object]:
    gen = torch.Generator().manual_seed(1)
    config = unet.config
    if type(unet).__name__ == "FluxTransformer2DModel":
        length, tokens = 16, 8
        img_ids = torch.zeros(length, 3)
        img_ids[:, 1], img_ids[:, 2] = torch.arange(length) // 4, torch.arange(length) % 4
        return {
            "hidden_states": torch.randn(2, length, config.in_channels, generator=gen),
            "encoder_hidden_states": torch.randn(2, tokens, config.joint_attention_dim, generator=gen),
            "pooled_projections": torch.randn(2, config.pooled_projection_dim, generator=gen),
            "timestep": torch.tensor([0.3, 0.8]),
            "img_ids": img_ids,
            "txt_ids": torch.zeros(tokens, 3),
            "guidance": torch.full((2,), 3.5) if config.guidance_embeds else None,
        }
    inputs: dict[str, object] = {
        "sample": torch.randn(2, config.in_channels, 16, 16, generator=gen),
        "timestep": torch.tensor([10, 700]),
        "encoder_hidden_states": torch.randn(2, 7, config.cross_attention_dim, generator=gen),
    }
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, pooled, generator=gen),
            "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2),
        }
    return inputs


def outputs(unet: nn.Module, tes: list[nn.Module]) -> list[torch.Tensor]:
    """The denoiser's output, then every text encoder's last and penultimate hidden states."""
    with torch.no_grad():
        result = [unet(**_unet_inputs(unet)).sample]
        ids = torch.randint(1, 60, (2, 9), generator=torch.Generator().manual_seed(2))
        for te in tes:
            out = te(ids, output_hidden_states=True)
            result += [out.last_hidden_state, out.hidden_states[-2]]
    return result


def outputs_with_loras(
    unet: nn.Module, tes: list[nn.Module], loras: list[tuple[Path, float]]
) -> list[torch.Tensor]:
    """Outputs with the LoRA files applied at forward (hooks; the weights stay untouched)."""
    from networks.lora import create_network_from_weights

    networks = []
    for path, ratio in loras:
        network, state = create_network_from_weights(ratio, path, None, tes, unet)
        network.apply_to(tes, unet)
        network.load_state_dict(state)
        networks.append(network)
    try:
        return outputs(unet, tes)
    finally:
        for network in networks:
            network.remove()


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert len(a) == len(b)
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))
