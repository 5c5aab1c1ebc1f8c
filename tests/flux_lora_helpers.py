"""FLUX LoRA test helpers: random networks, per-Linear deltas of either file layout, diffusers loading."""

from __future__ import annotations

import torch
from torch import nn

from library.families.flux_checkpoint import module_map
from networks.lora import create_network

_TE = {"text_encoder": "lora_te1", "text_encoder_2": "lora_te3"}


def random_network(transformer: nn.Module, clip_l: nn.Module, t5: nn.Module, seed: int = 5, **args: str):
    """A FLUX network with random non-zero up AND down, so every key changes the outputs."""
    network = create_network(1.0, 4, 2.0, None, [clip_l, t5], transformer, **args)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in network.all_loras:
            lora.lora_down.weight.copy_(torch.randn(lora.lora_down.weight.shape, generator=gen) * 0.2)
            up = torch.randn(lora.lora_up.weight.shape, generator=gen) * 0.2
            off = lora.off_diagonal() if hasattr(lora, "off_diagonal") else None
            lora.lora_up.weight.copy_(up.masked_fill(off, 0) if off is not None else up)
    return network


def kohya_deltas(state: dict[str, torch.Tensor], transformer: nn.Module) -> dict[str, torch.Tensor]:
    """up @ down * alpha / rank per model Linear (fused modules cut by the Linears' sizes), in float64."""
    pairs = module_map(len(transformer.transformer_blocks), len(transformer.single_transformer_blocks))
    table = {"lora_unet_" + bfl.replace(".", "_"): paths for bfl, paths in pairs}
    out = {}
    for name in {k.split(".")[0] for k in state}:
        down = state[f"{name}.lora_down.weight"].double()
        alpha = float(state.get(f"{name}.alpha", down.shape[0]))
        full = state[f"{name}.lora_up.weight"].double() @ down * (alpha / down.shape[0])
        if not name.startswith("lora_unet_"):
            out[name] = full
            continue
        paths = table[name]
        sizes = [transformer.get_submodule(p).out_features for p in paths]
        out |= {f"transformer.{p}": d for p, d in zip(paths, full.split(sizes), strict=True)}
    return out


def diffusers_deltas(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """lora_B @ lora_A (* alpha / rank when given) per module; text encoders under their kohya names."""
    out = {}
    for key in state:
        if not key.endswith(".lora_A.weight"):
            continue
        path = key.removesuffix(".lora_A.weight")
        down = state[key].double()
        alpha = float(state.get(f"{path}.alpha", down.shape[0]))
        delta = state[f"{path}.lora_B.weight"].double() @ down * (alpha / down.shape[0])
        component, _, rest = path.partition(".")
        if component in _TE:
            rest = rest if rest.startswith(("text_model.", "encoder.block")) else f"text_model.{rest}"
            path = f"{_TE[component]}_{rest.replace('.', '_')}"
        out[path] = delta
    return out


def assert_same_deltas(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6, rtol=1e-5), key


def flux_inputs(batch: int = 2, length: int = 16, tokens: int = 8, seed: int = 3) -> dict[str, torch.Tensor]:
    """Inputs of a tiny FluxTransformer2DModel (64 packed channels, T5 width 32, CLIP width 64)."""
    gen = torch.Generator().manual_seed(seed)
    img_ids = torch.zeros(length, 3)
    img_ids[:, 1], img_ids[:, 2] = torch.arange(length) // 4, torch.arange(length) % 4
    return {
        "hidden_states": torch.randn(batch, length, 64, generator=gen),
        "encoder_hidden_states": torch.randn(batch, tokens, 32, generator=gen),
        "pooled_projections": torch.randn(batch, 64, generator=gen),
        "timestep": torch.linspace(0.2, 0.9, batch),
        "img_ids": img_ids,
        "txt_ids": torch.zeros(tokens, 3),
        "guidance": torch.full((batch,), 3.5),
    }
