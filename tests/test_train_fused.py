"""--fused_backward_pass / --fused_optimizer_groups: same LoRA as the unfused run, gradients freed in backward."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import NAME, db_args, error_lines, make_images, run_main, run_sdxl

from library.families.sd import StableDiffusionFamily
from library.training.fused import FusedOptimizer, fuse_optimizer


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return make_images(tmp_path / "data", n=4)


def _train(model: Path, data: Path, out: Path, *extra: str) -> dict[str, torch.Tensor]:
    args = db_args(model, data, out, "--max_train_steps", "3", "--cache_latents", *extra)
    assert run_main(args) == 0
    return load_file(str(out / f"{NAME}.safetensors"))


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    moved = 0
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
        moved += key.endswith("lora_up.weight") and bool(a[key].abs().sum() > 0)
    assert moved > 0  # the LoRA trained at all (lora_up starts at zero)


@pytest.mark.parametrize(
    ("optimizer", "fused"),
    [
        ("AdamW", ["--fused_backward_pass"]),
        ("Adafactor", ["--fused_backward_pass"]),
        ("AdamW", ["--fused_optimizer_groups", "3"]),
    ],
)
def test_fused_trains_the_same_lora(tiny_sd1_dir: Path, data: Path, tmp_path: Path, optimizer, fused):
    common = [
        "--optimizer_type",
        optimizer,
        "--max_grad_norm",
        "0",
        "--unet_lr",
        "1e-3",
        "--text_encoder_lr",
        "5e-4",
    ]
    plain = _train(tiny_sd1_dir, data, tmp_path / "plain", *common)
    _assert_same(plain, _train(tiny_sd1_dir, data, tmp_path / "fused", *common, *fused))


def test_fused_clipping(tiny_sd1_dir: Path, data: Path, tmp_path: Path, caplog):
    """One group clips by the global norm, as unfused; per tensor clips each tensor alone (kohya's fused)."""
    common = ["--optimizer_type", "SGDNesterov", "--learning_rate", "0.5", "--max_grad_norm", "1e-3"]
    plain = _train(tiny_sd1_dir, data, tmp_path / "plain", *common)
    with caplog.at_level("INFO", logger="loratrain"):
        one = _train(tiny_sd1_dir, data, tmp_path / "one", *common, "--fused_optimizer_groups", "1")
    assert "optimizer steps inside backward: 1 groups of LoRA tensors" in caplog.text
    _assert_same(plain, one)
    per_tensor = _train(tiny_sd1_dir, data, tmp_path / "per_tensor", *common, "--fused_backward_pass")
    key = next(k for k in plain if k.endswith("lora_up.weight"))
    assert (plain[key] - per_tensor[key]).abs().max() > 1e-4


def test_fused_resume_continues_exactly(tiny_sd1_dir: Path, data: Path, tmp_path: Path):
    """4 fused steps straight == 2 unfused steps + --save_state, resumed fused to 4 (same state layout)."""
    common = ["--cache_latents", "--save_state", "--max_grad_norm", "0"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    fused = ["--fused_backward_pass"]
    assert run_main(db_args(tiny_sd1_dir, data, straight, "--max_train_steps", "4", *common, *fused)) == 0
    assert run_main(db_args(tiny_sd1_dir, data, split, "--max_train_steps", "2", *common)) == 0
    resume = ["--max_train_steps", "4", "--resume", str(split / f"{NAME}-state")]
    assert run_main(db_args(tiny_sd1_dir, data, split, *resume, *common, *fused)) == 0
    _assert_same(
        load_file(str(straight / f"{NAME}.safetensors")), load_file(str(split / f"{NAME}.safetensors"))
    )
    # the fused run's own state resumes too
    again = ["--max_train_steps", "5", "--resume", str(split / f"{NAME}-state")]
    assert run_main(db_args(tiny_sd1_dir, data, split, *again, *common, *fused)) == 0


def test_fused_refusals_before_loading(
    tiny_sd1_dir: Path, data: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
):
    def load(*args: object, **kwargs: object) -> None:
        raise AssertionError("weights loaded")

    monkeypatch.setattr(StableDiffusionFamily, "load", load)
    bad = [
        "--fused_backward_pass",
        "--gradient_accumulation_steps",
        "2",
        "--mixed_precision",
        "fp16",
        "--optimizer_type",
        "DAdaptAdam",
    ]
    assert run_main(db_args(tiny_sd1_dir, data, tmp_path / "out", *bad)) == 2
    lines = error_lines(capsys)
    assert [line.split(" ", 3)[1] for line in lines if "--fused_backward_pass" in line] == [
        "--fused_backward_pass",
        "--fused_backward_pass:",
        "--fused_backward_pass:",
    ]
    assert any("drop --gradient_accumulation_steps 2" in line for line in lines)
    assert any("--optimizer_type DAdaptAdam cannot step one tensor at a time" in line for line in lines)
    both = ["--fused_backward_pass", "--fused_optimizer_groups", "2"]
    assert run_main(db_args(tiny_sd1_dir, data, tmp_path / "out", *both)) == 2
    assert error_lines(capsys) == [
        "error: --fused_backward_pass and --fused_optimizer_groups exclude each other (one steps every tensor "
        "alone, the other in N groups); pick one"
    ]


def _model() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(*(torch.nn.Linear(4, 4) for _ in range(3)))


def _loss(model: torch.nn.Module, x: torch.Tensor, skip_last: bool = False) -> torch.Tensor:
    for i, layer in enumerate(model):
        if not (skip_last and i == len(model) - 1):
            x = torch.tanh(layer(x))
    return x.square().sum()


@pytest.mark.parametrize("max_grad_norm", [0.0, 0.05])
@pytest.mark.parametrize(("groups", "coexisting"), [(None, 1), (3, 2), (1, 6)])
def test_gradients_are_freed_in_backward(groups, coexisting, max_grad_norm):
    """Per tensor, at most one gradient exists at a time; N groups hold at most one group's; the update is the
    unfused one with clipping over each tensor / group."""
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    plain, fused = _model(), _model()
    opt_plain = torch.optim.AdamW(plain.parameters(), lr=0.1)
    opt = torch.optim.AdamW(
        [{"params": list(fused[:2].parameters())}, {"params": list(fused[2].parameters()), "lr": 0.1}], lr=0.1
    )
    seen: list[int] = []
    params = list(fused.parameters())
    for p in params:  # registered first, so it runs before the fused hook frees anything
        p.register_post_accumulate_grad_hook(lambda _: seen.append(sum(q.grad is not None for q in params)))
    wrapped = fuse_optimizer(opt, per_tensor=groups is None, groups=groups, max_grad_norm=max_grad_norm)
    assert isinstance(wrapped, FusedOptimizer)
    assert wrapped.num_chunks == {None: 6, 3: 3, 1: 1}[groups]
    for step in range(3):
        skip = step == 1  # the last layer gets no gradient: its group steps partly, from step()
        _loss(plain, x, skip).backward()
        if max_grad_norm:
            size = {None: 1, 3: 2, 1: 6}[groups]
            ps = list(plain.parameters())
            for i in range(0, len(ps), size):
                torch.nn.utils.clip_grad_norm_(ps[i : i + size], max_grad_norm)
        opt_plain.step()
        opt_plain.zero_grad(set_to_none=True)
        _loss(fused, x, skip).backward()
        wrapped.step()
        wrapped.zero_grad()
        assert all(p.grad is None for p in params)
    assert max(seen) == coexisting
    for a, b in zip(plain.parameters(), fused.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
    assert opt.state_dict()["param_groups"][1]["params"] == [4, 5]  # layout restored after each step


@pytest.mark.parametrize("fused", [["--fused_backward_pass"], ["--fused_optimizer_groups", "4"]])
def test_fused_sdxl_with_unused_text_encoder_layer(tiny_sdxl_dir: Path, data: Path, tmp_path: Path, fused):
    """SDXL's text encoder 1 last layer gets no gradient: its tensors' group steps partly, after backward."""
    common = ["--max_train_steps", "3", "--cache_latents", "--max_grad_norm", "0"]
    outputs = []
    for name, extra in (("plain", []), ("fused", fused)):
        assert run_sdxl(db_args(tiny_sdxl_dir, data, tmp_path / name, *common, *extra)) == 0
        outputs.append(load_file(str(tmp_path / name / f"{NAME}.safetensors")))
    _assert_same(*outputs)
    assert any(k.startswith("lora_te1_") for k in outputs[1])
