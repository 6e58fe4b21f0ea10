"""Publishing the feed to NATS JetStream, a subject per data set.

Each message goes to ``{prefix}.{DATA_SET}`` (``bondtape.feed.CORP``) with the header
``Nats-Msg-Id: DATA_SET:DATE:SEQ``, so that JetStream drops a repeat within its duplicate
window. On start the last message of each subject in the stream tells where to resume:
everything stored after it is published first, then the live feed, with no gap.
"""
from __future__ import annotations

import asyncio
import collections
import json
import logging
import threading

import nats
from nats.js.api import StorageType, StreamConfig
from nats.js.errors import NotFoundError

from bondtape.dissemination.handoff import LoopHandoff
from bondtape.dissemination.publisher import DATA_SETS, FeedMessage, Publisher

__all__ = ["JetStreamPublisher"]

log = logging.getLogger("bondtape.feed.nats")


class JetStreamPublisher:
    def __init__(self, publisher: Publisher, url: str, *, stream: str = "BONDTAPE_FEED",
                 prefix: str = "bondtape.feed", data_sets: tuple[str, ...] = DATA_SETS):
        self.publisher = publisher
        self.url = url
        self.stream = stream
        self.prefix = prefix
        self.data_sets = data_sets
        self.ack_timeout = 5.0
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
        """Send each message as soon as it arrives; acknowledgements are checked by
        :meth:`_acks` meanwhile, so a send never waits for the acks of earlier ones."""
        self._unacked: collections.deque = collections.deque()
        self._ack_ready = asyncio.Event()
        self._sending = asyncio.Event()
        self._sending.set()
        acks = asyncio.get_running_loop().create_task(self._acks())
        try:
            while True:
                batch = await self._handoff.get_batch()
                for m in batch:
                    if m is None:
                        while self._unacked:
                            await asyncio.sleep(0.001)
                        return
                    await self._sending.wait()  # paused while a failure is repaired
                    await self._send(m)
        finally:
            acks.cancel()

    async def _send(self, m: FeedMessage) -> None:
        while True:
            try:
                fut = await self._js.publish_async(self.subject(m.data_set), m.body.encode(),
                                                   headers={"Nats-Msg-Id": f"{m.data_set}:{m.date}:{m.seq}"})
                break
            except Exception as exc:  # connection trouble: wait and send again
                log.warning("JetStream publish failed (%s); retrying", exc)
                await asyncio.sleep(0.2)
        self._unacked.append((m, fut))
        self._ack_ready.set()

    async def _acks(self) -> None:
        while True:
            if not self._unacked:
                self._ack_ready.clear()
                await self._ack_ready.wait()
                continue
            m, fut = self._unacked[0]
            try:
                await asyncio.wait_for(fut, self.ack_timeout)
                self._unacked.popleft()
                self.published += 1
            except Exception as exc:
                log.warning("JetStream did not acknowledge %s:%s:%s (%s); resending from there", m.data_set, m.date, m.seq, exc)
                await self._repair()

    async def _repair(self) -> None:
        """Resend, in order, everything not acknowledged (JetStream drops repeats by Msg-Id)."""
        self._sending.clear()
        try:
            pending = [m for m, _ in self._unacked]
            self._unacked.clear()
            for m in pending:
                while True:
                    try:
                        await self._js.publish(self.subject(m.data_set), m.body.encode(), timeout=self.ack_timeout,
                                               headers={"Nats-Msg-Id": f"{m.data_set}:{m.date}:{m.seq}"})
                        self.published += 1
                        break
                    except Exception as exc:
                        log.warning("JetStream resend failed (%s); retrying", exc)
                        await asyncio.sleep(0.2)
        finally:
            self._sending.set()

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
