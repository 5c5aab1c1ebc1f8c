"""--cache_text_encoder_outputs(_to_disk): the top-level glue between the config, the family and the cache.

The cache itself (library/data/text_cache.py) knows no family: it gets an encode callable built here from
`ModelFamily.encode_prompts` with the training's exact arguments (clip skip, token length, weighting, the
autocast context), and an id naming everything the outputs depend on. After caching the text encoders go back
to the CPU: the step reads the cache instead (library/training/step.py), and sampling borrows them.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch

from library.config import TrainConfig
from library.data.latent_npz import file_stamp
from library.data.sharing import ALONE, Share
from library.data.text_cache import TextEncoderCache, cache_text_outputs
from library.families.base import ModelBundle, ModelFamily

log = logging.getLogger("loratrain")


def caching_text(config: TrainConfig) -> bool:
    return config.cache_text_encoder_outputs or config.cache_text_encoder_outputs_to_disk


def cache_flag(config: TrainConfig) -> str:
    """The flag the user gave, for messages."""
    if config.cache_text_encoder_outputs_to_disk:
        return "--cache_text_encoder_outputs_to_disk"
    return "--cache_text_encoder_outputs"


def _stamps(path: Path, folders: tuple[str, ...]) -> list[tuple[str, int, int]]:
    """(name, size, mtime) of a weights file, or of the files in a model folder's text-encoder/tokenizer parts."""
    if path.is_file():
        return [(path.name, *file_stamp(path))]
    if not path.is_dir():
        return []
    parts = [p for p in sorted(path.iterdir()) if p.is_dir() and p.name.startswith(folders)] or [path]
    return [
        (f"{part.name}/{f.name}", *file_stamp(f))
        for part in parts
        for f in sorted(part.iterdir())
        if f.is_file()
    ]


def text_encoder_cache_id(
    family_name: str,
    model: Path,
    *,
    tokenizer_path: Path | None,
    tokenizer_cache_dir: Path | None,
    clip_skip: int | None,
    tokenizer_2_path: Path | None = None,
    max_token_length: int | None,
    weighted: bool,
) -> str:
    """Names everything cached text-encoder outputs depend on: the text encoders' and tokenizers' files (name,
    size, mtime: cheap, and changed by any replacement) and the encoding options."""
    stamps = _stamps(model, ("text_encoder", "tokenizer"))
    for folder in (tokenizer_path, tokenizer_2_path):
        if folder is not None:
            stamps += _stamps(folder, ("tokenizer",))
    digest = hashlib.sha256(repr((stamps, str(tokenizer_cache_dir))).encode()).hexdigest()[:12]
    return (
        f"{family_name}:{model.name}:{digest}:clip_skip={clip_skip or 1}:"
        f"max_token_length={max_token_length or 75}:weighted={weighted}"
    )


def cache_id_for(config: TrainConfig, family: ModelFamily, max_token_length: int | None) -> str:
    return text_encoder_cache_id(
        family.name,
        Path(config.pretrained_model_name_or_path),
        tokenizer_path=Path(config.tokenizer_path) if config.tokenizer_path else None,
        tokenizer_2_path=Path(config.tokenizer_2_path) if config.tokenizer_2_path else None,
        tokenizer_cache_dir=Path(config.tokenizer_cache_dir) if config.tokenizer_cache_dir else None,
        clip_skip=config.clip_skip,
        max_token_length=max_token_length,
        weighted=config.weighted_captions,
    )


def plan_line(config: TrainConfig, family: ModelFamily, dataset: Any) -> str | None:
    """The plan's text-encoder cache line: disk hits and misses (two small keys per file), or the RAM work."""
    if not caching_text(config):
        return None
    from library.data.text_cache import check_text_cache, distinct_captions

    groups = [dataset] + [v for v in [dataset.validation()] if v is not None]
    if not config.cache_text_encoder_outputs_to_disk:
        count = distinct_captions(groups)
        return f"Text-encoder output cache (RAM): {count} distinct captions will be encoded once loaded"
    max_token_length = None if config.max_token_length in (None, 75) else config.max_token_length
    hits, misses = check_text_cache(
        groups, cache_id_for(config, family, max_token_length), family.text_cache_file_suffix
    )
    return f"Text-encoder output cache (disk): {hits} valid cache files reused, {misses} images to encode"


def _encoder(
    family: ModelFamily,
    bundle: ModelBundle,
    device: torch.device,
    *,
    clip_skip: int | None,
    max_token_length: int | None,
    weighted: bool,
    autocast: Callable[[], AbstractContextManager] | None,
) -> Callable[[list[str]], dict[str, torch.Tensor]]:
    """encode_prompts as a training step calls it; the text encoders move to `device` at the first call only,
    so a fully reused disk cache never moves them."""
    extra = {"weighted": True} if weighted else {}

    def encode(captions: list[str]) -> dict[str, torch.Tensor]:
        for te in bundle.text_encoders:
            te.to(device)
        with torch.no_grad(), autocast() if autocast else nullcontext():
            return family.encode_prompts(
                bundle, captions, clip_skip=clip_skip, max_token_length=max_token_length, **extra
            )

    return encode


def cache_text_encoder_outputs_if_needed(
    config: TrainConfig,
    family: ModelFamily,
    bundle: ModelBundle,
    dataset: Any,
    device: torch.device,
    *,
    dtype: torch.dtype,
    max_token_length: int | None,
    autocast: Callable[[], AbstractContextManager] | None = None,
    share: Share = ALONE,
) -> TextEncoderCache | None:
    """The cache of every training and validation caption (None when not asked for); the text encoders end
    on the CPU. `max_token_length` as the step gets it (None for 75); `share`: this process's part of a
    multi-process launch (the outputs are exchanged, see library/data/text_cache.py)."""
    if not caching_text(config):
        return None
    groups = [dataset] + [v for v in [dataset.validation()] if v is not None]
    encode = _encoder(
        family,
        bundle,
        device,
        clip_skip=config.clip_skip,
        max_token_length=max_token_length,
        weighted=config.weighted_captions,
        autocast=autocast,
    )
    cache = cache_text_outputs(
        groups,
        encode,
        cache_id=cache_id_for(config, family, max_token_length),
        to_disk=config.cache_text_encoder_outputs_to_disk,
        batch_size=config.text_encoder_batch_size
        or max(ds.spec.batch_size for group in groups for ds in group.datasets),
        dtype=dtype,
        flag=cache_flag(config),
        file_suffix=family.text_cache_file_suffix,
        share=share,
    )
    log.info("%s", cache.report)
    for te in bundle.text_encoders:
        te.to("cpu")  # not used per step any more; sampling borrows them
    if device.type == "cuda" and not config.highvram:
        torch.cuda.empty_cache()
    return cache
