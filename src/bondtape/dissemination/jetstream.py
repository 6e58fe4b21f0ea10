"""Publishing the feed to NATS JetStream, a subject per data set.

Each message goes to ``{prefix}.{DATA_SET}`` (``bondtape.feed.CORP``) with the header
``Nats-Msg-Id: DATA_SET:DATE:SEQ``, so that JetStream drops a repeat within its duplicate
window. On start the last message of each subject in the stream tells where to resume:
everything stored after it is published first, then the live feed, with no gap.
"""
from __future__ import annotations

import asyncio
import json
import logging
import threading
from typing import Any

import nats
from nats.js.api import StorageType, StreamConfig
from nats.js.errors import NotFoundError

from bondtape.dissemination.handoff import LoopHandoff
from bondtape.dissemination.publisher import DATA_SETS, FeedMessage, Publisher

__all__ = ["JetStreamPublisher"]

log = logging.getLogger("bondtape.feed.nats")


class JetStreamPublisher:
    def __init__(self, publisher: Publisher, url: str, *, stream: str = "BONDTAPE_FEED",
                 prefix: str = "bondtape.feed", data_sets: tuple[str, ...] = DATA_SETS, max_in_flight: int = 256):
        self.publisher = publisher
        self.url = url
        self.stream = stream
        self.prefix = prefix
        self.data_sets = data_sets
        self.max_in_flight = max_in_flight
        self.published = 0
        self.enqueued = 0
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._handoff: LoopHandoff | None = None
        self._sub = None
        self._nc = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    def subject(self, data_set: str) -> str:
        return f"{self.prefix}.{data_set}"

    # -- lifecycle -----------------------------------------------------------------------
    def start(self, timeout: float = 10.0) -> "JetStreamPublisher":
        self._thread = threading.Thread(target=self._loop.run_forever, name="bondtape-feed-nats", daemon=True)
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(self._open(), self._loop)
        fut.result(timeout)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self._sub is not None:
            self._sub.close()
            self._sub = None
        if self._thread is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(timeout)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)
            self._thread = None

    async def _open(self) -> None:
        self._nc = await nats.connect(self.url, name="bondtape-feed", max_reconnect_attempts=-1)
        self._js = self._nc.jetstream()
        subjects = [f"{self.prefix}.>"]
        try:
            await self._js.stream_info(self.stream)
        except NotFoundError:
            await self._js.add_stream(StreamConfig(name=self.stream, subjects=subjects, storage=StorageType.FILE,
                                                   duplicate_window=120.0))
        start = {}
        for ds in self.data_sets:
            start[ds] = await self._resume_position(ds)
        self._handoff = LoopHandoff(self._loop)
        self._pump_task = self._loop.create_task(self._pump())

        def deliver(m: FeedMessage) -> None:
            self.enqueued += 1
            self._handoff.put(m)

        # subscribe() replays the stored part from an executor thread so the loop keeps running
        self._sub = await self._loop.run_in_executor(None, self.publisher.subscribe, deliver, self.data_sets, start)

    async def _resume_position(self, ds: str) -> tuple[str, int]:
        try:
            last = await self._js.get_last_msg(self.stream, self.subject(ds))
        except NotFoundError:
            return ("", 1)
        body = json.loads(last.data)
        return (body["date"], body["seq"] + 1)

    async def _pump(self) -> None:
        while True:
            batch = await self._handoff.get_batch()
            stop = None in batch
            batch = [m for m in batch if m is not None]
            for i in range(0, len(batch), self.max_in_flight):
                await self._publish(batch[i:i + self.max_in_flight])
            if stop:
                return

    async def _publish(self, batch: list[FeedMessage]) -> None:
        """Publish in order without waiting in between, then wait for the acks; what was not
        acknowledged is sent again (JetStream drops repeats by Nats-Msg-Id)."""
        while batch:
            try:
                acks = [await self._js.publish_async(self.subject(x.data_set), x.body.encode(),
                                                     headers={"Nats-Msg-Id": f"{x.data_set}:{x.date}:{x.seq}"})
                        for x in batch]
                results = await asyncio.gather(*acks, return_exceptions=True)
            except Exception as exc:  # connection trouble before all were sent
                log.warning("JetStream publish failed (%s); retrying", exc)
                await asyncio.sleep(0.2)
                continue
            failed = [x for x, r in zip(batch, results) if isinstance(r, BaseException)]
            self.published += len(batch) - len(failed)
            if failed:
                log.warning("JetStream did not acknowledge %d messages; retrying", len(failed))
                await asyncio.sleep(0.2)
            batch = failed

    async def _close(self) -> None:
        if self._handoff is not None:
            self._handoff.put(None)
            try:
                await asyncio.wait_for(self._pump_task, 10)
            except asyncio.TimeoutError:
                self._pump_task.cancel()
        if self._nc is not None:
            await self._nc.drain()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every message handed over so far is acknowledged by JetStream."""
        import time

        target = self.enqueued
        deadline = time.monotonic() + timeout
        while self.published < target:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.001)
        return True
