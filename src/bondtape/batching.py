"""Group commit: take what is queued into one batch."""
from __future__ import annotations

import queue
from typing import Any


def drain_batch(q: queue.Queue, first: Any, max_batch: int) -> tuple[list[Any], bool]:
    """``first`` and whatever else is queued now, up to ``max_batch`` items.

    ``None`` on the queue is the stop signal: the batch ends before it and the second value
    is True (the caller finishes the batch, then stops).
    """
    batch = [first]
    while len(batch) < max_batch:
        try:
            nxt = q.get_nowait()
        except queue.Empty:
            break
        if nxt is None:
            return batch, True
        batch.append(nxt)
    return batch, False
