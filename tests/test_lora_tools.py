"""tools/check_lora.py, tools/show_metadata.py and SD/SDXL conversion in tools/convert_lora.py, on tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pipeline_helpers import load_into_pipeline

from library.families.tiny import build_tiny_sd
from library.families.tiny_flux import build_tiny_flux
from library.families.tiny_sdxl import build_tiny_sdxl, save_diffusers_folder
from networks.lora import create_network
from networks.lora_file import load_lora_file, save_lora_file
from networks.ops.family_tables import detect_family, family_targets
from networks.ops.lora_math import delta, split_modules
from networks.ops.lora_report import check_state, format_metadata
from networks.sd_convert import diffusers_to_kohya, kohya_to_diffusers
from tools import check_lora, convert_lora, show_metadata


def _randomize(network, seed: int = 5):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # non-zero up AND down, so every module has a delta
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return network


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("lora_tools")
    return {
        "sd1": build_tiny_sd("sd1", tokenizer_dir=root / "sd1"),
        "sd2": build_tiny_sd("sd2", tokenizer_dir=root / "sd2"),
        "sdxl": build_tiny_sdxl(tokenizer_dir=root / "sdxl"),
        "flux": build_tiny_flux(tokenizer_dir=root / "flux"),
    }


def network_state(models, family: str, alpha: float = 2.0, **args: str) -> dict[str, torch.Tensor]:
    m = models[family]
    if family == "flux":
        tes, unet = [m.clip_l, m.t5], m.transformer
        args = {"train_t5xxl": "True", **args}
    else:
        tes = [m.text_encoder, m.text_encoder_2] if family == "sdxl" else [m.text_encoder]
        unet = m.unet
    network = _randomize(create_network(1.0, 4, alpha, None, tes, unet, **args))
    return network.state_dict_for_save(torch.float32)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl", "flux"])
def test_check_identifies_tiny_loras(models, family):
    extra = {} if family == "flux" else {"conv_dim": "2", "conv_alpha": "1"}
    state = network_state(models, family, **extra)
    report = check_state(state, {})
    assert (report.family, report.table_size, report.problems) == (family, "tiny", [])
    assert len(report.modules) == len({k.split(".")[0] for k in state})
    assert {i.rank for i in report.modules} == ({4} if family == "flux" else {2, 4})
    name = next(iter(state)).split(".")[0]
    info = next(i for i in report.modules if i.name == name)
    pair = split_modules(state)[0][name]
    assert info.delta_norm == pytest.approx(float(torch.linalg.vector_norm(delta(pair))), rel=1e-5)


def test_check_flags_bogus_keys_and_shapes(models, tmp_path: Path, capsys):
    state = network_state(models, "sdxl")
    state["lora_unet_input_blocks_4_1_bogus_to_q.lora_down.weight"] = torch.ones(4, 8)
    state["lora_unet_input_blocks_4_1_bogus_to_q.lora_up.weight"] = torch.ones(8, 4)
    state["lora_te1_text_model_encoder_layers_0_mlp_fc1.dora_scale"] = torch.ones(1, 64)
    q = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"
    state[f"{q}.lora_down.weight"] = torch.ones(4, 7)  # CLIP-G tiny width is 128
    path = tmp_path / "bad.safetensors"
    save_lora_file(
        path, state, {"ss_base_model_version": "sdxl_base_v1-0", "ss_network_module": "networks.lora"}
    )
    assert check_lora.main([str(path), "--summary"]) == 1
    out = capsys.readouterr().out
    assert "family: SDXL (checked on the tiny model)" in out
    assert "made by: kohya-style trainer (ss_* metadata, network module networks.lora)" in out
    assert "problems: 3" in out
    assert (
        "  lora_unet_input_blocks_4_1_bogus_to_q: no SDXL module of that name; loaders ignore or reject it"
        in out
    )
    assert ".dora_scale: unknown suffix .dora_scale (DoRA magnitude; no loader here reads it)" in out
    assert f"  {q}: down [4, 7] / up [128, 4] do not fit the model's 128 -> 128 module" in out


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl", "flux"])
def test_real_size_names_and_shapes(family):
    targets = [t for t in family_targets(family, "real") if t.kind == "linear"][::40]
    state = {}
    for t in targets:
        out = sum(p.out_features for p in t.parts) if t.parts else t.module.out_features
        state[f"{t.name}.lora_down.weight"] = torch.ones(1, t.module.in_features)
        state[f"{t.name}.lora_up.weight"] = torch.ones(out, 1)
    report = check_state(state, {})
    assert (report.family, report.table_size, report.problems) == (family, "real", [])


def test_family_from_metadata_and_conflicts():
    te1_only = {"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.ones(1, 768)}
    assert detect_family(te1_only, {"ss_base_model_version": "flux1"}) == ("flux", [])
    assert detect_family(te1_only, {}) == ("sdxl", [])
    sd = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.ones(1, 320, 1, 1)}
    assert detect_family(sd, {"modelspec.architecture": "stable-diffusion-v1/lora"}) == ("sd1", [])
    family, notes = detect_family(sd, {"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"})
    assert family == "sd1" and notes == ["metadata says sdxl but the keys are sd1's; the keys win"]
    assert detect_family({}, {"ss_v2": "True"}) == ("sd2", [])


def test_makers_from_metadata(models):
    state = network_state(models, "sd1")
    meta = {
        "ss_network_module": "networks.lora",
        "modelspec.implementation_version": "loratrain/0.1.0",
        "ss_training_comment": "dimension is resized from 8 to 4; ",
    }
    report = check_state(state, meta)
    assert report.makers == [
        "trained by loratrain (loratrain/0.1.0)",
        "resized: dimension is resized from 8 to 4",
    ]
    assert check_state(state, {}).makers == ["no trainer metadata; kohya (lora_down/lora_up/alpha) layout"]


def _deltas(state):
    return {n: delta(p) for n, p in split_modules(state)[0].items()}


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_convert_round_trip(models, family):
    exact = network_state(models, family, alpha=4.0)  # alpha = rank: the same tensors back
    peft = kohya_to_diffusers(exact, family)
    assert (
        all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in peft) and len(peft) == len(exact) * 2 // 3
    )
    back = diffusers_to_kohya(peft, family)
    assert back.keys() == exact.keys()
    assert all(torch.equal(back[k], exact[k]) for k in exact)
    scaled = network_state(models, family, alpha=1.0, conv_dim="2", conv_alpha="0.5")
    back = diffusers_to_kohya(kohya_to_diffusers(scaled, family), family)
    assert back.keys() == scaled.keys()
    before, after = _deltas(scaled), _deltas(back)
    assert all((after[n] - before[n]).abs().max() < 1e-6 for n in before)
    assert check_state(kohya_to_diffusers(scaled, family), {}).problems == []


def test_converted_sdxl_file_loads_in_diffusers(models, tmp_path: Path, capsys):
    from peft.tuners.tuners_utils import BaseTunerLayer

    diffusers = pytest.importorskip("diffusers")
    model = models["sdxl"]
    state = network_state(models, "sdxl", alpha=1.0, conv_dim="2", conv_alpha="1")
    source, dest = tmp_path / "k.safetensors", tmp_path / "d.safetensors"
    save_lora_file(source, state, {"ss_network_dim": "4"})
    assert convert_lora.main([str(source), str(dest)]) == 0
    assert convert_lora.main([str(source), str(dest)]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    converted, meta = load_lora_file(dest)
    assert meta["ss_network_dim"] == "4" and next(iter(converted)).startswith("text_encoder.text_model.")

    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(
        str(save_diffusers_folder(model, tmp_path / "m"))
    )
    assert load_into_pipeline(pipe, dest) == []
    n_unet = sum(k.startswith("lora_unet_") for k in state) // 3
    assert sum(isinstance(m, BaseTunerLayer) for m in pipe.unet.modules()) == n_unet
    # diffusers' UNet with its PEFT layers computes base + Σ ΔW, the kohya file's deltas
    gen = torch.Generator().manual_seed(1)
    x, context = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 77, 192, generator=gen)
    added = {
        "text_embeds": torch.randn(1, 96, generator=gen),
        "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]]),
    }
    network = create_network(
        1.0, 4, 1.0, None, [model.text_encoder, model.text_encoder_2], model.unet, conv_dim="2"
    )
    network.load_state_dict(state)
    with torch.no_grad():
        network.apply_to([model.text_encoder, model.text_encoder_2], model.unet, True, True)
        try:
            ours = model.unet(
                x, torch.tensor([500]), encoder_hidden_states=context, added_cond_kwargs=added
            ).sample
        finally:
            network.remove()
        theirs = pipe.unet(
            x, torch.tensor([500]), encoder_hidden_states=context, added_cond_kwargs=added
        ).sample
    assert (ours - theirs).abs().max() < 1e-4


def test_show_metadata(tmp_path: Path, capsys):
    path = tmp_path / "m.safetensors"
    meta = {"ss_network_args": json.dumps({"conv_dim": "4"}), "ss_network_dim": "4", "modelspec.title": "t"}
    save_lora_file(path, {"a.lora_down.weight": torch.ones(1, 2)}, meta)
    assert show_metadata.main(["--model", str(path)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["ss_network_args"] == {"conv_dim": "4"} and shown["ss_network_dim"] == "4"
    assert set(shown) == {*meta, "sshs_model_hash", "sshs_legacy_hash"}
    assert (
        format_metadata({"x": "[1, 2]", "y": "3"})
        == '{\n    "x": [\n        1,\n        2\n    ],\n    "y": "3"\n}'
    )
    bare = tmp_path / "bare.safetensors"
    save_lora_file(bare, {"a.lora_down.weight": torch.ones(1, 2)}, {})
    assert show_metadata.main(["--model", str(bare)]) == 0  # the sshs hashes are always there
    assert show_metadata.main(["--model", str(tmp_path / "none.safetensors")]) == 2
    assert "file not found" in capsys.readouterr().err
