"""Benchmark tools/merge_lora.py: peak memory of merging a LoRA into a real-size SD 1.5 single file.

Builds an SD 1.5-shaped LDM checkpoint (the real UNet / VAE / CLIP-L configs, random fp16 weights, written
tensor by tensor so building it never holds the model) and a rank-32 LoRA on every UNet and text-encoder
module, then runs in fresh processes:
- `stream`: tools/merge_lora.py (reads one tensor, merges in float32, appends it to the output);
- `naive`: load the whole file (safetensors load_file), add every ΔW in place, save_file: the usual script;
- `import`: torch and the merge modules imported; `map`: plus the key mapping (diffusers/transformers
  imported, meta-device models built) and the LoRA read, i.e. everything but the checkpoint's weights.
Reports the file size, each process's peak RSS (VmHWM) and seconds, and checks both outputs are equal.

    python bench/bench_merge.py [--workdir DIR] [--rank 32] [--keep]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
SD15_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2,
}
CLIP_L = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
}


def _ldm_shapes() -> dict[str, tuple[int, ...]]:
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from library.families import sd_checkpoint as ckpt

    with init_empty_weights():
        unet, vae = UNet2DConditionModel(**SD15_UNET), AutoencoderKL(**SD15_VAE)
        te = CLIPTextModel(CLIPTextConfig(**CLIP_L))
    state = {ckpt.UNET_PREFIX + k: v for k, v in ckpt.unet_to_ldm(unet.state_dict(), 2).items()}
    state |= {ckpt.VAE_PREFIX + k: v for k, v in ckpt.vae_to_ldm(vae.state_dict()).items()}
    state |= ckpt.clip_to_ldm(te.state_dict())
    return {k: tuple(v.shape) for k, v in state.items()}


def build(workdir: Path, rank: int) -> tuple[Path, Path]:
    import torch

    from networks.lora_file import save_lora_file
    from networks.ops.checkpoint_map import map_checkpoint
    from networks.ops.st_stream import write_streaming

    model, lora = workdir / "sd15.safetensors", workdir / "lora.safetensors"
    shapes = _ldm_shapes()
    gen = torch.Generator().manual_seed(0)
    plan = [(k, torch.float16, s) for k, s in shapes.items()]
    write_streaming(
        model, plan, lambda k: (torch.randn(shapes[k], generator=gen) * 0.02).half(), {"format": "pt"}
    )
    state = {}
    for name, slot in map_checkpoint(model, "--sd_model").slots.items():
        if slot.kind == "conv":
            continue
        state[f"{name}.lora_down.weight"] = torch.randn(rank, *slot.shape[1:], generator=gen) * 0.01
        up_shape = (slot.shape[0], rank, 1, 1) if len(slot.shape) == 4 else (slot.shape[0], rank)
        state[f"{name}.lora_up.weight"] = torch.randn(up_shape, generator=gen) * 0.01
        state[f"{name}.alpha"] = torch.tensor(float(rank))
    save_lora_file(lora, {k: v.half() for k, v in state.items()}, {})
    return model, lora


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(mode: str, model: Path, lora: Path, out: Path) -> None:
    import torch  # noqa: F401  (both modes pay for it)

    from networks.ops.checkpoint_map import map_checkpoint
    from networks.ops.merge import read_lora

    start = time.perf_counter()
    if mode == "map":  # everything but the weights: imports, meta-device models, the LoRA file
        read_lora(lora, "--models", map_checkpoint(model, "--sd_model"))
    elif mode == "stream":
        from tools.merge_lora import main

        assert (
            main(["--sd_model", str(model), "--save_to", str(out), "--models", str(lora), "--overwrite"]) == 0
        )
    elif mode == "naive":
        from safetensors.torch import load_file, save_file

        cmap = map_checkpoint(model, "--sd_model")
        factors, _ = read_lora(lora, "--models", cmap)
        sd = load_file(str(model))
        for name, f in factors.items():
            for p in cmap.slots[name].placements:
                w = sd[p.key]
                sd[p.key] = (w.float() + f.delta().reshape(w.shape)).to(w.dtype)
        save_file(sd, str(out), metadata={"format": "pt"})
    seconds = time.perf_counter() - start
    print(json.dumps({"mode": mode, "peak_rss_mb": round(_peak_rss_mb()), "seconds": round(seconds, 1)}))


def _same(a: Path, b: Path) -> bool:
    """Tensor by tensor (safetensors' save_file orders the data differently, so the bytes differ)."""
    import torch

    from networks.ops.st_stream import open_source

    with open_source(a, "a") as x, open_source(b, "b") as y:
        return x.infos.keys() == y.infos.keys() and all(torch.equal(x.get(k), y.get(k)) for k in x.infos)


def _run(mode: str, model: Path, lora: Path, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, str(model), str(lora), str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--child", nargs=4, metavar=("MODE", "MODEL", "LORA", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, *paths = args.child
        child(mode, *(Path(p) for p in paths))
        return
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        model, lora = build(work, args.rank)
        print(f"built {model.stat().st_size / 2**20:.0f} MiB checkpoint in {time.perf_counter() - t0:.0f} s")
        size = round(model.stat().st_size / 2**20)
        rows = {
            m: _run(m, model, lora, work / f"{m}.safetensors") for m in ("import", "map", "stream", "naive")
        }
        same = _same(work / "stream.safetensors", work / "naive.safetensors")
    report = {"file_mib": size, **rows, "same": same}
    for mode, row in rows.items():
        print(f"{mode:>7}: peak RSS {row['peak_rss_mb']:>6} MiB  {row['seconds']:>5} s")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
