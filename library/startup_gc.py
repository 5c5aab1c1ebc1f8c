"""Full garbage collections held off during start-up; what start-up built is frozen before the first step.

Importing torch, transformers and diffusers and loading a model leave ~500k long-lived Python objects, and
each automatic full collection walks all of them again: 7 full passes before the quickstart's first step,
0.7-1.0 s of its time to first step on 2 CPU cores (the young-generation passes cost 0.1-0.2 s together).
`paused()` raises the full-collection threshold only: young cycles are still freed as usual, and reference
counting frees everything outside a cycle at once.

`before_training` freezes what start-up built instead of collecting it (one more full pass, 0.3-0.6 s):
modules, classes and the models live for the whole run, and later full collections skip them (forked
DataLoader workers do not copy their pages by touching them either). The cost: a cycle that became garbage
after reaching the old generation during start-up stays until the run ends. At the first step that is 3-8
small objects and no tensor in every family and checkpoint layout tried (SD folder and single file, SDXL
folder and single file, FLUX files). The run's end unfreezes, so a process that trains again (a GUI, the
tests) collects them then.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

NO_FULL_COLLECTIONS = 10**9  # young collections between full ones: never during start-up
_saved: tuple[int, ...] = ()  # the thresholds before `paused()`, while it is active
_state = "idle"  # "paused" inside `paused()` until `before_training`, then "frozen" when it froze


@contextmanager
def paused() -> Iterator[None]:
    """Hold off full collections for one run (the CLI entry); on exit the thresholds are restored and the
    freeze undone."""
    global _saved, _state
    if _state != "idle" or not gc.isenabled():  # nested, or someone else manages the collector
        yield
        return
    # A previous run in this process (a GUI, the tests) may have left its models in reference cycles (LoRA
    # hooks): free them now, before this run loads another model. A few milliseconds in a fresh process.
    gc.collect()
    _saved = gc.get_threshold()
    gc.set_threshold(_saved[0], _saved[1], NO_FULL_COLLECTIONS)
    _state = "paused"
    try:
        yield
    finally:
        if _state == "frozen":
            gc.unfreeze()
        gc.set_threshold(*_saved)
        _state = "idle"


def before_training() -> None:
    """Freeze what start-up built and let full collections run again (over what training allocates); nothing
    outside `paused()`."""
    global _state
    if _state != "paused":
        return
    gc.set_threshold(*_saved)
    if gc.get_freeze_count() == 0:  # a freeze that exists belongs to the host application: leave it alone
        gc.freeze()
        _state = "frozen"
    else:
        _state = "idle"
