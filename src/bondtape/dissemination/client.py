"""A Python client that follows the feed over WebSocket and resumes after a disconnect.

    async with FeedClient("ws://127.0.0.1:8000/feed/ws", data_sets=["CORP"]) as feed:
        async for message in feed:          # dicts, in order, each exactly once
            ...

The client remembers the position (date, seq) of the last message of each data set; after
a disconnect it reconnects with ``from`` = the next position, drops anything it has seen
(no duplicate) and reconnects again if a message would skip a number (no gap).
``FeedClient.raw()`` yields the message text exactly as sent.
"""
from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, AsyncIterator, Iterable
from urllib.parse import urlencode, urlsplit, urlunsplit

import websockets
from websockets.asyncio.client import connect

__all__ = ["FeedClient", "FeedGap"]

log = logging.getLogger("bondtape.feed.client")


class FeedGap(RuntimeError):
    """A message arrived out of order: the client reconnects from its last position."""


class FeedClient:
    def __init__(self, url: str, data_sets: Iterable[str] = ("CORP", "AGCY"),
                 start: dict[str, tuple[str, int]] | None = None, *, headers: dict[str, str] | None = None,
                 reconnect_delay: float = 0.1, max_reconnect_delay: float = 5.0, max_reconnects: int | None = None):
        self.url = url
        self.data_sets = [d.upper() for d in data_sets]
        self.start = dict(start or {})  # first position wanted per data set (date, seq)
        self.positions: dict[str, tuple[str, int]] = {}  # last received per data set
        self.headers = headers or {}
        self.reconnect_delay = reconnect_delay
        self.max_reconnect_delay = max_reconnect_delay
        self.max_reconnects = max_reconnects
        self.reconnects = 0
        self.duplicates_dropped = 0
        self._ws = None
        self._closed = False

    def _connect_url(self) -> str:
        wanted = dict(self.start)
        wanted.update({ds: (d, s + 1) for ds, (d, s) in self.positions.items()})
        query = {"data_sets": ",".join(self.data_sets)}
        if wanted:
            query["from"] = ",".join(f"{ds}:{d}:{s}" for ds, (d, s) in sorted(wanted.items()))
        parts = urlsplit(self.url)
        extra = parts.query + ("&" if parts.query else "")
        return urlunsplit((parts.scheme, parts.netloc, parts.path, extra + urlencode(query), ""))

    async def _status(self) -> None:
        """Without a start position, begin after the feed's current end (live from now),
        so that a reconnect still resumes without a gap."""
        missing = [ds for ds in self.data_sets if ds not in self.start]
        if not missing:
            return
        import httpx

        parts = urlsplit(self.url)
        scheme = "https" if parts.scheme == "wss" else "http"
        base = parts.path.rsplit("/", 1)[0]
        async with httpx.AsyncClient(headers=self.headers) as http:
            r = await http.get(urlunsplit((scheme, parts.netloc, base + "/status", "", "")))
            r.raise_for_status()
            status = r.json()["data_sets"]
        for ds in missing:
            s = status.get(ds)
            self.start[ds] = (s["date"], s["last_seq"] + 1) if s else ("", 1)

    def _accept(self, text: str) -> dict[str, Any] | None:
        msg = json.loads(text)
        ds, pos = msg["data_set"], (msg["date"], msg["seq"])
        last = self.positions.get(ds)
        if last is None:
            first = self.start.get(ds)
            if first is not None and first[0] and pos < first:
                self.duplicates_dropped += 1
                return None
        else:
            if pos <= last:
                self.duplicates_dropped += 1
                return None
            expected_next = pos == (last[0], last[1] + 1) or (pos[0] > last[0] and pos[1] == 1)
            if not expected_next:
                raise FeedGap(f"{ds}: after {last} came {pos}")
        self.positions[ds] = pos
        return msg

    async def raw(self) -> AsyncIterator[str]:
        """Message texts as sent, in order, each once; reconnects as needed."""
        delay = self.reconnect_delay
        await self._status()
        while not self._closed:
            try:
                async with connect(self._connect_url(), additional_headers=self.headers, max_size=2 ** 22) as ws:
                    self._ws = ws
                    delay = self.reconnect_delay
                    async for text in ws:
                        if self._accept(text) is not None:
                            yield text
                if self._closed:
                    return
            except (OSError, websockets.exceptions.WebSocketException, FeedGap, asyncio.TimeoutError) as exc:
                if self._closed:
                    return
                if isinstance(exc, websockets.exceptions.InvalidStatus) and exc.response.status_code == 403:
                    raise PermissionError("the feed refused this subscription (not entitled)") from exc
                received = getattr(exc, "rcvd", None)
                if received is not None and received.code == 4403:
                    raise PermissionError(f"the feed refused this subscription: {received.reason}") from exc
                if received is not None and received.code == 4400:
                    raise ValueError(f"the feed refused this request: {received.reason}") from exc
                log.info("feed connection lost (%s); resuming from %s", exc, self.positions)
            finally:
                self._ws = None
            self.reconnects += 1
            if self.max_reconnects is not None and self.reconnects > self.max_reconnects:
                raise ConnectionError(f"gave up after {self.max_reconnects} reconnects")
            await asyncio.sleep(delay)
            delay = min(self.max_reconnect_delay, delay * 2)

    async def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        async for text in self.raw():
            yield json.loads(text)

    async def close(self) -> None:
        self._closed = True
        if self._ws is not None:
            await self._ws.close()

    async def __aenter__(self) -> "FeedClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()
