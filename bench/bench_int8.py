"""Speed of one frozen Linear, float against int8 (library/memory/int8.py, --quantize_base int8), on the CPU.

Times forward and forward + input backward (what a frozen base layer costs in LoRA training: no weight
gradient) at SD 1.5 / SDXL / FLUX-like shapes, for:
  fp32  nn.Linear, float32 weights and activations;
  bf16  nn.Linear with bf16 weights under torch.autocast("cpu", bfloat16) (what --mixed_precision bf16 runs);
  int8  the same bf16 layer after quantize_int8, under the same autocast: activations quantized per token,
        torch._int_mm, rescaled to bf16; backward multiplies by the dequantized weight in bf16.
Also prints each int8 output's relative RMS error against fp32.

The 2x that OneTrainer reports is for consumer GPUs with int8 tensor cores; what a CPU gives depends on its
int8 dot-product instructions (AVX512-VNNI / AMX), so read these numbers as this machine's only.

    python bench/bench_int8.py [--threads N] [--repeats 5] [--tokens_scale 1.0]

Prints a table and a JSON line.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# (name, tokens, in_features, out_features), batch 1: SD 1.5 at 512 px (64x64 latent), SDXL at 1024 px (its
# deepest attention level, 32x32, holds most blocks), FLUX at 512 px (1024 image + 512 T5 tokens).
SHAPES = [
    ("SD1.5 attn 64x64 (320->320)", 4096, 320, 320),
    ("SD1.5 GEGLU 64x64 (320->2560)", 4096, 320, 2560),
    ("SD1.5 ff out 64x64 (1280->320)", 4096, 1280, 320),
    ("SDXL attn 32x32 (1280->1280)", 1024, 1280, 1280),
    ("SDXL GEGLU 32x32 (1280->10240)", 1024, 1280, 10240),
    ("SDXL ff out 32x32 (5120->1280)", 1024, 5120, 1280),
    ("FLUX attn 512px (3072->3072)", 1536, 3072, 3072),
    ("FLUX mlp 512px (3072->12288)", 1536, 3072, 12288),
    ("FLUX single out 512px (15360->3072)", 1536, 15360, 3072),
]


def _time(fn, repeats: int) -> float:
    fn()  # warm-up: first-call allocations and kernel selection
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def _rel_rms(got, want) -> float:
    got, want = got.float(), want.float()
    return float((got - want).square().mean().sqrt() / want.square().mean().sqrt())


def bench_shape(tokens: int, k: int, n: int, repeats: int) -> dict:
    import torch
    from torch import nn

    from library.memory.int8 import quantize_int8

    torch.manual_seed(0)
    fp32 = nn.Linear(k, n).requires_grad_(False)
    nn.init.normal_(fp32.weight, std=k**-0.5)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    int8 = copy.deepcopy(bf16)
    quantize_int8(int8)
    x = torch.randn(tokens, k)
    grad_out = torch.randn(tokens, n)
    result = {"tokens": tokens, "in": k, "out": n}
    for name, layer, autocast in (("fp32", fp32, False), ("bf16", bf16, True), ("int8", int8, True)):

        def forward(layer=layer, autocast=autocast):
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                return layer(x)

        def forward_backward(layer=layer, autocast=autocast):
            xg = x.detach().requires_grad_(True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                y = layer(xg)
            y.backward(grad_out.to(y.dtype))
            return xg.grad

        result[f"{name}_fwd_ms"] = round(_time(forward, repeats), 2)
        result[f"{name}_fwd_bwd_ms"] = round(_time(forward_backward, repeats), 2)
        if name != "fp32":
            result[f"{name}_rel_rms"] = round(_rel_rms(forward(), fp32(x)), 5)
    return result


def print_table(rows: list[dict], names: list[str]) -> None:
    print(
        f"{'shape':<34} {'fp32 f/fb ms':>15} {'bf16 f/fb ms':>15} {'int8 f/fb ms':>15} {'int8/bf16 fb':>12} {'int8 err':>9}"
    )
    for name, r in zip(names, rows, strict=True):
        cells = [f"{r[f'{p}_fwd_ms']:.1f}/{r[f'{p}_fwd_bwd_ms']:.1f}" for p in ("fp32", "bf16", "int8")]
        ratio = r["int8_fwd_bwd_ms"] / r["bf16_fwd_bwd_ms"]
        print(
            f"{name:<34} "
            + " ".join(f"{c:>15}" for c in cells)
            + f" {ratio:>12.2f} {r['int8_rel_rms']:>9.2%}"
        )
    print(json.dumps(rows))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per measurement (median)")
    parser.add_argument("--tokens_scale", type=float, default=1.0, help="multiply every shape's token count")
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU {torch.backends.cpu.get_cpu_capability()}"
    )
    rows, names = [], []
    for name, tokens, k, n in SHAPES:
        rows.append(bench_shape(max(1, int(tokens * args.tokens_scale)), k, n, args.repeats))
        names.append(name)
        print(json.dumps({"shape": name} | rows[-1]), file=sys.stderr, flush=True)
    print_table(rows, names)


if __name__ == "__main__":
    main()
