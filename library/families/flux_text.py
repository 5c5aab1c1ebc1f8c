"""FLUX.1 text side: CLIP-L pooled vector + T5-XXL sequence, and where their tokenizers come from.

As kohya's strategy_flux: CLIP-L sees 77 tokens and contributes its pooled output (final layer norm at EOS);
T5 sees `t5xxl_max_token_length` tokens (512 for dev, 256 for schnell) and contributes its last hidden state;
with `apply_t5_attn_mask` the padding is masked inside T5 and the mask goes on to the transformer. The output
keys are kohya's cache names (`l_pooled`, `t5_out`, `t5_attn_mask`).

T5 tokenizer resolution: `--tokenizer_2_path`, a diffusers folder's tokenizer_2/, kohya's
`--tokenizer_cache_dir/google_t5-v1_1-xxl`, the local HF cache, the hub when reachable.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from library.errors import UserError
from library.families.sd_text import cached_ids, resolve_tokenizer

T5_HUB = "google/t5-v1_1-xxl"


def _is_t5_dir(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or (folder / "spiece.model").is_file()


def _load_t5(folder: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def _t5_from_hub(cache_dir: Path | None) -> Any | None:
    from transformers import AutoTokenizer

    from library.families.sd_text import _hub_offline, hub_cache_folder

    for probe in ("tokenizer.json", "spiece.model"):
        cached = hub_cache_folder(T5_HUB, None, probe)
        if cached is not None:
            return _load_t5(cached)
    if _hub_offline():
        return None
    try:
        from huggingface_hub import HfApi

        HfApi().model_info(T5_HUB, timeout=5)
        tokenizer = AutoTokenizer.from_pretrained(T5_HUB)
    except Exception:  # network errors come in many types; all mean "not available"
        return None
    if cache_dir is not None:
        tokenizer.save_pretrained(str(cache_dir / T5_HUB.replace("/", "_")))
    return tokenizer


def resolve_t5_tokenizer(
    *, model_path: Path, layout: str, tokenizer_path: Path | None, tokenizer_cache_dir: Path | None
) -> Any:
    if tokenizer_path is not None:
        for folder in (tokenizer_path, tokenizer_path / "tokenizer_2"):
            if _is_t5_dir(folder):
                return _load_t5(folder)
        raise UserError(
            f"--tokenizer_2_path: {tokenizer_path} has no tokenizer.json or spiece.model; pass a T5 tokenizer "
            "folder (e.g. the tokenizer_2/ folder of a diffusers FLUX.1 model)"
        )
    if layout == "diffusers" and _is_t5_dir(model_path / "tokenizer_2"):
        return _load_t5(model_path / "tokenizer_2")
    if tokenizer_cache_dir is not None:
        local = tokenizer_cache_dir / T5_HUB.replace("/", "_")
        if _is_t5_dir(local):
            return _load_t5(local)
    tokenizer = _t5_from_hub(tokenizer_cache_dir)
    if tokenizer is None:
        raise UserError(
            f"no T5 tokenizer for {model_path}: pass --tokenizer_2_path <folder with tokenizer.json or spiece.model> "
            f"(e.g. the tokenizer_2/ folder of a diffusers FLUX.1 model) or --tokenizer_cache_dir "
            f"<dir containing {T5_HUB.replace('/', '_')}>"
        )
    return tokenizer


def resolve_tokenizers(
    *,
    model_path: Path,
    layout: str,
    tokenizer_path: Path | None,
    tokenizer_2_path: Path | None,
    tokenizer_cache_dir: Path | None,
) -> tuple[Any, Any]:
    clip = resolve_tokenizer(
        "sdxl_1",  # CLIP-L's tokenizer, as for SDXL's first text encoder
        model_path=model_path,
        layout=layout,
        tokenizer_path=tokenizer_path,
        tokenizer_cache_dir=tokenizer_cache_dir,
    )
    t5 = resolve_t5_tokenizer(
        model_path=model_path,
        layout=layout,
        tokenizer_path=tokenizer_2_path,
        tokenizer_cache_dir=tokenizer_cache_dir,
    )
    return clip, t5


def _t5_ids(
    tokenizer: Any, captions: list[str], length: int, cache: dict
) -> tuple[torch.Tensor, torch.Tensor]:
    key_missing = [c for c in dict.fromkeys(captions) if ("t5", c, length) not in cache]
    if key_missing:
        if len(cache) > 65536:
            cache.clear()
        out = tokenizer(
            key_missing, padding="max_length", max_length=length, truncation=True, return_tensors="pt"
        )
        for caption, ids, mask in zip(key_missing, out.input_ids, out.attention_mask, strict=True):
            cache[("t5", caption, length)] = (ids, mask)
    rows = [cache[("t5", c, length)] for c in captions]
    return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])


def encode_flux_prompts(
    text_encoders: list[Any],
    tokenizers: list[Any],
    captions: list[str],
    *,
    t5_length: int,
    apply_t5_attn_mask: bool,
    token_caches: tuple[dict, dict],
    encoders: Sequence[int] | None = None,
) -> dict[str, torch.Tensor]:
    """Captions -> {"l_pooled": [B, 768], "t5_out": [B, L, 4096], "t5_attn_mask": [B, L]} on the encoders'
    devices (the mask as 0/1 in T5's dtype, so a cache can store it with the rest). `encoders`: only
    CLIP-L (0) and/or T5 (1)."""
    clip, t5 = text_encoders
    clip_tok, t5_tok = tokenizers
    out: dict[str, torch.Tensor] = {}
    if encoders is None or 0 in encoders:
        window = clip.config.max_position_embeddings
        clip_ids = cached_ids(clip_tok, captions, 1, window, token_caches[0])[:, 0]
        clip_device = next(clip.parameters()).device
        out["l_pooled"] = clip(clip_ids.to(clip_device, non_blocking=True)).pooler_output
    if encoders is None or 1 in encoders:
        ids, mask = _t5_ids(t5_tok, captions, t5_length, token_caches[1])
        t5_device = next(t5.parameters()).device
        ids, mask = ids.to(t5_device, non_blocking=True), mask.to(t5_device, non_blocking=True)
        hidden = t5(ids, attention_mask=mask if apply_t5_attn_mask else None).last_hidden_state
        out["t5_out"], out["t5_attn_mask"] = hidden, mask.to(hidden.dtype)
        # kohya's cache keys: zero text position ids and the mask flag its loader checks
        out["txt_ids"] = torch.zeros(*ids.shape, 3, device=t5_device, dtype=hidden.dtype)
        out["apply_t5_attn_mask"] = torch.full((ids.shape[0],), float(apply_t5_attn_mask), device=t5_device)
    return out
