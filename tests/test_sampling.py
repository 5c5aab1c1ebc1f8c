"""Sample images during training: sizes, names, cadence, TensorBoard, and no effect on the trained LoRA."""

from __future__ import annotations

import gc
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from train_helpers import NAME, db_args, error_lines, make_images, run_main, tb_accumulator

from library.training.sample_prompts import SamplePrompt
from library.training.sampling import image_name, is_due, make_scheduler

PROMPTS = "sks shape --w 64 --h 64 --s 2 --d 5\n# comment\nsks shape, blue --n red --w 64 --h 128 --s 2 --ss euler_a\n"


def test_kohya_cadence() -> None:
    due = dict(every_steps=3, every_epochs=None, at_first=False)
    assert [s for s in range(0, 10) if is_due(s, None, **due)] == [3, 6, 9]
    assert not is_due(3, 1, **due)  # steps only: never at an epoch end
    assert is_due(0, None, every_steps=3, every_epochs=None, at_first=True)
    epochs = dict(every_steps=3, every_epochs=2, at_first=False)  # epochs win over steps
    assert not is_due(3, None, **epochs) and not is_due(5, 1, **epochs) and is_due(6, 2, **epochs)


def test_image_names() -> None:
    prompt = SamplePrompt(index=3, prompt="x", seed=42)
    assert image_name("lora", prompt, 100, None, "20260101120000") == "lora_000100_03_20260101120000_42.png"
    assert image_name(None, prompt, 100, 2, "20260101120000") == "e000002_03_20260101120000_42.png"


@pytest.mark.parametrize("name", ["ddim", "euler_a", "dpmsolver++", "k_dpm_2", "pndm"])
def test_schedulers_keep_the_training_schedule(name: str) -> None:
    from library.families.sd import make_noise_scheduler

    base = make_noise_scheduler(v_parameterization=True).config
    scheduler = make_scheduler(name, base)
    assert scheduler.config.prediction_type == "v_prediction"
    assert (scheduler.config.beta_start, scheduler.config.beta_end) == (0.00085, 0.012)
    if name == "dpmsolver++":
        assert scheduler.config.algorithm_type == "dpmsolver++"


def test_sampling_writes_sized_images_and_logs_them(tiny_sd1_dir: Path, data2: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS)
    out, logs = tmp_path / "out", tmp_path / "logs"
    args = db_args(
        tiny_sd1_dir, data2, out, "--max_train_steps", "2", "--cache_latents", "--logging_dir", str(logs)
    )
    args += ["--sample_prompts", str(prompts), "--sample_every_n_steps", "2", "--sample_at_first"]
    assert run_main(args) == 0
    files = sorted((out / "sample").iterdir())
    pattern = re.compile(rf"{NAME}_(\d{{6}})_(\d\d)_\d{{14}}_(\d+)\.png")
    found = [pattern.fullmatch(p.name).groups() for p in files]
    assert [(step, idx) for step, idx, _ in found] == [
        ("000000", "00"),
        ("000000", "01"),
        ("000002", "00"),
        ("000002", "01"),
    ]
    assert [seed for _, idx, seed in found if idx == "00"] == ["5", "5"]
    assert [Image.open(p).size for p in files] == [(64, 64), (64, 128)] * 2
    # The same seed, the same prompt and an untrained LoRA (zero up weights) at step 0: a deterministic image
    # that changes once the LoRA has trained.
    assert Image.open(files[0]).tobytes() != Image.open(files[2]).tobytes()
    assert sorted(tb_accumulator(logs).Tags()["images"]) == ["sample/00", "sample/01"]
    from diffusers import StableDiffusionPipeline

    gc.collect()
    assert not [o for o in gc.get_objects() if isinstance(o, StableDiffusionPipeline)]  # nothing kept alive


def test_epoch_cadence_names(tiny_sd1_dir: Path, data2: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.json"
    prompts.write_text('[{"prompt": "sks shape", "width": 64, "height": 64, "sample_steps": 1, "seed": 9}]')
    out = tmp_path / "out"
    args = db_args(tiny_sd1_dir, data2, out, "--max_train_epochs", "2", "--cache_latents")
    args += ["--sample_prompts", str(prompts), "--sample_every_n_epochs", "1", "--sample_every_n_steps", "1"]
    assert run_main(args) == 0
    names = sorted(p.name for p in (out / "sample").iterdir())
    assert [n[: len(NAME) + 11] for n in names] == [f"{NAME}_e000001_00", f"{NAME}_e000002_00"]
    assert all(n.endswith("_9.png") for n in names)


def test_sampling_and_validation_do_not_change_training(tiny_sd1_dir: Path, tmp_path: Path) -> None:
    data = make_images(tmp_path / "data", n=4)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS)
    common = ["--max_train_epochs", "2", "--validation_split", "0.5", "--network_dropout", "0.1"]
    plain = db_args(tiny_sd1_dir, data, tmp_path / "a", *common, "--validate_every_n_epochs", "1000")
    busy = db_args(tiny_sd1_dir, data, tmp_path / "b", *common, "--validate_every_n_steps", "1")
    busy += ["--sample_prompts", str(prompts), "--sample_every_n_steps", "1", "--sample_at_first"]
    assert run_main(plain) == 0 and run_main(busy) == 0
    a = load_file(str(tmp_path / "a" / f"{NAME}.safetensors"))
    b = load_file(str(tmp_path / "b" / f"{NAME}.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert len(list((tmp_path / "b" / "sample").iterdir())) == 2 * 5  # at first + 4 steps


def test_bad_sampling_flags_fail_before_loading(
    tiny_sd1_dir: Path, data2: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("ok\nbad --s many\n")
    args = db_args(
        tiny_sd1_dir, data2, tmp_path / "out", "--sample_prompts", str(prompts), "--sample_sampler", "eulerr"
    )
    assert run_main(args) == 2
    lines = error_lines(capsys)
    assert f"error: {prompts}:2: --s must be an integer, got 'many'" in lines
    assert any(line.startswith("error: --sample_sampler: unknown sampler 'eulerr'") for line in lines)
    args = db_args(tiny_sd1_dir, data2, tmp_path / "out", "--sample_every_n_steps", "2")
    assert run_main(args) == 2
    assert error_lines(capsys) == [
        "error: --sample_every_n_steps needs --sample_prompts (the prompts to sample); add it or remove this"
    ]
    assert not (tmp_path / "out").exists()


def test_pause_bar_takes_the_time_off_the_clock() -> None:
    from tqdm import tqdm

    from library.training.sampling import pause_bar

    bar = tqdm(total=10, disable=False, mininterval=0)
    start, last = bar.start_t, bar.last_print_t
    pause_bar(bar, 30.0)
    assert (bar.start_t, bar.last_print_t) == (start + 30.0, last + 30.0)
    bar.close()


def test_samplers_follow_zero_terminal_snr():
    from library.families.sd import make_noise_scheduler
    from library.training.sampling import make_scheduler

    config = make_noise_scheduler(False).config
    assert float(make_scheduler("ddim", config).alphas_cumprod[-1]) > 0
    assert float(make_scheduler("ddim", config, zero_terminal_snr=True).alphas_cumprod[-1]) == 0.0
    # Euler-type samplers clamp the last value to 2**-24 to keep sigma finite (diffusers' convention).
    assert float(make_scheduler("euler", config, zero_terminal_snr=True).alphas_cumprod[-1]) == 2.0**-24
