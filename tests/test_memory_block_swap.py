"""Block swapping (library/memory/block_swap.py): the schedule, checked on CPU with an injected mover.

The poisoning mover fills an evicted block's weights with NaN, so a block used while it is away shows up as
NaN outputs or gradients; equal results with and without swapping prove every use came after its fetch.
"""

from __future__ import annotations

import logging

import pytest
import torch
from swap_helpers import PoisonMover
from torch import nn
from torch.utils.checkpoint import checkpoint

from library.memory.block_swap import BlockSwapper, move_except_swapped
from library.memory.offload_checkpoint import offloaded_checkpoint


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.base = nn.Linear(8, 8).requires_grad_(False)
        self.register_buffer("shift", torch.full((8,), 0.1))
        self.down = nn.Linear(8, 2, bias=False)  # trainable: stays where it is
        self.up = nn.Linear(2, 8, bias=False)
        nn.init.normal_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.base(x) + self.up(self.down(x)) + self.shift)


def _model(n: int = 4) -> nn.ModuleList:
    torch.manual_seed(0)
    return nn.ModuleList([Block() for _ in range(n)])


def _swapped(blocks: nn.ModuleList, count: int) -> tuple[BlockSwapper, PoisonMover]:
    ref: list = []
    mover = PoisonMover(list(blocks), ref)
    mover.poison_all(len(blocks) - count)  # swapped blocks start away from the "device"
    swapper = BlockSwapper(blocks, count, "cpu", mover=mover)
    ref.append(swapper)
    return swapper, mover


def _run(blocks: nn.ModuleList, wrap: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    for block in blocks:
        if wrap == "checkpoint":
            x = checkpoint(block, x, use_reentrant=False)
        elif wrap == "offload":
            x = offloaded_checkpoint(block, x)
        else:
            x = block(x)
    x.square().sum().backward()
    grads = [p.grad.clone() for p in blocks.parameters() if p.requires_grad]
    return x.detach(), grads


def test_schedule_forward_and_backward():
    blocks = _model(4)
    swapper, mover = _swapped(blocks, 2)
    _run(blocks, "plain")
    assert mover.calls == [
        ("fetch", 2),  # while block 1 runs
        ("wait", 2),
        ("fetch", 3),  # while block 2 runs
        ("evict", 2),
        ("wait", 3),  # block 3 stays: backward starts with it
        ("fetch", 2),  # backward of block 3 starts
        ("evict", 3),  # backward of block 2 starts
        ("wait", 2),
        ("evict", 2),  # backward of block 1 starts
    ]
    assert swapper.resident == set()


@pytest.mark.parametrize("wrap", ["plain", "checkpoint", "offload"])
@pytest.mark.parametrize("count", [1, 3, 5])
def test_numerics_equal_without_swapping(wrap, count):
    want_out, want_grads = _run(_model(5), wrap)
    blocks = _model(5)
    swapper, mover = _swapped(blocks, count)
    out, grads = _run(blocks, wrap)
    assert torch.equal(out, want_out)
    assert all(torch.equal(a, b) for a, b in zip(grads, want_grads, strict=True))
    assert mover.max_resident <= 2 and swapper.resident <= {0, 1}
    fetched = {i for op, i in mover.calls if op == "fetch"}
    assert fetched == set(range(5 - count, 5))
    # A second step sees the same numbers: nothing was left poisoned or stale.
    for p in blocks.parameters():
        p.grad = None
    out2, grads2 = _run(blocks, wrap)
    assert torch.equal(out2, want_out) and all(
        torch.equal(a, b) for a, b in zip(grads2, want_grads, strict=True)
    )


def test_inference_leaves_nothing_on_the_device():
    blocks = _model(4)
    swapper, mover = _swapped(blocks, 2)
    x = torch.randn(3, 8)
    with torch.no_grad():
        y = x
        for block in blocks:
            y = block(y)
        want = x
        for block in _model(4):
            want = block(want)
    assert torch.equal(y, want)
    assert swapper.resident == set() and mover.calls[-1] == ("evict", 3)


def test_cpu_device_is_a_logged_no_op(caplog):
    blocks = _model(3)
    want, want_grads = _run(_model(3), "plain")
    with caplog.at_level(logging.INFO, logger="library.memory.block_swap"):
        swapper = BlockSwapper(blocks, 2, "cpu")
    assert not swapper.active and not blocks[0]._forward_pre_hooks
    assert [r.getMessage() for r in caplog.records] == [
        "blocks_to_swap=2 ignored: block swapping needs a CUDA device, not cpu"
    ]
    out, grads = _run(blocks, "plain")
    assert torch.equal(out, want) and all(torch.equal(a, b) for a, b in zip(grads, want_grads, strict=True))
    model = nn.Sequential(blocks)
    move_except_swapped(model, swapper, blocks)  # plain .to() when inactive
    swapper.remove()


def test_remove_and_range_checks():
    blocks = _model(3)
    swapper, _ = _swapped(blocks, 1)
    assert blocks[2]._forward_pre_hooks
    swapper.remove()
    assert not blocks[2]._forward_pre_hooks and not swapper.active
    assert not BlockSwapper(blocks, 0, "cuda").active  # zero: nothing to do, no CUDA needed
    with pytest.raises(ValueError, match=r"blocks_to_swap must be in \[0, 3\]"):
        BlockSwapper(blocks, 4, "cpu")


def test_move_except_swapped_leaves_swapped_blocks_in_cpu_memory():
    blocks = _model(3)
    model = nn.Sequential(nn.Linear(8, 8), blocks)
    swapper = BlockSwapper(blocks, 1, "meta", mover=PoisonMover(list(blocks), []))
    move_except_swapped(model, swapper, blocks)
    assert model[0].weight.device.type == "meta" and blocks[1].base.weight.device.type == "meta"
    assert blocks[2].down.weight.device.type == "meta"  # trainable: goes to the device
    assert blocks[2].base.weight.device.type == "cpu" and blocks[2].shift.device.type == "cpu"
