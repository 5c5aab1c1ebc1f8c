"""tools/resize_lora.py and tools/svd_merge_lora.py over constructed LoRAs with known spectra."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from networks.lora_file import load_lora_file, save_lora_file
from networks.ops.lora_math import LoRAPair, delta, dynamic_rank, resize_state, split_modules, svd_merge
from tools import resize_lora, svd_merge_lora

LINEAR = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
QKV = "lora_unet_double_blocks_0_img_attn_qkv"  # FLUX fused qkv: a taller matrix, same code
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"  # LoCon 3x3


def _orthonormal(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))[0]


def spectrum_lora(s: list[float], out: int = 16, inp: int = 12, alpha: float | None = None, seed: int = 0):
    """(down, up, alpha) whose up @ down has exactly the singular values `s`."""
    gen = torch.Generator().manual_seed(seed)
    sv = torch.tensor(s, dtype=torch.float64)
    up = (_orthonormal(out, len(s), gen) * sv).float()
    down = _orthonormal(inp, len(s), gen).T.float()
    return down, up, alpha


def random_state(seed: int = 0, rank: int = 4, alpha: float = 2.0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, down_shape, up_shape in (
        (LINEAR, (rank, 12), (16, rank)),
        (QKV, (rank, 8), (24, rank)),
        (CONV, (rank, 6, 3, 3), (10, rank, 1, 1)),
    ):
        state[f"{name}.lora_down.weight"] = torch.randn(down_shape, generator=gen)
        state[f"{name}.lora_up.weight"] = torch.randn(up_shape, generator=gen)
        state[f"{name}.alpha"] = torch.tensor(alpha)
    return state


def deltas(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: delta(pair) for name, pair in split_modules(state)[0].items()}


def test_resize_to_full_rank_is_lossless():
    state = random_state()
    resized, infos = resize_state(state, new_rank=4)
    before, after = deltas(state), deltas(resized)
    assert after.keys() == before.keys()
    for name in before:
        assert (after[name] - before[name]).abs().max() < 1e-5, name
    assert resized[f"{CONV}.lora_down.weight"].shape == (4, 6, 3, 3)
    assert resized[f"{CONV}.lora_up.weight"].shape == (10, 4, 1, 1)
    assert [i.fro_retained for i in infos] == pytest.approx([1.0] * 3)


def test_lower_rank_error_is_the_discarded_singular_values():
    s = [8.0, 4.0, 2.0, 1.0, 0.5, 0.25]
    down, up, _ = spectrum_lora(s)
    state = {
        f"{LINEAR}.lora_down.weight": down,
        f"{LINEAR}.lora_up.weight": up,
        f"{LINEAR}.alpha": torch.tensor(3.0),
    }
    resized, infos = resize_state(state, new_rank=2)
    err = torch.linalg.matrix_norm(deltas(resized)[LINEAR] - deltas(state)[LINEAR]).item()
    scale = 3.0 / 6
    assert err == pytest.approx(scale * (2.0**2 + 1 + 0.5**2 + 0.25**2) ** 0.5, rel=1e-5)
    assert float(resized[f"{LINEAR}.alpha"]) == 2 * scale  # the scale alpha / rank is kept
    assert infos[0].fro_retained == pytest.approx(((64 + 16) / sum(x * x for x in s)) ** 0.5, rel=1e-6)


@pytest.mark.parametrize(
    ("method", "param", "rank"),
    [
        ("sv_ratio", 5.0, 3),  # S > 8 / 5: 8, 4, 2
        ("sv_ratio", 100.0, 6),  # every nonzero value; zeros never pass
        ("sv_cumulative", 0.9, 4),  # cumsum / 15.75 = .51 .76 .89 .95 -> first >= .9 is index 3
        ("sv_cumulative", 0.5, 1),
        ("sv_fro", 0.99, 3),  # cumsum(S²) / 85.31 = .750 .938 .985 -> first >= .9801 is index 2
        ("sv_fro", 0.5, 1),
    ],
)
def test_dynamic_rank_follows_kohyas_rules(method, param, rank):
    s = [8.0, 4.0, 2.0, 1.0, 0.5, 0.25]
    down, up, _ = spectrum_lora(s)
    state = {f"{LINEAR}.lora_down.weight": down, f"{LINEAR}.lora_up.weight": up}
    resized, infos = resize_state(state, new_rank=32, method=method, param=param)
    assert infos[0].new_rank == rank
    assert resized[f"{LINEAR}.lora_down.weight"].shape == (rank, 12)
    assert float(resized[f"{LINEAR}.alpha"]) == rank  # no alpha in the source: scale 1
    capped, _ = resize_state(state, new_rank=2, method=method, param=param)
    assert capped[f"{LINEAR}.lora_down.weight"].shape[0] == min(rank, 2)


def test_dynamic_rank_on_padded_spectrum_and_zero_module():
    padded = torch.tensor([3.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    assert dynamic_rank(padded, "sv_cumulative", 1.0) == 2
    zero = {f"{LINEAR}.lora_down.weight": torch.zeros(4, 12), f"{LINEAR}.lora_up.weight": torch.zeros(16, 4)}
    resized, infos = resize_state(zero, new_rank=8, method="sv_fro", param=0.9)
    assert infos[0].new_rank == 1 and not resized[f"{LINEAR}.lora_up.weight"].any()


def test_peft_keys_keep_their_spelling():
    down, up, _ = spectrum_lora([2.0, 1.0])
    state = {"unet.a.to_q.lora_A.weight": down, "unet.a.to_q.lora_B.weight": up}
    resized, _ = resize_state(state, new_rank=1)
    assert set(resized) == {"unet.a.to_q.lora_A.weight", "unet.a.to_q.lora_B.weight"}  # no alpha added
    assert isinstance(split_modules(state)[0]["unet.a.to_q"], LoRAPair)


def test_svd_merge_at_full_rank_is_the_sum_of_deltas():
    a, b = random_state(1, rank=3, alpha=1.5), random_state(2, rank=3, alpha=4.0)
    merged = svd_merge([a, b], [0.7, -0.5], new_rank=6, clamp_quantile=1.0)
    da, db, dm = deltas(a), deltas(b), deltas(merged)
    for name in da:
        assert (dm[name] - (0.7 * da[name] - 0.5 * db[name])).abs().max() < 1e-5, name
        assert float(merged[f"{name}.alpha"]) == merged[f"{name}.lora_down.weight"].shape[0]
    assert merged[f"{LINEAR}.lora_down.weight"].shape == (6, 12)
    wider = svd_merge([a, b], [0.7, -0.5], new_rank=7, clamp_quantile=1.0)
    assert wider[f"{LINEAR}.lora_down.weight"].shape == (7, 12)  # zero rows past the sum's rank 6
    assert wider[f"{CONV}.lora_down.weight"].shape == (6, 6, 3, 3)  # capped by in channels, as kohya
    clamped = svd_merge([a, b], [0.7, -0.5], new_rank=6)  # kohya's default 0.99 quantile clamp
    up, down = clamped[f"{LINEAR}.lora_up.weight"], clamped[f"{LINEAR}.lora_down.weight"]
    hi = torch.quantile(
        torch.cat(
            [merged[f"{LINEAR}.lora_up.weight"].flatten(), merged[f"{LINEAR}.lora_down.weight"].flatten()]
        ),
        0.99,
    )
    assert max(up.abs().max(), down.abs().max()) == pytest.approx(float(hi), rel=1e-5)


def _write(path: Path, state: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> Path:
    save_lora_file(path, state, meta or {})
    return path


def test_resize_cli_metadata_hashes_and_overwrite(tmp_path: Path, capsys):
    meta = {
        "ss_network_dim": "4",
        "ss_network_alpha": "2.0",
        "ss_training_comment": "mine",
        "modelspec.title": "t",
    }
    source = _write(tmp_path / "in.safetensors", random_state(), meta)
    out = tmp_path / "out.safetensors"
    assert (
        resize_lora.main(["--model", str(source), "--save_to", str(out), "--new_rank", "2", "--verbose"]) == 0
    )
    printed = capsys.readouterr().out
    assert f"{QKV:75} | sum(S) retained:" in printed and "Average Frobenius norm retention:" in printed
    state, saved = load_lora_file(out)
    assert saved["ss_network_dim"] == "2" and saved["ss_network_alpha"] == "1.0"
    assert saved["ss_training_comment"] == "dimension is resized from 4 to 2; mine"
    assert saved["modelspec.title"] == "t"
    payload = out.read_bytes()
    header = int.from_bytes(payload[:8], "little")
    assert saved["sshs_model_hash"] == hashlib.sha256(payload[8 + header :]).hexdigest()
    assert state[f"{LINEAR}.lora_down.weight"].dtype == torch.float32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors", "out.safetensors"]  # no temp left

    before = out.read_bytes()
    assert resize_lora.main(["--model", str(source), "--save_to", str(out)]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == before
    args = ["--model", str(source), "--save_to", str(out), "--overwrite", "--new_rank", "8"]
    args += ["--dynamic_method", "sv_fro", "--dynamic_param", "0.9", "--save_precision", "fp16"]
    assert resize_lora.main(args) == 0
    state, saved = load_lora_file(out)
    assert saved["ss_network_dim"] == saved["ss_network_alpha"] == "Dynamic"
    assert saved["ss_training_comment"].startswith("Dynamic resize with sv_fro: 0.9 from 4; ")
    assert state[f"{LINEAR}.alpha"].dtype == torch.float16


def test_resize_cli_rejects_bad_flags(tmp_path: Path, capsys):
    source = _write(tmp_path / "in.safetensors", random_state())
    assert resize_lora.main(["--model", str(source), "--save_to", str(tmp_path / "o.txt")]) == 2
    assert "--save_to" in capsys.readouterr().err
    args = [
        "--model",
        str(source),
        "--save_to",
        str(tmp_path / "o.safetensors"),
        "--dynamic_method",
        "sv_ratio",
    ]
    assert resize_lora.main(args) == 2
    assert capsys.readouterr().err == "error: --dynamic_method sv_ratio: needs --dynamic_param\n"
    assert not (tmp_path / "o.safetensors").exists()


def test_svd_merge_cli(tmp_path: Path, capsys):
    a = _write(
        tmp_path / "a.safetensors",
        random_state(1, rank=3),
        {"ss_base_model_version": "sd_v1", "ss_v2": "False"},
    )
    b = _write(tmp_path / "b.safetensors", random_state(2, rank=3))
    out = tmp_path / "m.safetensors"
    args = ["--models", str(a), str(b), "--ratios", "1", "0.5", "--new_rank", "6", "--save_to", str(out)]
    assert svd_merge_lora.main([*args, "--clamp_quantile", "1"]) == 0
    state, meta = load_lora_file(out)
    for name, d in deltas(state).items():
        assert (
            d - (deltas(random_state(1, rank=3))[name] + 0.5 * deltas(random_state(2, rank=3))[name])
        ).abs().max() < 1e-5
    assert meta["ss_network_dim"] == meta["ss_network_alpha"] == "6"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": 6, "conv_alpha": 6}
    assert meta["ss_base_model_version"] == "sd_v1" and meta["modelspec.merged_from"] == "a, b"
    assert svd_merge_lora.main(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert svd_merge_lora.main([*args[:5], "--save_to", str(tmp_path / "x.safetensors")]) == 2
    assert "--ratios: 1 values for 2 --models" in capsys.readouterr().err
    assert svd_merge_lora.main([*args[:-1], str(tmp_path / "y.safetensors"), "--lbws", "[1,1]", "[1,1]"]) == 2
    assert capsys.readouterr().err.startswith("error: --lbws: per-block merge weights are not implemented")
