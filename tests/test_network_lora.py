"""networks.lora / networks.lora_file on the tiny SD1 model: exact kohya key names, shapes, IO, errors, groups."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors import safe_open
from torch import nn

from library.errors import UserError
from library.families.tiny import build_tiny_sd
from networks import lora as lora_module
from networks.lora import (
    LoRAModule,
    LoRANetwork,
    create_network,
    create_network_from_weights,
    parse_network_args,
)
from networks.lora_file import atomic_write, load_lora_file, save_lora_file
from networks.targets import select_table

# The tiny SD1 UNet has 4 Transformer2DModel blocks; each yields these 12 targets.
TRANSFORMERS = [
    "lora_unet_down_blocks_0_attentions_0",
    "lora_unet_mid_block_attentions_0",
    "lora_unet_up_blocks_1_attentions_0",
    "lora_unet_up_blocks_1_attentions_1",
]
TRANSFORMER_CHILDREN = [
    "proj_in",
    "proj_out",
    "transformer_blocks_0_attn1_to_q",
    "transformer_blocks_0_attn1_to_k",
    "transformer_blocks_0_attn1_to_v",
    "transformer_blocks_0_attn1_to_out_0",
    "transformer_blocks_0_attn2_to_q",
    "transformer_blocks_0_attn2_to_k",
    "transformer_blocks_0_attn2_to_v",
    "transformer_blocks_0_attn2_to_out_0",
    "transformer_blocks_0_ff_net_0_proj",
    "transformer_blocks_0_ff_net_2",
]
TE_CHILDREN = [
    "self_attn_q_proj",
    "self_attn_k_proj",
    "self_attn_v_proj",
    "self_attn_out_proj",
    "mlp_fc1",
    "mlp_fc2",
]
EXPECTED_UNET = {f"{t}_{c}" for t in TRANSFORMERS for c in TRANSFORMER_CHILDREN}
EXPECTED_TE = {f"lora_te_text_model_encoder_layers_{i}_{c}" for i in range(3) for c in TE_CHILDREN}

# LoCon additions (conv_dim=4, conv_alpha=1): name -> (down shape, up shape, alpha)
LOCON = {
    "lora_unet_down_blocks_0_resnets_0_conv1": ((4, 32, 3, 3), (32, 4, 1, 1), 1.0),
    "lora_unet_down_blocks_0_resnets_0_conv2": ((4, 32, 3, 3), (32, 4, 1, 1), 1.0),
    "lora_unet_down_blocks_0_resnets_0_time_emb_proj": ((4, 128), (32, 4), 2.0),
    "lora_unet_down_blocks_0_downsamplers_0_conv": ((4, 32, 3, 3), (32, 4, 1, 1), 1.0),
    "lora_unet_down_blocks_1_resnets_0_conv1": ((4, 32, 3, 3), (64, 4, 1, 1), 1.0),
    "lora_unet_down_blocks_1_resnets_0_conv2": ((4, 64, 3, 3), (64, 4, 1, 1), 1.0),
    "lora_unet_down_blocks_1_resnets_0_time_emb_proj": ((4, 128), (64, 4), 2.0),
    "lora_unet_down_blocks_1_resnets_0_conv_shortcut": ((4, 32, 1, 1), (64, 4, 1, 1), 2.0),
    "lora_unet_mid_block_resnets_0_conv1": ((4, 64, 3, 3), (64, 4, 1, 1), 1.0),
    "lora_unet_mid_block_resnets_0_conv2": ((4, 64, 3, 3), (64, 4, 1, 1), 1.0),
    "lora_unet_mid_block_resnets_0_time_emb_proj": ((4, 128), (64, 4), 2.0),
    "lora_unet_mid_block_resnets_1_conv1": ((4, 64, 3, 3), (64, 4, 1, 1), 1.0),
    "lora_unet_mid_block_resnets_1_conv2": ((4, 64, 3, 3), (64, 4, 1, 1), 1.0),
    "lora_unet_mid_block_resnets_1_time_emb_proj": ((4, 128), (64, 4), 2.0),
    "lora_unet_up_blocks_0_resnets_0_conv1": ((4, 128, 3, 3), (64, 4, 1, 1), 1.0),
    "lora_unet_up_blocks_0_resnets_0_conv2": ((4, 64, 3, 3), (64, 4, 1, 1), 1.0),
    "lora_unet_up_blocks_0_resnets_0_time_emb_proj": ((4, 128), (64, 4), 2.0),
    "lora_unet_up_blocks_0_resnets_0_conv_shortcut": ((4, 128, 1, 1), (64, 4, 1, 1), 2.0),
    "lora_unet_up_blocks_0_resnets_1_conv1": ((4, 96, 3, 3), (64, 4, 1, 1), 1.0),
    "lora_unet_up_blocks_0_resnets_1_conv2": ((4, 64, 3, 3), (64, 4, 1, 1), 1.0),
    "lora_unet_up_blocks_0_resnets_1_time_emb_proj": ((4, 128), (64, 4), 2.0),
    "lora_unet_up_blocks_0_resnets_1_conv_shortcut": ((4, 96, 1, 1), (64, 4, 1, 1), 2.0),
    "lora_unet_up_blocks_0_upsamplers_0_conv": ((4, 64, 3, 3), (64, 4, 1, 1), 1.0),
    "lora_unet_up_blocks_1_resnets_0_conv1": ((4, 96, 3, 3), (32, 4, 1, 1), 1.0),
    "lora_unet_up_blocks_1_resnets_0_conv2": ((4, 32, 3, 3), (32, 4, 1, 1), 1.0),
    "lora_unet_up_blocks_1_resnets_0_time_emb_proj": ((4, 128), (32, 4), 2.0),
    "lora_unet_up_blocks_1_resnets_0_conv_shortcut": ((4, 96, 1, 1), (32, 4, 1, 1), 2.0),
    "lora_unet_up_blocks_1_resnets_1_conv1": ((4, 64, 3, 3), (32, 4, 1, 1), 1.0),
    "lora_unet_up_blocks_1_resnets_1_conv2": ((4, 32, 3, 3), (32, 4, 1, 1), 1.0),
    "lora_unet_up_blocks_1_resnets_1_time_emb_proj": ((4, 128), (32, 4), 2.0),
    "lora_unet_up_blocks_1_resnets_1_conv_shortcut": ((4, 64, 1, 1), (32, 4, 1, 1), 2.0),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    return build_tiny_sd("sd1", tokenizer_dir=tmp_path_factory.mktemp("tok"))


def _net(tiny, **kwargs) -> LoRANetwork:
    return create_network(1.0, 4, 2.0, tiny.vae, tiny.text_encoder, tiny.unet, **kwargs)


def _randomize(network: nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def _unet_inputs(seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(2, 4, 8, 8, generator=gen),
        torch.tensor([10, 700]),
        torch.randn(2, 77, 64, generator=gen),
    )


def _unet_out(unet: nn.Module) -> torch.Tensor:
    x, t, ehs = _unet_inputs()
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=ehs).sample


def test_exact_kohya_names_and_shapes(tiny):
    net = _net(tiny)
    assert len(net.text_encoder_loras) == 18 and len(net.unet_loras) == 48
    assert {lo.lora_name for lo in net.text_encoder_loras} == EXPECTED_TE
    assert {lo.lora_name for lo in net.unet_loras} == EXPECTED_UNET
    keys = set(net.state_dict())
    suffixes = ("lora_down.weight", "lora_up.weight", "alpha")
    assert keys == {f"{n}.{s}" for n in EXPECTED_TE | EXPECTED_UNET for s in suffixes}
    sd = net.state_dict()
    assert sd["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].shape == (4, 32, 1, 1)
    assert sd["lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight"].shape == (32, 4, 1, 1)
    mid, up = "lora_unet_mid_block_attentions_0", "lora_unet_up_blocks_1_attentions_0"
    assert sd[f"{mid}_transformer_blocks_0_ff_net_0_proj.lora_up.weight"].shape == (512, 4)
    assert sd[f"{up}_transformer_blocks_0_attn2_to_k.lora_down.weight"].shape == (4, 64)
    assert sd["lora_te_text_model_encoder_layers_2_mlp_fc2.lora_down.weight"].shape == (4, 256)
    alpha = sd["lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha"]
    assert alpha.dim() == 0 and alpha.dtype == torch.float32 and float(alpha) == 2.0
    assert net.unet_loras[0].scale == 0.5


def test_locon_names_shapes_and_alphas(tiny):
    net = _net(tiny, conv_dim="4", conv_alpha="1")
    unet_names = {lo.lora_name for lo in net.unet_loras}
    assert unet_names == EXPECTED_UNET | set(LOCON)
    sd = net.state_dict()
    for name, (down, up, alpha) in LOCON.items():
        assert tuple(sd[f"{name}.lora_down.weight"].shape) == down, name
        assert tuple(sd[f"{name}.lora_up.weight"].shape) == up, name
        assert float(sd[f"{name}.alpha"]) == alpha, name
    conv1 = dict(net.named_children())["lora_unet_down_blocks_0_downsamplers_0_conv"].lora_down
    assert conv1.stride == (2, 2) and conv1.padding == (1, 1)
    # conv_dim without conv_alpha: kohya's default conv alpha 1.0
    assert float(_net(tiny, conv_dim="8").state_dict()["lora_unet_mid_block_resnets_0_conv1.alpha"]) == 1.0


def test_zero_init_remove_and_multiplier(tiny):
    base = _unet_out(tiny.unet)
    net = _net(tiny, conv_dim="4")
    net.apply_to([tiny.text_encoder], tiny.unet, True, True)
    try:
        assert torch.equal(_unet_out(tiny.unet), base)  # lora_up starts at zero
        _randomize(net)
        changed = _unet_out(tiny.unet)
        assert (changed - base).abs().max() > 1e-3
        net.set_multiplier(0.0)
        assert torch.equal(_unet_out(tiny.unet), base)
        net.set_multiplier(1.0)
        assert torch.equal(_unet_out(tiny.unet), changed)
    finally:
        net.remove()
    assert torch.equal(_unet_out(tiny.unet), base)


def test_apply_to_drops_parts_not_trained(tiny):
    net = _net(tiny)
    net.apply_to([tiny.text_encoder], tiny.unet, apply_text_encoder=False, apply_unet=True)
    try:
        assert net.text_encoder_loras == []
        assert all(k.startswith("lora_unet_") for k in net.state_dict())
    finally:
        net.remove()


def test_half_base_autocast_no_grad_and_gradients():
    torch.manual_seed(0)
    cases = [
        (nn.Linear(8, 6), torch.randn(2, 3, 8)),
        (nn.Conv2d(4, 6, 3, padding=1), torch.randn(2, 4, 5, 5)),
    ]
    for base, x in cases:
        lora = LoRAModule("m", base, lora_dim=2, alpha=1.0)
        _randomize(lora)
        with torch.no_grad():
            plain = base(x)
            expected = plain + lora.delta(x)
        lora.apply_to()
        with torch.no_grad():
            assert torch.allclose(base(x), expected, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = base(x)
        assert out.dtype == torch.bfloat16 and torch.allclose(out.float(), expected, atol=5e-2)
        base.requires_grad_(False)
        base(x).sum().backward()
        assert lora.lora_up.weight.grad is not None and lora.lora_down.weight.grad is not None
        lora.remove()
        with torch.no_grad():
            assert torch.equal(base(x), plain)
        # fp16 base, fp32 LoRA: the LoRA sees the input in fp32 and its result is cast back to fp16
        half = copy.deepcopy(base).half()
        half_lora = LoRAModule("m", half, lora_dim=2, alpha=1.0)
        half_lora.load_state_dict(lora.state_dict())
        half_lora.apply_to()
        with torch.no_grad():
            out = half(x.half())
        assert out.dtype == torch.float16 and half_lora.lora_up.weight.dtype == torch.float32
        assert torch.allclose(out.float(), expected, atol=2e-2)


def test_dropout_only_in_train_mode():
    torch.manual_seed(0)
    base = nn.Linear(16, 16)
    lora = LoRAModule("m", base, lora_dim=8, dropout=0.5, rank_dropout=0.5, module_dropout=0.0)
    _randomize(lora)
    x = torch.randn(4, 3, 16)
    lora.eval()
    assert torch.equal(lora.delta(x), lora.delta(x))
    lora.train()
    assert not torch.equal(lora.delta(x), lora.delta(x))


def test_save_load_roundtrip_and_hashes(tiny, tmp_path: Path):
    net = _net(tiny, conv_dim="4", conv_alpha="1")
    _randomize(net)
    meta = {"ss_network_dim": "4", "ss_network_alpha": "2.0", "modelspec.title": "tiny"}
    path = tmp_path / "lora.safetensors"
    save_lora_file(path, net.state_dict_for_save(torch.float16), meta)
    sd, loaded_meta = load_lora_file(path)
    assert set(sd) == set(net.state_dict())
    assert all(v.dtype == torch.float16 for v in sd.values())  # alpha too, as kohya
    assert sd["lora_unet_mid_block_resnets_0_conv1.alpha"].dim() == 0
    assert {k: loaded_meta[k] for k in meta} == meta
    # kohya: hash a serialization carrying only ss_* metadata
    reference = safetensors.torch.save(sd, {k: v for k, v in meta.items() if k.startswith("ss_")})
    n = int.from_bytes(reference[:8], "little")
    assert loaded_meta["sshs_model_hash"] == hashlib.sha256(reference[8 + n :]).hexdigest()
    assert loaded_meta["sshs_legacy_hash"] == hashlib.sha256(reference[0x100000:0x110000]).hexdigest()[:8]
    with safe_open(str(path), "pt") as f:  # the real reader accepts the rebuilt header
        assert set(f.keys()) == set(sd)

    fresh = _net(tiny, conv_dim="4", conv_alpha="1")
    assert fresh.load_weights(path) == ([], [])
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, net.state_dict()[k].half().float()), k
    assert fresh.unet_loras[0].scale == 0.5

    ckpt = tmp_path / "lora.ckpt"
    save_lora_file(ckpt, net.state_dict_for_save(), {"ss_x": "1"}, model_format="ckpt")
    sd2, meta2 = load_lora_file(ckpt)
    assert meta2 == {} and all(torch.equal(sd2[k], v) for k, v in net.state_dict().items())


def test_network_from_weights(tiny, tmp_path: Path):
    source = _net(tiny, conv_dim="8", conv_alpha="3")
    _randomize(source)
    state = source.state_dict_for_save()
    state.pop("lora_te_text_model_encoder_layers_0_mlp_fc1.alpha")  # absent alpha means alpha = rank
    path = tmp_path / "w.safetensors"
    save_lora_file(path, state, {})
    net, weights = create_network_from_weights(1.0, str(path), tiny.vae, tiny.text_encoder, tiny.unet)
    assert set(net.state_dict()) == set(source.state_dict())
    ranks = {lo.lora_name: (lo.lora_dim, float(lo.alpha)) for lo in net.all_loras}
    assert ranks["lora_unet_mid_block_resnets_0_conv1"] == (8, 3.0)
    assert ranks["lora_unet_mid_block_resnets_0_time_emb_proj"] == (4, 2.0)
    assert ranks["lora_te_text_model_encoder_layers_0_mlp_fc1"] == (4, 4.0)
    net.load_weights(weights)
    assert torch.equal(
        net.state_dict()["lora_unet_up_blocks_0_upsamplers_0_conv.lora_down.weight"],
        source.state_dict()["lora_unet_up_blocks_0_upsamplers_0_conv.lora_down.weight"],
    )
    bad = {"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(4, 8)}
    with pytest.raises(UserError, match="match nothing in this model.*lora_unet_input_blocks_4_1_proj_in"):
        create_network_from_weights(1.0, None, None, tiny.text_encoder, tiny.unet, weights_sd=bad)


def test_load_mismatch_names_file_counts_and_an_example(tiny, tmp_path: Path):
    path = tmp_path / "plain.safetensors"
    save_lora_file(path, _net(tiny).state_dict_for_save(), {})
    with pytest.raises(UserError) as err:
        _net(tiny, conv_dim="4").load_weights(path)
    text = str(err.value)
    assert f"--network_weights {path}" in text and "93 missing" in text
    assert "e.g. missing: lora_unet_down_blocks_0_downsamplers_0_conv.alpha)" in text and "\n" not in text
    bigger = create_network(1.0, 8, 2.0, None, tiny.text_encoder, tiny.unet)
    with pytest.raises(
        UserError, match=r"132 wrong shape; e.g. wrong shape: \S+: file \[4, 64\] vs network \[8, 64\]\)"
    ):
        bigger.load_weights(path)
    unet_only = _net(tiny)
    unet_only.apply_to([tiny.text_encoder], tiny.unet, apply_text_encoder=False)
    unet_only.remove()
    with pytest.raises(UserError, match=r"54 unexpected, 0 wrong shape; e.g. unexpected: lora_te_text_model"):
        unet_only.load_weights(path)
    missing, unexpected = unet_only.load_weights(path, strict=False)
    assert missing == [] and len(unexpected) == 54


def test_network_args_errors(tiny):
    assert parse_network_args(["conv_dim=4", " conv_alpha = 1 ", "loraplus_lr_ratio=16"]) == {
        "conv_dim": "4",
        "conv_alpha": "1",
        "loraplus_lr_ratio": "16",
    }
    with pytest.raises(UserError) as err:
        parse_network_args(["conv_dims=4", "conv_dim", "conv_alpha=x", "ggpo_sigma=1", "rank_dropout=1.5"])
    problems = err.value.problems
    assert len(problems) == 5
    assert (
        'conv_dims: unknown for networks.lora (did you mean "conv_dim"?); accepted: conv_dim, conv_alpha'
        in problems[0]
    )
    assert "expected key=value" in problems[1]
    assert "conv_alpha=x: must be a number >= 0" in problems[2]
    assert "ggpo_sigma: a kohya lora.py option this suite does not support yet" in problems[3]
    assert "rank_dropout=1.5: must be a number in [0, 1)" in problems[4]
    with pytest.raises(UserError, match='did you mean "loraplus_lr_ratio"'):
        _net(tiny, loraplus_lr_ratoi="4")
    assert set(lora_module.NETWORK_ARGS) >= {"conv_dim", "conv_alpha", "loraplus_lr_ratio", "dropout"}
    assert _net(tiny, dropout=None).unet_loras[0].dropout is None  # kohya trainers inject dropout=None


def test_param_groups_and_loraplus(tiny):
    net = _net(tiny, loraplus_lr_ratio="16", loraplus_unet_lr_ratio="4")
    groups, names = net.prepare_optimizer_params(1e-5, 1e-4, 1e-3)
    assert names == ["textencoder", "textencoder plus", "unet", "unet plus"]
    assert [g["lr"] for g in groups] == pytest.approx([1e-5, 1.6e-4, 1e-4, 4e-4])
    ups = {id(lo.lora_up.weight) for lo in net.unet_loras}
    assert {id(p) for p in groups[3]["params"]} == ups and len(groups[2]["params"]) == 48
    assert sum(len(g["params"]) for g in groups) == len(net.trainable_parameters()) == 2 * 66

    plain = _net(tiny)
    groups, names = plain.prepare_optimizer_params(0.0, None, 1e-3)
    assert names == ["unet"] and groups[0]["lr"] == 1e-3
    assert not any(p.requires_grad for lo in plain.text_encoder_loras for p in lo.parameters())


def test_max_norm_regularization(tiny):
    net = _net(tiny)
    _randomize(net)
    with torch.no_grad():
        before = max(float(lo.delta_weight().norm()) for lo in net.all_loras)
        scaled, mean, top = net.apply_max_norm_regularization(before / 2)
        assert scaled > 0 and top <= before / 2 + 1e-5 and 0 < mean <= top
        assert max(float(lo.delta_weight().norm()) for lo in net.all_loras) <= before / 2 + 1e-5


def test_file_errors_and_atomic_write(tmp_path: Path):
    with pytest.raises(UserError, match=r"--network_weights .*nope.safetensors: file not found"):
        load_lora_file(tmp_path / "nope.safetensors", flag="--network_weights")
    corrupt = tmp_path / "bad.safetensors"
    header = json.dumps({"a": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}).encode()
    corrupt.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 10)  # truncated payload
    with pytest.raises(UserError, match="bad.safetensors: cannot read the file"):
        load_lora_file(corrupt)
    (tmp_path / "junk.pt").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="junk.pt: cannot read the file"):
        load_lora_file(tmp_path / "junk.pt")

    target = tmp_path / "keep.safetensors"
    target.write_bytes(b"old")

    def crash(f) -> None:
        f.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, crash)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []


def test_table_selection_rejects_unknown_denoiser(tiny):
    with pytest.raises(UserError, match="no LoRA target table for a Linear"):
        select_table(nn.Linear(2, 2), [tiny.text_encoder])


def test_delta_weight_matches_forward():
    torch.manual_seed(0)
    for base, x in [
        (nn.Linear(8, 6), torch.randn(3, 8)),
        (nn.Conv2d(4, 6, 1), torch.randn(2, 4, 5, 5)),
        (nn.Conv2d(4, 6, 3, stride=2, padding=1), torch.randn(2, 4, 5, 5)),
    ]:
        lora = LoRAModule("m", base, lora_dim=3, alpha=1.5)
        _randomize(lora)
        with torch.no_grad():
            w = lora.delta_weight()
            if isinstance(base, nn.Linear):
                direct = x @ w.T
            else:
                direct = nn.functional.conv2d(x, w, stride=base.stride, padding=base.padding)
            assert torch.allclose(lora.delta(x), direct, atol=1e-5)
