"""tools/merge_lora.py: LoRAs merged into tiny SD1 / SD2 / SDXL / FLUX checkpoints (single files and diffusers
folders) give the same outputs as the base model with the LoRAs applied at forward; LoRA+LoRA merges."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from networks.lora_file import load_lora_file, save_lora_file
from networks.ops.merge import Factors, factors_from_state
from networks.ops.st_stream import open_source, write_streaming
from tests.lora_ops_helpers import load_models, max_diff, outputs, outputs_with_loras, random_lora
from tools.merge_lora import main


def _check_merge(
    model: Path, out: Path, tmp_path: Path, locon: bool, extra: list[str] = (), **files: Path
) -> None:
    unet, tes = load_models(model, **files)
    args = {"conv_dim": "2", "conv_alpha": "1"} if locon else {}
    if type(unet).__name__ == "FluxTransformer2DModel" and len(tes) == 2:
        args["train_t5xxl"] = "True"
    a = random_lora(unet, tes, tmp_path / "a.safetensors", seed=1, **args)
    b = random_lora(unet, tes, tmp_path / "b.safetensors", seed=2, rank=2, alpha=1.0, **args)
    expected = outputs_with_loras(unet, tes, [(a, 0.7), (b, -0.5)])
    base = outputs(unet, tes)
    argv = [
        "--sd_model",
        str(model),
        "--save_to",
        str(out),
        "--models",
        str(a),
        str(b),
        "--ratios",
        "0.7",
        "-0.5",
    ]
    assert main(argv + list(extra)) == 0
    merged_files = {k: tmp_path / f"{k}_merged.safetensors" for k in files}
    merged = outputs(*load_models(out, **merged_files))
    assert max_diff(expected, base) > 1e-2  # the LoRAs change every output
    assert max_diff(merged, expected) < 1e-4


@pytest.mark.parametrize("locon", [False, True], ids=["lora", "locon"])
def test_sd1_single_file(tiny_sd1_single_file, tmp_path: Path, locon: bool):
    out = tmp_path / "merged.safetensors"
    _check_merge(tiny_sd1_single_file.checkpoint, out, tmp_path, locon)
    # same layout, same keys and dtypes, metadata kept
    src, dst = tiny_sd1_single_file.checkpoint, out
    with safe_open(str(src), "pt") as f, safe_open(str(dst), "pt") as g:
        assert list(f.keys()) == list(g.keys())
        assert g.metadata() == f.metadata()
        key = "first_stage_model.decoder.conv_in.weight"
        assert torch.equal(f.get_tensor(key), g.get_tensor(key))


def test_sd2_single_file_open_clip_slices(tiny_sd2_single_file, tmp_path: Path):
    """SD2's OpenCLIP fuses q/k/v into in_proj; its extra last block is left alone."""
    out = tmp_path / "merged.safetensors"
    _check_merge(tiny_sd2_single_file.checkpoint, out, tmp_path, locon=False)
    src, dst = load_file(str(tiny_sd2_single_file.checkpoint)), load_file(str(out))
    last = max(int(k.split(".")[4]) for k in src if ".resblocks." in k)
    extra = [k for k in src if f".resblocks.{last}." in k]
    assert extra and all(torch.equal(src[k], dst[k]) for k in extra)


@pytest.mark.parametrize("fixture", ["tiny_sd1_dir", "tiny_sdxl_dir"])
def test_diffusers_folder(request, fixture: str, tmp_path: Path):
    folder = request.getfixturevalue(fixture)
    out = tmp_path / "merged"
    _check_merge(folder, out, tmp_path, locon=True)
    vae = "vae/diffusion_pytorch_model.safetensors"
    assert (out / vae).read_bytes() == (folder / vae).read_bytes()
    assert (out / "model_index.json").read_text() == (folder / "model_index.json").read_text()
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == sorted(
        p.relative_to(folder) for p in folder.rglob("*")
    )


def test_sdxl_single_file_te2_in_proj(tiny_sdxl_single_file, tmp_path: Path):
    _check_merge(tiny_sdxl_single_file.checkpoint, tmp_path / "merged.safetensors", tmp_path, locon=True)


def test_flux_bfl_transformer_and_text_encoders(tiny_flux, tmp_path: Path):
    files = {"clip_l": tiny_flux.clip_l, "t5xxl": tiny_flux.t5xxl}
    extra = [
        "--clip_l",
        str(tiny_flux.clip_l),
        "--clip_l_save_to",
        str(tmp_path / "clip_l_merged.safetensors"),
    ]
    extra += ["--t5xxl", str(tiny_flux.t5xxl), "--t5xxl_save_to", str(tmp_path / "t5xxl_merged.safetensors")]
    _check_merge(tiny_flux.transformer, tmp_path / "merged.safetensors", tmp_path, False, extra, **files)


def test_flux_diffusers_folder_splits_fused_rows(tiny_flux, tmp_path: Path):
    _check_merge(tiny_flux.diffusers_dir, tmp_path / "merged", tmp_path, locon=False)


def test_flux_text_encoder_lora_needs_clip_file(tiny_flux, tmp_path: Path, capsys):
    unet, tes = load_models(tiny_flux.transformer, clip_l=tiny_flux.clip_l, t5xxl=tiny_flux.t5xxl)
    lora = random_lora(unet, tes, tmp_path / "a.safetensors", seed=1)
    argv = ["--sd_model", str(tiny_flux.transformer), "--save_to", str(tmp_path / "m.safetensors")]
    assert main([*argv, "--models", str(lora)]) == 2
    assert "pass --clip_l/--clip_l_save_to" in capsys.readouterr().err
    assert not (tmp_path / "m.safetensors").exists()


def test_save_precision_and_diffusers_named_lora(tiny_sd1_single_file, tmp_path: Path):
    """--save_precision casts every float; a PEFT-named LoRA merges like its kohya twin."""
    model = tiny_sd1_single_file.checkpoint
    unet, tes = load_models(model)
    kohya = random_lora(unet, tes, tmp_path / "k.safetensors", seed=3)
    state, _ = load_lora_file(kohya)
    peft = {}
    for key, value in state.items():
        if key.startswith("lora_unet_"):
            continue
        name, _, suffix = key.partition(".")
        path = "text_encoder." + name.removeprefix("lora_te_text_model_").replace("_", ".")
        path = path.replace("self.attn", "self_attn").replace("q.proj", "q_proj").replace("k.proj", "k_proj")
        path = path.replace("v.proj", "v_proj").replace("out.proj", "out_proj")
        peft[
            f"{path}.{ {'lora_down.weight': 'lora_A.weight', 'lora_up.weight': 'lora_B.weight'}.get(suffix, suffix) }"
        ] = value
    save_lora_file(tmp_path / "p.safetensors", peft, {})
    te_only = {k: v for k, v in state.items() if k.startswith("lora_te_")}
    save_lora_file(tmp_path / "t.safetensors", te_only, {})
    for name in ("p", "t"):
        argv = ["--sd_model", str(model), "--save_to", str(tmp_path / f"{name}_out.safetensors")]
        assert (
            main([*argv, "--models", str(tmp_path / f"{name}.safetensors"), "--save_precision", "bf16"]) == 0
        )
    a, b = load_file(str(tmp_path / "p_out.safetensors")), load_file(str(tmp_path / "t_out.safetensors"))
    assert all(v.dtype == torch.bfloat16 for v in a.values() if v.is_floating_point())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    key = "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(a[key], load_file(str(model))[key].bfloat16())


def _factors(seed: int, rank: int, alpha: float, names=("m_a", "m_b")) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name in names:
        state[f"{name}.lora_down.weight"] = torch.randn(rank, 6, generator=gen)
        state[f"{name}.lora_up.weight"] = torch.randn(5, rank, generator=gen)
        state[f"{name}.alpha"] = torch.tensor(alpha)
    return state


def test_concat_merge_is_the_exact_sum_of_deltas(tmp_path: Path):
    a, b = _factors(1, 4, 2.0), _factors(2, 2, 8.0, names=("m_a", "m_c"))
    save_lora_file(tmp_path / "a.safetensors", a, {"ss_base_model_version": "sd_v1"})
    save_lora_file(tmp_path / "b.safetensors", b, {})
    out = tmp_path / "c.safetensors"
    argv = [
        "--save_to",
        str(out),
        "--models",
        str(tmp_path / "a.safetensors"),
        str(tmp_path / "b.safetensors"),
    ]
    assert main([*argv, "--ratios", "0.5", "-1.5", "--concat"]) == 0
    merged, meta = load_lora_file(out)
    fa, fb, fm = (factors_from_state(s, "x") for s in (a, b, merged))
    assert fm["m_a"].rank == 6 and fm["m_c"].rank == 2 and fm["m_b"].rank == 4
    torch.testing.assert_close(
        fm["m_a"].delta(), 0.5 * fa["m_a"].delta() - 1.5 * fb["m_a"].delta(), atol=1e-6, rtol=1e-6
    )
    torch.testing.assert_close(fm["m_b"].delta(), 0.5 * fa["m_b"].delta(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(fm["m_c"].delta(), -1.5 * fb["m_c"].delta(), atol=1e-6, rtol=1e-6)
    assert meta["ss_network_dim"] == "Dynamic" and meta["ss_base_model_version"] == "sd_v1"
    assert "--concat" in meta["ss_training_comment"] and "sshs_model_hash" in meta


def test_plain_merge_is_kohyas_weighted_sum(tmp_path: Path, capsys):
    a, b = _factors(1, 4, 2.0), _factors(2, 4, 8.0)
    save_lora_file(tmp_path / "a.safetensors", a, {})
    save_lora_file(tmp_path / "b.safetensors", b, {})
    out = tmp_path / "m.safetensors"
    models = ["--models", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")]
    assert main(["--save_to", str(out), *models, "--ratios", "1.0", "-0.5"]) == 0
    merged, meta = load_lora_file(out)
    w = 2.0 * -0.5  # sqrt(8 / 2) * ratio
    for name in ("m_a", "m_b"):
        down = a[f"{name}.lora_down.weight"] + w * b[f"{name}.lora_down.weight"]
        up = a[f"{name}.lora_up.weight"] + abs(w) * b[f"{name}.lora_up.weight"]
        torch.testing.assert_close(merged[f"{name}.lora_down.weight"], down)
        torch.testing.assert_close(merged[f"{name}.lora_up.weight"], up)
        assert float(merged[f"{name}.alpha"]) == 2.0
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"
    save_lora_file(tmp_path / "r2.safetensors", _factors(3, 2, 1.0), {})
    argv = ["--save_to", str(tmp_path / "x.safetensors"), "--models", str(tmp_path / "a.safetensors")]
    assert main([*argv, str(tmp_path / "r2.safetensors")]) == 2
    assert "use --concat" in capsys.readouterr().err


def test_bad_inputs(tiny_sd1_single_file, tiny_sdxl_single_file, tmp_path: Path, capsys):
    model = tiny_sd1_single_file.checkpoint
    xl_unet, xl_tes = load_models(tiny_sdxl_single_file.checkpoint)
    xl = random_lora(xl_unet, xl_tes, tmp_path / "xl.safetensors", seed=1)
    out = tmp_path / "out.safetensors"
    base = ["--sd_model", str(model), "--save_to", str(out)]
    assert main([*base, "--models", str(xl)]) == 2
    assert "match nothing in this sd1 model" in capsys.readouterr().err
    assert main([*base, "--models", str(xl), str(xl), "--ratios", "1"]) == 2
    assert "--ratios: 1 values for 2 --models" in capsys.readouterr().err
    assert main([*base, "--models", str(xl), "--concat"]) == 2
    assert "--concat/--shuffle: only when merging LoRAs" in capsys.readouterr().err
    out.write_bytes(b"keep")
    assert main([*base, "--models", str(tmp_path / "missing.safetensors")]) == 2
    assert "--models" in capsys.readouterr().err and out.read_bytes() == b"keep"
    save_lora_file(tmp_path / "loha.safetensors", {"lora_unet_x.hada_w1_a": torch.ones(2, 2)}, {})
    assert main([*base, "--overwrite", "--models", str(tmp_path / "loha.safetensors")]) == 2
    assert "LoHa/LoKr/DoRA" in capsys.readouterr().err and out.read_bytes() == b"keep"
    assert main(["--sd_model", str(model), "--save_to", str(tmp_path / "o.ckpt"), "--models", str(xl)]) == 2
    assert ".safetensors" in capsys.readouterr().err


def test_streaming_writer_round_trip(tmp_path: Path):
    tensors = {
        "a": torch.randn(3, 5),
        "b": torch.arange(7, dtype=torch.int64),
        "c": torch.randn(2, 2).bfloat16(),
        "e": torch.empty(0, 4),
        "s": torch.tensor(1.5),
    }
    plan = [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    write_streaming(tmp_path / "x.safetensors", plan, lambda k: tensors[k], {"k": "v"})
    loaded = load_file(str(tmp_path / "x.safetensors"))
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    with open_source(tmp_path / "x.safetensors", "--x") as src:
        assert src.metadata == {"k": "v"} and all(torch.equal(src.get(k), tensors[k]) for k in tensors)
    with pytest.raises(ValueError, match="planned"):
        write_streaming(tmp_path / "y.safetensors", plan, lambda k: tensors[k].double(), {})
    assert not (tmp_path / "y.safetensors").exists() and not list(tmp_path.glob(".y*"))


def test_factors_delta_rows_match_full_delta():
    gen = torch.Generator().manual_seed(0)
    f = Factors(torch.randn(3, 4, 3, 3, generator=gen), torch.randn(6, 3, 1, 1, generator=gen), 1.5)
    torch.testing.assert_close(f.delta((2, 5)), f.delta()[2:5])


def test_overwrite_replaces_a_folder(tiny_sd1_dir, tmp_path: Path):
    unet, tes = load_models(tiny_sd1_dir)
    lora = random_lora(unet, tes, tmp_path / "a.safetensors", seed=1)
    out = tmp_path / "merged"
    shutil.copytree(tiny_sd1_dir, out)
    (out / "stale.txt").write_text("x")
    argv = ["--sd_model", str(tiny_sd1_dir), "--save_to", str(out), "--models", str(lora)]
    assert main(argv) == 2
    assert main([*argv, "--overwrite"]) == 0
    assert not (out / "stale.txt").exists() and not list(tmp_path.glob(".merged*"))
