"""Precision of the trained and the frozen weights: fp32 LoRA under bf16 autocast, --full_bf16 with
stochastic rounding (library/memory/stochastic_rounding.py), and fp8 base weights for SD1 and SDXL."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file
from train_helpers import NAME, db_args, make_images

from library.memory.fp8 import store_fp8
from library.memory.stochastic_rounding import enable_stochastic_rounding, stochastic_round_bf16

FP8_REL_TOLERANCE = 0.05  # fp8 e4m3 keeps 3 mantissa bits: ~2-3% per weight, partly averaging out


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return make_images(tmp_path / "data", n=4)


def _build(family_name: str, args: list[str]):
    from library.config import parse_config
    from library.families import get_family
    from library.training.setup import build_run

    return build_run(parse_config(args, prog="t", description="t"), get_family(family_name))


def _inner(optimizer):
    return getattr(optimizer, "optimizer", optimizer)


def test_stochastic_rounding_is_exact_on_bf16_values_and_brackets_others():
    exact = torch.randn(1000).to(torch.bfloat16)
    assert torch.equal(stochastic_round_bf16(exact.float()), exact)
    x = torch.tensor([1.0 + 2**-9] * 20000)  # a quarter of the way from 1 to the next bf16 value 1 + 2**-7
    rounded = stochastic_round_bf16(x, torch.Generator().manual_seed(0)).float()
    assert set(rounded.unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert (rounded == 1.0 + 2**-7).float().mean().item() == pytest.approx(0.25, abs=0.02)
    assert torch.equal(stochastic_round_bf16(-x, torch.Generator().manual_seed(0)).float(), -rounded)


def _decay(dtype: torch.dtype, rounding: bool, steps: int = 1000) -> tuple[torch.Tensor, dict]:
    """AdamW on zero gradients: only the decoupled weight decay acts, 1e-4 of the value per step."""
    p = torch.nn.Parameter(torch.ones(4096, dtype=dtype))
    opt = torch.optim.AdamW([p], lr=1e-3, weight_decay=0.1)
    if rounding:
        enable_stochastic_rounding(opt, seed=0)
    for _ in range(steps):
        p.grad = torch.zeros_like(p)
        opt.step()
    return p.detach(), opt.state[p]


def test_stochastic_rounding_keeps_the_weight_decay_plain_bf16_loses():
    fp32, _ = _decay(torch.float32, rounding=False)
    plain, _ = _decay(torch.bfloat16, rounding=False)
    rounded, state = _decay(torch.bfloat16, rounding=True)
    expected = (1 - 1e-4) ** 1000  # 0.904837
    assert fp32.mean().item() == pytest.approx(expected, rel=1e-4)  # fp32 rounding of 1000 products
    assert torch.equal(plain, torch.ones_like(plain))  # 1e-4 is below half a bf16 step under 1.0 (2**-9)
    assert rounded.dtype == torch.bfloat16
    # per element std ~0.018, so the mean of 4096 is within ~3e-4 of its expectation
    assert rounded.float().mean().item() == pytest.approx(expected, abs=1.5e-3)
    assert {k: v.dtype for k, v in state.items() if k != "step"} == {
        "exp_avg": torch.float32,
        "exp_avg_sq": torch.float32,
    }


def test_stochastic_rounding_upcasts_a_resumed_bf16_state():
    p = torch.nn.Parameter(torch.ones(8, dtype=torch.bfloat16))
    opt = torch.optim.AdamW([p], lr=0.05)  # a step of ~0.03, many bf16 steps: every value moves
    opt.state[p] = {
        "step": torch.tensor(3.0),
        "exp_avg": torch.zeros(8, dtype=torch.bfloat16),
        "exp_avg_sq": torch.zeros(8, dtype=torch.bfloat16),
    }
    enable_stochastic_rounding(opt, seed=0)
    p.grad = torch.ones_like(p)
    opt.step()
    assert opt.state[p]["exp_avg"].dtype == torch.float32 and p.dtype == torch.bfloat16
    assert p.grad.dtype == torch.bfloat16 and bool((p.float() < 1.0).all())


def test_mixed_bf16_keeps_lora_and_optimizer_state_float32(tiny_sd1_dir: Path, dataset: Path, tmp_path: Path):
    from library.training.loop import train_loop

    args = ["--max_train_steps", "2", "--mixed_precision", "bf16", "--cache_latents"]
    run = _build("sd", db_args(tiny_sd1_dir, dataset, tmp_path / "out", *args))
    to_q = next(m for n, m in run.bundle.unet.named_modules() if n.endswith("attn1.to_q"))
    seen: list[torch.dtype] = []
    to_q.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    train_loop(run)
    assert seen and set(seen) == {torch.bfloat16}  # the forward (LoRA included) ran under bf16 autocast
    assert {p.dtype for p in run.params} == {torch.float32}
    states = _inner(run.optimizer).state
    assert len(states) == len(run.params)
    assert {v.dtype for s in states.values() for k, v in s.items() if k != "step"} == {torch.float32}


@pytest.mark.parametrize("fused", [[], ["--fused_backward_pass"]])
def test_full_bf16_trains_bf16_lora_with_float32_updates(
    fused: list[str], tiny_sd1_dir: Path, dataset: Path, tmp_path: Path
):
    from library.training.loop import train_loop

    args = ["--max_train_steps", "3", "--mixed_precision", "bf16", "--full_bf16", "--cache_latents", *fused]
    run = _build("sd", db_args(tiny_sd1_dir, dataset, tmp_path / "out", *args))
    before = [p.detach().clone() for p in run.params]
    train_loop(run)
    assert {p.dtype for p in run.params} == {torch.bfloat16}
    states = _inner(run.optimizer).state
    assert {v.dtype for s in states.values() for k, v in s.items() if k != "step"} == {torch.float32}
    assert all(bool(torch.isfinite(p).all()) for p in run.params)
    moved = [not torch.equal(a, p.detach()) for a, p in zip(before, run.params, strict=True)]
    assert sum(moved) == len(moved)  # the fused optimizer steps inside backward through the same rounding
    state = load_file(str(tmp_path / "out" / f"{NAME}.safetensors"))
    assert {v.dtype for v in state.values()} == {torch.bfloat16}


def _unet_inputs(unet: UNet2DConditionModel) -> tuple[tuple, dict]:
    cfg = unet.config
    gen = torch.Generator().manual_seed(0)
    size = cfg.sample_size
    sample = torch.randn(2, cfg.in_channels, size, size, generator=gen)
    hidden = torch.randn(2, 7, cfg.cross_attention_dim, generator=gen)
    kwargs: dict = {"encoder_hidden_states": hidden}
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, pooled, generator=gen),
            "time_ids": torch.tensor(
                [[size * 8, size * 8, 0, 0, size * 8, size * 8]] * 2, dtype=torch.float32
            ),
        }
    return (sample, torch.tensor([10, 500])), kwargs


@pytest.mark.parametrize("model", ["tiny_sd1_dir", "tiny_sdxl_dir"])
def test_fp8_unet_output_is_close_to_bf16(model: str, request: pytest.FixtureRequest):
    unet = UNet2DConditionModel.from_pretrained(request.getfixturevalue(model), subfolder="unet")
    unet.requires_grad_(False).eval()
    fp8_unet = copy.deepcopy(unet)
    stored = len(store_fp8(fp8_unet).modules)
    args, kwargs = _unet_inputs(unet)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        reference = unet.to(torch.bfloat16)(*args, **kwargs).sample.float()
        out = fp8_unet(*args, **kwargs).sample.float()
    rel = ((out - reference).norm() / reference.norm()).item()
    print(
        f"{model}: {stored} Linear layers in fp8, relative error of the UNet output against bf16: {rel:.4f}"
    )
    assert stored > 10 and torch.isfinite(out).all()
    assert 0 < rel < FP8_REL_TOLERANCE


@pytest.mark.parametrize(("family", "model"), [("sd", "tiny_sd1_dir"), ("sdxl", "tiny_sdxl_dir")])
def test_fp8_base_trains_sd_and_sdxl(
    family: str, model: str, dataset: Path, tmp_path: Path, request: pytest.FixtureRequest
):
    from library.training.loop import train_loop

    args = ["--max_train_steps", "2", "--mixed_precision", "bf16", "--fp8_base", "--cache_latents"]
    run = _build(family, db_args(request.getfixturevalue(model), dataset, tmp_path / "out", *args))
    to_q = next(m for n, m in run.bundle.unet.named_modules() if n.endswith("attn1.to_q"))
    assert to_q.weight.dtype == torch.float8_e4m3fn
    for te in run.bundle.text_encoders:
        fc1 = next(m for n, m in te.named_modules() if n.endswith("mlp.fc1"))
        assert fc1.weight.dtype == torch.float8_e4m3fn
    before = [p.detach().clone() for p in run.params]
    train_loop(run)
    assert {p.dtype for p in run.params} == {torch.float32}
    assert all(bool(torch.isfinite(p).all()) for p in run.params)
    names = {id(p): n for n, p in run.network.named_parameters()}
    frozen = {names[id(p)] for a, p in zip(before, run.params, strict=True) if torch.equal(a, p)}
    # Every LoRA tensor trained, except (SDXL) those on the last layer of TE1: its penultimate output is used.
    last_te1 = "lora_te1_text_model_encoder_layers_2_"
    assert frozen == ({n for n in names.values() if n.startswith(last_te1)} if family == "sdxl" else set())
    assert len(frozen) == (12 if family == "sdxl" else 0)
    state = load_file(str(tmp_path / "out" / f"{NAME}.safetensors"))
    assert any(k.startswith("lora_te") for k in state) and any(k.startswith("lora_unet_") for k in state)
    assert all(bool(torch.isfinite(v).all()) for v in state.values())


def test_full_bf16_resumes_its_float32_state(tiny_sd1_dir: Path, tmp_path: Path):
    from library.training.loop import train_loop

    data = make_images(tmp_path / "data", n=1)  # 2 items, batch 2: one step per epoch
    precision = ["--mixed_precision", "bf16", "--full_bf16", "--cache_latents", "--save_state"]
    first = db_args(tiny_sd1_dir, data, tmp_path / "a", "--max_train_epochs", "1", *precision)
    train_loop(_build("sd", first))
    resume = ["--resume", str(tmp_path / "a" / f"{NAME}-state"), "--max_train_epochs", "2"]
    run = _build("sd", db_args(tiny_sd1_dir, data, tmp_path / "b", *precision, *resume))
    states = _inner(run.optimizer).state
    # torch casts a loaded state to its parameter's dtype; the first rounded step makes it float32 again
    assert {v.dtype for s in states.values() for k, v in s.items() if k != "step"} == {torch.bfloat16}
    train_loop(run)
    assert run.progress.global_step == 2
    assert {v.dtype for s in states.values() for k, v in s.items() if k != "step"} == {torch.float32}
    assert {p.dtype for p in run.params} == {torch.bfloat16}
    assert all(bool(torch.isfinite(p).all()) for p in run.params)
