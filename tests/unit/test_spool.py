from __future__ import annotations

import asyncio
import os
import random
import sqlite3
import zlib
from pathlib import Path

import pytest

from sidetrace.exporters.spool import LZ4_CRC_START, TRACES, CursorFile, Spool, SpoolBusy, SpoolError, SpoolFull
from tests.filesystems import fill, needs_root, remount_read_only, tmpfs


async def opened(path: Path, readers: tuple[str, ...] = ("a",), **kwargs: object) -> Spool:
    spool = Spool(path, **{"max_bytes": 1 << 20, **kwargs})
    for reader in readers:
        spool.add_reader_at_open(reader)
    await spool.open()
    return spool


async def test_batches_come_back_in_order_and_are_freed_once_every_exporter_passed(tmp_path: Path) -> None:
    spool = await opened(tmp_path / "spool.db", ("a", "b"))
    for i in range(5):
        await spool.append(f"body{i}".encode(), items=i + 1)
    assert spool.size_bytes == 25
    a = await spool.read("a", max_items=6, max_bytes=1000)
    assert [b.body for b in a] == [b"body0", b"body1", b"body2"]  # 1+2+3 items fit in 6
    await spool.ack("a", a[-1].id)
    assert spool.size_bytes == 25  # b has not read anything yet
    b = await spool.read("b", max_items=100, max_bytes=1000)
    assert [x.body for x in b] == [f"body{i}".encode() for i in range(5)]
    await spool.ack("b", b[-1].id)
    assert spool.size_bytes == 10  # batches 3 and 4 wait for a
    assert [x.body for x in await spool.read("a", 100, 1000)] == [b"body3", b"body4"]
    await spool.close()
    with sqlite3.connect(tmp_path / "spool.db") as db:
        assert db.execute("SELECT COUNT(*) FROM batches").fetchone()[0] == 2  # the passed rows are deleted


async def test_first_batch_is_returned_even_when_larger_than_the_limits(tmp_path: Path) -> None:
    spool = await opened(tmp_path / "spool.db")
    await spool.append(b"x" * 100, items=50)
    assert len(await spool.read("a", max_items=10, max_bytes=10)) == 1
    await spool.close()


async def test_full_spool_drops_oldest_and_counts_their_items(tmp_path: Path) -> None:
    spool = await opened(tmp_path / "spool.db", max_bytes=300)
    for i in range(5):
        await spool.append(bytes([i]) * 100, items=10)
    assert spool.size_bytes == 300
    assert spool.dropped == {"a": 20}
    batches = await spool.read("a", 1000, 10_000)
    assert [b.body[0] for b in batches] == [2, 3, 4]
    await spool.close()


async def test_set_aside_bodies_count_against_the_bound_and_go_first(tmp_path: Path) -> None:
    spool = await opened(tmp_path / "spool.db", max_bytes=300)
    await spool.append(b"a" * 100, items=1)
    (first,) = await spool.read("a", 10, 1000)
    await spool.set_aside("a", first.id, first.body, 1, "rejected", "HTTP 400: bad")
    await spool.ack("a", first.id)
    assert spool.size_bytes == 100  # the set-aside copy
    await spool.append(b"b" * 100, items=1)
    await spool.append(b"c" * 100, items=1)
    assert spool.size_bytes == 300 and spool.dropped == {}
    await spool.append(b"d" * 100, items=1)  # over the bound: the set-aside copy goes, no queued batch
    assert spool.size_bytes == 300 and spool.dropped == {}
    assert [b.body[:1] for b in await spool.read("a", 10, 1000)] == [b"b", b"c", b"d"]
    await spool.close()
    with sqlite3.connect(tmp_path / "spool.db") as db:
        assert db.execute("SELECT COUNT(*) FROM set_aside").fetchone()[0] == 0


async def test_corrupt_row_is_set_aside_once_and_the_cursor_moves_past_it(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    spool = await opened(path)
    for i in range(3):
        await spool.append(f"body{i}".encode(), items=7)
    with sqlite3.connect(path) as db:
        db.execute("UPDATE batches SET body = ? WHERE id = 3", (b"b0dy2",))  # the last row
    for _ in range(5):
        batches = await spool.read("a", 1000, 10_000)
        assert [b.body for b in batches] == [b"body0", b"body1"]
    assert spool.set_aside_counts == {("a", "corrupt"): 7}
    await spool.ack("a", batches[-1].id)
    assert await spool.read("a", 1000, 10_000) == []
    assert spool.size_bytes == len(b"b0dy2")  # the set-aside copy
    await spool.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT batch_id, reason, body FROM set_aside").fetchall() == [(3, "corrupt", b"b0dy2")]
        assert db.execute("SELECT COUNT(*) FROM batches").fetchone()[0] == 0


async def test_row_rewritten_as_invalid_text_is_set_aside(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    spool = await opened(path)
    for i in range(2):
        await spool.append(f"body{i}".encode(), items=4)
    with sqlite3.connect(path) as db:  # bytes that are not UTF-8, stored with TEXT affinity
        db.execute("UPDATE batches SET body = substr(body, 1, 2) || x'00ff' WHERE id = 1")
    assert [b.body for b in await spool.read("a", 100, 1000)] == [b"body1"]
    assert spool.set_aside_counts == {("a", "corrupt"): 4}
    await spool.close()


async def test_unacked_batches_and_cursors_survive_reopen(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    spool = await opened(path)
    for i in range(4):
        await spool.append(f"body{i}".encode(), items=3)
    first = await spool.read("a", 3, 1000)
    await spool.ack("a", first[-1].id)
    await spool.close()  # a clean stop: nothing can have been in flight

    again = await opened(path)
    batches = await again.read("a", 1000, 1000)
    assert [b.body for b in batches] == [b"body1", b"body2", b"body3"]
    assert again.possibly_resent("a", batches) == 0
    assert again.size_bytes == 15
    await again.close()


async def test_after_a_crash_only_the_first_read_counts_as_possibly_resent(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    spool = await opened(path)
    for i in range(3):
        await spool.append(f"body{i}".encode(), items=5)
    spool._thread.shutdown(wait=True)  # as if killed: the spool is never closed

    again = await opened(path)
    await again.append(b"after", items=7)
    first = await again.read("a", 10, 1000)
    assert [b.body for b in first] == [b"body0", b"body1"]
    assert again.possibly_resent("a", first) == 10
    await again.ack("a", first[-1].id)
    rest = await again.read("a", 100, 1000)
    assert [b.body for b in rest] == [b"body2", b"after"]
    assert again.possibly_resent("a", rest) == 0
    await again.close()


async def test_a_new_reader_inherits_what_the_queue_holds_and_a_removed_one_frees_its_share(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    spool = await opened(path, ("old",))
    for i in range(3):
        await spool.append(f"body{i}".encode(), items=1)
    await spool.close()
    renamed = await opened(path, ("renamed",))  # an exporter renamed between two runs: nothing is lost
    assert [b.body for b in await renamed.read("renamed", 10, 1000)] == [b"body0", b"body1", b"body2"]
    await renamed.add_reader("second")
    assert len(await renamed.read("second", 10, 1000)) == 3
    batches = await renamed.read("renamed", 10, 1000)
    await renamed.ack("renamed", batches[-1].id)
    assert renamed.size_bytes == 15  # "second" still needs them
    await renamed.remove_reader("second")
    assert renamed.size_bytes == 0
    await renamed.close()


async def test_unreadable_database_file_is_moved_aside_and_replaced(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "spool.db"
    path.write_bytes(b"this is not a sqlite database" * 100)
    spool = await opened(path)
    assert spool.replaced_files == 1
    (aside,) = tmp_path.glob("spool.db.corrupt-*")
    assert f"spool {path} is corrupt" in caplog.text and f"moved it to {aside}" in caplog.text
    await spool.append(b"fresh", items=1)
    assert [b.body for b in await spool.read("a", 10, 100)] == [b"fresh"]
    await spool.close()


async def test_a_locked_spool_fails_to_open_and_nothing_is_moved(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    spool = await opened(path)
    await spool.append(b"keep me", items=1)
    await spool.close()
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(SpoolError) as failure:
            await opened(path)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert str(failure.value).startswith(f"spool {path}: cannot be used (database is locked): another process holds it")
    assert not list(tmp_path.glob("*.corrupt-*")) and (tmp_path / "spool.db").exists()
    again = await opened(path)
    assert [b.body for b in await again.read("a", 10, 100)] == [b"keep me"]
    await again.close()


@needs_root
async def test_a_spool_on_a_full_filesystem_fails_to_open_and_nothing_is_moved(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", 1024) as mount:
        spool = await opened(mount / "spool.db")
        await spool.append(b"keep me", items=1)
        await spool.close()
        (mount / "spool.db-wal").unlink(missing_ok=True)
        (mount / "spool.db-shm").unlink(missing_ok=True)
        fill(mount)
        with pytest.raises(SpoolError) as failure:
            await opened(mount / "spool.db")
        assert f"the filesystem holding {mount} is full" in str(failure.value)
        assert not list(mount.glob("*.corrupt-*"))
        (mount / "filler").unlink()
        again = await opened(mount / "spool.db")
        assert [b.body for b in await again.read("a", 10, 100)] == [b"keep me"]
        await again.close()


@needs_root
async def test_a_spool_in_a_read_only_directory_fails_to_open_and_nothing_is_moved(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "ro", 1024) as mount:
        spool = await opened(mount / "spool.db")
        await spool.append(b"keep me", items=1)
        await spool.close()
        remount_read_only(mount)
        with pytest.raises(SpoolError) as failure:
            await opened(mount / "spool.db")
        assert str(failure.value).startswith(f"spool {mount / 'spool.db'}: cannot be used (")
        assert "read-only" in str(failure.value) or "may write there" in str(failure.value)
        assert sorted(p.name for p in mount.iterdir()) == ["spool.db", "spool.db-cursors", "spool.db-reserve"]


@needs_root
async def test_a_full_disk_refuses_with_the_cause_and_delivery_still_drains(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", 2048) as mount:
        spool = await opened(mount / "spool.db", max_bytes=1 << 30)
        body = random.Random(7).randbytes(20_000)  # incompressible: LZ4 would store b"x" * 20_000 in 90 bytes
        accepted = 0
        with pytest.raises(SpoolFull) as failure:
            for _ in range(1000):
                await spool.append(body, items=10)
                accepted += 1
        assert str(failure.value).startswith("disk full: cannot write")
        assert spool.size_bytes == accepted * len(body)  # what committed, and only that
        assert spool.failed_writes == {"full": 1}
        fill(mount)  # not one free block
        delivered = 0
        while batches := await spool.read("a", 30, 1 << 20):
            await spool.ack("a", batches[-1].id)  # needs no new space
            delivered += sum(b.items for b in batches)
        assert delivered == accepted * 10 and spool.size_bytes == 0 and spool.dropped == {}
        (mount / "filler").unlink()
        await spool.append(b"after", items=1)
        assert [b.body for b in await spool.read("a", 10, 100)] == [b"after"]
        await spool.close()


async def test_a_spool_from_sidetrace_0_1_is_upgraded_with_its_cursors(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    with sqlite3.connect(path) as db:
        db.executescript("""
            CREATE TABLE batches (id INTEGER PRIMARY KEY AUTOINCREMENT, received_at REAL NOT NULL,
                spans INTEGER NOT NULL, size INTEGER NOT NULL, crc INTEGER NOT NULL, body BLOB NOT NULL);
            CREATE TABLE cursors (consumer TEXT PRIMARY KEY, acked INTEGER NOT NULL, running INTEGER NOT NULL);
            CREATE TABLE set_aside (id INTEGER PRIMARY KEY, batch_id INTEGER, consumer TEXT, reason TEXT, at REAL,
                body BLOB);
            INSERT INTO batches VALUES (1, 1.0, 3, 5, 3513755018, 'body0'), (2, 2.0, 4, 5, 2791871772, 'body1');
            INSERT INTO cursors VALUES ('a', 1, 0);
            INSERT INTO set_aside VALUES (1, 7, 'a', 'rejected: HTTP 400: bad', 3.0, 'old');
        """)
    spool = await opened(path)
    assert [(b.id, b.items, b.body) for b in await spool.read("a", 10, 100)] == [(2, 4, b"body1")]
    assert spool.size_bytes == 5 + 3  # body1 and the set-aside copy
    await spool.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT reader, reason, detail FROM set_aside").fetchall() == [
            ("a", "rejected", "rejected: HTTP 400: bad")]


def otlp_like(spans: int, seed: int = 1) -> bytes:
    """Bytes shaped like an OTLP request: random ids among repeated names and attributes (compressible)."""
    rng = random.Random(seed)
    span = b"\x2a\x10GET /api/v1/items\x3a\x12http.route=/items/{id}"
    return b"".join(rng.randbytes(24) + span for _ in range(spans))


async def test_large_bodies_are_stored_compressed_and_read_back_whole(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    spool = await opened(path)
    body, small = otlp_like(400), b"s" * 4095
    await spool.append(body, items=400)
    await spool.append(small, items=1)
    assert [b.body for b in await spool.read("a", 1000, 1 << 20)] == [body, small]
    with sqlite3.connect(path) as db:
        (codec, size, crc, stored), small_row = db.execute("SELECT codec, size, crc, body FROM batches ORDER BY id")
    assert spool.size_bytes == len(stored) + len(small)  # the bound is on what the disk holds
    await spool.close()
    assert (codec, size) == (1, len(stored)) and len(stored) < len(body) // 2
    assert zlib.crc32(stored) != crc  # what an agent that knows no codec checks: it sets the row aside, never sends it
    assert small_row == (0, len(small), zlib.crc32(small), small)  # fits its page: stored as received


async def test_a_compressed_row_that_fails_its_checksum_or_does_not_decompress_is_set_aside(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    spool = await opened(path)
    body = otlp_like(400)
    for _ in range(3):
        await spool.append(body, items=5)
    with sqlite3.connect(path) as db:
        stored = bytearray(db.execute("SELECT body FROM batches WHERE id = 1").fetchone()[0])
        stored[100] ^= 0x01
        db.execute("UPDATE batches SET body = ? WHERE id = 1", (bytes(stored),))
        garbage = len(body).to_bytes(4, "little") + b"\xff" * 60  # a right checksum over bytes LZ4 cannot decode
        db.execute("UPDATE batches SET body = ?, crc = ? WHERE id = 2", (garbage, zlib.crc32(garbage, LZ4_CRC_START)))
    for _ in range(2):
        assert [(b.id, b.body) for b in await spool.read("a", 100, 1 << 20)] == [(3, body)]
    assert spool.set_aside_counts == {("a", "corrupt"): 10}
    await spool.close()


SCHEMA_2 = """
    PRAGMA page_size = 16384;
    PRAGMA auto_vacuum = INCREMENTAL;
    PRAGMA journal_mode = WAL;
    CREATE TABLE batches (
        id INTEGER PRIMARY KEY AUTOINCREMENT, queue TEXT NOT NULL DEFAULT 'traces', received_at REAL NOT NULL,
        items INTEGER NOT NULL, size INTEGER NOT NULL, crc INTEGER NOT NULL, body BLOB NOT NULL);
    CREATE INDEX batches_by_queue ON batches (queue, id);
    CREATE TABLE set_aside (
        id INTEGER PRIMARY KEY, batch_id INTEGER, reader TEXT, reason TEXT, detail TEXT, at REAL, items INTEGER,
        size INTEGER, body BLOB);
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    INSERT INTO meta VALUES ('generation', 'g2'), ('schema', '2');
"""


async def test_a_spool_written_before_compression_is_read_and_new_batches_are_compressed(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    body = otlp_like(400)
    with sqlite3.connect(path) as db:  # the schema, pragmas and cursor file the previous version wrote
        db.executescript(SCHEMA_2)
        db.executemany("INSERT INTO batches (received_at, items, size, crc, body) VALUES (?, ?, ?, ?, ?)", [
            (1.0, 3, len(body), zlib.crc32(body), body), (2.0, 4, 5, zlib.crc32(b"body1"), b"body1")])
    cursors = CursorFile(Path(f"{path}-cursors"), fsync=False)
    cursors.open()
    cursors.store({"generation": "g2", "acked": {"a": 0, "b": 1}, "queues": {"a": "traces", "b": "traces"},
                   "running": []})
    cursors.close()
    spool = await opened(path, ("a", "b"))
    assert [(b.id, b.items, b.body) for b in await spool.read("a", 10, 1 << 20)] == [(1, 3, body), (2, 4, b"body1")]
    await spool.append(body, items=3)
    assert [(b.id, b.body) for b in await spool.read("b", 10, 1 << 20)] == [(2, b"body1"), (3, body)]
    await spool.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT id, codec FROM batches ORDER BY id").fetchall() == [(1, 0), (2, 0), (3, 1)]
        assert db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone() == ("3",)
        stored = db.execute("SELECT length(body) FROM batches WHERE id = 3").fetchone()[0]
    assert spool.size_bytes == len(body) + 5 + stored and stored < len(body) // 2


async def test_append_refuses_when_too_much_is_pending(tmp_path: Path) -> None:
    spool = await opened(tmp_path / "spool.db", max_pending_bytes=150)
    first = asyncio.ensure_future(spool.append(b"x" * 100, items=1))
    await asyncio.sleep(0)  # first is now pending
    with pytest.raises(SpoolBusy):
        await spool.append(b"y" * 100, items=1)
    await first
    await spool.append(b"z" * 100, items=1)  # room again once written
    assert [b.body[:1] for b in await spool.read("a", 10, 1000)] == [b"x", b"z"]
    await spool.close()


async def test_group_commit_writes_concurrent_appends_together(tmp_path: Path) -> None:
    spool = await opened(tmp_path / "spool.db")
    await asyncio.gather(*(spool.append(f"{i:03d}".encode(), items=1) for i in range(200)))
    batches = await spool.read("a", 1000, 100_000)
    assert [b.body for b in batches] == [f"{i:03d}".encode() for i in range(200)]
    await spool.close()


async def test_wait_for_new_wakes_on_commit(tmp_path: Path) -> None:
    spool = await opened(tmp_path / "spool.db")
    assert await spool.read("a", 10, 100) == []
    waiter = asyncio.ensure_future(spool.wait_for_new("a", timeout=10))
    await spool.append(b"new", items=1)
    await asyncio.wait_for(waiter, 2)
    await spool.close()


def test_cursor_file_keeps_the_previous_state_when_a_write_is_torn(tmp_path: Path) -> None:
    cursors = CursorFile(tmp_path / "c", fsync=False)
    assert cursors.open() is None
    cursors.store({"acked": {"a": 1}})
    cursors.store({"acked": {"a": 2}})
    cursors.close()
    with open(tmp_path / "c", "r+b") as handle:  # the newest slot (seq 2 is in slot 0) half written
        handle.seek(30)
        handle.write(b"\xff" * 4)
    again = CursorFile(tmp_path / "c", fsync=False)
    assert again.open() == {"acked": {"a": 1}}
    again.close()


@needs_root
async def test_append_all_commits_every_part_or_none(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", 2048) as mount:
        spool = Spool(mount / "spool.db", max_bytes=1 << 30)
        spool.add_reader_at_open("a")
        spool.add_reader_at_open("lb/x", "lb/x")
        await spool.open()
        with pytest.raises(SpoolFull):  # the second part does not fit: the first is not kept either
            await spool.append_all([(TRACES, b"small", 1), ("lb/x", os.urandom(4_000_000), 10)])  # incompressible
        assert await spool.read("a", 10, 1 << 30) == [] and await spool.read("lb/x", 10, 1 << 30) == []
        assert spool.size_bytes == 0
        await spool.append_all([(TRACES, b"one", 1), ("lb/x", b"two", 2)])
        assert [(b.body, b.items) for b in await spool.read("a", 10, 100)] == [(b"one", 1)]
        assert [(b.body, b.items) for b in await spool.read("lb/x", 10, 100)] == [(b"two", 2)]
        await spool.close()


async def test_a_resume_only_reader_comes_back_with_its_cursor_but_is_never_created(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    spool = await opened(path, ("lb", "jaeger"))
    await spool.add_reader("lb/x", "lb/x")
    for i in range(3):
        await spool.append(f"body{i}".encode(), items=1)
    await spool.append(b"share", items=1, queue="lb/x")
    await spool.ack("lb", (await spool.read("lb", 1, 100))[0].id)
    await spool.close()
    spool = Spool(path, max_bytes=1 << 20)
    spool.add_reader_at_open("lb", TRACES, resume_only=True, sub_readers=True)
    spool.add_reader_at_open("jaeger")
    await spool.open()
    assert [b.body for b in await spool.read("lb", 10, 1000)] == [b"body1", b"body2"]  # where it was
    await spool.remove_reader("lb", keep_sub_readers=True)
    assert sorted(spool.readers()) == ["jaeger", "lb/x"]
    await spool.close()
    spool = Spool(path, max_bytes=1 << 20)
    spool.add_reader_at_open("lb", TRACES, resume_only=True, sub_readers=True)
    spool.add_reader_at_open("jaeger")
    await spool.open()
    assert sorted(spool.readers()) == ["jaeger", "lb/x"]  # not created again; its sub-reader came back with it
    assert [b.body for b in await spool.read("lb/x", 10, 1000)] == [b"share"]
    await spool.close()


async def test_removing_an_exporter_counts_what_its_own_queues_held_undelivered(tmp_path: Path) -> None:
    spool = await opened(tmp_path / "spool.db", ())
    await spool.add_reader("lb/x", "lb/x")
    await spool.add_reader("lb/y", "lb/y")
    for _ in range(3):
        await spool.append(b"x" * 10, items=10, queue="lb/x")
    await spool.append(b"y" * 10, items=5, queue="lb/y")
    await spool.ack("lb/x", (await spool.read("lb/x", 10, 10))[0].id)  # one delivered
    await spool.remove_reader("lb")
    assert spool.readers() == [] and spool.size_bytes == 0
    assert spool.discarded == {"lb": 25}
    dropped = next(f for f in spool.families() if f.name == "sidetrace_spool_dropped_spans")
    assert [(s.labels, s.value) for s in dropped.samples] == [({"exporter": "lb", "reason": "exporter_removed"}, 25)]
    await spool.close()


async def test_removing_a_trace_queue_reader_discards_and_counts_what_it_alone_had_not_delivered(
        tmp_path: Path) -> None:
    spool = await opened(tmp_path / "spool.db", ("a", "b"))
    for i in range(4):
        await spool.append(bytes([i]) * 10, items=10)
    batches = await spool.read("b", 20, 1000)  # b delivered two batches, a none
    await spool.ack("b", batches[-1].id)
    await spool.remove_reader("a")  # the two only a still needed go; the two b needs stay, uncounted
    assert spool.discarded == {"a": 20} and spool.size_bytes == 20
    await spool.add_reader("c")  # added before "b" is removed, as a reload renaming b to c does: c takes over
    await spool.remove_reader("b")
    assert spool.discarded == {"a": 20} and spool.size_bytes == 20
    assert [b.body for b in await spool.read("c", 100, 1000)] == [bytes([2]) * 10, bytes([3]) * 10]
    await spool.remove_reader("c")  # the last reader: the trace queue's rows go at once
    assert spool.discarded == {"a": 20, "c": 20} and spool.size_bytes == 0
    dropped = next(f for f in spool.families() if f.name == "sidetrace_spool_dropped_spans")
    assert [(s.labels, s.value) for s in dropped.samples if s.labels["reason"] == "exporter_removed"] == [
        ({"exporter": "a", "reason": "exporter_removed"}, 20), ({"exporter": "c", "reason": "exporter_removed"}, 20)]
    await spool.add_reader("d")  # a later trace exporter starts with an empty queue
    assert await spool.read("d", 100, 1000) == []
    await spool.close()


async def test_queues_whose_exporter_is_gone_at_open_are_discarded_and_counted(tmp_path: Path) -> None:
    # A restart after renaming a load-balancing exporter "lb" to "lb2": its backends' queues have no reader.
    path = tmp_path / "spool.db"
    spool = await opened(path, ("jaeger",))
    await spool.add_reader("lb/x", "lb/x")
    await spool.add_reader("lb/y", "lb/y")
    for _ in range(3):
        await spool.append(b"x" * 10, items=10, queue="lb/x")
    await spool.append(b"y" * 10, items=5, queue="lb/y")
    await spool.append(b"t" * 10, items=1)
    await spool.ack("lb/x", (await spool.read("lb/x", 10, 10))[0].id)  # one delivered
    await spool.close()
    spool = Spool(path, max_bytes=1 << 20)
    spool.add_reader_at_open("lb2", TRACES, resume_only=True, sub_readers=True)
    spool.add_reader_at_open("jaeger")
    await spool.open()
    assert spool.readers() == ["jaeger"]
    assert spool.size_bytes == 10  # only the trace queue's batch
    assert spool.discarded == {"lb": 25}
    dropped = next(f for f in spool.families() if f.name == "sidetrace_spool_dropped_spans")
    assert ({"exporter": "lb", "reason": "exporter_removed"}, 25) in [(s.labels, s.value) for s in dropped.samples]
    await spool.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT queue, COUNT(*) FROM batches GROUP BY queue").fetchall() == [(TRACES, 1)]


async def test_trace_queue_readers_gone_at_open_lose_what_they_alone_needed_counted(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    spool = await opened(path, ("a", "b"))
    for _ in range(3):
        await spool.append(b"t" * 10, items=10)
    await spool.ack("b", (await spool.read("b", 100, 1000))[-1].id)  # "b" delivered all three, "a" none
    await spool.close()
    spool = await opened(path, ("c", "b"))  # "a" renamed "c" while stopped: it takes over, nothing lost
    assert spool.discarded == {} and spool.size_bytes == 30
    await spool.close()
    spool = await opened(path, ("b",))  # "c" removed while stopped: what only it needed goes, counted
    assert spool.discarded == {"c": 30} and spool.size_bytes == 0
    await spool.append(b"t" * 10, items=7)
    await spool.close()
    spool = await opened(path, ())  # no reader of the trace queue left: all "b" had not delivered, counted
    assert spool.discarded == {"b": 7} and spool.size_bytes == 0
    await spool.add_reader("d")  # a trace exporter added later gets nothing of it
    assert await spool.read("d", 10, 100) == []
    await spool.close()


async def test_an_exporter_of_another_kind_by_the_same_name_does_not_bring_back_sub_readers(tmp_path: Path) -> None:
    # "lb" was a load-balancing exporter; after a restart it is an OTLP exporter reading the trace queue.
    path = tmp_path / "spool.db"
    spool = await opened(path, ())
    await spool.add_reader("lb/x", "lb/x")
    await spool.append(b"x" * 10, items=10, queue="lb/x")
    await spool.close()
    spool = await opened(path, ("lb",))
    assert spool.readers() == ["lb"] and spool.size_bytes == 0 and spool.discarded == {"lb": 10}
    await spool.close()


async def test_a_sub_readers_queue_whose_cursor_was_lost_is_read_from_its_start(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    spool = await opened(path, ())
    await spool.add_reader("lb/x", "lb/x")
    await spool.append(b"x" * 10, items=10, queue="lb/x")
    await spool.close()
    os.unlink(f"{path}-cursors")
    spool = Spool(path, max_bytes=1 << 20)
    spool.add_reader_at_open("lb", TRACES, resume_only=True, sub_readers=True)
    await spool.open()
    assert spool.readers() == ["lb/x"] and spool.discarded == {}
    batches = await spool.read("lb/x", 10, 100)
    assert [b.body for b in batches] == [b"x" * 10] and spool.possibly_resent("lb/x", batches) == 10
    await spool.close()


async def test_making_room_deletes_rows_of_a_queue_without_reader_and_accounts_for_them(tmp_path: Path) -> None:
    # Rows of a queue nobody reads (the pipeline writes none, but the spool does not rely on that).
    spool = await opened(tmp_path / "spool.db", (), max_bytes=300)
    for i in range(3):
        await spool.append(bytes([i]) * 100, items=10)
    await spool.add_reader("lb/x", "lb/x")
    assert spool.size_bytes == 300
    for i in range(3):
        await spool.append(bytes([i]) * 100, items=7, queue="lb/x")
    assert spool.size_bytes == 300  # the trace queue's rows made room and left the count
    assert spool.dropped == {TRACES: 30}
    assert len(await spool.read("lb/x", 100, 10_000)) == 3
    dropped = next(f for f in spool.families() if f.name == "sidetrace_spool_dropped_spans")
    assert ({"exporter": TRACES, "reason": "spool_full"}, 30) in [(s.labels, s.value) for s in dropped.samples]
    await spool.close()
