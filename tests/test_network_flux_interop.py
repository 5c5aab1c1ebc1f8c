"""FLUX LoRA files against diffusers: FluxPipeline.load_lora_weights takes every key and computes what we
compute; --network_weights reads diffusers/PEFT-named FLUX LoRAs; fused qkv/linear1 slice as diffusers does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from flux_lora_helpers import (
    assert_same_deltas,
    diffusers_deltas,
    flux_inputs,
    kohya_deltas,
    random_network,
)
from pipeline_helpers import load_into_pipeline
from torch import nn

from networks.flux_convert import kohya_to_diffusers
from networks.lora import create_network_from_weights
from networks.lora_file import save_lora_file
from networks.lora_group import GroupedLoRAModule

pytest.importorskip("peft")
diffusers = pytest.importorskip("diffusers")
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402


def _pipe(tiny_flux):
    return diffusers.FluxPipeline.from_pretrained(str(tiny_flux.diffusers_dir))


def _peft_layers(module: nn.Module) -> int:
    return sum(isinstance(m, BaseTunerLayer) for m in module.modules())


def _hooked_output(network, pipe, inputs):
    network.apply_to([pipe.text_encoder, pipe.text_encoder_2], pipe.transformer)
    try:
        with torch.no_grad():
            return pipe.transformer(**inputs).sample
    finally:
        network.remove()


# diffusers' kohya converter hard-codes FLUX.1's 3072/12288 split of linear1 and drops in_dims keys (it
# writes them without the `transformer.` prefix), so the tiny model checks double blocks and CLIP-L here;
# linear1 is checked against the converter at the real width below, everything through the converted file.
@pytest.mark.parametrize("split", ["False", "True"], ids=["fused", "split_qkv"])
def test_diffusers_loads_kohya_file_and_matches(tiny_flux, tmp_path: Path, split):
    ours, theirs = _pipe(tiny_flux), _pipe(tiny_flux)
    network = random_network(
        ours.transformer, ours.text_encoder, ours.text_encoder_2, train_blocks="double", split_qkv=split
    )
    path = tmp_path / "flux.safetensors"
    save_lora_file(path, network.state_dict_for_save(torch.float32), {"ss_network_dim": "4"})
    assert load_into_pipeline(theirs, path) == []
    linears = sum(len(getattr(lo, "org_modules", (lo,))) for lo in network.unet_loras)
    assert linears == 2 * 14  # per double block: 3 + 3 fused parts, 8 single Linears
    assert _peft_layers(theirs.transformer) == linears
    assert _peft_layers(theirs.text_encoder) == len(network.text_encoder_loras) == 18

    inputs = flux_inputs()
    with torch.no_grad():
        base = ours.transformer(**inputs).sample
        expected = theirs.transformer(**inputs).sample
    got = _hooked_output(network, ours, inputs)
    assert (got - base).abs().max() > 1e-2
    assert (got - expected).abs().max() < 1e-4
    ids = torch.randint(0, 100, (2, 77), generator=torch.Generator().manual_seed(2))
    network.apply_to([ours.text_encoder, ours.text_encoder_2], ours.transformer)
    try:
        with torch.no_grad():
            te_ours = ours.text_encoder(ids, output_hidden_states=True).hidden_states[-1]
    finally:
        network.remove()
    with torch.no_grad():
        te_theirs = theirs.text_encoder(ids, output_hidden_states=True).hidden_states[-1]
    assert (te_ours - te_theirs).abs().max() < 1e-4


@pytest.mark.parametrize("split", [False, True], ids=["fused", "split_qkv"])
def test_linear1_slices_as_diffusers_at_real_width(split):
    """kohya's single-block linear1 (q, k, v 3072 each, MLP 12288): our per-Linear rows = diffusers' split."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    parts = [nn.Linear(3072, n, bias=False, device="meta") for n in (3072, 3072, 3072, 12288)]
    lora = GroupedLoRAModule("lora_unet_single_blocks_0_linear1", parts, lora_dim=2, alpha=1.0, split=split)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        lora.lora_down.weight.copy_(torch.randn(lora.lora_down.weight.shape, generator=gen))
        up = torch.randn(lora.lora_up.weight.shape, generator=gen)
        lora.lora_up.weight.copy_(up.masked_fill(lora.off_diagonal(), 0))
    name = lora.lora_name
    state = {f"{name}.{k}": v.detach().clone() for k, v in lora.state_dict().items()}
    converted = _convert_kohya_flux_lora_to_diffusers(state)
    probe = torch.randn(3072, 3, generator=gen, dtype=torch.float64)  # deltas compared on probe vectors
    paths = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"]
    for i, path in enumerate(paths):
        key = f"transformer.single_transformer_blocks.0.{path}"
        theirs = converted[f"{key}.lora_B.weight"].double() @ (
            converted[f"{key}.lora_A.weight"].double() @ probe
        )
        rows, cols = lora._rows[i], lora._cols[i]
        ours = lora.lora_up.weight[rows, cols].double() @ (lora.lora_down.weight[cols].double() @ probe)
        assert torch.allclose(ours * lora.scale, theirs, atol=1e-9), path


def test_diffusers_loads_converted_file_with_every_module(tiny_flux, tmp_path: Path):
    """The whole network (double + single blocks, in_dims, CLIP-L) via tools/convert_lora's diffusers layout."""
    ours, theirs = _pipe(tiny_flux), _pipe(tiny_flux)
    network = random_network(ours.transformer, ours.text_encoder, ours.text_encoder_2, in_dims="[2,2,2,2,2]")
    path = tmp_path / "flux_diffusers.safetensors"
    converted = kohya_to_diffusers(network.state_dict_for_save(torch.float32))
    save_lora_file(path, converted, {})
    assert load_into_pipeline(theirs, path) == []
    linears = sum(len(getattr(lo, "org_modules", (lo,))) for lo in network.unet_loras)
    assert linears == 2 * 14 + 2 * 6 + 8  # double blocks, single blocks (linear1 = 4 Linears), embedders
    assert _peft_layers(theirs.transformer) == linears
    assert _peft_layers(theirs.text_encoder) == 18
    inputs = flux_inputs()
    with torch.no_grad():
        expected = theirs.transformer(**inputs).sample
    assert (_hooked_output(network, ours, inputs) - expected).abs().max() < 1e-4


def _peft_state(network, transformer, *, shared: bool) -> dict[str, torch.Tensor]:
    """diffusers/PEFT keys of `network` (alpha baked in); `shared=False` gives each split part its own A."""
    state = kohya_to_diffusers(network.state_dict_for_save(torch.float32))
    if not shared:
        gen = torch.Generator().manual_seed(9)
        for key in [k for k in state if ".attn.to_" in k and k.endswith("lora_A.weight")]:
            state[key] = torch.randn(state[key].shape, generator=gen) * 0.2
    return state


@pytest.mark.parametrize("shared", [True, False], ids=["shared_A", "own_A"])
def test_network_weights_take_peft_named_flux_loras(tiny_flux, tmp_path: Path, shared):
    pipe = _pipe(tiny_flux)
    models = (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2)
    source = random_network(*models)
    peft = _peft_state(source, pipe.transformer, shared=shared)
    path = tmp_path / "peft.safetensors"
    save_lora_file(path, peft, {})

    network, _ = create_network_from_weights(1.0, path, None, list(models[1:]), models[0])
    network.load_weights(path)
    loaded = network.state_dict_for_save(torch.float32)
    qkv = loaded["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"]
    linear1 = loaded["lora_unet_single_blocks_1_linear1.lora_down.weight"]
    # equal A's fuse exactly at rank 4; own A's stack under a block-diagonal up (3 x 4, 4 x 4)
    assert (qkv.shape[0], linear1.shape[0]) == ((4, 4) if shared else (12, 16))
    assert_same_deltas(kohya_deltas(loaded, pipe.transformer), diffusers_deltas(peft))
    if shared:  # the same file as kohya keys: load_weights into a fresh rank-4 network as well
        target = random_network(*models, seed=11)
        target.load_weights(path)
        assert_same_deltas(
            kohya_deltas(target.state_dict_for_save(torch.float32), pipe.transformer), diffusers_deltas(peft)
        )
