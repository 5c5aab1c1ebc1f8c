"""The resolved dataset blueprint: plain frozen values that dataset building and caching consume."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from functools import cached_property
from pathlib import Path

from library.data.captions import CaptionOptions
from library.data.images import PixelOptions


@dataclass(frozen=True)
class DatasetDefaults:
    """Values from the CLI / training config (kohya flag names); None = not given."""

    resolution: tuple[int, int] | None = None
    train_batch_size: int = 1
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    caption_extension: str = ".caption"
    shuffle_caption: bool = False
    caption_separator: str = ","
    keep_tokens: int = 0
    flip_aug: bool = False
    random_crop: bool = False
    color_aug: bool = False
    face_crop_aug_range: tuple[float, float] | None = None
    resize_interpolation: str | None = None
    alpha_mask: bool = False
    masked_loss: bool = False  # not a key: it decides whether subsets need (and may have) mask folders
    dataset_repeats: int = 1
    prior_loss_weight: float = 1.0
    validation_split: float = 0.0
    validation_seed: int | None = None
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    keep_tokens_separator: str = ""
    secondary_separator: str | None = None
    enable_wildcard: bool = False
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    token_warmup_min: int = 1
    token_warmup_step: float = 0.0


@dataclass(frozen=True)
class SubsetSpec:
    """One image folder with its caption and augmentation settings."""

    image_dir: Path
    num_repeats: int
    is_reg: bool
    class_tokens: str | None
    caption_extension: str
    shuffle_caption: bool
    caption_separator: str
    keep_tokens: int
    caption_prefix: str | None
    caption_suffix: str | None
    flip_aug: bool
    random_crop: bool
    # A fine-tune subset: captions (and maybe sizes) come from this kohya metadata JSON/JSONL, and
    # image_dir is where its relative image keys live.
    metadata_file: Path | None = field(default=None, kw_only=True)
    # Keyword-only with kohya's defaults, so code that builds a SubsetSpec need not spell them all out.
    keep_tokens_separator: str = field(default="", kw_only=True)
    secondary_separator: str | None = field(default=None, kw_only=True)
    enable_wildcard: bool = field(default=False, kw_only=True)
    caption_dropout_rate: float = field(default=0.0, kw_only=True)
    caption_dropout_every_n_epochs: int = field(default=0, kw_only=True)
    caption_tag_dropout_rate: float = field(default=0.0, kw_only=True)
    token_warmup_min: int = field(default=1, kw_only=True)
    token_warmup_step: float = field(default=0.0, kw_only=True)
    color_aug: bool = field(default=False, kw_only=True)
    face_crop_aug_range: tuple[float, float] | None = field(default=None, kw_only=True)
    resize_interpolation: str | None = field(default=None, kw_only=True)
    alpha_mask: bool = field(default=False, kw_only=True)
    conditioning_data_dir: Path | None = field(default=None, kw_only=True)  # mask images (--masked_loss)

    @cached_property
    def pixel_options(self) -> PixelOptions:
        """Augmentation and resampling settings for image loading (built once; read per sample per step)."""
        return PixelOptions(**{f.name: getattr(self, f.name) for f in fields(PixelOptions)})

    @cached_property
    def caption_options(self) -> CaptionOptions:
        """The caption pipeline settings (built once; read per sample per step)."""
        return CaptionOptions(**{f.name: getattr(self, f.name) for f in fields(CaptionOptions)})


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset: its own resolution, batch size and buckets (min/max already snapped to the step)."""

    resolution: tuple[int, int]
    batch_size: int
    enable_bucket: bool
    min_bucket_reso: int
    max_bucket_reso: int
    bucket_reso_steps: int
    bucket_no_upscale: bool
    subsets: tuple[SubsetSpec, ...]
    validation_split: float = 0.0  # share of each non-reg subset held out for validation
    validation_seed: int | None = None  # None: the run's seed
