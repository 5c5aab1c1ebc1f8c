"""Shared body of the entry scripts: parse, validate, train, and turn user errors into one-line messages."""

from __future__ import annotations

import os
import sys


def main(argv: list[str], *, prog: str, family: str, description: str) -> int:
    from library import startup_gc

    # Start-up creates ~500k lasting objects that automatic full collections would walk again and again.
    with startup_gc.paused():
        return _main(argv, prog=prog, family=family, description=description)


def _main(argv: list[str], *, prog: str, family: str, description: str) -> int:
    from library.errors import UserError

    try:
        from library.config import parse_config
        from library.training.run import configure_logging, train

        configure_logging()
        config = parse_config(argv, prog=prog, description=description)
        path = train(config, family)
    except UserError as exc:
        _close_progress_bars()
        for line in exc.problems:
            print(f"error: {line}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)  # a stop after saving (signal, NaN loss) has its own status
    except KeyboardInterrupt:
        _close_progress_bars()
        print("interrupted; files already saved are kept", file=sys.stderr)
        return 130
    if path is not None and os.environ.get("RANK", "0") == "0":
        print(f"LoRA written to {path}")
    return 0


def _close_progress_bars() -> None:
    """Close bars a failed phase left open (caching, steps), so each message starts on a line of its own."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()
