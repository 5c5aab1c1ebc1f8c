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
