"""Shared body of the entry scripts: parse, validate, train, and turn user errors into one-line messages."""

from __future__ import annotations

import sys


def main(argv: list[str], *, prog: str, family: str, description: str) -> int:
    from library.errors import UserError

    try:
        from library.config import parse_config
        from library.training.run import configure_logging, train

        configure_logging()
        config = parse_config(argv, prog=prog, description=description)
        path = train(config, family)
    except UserError as exc:
        for line in exc.problems:
            print(f"error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; files already saved are kept", file=sys.stderr)
        return 130
    if path is not None:
        print(f"LoRA written to {path}")
    return 0
