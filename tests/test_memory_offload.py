"""Checkpointing with CPU-held inputs (library/memory/offload_checkpoint.py): gradients equal the plain path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from library.memory.offload_checkpoint import offloaded_checkpoint


class Block(nn.Module):
    """Frozen base + trainable low-rank part + dropout, two inputs and two outputs like a FLUX double block."""

    def __init__(self) -> None:
        super().__init__()
        self.base = nn.Linear(8, 8).requires_grad_(False)
        self.down = nn.Linear(8, 2, bias=False)
        self.up = nn.Linear(2, 8, bias=False)
        nn.init.normal_(self.up.weight)
        self.drop = nn.Dropout(0.3)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, scale: float = 1.0) -> tuple[torch.Tensor, ...]:
        h = self.base(img) + self.up(self.drop(self.down(img))) * scale
        return torch.tanh(h + txt.mean(0)), txt * 2 + h.sum()


def _grads(fn, make_inputs, checkpointed: bool, autocast: bool = False):
    torch.manual_seed(0)
    blocks = nn.ModuleList([Block(), Block()])
    img, txt = make_inputs()
    torch.manual_seed(1)  # dropout masks
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        for block in blocks:
            if checkpointed:
                img, txt = offloaded_checkpoint(fn(block), img, txt, scale=0.5)
            else:
                img, txt = fn(block)(img, txt, scale=0.5)
    (img.float().square().sum() + txt.float().sum()).backward()
    named = {n: p.grad for n, p in blocks.named_parameters() if p.requires_grad}
    return (img.detach(), txt.detach()), named


def _inputs(requires_grad: bool):
    def make():
        g = torch.Generator().manual_seed(5)
        img = torch.randn(4, 8, generator=g).requires_grad_(requires_grad)
        return img, torch.randn(3, 8, generator=g)

    return make


@pytest.mark.parametrize("requires_grad", [True, False])
@pytest.mark.parametrize("autocast", [False, True])
def test_gradients_equal_plain_path(requires_grad, autocast):
    plain_out, plain = _grads(lambda b: b, _inputs(requires_grad), False, autocast)
    ckpt_out, ckpt = _grads(lambda b: b, _inputs(requires_grad), True, autocast)
    assert all(torch.equal(a, b) for a, b in zip(plain_out, ckpt_out, strict=True))
    assert plain.keys() == ckpt.keys() and len(plain) == 4
    for name in plain:
        assert ckpt[name] is not None and torch.equal(plain[name], ckpt[name]), name


def test_input_gradient_equals_plain_path():
    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        block = Block()
        img = torch.randn(4, 8, generator=torch.Generator().manual_seed(2), requires_grad=True)
        txt = torch.randn(3, 8, generator=torch.Generator().manual_seed(3), requires_grad=True)
        torch.manual_seed(1)
        out = offloaded_checkpoint(block, img, txt) if checkpointed else block(img, txt)
        (out[0].sum() * 3 + out[1].square().sum()).backward()
        grads.append((img.grad, txt.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_only_the_inputs_are_kept_in_forward():
    def saved_in_forward(checkpointed: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        saved: list[torch.Tensor] = []
        block = Block()
        inputs = [torch.randn(4, 8, requires_grad=True), torch.randn(3, 8)]
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            if checkpointed:
                offloaded_checkpoint(block, *inputs)
            else:
                block(*inputs)
        return saved, inputs

    assert len(saved_in_forward(False)[0]) > 5
    saved, inputs = saved_in_forward(True)
    # On a CUDA device these are CPU copies held outside autograd; on the CPU the inputs themselves.
    assert len(saved) == 2 and all(s is i for s, i in zip(saved, inputs, strict=True))


def test_in_place_change_of_a_saved_input_is_caught():
    block = Block()
    img = torch.randn(4, 8, requires_grad=True)
    txt = torch.randn(3, 8)
    out = offloaded_checkpoint(block, img, txt)
    txt.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out[0].sum().backward()


def test_no_grad_is_a_plain_call():
    block = Block().eval()
    img, txt = torch.randn(4, 8), torch.randn(3, 8)
    with torch.no_grad():
        out = offloaded_checkpoint(block, img, txt)
    assert not out[0].requires_grad and torch.equal(out[0], block(img, txt)[0])


def test_nested_and_keyword_tensors_get_their_gradients():
    """diffusers' call shapes: None positionally, a tuple of tensors (FLUX's rotary table), keyword tensors."""
    lin = nn.Linear(8, 8)

    def block(x, mask, rotary, *, gate, scale=1.0):
        assert mask is None
        cos, sin = rotary
        return torch.tanh(lin(x) * cos + sin) * gate * scale

    def grads(checkpointed: bool):
        lin.zero_grad()
        g = torch.Generator().manual_seed(4)
        x = torch.randn(3, 8, generator=g, requires_grad=True)
        cos = torch.randn(8, generator=g)  # a shared constant: stays where it is
        sin = torch.randn(8, generator=g, requires_grad=True)
        gate_leaf = torch.randn(8, generator=g, requires_grad=True)
        gate = gate_leaf * 2  # not a leaf, and used after the block too
        call = (lambda *a, **k: offloaded_checkpoint(block, *a, **k)) if checkpointed else block
        (call(x, None, (cos, sin), gate=gate, scale=0.5).square().sum() + gate.exp().sum()).backward()
        return [x.grad, sin.grad, gate_leaf.grad, lin.weight.grad]

    plain, ckpt = grads(False), grads(True)
    assert all(c is not None and torch.equal(p, c) for p, c in zip(plain, ckpt, strict=True))
