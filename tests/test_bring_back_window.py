"""'restore resume' of a source kept unserved (its clone was missing):
the source is served again before its family and restore are loaded."""
from __future__ import annotations

import os
import time

from live import EXT, MiB, Async, Hold

SIZE = 4 * MiB


def pattern(tag: bytes, n: int = SIZE) -> bytes:
    return (tag * (n // len(tag) + 1))[:n]


def test_write_while_a_restore_is_brought_back_is_kept(live, monkeypatch):
    """A client that opens the source between 'serve again' and the loading
    of its family and restore would write on the plain path (no protected
    bit, no delta bit), and the restore would copy the clone's extent over
    that acknowledged write.  Opening waits until the rules are in place."""
    live.fractured_clone(data=pattern(b"a", SIZE), size=SIZE)
    live.write("src", pattern(b"b", 8 * EXT), 0)
    live.cmd("restore", source="src", clone_name="c1", rate_limit="4K")
    live.restart_without("c1")()  # the clone is back, the source still unserved
    assert "src" not in live.engine.volumes.served
    fams = live.engine.families
    hold = Hold(monkeypatch, fams, "load", lambda source: True)  # after serve_again
    resume = live.cmd_in_thread("restore_resume", source="src")
    hold.wait_arrived()

    def client():  # a client connects meanwhile and writes, acknowledged
        vol = live.engine.open_export("src", False)
        vol.pwrite(b"w" * EXT, 2 * EXT, True)
        live.engine.close_export(vol)
    writer = Async(client)
    time.sleep(0.3)
    try:
        assert not writer.done(), "a client opened the source before its rules were in place"
    finally:
        hold.release()
    writer.result()
    resume.result()
    live.cmd("restore_rate", source="src", limit="0")
    live.wait(lambda: live.family("src").restore is None, what="restore done")
    assert live.read("src", 2 * EXT, EXT) == b"w" * EXT, "the host's write was undone"


def test_first_clone_scan_sees_a_plain_write_in_progress(live, monkeypatch):
    """A plain write whose data has not landed when the first clone is
    created: the create waits for it (on the loop), so the initial scan
    sees its extent (else the clone would lack it: no delta bit either)."""
    live.cmd("create", name="src", size=SIZE)
    live.write("src", b"a" * EXT, 0)
    src_fd = live.volume("src").fd
    hold = Hold(monkeypatch, os, "pwrite", lambda fd, *a: fd == src_fd)
    w = Async(lambda: live.write("src", b"w" * EXT, 5 * EXT))  # plain path, held
    hold.wait_arrived()
    create = live.cmd_in_thread("clone_create", source="src", name="c1")
    try:
        live.wait(lambda: "c1" in getattr(live.engine.families.get("src"), "clones", {}), what="clone installed")
        assert live.cmd("status", _timeout=5, name="src")["name"] == "src"
        assert not create.done()  # waits for the plain write
    finally:
        hold.release()
    w.result()
    create.result()
    live.wait_clone("c1", "synchronized")
    assert live.file("c1") == live.file("src")
    assert live.file("c1")[5 * EXT:6 * EXT] == b"w" * EXT


def test_first_clone_create_undone_while_a_plain_write_waits(live, monkeypatch):
    """The wait for a plain write times out: the create changes nothing
    (source back on the plain path, no family, no file); a later create works."""
    from lunclone import families
    from lunclone.errors import Busy
    import pytest
    live.cmd("create", name="src", size=SIZE)
    live.write("src", b"a" * EXT, 0)
    src_fd = live.volume("src").fd
    hold = Hold(monkeypatch, os, "pwrite", lambda fd, *a: fd == src_fd)
    w = Async(lambda: live.write("src", b"w" * EXT, 5 * EXT))
    hold.wait_arrived()
    real = families.quiesce

    async def short(gen, timeout, name):
        await real(gen, min(timeout, 0.3), name)
    monkeypatch.setattr(families, "quiesce", short)
    try:
        with pytest.raises(Busy):
            live.cmd("clone_create", source="src", name="c1")
        assert live.volume("src").policy is None
        assert live.engine.families.get("src") is None
        assert "c1" not in live.engine.volumes.records
        assert not os.path.exists(live.engine.volumes.path("c1"))
    finally:
        hold.release()
    w.result()
    monkeypatch.setattr(families, "quiesce", real)
    live.cmd("clone_create", source="src", name="c1")
    live.wait_clone("c1", "synchronized")
    assert live.file("c1") == live.file("src")
