from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from sidetrace.exporters.spool import Spool, SpoolBusy


async def opened(path: Path, consumers: tuple[str, ...] = ("a",), **kwargs: object) -> Spool:
    spool = Spool(path, consumers, **{"max_bytes": 1 << 20, **kwargs})
    await spool.open()
    return spool


async def test_batches_come_back_in_order_and_are_freed_once_every_exporter_passed(tmp_path: Path) -> None:
    spool = await opened(tmp_path / "spool.db", ("a", "b"))
    for i in range(5):
        await spool.append(f"body{i}".encode(), spans=i + 1)
    assert spool.size_bytes == 25
    a = await spool.read("a", max_spans=6, max_bytes=1000)
    assert [b.body for b in a] == [b"body0", b"body1", b"body2"]  # 1+2+3 spans fit in 6
    await spool.ack("a", a[-1].id)
    assert spool.size_bytes == 25  # b has not read anything yet
    b = await spool.read("b", max_spans=100, max_bytes=1000)
    assert [x.body for x in b] == [f"body{i}".encode() for i in range(5)]
    await spool.ack("b", b[-1].id)
    assert spool.size_bytes == 10  # batches 3 and 4 wait for a
    assert [x.body for x in await spool.read("a", 100, 1000)] == [b"body3", b"body4"]
    await spool.close()


async def test_first_batch_is_returned_even_when_larger_than_the_limits(tmp_path: Path) -> None:
    spool = await opened(tmp_path / "spool.db")
    await spool.append(b"x" * 100, spans=50)
    assert len(await spool.read("a", max_spans=10, max_bytes=10)) == 1
    await spool.close()


async def test_full_spool_drops_oldest_and_counts_their_spans(tmp_path: Path) -> None:
    spool = await opened(tmp_path / "spool.db", max_bytes=300)
    for i in range(5):
        await spool.append(bytes([i]) * 100, spans=10)
    assert spool.size_bytes == 300
    assert spool.dropped == {"spool_full": 20}
    batches = await spool.read("a", 1000, 10_000)
    assert [b.body[0] for b in batches] == [2, 3, 4]
    await spool.close()


async def test_corrupt_row_is_set_aside_and_counted_not_retried(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    spool = await opened(path)
    for i in range(3):
        await spool.append(f"body{i}".encode(), spans=7)
    with sqlite3.connect(path) as db:
        db.execute("UPDATE batches SET body = ? WHERE id = 2", (b"b0dy1",))
    batches = await spool.read("a", 1000, 10_000)
    assert [b.body for b in batches] == [b"body0", b"body2"]
    assert spool.set_aside_counts == {("a", "corrupt"): 7}
    await spool.ack("a", batches[-1].id)
    assert await spool.read("a", 1000, 10_000) == []
    await spool.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT batch_id, reason, body FROM set_aside").fetchall() == [(2, "corrupt", b"b0dy1")]


async def test_unacked_batches_and_cursors_survive_reopen(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    spool = await opened(path)
    for i in range(4):
        await spool.append(f"body{i}".encode(), spans=3)
    first = await spool.read("a", 3, 1000)
    await spool.ack("a", first[-1].id)
    await spool.close()  # a clean stop: nothing can have been in flight

    again = await opened(path)
    batches = await again.read("a", 1000, 1000)
    assert [b.body for b in batches] == [b"body1", b"body2", b"body3"]
    assert again.possibly_resent("a", batches) == 0
    await again.close()


async def test_after_a_crash_only_the_first_read_counts_as_possibly_resent(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    spool = await opened(path)
    for i in range(3):
        await spool.append(f"body{i}".encode(), spans=5)
    spool._thread.shutdown(wait=True)  # as if killed: the spool is never closed

    again = await opened(path)
    await again.append(b"after", spans=7)
    first = await again.read("a", 10, 1000)
    assert [b.body for b in first] == [b"body0", b"body1"]
    assert again.possibly_resent("a", first) == 10
    await again.ack("a", first[-1].id)
    rest = await again.read("a", 100, 1000)
    assert [b.body for b in rest] == [b"body2", b"after"]
    assert again.possibly_resent("a", rest) == 0
    await again.close()


async def test_unreadable_database_file_is_moved_aside_and_replaced(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    path.write_bytes(b"this is not a sqlite database" * 100)
    spool = await opened(path)
    assert spool.replaced_files == 1
    assert len(list(tmp_path.glob("spool.db.corrupt-*"))) == 1
    await spool.append(b"fresh", spans=1)
    assert [b.body for b in await spool.read("a", 10, 100)] == [b"fresh"]
    await spool.close()


async def test_append_refuses_when_too_much_is_pending(tmp_path: Path) -> None:
    spool = await opened(tmp_path / "spool.db", max_pending_bytes=150)
    first = asyncio.ensure_future(spool.append(b"x" * 100, spans=1))
    await asyncio.sleep(0)  # first is now pending
    with pytest.raises(SpoolBusy):
        await spool.append(b"y" * 100, spans=1)
    await first
    await spool.append(b"z" * 100, spans=1)  # room again once written
    assert [b.body[:1] for b in await spool.read("a", 10, 1000)] == [b"x", b"z"]
    await spool.close()


async def test_group_commit_writes_concurrent_appends_together(tmp_path: Path) -> None:
    spool = await opened(tmp_path / "spool.db")
    await asyncio.gather(*(spool.append(f"{i:03d}".encode(), spans=1) for i in range(200)))
    batches = await spool.read("a", 1000, 100_000)
    assert [b.body for b in batches] == [f"{i:03d}".encode() for i in range(200)]
    await spool.close()


async def test_wait_for_new_wakes_on_commit(tmp_path: Path) -> None:
    spool = await opened(tmp_path / "spool.db")
    assert await spool.read("a", 10, 100) == []
    waiter = asyncio.ensure_future(spool.wait_for_new("a", timeout=10))
    await spool.append(b"new", spans=1)
    await asyncio.wait_for(waiter, 2)
    await spool.close()


async def test_row_rewritten_as_invalid_text_is_set_aside(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    spool = await opened(path)
    for i in range(2):
        await spool.append(f"body{i}".encode(), spans=4)
    with sqlite3.connect(path) as db:  # bytes that are not UTF-8, stored with TEXT affinity
        db.execute("UPDATE batches SET body = substr(body, 1, 2) || x'00ff' WHERE id = 1")
    assert [b.body for b in await spool.read("a", 100, 1000)] == [b"body1"]
    assert spool.set_aside_counts == {("a", "corrupt"): 4}
    await spool.close()
