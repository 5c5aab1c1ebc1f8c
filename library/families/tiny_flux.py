"""Tiny randomly initialised FLUX.1 components (tests, benchmarks) in the layouts users have.

Same topology as FLUX.1: double and single stream blocks, 2x2-packed 16-channel latents (64 input features),
rotary axes split 1/8 : 7/16 : 7/16 of the head, CLIP-L pooled vector, T5 (gated-GELU, relative attention)
sequence, guidance embedder for dev (none for schnell), an autoencoder without quant convs.
Files: `write_tiny_flux` writes BFL-style single files (transformer, ae, clip_l, t5xxl) as kohya's
flux_train_network.py takes them, and/or a diffusers FluxPipeline folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from library.families.tiny import load_tokenizer, vae_config, write_tiny_clip_tokenizer

CLIP_HIDDEN, T5_DIM, HEAD_DIM, HEADS = 64, 32, 32, 2

# black-forest-labs/FLUX.1-dev transformer/config.json
REAL_TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": [16, 56, 56],
}


def transformer_config(
    *, guidance: bool = True, double: int = 2, single: int = 2, heads: int = HEADS, head_dim: int = HEAD_DIM
) -> dict[str, Any]:
    return {
        **REAL_TRANSFORMER_CONFIG,
        "num_layers": double,
        "num_single_layers": single,
        "attention_head_dim": head_dim,
        "num_attention_heads": heads,
        "joint_attention_dim": T5_DIM,
        "pooled_projection_dim": CLIP_HIDDEN,
        "guidance_embeds": guidance,
        "axes_dims_rope": [head_dim // 8, head_dim * 7 // 16, head_dim * 7 // 16],
    }


def ae_config() -> dict[str, Any]:
    return {
        **vae_config(),
        "latent_channels": 16,
        "scaling_factor": 0.3611,
        "shift_factor": 0.1159,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
    }


def t5_config(vocab_size: int) -> dict[str, Any]:
    return {
        "vocab_size": vocab_size,
        "d_model": T5_DIM,
        "d_kv": 8,
        "d_ff": 64,
        "num_layers": 2,
        "num_heads": 4,
        "relative_attention_num_buckets": 32,
        "feed_forward_proj": "gated-gelu",
        "is_encoder_decoder": False,
        "use_cache": False,
    }


_T5_WORDS = (
    "a",
    "photo",
    "of",
    "the",
    "red",
    "green",
    "blue",
    "yellow",
    "circle",
    "square",
    "sks",
    "dog",
    "cat",
    "shape",
    "item",
)


def write_tiny_t5_tokenizer(folder: Path) -> None:
    """A Unigram (sentencepiece-style) T5 tokenizer: pad 0, </s> 1, <unk> 2, appends </s> like T5."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + w, -2.0) for w in _T5_WORDS]
    pieces += [(c, -8.0) for c in "\u2581abcdefghijklmnopqrstuvwxyz0123456789,.!?-()[]:"]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.save_pretrained(str(folder))
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "T5Tokenizer"  # what google/t5-v1_1-xxl declares
    config_path.write_text(json.dumps(config, indent=2))


def load_t5_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


@dataclass
class TinyFlux:
    transformer: torch.nn.Module
    ae: torch.nn.Module
    clip_l: torch.nn.Module
    t5: torch.nn.Module
    clip_tokenizer: Any
    t5_tokenizer: Any
    scheduler: Any


def build_tiny_flux(
    seed: int = 0,
    tokenizer_dir: Path | None = None,
    *,
    schnell: bool = False,
    t5_tokenizer_dir: Path | None = None,
) -> TinyFlux:
    """Random tiny FLUX.1 (dev unless `schnell`); tokenizers go to `tokenizer_dir` (CLIP) and
    `t5_tokenizer_dir` (default: `<tokenizer_dir>_2`)."""
    import tempfile

    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from library.families.tiny import text_encoder_config

    tok_dir = tokenizer_dir or Path(tempfile.mkdtemp(prefix="tiny_flux_tokenizer_"))
    t5_dir = t5_tokenizer_dir or tok_dir.with_name(tok_dir.name + "_2")
    write_tiny_clip_tokenizer(tok_dir)
    write_tiny_t5_tokenizer(t5_dir)
    clip_tokenizer, t5_tokenizer = load_tokenizer(tok_dir), load_t5_tokenizer(t5_dir)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**transformer_config(guidance=not schnell))
    ae = AutoencoderKL(**ae_config())
    clip_l = CLIPTextModel(CLIPTextConfig(**text_encoder_config("sd1", len(clip_tokenizer))))
    t5 = T5EncoderModel(T5Config(**t5_config(len(t5_tokenizer))))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=not schnell)
    return TinyFlux(
        transformer.eval(), ae.eval(), clip_l.eval(), t5.eval(), clip_tokenizer, t5_tokenizer, scheduler
    )


def save_diffusers_folder(model: TinyFlux, folder: Path) -> Path:
    """The layout of black-forest-labs/FLUX.1-dev (diffusers)."""
    folder.mkdir(parents=True, exist_ok=True)
    parts = {
        "transformer": model.transformer,
        "vae": model.ae,
        "text_encoder": model.clip_l,
        "text_encoder_2": model.t5,
        "tokenizer": model.clip_tokenizer,
        "tokenizer_2": model.t5_tokenizer,
        "scheduler": model.scheduler,
    }
    for name, part in parts.items():
        part.save_pretrained(folder / name)
    index = {
        "_class_name": "FluxPipeline",
        "_diffusers_version": "0.30.0.dev0",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "FluxTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


@dataclass
class TinyFluxFiles:
    """Separate files as kohya takes them (transformer, --ae, --clip_l, --t5xxl) plus tokenizer folders,
    and/or a diffusers folder."""

    diffusers_dir: Path | None
    transformer: Path | None
    ae: Path | None
    clip_l: Path | None
    t5xxl: Path | None
    clip_tokenizer_dir: Path
    t5_tokenizer_dir: Path


def write_single_files(model: TinyFlux, folder: Path, *, prefixed: bool = False) -> dict[str, Path]:
    from safetensors.torch import save_file

    from library.families.flux_checkpoint import BFL_PREFIX, ae_to_ldm, diffusers_to_bfl

    folder.mkdir(parents=True, exist_ok=True)
    prefix = BFL_PREFIX if prefixed else ""
    states = {
        "transformer": {prefix + k: v for k, v in diffusers_to_bfl(model.transformer.state_dict()).items()},
        "ae": ae_to_ldm(model.ae.state_dict()),
        "clip_l": {
            (k if k.startswith("text_model.") else f"text_model.{k}"): v
            for k, v in model.clip_l.state_dict().items()
            if not k.endswith("position_ids")
        },
        "t5xxl": dict(model.t5.state_dict()),
    }
    names = {"transformer": "flux1-tiny.safetensors", "ae": "ae.safetensors"}
    names |= {"clip_l": "clip_l.safetensors", "t5xxl": "t5xxl_fp16.safetensors"}
    paths = {}
    for part, state in states.items():
        paths[part] = folder / names[part]
        # the T5 embedding is shared with encoder.embed_tokens: safetensors wants private storage
        save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(paths[part]))
    return paths


def write_tiny_flux(
    out: Path, fmt: str = "single_files", seed: int = 0, *, schnell: bool = False, prefixed: bool = False
) -> TinyFluxFiles:
    """single_files -> `<out>/` holds flux1-tiny, ae, clip_l, t5xxl_fp16 .safetensors and tokenizer folders;
    diffusers -> `<out>/diffusers/`; both -> both, same weights."""
    if fmt not in ("single_files", "diffusers", "both"):
        raise ValueError(f"fmt must be single_files, diffusers or both, got {fmt!r}")
    out = Path(out)
    tok_dir = out / "clip_tokenizer"
    model = build_tiny_flux(seed, tok_dir, schnell=schnell, t5_tokenizer_dir=out / "t5_tokenizer")
    folder = save_diffusers_folder(model, out / "diffusers") if fmt in ("diffusers", "both") else None
    files: dict[str, Path | None] = dict.fromkeys(("transformer", "ae", "clip_l", "t5xxl"))
    if fmt in ("single_files", "both"):
        files.update(write_single_files(model, out, prefixed=prefixed))
    return TinyFluxFiles(folder, **files, clip_tokenizer_dir=tok_dir, t5_tokenizer_dir=out / "t5_tokenizer")
