"""User-facing errors: one line each, naming the flag, key or file and the fix.

Entry scripts catch `UserError` and print it without a traceback (exit code 2), so raise it for anything
the user can correct. Programming errors stay ordinary exceptions.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input. `problems` holds one line per problem."""

    def __init__(self, *problems: str) -> None:
        self.problems = [p for p in problems if p]
        super().__init__("\n".join(self.problems))


def did_you_mean(name: str, candidates: list[str] | set[str]) -> str:
    """' (did you mean "x"?)' for the closest candidate, or '' when nothing is close."""
    import difflib

    match = difflib.get_close_matches(name, sorted(candidates), n=1, cutoff=0.6)
    return f' (did you mean "{match[0]}"?)' if match else ""


def refused_pickle(error: BaseException) -> str | None:
    """For a `torch.load(..., weights_only=True)` refusal of a pickle that names a callable: what loading it
    would call, in a few words; None otherwise. Such a file would run code if loaded the unsafe way, so it is
    never retried that way."""
    import re

    text = str(error)
    match = re.search(r"GLOBAL ([\w.]+)", text) if "Weights only load failed" in text else None
    return f"loading it would call {match.group(1)}" if match else None


def load_error_detail(error: BaseException) -> str:
    """A short reason for a failed torch.load: for weights-only refusals the specific line, not torch's
    preamble (which suggests retrying with weights_only=False, the unsafe way)."""
    text = str(error).strip()
    if "Weights only load failed" not in text:
        return text.splitlines()[0] if text else type(error).__name__
    skip = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith(skip)]
    return f"the weights-only loader stopped at: {lines[-1] if lines else 'an unsupported object'}"
