"""Loading our LoRA files through diffusers pipelines, collecting what diffusers/peft/transformers complain about."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

# Words of the warnings diffusers, peft and transformers give about keys they could not place.
KEY_PROBLEM_WORDS = ("unexpected", "missing", "not match", "ignored", "unsupported", "incompatible")


def load_into_pipeline(pipe, path: Path) -> list[str]:
    """`pipe.load_lora_weights(path)`; returns the warnings (log records and Python warnings) about keys."""
    messages: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    loggers = [logging.getLogger(name) for name in ("diffusers", "transformers", "peft")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe.load_lora_weights(str(path))
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
    messages += [str(w.message) for w in caught]
    return [m for m in messages if any(w in m.lower() for w in KEY_PROBLEM_WORDS)]
