"""A test mover for library/memory/block_swap.py: evicted blocks' frozen tensors hold NaN until fetched."""

from __future__ import annotations

import torch
from torch import nn


def frozen_tensors(unit: nn.Module) -> list[torch.Tensor]:
    """What the swapper moves: the frozen parameters and the buffers."""
    return [p for p in unit.parameters() if not p.requires_grad] + list(unit.buffers())


class PoisonMover:
    """Records the calls; an evicted unit's frozen tensors hold NaN (in place) until fetched again."""

    def __init__(self, units: list[nn.Module], swapper_ref: list) -> None:
        self.units, self.swapper_ref = units, swapper_ref
        self.real = {i: [t.detach().clone() for t in frozen_tensors(u)] for i, u in enumerate(units)}
        self.calls: list[tuple[str, int]] = []
        self.max_resident = 0

    def poison_all(self, first: int) -> None:
        for unit in self.units[first:]:
            for t in frozen_tensors(unit):
                t.data = torch.full_like(t, float("nan"))

    def fetch(self, index: int) -> None:
        self.calls.append(("fetch", index))
        for t, real in zip(frozen_tensors(self.units[index]), self.real[index], strict=True):
            t.data = real.clone()
        self.max_resident = max(self.max_resident, len(self.swapper_ref[0].resident) + 1)

    def wait(self, index: int) -> None:
        self.calls.append(("wait", index))

    def evict(self, index: int) -> None:
        self.calls.append(("evict", index))
        for t in frozen_tensors(self.units[index]):
            t.data.fill_(float("nan"))  # the storage it had: a view saved in forward would read NaN
