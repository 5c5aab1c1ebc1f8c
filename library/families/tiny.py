"""Tiny randomly initialised SD 1.x / 2.x components, for the quickstart, tests and benchmarks.

Nothing can be downloaded, so the quickstart and the tests build models from config dicts. The shapes follow
the real families' conventions (SD1: 8 attention heads, 1x1 conv proj_in, CLIP-L style text encoder;
SD2: 64-dim heads, linear proj_in, OpenCLIP-style text encoder with GELU; 4-level VAE = 8x downscale) so
that architecture detection and kohya key naming behave exactly as on real checkpoints.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

# Real checkpoints do not record head counts, so loaders derive them: text encoders and SD2 UNets use
# 64-dim heads, SD1 UNets 8 heads. The tiny models obey the same rules.
TEXT_HIDDEN = {"sd1": 64, "sd2": 128}
PAD_TOKEN = {"sd1": "<|endoftext|>", "sd2": "!"}  # as in the real SD1 / SD2 tokenizers
BYTE_VOCAB_SIZE = 256


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: every byte maps to a printable unicode character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, [chr(c) for c in chars], strict=True))


# A few merges so that common caption words become single tokens; everything else falls back to bytes.
_WORDS = ["a", "photo", "of", "the", "red", "green", "blue", "circle", "square", "sks", "dog", "cat", "shape"]


def write_tiny_clip_tokenizer(
    folder: Path, model_max_length: int = 77, pad_token: str = "<|endoftext|>"
) -> None:
    """Write vocab.json/merges.txt/special tokens for a byte-level CLIP BPE tokenizer with a tiny vocab.

    `pad_token`: SD1's tokenizer pads with <|endoftext|>, SD2's (stabilityai/stable-diffusion-2) with "!".
    """
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = list(_bytes_to_unicode().values())
    vocab_tokens = alphabet + [c + "</w>" for c in alphabet]
    merges: list[str] = []
    for word in _WORDS:
        # Merge left to right: "p h" -> "ph", "ph o" -> "pho", ... and the last piece carries </w>.
        pieces = list(word)
        pieces[-1] += "</w>"
        current = pieces[0]
        for nxt in pieces[1:]:
            merges.append(f"{current} {nxt}")
            current = current + nxt
            if current not in vocab_tokens:
                vocab_tokens.append(current)
    vocab_tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_tokens))}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad_token,
        "do_lower_case": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))


def load_tokenizer(folder: Path) -> Any:
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(folder))


@dataclass
class TinySD:
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: Any
    scheduler: Any
    version: str


def unet_config(version: str) -> dict[str, Any]:
    common = {
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 1,
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "norm_num_groups": 32,
        "cross_attention_dim": TEXT_HIDDEN[version],
    }
    if version == "sd1":
        return {**common, "block_out_channels": [32, 64], "attention_head_dim": 8}
    # SD2 counts heads as channels // 64 and projects with Linear layers.
    return {
        **common,
        "block_out_channels": [64, 128],
        "attention_head_dim": [1, 2],
        "use_linear_projection": True,
    }


def vae_config() -> dict[str, Any]:
    return {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "block_out_channels": [32, 32, 64, 64],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "layers_per_block": 1,
        "norm_num_groups": 32,
        "sample_size": 64,
        "scaling_factor": 0.18215,
    }


def text_encoder_config(version: str, vocab_size: int) -> dict[str, Any]:
    hidden = TEXT_HIDDEN[version]
    return {
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": hidden * 4,
        "num_hidden_layers": 3,
        "num_attention_heads": hidden // 64,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu" if version == "sd1" else "gelu",
        "projection_dim": hidden,
        "bos_token_id": vocab_size - 2,
        "eos_token_id": vocab_size - 1,
        "pad_token_id": vocab_size - 1,
    }


def scheduler_config(version: str, v_prediction: bool = False) -> dict[str, Any]:
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "clip_sample": False,
        "steps_offset": 1,
        "prediction_type": "v_prediction" if v_prediction else "epsilon",
    }


def build_tiny_sd(version: str = "sd1", seed: int = 0, tokenizer_dir: Path | None = None) -> TinySD:
    """Random tiny components; the tokenizer is written to `tokenizer_dir` (a temp dir when None)."""
    import tempfile

    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if version not in TEXT_HIDDEN:
        raise ValueError(f"version must be one of {sorted(TEXT_HIDDEN)}, got {version!r}")
    tok_dir = tokenizer_dir or Path(tempfile.mkdtemp(prefix="tiny_tokenizer_"))
    write_tiny_clip_tokenizer(tok_dir, pad_token=PAD_TOKEN[version])
    tokenizer = load_tokenizer(tok_dir)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_config(version))
    vae = AutoencoderKL(**vae_config())
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_encoder_config(version, len(tokenizer))))
    scheduler = DDPMScheduler(**scheduler_config(version))
    return TinySD(unet.eval(), vae.eval(), text_encoder.eval(), tokenizer, scheduler, version)


def save_diffusers_folder(model: TinySD, folder: Path) -> Path:
    """Save in the layout of a diffusers Stable Diffusion repository (model_index.json + component dirs)."""
    folder.mkdir(parents=True, exist_ok=True)
    model.unet.save_pretrained(folder / "unet")
    model.vae.save_pretrained(folder / "vae")
    model.text_encoder.save_pretrained(folder / "text_encoder")
    model.tokenizer.save_pretrained(folder / "tokenizer")
    model.scheduler.save_pretrained(folder / "scheduler")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.32.1",
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


class TinySingleFile(NamedTuple):
    """A single-file checkpoint plus the tokenizer folder to pass as --tokenizer_path."""

    checkpoint: Path
    tokenizer_dir: Path


@dataclass
class TinyModelFiles:
    diffusers_dir: Path | None
    single_file: TinySingleFile | None


def write_tiny_model(
    out: Path, version: str = "sd1", fmt: str = "diffusers", seed: int = 0
) -> TinyModelFiles:
    """Write a tiny random SD model as a diffusers folder and/or an LDM single file.

    diffusers -> `<out>/`; single_file -> `<out>.safetensors` (or `out` itself when it ends in .safetensors
    or .ckpt) plus a tokenizer folder: `<out>/tokenizer` when the diffusers folder is written too, else
    `<out stem>_tokenizer/` next to the file. Both formats hold the same weights.
    """
    from library.families.sd_checkpoint import save_single_file

    if fmt not in ("diffusers", "single_file", "both"):
        raise ValueError(f"fmt must be diffusers, single_file or both, got {fmt!r}")
    out = Path(out)
    suffix = out.suffix.lower()
    base = out.with_suffix("") if suffix in (".safetensors", ".ckpt") else out
    file_path = out if suffix in (".safetensors", ".ckpt") else out.with_name(out.name + ".safetensors")
    want_folder = fmt in ("diffusers", "both")
    tok_dir = base / "tokenizer" if want_folder else base.with_name(base.name + "_tokenizer")
    model = build_tiny_sd(version, seed=seed, tokenizer_dir=tok_dir)
    folder = save_diffusers_folder(model, base) if want_folder else None
    single = None
    if fmt in ("single_file", "both"):
        components = {"unet": model.unet, "vae": model.vae, "text_encoder": model.text_encoder}
        single = TinySingleFile(save_single_file(components, file_path, version), tok_dir)
    return TinyModelFiles(folder, single)
