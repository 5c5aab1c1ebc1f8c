"""Text-encoder output caching: every distinct caption encoded once, served from RAM at each step.

Model-agnostic: the encoder is a callable (captions -> dict of batch-first tensors, e.g. SD's
`encoder_hidden_states`, SDXL's `hidden_state1`/`hidden_state2`/`pool2`), and the cache id names it (weights,
tokenizers, clip skip, token length, weighting), so outputs of another encoder are never reused.

Only a caption that is the same at every step can be cached: shuffling, caption or tag dropout, token warmup
and wildcards change it per step, so `text_cache_problems` reports them before any weights load. The fixed
caption is the dataset's own pipeline (`process_caption`) run once, so prefix, suffix, keep-token separators
and secondary separators come out exactly as in training.

Disk files are kohya's `<image stem>_te_outputs.npz` (FLUX: `_flux_te.npz`): one float32 array per output key (without the batch
dimension), plus our keys `caption` and `cache_id`. A file is reused only when both match; a kohya file
(without them) cannot be checked and is rewritten, as is any unreadable one.
"""

from __future__ import annotations

import logging
import random
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from library.data.captions import process_caption
from library.data.npz_io import save_npz_atomically
from library.data.sharing import ALONE, Share
from library.errors import UserError

if TYPE_CHECKING:
    from library.data.dataset import DatasetGroup
    from library.data.dataset_config import DatasetSpec, SubsetSpec
    from library.data.scan import ImageItem

logger = logging.getLogger(__name__)

NPZ_SUFFIX = "_te_outputs.npz"
_OUR_KEYS = ("caption", "cache_id")
_READ_ERRORS = (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError)

Outputs = dict[str, torch.Tensor]
Encoder = Callable[[list[str]], Outputs]


def te_npz_path(image_path: Path, file_suffix: str = NPZ_SUFFIX) -> Path:
    """kohya's name: `<image stem>_te_outputs.npz` next to the image."""
    return image_path.with_name(image_path.stem + file_suffix)


def _random_options(subset: SubsetSpec) -> list[tuple[str, str]]:
    """(option, shown value) of each caption option that makes the caption change from step to step."""
    found = []
    if subset.shuffle_caption:
        found.append(("shuffle_caption", "true"))
    for name in ("caption_dropout_rate", "caption_dropout_every_n_epochs", "caption_tag_dropout_rate"):
        if getattr(subset, name) > 0:
            found.append((name, f"{getattr(subset, name)}"))
    if subset.token_warmup_step > 0:
        found.append(("token_warmup_step", f"{subset.token_warmup_step}"))
    if subset.enable_wildcard:
        found.append(("enable_wildcard", "true"))
    return found


def text_cache_problems(
    specs: Iterable[DatasetSpec], flag: str = "--cache_text_encoder_outputs"
) -> list[str]:
    """One line per subset option that a cached (fixed) caption cannot honour."""
    problems = []
    for d, spec in enumerate(specs):
        for s, subset in enumerate(spec.subsets):
            for option, shown in _random_options(subset):
                problems.append(
                    f"{flag} is not compatible with {option}: dataset {d + 1} subset {s + 1} ({subset.image_dir}) "
                    f"has {option} = {shown} (cached outputs would freeze one version of each caption); "
                    f"remove {option} there (or --{option}) or remove {flag}"
                )
    return problems


def fixed_caption(item: ImageItem, subset: SubsetSpec) -> str:
    """The caption the text encoder sees for this item at every step (its subset has no random option)."""
    return process_caption(item.caption, subset.caption_options, random.Random(0))


@dataclass(frozen=True)
class TextCacheReport:
    encoded: int  # captions encoded (RAM) or files written (disk)
    reused: int  # valid disk files read
    to_disk: bool
    encoded_here: int | None = None  # several processes: captions this one encoded

    def __str__(self) -> str:
        where = "disk" if self.to_disk else "RAM"
        here = f" ({self.encoded_here} captions by this process)" if self.encoded_here is not None else ""
        return f"text-encoder outputs ({where}): {self.encoded} encoded{here}, {self.reused} reused"


@dataclass
class TextEncoderCache:
    """Processed caption -> the encoder's outputs for it (CPU tensors without the batch dimension)."""

    entries: dict[str, Outputs] = field(default_factory=dict)
    report: TextCacheReport | None = None  # how it was filled

    def lookup(self, captions: list[str], device: torch.device | None = None) -> Outputs:
        """The batch's outputs, stacked [B, ...] and sent to `device` (None: left on the CPU) without waiting
        for the copy."""
        try:
            rows = [self.entries[caption] for caption in captions]
        except KeyError as e:
            raise RuntimeError(f"caption {e.args[0]!r} is not in the text-encoder output cache") from None
        stacked = {key: torch.stack([row[key] for row in rows]) for key in rows[0]}
        if device is None:
            return stacked
        if device.type == "cuda":
            # A copy from pageable memory is synchronous; from page-locked memory it overlaps the step
            # (torch's host allocator caches the pinned blocks, so this does not allocate per step).
            stacked = {key: value.pin_memory() for key, value in stacked.items()}
        return {key: value.to(device, non_blocking=True) for key, value in stacked.items()}


def _fixed_captions(groups: Iterable[DatasetGroup]) -> list[tuple[Path, str]]:
    """(image, fixed caption) of every item of the groups."""
    return [
        (item.path, fixed_caption(item, ds.subset(item)))
        for group in groups
        for ds, item in group.iter_items()
    ]


def _one_caption_per_file(
    pairs: list[tuple[Path, str]], flag: str, file_suffix: str = NPZ_SUFFIX
) -> dict[Path, str]:
    """Image -> its caption; an image used with two captions (by two subsets) cannot have one disk file."""
    captions: dict[Path, str] = {}
    problems = []
    for image, caption in pairs:
        known = captions.setdefault(image, caption)
        if known != caption:
            problems.append(
                f"{image} is used with two captions ({known!r} and {caption!r}) but its "
                f"{te_npz_path(image, file_suffix).name} holds one; cache in RAM (--cache_text_encoder_outputs instead of "
                f"{flag}) or give both subsets the same caption settings"
            )
    if problems:
        raise UserError(*problems)
    return captions


def _holds(path: Path, caption: str, cache_id: str) -> bool:
    """Whether a file records this caption and encoder; reads only those two small arrays."""
    try:
        with np.load(path) as npz:
            if any(k not in npz.files for k in _OUR_KEYS):
                return False
            return str(npz["caption"]) == caption and str(npz["cache_id"]) == cache_id
    except _READ_ERRORS:
        return False


def check_text_cache(
    groups: list[DatasetGroup], cache_id: str, file_suffix: str = NPZ_SUFFIX
) -> tuple[int, int]:
    """(valid files, images to encode) of the disk cache, for the plan; encodes and changes nothing."""
    flag = "--cache_text_encoder_outputs_to_disk"
    by_image = _one_caption_per_file(_fixed_captions(groups), flag, file_suffix)
    hits = sum(
        _holds(te_npz_path(image, file_suffix), caption, cache_id) for image, caption in by_image.items()
    )
    return hits, len(by_image) - hits


def distinct_captions(groups: list[DatasetGroup]) -> int:
    return len({caption for _, caption in _fixed_captions(groups)})


def read_npz(path: Path, caption: str, cache_id: str, dtype: torch.dtype) -> Outputs | None:
    """The outputs in a cache file when it holds this caption from this encoder; None when stale or unreadable."""
    if not path.is_file():
        return None
    try:
        with np.load(path) as npz:
            keys = [k for k in npz.files if k not in _OUR_KEYS]
            if not keys or any(k not in npz.files for k in _OUR_KEYS):
                return None  # kohya's file (or a foreign one): its encoder and caption are unknown
            if str(npz["caption"]) != caption or str(npz["cache_id"]) != cache_id:
                return None
            arrays = {k: npz[k] for k in keys}
    except _READ_ERRORS:
        return None
    return {k: torch.from_numpy(a.astype(np.float32, copy=False)).to(dtype) for k, a in arrays.items()}


def write_npz(path: Path, outputs: Outputs, caption: str, cache_id: str) -> None:
    """Atomically (temp file, then rename): an interrupted run never leaves a half-written file."""
    arrays = {k: v.detach().to("cpu", torch.float32).numpy() for k, v in outputs.items()}
    arrays.update(caption=np.array(caption), cache_id=np.array(cache_id))
    save_npz_atomically(path, arrays, "text-encoder cache")


def _signature(outputs: Outputs) -> tuple:
    return tuple(sorted((k, tuple(v.shape)) for k, v in outputs.items()))


def _encode_all(
    captions: list[str],
    encode: Encoder,
    batch_size: int,
    dtype: torch.dtype,
    show_progress: bool,
    share: Share = ALONE,
) -> tuple[dict[str, Outputs], int]:
    """(caption -> outputs for every caption, how many this process encoded). Several processes: chunk i
    is encoded by process i % world and the outputs are exchanged after each round."""
    progress = None
    if show_progress and len(captions) > batch_size and share.rank == 0:
        from tqdm import tqdm

        progress = tqdm(total=len(captions), desc="caching text-encoder outputs", unit="caption")
    chunks = [captions[start : start + batch_size] for start in range(0, len(captions), batch_size)]
    encoded: dict[str, Outputs] = {}
    here = 0
    for _, mine in share.rounds(len(chunks)):
        mine_encoded = {} if mine is None else _encode_chunk(chunks[mine], encode, dtype)
        here += len(mine_encoded)
        for part in share.gather(mine_encoded):
            encoded.update(part)
            if progress is not None:
                progress.update(len(part))
    if progress is not None:
        progress.close()
    return encoded, here


def _encode_chunk(chunk: list[str], encode: Encoder, dtype: torch.dtype) -> dict[str, Outputs]:
    encoded: dict[str, Outputs] = {}
    if chunk:
        with torch.no_grad():
            outputs = encode(chunk)
        reserved = [k for k in outputs if k in _OUR_KEYS]
        bad = [k for k, v in outputs.items() if v.ndim < 1 or v.shape[0] != len(chunk)]
        if reserved or bad:
            raise ValueError(
                f"encode must return batch-first tensors not named {_OUR_KEYS}; got {reserved + bad}"
            )
        outputs = {k: v.detach().to("cpu", dtype) for k, v in outputs.items()}
        for i, caption in enumerate(chunk):
            # clone: a row would keep (and, sent to other processes, pickle) the whole chunk's storage
            encoded[caption] = {k: v[i].clone() for k, v in outputs.items()}
    return encoded


def cache_text_outputs(
    groups: list[DatasetGroup],
    encode: Encoder,
    *,
    cache_id: str,
    to_disk: bool,
    batch_size: int,
    dtype: torch.dtype = torch.float32,
    flag: str = "--cache_text_encoder_outputs",
    show_progress: bool = True,
    file_suffix: str = NPZ_SUFFIX,
    share: Share = ALONE,
) -> TextEncoderCache:
    """Encode the fixed caption of every item of the groups (training and validation) once, in sorted batches.

    `encode` maps captions to batch-first tensors (any device, no gradients needed); they are kept on the CPU
    in `dtype`. With `to_disk`, valid `<stem>_te_outputs.npz` files are read instead and every other image's
    file is (re)written. Raises UserError when a subset's captions are random or a file cannot be written.

    Several processes (`share`): each encodes its share of the captions and the outputs are exchanged (the
    step needs every caption's outputs in every process); stale files are written by process i % world.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    problems = text_cache_problems([ds.spec for group in groups for ds in group.datasets], flag)
    if problems:
        raise UserError(*problems)
    pairs = _fixed_captions(groups)
    by_image = _one_caption_per_file(pairs, flag, file_suffix) if to_disk else {}
    cache = TextEncoderCache()
    stale: list[Path] = []
    loaded: dict[Path, Outputs] = {}
    if to_disk:
        for image, caption in by_image.items():
            outputs = read_npz(te_npz_path(image, file_suffix), caption, cache_id, dtype)
            if outputs is None:
                stale.append(image)
            else:
                loaded[image] = outputs
    share.barrier()  # every process has read the existing files before any process writes one
    wanted = sorted({by_image[i] for i in stale} if to_disk else {caption for _, caption in pairs})
    encoded_now, here = _encode_all(wanted, encode, batch_size, dtype, show_progress, share)
    cache.entries.update(encoded_now)
    # Files from another version of the encoder code with the same id would break stacking mid-training.
    signatures = [_signature(o) for o in cache.entries.values()] or [_signature(o) for o in loaded.values()]
    if loaded:
        reference = Counter(signatures).most_common(1)[0][0]
        mismatched = [image for image, outputs in loaded.items() if _signature(outputs) != reference]
        for image in mismatched:
            del loaded[image]
        stale += mismatched
        missing = sorted({by_image[i] for i in mismatched} - set(cache.entries))
        encoded_now, more = _encode_all(missing, encode, batch_size, dtype, show_progress, share)
        cache.entries.update(encoded_now)
        here += more
    for image, outputs in loaded.items():
        cache.entries.setdefault(by_image[image], outputs)
    for i, image in enumerate(stale):
        if i % share.world == share.rank:
            caption = by_image[image]
            write_npz(te_npz_path(image, file_suffix), cache.entries[caption], caption, cache_id)
    encoded = len(stale) if to_disk else len(wanted)
    cache.report = TextCacheReport(
        encoded=encoded,
        reused=len(loaded),
        to_disk=to_disk,
        encoded_here=here if share.world > 1 else None,
    )
    return cache
