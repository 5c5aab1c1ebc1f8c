"""networks.dylora, networks.lora_fa, --dim_from_weights, --base_weights and third-party modules (LyCORIS)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from library.errors import UserError
from library.families.tiny import build_tiny_sd
from networks import dylora, lora_fa
from networks.base_weights import merge_base_weights
from networks.lora import create_network
from networks.lora_args import parse_network_args
from networks.lora_file import save_lora_file
from networks.lora_flux import parse_network_args as parse_flux_args
from tests.train_helpers import db_args, error_lines, make_images, run_main


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_sd("sd1", seed=3)


def _unet_loss(unet: torch.nn.Module) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=gen)
    context = torch.randn(2, 5, unet.config.cross_attention_dim, generator=gen)
    return unet(sample, torch.tensor([10, 500]), context).sample.square().mean()


def _step(network, unet: torch.nn.Module, lr: float = 0.1) -> None:
    groups, _ = network.prepare_optimizer_params(None, None, lr)
    optimizer = torch.optim.SGD(groups, lr=lr)
    network.train()
    optimizer.zero_grad(set_to_none=True)
    _unet_loss(unet).backward()
    optimizer.step()


def _snapshot(network) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in network.state_dict().items()}


def test_dylora_saves_plain_lora_keys_and_trains_one_unit(tiny):
    network = dylora.create_network(1.0, 4, 2.0, None, tiny.text_encoder, tiny.unet, unit="2")
    plain = create_network(1.0, 4, 2.0, None, tiny.text_encoder, tiny.unet)
    own = network.state_dict()
    assert {k: v.shape for k, v in own.items()} == {k: v.shape for k, v in plain.state_dict().items()}
    network.apply_to(tiny.text_encoder, tiny.unet, False, True)
    with torch.no_grad():  # non-zero ups so that downs get gradients too
        for lora in network.unet_loras:
            for chunk in lora.lora_up.chunks:
                chunk.normal_(std=0.01)
    before = _snapshot(network)
    torch.manual_seed(5)
    _step(network, tiny.unet)
    network.remove()
    after = network.state_dict()
    for lora in network.unet_loras:
        down = (
            after[f"{lora.lora_name}.lora_down.weight"] != before[f"{lora.lora_name}.lora_down.weight"]
        ).flatten(1)
        up = (
            after[f"{lora.lora_name}.lora_up.weight"] != before[f"{lora.lora_name}.lora_up.weight"]
        ).transpose(0, 1)
        changed_down = [bool(down[i : i + 2].any()) for i in (0, 2)]
        changed_up = [bool(up.flatten(1)[i : i + 2].any()) for i in (0, 2)]
        assert changed_up in ([True, False], [False, True]), lora.lora_name  # exactly one unit learned
        assert changed_down == changed_up, lora.lora_name


def test_dylora_eval_is_the_plain_lora_of_its_file(tiny):
    network = dylora.create_network(1.0, 4, 2.0, None, None, tiny.unet, unit="1")
    with torch.no_grad():
        for lora in network.unet_loras:
            for chunk in lora.lora_up.chunks:
                chunk.normal_(std=0.05)
    state = network.state_dict()
    plain = create_network(1.0, 4, 2.0, None, None, tiny.unet)
    plain.load_weights(state)
    with torch.no_grad():
        base = _unet_loss(tiny.unet)
        network.apply_to(None, tiny.unet)
        network.eval()
        with_dy = _unet_loss(tiny.unet)
        network.remove()
        plain.apply_to(None, tiny.unet)
        with_plain = _unet_loss(tiny.unet)
        plain.remove()
    assert not torch.equal(base, with_dy)
    torch.testing.assert_close(with_dy, with_plain, rtol=1e-5, atol=1e-7)
    # and a DyLoRA network continues the file exactly
    again = dylora.create_network(1.0, 4, 2.0, None, None, tiny.unet, unit="1")
    again.load_weights(state)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in state.items())


def test_lora_fa_trains_only_up(tiny):
    network = lora_fa.create_network(1.0, 4, 1.0, None, tiny.text_encoder, tiny.unet, conv_dim="2")
    network.apply_to(tiny.text_encoder, tiny.unet, True, True)
    groups, names = network.prepare_optimizer_params(None, None, 0.1)
    assert names == ["textencoder", "unet"]
    trained = {id(p) for g in groups for p in g["params"]}
    assert trained == {id(p) for lo in network.all_loras for p in lo.lora_up.parameters()}
    # kohya's LoRA-FA init: normal with std sqrt(2 / (in + rank)); a 4 x 320 down estimates it within 10%
    down = next(lo.lora_down.weight for lo in network.unet_loras if lo.lora_down.weight.shape[1] >= 256)
    assert down.std().item() == pytest.approx((2 / (down.shape[1] + 4)) ** 0.5, rel=0.1)
    before = _snapshot(network)
    for _ in range(2):  # the second step moves downs if anything would
        _step(network, tiny.unet)
    network.remove()
    after = network.state_dict()
    for key, value in after.items():
        if ".lora_down." in key or key.endswith(".alpha"):
            assert torch.equal(value, before[key]), key
    assert any(
        not torch.equal(after[k], before[k]) for k in after if k.startswith("lora_unet") and "lora_up" in k
    )


def test_unknown_args_list_the_accepted_ones():
    with pytest.raises(UserError) as err:
        dylora.parse_network_args(["unit=2", "conv_dimm=4"])
    (line,) = err.value.problems
    assert line.startswith('--network_args conv_dimm: unknown for networks.dylora (did you mean "conv_dim"?)')
    assert line.endswith(
        "accepted: unit, conv_dim, conv_alpha, loraplus_lr_ratio, loraplus_unet_lr_ratio, "
        "loraplus_text_encoder_lr_ratio"
    )
    for parse, module in (
        (lora_fa.parse_network_args, "networks.lora_fa"),
        (parse_network_args, "networks.lora"),
    ):
        with pytest.raises(UserError) as err:
            parse(["blok_dims=1"])
        (line,) = err.value.problems
        assert line.startswith(f'--network_args blok_dims: unknown for {module} (did you mean "block_dims"?)')
        assert "accepted: conv_dim, conv_alpha," in line and "block_lr_zero_threshold" in line
    with pytest.raises(UserError) as err:
        parse_flux_args(["nope=1"])
    assert (
        "accepted: conv_dim" in err.value.problems[0] and "FLUX.1 also: train_blocks" in err.value.problems[0]
    )
    with pytest.raises(UserError) as err:
        dylora.parse_network_args(["unit=0", "block_dims=4"])
    assert err.value.problems[0] == "--network_args unit=0: unit must be an integer >= 1"
    assert err.value.problems[1].startswith("--network_args block_dims: unknown for networks.dylora")
    assert dylora.network_problems(6, None, ["unit=4"]) == [
        "--network_args unit=4: --network_dim 6 must be a multiple of unit"
    ]
    assert dylora.family_problems([], "flux")[0].startswith(
        "--network_module networks.dylora: DyLoRA trains SD"
    )


def _random_lora_file(tiny, path: Path, rank: int = 2, conv: int = 3) -> dict[str, torch.Tensor]:
    network = create_network(
        1.0, rank, 1.5, None, tiny.text_encoder, tiny.unet, conv_dim=str(conv), conv_alpha="1"
    )
    gen = torch.Generator().manual_seed(11)
    state = {
        k: (v if k.endswith(".alpha") else torch.randn(v.shape, generator=gen) * 0.1)
        for k, v in network.state_dict().items()
    }
    state = {
        k: (v * 2 if k.startswith("lora_unet_mid") and k.endswith("alpha") else v) for k, v in state.items()
    }
    save_lora_file(path, state, {})
    return state


def test_base_weights_add_exactly_delta_w(tmp_path: Path):
    models = build_tiny_sd("sd1", seed=4)
    path = tmp_path / "base.safetensors"
    state = _random_lora_file(models, path)
    originals = {n: m.weight.detach().clone() for n, m in models.unet.named_modules() if hasattr(m, "weight")}
    te_fc1 = models.text_encoder.get_submodule("encoder.layers.0.mlp.fc1").weight.detach().clone()
    merge_base_weights([str(path)], [0.5], [models.text_encoder], models.unet)

    def delta(name: str) -> torch.Tensor:
        down, up = state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"]
        scale = float(state[f"{name}.alpha"]) / down.shape[0]
        if down.dim() == 2:
            return up @ down * scale * 0.5
        if down.shape[2:] == (1, 1):
            return (up[:, :, 0, 0] @ down[:, :, 0, 0])[:, :, None, None] * scale * 0.5
        # 3x3 down then 1x1 up: W[o, i, kh, kw] = sum_r up[o, r] down[r, i, kh, kw]
        return torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down) * scale * 0.5

    checks = {
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
        "down_blocks.0.attentions.0.proj_in": "lora_unet_down_blocks_0_attentions_0_proj_in",
        "mid_block.attentions.0.transformer_blocks.0.ff.net.2": "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2",
        "up_blocks.1.resnets.0.conv1": "lora_unet_up_blocks_1_resnets_0_conv1",
    }
    for path_in_unet, name in checks.items():
        now = models.unet.get_submodule(path_in_unet).weight.detach()
        torch.testing.assert_close(now - originals[path_in_unet], delta(name), rtol=1e-4, atol=1e-6)
    fc1 = models.text_encoder.get_submodule("encoder.layers.0.mlp.fc1").weight.detach()
    torch.testing.assert_close(
        fc1 - te_fc1, delta("lora_te_text_model_encoder_layers_0_mlp_fc1"), rtol=1e-4, atol=1e-6
    )
    untouched = "conv_in"
    assert torch.equal(models.unet.get_submodule(untouched).weight, originals[untouched])


def test_dim_from_weights_reproduces_the_file(tiny, tmp_path: Path):
    path = tmp_path / "mixed.safetensors"
    state = _random_lora_file(tiny, path)
    network, _ = create_network_from_file(tiny, path)
    assert {k: v.shape for k, v in network.state_dict().items()} == {k: v.shape for k, v in state.items()}


def create_network_from_file(tiny, path: Path):
    from networks.lora import create_network_from_weights

    return create_network_from_weights(1.0, str(path), None, tiny.text_encoder, tiny.unet)


def test_dim_from_weights_and_base_weights_end_to_end(tiny_sd1_dir: Path, tmp_path: Path):
    """--dim_from_weights keeps the file's ranks (--network_dim 16 is ignored); --base_weights merge first."""
    data = make_images(tmp_path, 2)
    first = db_args(
        tiny_sd1_dir, data, tmp_path / "a", "--max_train_steps", "1", "--network_args", "conv_dim=2"
    )
    assert run_main(first) == 0
    start = tmp_path / "a" / "feat.safetensors"
    shapes = {k: v.shape for k, v in load_file(str(start)).items()}
    assert {v[0] for k, v in shapes.items() if k.endswith("lora_down.weight")} == {4, 2}
    cont = db_args(
        tiny_sd1_dir,
        data,
        tmp_path / "b",
        "--max_train_steps",
        "1",
        "--network_dim",
        "16",
        "--network_weights",
        str(start),
        "--dim_from_weights",
        "--base_weights",
        str(start),
        "--base_weights_multiplier",
        "0.5",
    )
    assert run_main(cont) == 0
    assert {k: v.shape for k, v in load_file(str(tmp_path / "b" / "feat.safetensors")).items()} == shapes


def test_dylora_and_lora_fa_train_through_the_trainer(tiny_sd1_dir: Path, tmp_path: Path):
    data = make_images(tmp_path, 2)
    plain = db_args(
        tiny_sd1_dir, data, tmp_path / "a", "--max_train_steps", "1", "--network_args", "conv_dim=2"
    )
    assert run_main(plain) == 0
    start = load_file(str(tmp_path / "a" / "feat.safetensors"))
    dy = db_args(
        tiny_sd1_dir, data, tmp_path / "dy", "--max_train_steps", "2", "--network_module", "networks.dylora"
    )
    assert run_main([*dy, "--gradient_checkpointing", "--network_args", "unit=2"]) == 0
    saved = load_file(str(tmp_path / "dy" / "feat.safetensors"))
    names = {k.split(".")[0] for k in start}
    convs = {n for n in names if "_resnets_" in n or "samplers_" in n}  # LoCon classes
    assert {k.split(".")[0] for k in saved} == names - convs  # no LoCon without conv_dim
    assert {v.shape[0] for k, v in saved.items() if k.endswith("lora_down.weight")} == {4}
    fa = db_args(
        tiny_sd1_dir,
        data,
        tmp_path / "fa",
        "--max_train_steps",
        "2",
        "--network_module",
        "networks.lora_fa",
        "--network_weights",
        str(tmp_path / "a" / "feat.safetensors"),
        "--network_args",
        "conv_dim=2",
    )
    assert run_main(fa) == 0
    trained = load_file(str(tmp_path / "fa" / "feat.safetensors"))
    assert trained.keys() == start.keys()
    assert all(torch.equal(trained[k], start[k]) for k in start if ".lora_down." in k)  # frozen downs
    assert any(not torch.equal(trained[k], start[k]) for k in start if ".lora_up." in k)


def test_weight_flags_are_checked_before_loading(tiny_sd1_dir: Path, tmp_path: Path, capsys):
    data = make_images(tmp_path, 2)
    argv = db_args(
        tiny_sd1_dir,
        data,
        tmp_path / "out",
        "--dim_from_weights",
        "--base_weights",
        str(tmp_path / "missing.safetensors"),
        "--base_weights_multiplier",
        "0.5",
        "1",
        "--network_module",
        "networks.dylora",
        "--network_args",
        "unit=3",
    )
    assert run_main(argv) == 2
    assert error_lines(capsys) == [
        "error: --network_args unit=3: --network_dim 4 must be a multiple of unit",
        "error: --dim_from_weights: needs --network_weights FILE (the ranks and alphas come from it)",
        f"error: --base_weights: file {tmp_path / 'missing.safetensors'} does not exist; pass existing LoRA files",
        "error: --base_weights_multiplier: 2 value(s) for 1 --base_weights file(s); give one per file, or none for "
        "1.0 each",
    ]


def test_lycoris_loha_trains_one_step(tiny_sd1_dir: Path, tmp_path: Path):
    pytest.importorskip("lycoris")
    data = make_images(tmp_path, 2)
    # LyCORIS 4.1's default preset also targets TimestepEmbedding and time_embedding.linear_1 by name, which
    # collide on any SD UNet ("duplicated lora name"); attn-mlp is the usual preset for LoHa anyway.
    argv = db_args(
        tiny_sd1_dir, data, tmp_path / "out", "--max_train_steps", "1", "--network_module", "lycoris.kohya"
    )
    assert run_main([*argv, "--network_args", "algo=loha", "preset=attn-mlp"]) == 0
    saved = load_file(str(tmp_path / "out" / "feat.safetensors"))
    assert any(k.endswith(".hada_w1_a") for k in saved) and not any("lora_down" in k for k in saved)
    ups = [v for k, v in saved.items() if k.startswith("lora_unet") and k.endswith(".hada_w2_a")]
    assert ups and any(torch.count_nonzero(v) for v in ups)


def test_base_weights_slice_fused_flux_modules(tmp_path: Path):
    from library.families.tiny_flux import build_tiny_flux

    tiny = build_tiny_flux(0, tmp_path / "tok")
    encoders = [tiny.clip_l, tiny.t5]
    network = create_network(1.0, 2, 1.0, None, encoders, tiny.transformer)
    gen = torch.Generator().manual_seed(2)
    state = {
        k: v if k.endswith(".alpha") else torch.randn(v.shape, generator=gen)
        for k, v in network.state_dict().items()
    }
    path = tmp_path / "flux.safetensors"
    save_lora_file(path, state, {})
    block = tiny.transformer.single_transformer_blocks[0]
    parts = [block.attn.to_q, block.attn.to_k, block.attn.to_v, block.proj_mlp]
    before = [p.weight.detach().clone() for p in parts]
    merge_base_weights([str(path)], [2.0], encoders, tiny.transformer)
    name = "lora_unet_single_blocks_0_linear1"
    fused = state[f"{name}.lora_up.weight"] @ state[f"{name}.lora_down.weight"] * (1.0 / 2) * 2.0
    start = 0
    for part, old in zip(parts, before, strict=True):
        rows = part.weight.shape[0]
        torch.testing.assert_close(
            part.weight.detach() - old, fused[start : start + rows], rtol=1e-4, atol=1e-5
        )
        start += rows
    assert start == fused.shape[0]


@pytest.mark.parametrize("module", ["networks.dylora", "networks.lora_fa"])
def test_variants_train_sdxl(module: str, tiny_sdxl_dir: Path, tmp_path: Path):
    from tests.train_helpers import run_sdxl

    data = make_images(tmp_path, 2)
    argv = db_args(
        tiny_sdxl_dir, data, tmp_path / "out", "--max_train_steps", "1", "--network_module", module
    )
    assert run_sdxl([*argv, "--network_train_unet_only"]) == 0
    saved = load_file(str(tmp_path / "out" / "feat.safetensors"))
    downs = {k.split(".")[0]: v.shape[0] for k, v in saved.items() if k.endswith(".lora_down.weight")}
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in downs
    assert set(downs.values()) == {4} and all(name.startswith("lora_unet_") for name in downs)
    ups = [v for k, v in saved.items() if k.endswith(".lora_up.weight")]
    assert any(torch.count_nonzero(v) for v in ups)
