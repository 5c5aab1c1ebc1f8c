"""Print a safetensors file's header metadata as sorted, indented JSON (kohya's tools/show_metadata.py).

    python tools/show_metadata.py --model my_lora.safetensors

Values that are themselves JSON (ss_tag_frequency, ss_dataset_dirs, ss_network_args, ...) are expanded in
place instead of being shown as one escaped string. Exit codes: 0 printed, 1 no metadata, 2 bad input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from library.errors import UserError  # noqa: E402
from networks.ops.lora_io import run_tool  # noqa: E402
from networks.ops.lora_report import format_metadata  # noqa: E402


def read_metadata(path: Path) -> dict[str, str]:
    """The header metadata of a safetensors file, without reading its tensors."""
    from networks.lora_file import is_safetensors

    if not path.is_file():
        raise UserError(f"--model {path}: file not found; check the path")
    if not is_safetensors(path):
        raise UserError(f"--model {path}: not a safetensors file (only safetensors files carry metadata)")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # a damaged header: say so in one line
        raise UserError(
            f"--model {path}: cannot read the safetensors header ({e}); the file may be truncated"
        ) from e


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="show_metadata.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a .safetensors file")
    args = parser.parse_args(argv)
    found: list[dict[str, str]] = []
    code = run_tool(lambda: found.append(read_metadata(args.model)))
    if code:
        return code
    if not found[0]:
        print("No metadata found", file=sys.stderr)
        return 1
    print(format_metadata(found[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
