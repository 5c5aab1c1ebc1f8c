"""FLUX.1 LoRA (kohya's networks.lora_flux): key names and shapes on the real-size model, network_args."""

from __future__ import annotations

import pytest
import torch
from flux_lora_helpers import flux_inputs

from library.errors import UserError
from library.families.tiny_flux import REAL_TRANSFORMER_CONFIG, build_tiny_flux
from networks import lora_flux
from networks.lora import create_network, create_network_from_weights, family_problems, parse_network_args
from networks.lora_group import GroupedLoRAModule

# openai/clip-vit-large-patch14 text tower and google/t5-v1_1-xxl encoder, as FLUX.1 uses them.
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12}
T5_XXL = {
    "vocab_size": 32128,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "feed_forward_proj": "gated-gelu",
    "is_encoder_decoder": False,
}
DOUBLE = [f"{s}_{m}" for s in ("img", "txt") for m in ("attn_qkv", "attn_proj", "mlp_0", "mlp_2", "mod_lin")]
SINGLE = ["linear1", "linear2", "modulation_lin"]


@pytest.fixture(scope="module")
def real_flux():
    """FLUX.1-dev's transformer, CLIP-L and T5-XXL on the meta device: names and shapes without the memory."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    with init_empty_weights():
        transformer = FluxTransformer2DModel(**REAL_TRANSFORMER_CONFIG)
        clip_l = CLIPTextModel(CLIPTextConfig(**CLIP_L))
        t5 = T5EncoderModel(T5Config(**T5_XXL))
    return transformer, clip_l, t5


def _network(models, rank: int = 4, alpha: float = 1.0, **args: str):
    transformer, clip_l, t5 = models
    return create_network(1.0, rank, alpha, None, [clip_l, t5], transformer, **args)


def _names(network, prefix: str = "lora_unet_") -> set[str]:
    return {lo.lora_name for lo in network.all_loras if lo.lora_name.startswith(prefix)}


def _blocks(double: range, single: range) -> set[str]:
    names = {f"lora_unet_double_blocks_{i}_{m}" for i in double for m in DOUBLE}
    return names | {f"lora_unet_single_blocks_{i}_{m}" for i in single for m in SINGLE}


def _clip_names() -> set[str]:
    parts = [f"self_attn_{p}_proj" for p in ("q", "k", "v", "out")] + ["mlp_fc1", "mlp_fc2"]
    return {f"lora_te1_text_model_encoder_layers_{i}_{p}" for i in range(12) for p in parts}


def test_real_flux_default_keys_and_shapes(real_flux):
    network = _network(real_flux, rank=16, alpha=8)
    assert _names(network) == _blocks(range(19), range(38))
    assert _names(network, "lora_te") == _clip_names()  # no T5 without train_t5xxl
    assert (len(network.unet_loras), len(network.text_encoder_loras)) == (304, 72)
    state = network.state_dict()
    shapes = {
        "double_blocks_0_img_attn_qkv": ([16, 3072], [9216, 16]),
        "double_blocks_18_txt_attn_qkv": ([16, 3072], [9216, 16]),
        "double_blocks_0_img_attn_proj": ([16, 3072], [3072, 16]),
        "double_blocks_0_img_mlp_0": ([16, 3072], [12288, 16]),
        "double_blocks_0_txt_mlp_2": ([16, 12288], [3072, 16]),
        "double_blocks_0_img_mod_lin": ([16, 3072], [18432, 16]),
        "single_blocks_0_linear1": ([16, 3072], [21504, 16]),
        "single_blocks_37_linear2": ([16, 15360], [3072, 16]),
        "single_blocks_0_modulation_lin": ([16, 3072], [9216, 16]),
    }
    for name, (down, up) in shapes.items():
        assert list(state[f"lora_unet_{name}.lora_down.weight"].shape) == down, name
        assert list(state[f"lora_unet_{name}.lora_up.weight"].shape) == up, name
        assert float(state[f"lora_unet_{name}.alpha"]) == 8.0
    assert len(state) == 3 * (304 + 72)


@pytest.mark.parametrize(
    ("args", "double", "single"),
    [
        ({"train_blocks": "single"}, range(0), range(38)),
        ({"train_blocks": "double"}, range(19), range(0)),
        (
            {"train_double_block_indices": "0-2,5", "train_single_block_indices": "none"},
            [0, 1, 2, 5],
            range(0),
        ),
        ({"train_single_block_indices": "30-37", "train_blocks": "single"}, range(0), range(30, 38)),
    ],
)
def test_real_flux_block_selection(real_flux, args, double, single):
    assert _names(_network(real_flux, **args)) == _blocks(double, single)


def test_real_flux_per_type_ranks(real_flux):
    network = _network(real_flux, img_attn_dim="0", txt_mlp_dim="8", single_mod_dim="2", single_dim="0")
    ranks = {lo.lora_name: lo.lora_dim for lo in network.unet_loras}
    expected = _blocks(range(19), range(38))
    expected -= {n for n in expected if "img_attn" in n or n.endswith(("linear1", "linear2"))}
    assert set(ranks) == expected
    assert ranks["lora_unet_double_blocks_3_txt_mlp_0"] == 8
    assert ranks["lora_unet_double_blocks_3_txt_mlp_2"] == 8
    assert ranks["lora_unet_single_blocks_7_modulation_lin"] == 2
    assert ranks["lora_unet_double_blocks_3_img_mod_lin"] == 4  # no type rank given: network_dim


def test_real_flux_in_dims_and_t5(real_flux):
    network = _network(real_flux, in_dims="[4,8,0,2,4]", train_t5xxl="True", train_blocks="single")
    ranks = {lo.lora_name: lo.lora_dim for lo in network.unet_loras if "blocks" not in lo.lora_name}
    assert ranks == {
        "lora_unet_img_in": 4,
        "lora_unet_time_in_in_layer": 8,
        "lora_unet_time_in_out_layer": 8,
        "lora_unet_guidance_in_in_layer": 2,
        "lora_unet_guidance_in_out_layer": 2,
        "lora_unet_txt_in": 4,
    }
    t5 = _names(network, "lora_te3_")
    assert len(t5) == 24 * 7
    assert {
        "lora_te3_encoder_block_0_layer_0_SelfAttention_q",
        "lora_te3_encoder_block_23_layer_0_SelfAttention_o",
    } < t5
    assert {
        "lora_te3_encoder_block_0_layer_1_DenseReluDense_wi_0",
        "lora_te3_encoder_block_0_layer_1_DenseReluDense_wo",
    } < t5
    assert {lo.te_index for lo in network.text_encoder_loras} == {0, 1}
    groups, names = network.prepare_optimizer_params([1e-5, 2e-5], 1e-4, 1e-4)
    assert names == ["textencoder1", "textencoder2", "unet"]
    assert [g["lr"] for g in groups] == [1e-5, 2e-5, 1e-4]


def test_real_flux_split_qkv_is_saved_fused_with_rank_and_alpha_times_parts(real_flux):
    state = _network(real_flux, rank=4, alpha=2, split_qkv="True", train_blocks="single").state_dict()
    assert list(state["lora_unet_single_blocks_0_linear1.lora_down.weight"].shape) == [16, 3072]
    assert list(state["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape) == [21504, 16]
    assert float(state["lora_unet_single_blocks_0_linear1.alpha"]) == 8.0  # scale 8/16 = 2/4 as trained
    assert list(state["lora_unet_single_blocks_0_linear2.lora_down.weight"].shape) == [4, 15360]


def test_schnell_has_no_guidance_modules(tmp_path):
    tiny = build_tiny_flux(0, tmp_path / "tok", schnell=True)
    network = _network((tiny.transformer, tiny.clip_l, tiny.t5), in_dims="[1,1,1,1,1]")
    assert not [n for n in _names(network) if "guidance" in n]
    assert "lora_unet_vector_in_out_layer" in _names(network)


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("train_blocks=some", "train_blocks=some: must be all, single or double"),
        ("in_dims=[1,2]", "in_dims=[1,2]: must be 5 integers >= 0"),
        ("train_double_block_indices=0-19", "must be all, none, or indices/ranges like 0-5,10 within 0-18"),
        ("train_single_block_indices=3-1", "within 0-37"),
        ("split_qkv=yes", "split_qkv=yes: must be True or False"),
        ("img_attn_dim=-1", "img_attn_dim=-1: must be an integer >= 0"),
        ("network_reg_dims=a=4", "network_reg_dims: a kohya lora.py option this suite does not support yet"),
    ],
)
def test_bad_flux_args_are_one_line_errors(item, message):
    with pytest.raises(UserError) as err:
        parse_network_args([item])
    assert len(err.value.problems) == 1
    assert message in err.value.problems[0]


def test_flux_args_parse():
    args = ["train_blocks=single", "in_dims=[0,4,0,0,2]", "train_double_block_indices=all", "split_qkv=true"]
    assert parse_network_args(args) == dict(a.split("=", 1) for a in args)


def test_args_checked_against_the_family(tiny_sd1_dir):
    assert family_problems(["train_blocks=single", "conv_dim=4"], "sd") == [
        "--network_args train_blocks: a FLUX.1 option (kohya's networks.lora_flux), but this is an SD model; "
        "remove train_blocks"
    ]
    assert family_problems(["conv_dim=4", "train_blocks=single"], "flux") == [
        "--network_args conv_dim: FLUX.1 has no convolutions for LoCon to train; remove conv_dim"
    ]
    assert lora_flux.family_problems(["train_blocks=single"], "flux") == []
    (problem,) = lora_flux.family_problems(["train_blocks=single"], "sdxl")
    assert "networks.lora_flux: trains FLUX.1 only; use --network_module networks.lora" in problem
    assert problem.endswith("SDXL model and remove train_blocks")

    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(str(tiny_sd1_dir / "unet"))
    te = CLIPTextModel.from_pretrained(str(tiny_sd1_dir / "text_encoder"))
    with pytest.raises(UserError, match="in_dims: a FLUX.1 option"):
        create_network(1.0, 4, 1.0, None, te, unet, in_dims="[1,1,1,1,1]")


def test_conv_dim_on_flux_is_an_error(tmp_path):
    tiny = build_tiny_flux(0, tmp_path / "tok")
    with pytest.raises(UserError, match="conv_dim: FLUX.1 has no convolutions"):
        _network((tiny.transformer, tiny.clip_l, tiny.t5), conv_dim="4")


def test_fused_module_computes_down_once_per_forward(tmp_path):
    tiny = build_tiny_flux(0, tmp_path / "tok")
    network = _network((tiny.transformer, tiny.clip_l, tiny.t5), split_qkv="False")
    grouped = [lo for lo in network.unet_loras if isinstance(lo, GroupedLoRAModule)]
    assert sorted({len(lo.org_modules) for lo in grouped}) == [3, 4]
    calls = {lo.lora_name: 0 for lo in grouped}

    def count(lo):
        def hook(*_):
            calls[lo.lora_name] += 1

        return hook

    for lo in grouped:
        lo.lora_down.register_forward_hook(count(lo))
    network.apply_to([tiny.clip_l, tiny.t5], tiny.transformer)
    with torch.no_grad():
        tiny.transformer(**flux_inputs())
    assert set(calls.values()) == {1}
    assert all(lo._pending is None for lo in grouped)  # nothing kept alive after the forward


def test_flux_network_args_train_and_continue(tiny_flux, tmp_path):
    from safetensors.torch import load_file
    from train_helpers import db_args, flux_files_args, make_images, run_flux

    data = make_images(tmp_path / "data", n=2)
    net_args = [
        "--network_args",
        "train_blocks=single",
        "split_qkv=True",
        "in_dims=[2,0,0,0,0]",
        "single_mod_dim=0",
    ]
    args = db_args(tiny_flux.transformer, data, tmp_path / "a", "--max_train_steps", "2", *net_args)
    args += flux_files_args(tiny_flux) + ["--t5xxl_max_token_length", "16", "--network_train_unet_only"]
    assert run_flux(args) == 0
    state = load_file(str(tmp_path / "a" / "feat.safetensors"))
    names = {k.split(".", 1)[0] for k in state}
    assert names == {f"lora_unet_single_blocks_{i}_{m}" for i in (0, 1) for m in ("linear1", "linear2")} | {
        "lora_unet_img_in"
    }
    up = state["lora_unet_single_blocks_0_linear1.lora_up.weight"]
    assert up.shape == (3 * 64 + 256, 16) and float(state["lora_unet_single_blocks_0_linear1.alpha"]) == 8.0
    assert up.any()
    blocks = torch.block_diag(*(torch.ones(n, 4) for n in (64, 64, 64, 256))).bool()
    assert not up[~blocks].any()  # trained split: the off-diagonal blocks stay exactly zero
    assert state["lora_unet_img_in.lora_down.weight"].shape == (2, 64)

    more = [
        *args[: args.index("--output_dir") + 1],
        str(tmp_path / "b"),
        *args[args.index("--output_dir") + 2 :],
    ]
    assert run_flux([*more, "--network_weights", str(tmp_path / "a" / "feat.safetensors")]) == 0


def test_flux_args_on_sd_stop_before_loading(tiny_sd1_dir, tmp_path, capsys):
    from train_helpers import db_args, error_lines, make_images, run_main

    data = make_images(tmp_path / "data", n=2)
    args = db_args(
        tiny_sd1_dir, data, tmp_path / "out", "--network_args", "train_blocks=single", "conv_dim=4"
    )
    assert run_main(args) == 2
    assert error_lines(capsys) == [
        "error: --network_args train_blocks: a FLUX.1 option (kohya's networks.lora_flux), but this is an SD "
        "model; remove train_blocks"
    ]
    args = db_args(tiny_sd1_dir, data, tmp_path / "out", "--network_module", "networks.lora_flux")
    assert run_main(args) == 2
    assert error_lines(capsys) == [
        "error: --network_module networks.lora_flux: trains FLUX.1 only; use --network_module networks.lora for "
        "this SD model"
    ]


@pytest.mark.parametrize("split", ["False", "True"], ids=["fused", "split_qkv"])
def test_gradients_same_with_gradient_checkpointing(tmp_path, split):
    """The shared down(x) survives checkpointing's recomputation: identical LoRA gradients either way."""
    from flux_lora_helpers import random_network

    tiny = build_tiny_flux(0, tmp_path / "tok")
    network = random_network(tiny.transformer, tiny.clip_l, tiny.t5, split_qkv=split)
    network.apply_to([tiny.clip_l, tiny.t5], tiny.transformer, apply_text_encoder=False)
    tiny.transformer.train()
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            tiny.transformer.enable_gradient_checkpointing()
        network.zero_grad(set_to_none=True)
        tiny.transformer(**flux_inputs()).sample.square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in network.named_parameters()})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * 26
    for name, grad in grads[0].items():
        assert grad.abs().max() > 0, name
        assert torch.allclose(grad, grads[1][name], atol=1e-6, rtol=1e-5), name


def test_t5_lora_trains_with_its_own_lr(tiny_flux, tmp_path):
    from safetensors.torch import load_file
    from train_helpers import db_args, flux_files_args, make_images, run_flux

    data = make_images(tmp_path / "data", n=2)
    args = db_args(
        tiny_flux.transformer, data, tmp_path / "o", "--max_train_steps", "2", "--text_encoder_lr", "1e-3"
    )
    args += [
        "0",
        "--network_args",
        "train_t5xxl=True",
        "--t5xxl_max_token_length",
        "16",
        *flux_files_args(tiny_flux),
    ]
    assert run_flux(args) == 0
    state = load_file(str(tmp_path / "o" / "feat.safetensors"))
    ups = {k.split(".")[0]: v for k, v in state.items() if k.endswith("lora_up.weight")}
    assert len([n for n in ups if n.startswith("lora_te3_")]) == 2 * 7
    assert ups["lora_te1_text_model_encoder_layers_0_self_attn_q_proj"].any()
    assert not any(v.any() for n, v in ups.items() if n.startswith("lora_te3_"))  # lr 0: T5's LoRA frozen


def test_split_qkv_refuses_a_dense_up(tmp_path):
    tiny = build_tiny_flux(0, tmp_path / "tok")
    models = (tiny.transformer, tiny.clip_l, tiny.t5)
    network = _network(models, split_qkv="True", train_blocks="double")
    state = network.state_dict_for_save(torch.float32)
    state["lora_unet_double_blocks_1_txt_attn_qkv.lora_up.weight"].fill_(0.5)
    with pytest.raises(UserError, match="double_blocks_1_txt_attn_qkv: lora_up is not block-diagonal"):
        _network(models, split_qkv="True", train_blocks="double").load_weights(state)
    fused, _ = create_network_from_weights(1.0, None, None, list(models[1:]), models[0], weights_sd=state)
    fused.load_weights(state)  # a fused network takes it (rank 12 per qkv), as every other loader does
    assert fused.state_dict()["lora_unet_double_blocks_1_txt_attn_qkv.lora_down.weight"].shape == (12, 64)
