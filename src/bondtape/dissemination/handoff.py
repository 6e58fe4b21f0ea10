"""Handing messages from the publisher's thread to an asyncio loop, in batches.

One wake-up of the loop per batch, not per message: at thousands of messages a second a
``call_soon_threadsafe`` per message costs more than sending them.
"""
from __future__ import annotations

import asyncio
import collections
import threading
from typing import Any


class LoopHandoff:
    def __init__(self, loop: asyncio.AbstractEventLoop, limit: int | None = None):
        self.loop = loop
        self.limit = limit
        self.overflow = False
        self.ended = False  # end() was called: the server stops
        self._items: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._scheduled = False
        self._event = asyncio.Event()

    def put(self, item: Any) -> None:
        """From any thread. Past ``limit`` waiting items the handoff overflows (and stays so)."""
        with self._lock:
            if self.overflow:
                return
            if self.limit is not None and len(self._items) >= self.limit:
                self.overflow = True
            else:
                self._items.append(item)
            if self._scheduled:
                return
            self._scheduled = True
        self.loop.call_soon_threadsafe(self._wake)

    def end(self) -> None:
        """From any thread: what is waiting is still handed out, then ``get_batch`` returns an
        empty list (the server stops; ``overflow`` stays False)."""
        with self._lock:
            self.ended = True
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._wake)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    def _wake(self) -> None:
        with self._lock:
            self._scheduled = False
        self._event.set()

    async def get_batch(self) -> list[Any]:
        """Everything waiting, at least one item (an empty list once overflowed or ended)."""
        while True:
            with self._lock:
                if self._items:
                    out = list(self._items)
                    self._items.clear()
                    return out
                if self.overflow or self.ended:
                    return []
            self._event.clear()
            with self._lock:
                if self._items or self.overflow or self.ended:
                    continue
            await self._event.wait()
