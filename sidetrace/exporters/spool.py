"""The spool: a durable, bounded FIFO of OTLP trace batches that every exporter reads.

Receivers append a batch and answer the app only once it is committed to SQLite (WAL mode;
``sync = "full"`` also fsyncs, so an acknowledged batch survives power loss). Appends arriving
while a commit runs are written together in the next transaction (group commit), so one fsync
serves many requests.

Each exporter reads with its own cursor, so a slow backend never holds up another; a batch is
deleted once every exporter has passed it. The spool is bounded by ``max_bytes``: past it the
oldest batches are dropped and counted. Every row carries a CRC32; a row whose bytes no longer
match is set aside (kept in ``set_aside`` for inspection) and counted, never retried, and a
database file that SQLite cannot open is moved aside and replaced, so no queued item can put
the agent into a crash loop.

All SQLite work runs in one dedicated thread; the event loop only awaits it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
import zlib
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

log = logging.getLogger("sidetrace.spool")

SET_ASIDE_KEEP = 100  # newest set-aside batches kept for inspection; older ones are deleted
SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    id INTEGER PRIMARY KEY AUTOINCREMENT, received_at REAL NOT NULL, spans INTEGER NOT NULL,
    size INTEGER NOT NULL, crc INTEGER NOT NULL, body BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS cursors (
    consumer TEXT PRIMARY KEY, acked INTEGER NOT NULL, running INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS set_aside (
    id INTEGER PRIMARY KEY, batch_id INTEGER, consumer TEXT, reason TEXT, at REAL, body BLOB);
"""


class SpoolBusy(Exception):
    """More bytes are waiting to be written than ``max_pending_bytes``: refuse, the sender retries."""


@dataclass(frozen=True)
class Batch:
    id: int
    received_at: float
    spans: int
    body: bytes


class Spool:
    """Durable bounded queue of serialized ExportTraceServiceRequest bodies (see module doc)."""

    def __init__(self, path: Path, consumers: Iterable[str], max_bytes: int, sync: str = "full",
                 max_pending_bytes: int = 64 * 1024 * 1024) -> None:
        self.path = path
        self.consumers = tuple(consumers)
        self.max_bytes = max_bytes
        self.max_pending_bytes = max_pending_bytes
        self._sync = sync
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spool")
        self._db: sqlite3.Connection | None = None
        self._bytes = 0
        self._pending: list[tuple[bytes, int, float, asyncio.Future[None]]] = []
        self._pending_bytes = 0
        self._writer: asyncio.Task[None] | None = None
        self._acked: dict[str, int] = {}
        # consumer -> highest batch id that may have been in flight when the last run died
        self._unsure: dict[str, int] = {}
        # consumers stopped in the middle of a send: their next start treats it like a crash
        self.interrupted: set[str] = set()
        self._oldest_unsent: dict[str, float | None] = {}
        self._new = {consumer: asyncio.Event() for consumer in self.consumers}
        self.dropped: dict[str, int] = {}
        self.set_aside_counts: dict[tuple[str, str], int] = {}
        self.replaced_files = 0
        # Highest batch id dropped to keep the bound: an exporter holding older batches lets them go.
        self.dropped_through = 0

    # lifecycle --------------------------------------------------------------------------------

    async def open(self) -> None:
        await self._run(self._open)

    async def close(self) -> None:
        if self._writer is not None:
            await asyncio.gather(self._writer, return_exceptions=True)
        await self._run(self._close)
        self._thread.shutdown(wait=True)

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._connect()
        except sqlite3.DatabaseError as exc:
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            log.error("spool %s cannot be opened (%s); moved it to %s and started an empty one", self.path, exc, aside)
            if self._db is not None:
                self._db.close()
            for suffix in ("", "-wal", "-shm"):
                source = Path(f"{self.path}{suffix}")
                if source.exists():
                    source.rename(f"{aside}{suffix}")
            self.replaced_files += 1
            self._connect()

    def _connect(self) -> None:
        self._db = db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={'FULL' if self._sync == 'full' else 'NORMAL'}")
        check = db.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise sqlite3.DatabaseError(f"quick_check: {check}")
        db.executescript(SCHEMA)
        self._bytes = db.execute("SELECT COALESCE(SUM(size), 0) FROM batches").fetchone()[0]
        newest = db.execute("SELECT COALESCE(MAX(id), 0) FROM batches").fetchone()[0]
        for consumer in self.consumers:
            db.execute("INSERT OR IGNORE INTO cursors VALUES (?, 0, 0)", (consumer,))
            acked, running = db.execute("SELECT acked, running FROM cursors WHERE consumer = ?",
                                        (consumer,)).fetchone()
            self._acked[consumer] = acked
            if running:  # the last run did not stop cleanly: its last send may have landed unacknowledged
                self._unsure[consumer] = newest
            db.execute("UPDATE cursors SET running = 1 WHERE consumer = ?", (consumer,))
            self._oldest_unsent[consumer] = self._first_unsent_at(consumer)
        if self.consumers:
            self._bytes -= self._delete_passed(min(self._acked.values()))

    def _close(self) -> None:
        if self._db is not None:
            clean = [c for c in self.consumers if c not in self.interrupted]
            self._db.executemany("UPDATE cursors SET running = 0 WHERE consumer = ?", [(c,) for c in clean])
            self._db.close()
            self._db = None

    async def _run(self, function, *args):  # type: ignore[no-untyped-def]
        return await asyncio.get_running_loop().run_in_executor(self._thread, function, *args)

    # writing -------------------------------------------------------------------------------------

    async def append(self, body: bytes, spans: int) -> None:
        """Queue ``body``; return once it is committed. Raises SpoolBusy when too much is pending."""
        if self._pending_bytes + len(body) > self.max_pending_bytes:
            raise SpoolBusy(f"{self._pending_bytes} bytes waiting for the disk")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((body, spans, time.time(), future))
        self._pending_bytes += len(body)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_pending(), name="spool-writer")
        await future

    async def _write_pending(self) -> None:
        while self._pending:
            group, self._pending = self._pending, []
            try:
                await self._run(self._write, [(body, spans, at) for body, spans, at, _ in group])
            except Exception as exc:  # the disk failed: every request in the group gets the error
                for *_, future in group:
                    if not future.done():
                        future.set_exception(exc)
            else:
                for *_, future in group:
                    if not future.done():
                        future.set_result(None)
                for event in self._new.values():
                    event.set()
            finally:
                self._pending_bytes -= sum(len(body) for body, *_ in group)

    def _write(self, items: list[tuple[bytes, int, float]]) -> None:
        db = self._db
        assert db is not None
        db.execute("BEGIN IMMEDIATE")
        try:
            for body, spans, at in items:
                db.execute(
                    "INSERT INTO batches (received_at, spans, size, crc, body) VALUES (?, ?, ?, ?, ?)",
                    (at, spans, len(body), zlib.crc32(body), body),
                )
                self._bytes += len(body)
            self._enforce_bound(db)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            self._bytes = db.execute("SELECT COALESCE(SUM(size), 0) FROM batches").fetchone()[0]
            raise
        for consumer in self.consumers:
            if self._oldest_unsent[consumer] is None:
                self._oldest_unsent[consumer] = self._first_unsent_at(consumer)

    def _enforce_bound(self, db: sqlite3.Connection) -> None:
        while self._bytes > self.max_bytes:
            rows = db.execute("SELECT id, spans, size FROM batches ORDER BY id LIMIT 64").fetchall()
            dropped_spans = 0
            for row_id, spans, size in rows:
                if self._bytes <= self.max_bytes:
                    break
                db.execute("DELETE FROM batches WHERE id = ?", (row_id,))
                self._bytes -= size
                dropped_spans += spans
                self.dropped_through = row_id
            self.dropped["spool_full"] = self.dropped.get("spool_full", 0) + dropped_spans
            log.warning("spool full (%d bytes): dropped the oldest batches, %d spans", self.max_bytes, dropped_spans)
            for consumer in self.consumers:
                self._oldest_unsent[consumer] = None  # recomputed after the commit

    # reading -------------------------------------------------------------------------------------

    async def wait_for_new(self, consumer: str, timeout: float) -> None:
        """Wait until a batch is committed after ``consumer``'s last ``read`` began, or ``timeout``."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._new[consumer].wait(), timeout)

    async def read(self, consumer: str, max_spans: int, max_bytes: int) -> list[Batch]:
        """The next batches after ``consumer``'s cursor, up to the limits (at least one if any)."""
        self._new[consumer].clear()  # before reading, so a commit during the read is not missed
        return await self._run(self._read, consumer, max_spans, max_bytes)

    def _read(self, consumer: str, max_spans: int, max_bytes: int) -> list[Batch]:
        db = self._db
        assert db is not None
        batches: list[Batch] = []
        spans = size = 0
        after = self._acked[consumer]
        while True:
            rows = db.execute(
                "SELECT id, received_at, spans, crc, CAST(body AS BLOB) FROM batches WHERE id > ? ORDER BY id "
                "LIMIT 64", (after,)
            ).fetchall()
            if not rows:
                return batches
            for row_id, received_at, row_spans, crc, body in rows:
                after = row_id
                if zlib.crc32(body) != crc:
                    self._set_aside(consumer, row_id, body, "corrupt")
                    continue
                if batches and (spans + row_spans > max_spans or size + len(body) > max_bytes):
                    return batches
                batches.append(Batch(row_id, received_at, row_spans, body))
                spans += row_spans
                size += len(body)

    def possibly_resent(self, consumer: str, batches: list[Batch]) -> int:
        """Spans in ``batches`` that may have reached the backend before the last run died.

        Only a run that did not stop cleanly leaves any, and only in the first read after it: an
        exporter has one request in flight at a time and acknowledges it before reading on. The
        count is an upper bound of the duplicates a crash can cause, without a write per send.
        """
        unsure = self._unsure.pop(consumer, 0)
        return sum(b.spans for b in batches if b.id <= unsure)

    async def ack(self, consumer: str, last_id: int) -> None:
        """``consumer`` is done with every batch up to ``last_id``: move its cursor, free what all passed."""
        await self._run(self._ack, consumer, last_id)

    def _ack(self, consumer: str, last_id: int) -> None:
        db = self._db
        assert db is not None
        db.execute("BEGIN IMMEDIATE")  # one commit (one fsync) for the cursor and the freed rows
        try:
            db.execute("UPDATE cursors SET acked = ? WHERE consumer = ?", (last_id, consumer))
            freed = self._delete_passed(min(last_id if c == consumer else self._acked[c] for c in self.consumers))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self._acked[consumer] = last_id
        self._bytes -= freed
        self._oldest_unsent[consumer] = self._first_unsent_at(consumer)

    def _delete_passed(self, passed: int) -> int:
        """Delete the batches every consumer has passed; return the bytes freed."""
        assert self._db is not None
        freed = self._db.execute("SELECT COALESCE(SUM(size), 0) FROM batches WHERE id <= ?", (passed,)).fetchone()[0]
        if freed:
            self._db.execute("DELETE FROM batches WHERE id <= ?", (passed,))
        return freed

    def _first_unsent_at(self, consumer: str) -> float | None:
        assert self._db is not None
        row = self._db.execute("SELECT received_at FROM batches WHERE id > ? ORDER BY id LIMIT 1",
                               (self._acked[consumer],)).fetchone()
        return row[0] if row else None

    async def set_aside(self, consumer: str, batch: Batch, reason: str) -> None:
        """Keep ``batch`` out of ``consumer``'s way for good (the backend rejected it as invalid)."""
        await self._run(self._set_aside, consumer, batch.id, batch.body, reason, batch.spans)

    def _set_aside(self, consumer: str, batch_id: int, body: bytes, reason: str, spans: int | None = None) -> None:
        assert self._db is not None
        self._db.execute("INSERT INTO set_aside (batch_id, consumer, reason, at, body) VALUES (?, ?, ?, ?, ?)",
                         (batch_id, consumer, reason, time.time(), body))
        self._db.execute("DELETE FROM set_aside WHERE id <= (SELECT MAX(id) FROM set_aside) - ?", (SET_ASIDE_KEEP,))
        if spans is None:  # a corrupt row: its span count column may be wrong too, but it is all we have
            spans = self._db.execute("SELECT spans FROM batches WHERE id = ?", (batch_id,)).fetchone()[0]
        key = (consumer, reason)
        self.set_aside_counts[key] = self.set_aside_counts.get(key, 0) + spans
        log.error("exporter %s: set aside batch %d (%d spans): %s; kept in the spool's set_aside table",
                  consumer, batch_id, spans, reason)

    # observability -------------------------------------------------------------------------------

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def oldest_unsent_age(self, consumer: str) -> float:
        oldest = self._oldest_unsent.get(consumer)
        return max(0.0, time.time() - oldest) if oldest is not None else 0.0

    def families(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("sidetrace_spool_size_bytes", "Bytes of span data queued on disk.",
                                value=self._bytes, unit="bytes")
        yield GaugeMetricFamily("sidetrace_spool_capacity_bytes", "The spool's bound ([spool] max_bytes).",
                                value=self.max_bytes, unit="bytes")
        yield GaugeMetricFamily("sidetrace_spool_pending_bytes", "Bytes accepted and waiting to be committed.",
                                value=self._pending_bytes, unit="bytes")
        oldest = GaugeMetricFamily("sidetrace_spool_oldest_unsent_age_seconds",
                                   "Age of the oldest batch an exporter has not delivered yet.",
                                   labels=["exporter"], unit="seconds")
        for consumer in self.consumers:
            oldest.add_metric([consumer], self.oldest_unsent_age(consumer))
        yield oldest
        dropped = CounterMetricFamily("sidetrace_spool_dropped_spans", "Spans dropped by the spool, by reason.",
                                      labels=["reason"])
        dropped.add_metric(["spool_full"], self.dropped.get("spool_full", 0))
        yield dropped
        aside = CounterMetricFamily("sidetrace_spool_set_aside_spans",
                                    "Spans set aside for an exporter and never retried, by reason "
                                    "(corrupt: failed its checksum; rejected: the backend called it invalid).",
                                    labels=["exporter", "reason"])
        for (consumer, reason), count in sorted(self.set_aside_counts.items()):
            aside.add_metric([consumer, reason], count)
        yield aside
        yield CounterMetricFamily("sidetrace_spool_replaced_files",
                                  "Spool files SQLite could not open, moved aside and replaced.",
                                  value=self.replaced_files)
