"""DataLoader adapters: batches addressed by (epoch, step), worker errors carried back as data."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from torch.utils.data import Dataset, Sampler, get_worker_info

from library.data.dataset import DatasetGroup
from library.errors import UserError


class EpochBatchDataset(Dataset):
    """Map-style adapter: `dataset[(epoch, step_in_epoch)]` is `group.load_batch(epoch, step_in_epoch)`."""

    def __init__(self, group: DatasetGroup) -> None:
        self.group = group

    def __len__(self) -> int:
        return self.group.num_batches_per_epoch

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any] | FailedBatch:
        epoch, step = key
        try:
            return self.group.load_batch(epoch, step)
        except UserError as e:
            if get_worker_info() is None:
                raise
            return FailedBatch(tuple(e.problems))


@dataclass(frozen=True)
class FailedBatch:
    """What a DataLoader worker returns instead of raising a UserError (e.g. an image that fails to decode).

    The DataLoader re-raises a worker's exception with the worker's traceback pasted into its message, which
    would turn a one-line user error into a wall of text; `raise_if_failed` raises it cleanly instead.
    """

    problems: tuple[str, ...]


def raise_if_failed(batch: dict[str, Any] | FailedBatch) -> dict[str, Any]:
    """The batch from an EpochBatchDataset DataLoader, or the worker's UserError raised in this process."""
    if isinstance(batch, FailedBatch):
        raise UserError(*batch.problems)
    return batch


class EpochBatchSampler(Sampler):
    """Yields (epoch, step) for step in [start_step, num_batches): one epoch, resumable mid-way.

    Use with `DataLoader(EpochBatchDataset(group), batch_size=None, sampler=..., collate_fn=identity_collate)`.
    """

    def __init__(self, group: DatasetGroup, epoch: int, start_step: int = 0) -> None:
        self.num_batches = group.num_batches_per_epoch
        self.epoch = epoch
        self.start_step = start_step

    def __len__(self) -> int:
        return max(0, self.num_batches - self.start_step)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for step in range(self.start_step, self.num_batches):
            yield self.epoch, step


def identity_collate(batch: dict[str, Any]) -> dict[str, Any]:
    """Batches are formed inside the dataset, so the DataLoader must pass them through unchanged."""
    return batch
