"""SDXL LoRA files: kohya's key names on the real-size model, diffusers interop, diffusers-style keys in."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from pipeline_helpers import load_into_pipeline

from library.families.tiny_sdxl import REAL_UNET_CONFIG, build_tiny_sdxl, save_diffusers_folder
from networks.lora import create_network
from networks.lora_file import load_lora_file, save_lora_file
from networks.targets import SDXL_TABLE, find_targets

pytest.importorskip("peft")
diffusers = pytest.importorskip("diffusers")
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402

# CLIP-L and OpenCLIP bigG text towers as in stabilityai/stable-diffusion-xl-base-1.0.
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12}
BIG_G = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "projection_dim": 1280,
    "hidden_act": "gelu",
}


@pytest.fixture(scope="module")
def real_sdxl():
    """The real SDXL UNet and text encoders on the meta device: names and shapes without the memory."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with init_empty_weights():
        unet = UNet2DConditionModel(**REAL_UNET_CONFIG)
        te1 = CLIPTextModel(CLIPTextConfig(**CLIP_L))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**BIG_G))
    return unet, te1, te2


def _expected_unet_names() -> set[str]:
    """kohya's SDXL UNet LoRA names from the SGM layout: which blocks hold how many transformer layers."""
    depth = {f"input_blocks_{i}_1": 2 for i in (4, 5)} | {f"input_blocks_{i}_1": 10 for i in (7, 8)}
    depth |= {"middle_block_1": 10} | {f"output_blocks_{i}_1": 10 for i in (0, 1, 2)}
    depth |= {f"output_blocks_{i}_1": 2 for i in (3, 4, 5)}
    per_layer = [f"attn{a}_to_{p}" for a in (1, 2) for p in ("q", "k", "v", "out_0")]
    per_layer += ["ff_net_0_proj", "ff_net_2"]
    names = set()
    for block, layers in depth.items():
        names |= {f"lora_unet_{block}_{end}" for end in ("proj_in", "proj_out")}
        names |= {f"lora_unet_{block}_transformer_blocks_{i}_{p}" for i in range(layers) for p in per_layer}
    return names


def _expected_te_names(prefix: str, layers: int) -> set[str]:
    parts = [f"self_attn_{p}_proj" for p in ("q", "k", "v", "out")] + ["mlp_fc1", "mlp_fc2"]
    return {f"{prefix}_text_model_encoder_layers_{i}_{p}" for i in range(layers) for p in parts}


def test_real_sdxl_key_list_is_kohyas(real_sdxl):
    unet, te1, te2 = real_sdxl
    targets = find_targets(SDXL_TABLE, unet, [te1, te2], include_conv_classes=False)
    names = [t.name for t in targets]
    assert len(names) == len(set(names))
    unet_names = {n for n in names if n.startswith("lora_unet_")}
    assert unet_names == _expected_unet_names()
    assert {n for n in names if n.startswith("lora_te1_")} == _expected_te_names("lora_te1", 12)
    assert {n for n in names if n.startswith("lora_te2_")} == _expected_te_names("lora_te2", 32)
    # the module counts kohya prints for SDXL: U-Net 722, text encoder 1: 72, text encoder 2: 192
    assert (len(unet_names), len(names) - len(unet_names)) == (722, 72 + 192)


def test_real_sdxl_locon_names(real_sdxl):
    unet, te1, te2 = real_sdxl
    convs = {t.name for t in find_targets(SDXL_TABLE, unet, [te1, te2], include_conv_classes=True)}
    for name in (
        "lora_unet_input_blocks_1_0_in_layers_2",
        "lora_unet_input_blocks_1_0_out_layers_3",
        "lora_unet_input_blocks_1_0_emb_layers_1",
        "lora_unet_input_blocks_4_0_skip_connection",
        "lora_unet_input_blocks_3_0_op",
        "lora_unet_input_blocks_6_0_op",
        "lora_unet_output_blocks_2_2_conv",
        "lora_unet_output_blocks_5_2_conv",
        "lora_unet_middle_block_0_in_layers_2",
        "lora_unet_middle_block_2_out_layers_3",
        "lora_unet_output_blocks_8_0_skip_connection",
    ):
        assert name in convs
    # no diffusers block names leak into the file
    assert not [n for n in convs if re.search(r"(down|up)_blocks|mid_block|resnets|attentions", n)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("tiny_sdxl_interop")
    model = build_tiny_sdxl(tokenizer_dir=root / "tok")
    return model, save_diffusers_folder(model, root / "model")


def _random_network(model, **kwargs):
    network = create_network(
        1.0, 4, 2.0, model.vae, [model.text_encoder, model.text_encoder_2], model.unet, **kwargs
    )
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # non-zero up AND down, so every key changes the outputs
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return network


def _unet_inputs():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    context = torch.randn(2, 77, 192, generator=gen)
    added = {
        "text_embeds": torch.randn(2, 96, generator=gen),
        "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2),
    }
    return x, torch.tensor([10, 700]), context, added


@pytest.mark.parametrize("kwargs", [{}, {"conv_dim": "4", "conv_alpha": "1"}], ids=["lora", "locon"])
def test_diffusers_sdxl_pipeline_consumes_every_key(tiny, tmp_path: Path, kwargs):
    model, folder = tiny
    network = _random_network(model, **kwargs)
    path = tmp_path / "sdxl.safetensors"
    save_lora_file(path, network.state_dict_for_save(torch.float32), {"ss_network_dim": "4"})
    n_unet, n_te1 = len(network.unet_loras), sum(lo.te_index == 0 for lo in network.text_encoder_loras)
    n_te2 = len(network.text_encoder_loras) - n_te1

    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(str(folder))
    assert load_into_pipeline(pipe, path) == []
    assert sum(isinstance(m, BaseTunerLayer) for m in pipe.unet.modules()) == n_unet
    assert sum(isinstance(m, BaseTunerLayer) for m in pipe.text_encoder.modules()) == n_te1
    assert sum(isinstance(m, BaseTunerLayer) for m in pipe.text_encoder_2.modules()) == n_te2

    x, t, context, added = _unet_inputs()
    ids = torch.randint(0, 250, (2, 77), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        base = model.unet(x, t, encoder_hidden_states=context, added_cond_kwargs=added).sample
        network.apply_to([model.text_encoder, model.text_encoder_2], model.unet, True, True)
        try:
            ours = model.unet(x, t, encoder_hidden_states=context, added_cond_kwargs=added).sample
            ours_te2 = model.text_encoder_2(ids, output_hidden_states=True).hidden_states[-2]
        finally:
            network.remove()
        theirs = pipe.unet(x, t, encoder_hidden_states=context, added_cond_kwargs=added).sample
        theirs_te2 = pipe.text_encoder_2(ids, output_hidden_states=True).hidden_states[-2]
    assert (ours - base).abs().max() > 1e-2
    assert (ours - theirs).abs().max() < 1e-4
    assert (ours_te2 - theirs_te2).abs().max() < 1e-4


def test_network_weights_with_diffusers_style_keys_load(tiny, tmp_path: Path):
    """kohya prefixes over diffusers block names, and diffusers/PEFT keys, land on the same modules."""
    model, _ = tiny
    source = _random_network(model)
    state = source.state_dict_for_save(torch.float32)
    by_name = {
        t.name: t
        for t in find_targets(
            SDXL_TABLE, model.unet, [model.text_encoder, model.text_encoder_2], include_conv_classes=False
        )
    }

    kohya_diffusers, peft = {}, {}
    for key, value in state.items():
        name, _, suffix = key.partition(".")
        target = by_name[name]
        kohya_diffusers[f"{target.prefix}_{target.path.replace('.', '_')}.{suffix}"] = value
        component = (
            "unet" if target.component == "unet" else ("text_encoder", "text_encoder_2")[target.te_index]
        )
        peft_suffix = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}.get(suffix)
        if peft_suffix:
            peft[f"{component}.{target.path}.{peft_suffix}"] = value
    assert any(k.startswith("lora_unet_down_blocks_1_attentions_0") for k in kohya_diffusers)

    for variant, extra in (("kohya_diffusers", kohya_diffusers), ("peft", peft)):
        path = tmp_path / f"{variant}.safetensors"
        save_lora_file(path, extra, {})
        target = create_network(
            1.0, 4, 2.0, model.vae, [model.text_encoder, model.text_encoder_2], model.unet
        )
        target.load_weights(path)
        loaded = target.state_dict_for_save(torch.float32)
        assert set(loaded) == set(state)
        for key, value in loaded.items():
            if key.endswith(".alpha") and variant == "peft":
                assert float(value) == 4.0  # PEFT files carry no alpha: alpha = rank
            else:
                assert torch.equal(value, state[key]), key
    assert load_lora_file(tmp_path / "peft.safetensors")[0]  # written as given, read back untouched
