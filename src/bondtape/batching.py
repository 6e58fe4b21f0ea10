"""Group commit: take what is queued into one batch; batches without GC pauses."""
from __future__ import annotations

import gc
import queue
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator


def drain_batch(q: queue.Queue, first: Any, max_batch: int,
                size: Callable[[Any], int] | None = None) -> tuple[list[Any], bool]:
    """``first`` and whatever else is queued now, up to ``max_batch`` items (or, with
    ``size``, until the sizes of the items taken add up to ``max_batch``).

    ``None`` on the queue is the stop signal: the batch ends before it and the second value
    is True (the caller finishes the batch, then stops).
    """
    batch = [first]
    taken = size(first) if size else 1
    while taken < max_batch:
        try:
            nxt = q.get_nowait()
        except queue.Empty:
            break
        if nxt is None:
            return batch, True
        batch.append(nxt)
        taken += size(nxt) if size else 1
    return batch, False


_paused = 0  # batches in progress
_paused_lock = threading.Lock()
_was_enabled = True  # whether the collector ran before the first of the current batches


@contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection while a batch is processed.

    A batch allocates a few objects per command (results, events, rows) that live until the
    batch ends and are freed by reference counting; the collector would only walk the whole
    heap again and again meanwhile (about a fifth of the engine's time per report). Nested
    and concurrent uses are counted: collection resumes when the last batch ends, and any
    cycle made meanwhile is collected then.
    """
    global _paused, _was_enabled
    with _paused_lock:
        _paused += 1
        if _paused == 1:
            _was_enabled = gc.isenabled()
            gc.disable()
    try:
        yield
    finally:
        with _paused_lock:
            _paused -= 1
            if _paused == 0 and _was_enabled:
                gc.enable()


def configure_gc(young: int = 20_000) -> None:
    """The collector's policy for a bondtape process (every ``bondtape`` command and worker).

    CPython collects its youngest generation every 700 allocations by default. Intake and
    the gateways allocate a few short-lived objects per report, freed by reference counting,
    so the default collects thousands of times a second for nothing, and each collection
    stalls the thread holding the interpreter while the engine's thread, ready after its
    commit, waits. Every ``young`` allocations instead (older generations every 20 of the
    younger); cyclic garbage is still collected, a little later.
    """
    gc.set_threshold(young, 20, 20)


def freeze_after_startup() -> None:
    """For a server once it listens: collect, then move every object alive now (modules,
    the app, reference data) out of the collector's sight (gc.freeze), so that a full
    collection walks only what was made since, and pauses the process for less."""
    gc.collect()
    gc.freeze()
