"""Model-agnostic data pipeline: dataset configs, captions, bucketing, batching and latent caches.

Nothing here imports a model family; the latent cache takes an encoder callable and an id string.
"""

from library.data.bucketing import BucketAssignment, BucketSelector, make_bucket_resolutions
from library.data.captions import CaptionOptions, process_caption, read_caption
from library.data.dataset import DatasetGroup, build_dataset_group
from library.data.dataset_config import (
    DatasetDefaults,
    DatasetSpec,
    SubsetSpec,
    blueprint_from_dirs,
    load_dataset_blueprint,
)
from library.data.latent_cache import CacheReport, cache_latents
from library.data.loader import EpochBatchDataset, EpochBatchSampler, identity_collate

__all__ = [
    "BucketAssignment",
    "BucketSelector",
    "CacheReport",
    "CaptionOptions",
    "DatasetDefaults",
    "DatasetGroup",
    "DatasetSpec",
    "EpochBatchDataset",
    "EpochBatchSampler",
    "SubsetSpec",
    "blueprint_from_dirs",
    "build_dataset_group",
    "cache_latents",
    "identity_collate",
    "load_dataset_blueprint",
    "make_bucket_resolutions",
    "process_caption",
    "read_caption",
]
