"""The spool: a durable, bounded store of queued batches that every exporter reads from.

Writers append a batch to a named queue (the trace pipeline writes to ``traces``) and get their
answer only once it is committed to SQLite (WAL mode; ``sync = "full"`` also fsyncs, so an
acknowledged batch survives power loss). Appends arriving while a commit runs are written together
in the next transaction (group commit), so one fsync serves many requests.

Each reader (an exporter, or one backend's share of a load-balancing exporter) reads one queue at
its own cursor, so a slow backend never holds up another. A reader named ``owner/part`` is a
sub-reader of ``owner`` (exporter names hold no "/"): registering ``owner`` at open (with
``sub_readers``) restores its sub-readers' cursors too, and removing ``owner`` removes them and discards
their queues (what they held undelivered is counted as dropped with reason ``exporter_removed``); so
does an open that finds a queue no configured reader reads any more (an exporter renamed or removed
while the agent was down). Removing a reader of the trace queue, by a reload or while the agent was
down, deletes the batches only it still needed, or all the queue holds if it was the last reader, and
counts them the same way (a reader new at open starts where the slowest was, so a rename loses nothing). Cursors
live in a small preallocated file beside the database (``spool.db-cursors``) that is overwritten in
place: acknowledging a delivered batch never needs new disk space, so a spool that filled its disk
still drains. A batch is deleted once every reader of its queue has passed it.

A body of 4 KiB or more is stored LZ4-compressed (the benchmark's OTLP requests shrink tenfold), so far
fewer bytes go through SQLite's pages, its WAL and the disk; a spool written before compression is read
as it is. The spool is bounded by ``max_bytes`` of stored bytes (queued batches plus set-aside ones):
past it the oldest are dropped, and counted once the transaction that drops them has committed. Every
row carries a CRC32 of its stored bytes; a row whose bytes no longer match, or do not decompress, is
moved to the ``set_aside`` table once and counted, never retried. Only a database SQLite calls
corrupt (not a database, malformed, failing its quick check) is moved aside and replaced; a locked,
full, read-only or unreadable one fails ``open`` with a SpoolError naming the file and the cause, and
nothing is moved.

All SQLite work runs in one dedicated thread; the event loop only awaits it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sqlite3
import struct
import time
import uuid
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cramjam
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from sidetrace._aio import wait_event
from sidetrace._files import make_private_dirs

log = logging.getLogger("sidetrace.spool")

TRACES = "traces"  # the queue the trace pipeline writes for the exporters that read it whole (otlp)
SET_ASIDE_KEEP = 100  # newest set-aside batches kept for inspection; older ones are deleted
# Delivered rows are deleted in bulk, at most this often or once this many bytes wait (one commit for many acks).
PRUNE_SECONDS = 1.0
PRUNE_BYTES = 16 * 1024 * 1024
PRUNE_ROWS = 256  # rows deleted per transaction
PAGE_SIZE = 16 * 1024
SHRINK_BYTES = 64 * 1024 * 1024  # free pages past this are given back to the filesystem
SET_ASIDE_REASONS = ("corrupt", "rejected", "too_large", "undecodable")
SCHEMA_VERSION = "3"
SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    id INTEGER PRIMARY KEY AUTOINCREMENT, queue TEXT NOT NULL DEFAULT 'traces', received_at REAL NOT NULL,
    items INTEGER NOT NULL, size INTEGER NOT NULL, crc INTEGER NOT NULL, body BLOB NOT NULL,
    codec INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS batches_by_queue ON batches (queue, id);
CREATE TABLE IF NOT EXISTS set_aside (
    id INTEGER PRIMARY KEY, batch_id INTEGER, reader TEXT, reason TEXT, detail TEXT, at REAL, items INTEGER,
    size INTEGER, body BLOB);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
# How a row's body is stored: as received, or as one LZ4 block after its length as received (4 bytes,
# little-endian, as python-lz4 writes it). Bodies this small fit in their row's page and are stored as
# received; so is one that LZ4 would not shrink. A row's size is its stored length: the bound is on disk.
RAW, LZ4 = 0, 1
COMPRESS_MIN = 4096
# A compressed row's CRC32 (of the stored bytes) starts from this value instead of 0, so that an older agent,
# which knows no codec, finds it corrupt and sets it aside rather than sending compressed bytes as a request.
LZ4_CRC_START = 0x4C5A3401
# Bodies up to this size decompress into one buffer the spool thread keeps, then are copied out once: a
# fresh buffer for each would cost its page faults twice (measured: 100 against 60 us for 169 KB).
SCRATCH_MAX = 1024 * 1024
# SQLite's primary result codes (https://sqlite.org/rescode.html); Python 3.11+ exposes them on errors.
_CAUSES = {3: "permission", 5: "locked", 6: "locked", 8: "readonly", 10: "io", 11: "corrupt", 13: "full",
           14: "cantopen", 23: "permission", 26: "corrupt"}
_CAUSE_WORDS = (("not a database", "corrupt"), ("malformed", "corrupt"), ("locked", "locked"),
                ("disk is full", "full"), ("readonly", "readonly"), ("unable to open", "cantopen"),
                ("disk i/o", "io"), ("authorization denied", "permission"))


class SpoolError(Exception):
    """The spool cannot be opened or written; the message names the file and the cause."""


class SpoolBusy(SpoolError):
    """More bytes wait to be written than ``max_pending_bytes``: refuse, the sender retries."""


class SpoolFull(SpoolError):
    """The filesystem holding the spool is full: refuse, the sender retries."""


# What sqlite_cause can answer; each is exported at 0 from the start so that an alert sees the first failed write.
WRITE_FAILURE_CAUSES = ("corrupt", "locked", "full", "readonly", "cantopen", "permission", "io", "other")


def sqlite_cause(exc: BaseException) -> str:
    """What kind of SQLite failure ``exc`` is: corrupt, locked, full, readonly, cantopen, permission, io or other."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None and code & 0xFF in _CAUSES:
        return _CAUSES[code & 0xFF]
    text = str(exc).lower()
    return next((cause for words, cause in _CAUSE_WORDS if words in text), "other")


@dataclass(frozen=True)
class Batch:
    id: int
    received_at: float
    items: int
    body: bytes


class CursorFile:
    """Readers' cursors in two preallocated slots, overwritten in turn (no new disk space per write).

    Each write goes to the slot not holding the newest state, with a sequence number and a CRC, so a
    torn write leaves the previous state readable.
    """

    SLOT = 64 * 1024
    _HEADER = struct.Struct("<4sQII")
    _MAGIC = b"STC1"

    def __init__(self, path: Path, fsync: bool) -> None:
        self.path = path
        self.fsync = fsync
        self._fd: int | None = None
        self._seq = 0

    def open(self) -> dict[str, Any] | None:
        """Open (creating and preallocating when absent); return the newest valid state, or None."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._fd = fd
        if os.fstat(fd).st_size < 2 * self.SLOT:
            os.pwrite(fd, bytes(2 * self.SLOT), 0)  # real zeros, not a hole: later writes need no new space
            os.fsync(fd)
        best: tuple[int, dict[str, Any]] | None = None
        for slot in (0, 1):
            raw = os.pread(fd, self.SLOT, slot * self.SLOT)
            magic, seq, length, crc = self._HEADER.unpack_from(raw)
            payload = raw[self._HEADER.size:self._HEADER.size + length]
            if magic != self._MAGIC or len(payload) != length or zlib.crc32(payload) != crc:
                continue
            try:
                state = json.loads(payload)
            except ValueError:
                continue
            if best is None or seq > best[0]:
                best = (seq, state)
        if best is None:
            return None
        self._seq = best[0]
        return best[1]

    def store(self, state: dict[str, Any]) -> None:
        assert self._fd is not None
        payload = json.dumps(state, separators=(",", ":")).encode()
        if self._HEADER.size + len(payload) > self.SLOT:
            raise SpoolError(f"{self.path}: too many readers for one cursor slot ({len(payload)} bytes)")
        seq = self._seq + 1
        record = self._HEADER.pack(self._MAGIC, seq, len(payload), zlib.crc32(payload)) + payload
        os.pwrite(self._fd, record, (seq % 2) * self.SLOT)
        if self.fsync:
            os.fdatasync(self._fd)
        self._seq = seq

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class SpaceReserve:
    """A file of zeros beside the spool, given back to the filesystem when it is full.

    SQLite needs room in its write-ahead log even to delete rows; on a disk the spool filled, this
    reserve is that room, so delivered batches can still be deleted and the file shrunk. While it
    cannot be recreated, appends are refused (the disk is full), keeping it for that purpose.
    """

    MAX = 8 * 1024 * 1024

    def __init__(self, path: Path) -> None:
        self.path = path
        self.size = 0
        self.present = False

    def open(self) -> None:
        stats = os.statvfs(self.path.parent)
        self.size = max(256 * 1024, min(self.MAX, stats.f_blocks * stats.f_frsize // 16))
        self.present = self.path.exists() and self.path.stat().st_size >= self.size
        self.ensure()

    def ensure(self) -> bool:
        """Whether the reserve is in place, creating it when there is room for it and as much again."""
        if self.present:
            return True
        stats = os.statvfs(self.path.parent)
        if stats.f_bavail * stats.f_frsize < 2 * self.size:
            return False
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                for offset in range(0, self.size, 1 << 20):
                    os.pwrite(fd, bytes(min(1 << 20, self.size - offset)), offset)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            self.release()
            return False
        self.present = True
        return True

    def release(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self.present = False


class Spool:
    """Durable bounded queues of serialized batches (see module doc)."""

    def __init__(self, path: Path, max_bytes: int, sync: str = "full",
                 max_pending_bytes: int = 64 * 1024 * 1024) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.max_pending_bytes = max_pending_bytes
        self._sync = sync
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spool")
        self._db: sqlite3.Connection | None = None
        self._cursors = CursorFile(Path(f"{path}-cursors"), sync == "full")
        self._reserve = SpaceReserve(Path(f"{path}-reserve"))
        self._generation = ""
        self._queue_of: dict[str, str] = {}  # reader -> queue
        self._acked: dict[str, int] = {}  # reader -> highest id it is done with
        self._queue_bytes: dict[str, int] = {}  # queue -> bytes of batches some reader still needs
        self._aside_bytes = 0
        self._prune: dict[str, int] = {}  # queue -> id through which rows wait to be deleted
        self._prunable = 0  # bytes of rows waiting to be deleted
        self._pruned_at = 0.0
        self._pending: list[tuple[str, bytes, int, float, asyncio.Future[None]]] = []
        self._pending_bytes = 0
        self._writing: list[tuple[str, bytes, int, float, asyncio.Future[None]]] = []  # the group being committed
        self._writer: asyncio.Task[None] | None = None
        self._new: dict[str, asyncio.Event] = {}  # reader -> set when its queue grows
        # reader -> highest batch id that may have been in flight when the last run died
        self._unsure: dict[str, int] = {}
        # readers stopped in the middle of a send: the next start treats it like a crash
        self.interrupted: set[str] = set()
        self._oldest_unsent: dict[str, float | None] = {}
        self._corrupt_seen: set[int] = set()
        self._scratch = bytearray()  # the spool thread's decompression buffer (see SCRATCH_MAX)
        self.dropped: dict[str, int] = {}  # reader -> items dropped at the bound before it delivered them
        self.set_aside_counts: dict[tuple[str, str], int] = {}
        self.replaced_files = 0
        self.failed_writes: dict[str, int] = {}  # cause -> appends refused because the write failed
        # queue -> highest batch id dropped at the bound: a reader holding older batches lets them go
        self.dropped_through: dict[str, int] = {}
        self._open_readers: list[tuple[str, str, bool, bool]] = []
        self.discarded: dict[str, int] = {}  # exporter -> items deleted with the queues of a removed exporter

    # lifecycle --------------------------------------------------------------------------------

    def add_reader_at_open(self, reader: str, queue: str = TRACES, resume_only: bool = False,
                           sub_readers: bool = False) -> None:
        """Register ``reader`` of ``queue`` before ``open`` (its cursor is restored or created there).

        ``resume_only``: restored when the cursor file has it, never created. ``sub_readers``: its
        sub-readers (``reader/part``) come back with it, whether it does or not. At open, a queue that no
        registered reader (nor sub-reader brought back) reads any more is discarded as a removed exporter's
        is (its items counted with reason ``exporter_removed``); in the trace queue, a reader no longer
        registered loses what it alone still needed, counted the same way.
        """
        self._open_readers.append((reader, queue, resume_only, sub_readers))

    async def open(self) -> None:
        """Open or create the spool; raise SpoolError (locked, full, read-only, ...) naming file and cause."""
        await self._run(self._open)

    async def close(self) -> None:
        if self._writer is not None:
            await asyncio.gather(self._writer, return_exceptions=True)
        await self._run(self._close)
        self._thread.shutdown(wait=True)

    def _open(self) -> None:
        try:
            make_private_dirs(self.path.parent)
        except OSError as exc:
            raise SpoolError(f"spool {self.path}: cannot create {self.path.parent}: {exc.strerror or exc}") from None
        try:
            self._connect()
        except sqlite3.DatabaseError as exc:
            if sqlite_cause(exc) != "corrupt":
                self._disconnect()
                raise SpoolError(self._describe(exc)) from None
            self._move_aside(exc)
            try:
                self._connect()
            except sqlite3.DatabaseError as again:
                self._disconnect()
                raise SpoolError(self._describe(again)) from None
        except OSError as exc:
            self._disconnect()
            raise SpoolError(f"spool {self._cursors.path}: {exc.strerror or exc}") from None

    def _describe(self, exc: BaseException) -> str:
        cause = sqlite_cause(exc)
        where = self.path.parent
        if cause == "io" and _filesystem_full(where):
            cause = "full"
        advice = {
            "locked": "another process holds it (a second agent, or a sqlite3 shell); stop it or use another "
                      "agent.data_dir",
            "full": f"the filesystem holding {where} is full; free space there",
            "readonly": f"it or {where} is read-only; make both writable by the agent's user (uid {os.getuid()})",
            "cantopen": f"check that {where} exists and the agent's user (uid {os.getuid()}) may write there",
            "permission": f"the agent's user (uid {os.getuid()}) may not read and write it",
        }.get(cause, "see the SQLite message")
        return f"spool {self.path}: cannot be used ({exc}): {advice}"

    def _move_aside(self, exc: BaseException) -> None:
        self._disconnect()
        aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
        for suffix in ("", "-wal", "-shm", "-cursors"):
            source = Path(f"{self.path}{suffix}")
            if source.exists():
                source.rename(f"{aside}{suffix}")
        log.error("spool %s is corrupt (%s): moved it to %s and started an empty spool", self.path, exc, aside)
        self.replaced_files += 1

    def _disconnect(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
        self._cursors.close()

    def _connect(self) -> None:
        self._db = db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=1.0)
        if db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0] == 0:
            # Only possible before the first table. Incremental vacuum lets the file shrink; 16 KiB pages keep a
            # request's body in few overflow pages, halving the CPU of writing and deleting it (measured).
            db.execute(f"PRAGMA page_size={PAGE_SIZE}")
            db.execute("PRAGMA auto_vacuum=INCREMENTAL")
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise sqlite3.OperationalError(f"attempt to write a readonly database (journal mode {mode})")
        db.execute(f"PRAGMA synchronous={'FULL' if self._sync == 'full' else 'NORMAL'}")
        check = db.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise sqlite3.DatabaseError(f"database disk image is malformed (quick_check: {check})")
        db.execute("BEGIN IMMEDIATE")  # the write lock: a spool another process holds fails here, not later
        try:
            legacy = self._migrate(db)
            _create_schema(db)
            if "codec" not in {row[1] for row in db.execute("PRAGMA table_info(batches)")}:
                # Schema 2, before compression: every body as received. Adding a column with a default rewrites nothing.
                db.execute("ALTER TABLE batches ADD COLUMN codec INTEGER NOT NULL DEFAULT 0")
            row = db.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
            if row is None:
                self._generation = uuid.uuid4().hex
                db.execute("INSERT INTO meta VALUES ('generation', ?)", (self._generation,))
            else:
                self._generation = row[0]
            db.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
            newest = {q: n for q, n in db.execute("SELECT queue, MAX(id) FROM batches GROUP BY queue")}
            self._restore_cursors(legacy, newest)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        self._reserve.open()
        # Fold the WAL into the database before it outgrows the reserve, so the reserve is always room
        # enough to complete a checkpoint on a full disk; a WAL grown past twice that is cut back after it.
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        db.execute(f"PRAGMA wal_autocheckpoint={max(64, self._reserve.size // page_size)}")
        db.execute(f"PRAGMA journal_size_limit={2 * self._reserve.size}")
        self._aside_bytes = db.execute("SELECT COALESCE(SUM(size), 0) FROM set_aside").fetchone()[0]
        for queue in set(self._queue_of.values()) | set(newest):
            passed = self._passed(queue)
            self._queue_bytes[queue] = db.execute(
                "SELECT COALESCE(SUM(size), 0) FROM batches WHERE queue = ? AND id > ?", (queue, passed)).fetchone()[0]
            self._prune[queue] = passed
        self._prune_passed()
        for reader in self._queue_of:
            self._oldest_unsent[reader] = self._first_unsent_at(reader)

    def _restore_cursors(self, legacy: dict[str, Any] | None, newest: dict[str, int]) -> None:
        """Each reader's cursor from the cursor file (or a 0.1 spool's table); new readers inherit the queue."""
        state = self._cursors.open()
        if legacy is not None:
            state = {"generation": self._generation, **legacy}
        if state is not None and state.get("generation") != self._generation:
            log.warning("spool %s: cursor file %s belongs to another spool file; every reader starts over",
                        self.path, self._cursors.path)
            state = None
        state = state or {}
        saved: dict[str, int] = {reader: int(acked) for reader, acked in state.get("acked", {}).items()}
        running = set(state.get("running", ()))
        saved_queues: dict[str, str] = state.get("queues", {})
        for reader, queue, resume_only, _ in self._open_readers:
            if reader in saved:
                self._acked[reader] = saved[reader]
                if reader in running:  # the last run did not stop cleanly: its last send may have landed
                    self._unsure[reader] = newest.get(queue, 0)
            elif resume_only:
                continue
            else:  # new: it inherits what the queue still holds for the readers it replaces
                known = [acked for name, acked in saved.items() if saved_queues.get(name, TRACES) == queue]
                self._acked[reader] = min(known, default=0)
            self._queue_of[reader] = queue
            self._new[reader] = asyncio.Event()
        owners = {reader for reader, _, _, sub_readers in self._open_readers if sub_readers}
        for reader, acked in saved.items():  # sub-readers come back with their owner
            if reader.split("/", 1)[0] in owners and "/" in reader and reader not in self._queue_of:
                queue = saved_queues.get(reader, reader)
                self._acked[reader] = acked
                if reader in running:
                    self._unsure[reader] = newest.get(queue, 0)
                self._queue_of[reader] = queue
                self._new[reader] = asyncio.Event()
        for queue in newest:  # a sub-reader's queue whose cursor was lost: read from its start (maybe sent again)
            if queue.split("/", 1)[0] in owners and "/" in queue and queue not in self._queue_of:
                self._acked[queue], self._unsure[queue] = 0, newest[queue]
                self._queue_of[queue] = queue
                self._new[queue] = asyncio.Event()
        gone = sorted(set(saved) - set(self._queue_of))
        if gone:
            log.info("spool %s: readers no longer configured, cursors removed: %s", self.path, ", ".join(gone))
        # The queues of readers no longer configured (an exporter renamed, removed or of another kind since the
        # last run), and rows no cursor accounts for: nothing will read them again. Discarded and counted as a
        # reload's removal is. In the trace queue, a reader no longer configured loses what it alone still needed
        # (a new reader starts where the slowest was, so a rename loses nothing), or all it had not delivered when
        # the queue has no reader left.
        read = set(self._queue_of.values())
        left_traces = [r for r in gone if saved_queues.get(r, TRACES) == TRACES]
        if TRACES in read:
            passed = self._passed(TRACES)
            for reader in left_traces:
                if saved[reader] < passed:  # deleted by the prune below
                    self._count_discarded(reader, TRACES, saved[reader], passed,
                                          f"that only exporter {reader} still needed; it is no longer configured")
        elif TRACES in newest:
            for reader in left_traces:
                self._count_discarded(reader, TRACES, saved[reader], None,
                                      f"that exporter {reader} had not delivered; it is no longer configured")
            after = min((saved[r] for r in left_traces), default=0)
            self._discard_queue(TRACES, after, why="that no configured exporter reads", keep_traces=False,
                                count=not left_traces)
            newest.pop(TRACES, None)
        for queue in sorted((set(newest) | {saved_queues.get(r, TRACES) for r in gone}) - read - {TRACES}):
            after = min((saved[r] for r in gone if saved_queues.get(r, TRACES) == queue), default=0)
            self._discard_queue(queue, after, why="whose exporter is no longer configured")
            newest.pop(queue, None)
        self._store_cursors(running=self._queue_of)

    def _migrate(self, db: sqlite3.Connection) -> dict[str, Any] | None:
        """Bring a spool written by sidetrace 0.1 (one shared queue, cursors in a table) to this schema."""
        columns = {row[1] for row in db.execute("PRAGMA table_info(batches)")}
        if "spans" not in columns:
            return None
        db.execute("ALTER TABLE batches RENAME COLUMN spans TO items")
        db.execute("ALTER TABLE batches ADD COLUMN queue TEXT NOT NULL DEFAULT 'traces'")
        cursors = db.execute("SELECT consumer, acked, running FROM cursors").fetchall()
        db.execute("ALTER TABLE set_aside RENAME TO set_aside_v1")
        _create_schema(db)
        for row_id, batch_id, reader, reason, at, body in db.execute(
                "SELECT id, batch_id, consumer, reason, at, body FROM set_aside_v1").fetchall():
            kind = reason.split(":", 1)[0] if reason.split(":", 1)[0] in SET_ASIDE_REASONS else "rejected"
            db.execute("INSERT INTO set_aside VALUES (?, ?, ?, ?, ?, ?, 0, ?, ?)",
                       (row_id, batch_id, reader, kind, reason, at, len(body or b""), body))
        db.execute("DROP TABLE set_aside_v1")
        db.execute("DROP TABLE cursors")
        log.info("spool %s: upgraded to schema %s (%d cursors kept)", self.path, SCHEMA_VERSION, len(cursors))
        return {"acked": {name: acked for name, acked, _ in cursors},
                "running": [name for name, _, running in cursors if running]}

    def _close(self) -> None:
        if self._db is not None:
            self._store_cursors(running=self.interrupted)
            self._prune_passed()
            self._disconnect()

    async def _run(self, function, *args):  # type: ignore[no-untyped-def]
        return await asyncio.get_running_loop().run_in_executor(self._thread, function, *args)

    # readers -------------------------------------------------------------------------------------

    async def add_reader(self, reader: str, queue: str = TRACES) -> None:
        """Register a new reader on an open spool; it starts with what the queue's readers still need."""
        await self._run(self._add_reader, reader, queue)

    def _add_reader(self, reader: str, queue: str) -> None:
        if reader in self._queue_of:
            return
        self._acked[reader] = self._passed(queue)  # 0 when the queue has no reader: everything it holds
        self._queue_of[reader] = queue
        self._queue_bytes.setdefault(queue, 0)
        self._new[reader] = asyncio.Event()
        self._store_cursors(running=self._queue_of)
        self._oldest_unsent[reader] = self._first_unsent_at(reader)

    async def remove_reader(self, reader: str, keep_sub_readers: bool = False) -> None:
        """Forget ``reader`` (and its sub-readers, unless ``keep_sub_readers``): batches only it still needed
        are deleted, and so is what its queue holds when it was the queue's last reader (the trace queue's
        included: add the readers that take over before removing the ones they replace). What it had not
        delivered among them is counted in ``discarded``."""
        await self._run(self._remove_reader, reader, keep_sub_readers)

    def _remove_reader(self, reader: str, keep_sub_readers: bool = False) -> None:
        for sub_reader in [r for r in self._queue_of if r.startswith(f"{reader}/") and not keep_sub_readers]:
            self._remove_reader(sub_reader)
        queue = self._queue_of.pop(reader, None)
        if queue is None:
            return
        before = self._acked.pop(reader)
        self._new.pop(reader, None)
        self._oldest_unsent.pop(reader, None)
        self._store_cursors(running=self._queue_of)
        exporter = reader.split("/", 1)[0]
        if queue in self._queue_of.values():
            passed = self._passed(queue)
            if before < passed:  # the batches only it still needed go: not delivered by it, so counted
                self._count_discarded(exporter, queue, before, passed,
                                      f"that only exporter {exporter} still needed; it was removed")
            self._free(queue, min(before, passed))
        else:
            self._discard_queue(queue, after=before, why=f"that exporter {exporter} had not delivered; it was removed",
                                exporter=exporter, keep_traces=False)

    def _discard_queue(self, queue: str, after: int, why: str = "whose exporter was removed", exporter: str = "",
                       keep_traces: bool = True, count: bool = True) -> None:
        """Delete what a queue no reader will read again still holds, counting (unless not ``count``) its items
        after ``after`` for ``exporter`` (the queue's owner by default). The trace queue is kept if
        ``keep_traces``."""
        if (queue == TRACES and keep_traces) or queue in self._queue_of.values():
            return
        if count:
            self._count_discarded(exporter or queue.split("/", 1)[0], queue, after, None, why)
        assert self._db is not None
        self._db.execute("DELETE FROM batches WHERE queue = ?", (queue,))
        self._queue_bytes.pop(queue, None)
        self._prune.pop(queue, None)

    def _count_discarded(self, exporter: str, queue: str, after: int, through: int | None, why: str) -> None:
        """Count (and log) the items of ``queue``'s batches after ``after`` (through ``through``) as discarded."""
        assert self._db is not None
        items = self._db.execute(
            "SELECT COALESCE(SUM(items), 0) FROM batches WHERE queue = ? AND id > ? AND id <= ?",
            (queue, after, through if through is not None else 1 << 62)).fetchone()[0]
        if items:
            self.discarded[exporter] = self.discarded.get(exporter, 0) + items
            log.warning("spool %s: discarded %d items of queue %s %s", self.path, items, queue, why)

    def _passed(self, queue: str) -> int:
        """The highest id every reader of ``queue`` is done with (0 when it has no reader: it keeps everything)."""
        return min((self._acked[r] for r, q in self._queue_of.items() if q == queue), default=0)

    def _store_cursors(self, running: Any) -> None:
        self._cursors.store({"generation": self._generation, "acked": self._acked, "queues": self._queue_of,
                             "running": sorted(running)})

    def set_sync(self, sync: str) -> None:
        """Apply a new ``[spool] sync`` (at a reload)."""
        self._sync = sync
        self._cursors.fsync = sync == "full"
        self._thread.submit(self._apply_sync)

    def _apply_sync(self) -> None:
        if self._db is not None:
            self._db.execute(f"PRAGMA synchronous={'FULL' if self._sync == 'full' else 'NORMAL'}")

    # writing -------------------------------------------------------------------------------------

    async def append(self, body: bytes, items: int, queue: str = TRACES) -> None:
        """Queue ``body`` on ``queue``; return once it is committed.

        Raises SpoolBusy when too much is pending, SpoolFull when the disk is full, SpoolError on any
        other write failure; nothing of a refused append stays on disk.
        """
        await self.append_all([(queue, body, items)])

    async def append_all(self, parts: list[tuple[str, bytes, int]]) -> None:
        """Queue each (queue, body, items) of ``parts``, all in one transaction: all are committed or none.

        Returns and raises as ``append`` does.
        """
        size = sum(len(body) for _, body, _ in parts)
        if self._pending_bytes + size > self.max_pending_bytes:
            raise SpoolBusy(f"the spool is busy: {self._pending_bytes} bytes wait for the disk")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        now = time.time()
        for queue, body, items in parts:  # one group: _write_pending commits a group in one transaction
            self._pending.append((queue, body, items, now, future))
        self._pending_bytes += size
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_pending(), name="spool-writer")
        await future

    async def _write_pending(self) -> None:
        while self._pending:
            group, self._pending = self._pending, []
            self._writing = group
            try:
                await self._run(self._write, [(queue, body, items, at) for queue, body, items, at, _ in group])
            except Exception as exc:  # every request in the group gets the error
                refusal = self._refusal(exc)
                for *_, future in group:
                    if not future.done():
                        future.set_exception(refusal)
            else:
                for *_, future in group:
                    if not future.done():
                        future.set_result(None)
                written = {queue for queue, *_ in group}
                for reader, event in list(self._new.items()):
                    if self._queue_of.get(reader) in written:
                        event.set()
            finally:
                self._writing = []
                self._pending_bytes -= sum(len(body) for _, body, *_ in group)

    async def committed(self) -> None:
        """Return once every append made so far is committed or refused (later ones are not waited for)."""
        waiting = {future for *_, future in self._writing + self._pending}
        if waiting:
            await asyncio.wait(waiting)

    def _refusal(self, exc: Exception) -> SpoolError:
        cause = sqlite_cause(exc) if isinstance(exc, sqlite3.Error) else "other"
        if cause == "io" and _filesystem_full(self.path.parent):
            cause = "full"
        self.failed_writes[cause] = self.failed_writes.get(cause, 0) + 1
        if cause == "full":
            return SpoolFull(f"disk full: cannot write {self.path} ({exc}); retry later")
        if isinstance(exc, SpoolError):
            return exc
        return SpoolError(f"cannot write {self.path}: {exc}")

    def _write(self, items: list[tuple[str, bytes, int, float]]) -> None:
        if self._db is None:
            raise SpoolError(f"spool {self.path} is closed")
        if self._prune and time.monotonic() - self._pruned_at >= PRUNE_SECONDS:
            self._prune_passed()
        try:
            self._insert(items)
        except sqlite3.OperationalError as exc:
            if not self._prune or sqlite_cause(exc) not in ("full", "io"):
                raise
            self._prune_passed()  # delivered rows still on disk: delete them, then try once more
            self._insert(items)

    def _insert(self, items: list[tuple[str, bytes, int, float]]) -> None:
        db = self._db
        assert db is not None
        if not self._reserve.ensure():
            raise sqlite3.OperationalError(f"database or disk is full (no room left for the spool's "
                                           f"{self._reserve.size} byte reserve)")
        added: dict[str, int] = {}
        db.execute("BEGIN IMMEDIATE")
        try:
            for queue, body, count, at in items:
                stored, codec, crc = _pack(body)
                db.execute("INSERT INTO batches (queue, received_at, items, size, crc, codec, body) "
                           "VALUES (?, ?, ?, ?, ?, ?, ?)", (queue, at, count, len(stored), crc, codec, stored))
                added[queue] = added.get(queue, 0) + len(stored)
            drops = self._make_room(db, sum(added.values()))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:  # SQLite rolls a failed COMMIT back itself
                db.execute("ROLLBACK")
            raise
        for queue, size in added.items():
            self._queue_bytes[queue] = self._queue_bytes.get(queue, 0) + size
        self._account_drops(drops)
        for reader in self._queue_of:
            if self._oldest_unsent.get(reader) is None:
                self._oldest_unsent[reader] = self._first_unsent_at(reader)

    def _make_room(self, db: sqlite3.Connection, adding: int) -> list[tuple[str, int, int, int, bool]]:
        """Delete the oldest set-aside, then queued, rows until ``adding`` more bytes fit the bound.

        Returns what was deleted, (queue or "" for set-aside rows, id, items, size, live), for
        accounting once the transaction has committed.
        """
        excess = sum(self._queue_bytes.values()) + self._aside_bytes + adding - self.max_bytes
        drops: list[tuple[str, int, int, int, bool]] = []
        if excess <= 0:
            return drops
        for row_id, size in db.execute("SELECT id, size FROM set_aside ORDER BY id").fetchall():
            if excess <= 0:
                return drops
            db.execute("DELETE FROM set_aside WHERE id = ?", (row_id,))
            drops.append(("", row_id, 0, size, True))
            excess -= size
        # A row is counted in _queue_bytes unless every reader of its queue passed it (freed, waiting to be
        # pruned): a queue no reader reads now (the trace queue between trace exporters) counts every row.
        passed = {queue: max(self._passed(queue), self._prune.get(queue, 0)) for queue in self._queue_bytes}
        after = 0
        while excess > 0:
            rows = db.execute("SELECT id, queue, items, size FROM batches WHERE id > ? ORDER BY id LIMIT 256",
                              (after,)).fetchall()
            if not rows:
                break
            for row_id, queue, count, size in rows:
                after = row_id
                if excess <= 0:
                    break
                db.execute("DELETE FROM batches WHERE id = ?", (row_id,))
                live = row_id > passed.get(queue, 0)
                drops.append((queue, row_id, count, size, live))
                if live:
                    excess -= size
        return drops

    def _account_drops(self, drops: list[tuple[str, int, int, int, bool]]) -> None:
        if not drops:
            return
        lost: dict[str, int] = {}
        for queue, row_id, count, size, live in drops:
            if not queue:
                self._aside_bytes -= size
                continue
            if not live:
                continue
            self._queue_bytes[queue] -= size
            self.dropped_through[queue] = max(self.dropped_through.get(queue, 0), row_id)
            readers = [r for r, q in self._queue_of.items() if q == queue and self._acked[r] < row_id]
            for reader in readers or [queue]:  # a queue no reader reads now: counted under its own name
                lost[reader] = lost.get(reader, 0) + count
        for reader, count in lost.items():
            self.dropped[reader] = self.dropped.get(reader, 0) + count
            if reader in self._queue_of:
                self._oldest_unsent[reader] = self._first_unsent_at(reader)
        if lost:
            log.warning("spool full (%d bytes): dropped the oldest batches (%s)", self.max_bytes,
                        ", ".join(f"{count} items of {reader}" for reader, count in sorted(lost.items())))

    # reading -------------------------------------------------------------------------------------

    async def wait_for_new(self, reader: str, timeout: float) -> None:
        """Wait until a batch is committed to ``reader``'s queue after its last ``read`` began, or ``timeout``."""
        event = self._new.get(reader)
        if event is not None:
            await wait_event(event, timeout)

    async def read(self, reader: str, max_items: int, max_bytes: int) -> list[Batch]:
        """The next batches after ``reader``'s cursor, up to the limits (at least one if any)."""
        self._new[reader].clear()  # before reading, so a commit during the read is not missed
        return await self._run(self._read, reader, max_items, max_bytes)

    def _read(self, reader: str, max_items: int, max_bytes: int) -> list[Batch]:
        db = self._db
        if db is None:
            raise SpoolError(f"spool {self.path} is closed")
        queue = self._queue_of[reader]
        batches: list[Batch] = []
        items = size = 0
        after = self._acked[reader]
        while True:
            rows = db.execute(
                "SELECT id, received_at, items, crc, codec, CAST(body AS BLOB) FROM batches "
                "WHERE queue = ? AND id > ? ORDER BY id LIMIT 64", (queue, after)).fetchall()
            if not rows:
                if not batches and self._prune:  # caught up: a good moment to delete what was delivered
                    self._prune_passed()
                return batches
            for row_id, received_at, row_items, crc, codec, stored in rows:
                after = row_id
                body = self._unpack(stored, codec, crc)
                if body is None:
                    self._set_aside_corrupt(queue, row_id, stored, row_items)
                    continue
                if batches and (items + row_items > max_items or size + len(body) > max_bytes):
                    return batches
                batches.append(Batch(row_id, received_at, row_items, body))
                items += row_items
                size += len(body)

    def _unpack(self, stored: bytes, codec: int, crc: int) -> bytes | None:
        """The body a row holds, or None when its bytes fail their checksum or cannot be decoded."""
        if codec == RAW:
            return stored if zlib.crc32(stored) == crc else None
        if codec != LZ4 or zlib.crc32(stored, LZ4_CRC_START) != crc:
            return None
        size = int.from_bytes(stored[:4], "little")
        try:
            if size > SCRATCH_MAX:
                return bytes(cramjam.lz4.decompress_block(stored))
            if len(self._scratch) < size:
                self._scratch = bytearray(size)
            with memoryview(self._scratch) as scratch:
                return bytes(scratch[:cramjam.lz4.decompress_block_into(stored, scratch)])
        except cramjam.DecompressionError:
            return None

    def _set_aside_corrupt(self, queue: str, row_id: int, body: bytes, items: int) -> None:
        """Move a row whose checksum fails (or that does not decompress) out of every reader's way, counting it once.

        The set-aside copy is the row's stored bytes, compressed or not as they were found.
        """
        if row_id in self._corrupt_seen:
            return
        self._corrupt_seen.add(row_id)
        readers = [r for r, q in self._queue_of.items() if q == queue and self._acked[r] < row_id]
        for reader in readers:
            key = (reader, "corrupt")
            self.set_aside_counts[key] = self.set_aside_counts.get(key, 0) + items
        log.error("spool %s: batch %d (%d items) failed its checksum or did not decompress; set aside for %s",
                  self.path, row_id, items, ", ".join(readers))
        db = self._db
        assert db is not None
        try:
            db.execute("BEGIN IMMEDIATE")
            size = db.execute("SELECT size FROM batches WHERE id = ?", (row_id,)).fetchone()[0]
            db.execute("INSERT INTO set_aside (batch_id, reader, reason, detail, at, items, size, body) "
                       "VALUES (?, ?, 'corrupt', 'failed its checksum or did not decompress', ?, ?, ?, ?)",
                       (row_id, ",".join(readers), time.time(), items, len(body), body))
            db.execute("DELETE FROM batches WHERE id = ?", (row_id,))
            db.execute("COMMIT")
        except sqlite3.Error as exc:  # the disk is full, say: the row stays, skipped by id from now on
            if db.in_transaction:
                db.execute("ROLLBACK")
            log.warning("spool %s: could not move corrupt batch %d to set_aside: %s", self.path, row_id, exc)
            return
        self._queue_bytes[queue] -= size
        self._aside_bytes += len(body)

    def possibly_resent(self, reader: str, batches: list[Batch]) -> int:
        """Items in ``batches`` that may have reached the backend before: the last run died (or stopped) mid-send,
        or this run's reader was stopped with batches whose delivery is unconfirmed (``mark_unsure``).

        Only the first read after it counts: an exporter has one request in flight at a time and acknowledges
        it before reading on. The count is an upper bound of the duplicates a crash can cause, without a
        write per send.
        """
        unsure = self._unsure.pop(reader, 0)
        if unsure:
            self.interrupted.discard(reader)  # counted now: the next run need not count them again
        return sum(b.items for b in batches if b.id <= unsure)

    def mark_unsure(self, reader: str, through: int) -> None:
        """Batches of ``reader`` up to ``through`` may have reached its backend unconfirmed (a send cut short by a
        stop, or one whose outcome is unknown): whoever reads them next in this run counts them in
        ``possibly_resent``; if none does, ``reader`` is marked as running at close, so the next run does."""
        if through:
            self._unsure[reader] = max(self._unsure.get(reader, 0), through)
        self.interrupted.add(reader)

    async def ack(self, reader: str, last_id: int) -> None:
        """``reader`` is done with every batch up to ``last_id``: move its cursor, free what all readers passed.

        Needs no new disk space: the cursor is overwritten in place, and the rows are deleted when
        SQLite can (later, if the disk is full now).
        """
        await self._run(self._ack, reader, last_id)

    def _ack(self, reader: str, last_id: int) -> None:
        queue = self._queue_of[reader]
        before = self._passed(queue)
        previous = self._acked[reader]
        self._acked[reader] = max(previous, last_id)
        try:
            self._store_cursors(running=self._queue_of)
        except OSError as exc:
            self._acked[reader] = previous
            raise SpoolError(f"spool {self._cursors.path}: cannot move {reader}'s cursor: {exc.strerror}") from None
        self._free(queue, before)
        self._oldest_unsent[reader] = self._first_unsent_at(reader)

    def _free(self, queue: str, before: int) -> None:
        """Account for and delete the rows of ``queue`` every reader has now passed (after ``before``)."""
        assert self._db is not None
        passed = self._passed(queue)
        if passed <= before:
            return
        freed = self._db.execute("SELECT COALESCE(SUM(size), 0) FROM batches WHERE queue = ? AND id > ? AND id <= ?",
                                 (queue, before, passed)).fetchone()[0]
        self._queue_bytes[queue] = self._queue_bytes.get(queue, 0) - freed
        self._prune[queue] = max(self._prune.get(queue, 0), passed)
        self._prunable += freed
        if self._prunable >= PRUNE_BYTES or time.monotonic() - self._pruned_at >= PRUNE_SECONDS:
            self._prune_passed()

    def _prune_passed(self) -> None:
        """Delete rows every reader has passed; on a full disk, with the reserve's room, or at the next try."""
        self._pruned_at = time.monotonic()
        if not self._prune:
            return
        try:
            self._delete_pruned(PRUNE_ROWS)
        except sqlite3.OperationalError as exc:
            if sqlite_cause(exc) in ("full", "io") and self._reserve.present:
                self._reclaim()
            return
        self._shrink()

    def _delete_pruned(self, rows: int, checkpoint: bool = False) -> None:
        """Delete the rows waiting in ``_prune``, ``rows`` per transaction so the WAL stays small."""
        db = self._db
        assert db is not None
        for queue, through in list(self._prune.items()):
            while db.execute("DELETE FROM batches WHERE id IN (SELECT id FROM batches WHERE queue = ? AND id <= ? "
                             "ORDER BY id LIMIT ?)", (queue, through, rows)).rowcount:
                if checkpoint:
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)")
            del self._prune[queue]
        self._prunable = 0

    def _reclaim(self) -> None:
        """On a full disk: spend the reserve's room to fold the WAL into the database, delete what every reader
        passed a few rows at a time (checkpointing between, so the WAL reuses its room) and shrink the file."""
        log.warning("spool %s: the disk is full; giving back the %d byte reserve to delete delivered batches",
                    self.path, self._reserve.size)
        self._reserve.release()
        try:
            assert self._db is not None
            self._db.execute("PRAGMA wal_checkpoint(RESTART)")
            self._delete_pruned(8, checkpoint=True)
        except sqlite3.OperationalError as exc:
            log.warning("spool %s: could not delete delivered batches yet: %s", self.path, exc)
            return
        self._shrink(force=True)

    def _shrink(self, force: bool = False) -> None:
        """Give free pages back to the filesystem once they are many (a drained backlog), or on a full disk.

        Below that, new batches reuse the free pages: shrinking and growing again would only cost I/O.
        """
        db = self._db
        assert db is not None
        free, pages, page_size = (db.execute(f"PRAGMA {name}").fetchone()[0]
                                  for name in ("freelist_count", "page_count", "page_size"))
        if not force and free * page_size < SHRINK_BYTES:
            return
        try:
            db.executescript("PRAGMA incremental_vacuum;")  # execute() would free one page per call
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.OperationalError as exc:  # a full disk: the next prune tries again
            log.debug("spool %s: could not shrink: %s", self.path, exc)
        self._reserve.ensure()

    def _first_unsent_at(self, reader: str) -> float | None:
        assert self._db is not None
        row = self._db.execute("SELECT received_at FROM batches WHERE queue = ? AND id > ? ORDER BY id LIMIT 1",
                               (self._queue_of[reader], self._acked[reader])).fetchone()
        return row[0] if row else None

    async def set_aside(self, reader: str, batch_id: int, body: bytes, items: int, reason: str, detail: str) -> None:
        """Keep ``body`` (all or part of a batch) out of ``reader``'s way for good: the data itself is at fault.

        ``reason`` is one of SET_ASIDE_REASONS (a metric label); ``detail`` is the backend's words.
        The cursor moves past the batch with the next ``ack``.
        """
        await self._run(self._set_aside, reader, batch_id, body, items, reason, detail)

    def _set_aside(self, reader: str, batch_id: int, body: bytes, items: int, reason: str, detail: str) -> None:
        db = self._db
        assert db is not None
        key = (reader, reason)
        self.set_aside_counts[key] = self.set_aside_counts.get(key, 0) + items
        log.error("exporter %s: set aside %d items of batch %d (%s: %s); kept in the spool's set_aside table",
                  reader, items, batch_id, reason, detail)
        try:
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT INTO set_aside (batch_id, reader, reason, detail, at, items, size, body) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (batch_id, reader, reason, detail, time.time(), items,
                                                           len(body), body))
            old = db.execute("SELECT COALESCE(SUM(size), 0) FROM set_aside WHERE id <= "
                             "(SELECT MAX(id) FROM set_aside) - ?", (SET_ASIDE_KEEP,)).fetchone()[0]
            db.execute("DELETE FROM set_aside WHERE id <= (SELECT MAX(id) FROM set_aside) - ?", (SET_ASIDE_KEEP,))
            db.execute("COMMIT")
        except sqlite3.Error as exc:  # counted and logged; only the copy kept for inspection is missing
            if db.in_transaction:
                db.execute("ROLLBACK")
            log.warning("spool %s: could not keep the set-aside copy: %s", self.path, exc)
            return
        self._aside_bytes += len(body) - old

    # observability -------------------------------------------------------------------------------

    @property
    def size_bytes(self) -> int:
        """Bytes counted against ``max_bytes``: batches some reader still needs, plus set-aside ones."""
        return sum(self._queue_bytes.values()) + self._aside_bytes

    def file_bytes(self) -> int:
        total = 0
        for suffix in ("", "-wal"):
            with contextlib.suppress(OSError):  # no WAL yet
                total += os.stat(f"{self.path}{suffix}").st_blocks * 512
        return total

    def readers(self) -> list[str]:
        return list(self._queue_of)

    def oldest_unsent_age(self, reader: str) -> float:
        oldest = self._oldest_unsent.get(reader)
        return max(0.0, time.time() - oldest) if oldest is not None else 0.0

    def families(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("sidetrace_spool_size_bytes", "Bytes counted against [spool] max_bytes: batches an "
                                "exporter still needs, plus set-aside ones.", value=self.size_bytes, unit="bytes")
        yield GaugeMetricFamily("sidetrace_spool_file_bytes", "Disk space the spool's database and WAL files take "
                                "(freed rows are reused before the file grows).", value=self.file_bytes(),
                                unit="bytes")
        yield GaugeMetricFamily("sidetrace_spool_capacity_bytes", "The spool's bound ([spool] max_bytes).",
                                value=self.max_bytes, unit="bytes")
        yield GaugeMetricFamily("sidetrace_spool_pending_bytes", "Bytes accepted and waiting to be committed.",
                                value=self._pending_bytes, unit="bytes")
        oldest = GaugeMetricFamily("sidetrace_spool_oldest_unsent_age_seconds",
                                   "Age of the oldest batch an exporter has not delivered yet.",
                                   labels=["exporter"], unit="seconds")
        dropped = dropped_spans_family()
        aside = CounterMetricFamily("sidetrace_spool_set_aside_spans_total",
                                    "Items set aside for an exporter and never retried, by reason (corrupt: failed "
                                    "its checksum; rejected: the backend called it invalid; too_large: one item "
                                    "larger than the backend takes; undecodable: not a valid request).",
                                    labels=["exporter", "reason"])
        for reader in list(self._queue_of):
            oldest.add_metric([reader], self.oldest_unsent_age(reader))
        for reader in sorted({*self._queue_of, *self.dropped}):
            dropped.add_metric([reader, "spool_full"], self.dropped.get(reader, 0))
            for reason in SET_ASIDE_REASONS:
                aside.add_metric([reader, reason], self.set_aside_counts.get((reader, reason), 0))
        for exporter, items in sorted(self.discarded.items()):
            dropped.add_metric([exporter, "exporter_removed"], items)
        yield oldest
        yield dropped
        yield aside
        failed = CounterMetricFamily("sidetrace_spool_failed_writes_total", "Appends refused because the write failed, "
                                     "by cause (full, io, readonly, ...); the sender was told to retry.",
                                     labels=["cause"])
        for cause in sorted({*WRITE_FAILURE_CAUSES, *self.failed_writes}):
            failed.add_metric([cause], self.failed_writes.get(cause, 0))
        yield failed
        yield CounterMetricFamily("sidetrace_spool_replaced_files_total",
                                  "Corrupt spool files moved aside and replaced.", value=self.replaced_files)


def dropped_spans_family() -> CounterMetricFamily:
    """``sidetrace_spool_dropped_spans_total``, empty: the spool adds its drops, the pipeline what it never spooled."""
    return CounterMetricFamily("sidetrace_spool_dropped_spans_total", "Items dropped by the spool before an exporter "
                               "delivered them, or accepted while no exporter took spans (reason no_exporter), by "
                               "exporter and reason.", labels=["exporter", "reason"])


def _pack(body: bytes) -> tuple[bytes | cramjam.Buffer, int, int]:
    """How ``body`` is stored: (the stored bytes, their codec, their CRC32)."""
    if len(body) >= COMPRESS_MIN:
        packed = cramjam.lz4.compress_block(body)  # SQLite binds its buffer as it is: no copy to bytes
        if len(packed) < len(body):
            return packed, LZ4, zlib.crc32(packed, LZ4_CRC_START)
    return body, RAW, zlib.crc32(body)


def _create_schema(db: sqlite3.Connection) -> None:
    # One statement at a time: executescript() would commit a transaction the caller has open.
    for statement in SCHEMA.split(";"):
        if statement.strip():
            db.execute(statement)


def _filesystem_full(directory: Path) -> bool:
    try:
        stats = os.statvfs(directory)
    except OSError:
        return False
    return stats.f_bavail * stats.f_frsize < 64 * 1024
