"""Loss and noise flags end to end: bad combinations before any weights load, a tiny run with several
options at once, and the ss_* metadata that records them."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from train_helpers import db_args, make_images, metadata, overfit_args, run_main, tb_scalars

from library.families.sd import StableDiffusionFamily


@pytest.fixture
def no_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    def load(*args: object, **kwargs: object) -> None:
        raise AssertionError("weights loaded")

    monkeypatch.setattr(StableDiffusionFamily, "load", load)


def error_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line.removeprefix("error: ") for line in err.splitlines() if line.startswith("error: ")]


def test_incompatible_noise_flags_all_reported(
    tiny_sd1_dir: Path, tmp_path: Path, capsys, no_weights
) -> None:
    data = make_images(tmp_path / "data", n=2)
    args = db_args(tiny_sd1_dir, data, tmp_path / "out", "--adaptive_noise_scale", "0.01")
    args += ["--multires_noise_iterations", "6", "--huber_c", "0", "--min_snr_gamma", "-1"]
    assert run_main(args) == 2
    assert error_lines(capsys) == [
        "--adaptive_noise_scale needs --noise_offset (it adds to the offset); set --noise_offset (e.g. 0.05)",
        "--huber_c must be positive, got 0.0",
        "--min_snr_gamma must be positive, got -1.0",
    ]
    args = db_args(
        tiny_sd1_dir, data, tmp_path / "out", "--noise_offset", "0.1", "--multires_noise_iterations", "6"
    )
    assert run_main(args) == 2
    assert error_lines(capsys) == [
        "--noise_offset and --multires_noise_iterations exclude each other (kohya: both reshape the noise); "
        "pick one"
    ]


def test_unknown_loss_type_lists_the_valid_ones(tiny_sd1_dir: Path, tmp_path: Path, capsys) -> None:
    data = make_images(tmp_path / "data", n=2)
    assert run_main(db_args(tiny_sd1_dir, data, tmp_path / "out", "--loss_type", "hubber")) == 2
    [line] = error_lines(capsys)
    assert "--loss_type" in line and "'l1', 'l2', 'huber', 'smooth_l1'" in line


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (
            ["--scale_v_pred_loss_like_noise_pred"],
            "--scale_v_pred_loss_like_noise_pred scales a v-prediction loss, but this model trains "
            "epsilon-prediction; add --v_parameterization or remove the flag",
        ),
        (
            ["--v_pred_like_loss", "0.1", "--v_parameterization"],
            "--v_pred_like_loss adds a v-like term to an epsilon loss, but this model trains v-prediction "
            "(--v_parameterization); remove --v_pred_like_loss",
        ),
    ],
)
def test_loss_flags_against_prediction_type(
    tiny_sd1_dir: Path, tmp_path: Path, capsys, no_weights, flags: list[str], expected: str
) -> None:
    data = make_images(tmp_path / "data", n=2)
    assert run_main(db_args(tiny_sd1_dir, data, tmp_path / "out", *flags)) == 2
    assert error_lines(capsys) == [expected]
    assert run_main(db_args(tiny_sd1_dir, data, tmp_path / "out", *flags, "--dry_run")) == 2
    assert error_lines(capsys) == [expected]


def test_several_loss_and_noise_options_train(tiny_sd1_dir: Path, tmp_path: Path) -> None:
    data = make_images(tmp_path / "data", n=2)
    logs, out = tmp_path / "logs", tmp_path / "out"
    args = db_args(
        tiny_sd1_dir,
        data,
        out,
        *overfit_args(logs, 40),
        "--loss_type",
        "huber",
        "--huber_schedule",
        "snr",
        "--huber_c",
        "0.2",
        "--min_snr_gamma",
        "5",
        "--debiased_estimation_loss",
        "--noise_offset",
        "0.05",
        "--adaptive_noise_scale",
        "0.01",
        "--ip_noise_gamma",
        "0.1",
        "--ip_noise_gamma_random_strength",
        name="e2e",
    )
    assert run_main(args) == 0
    losses = [e.value for e in tb_scalars(logs, "loss/current")]
    assert len(losses) == 40 and all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.8 * first, (first, last)
    md = metadata(out / "e2e.safetensors")
    assert {k: md[k] for k in md if k.startswith(("ss_loss", "ss_huber", "ss_min_snr", "ss_debiased"))} == {
        "ss_loss_type": "huber",
        "ss_huber_schedule": "snr",
        "ss_huber_c": "0.2",
        "ss_huber_scale": "1.0",
        "ss_min_snr_gamma": "5.0",
        "ss_debiased_estimation": "True",
    }
    assert md["ss_noise_offset"] == "0.05" and md["ss_adaptive_noise_scale"] == "0.01"
    assert md["ss_ip_noise_gamma"] == "0.1" and md["ss_ip_noise_gamma_random_strength"] == "True"
    assert md["ss_multires_noise_iterations"] == "None" and md["ss_zero_terminal_snr"] == "False"


def test_v_prediction_with_zero_terminal_snr_and_pyramid_noise(tiny_sd1_dir: Path, tmp_path: Path) -> None:
    data = make_images(tmp_path / "data", n=2)
    out = tmp_path / "out"
    args = db_args(
        tiny_sd1_dir,
        data,
        out,
        "--max_train_steps",
        "3",
        "--v_parameterization",
        "--zero_terminal_snr",
        "--scale_v_pred_loss_like_noise_pred",
        "--min_snr_gamma",
        "5",
        "--multires_noise_iterations",
        "3",
        "--multires_noise_discount",
        "0.5",
        "--loss_type",
        "smooth_l1",
        "--huber_schedule",
        "exponential",
        "--min_timestep",
        "990",
        name="e2e",
    )
    assert run_main(args) == 0
    md = metadata(out / "e2e.safetensors")
    assert md["ss_zero_terminal_snr"] == "True" and md["ss_base_model_version"] == "sd_v1_v"
    assert md["ss_multires_noise_iterations"] == "3" and md["ss_multires_noise_discount"] == "0.5"
    assert md["ss_loss_type"] == "smooth_l1" and md["ss_huber_schedule"] == "exponential"


def test_text_options_reach_the_family_and_metadata(
    tiny_sd1_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = make_images(tmp_path / "data", n=2)
    for caption in data.glob("*/*.caption"):
        caption.write_text("sks (shape:1.3), [red]")
    seen: list[dict] = []
    encode = StableDiffusionFamily.encode_prompts

    def spy(self, bundle, captions, **kwargs):
        seen.append({"captions": list(captions), **kwargs})
        return encode(self, bundle, captions, **kwargs)

    monkeypatch.setattr(StableDiffusionFamily, "encode_prompts", spy)
    out = tmp_path / "out"
    args = db_args(tiny_sd1_dir, data, out, "--max_train_steps", "2", "--clip_skip", "2", name="e2e")
    args += ["--max_token_length", "150", "--weighted_captions", "--caption_extension", ".caption"]
    assert run_main(args) == 0
    assert seen and all(
        s["clip_skip"] == 2 and s["max_token_length"] == 150 and s["weighted"] is True for s in seen
    )
    assert seen[0]["captions"] == ["sks (shape:1.3), [red]"] * 2
    md = metadata(out / "e2e.safetensors")
    assert md["ss_clip_skip"] == "2" and md["ss_max_token_length"] == "150"


def test_config_file_loss_keys(tmp_path: Path) -> None:
    from library.config import load_config_file
    from library.errors import UserError

    cfg = tmp_path / "train.toml"
    cfg.write_text('[training]\nmin_snr_gamma = 5\nnoise_offset = 0.05\nhuber_schedule = "exponential"\n')
    assert load_config_file(cfg) == {
        "min_snr_gamma": 5.0,
        "noise_offset": 0.05,
        "huber_schedule": "exponential",
    }
    cfg.write_text('loss_type = "hubber"\n')
    with pytest.raises(UserError) as err:
        load_config_file(cfg)
    assert err.value.problems == [f"{cfg}: loss_type must be one of l1, l2, huber, smooth_l1, got 'hubber'"]
