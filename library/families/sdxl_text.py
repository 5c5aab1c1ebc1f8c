"""SDXL text side: two tokenizers, two text encoders, captions -> kohya's three conditioning tensors.

As Stability trained SDXL (and kohya's strategy_sdxl): text encoder 1 (CLIP-L) and 2 (OpenCLIP bigG) each give
their penultimate hidden state *without* the final layer norm; text encoder 2 also gives the pooled output:
its final (normed) state at the first EOS token through `text_projection`. With `max_token_length` 150/225
each 75-token window is encoded on its own, hidden states re-joined as for SD, and the pool taken from the
first window. The output dict uses kohya's cache names (`hidden_state1`, `hidden_state2`, `pool2`), so a
text-encoder output cache can store it as is.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from library.families.sd_text import (
    cached_ids,
    cached_weighted_ids,
    check_max_token_length,
    join_windows,
    resolve_tokenizer,
)


def resolve_tokenizers(
    *,
    model_path: Path,
    layout: str,
    tokenizer_path: Path | None,
    tokenizer_2_path: Path | None,
    tokenizer_cache_dir: Path | None,
) -> tuple[Any, Any]:
    first = resolve_tokenizer(
        "sdxl_1",
        model_path=model_path,
        layout=layout,
        tokenizer_path=tokenizer_path,
        tokenizer_cache_dir=tokenizer_cache_dir,
    )
    second = resolve_tokenizer(
        "sdxl_2",
        model_path=model_path,
        layout=layout,
        tokenizer_path=tokenizer_2_path,
        tokenizer_cache_dir=tokenizer_cache_dir,
        folder_name="tokenizer_2",
        flag="--tokenizer_2_path",
    )
    if second.pad_token != "!":
        # laion's bigG tokenizer pads with EOS; SDXL was trained with "!" (id 0) padding, as kohya forces.
        second.pad_token = "!"
    return first, second


def _ids(
    tokenizer: Any, captions: list[str], n_chunks: int, window: int, cache: dict, weighted: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if weighted:
        return cached_weighted_ids(tokenizer, captions, n_chunks, window, cache)
    return cached_ids(tokenizer, captions, n_chunks, window, cache), None


def encode_sdxl_prompts(
    text_encoders: list[Any],
    tokenizers: list[Any],
    captions: list[str],
    *,
    max_token_length: int | None,
    token_caches: tuple[dict, dict],
    weighted: bool = False,
    encoders: Sequence[int] | None = None,
) -> dict[str, torch.Tensor]:
    """Captions -> {"hidden_state1": [B, L, C1], "hidden_state2": [B, L, C2], "pool2": [B, P]} on the text
    encoders' device; L = 77 or max_token_length + 2."""
    check_max_token_length(max_token_length)
    te1, te2 = text_encoders
    window = te1.config.max_position_embeddings
    n_chunks = (max_token_length or window - 2) // (window - 2)
    batch = len(captions)
    out: dict[str, torch.Tensor] = {}
    for index, (encoder, tokenizer, cache) in enumerate(
        zip(text_encoders, tokenizers, token_caches, strict=True), 1
    ):
        if encoders is not None and index - 1 not in encoders:
            continue
        ids, weights = _ids(tokenizer, captions, n_chunks, window, cache, weighted)
        flat = ids.view(-1, window).to(next(encoder.parameters()).device, non_blocking=True)
        result = encoder(flat, output_hidden_states=True, return_dict=True)
        hidden = join_windows(result.hidden_states[-2], batch, n_chunks, window)
        if weights is not None:
            # kohya scales each token's state by its weight; the pooled output stays unweighted.
            hidden = hidden * weights.to(hidden.device, hidden.dtype, non_blocking=True).unsqueeze(-1)
        out[f"hidden_state{index}"] = hidden
        if encoder is te2:
            # The first EOS of each caption's first window; computed from the ids (not the config's eos id,
            # which some SDXL repositories leave at a legacy value).
            first_window = flat.view(batch, n_chunks, window)[:, 0]
            eos = (first_window == tokenizer.eos_token_id).int().argmax(dim=-1)
            last = result.last_hidden_state.view(batch, n_chunks, window, -1)[:, 0]
            out["pool2"] = te2.text_projection(last[torch.arange(batch, device=last.device), eos])
    return out
