"""Report what a LoRA file holds: layout, model family, which tool made it, modules, and keys no loader matches.

    python tools/check_lora.py my_lora.safetensors [--summary] [-s]

The family (SD 1.x, SD 2.x, SDXL, FLUX.1) comes from the module names and shapes, checked against the
metadata (ss_base_model_version, modelspec.architecture). Every module name is looked up in the trainer's key
table for that family (any spelling `--network_weights` accepts) and its shapes against the model's module;
names no loader would match, unknown suffixes and shape mismatches are listed under "problems". Per module:
kind, rank, alpha, |down|, |up| and |dW| = |up @ down| x alpha / rank (Frobenius). `-s` adds kohya's
check_lora_weights.py listing (every tensor with its shape, mean |w| and min |w|). Exit codes: 0 no problems,
1 problems found, 2 bad input. No base model is loaded.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from networks.lora_file import load_lora_file  # noqa: E402
from networks.ops.lora_io import run_tool  # noqa: E402
from networks.ops.lora_report import check_state, format_report  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="check_lora.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("file", type=Path, help="LoRA file (.safetensors, .ckpt, .pt)")
    parser.add_argument("--summary", action="store_true", help="totals only, no per-module lines")
    parser.add_argument("-s", "--show_all_keys", action="store_true", help="also list every tensor (kohya's)")
    return parser


def check(args: argparse.Namespace) -> bool:
    """Print the report; True when it found problems."""
    state, metadata = load_lora_file(args.file)
    report = check_state(state, metadata)
    print(f"file: {args.file} ({len(state)} tensors, {len(metadata)} metadata keys)")
    print("\n".join(format_report(report, modules=not args.summary)))
    if args.show_all_keys:
        for key, value in state.items():
            v = value.float().abs()
            shape = str(tuple(value.shape)).replace(", ", "-")
            print(
                f"{key},{shape},{float(v.mean()) if v.numel() else 0.0},{float(v.min()) if v.numel() else 0.0}"
            )
    return bool(report.problems)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    found: list[bool] = []
    code = run_tool(lambda: found.append(check(args)))
    return code or (1 if found and found[0] else 0)


if __name__ == "__main__":
    sys.exit(main())
