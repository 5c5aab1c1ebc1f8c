"""Device check and benchmark of the memory tricks (library/memory/) on a CUDA GPU.

A stack of transformer-sized frozen blocks with small trainable adapters, one training step each way: plain,
block swap, block swap + fp8 weights, offloaded checkpointing. Checks that every variant's gradients match
the plain run (exactly, or within bf16/fp8 rounding where the weights differ) and prints peak memory and
step time. Without CUDA it says so and exits 0 (the CPU tests cover the logic).

    python bench/bench_memory.py [--blocks 16] [--width 3072] [--swap 12] [--tokens 4096] [--steps 3]

Prints a table and a JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from library.memory.block_swap import BlockSwapper, move_except_swapped  # noqa: E402
from library.memory.fp8 import store_fp8  # noqa: E402
from library.memory.offload_checkpoint import offloaded_checkpoint  # noqa: E402


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)
        self.down = nn.Linear(width, 16, bias=False)
        self.up = nn.Linear(16, width, bias=False)
        nn.init.normal_(self.up.weight, std=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(h))) + self.up(self.down(h))


def build(args: argparse.Namespace) -> nn.ModuleList:
    torch.manual_seed(0)
    blocks = nn.ModuleList(Block(args.width) for _ in range(args.blocks)).to(torch.bfloat16)
    for block in blocks:
        for name in ("norm", "fc1", "fc2"):
            getattr(block, name).requires_grad_(False)
    return blocks


def step(blocks: nn.ModuleList, x: torch.Tensor, offload: bool) -> list[torch.Tensor]:
    for p in blocks.parameters():
        p.grad = None
    h = x
    for block in blocks:
        h = offloaded_checkpoint(block, h) if offload else block(h)
    h.float().square().mean().backward()
    return [p.grad.float() for p in blocks.parameters() if p.requires_grad]


def run(name: str, args: argparse.Namespace, device: torch.device, reference: list | None) -> dict:
    blocks = build(args)
    model = nn.Sequential(blocks)
    swapper = None
    if name == "fp8+swap":
        store_fp8(blocks, include=lambda n, _m: n.endswith(("fc1", "fc2")))
    if "swap" in name:
        swapper = BlockSwapper(blocks, args.swap, device)
        move_except_swapped(model, swapper, blocks)
    else:
        model.to(device)
    x = torch.randn(1, args.tokens, args.width, device=device, dtype=torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    grads = step(blocks, x, name == "offload")  # warm-up, also the values compared
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step(blocks, x, name == "offload")
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    peak = torch.cuda.max_memory_allocated() / 2**30
    diff = None
    if reference is not None:
        diff = max(
            float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
            for a, b in zip(grads, reference, strict=True)
        )
    if swapper is not None:
        swapper.remove()
    del model, blocks
    torch.cuda.empty_cache()
    return {
        "variant": name,
        "peak_gib": round(peak, 2),
        "step_s": round(seconds, 4),
        "rel_grad_diff": diff,
        "grads": grads,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=16)
    parser.add_argument("--width", type=int, default=3072)
    parser.add_argument("--swap", type=int, default=12)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure (tests/test_memory_*.py check the logic on CPU)")
        return 0
    device = torch.device("cuda")
    plain = run("plain", args, device, None)
    rows = [plain] + [run(v, args, device, plain["grads"]) for v in ("swap", "fp8+swap", "offload")]
    print(f"{'variant':10} {'peak GiB':>9} {'step s':>8} {'rel grad diff':>14}")
    for row in rows:
        diff = "-" if row["rel_grad_diff"] is None else f"{row['rel_grad_diff']:.2e}"
        print(f"{row['variant']:10} {row['peak_gib']:9.2f} {row['step_s']:8.4f} {diff:>14}")
    # Swapping and offloading change where weights and inputs live, not the arithmetic; fp8 rounds weights.
    failed = [r["variant"] for r in rows[1:] if r["variant"] != "fp8+swap" and r["rel_grad_diff"] > 1e-3]
    print(json.dumps([{k: v for k, v in r.items() if k != "grads"} for r in rows]))
    if failed:
        print(f"FAILED: gradients differ from the plain run: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
