"""Delta maps loaded when first needed (issue 15, item 6: scale).

At start-up a family whose clones are all fractured keeps its delta maps
unloaded: only their counts are read, from the ``nset`` column of the
stored pages.  Status shows those counts; a client's first connection, an
admin command or a job loads the maps before anything reads a bit.  Each
test checks the bytes against a model, or the maps against the database.
"""
from __future__ import annotations

import os
import random
import sqlite3
import time

import pytest

from lunclone import faults, metadata
from lunclone.bitmap import Bitmap
from lunclone.errors import MetadataError
from lunclone.metadata import DB_NAME, SCHEMA_VERSION, JobRecord, Metadata

from helpers import EXT, SIZE, fractured_then_damaged, read_bitmap, whole
from live import Async, Hold, pattern
from workloads import host_io_during_restore

V1_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE volumes (name TEXT PRIMARY KEY, size INTEGER NOT NULL,
    extent_size INTEGER NOT NULL, source TEXT, clone_state TEXT, remote TEXT,
    created REAL NOT NULL);
CREATE TABLE jobs (source TEXT PRIMARY KEY, kind TEXT NOT NULL, clone TEXT NOT NULL,
    state TEXT NOT NULL, protected INTEGER NOT NULL DEFAULT 1,
    total_extents INTEGER NOT NULL DEFAULT 0, copied_bytes INTEGER NOT NULL DEFAULT 0,
    on_demand INTEGER NOT NULL DEFAULT 0, rate_limit INTEGER NOT NULL DEFAULT 0,
    error TEXT, started REAL NOT NULL);
CREATE TABLE bitmaps (owner TEXT NOT NULL, kind TEXT NOT NULL, page INTEGER NOT NULL,
    bits BLOB NOT NULL, PRIMARY KEY (owner, kind, page)) WITHOUT ROWID;
INSERT INTO meta VALUES ('schema_version', '1');
INSERT INTO meta VALUES ('created', '0');
INSERT INTO volumes VALUES ('src', 1073741824, 65536, NULL, NULL, NULL, 0);
INSERT INTO volumes VALUES ('c1', 1073741824, 65536, 'src', 'fractured', NULL, 0);
INSERT INTO jobs VALUES ('src', 'restore', 'c1', 'done', 1, 10, 655360, 2, 0, NULL, 0);
"""


def test_a_schema_1_database_is_brought_forward_with_its_counts(tmp_path):
    """A database written by the previous version (no ``nset``) opens: its
    pages are counted once, in one transaction, and keep their bits."""
    bits = [0, 5, 16_383, 40_000, 40_001]
    stored = Bitmap(1 << 16)  # two pages
    for i in bits:
        stored.set(i)
    db = sqlite3.connect(os.path.join(tmp_path, DB_NAME))
    db.executescript(V1_SCHEMA)
    for p in stored.used_pages():
        db.execute("INSERT INTO bitmaps VALUES ('c1', 'delta', ?, ?)", (p, stored.page(p)))
    db.commit()
    db.close()

    md = Metadata(str(tmp_path))
    assert md.map_counts() == {("c1", "delta"): 5}
    assert list(md.load_bitmap("c1", "delta", 1 << 16).iter_set()) == bits
    assert [v.name for v in md.volumes()] == ["c1", "src"]
    # its finished restore: no undo image, and how many extents the host
    # wrote during it is not known (status falls back to the delta map)
    assert md.jobs() == [JobRecord("src", "restore", "c1", "done", True, 10, 655360, 2, 0,
                                   None, 0.0, False, None)]
    md.close()
    db = sqlite3.connect(os.path.join(tmp_path, DB_NAME))
    version = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0]
    assert version == str(SCHEMA_VERSION)
    assert db.execute("SELECT page, nset FROM bitmaps").fetchall() == [(0, 3), (1, 2)]
    columns = [row[1] for row in db.execute("PRAGMA table_info(jobs)")]
    assert columns[-2:] == ["undo", "protected_extents"]
    db.close()
    Metadata(str(tmp_path)).close()  # opens again, nothing left to bring forward


def test_a_failed_bringing_forward_says_so_and_changes_nothing(tmp_path):
    """A full disk while the maps are copied (the WAL holds them): one line
    naming the schema step; the file stays version 1 with its rows."""
    db = sqlite3.connect(os.path.join(tmp_path, DB_NAME))
    db.executescript(V1_SCHEMA)
    db.execute("INSERT INTO bitmaps VALUES ('c1', 'delta', 0, ?)", (b"\x01" + bytes(4095),))
    db.commit()
    db.close()

    def full():
        raise sqlite3.OperationalError("database or disk is full")
    faults.arm("metadata.commit", full)
    try:
        with pytest.raises(MetadataError) as e:
            Metadata(str(tmp_path))
    finally:
        faults.disarm()
    assert "from schema version 1 to 2 failed, nothing changed" in e.value.message
    assert "disk is full" in e.value.message and "\n" not in e.value.message
    db = sqlite3.connect(os.path.join(tmp_path, DB_NAME))
    assert db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == "1"
    assert db.execute("SELECT owner, page FROM bitmaps").fetchall() == [("c1", 0)]
    db.close()
    md = Metadata(str(tmp_path))  # and with room, it goes
    assert md.map_counts() == {("c1", "delta"): 1}
    md.close()


def test_counts_follow_every_way_a_page_is_written(tmp_path):
    """``nset`` is right after save_page, set_bits, replace_bitmap and a
    page cleared to zero (no row)."""
    md = Metadata(str(tmp_path))
    bm = Bitmap(1 << 17)
    for i in (1, 2, 3, 70_000):
        bm.set(i)
    with md.transaction() as tx:
        tx.save_bitmap("c1", "delta", bm)
        tx.set_bits("c1", "delta", 0, [9, 1], 4096)
    assert md.map_counts() == {("c1", "delta"): 5}
    bm.clear(70_000)
    with md.transaction() as tx:
        tx.save_bitmap("c1", "delta", bm)
        tx.replace_bitmap("c2", "delta", bm)
    # c1: page 0 as set_bits left it (1, 2, 3, 9), page 2 now empty (no row)
    assert md.map_counts() == {("c1", "delta"): 4, ("c2", "delta"): 3}
    md.close()


def _fractured_with_changes(live, extents=(3, 7, 12)) -> bytes:
    """src with a fractured clone c1, then ``extents`` of src written:
    returns the clone's data (what a restore brings back)."""
    clone_data = pattern(b"clone-")
    live.fractured_clone(data=clone_data)
    for i in extents:
        live.write("src", pattern(b"new-", EXT), i * EXT)
    live.commit()
    return clone_data


def test_a_fractured_family_starts_unloaded_and_status_shows_its_counts(live):
    """After a restart the maps are not read; status shows the stored
    counts; the first connection loads them, bit for bit as stored, and a
    write through the fast path then sets its delta bit."""
    _fractured_with_changes(live)
    live.restart()
    fam = live.engine.families.by_source["src"]
    assert not fam.clones["c1"].delta.loaded
    st = live.cmd("status", name="src")
    assert st["clones"][0]["delta_extents"] == 3
    assert not fam.clones["c1"].delta.loaded  # status reads counts only
    live.engine.open_export("c1", readonly=True)  # a client opens the clone
    assert fam.clones["c1"].delta.loaded
    assert set(fam.clones["c1"].delta.iter_set()) == {3, 7, 12}
    live.write("src", b"x" * 4096, 20 * EXT)  # one extent, the fast path
    live.commit()
    assert read_bitmap(live.state_dir, "c1", "delta") == {3, 7, 12, 20}
    assert live.cmd("status", name="src")["clones"][0]["delta_extents"] == 4


def test_a_restore_after_restart_brings_back_every_byte(live):
    """Restart, then the restore admin command loads the maps itself (no
    client first): every byte of the source becomes the clone's, and the
    host's write during it is kept."""
    clone_data = _fractured_with_changes(live)
    live.restart()
    assert not live.engine.families.by_source["src"].clones["c1"].delta.loaded
    live.cmd("restore", source="src", clone_name="c1")
    live.write("src", b"h" * 4096, 7 * EXT + 4096)
    model = bytearray(clone_data)
    model[7 * EXT + 4096:7 * EXT + 8192] = b"h" * 4096
    live.wait(lambda: live.cmd("status", name="src")["restore"]["state"] == "done",
              what="restore done")
    assert live.whole("src") == bytes(model)
    assert live.whole("c1") == clone_data


def test_connections_while_a_map_loads_wait_for_it(live, monkeypatch):
    """A second connection to the family while the first one's load is held
    in the database read waits for it (the maps are read once); status
    answers meanwhile (it reads counts, not maps)."""
    _fractured_with_changes(live)
    live.cmd("clone_create", source="src", name="c2")
    live.wait_clone("c2", "synchronized")
    live.cmd("clone_fracture", name="c2")
    live.restart()
    loads: list[tuple[str, str]] = []
    real = Metadata.load_bitmap

    def counting(self, owner, kind, nbits):
        loads.append((owner, kind))
        return real(self, owner, kind, nbits)
    monkeypatch.setattr(Metadata, "load_bitmap", counting)
    hold = Hold(monkeypatch, metadata.Metadata, "load_bitmap",
                lambda self, owner, kind, nbits: owner == "c1")
    first = Async(lambda: live.engine.open_export("src", readonly=False))
    hold.wait_arrived()
    second = Async(lambda: live.engine.open_export("c2", readonly=True))
    st = live.cmd("status", name="src", _timeout=5)
    assert sorted(c["delta_extents"] for c in st["clones"]) == [0, 3]
    assert not second.done()
    hold.release()
    first.result()
    second.result()
    fam = live.engine.families.by_source["src"]
    assert all(c.delta.loaded for c in fam.clones.values())
    assert sorted(loads) == [("c1", "delta"), ("c2", "delta")]


def test_after_a_restart_a_restore_under_host_io_matches_the_model(daemon):
    """The real daemon, restarted with a fractured family (its maps not
    read): status shows the stored count; then a restore with host I/O on
    four connections ends with every byte as the model says, the clone
    untouched."""
    clone_data, src = fractured_then_damaged(daemon, random.Random(23))
    del src
    daemon.stop()
    daemon.start()
    stored = read_bitmap(daemon.state_dir, "c1", "delta")
    assert daemon.json("status", "src")["clones"][0]["delta_extents"] == len(stored) > 0
    early = daemon.connect("src")
    daemon.cli("restore", "src", "--from", "c1", "--rate", "64K")
    host_io_during_restore(daemon, early, clone_data, 31, 80)
    assert whole(daemon.connect("c1"), SIZE) == clone_data


def test_a_family_found_loaded_has_its_fast_path_made(live, monkeypatch):
    """review: a second loader must not return between the fill of the
    maps and the fast path made from them (a write would find the fast
    path's tuple still holding the unloaded buffers)."""
    _fractured_with_changes(live)
    live.restart()
    fam = live.engine.families.by_source["src"]
    hold = Hold(monkeypatch, type(fam), "refresh_fast", lambda self: True)
    first = Async(lambda: live.engine.open_export("c1", readonly=True))
    hold.wait_arrived()
    second = Async(lambda: live.engine.families.load_maps(fam))
    time.sleep(0.3)
    assert not second.done(), "a loader returned before the fast path was made"
    hold.release()
    first.result()
    second.result()
    maps, _ = fam.fast
    assert all(m is not None for m in maps)
