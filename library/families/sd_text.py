"""SD 1.x/2.x text side: where the CLIP tokenizer comes from, and captions -> UNet conditioning.

Tokenizer resolution order (first hit wins):
1. `tokenizer_path` (our --tokenizer_path): a folder with vocab.json + merges.txt (or one with tokenizer/);
2. a diffusers model folder's own tokenizer/;
3. kohya's --tokenizer_cache_dir layout: `<dir>/openai_clip-vit-large-patch14` (SD1) or
   `<dir>/stabilityai_stable-diffusion-2` (SD2, files directly or under tokenizer/);
4. the local Hugging Face cache (no network);
5. the hub, only when HF_HUB_OFFLINE is unset and the hub answers within seconds; the download is then
   saved to `tokenizer_cache_dir` when given, as kohya does;
otherwise a UserError saying what to pass.

Prompt encoding follows kohya's strategy_sd: 77-token windows, `clip_skip` = which hidden state from the
end (None/1 = last) with final_layer_norm applied, and `max_token_length` 150/225 as 75-token chunks each
wrapped in BOS/EOS, encoded separately and re-joined without the inner BOS/EOS states.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from library.errors import UserError
from library.families.prompt_weights import parse_weighted_caption

log = logging.getLogger(__name__)

# kohya's tokenizer sources (strategy_sd.py): hub id and subfolder per version.
HUB_TOKENIZERS = {
    "sd1": ("openai/clip-vit-large-patch14", None),
    "sd2": ("stabilityai/stable-diffusion-2", "tokenizer"),
    # SDXL: CLIP-L's tokenizer for text encoder 1, OpenCLIP bigG's for text encoder 2 (strategy_sdxl.py).
    "sdxl_1": ("openai/clip-vit-large-patch14", None),
    "sdxl_2": ("laion/CLIP-ViT-bigG-14-laion2B-39B-b160k", None),
}
MAX_TOKEN_LENGTHS = (75, 150, 225)


def _is_tokenizer_dir(folder: Path) -> bool:
    # Slow-tokenizer files (what hub repos ship) or a fast tokenizer.json (what transformers 5 saves).
    slow = (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    return slow or (folder / "tokenizer.json").is_file()


def _load(folder: Path) -> Any:
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


def _hub_offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    return env in ("1", "true", "yes", "on") or bool(constants.HF_HUB_OFFLINE)


def hub_cache_folder(repo: str, subfolder: str | None, filename: str) -> Path | None:
    """The folder holding `filename` of `repo` in the Hugging Face cache, found on disk alone. Not
    `from_pretrained(repo, local_files_only=True)`: huggingface_hub 2.x builds request headers even then, and
    that fetches an agent registry from the hub, a connection the user never asked for."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo, f"{subfolder}/{filename}" if subfolder else filename)
    except Exception:  # a malformed cache entry reads as "not cached"
        return None
    return Path(found).parent if isinstance(found, str) else None


def _from_hub(repo: str, subfolder: str | None, cache_dir: Path | None) -> Any | None:
    from transformers import CLIPTokenizer

    kwargs = {"subfolder": subfolder} if subfolder else {}
    cached = hub_cache_folder(repo, subfolder, "vocab.json")
    if cached is not None and _is_tokenizer_dir(cached):  # already in the Hugging Face cache
        return _load(cached)
    if _hub_offline():
        return None
    try:
        from huggingface_hub import HfApi

        HfApi().model_info(repo, timeout=5)  # a quick reachability probe before a real download
        tokenizer = CLIPTokenizer.from_pretrained(repo, **kwargs)
    except Exception as e:  # network errors come in many types; all mean "not available"
        log.info("tokenizer %s not available from the hub: %s", repo, e)
        return None
    if cache_dir is not None:
        tokenizer.save_pretrained(str(cache_dir / repo.replace("/", "_")))
    return tokenizer


def resolve_tokenizer(
    version: str,
    *,
    model_path: Path,
    layout: str,
    tokenizer_path: Path | None,
    tokenizer_cache_dir: Path | None,
    folder_name: str = "tokenizer",
    flag: str = "--tokenizer_path",
) -> Any:
    """The CLIP tokenizer `version` (a HUB_TOKENIZERS key) of a model, from local folders first (order in the
    module docstring). `folder_name`: its sub-folder in a diffusers model folder; `flag`: the option that
    overrides it (SDXL's second tokenizer: tokenizer_2 / --tokenizer_2_path)."""
    if tokenizer_path is not None:
        for folder in (tokenizer_path, tokenizer_path / folder_name):
            if _is_tokenizer_dir(folder):
                return _load(folder)
        raise UserError(
            f"{flag}: {tokenizer_path} has no vocab.json/merges.txt; pass a CLIP tokenizer folder "
            f"(e.g. the {folder_name}/ folder of a diffusers model)"
        )
    if layout == "diffusers" and _is_tokenizer_dir(model_path / folder_name):
        return _load(model_path / folder_name)
    repo, subfolder = HUB_TOKENIZERS[version]
    if tokenizer_cache_dir is not None:
        local = tokenizer_cache_dir / repo.replace("/", "_")
        for folder in (local, local / (subfolder or "tokenizer")):
            if _is_tokenizer_dir(folder):
                return _load(folder)
    tokenizer = _from_hub(repo, subfolder, tokenizer_cache_dir)
    if tokenizer is not None:
        return tokenizer
    what = "single-file checkpoint" if layout == "single_file" else f"model folder (it has no {folder_name}/)"
    example = {"sd1": "SD1", "sd2": "SD2"}.get(version, "SDXL")
    raise UserError(
        f"no tokenizer for {what} {model_path}: pass {flag} <folder with vocab.json/merges.txt> "
        f"(e.g. the {folder_name}/ folder of any {example} diffusers model) or --tokenizer_cache_dir "
        f"<dir containing {repo.replace('/', '_')}>"
    )


TOKEN_CACHE_LIMIT = 65536


def cached_ids(
    tokenizer: Any, captions: list[str], n_chunks: int, window: int, cache: dict | None
) -> torch.Tensor:
    """`_chunked_ids` with a per-caption memo: unshuffled captions repeat every epoch, and tokenizing
    is a measurable share of a small model's step."""
    if cache is None:
        return _chunked_ids(tokenizer, captions, n_chunks, window)
    missing = list(dict.fromkeys(c for c in captions if (c, n_chunks) not in cache))
    if missing:
        if len(cache) + len(missing) > TOKEN_CACHE_LIMIT:
            cache.clear()  # shuffled captions rarely repeat; a bounded memo beats an LRU's bookkeeping
        for caption, ids in zip(missing, _chunked_ids(tokenizer, missing, n_chunks, window), strict=True):
            cache[(caption, n_chunks)] = ids
    return torch.stack([cache[(c, n_chunks)] for c in captions])


def _chunked_ids(tokenizer: Any, captions: list[str], n_chunks: int, window: int) -> torch.Tensor:
    """[B, n_chunks, window] token ids: kohya's BOS + 75 tokens + last-token windows."""
    length = (window - 2) * n_chunks + 2
    ids = tokenizer(captions, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    return _windows(tokenizer, ids.input_ids, n_chunks, window)


def _weighted_ids(
    tokenizer: Any, caption: str, n_chunks: int, window: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """kohya's weighted captions: ([n_chunks, window] ids, [(window - 2) * n_chunks + 2] weights). Each
    (text, weight) piece is tokenized on its own, as kohya does; BOS, EOS and padding weigh 1."""
    pieces = parse_weighted_caption(caption)
    body = (window - 2) * n_chunks
    tokens: list[int] = []
    weights: list[float] = []
    piece_ids = tokenizer([text for text, _ in pieces], add_special_tokens=False).input_ids
    for (_, weight), ids in zip(pieces, piece_ids, strict=True):
        tokens += ids
        weights += [weight] * len(ids)
    tokens, weights = tokens[:body], weights[:body]
    pad = body - len(tokens)
    full = [tokenizer.bos_token_id, *tokens, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * pad
    ids = _windows(tokenizer, torch.tensor([full]), n_chunks, window)[0]
    return ids, torch.tensor([1.0, *weights] + [1.0] * (pad + 1))


def _windows(tokenizer: Any, ids: torch.Tensor, n_chunks: int, window: int) -> torch.Tensor:
    """[B, (window - 2) * n + 2] ids -> [B, n, window] windows, each BOS + its 75 tokens + the last id."""
    if n_chunks == 1:
        return ids.unsqueeze(1)
    body = window - 2
    bos, last = ids[:, :1], ids[:, -1:]
    chunks = [
        torch.cat([bos, ids[:, 1 + c * body : 1 + (c + 1) * body], last], dim=1) for c in range(n_chunks)
    ]
    out = torch.stack(chunks, dim=1)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if pad != eos:
        # SD2's tokenizer pads with "!" rather than EOS: every window must still end in EOS after its last real
        # token, and an empty window starts BOS EOS (kohya's fix-ups).
        before_last = out[..., -2]
        needs_eos = (before_last != eos) & (before_last != pad)
        out[..., -1] = torch.where(needs_eos, torch.full_like(before_last, eos), out[..., -1])
        out[..., 1] = torch.where(out[..., 1] == pad, torch.full_like(before_last, eos), out[..., 1])
    return out


def cached_weighted_ids(
    tokenizer: Any, captions: list[str], n_chunks: int, window: int, cache: dict | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`_weighted_ids` for a batch ([B, n, window] ids, [B, 75n + 2] weights), memoised like `cached_ids`."""
    cache = {} if cache is None else cache
    if len(cache) > TOKEN_CACHE_LIMIT:
        cache.clear()
    for caption in captions:
        if ("weighted", caption, n_chunks) not in cache:
            cache[("weighted", caption, n_chunks)] = _weighted_ids(tokenizer, caption, n_chunks, window)
    rows = [cache[("weighted", c, n_chunks)] for c in captions]
    return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])


def _hidden_states(text_encoder: Any, ids: torch.Tensor, clip_skip: int | None) -> torch.Tensor:
    if clip_skip is None or clip_skip == 1:
        return text_encoder(ids).last_hidden_state  # includes final_layer_norm
    out = text_encoder(ids, output_hidden_states=True, return_dict=True)
    # transformers 5 flattened CLIPTextModel (no `text_model` child); 4.x still has it.
    final_norm = getattr(text_encoder, "text_model", text_encoder).final_layer_norm
    return final_norm(out.hidden_states[-clip_skip])


def join_windows(hidden: torch.Tensor, batch: int, n_chunks: int, window: int) -> torch.Tensor:
    """[B * n, window, C] window states -> [B, 75n + 2, C]: the first BOS state, each window's 75 inner states
    and the very last state (EOS or padding), as kohya re-joins long prompts."""
    hidden = hidden.reshape(batch, n_chunks * window, hidden.shape[-1])
    if n_chunks == 1:
        return hidden
    parts = [hidden[:, :1]]
    parts += [hidden[:, c * window + 1 : (c + 1) * window - 1] for c in range(n_chunks)]
    parts.append(hidden[:, -1:])
    return torch.cat(parts, dim=1)


def check_max_token_length(max_token_length: int | None) -> None:
    if max_token_length is not None and max_token_length not in MAX_TOKEN_LENGTHS:
        raise UserError(
            f"--max_token_length: {max_token_length} is not supported; use 150 or 225, or leave it unset (75)"
        )


def encode_prompts(
    text_encoder: Any,
    tokenizer: Any,
    captions: list[str],
    *,
    clip_skip: int | None,
    max_token_length: int | None,
    token_cache: dict | None = None,
    weighted: bool = False,
) -> torch.Tensor:
    """Captions -> [B, 77 or max_token_length+2, hidden], on the text encoder's device."""
    layers = text_encoder.config.num_hidden_layers
    if clip_skip is not None and not 1 <= clip_skip <= layers:
        raise UserError(f"--clip_skip: {clip_skip} is out of range; use 1..{layers} (2 = penultimate layer)")
    check_max_token_length(max_token_length)
    window = text_encoder.config.max_position_embeddings  # 77: BOS + 75 tokens + EOS
    n_chunks = (max_token_length or window - 2) // (window - 2)
    device = next(text_encoder.parameters()).device
    weights = None
    if weighted:
        ids, weights = cached_weighted_ids(tokenizer, captions, n_chunks, window, token_cache)
    else:
        ids = cached_ids(tokenizer, captions, n_chunks, window, token_cache)
    ids = ids.to(device, non_blocking=True)
    batch = ids.shape[0]
    hidden = _hidden_states(text_encoder, ids.view(-1, window), clip_skip)
    hidden = join_windows(hidden, batch, n_chunks, window)
    if weights is not None:
        # kohya scales each token's final state by its weight, without renormalising the mean.
        hidden = hidden * weights.to(hidden.device, hidden.dtype, non_blocking=True).unsqueeze(-1)
    return hidden
