"""fp8 base weights (library/memory/fp8.py): exact numerics, memory, and LoRA training on top."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from library.errors import UserError
from library.memory import fp8
from library.memory.fp8 import fp8_problems, store_fp8
from library.memory.linear import restore_forward, save_weight_not_view
from networks.lora import LoRAModule


def _mlp(dtype: torch.dtype = torch.float32) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.LayerNorm(16), nn.Linear(16, 4, bias=False))
    return model.to(dtype).requires_grad_(False)


def _round_tripped(model: nn.Module) -> nn.Module:
    """The plain reference: the same model with every Linear weight rounded through fp8."""
    ref = _mlp()
    ref.load_state_dict(model.state_dict())
    for m in ref.modules():
        if isinstance(m, nn.Linear):
            m.weight.data = m.weight.data.to(torch.float8_e4m3fn).to(torch.float32)
    return ref


def _weight_bytes(model: nn.Module) -> int:
    return sum(
        m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, nn.Linear)
    )


def test_fp8_output_equals_round_tripped_plain_linear():
    model = _mlp()
    ref = _round_tripped(model)
    norm_weight, bias = model[2].weight.clone(), model[0].bias.clone()
    handle = store_fp8(model)
    assert [type(m) for m in handle.modules] == [nn.Linear, nn.Linear]
    assert model[0].weight.dtype == torch.float8_e4m3fn and model[3].weight.dtype == torch.float8_e4m3fn
    assert torch.equal(model[0].bias, bias) and torch.equal(model[2].weight, norm_weight)  # untouched
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(model(x), ref(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = model(x), ref(x)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)


def test_fp8_halves_weight_memory_against_bf16():
    bf16 = _mlp(torch.bfloat16)
    before = _weight_bytes(bf16)
    store_fp8(bf16)
    assert _weight_bytes(bf16) * 2 == before == 2 * (8 * 16 + 16 * 4)


def test_backward_keeps_only_the_fp8_weight():
    model = _mlp()
    store_fp8(model)
    saved: list[torch.dtype] = []
    x = torch.randn(5, 8, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.dtype) or t, lambda t: t):
        model(x).sum().backward()
    weights_saved = [d for d in saved if d == torch.float8_e4m3fn]
    assert len(weights_saved) == 2  # one per Linear, no upcast copy kept for backward
    ref = _round_tripped(model)
    x_ref = x.detach().clone().requires_grad_(True)
    ref(x_ref).sum().backward()
    assert torch.equal(x.grad, x_ref.grad)


def test_lora_trains_on_fp8_linear():
    model = _mlp()
    ref = _round_tripped(model)
    store_fp8(model)
    loras, ref_loras = [], []
    for target, lora_list in ((model, loras), (ref, ref_loras)):
        torch.manual_seed(3)
        for i in (0, 3):
            lora = LoRAModule(f"l{i}", target[i], lora_dim=2, alpha=1.0)
            nn.init.normal_(lora.lora_up.weight)  # non-zero so both LoRA matrices get gradients
            lora.apply_to()
            lora_list.append(lora)
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(2))
    loss, ref_loss = model(x).square().mean(), ref(x).square().mean()
    assert torch.equal(loss, ref_loss)
    loss.backward()
    ref_loss.backward()
    for lora, ref_lora in zip(loras, ref_loras, strict=True):
        for p, q in zip(lora.parameters(), ref_lora.parameters(), strict=True):
            assert p.grad is not None and bool(p.grad.abs().sum() > 0)
            assert torch.equal(p.grad, q.grad)
    assert all(p.grad is None for p in model.parameters())
    opt = torch.optim.SGD([p for lora in loras for p in lora.parameters()], lr=0.1)
    opt.step()
    assert model(x).square().mean() < loss
    assert model[0].weight.dtype == torch.float8_e4m3fn


def test_include_filter_and_remove():
    model = _mlp()
    original = model[3].weight.clone()
    handle = store_fp8(model, include=lambda name, _m: name == "3")
    assert model[0].weight.dtype == torch.float32 and model[3].weight.dtype == torch.float8_e4m3fn
    handle.remove()
    assert model[3].weight.dtype == torch.float32 and "forward" not in model[3].__dict__
    assert torch.equal(model[3].weight, original.to(torch.float8_e4m3fn).float())


def test_trainable_or_other_fp8_weights_are_refused():
    with pytest.raises(ValueError, match="frozen"):
        store_fp8(nn.Linear(2, 2))
    other = nn.Linear(2, 2).requires_grad_(False)
    other.weight.data = other.weight.data.to(torch.float8_e5m2)
    with pytest.raises(ValueError, match="float8_e5m2"):
        store_fp8(other)


def test_missing_float8_is_a_user_error(monkeypatch):
    monkeypatch.setattr(fp8, "fp8_dtype", lambda: None)
    with pytest.raises(UserError, match="no float8 dtype"):
        store_fp8(_mlp())
    assert fp8_problems(True, False, "bf16")[0].startswith("--fp8_base: this torch")


def test_fp8_flag_preconditions():
    assert fp8_problems(False, False, "no") == []
    assert fp8_problems(True, True, "bf16") == []
    assert fp8_problems(False, True, "no") == [
        "--fp8_base_unet needs --mixed_precision bf16 or fp16 (fp8 weights are computed in the mixed precision "
        "dtype)"
    ]


def test_weight_saving_linear_matches_nn_linear_and_reads_weight_at_backward():
    torch.manual_seed(0)
    plain = nn.Linear(8, 4).requires_grad_(False)
    frugal = nn.Linear(8, 4).requires_grad_(False)
    frugal.load_state_dict(plain.state_dict())
    assert save_weight_not_view(frugal) and not save_weight_not_view(frugal)
    for autocast in (False, True):
        grads = []
        for module in (plain, frugal):
            x = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                y = module(x)
            y.float().square().sum().backward()
            grads.append((y, x.grad))
        assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    # Backward reads the parameter as it is then (what block swapping relies on), not a forward-time view.
    x = torch.randn(2, 8, requires_grad=True)
    frugal(x).sum().backward()
    once = x.grad.clone()
    x.grad = None
    y = frugal(x)
    frugal.weight.data = frugal.weight.data * 2
    y.sum().backward()
    assert torch.equal(x.grad, once * 2)
    restore_forward(frugal)
    assert "forward" not in frugal.__dict__
