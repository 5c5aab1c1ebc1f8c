"""Work split over the processes of a multi-process launch (caching latents and text-encoder outputs).

The data layer knows no process group: the training passes a `Share` holding this process's rank, the
process count and an all-gather function (library/training/ddp.py builds it from torch.distributed).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Share:
    rank: int = 0
    world: int = 1
    # Every process's value, in rank order; every process must call it the same number of times.
    all_gather: Callable[[Any], list[Any]] | None = None

    def gather(self, value: Any) -> list[Any]:
        if self.world == 1 or self.all_gather is None:
            return [value]
        return self.all_gather(value)

    def barrier(self) -> None:
        self.gather(None)

    def rounds(self, count: int) -> Iterator[tuple[int, int | None]]:
        """(first index of the round, this process's index or None) over `count` work items handed out in
        rounds of `world`: item i goes to process i % world, all processes walk the same rounds."""
        for start in range(0, count, self.world):
            mine = start + self.rank
            yield start, mine if mine < count else None


ALONE = Share()


def stable_seed(text: str) -> int:
    """A 63-bit seed from a string, the same in every process and run."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


@contextmanager
def seeded_rng(seed: int | None) -> Iterator[None]:
    """Run the block with the global RNGs (CPU and every CUDA device) seeded with `seed` and restore them
    afterwards: a VAE's `latent_dist.sample()` then draws the same for the same images however the work was
    split, and the caller's random stream does not depend on how much was encoded. None: no change."""
    if seed is None:
        yield
        return
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
