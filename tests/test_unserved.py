"""Volumes kept unserved at start-up stay unserved: a clone whose source is
not served, and the clones of a source that 'restore resume' could not
bring back.  A clone served without its family has no policy: a client's
writes to it would be tracked by no delta map."""
from __future__ import annotations

import os
import sqlite3
import subprocess

import nbd
import pytest

from helpers import (LUNCLONE, SMALL, fractured_clone, read_bitmap, wait_clone_state,
                     wait_restore_done)
from live import EXT
from lunclone import faults
from lunclone.errors import LuncloneError, NotFound

SIZE = SMALL


def pattern(tag: bytes, n: int = SIZE) -> bytes:
    return (tag * (n // len(tag) + 1))[:n]


def test_clone_of_a_source_missing_at_start_up_is_not_served(daemon):
    """Through nbdkit: the clone's export is refused, and status says why."""
    h = fractured_clone(daemon, SIZE, 256 * 1024)
    del h
    assert daemon.stop() == 0
    away(daemon, "src")
    daemon.start()
    try:
        h = daemon.connect("c1")
    except nbd.Error:
        pass
    else:
        h.pwrite(b"x" * 4096, 0)
        h.flush()
        del h
        pytest.fail("a client opened c1 and wrote to it while its source is not "
                    "served (no delta map tracks that write)")
    st = daemon.json("status", "c1")
    assert st["error"] == "its source 'src' is not served"
    assert st["allocated"] is None, "c1 is still open (served)"
    assert "ERROR: its source 'src' is not served" in daemon.cli("status", "c1").stdout


@pytest.mark.parametrize("command", [["clone", "delete", "c1"], ["delete", "c1"]],
                         ids=["clone-delete", "delete"])
def test_a_clone_missing_at_start_up_can_be_deleted_beside_a_served_one(daemon, command):
    """c1's file is gone, c2 is served: the family of src holds c2 only,
    and deleting c1 (its record: nothing else of it is loaded) works
    instead of saying c1 is not a clone."""
    daemon.cli("create", "src", "--size", str(SIZE))
    for clone in ("c1", "c2"):
        daemon.cli("clone", "create", "src", clone)
    assert daemon.stop() == 0
    os.unlink(daemon.volume_path("c1"))
    daemon.start()
    daemon.cli(*command)
    assert [c["name"] for c in daemon.json("status", "src")["clones"]] == ["c2"]
    assert "c1" not in daemon.cli("list").stdout
    r = daemon.cli("clone", "delete", "src", check=False)
    assert r.returncode != 0 and "'src' is not a clone" in r.stderr


def test_the_clone_of_an_unfinished_restore_is_never_deleted_unloaded(daemon):
    """A restore from c1 is running when c1's file goes missing: src is
    kept unserved and c1 is not loaded.  Deleting c1's record would leave
    the restore nothing to finish from (its data is only there): refused,
    by either command, saying how to go on."""
    fractured_clone(daemon, SIZE, SIZE)
    h = daemon.connect("src")
    h.pwrite(b"x" * SIZE, 0)
    del h
    daemon.cli("restore", "src", "--from", "c1", "--rate", "64K")
    assert daemon.stop() == 0
    away(daemon, "c1")
    daemon.start()
    r = daemon.json("status", "src")["restore"]  # from its row and stored maps
    assert (r["from"], r["state"]) == ("c1", "paused") and r["pending_extents"] > 0
    assert "restore resume src" in r["error"]  # cannot go on: why, and what to do
    watch = subprocess.run([LUNCLONE, "status", "src", "--watch", "--until-done", "--run-dir",
                            daemon.run_dir], capture_output=True, text=True, timeout=20)
    assert watch.returncode == 0 and "paused" in watch.stderr  # it ends: nothing will move
    for command in (["clone", "delete", "c1"], ["delete", "c1"], ["delete", "c1", "--force"]):
        r = daemon.cli(*command, check=False)
        assert r.returncode != 0, command
        assert "unfinished restore of src" in r.stderr and "restore resume src" in r.stderr
    assert "c1" in daemon.cli("list").stdout


def test_a_clone_not_loaded_counts_towards_the_eight(daemon):
    """src has 8 clones and c0's file is missing at start-up: a ninth is
    refused (c0, back at the next start, would make nine in the family)."""
    daemon.cli("create", "src", "--size", str(SIZE))
    for i in range(8):
        daemon.cli("clone", "create", "src", f"c{i}")
    assert daemon.stop() == 0
    away(daemon, "c0")
    daemon.start()
    r = daemon.cli("clone", "create", "src", "c8", check=False)
    assert r.returncode != 0 and "8 clones" in r.stderr, r.stderr
    assert "c8" not in daemon.cli("list").stdout
    daemon.cli("delete", "c0")  # its record gone: room for one again
    daemon.cli("clone", "create", "src", "c8")


def test_a_source_is_deleted_with_every_clone_record(daemon):
    """src's only clone was not loaded (its file missing): 'delete src'
    still counts it (refused without --force), and with --force deletes
    its record too, so a new src does not inherit it."""
    daemon.cli("create", "src", "--size", str(SIZE))
    daemon.cli("clone", "create", "src", "c1")
    assert daemon.stop() == 0
    os.unlink(daemon.volume_path("c1"))
    daemon.start()
    r = daemon.cli("delete", "src", check=False)
    assert r.returncode != 0 and "has clones (c1)" in r.stderr
    daemon.cli("delete", "src", "--force")
    assert "c1" not in daemon.cli("list").stdout
    daemon.cli("create", "src", "--size", str(SIZE))
    daemon.cli("clone", "create", "src", "c1")  # the name is free: no record left


@pytest.mark.parametrize("state", ["fractured", "synchronized"])
def test_a_clone_away_while_its_source_is_written_is_never_trusted_again(daemon, state):
    """c1's file is away for one run of the daemon while src is served and
    written: nothing tracks those writes for c1.  When the file comes back,
    c1 may differ from src anywhere: a restore from a fractured c1 brings
    back all of c1's data (not only the extents its old delta map named),
    and a synchronized c1 resynchronizes before it is a mirror again."""
    h = fractured_clone(daemon, SIZE, SIZE)
    if state == "synchronized":
        daemon.cli("clone", "sync", "c1", "--wait")  # no write after: no intent bit
    else:
        h.pwrite(b"d" * EXT, 0)  # a difference c1's delta map knows of
        h.flush()
    clone_data = whole_of(daemon, "c1")
    del h
    assert daemon.stop() == 0
    away(daemon, "c1")
    daemon.start()
    h = daemon.connect("src")
    h.pwrite(b"w" * EXT, SIZE - EXT)  # written while c1 is away
    h.flush()
    del h
    if state == "fractured":
        back_then_restored_whole(daemon, "c1", clone_data)
    else:
        assert daemon.stop() == 0
        back(daemon, "c1")
        daemon.start()
        wait_clone_state(daemon, "src", "c1", "synchronized")
        assert whole_of(daemon, "c1") == whole_of(daemon, "src")


def test_a_clone_still_away_when_its_source_is_served_again_is_never_trusted(daemon):
    """src was kept unserved (its restore's clone c1 missing) and c2 was
    away too; c1 comes back and 'restore resume' serves src again while
    c2 is still away: c2 misses the writes from then on, so a restore
    from it later brings back all of its data."""
    h = fractured_clone(daemon, SIZE, SIZE)
    daemon.cli("clone", "create", "src", "c2")
    wait_clone_state(daemon, "src", "c2", "synchronized")
    daemon.cli("clone", "fracture", "c2")
    c2_data = whole_of(daemon, "c2")
    h.pwrite(b"x" * (SIZE // 2), 0)  # what the restore from c1 brings back
    del h
    daemon.cli("restore", "src", "--from", "c1", "--rate", "64K")
    assert daemon.stop() == 0
    away(daemon, "c1", "c2")
    daemon.start()
    back(daemon, "c1")
    daemon.cli("restore", "resume", "src")
    daemon.cli("restore", "rate", "src", "0")
    h = daemon.connect("src")
    h.pwrite(b"w" * EXT, SIZE - EXT)  # written while c2 is away
    h.flush()
    del h
    wait_restore_done(daemon, "src")
    back_then_restored_whole(daemon, "c2", c2_data)


def test_a_finished_restores_clone_away_when_its_source_comes_back_is_never_trusted(daemon):
    """src and c1 (the clone of src's finished restore) were both away;
    src comes back through 'restore resume' (src is served again even
    though no restore is in progress) while c1 stays away and src is
    written: c1, back later, is copied whole by a restore."""
    h = fractured_clone(daemon, SIZE, SIZE)
    h.pwrite(b"x" * EXT, 0)
    del h
    daemon.cli("restore", "src", "--from", "c1", "--wait")
    clone_data = whole_of(daemon, "c1")
    assert daemon.stop() == 0
    away(daemon, "src", "c1")
    daemon.start()
    back(daemon, "src")
    daemon.cli("restore", "resume", "src")  # serves src again (no restore to go on with)
    h = daemon.connect("src")
    h.pwrite(b"w" * EXT, SIZE - EXT)  # written while c1 is away
    h.flush()
    del h
    back_then_restored_whole(daemon, "c1", clone_data)


def test_a_synchronized_clone_away_when_a_restore_starts_comes_back_fractured(daemon):
    """c2 (synchronized) is away when a restore of src from c1 starts: it
    is fractured with the other clones, not brought back as a mirror
    that a sync fills with the source's pre-restore data."""
    h = fractured_clone(daemon, SIZE, SIZE)
    daemon.cli("clone", "create", "src", "c2")
    wait_clone_state(daemon, "src", "c2", "synchronized")
    h.pwrite(b"x" * SIZE, 0)
    del h
    assert daemon.stop() == 0
    away(daemon, "c2")
    daemon.start()
    daemon.cli("restore", "src", "--from", "c1", "--rate", "64K")
    assert daemon.stop() == 0
    back(daemon, "c2")
    daemon.start()
    daemon.cli("restore", "rate", "src", "0")
    wait_restore_done(daemon, "src")
    state = daemon.json("status", "src")["clones"]
    assert {c["name"]: c["state"] for c in state}["c2"] == "fractured"
    daemon.cli("clone", "sync", "c2", "--wait")
    assert whole_of(daemon, "c2") == whole_of(daemon, "src")


def whole_of(daemon, name: str) -> bytes:
    h = daemon.connect(name)
    try:
        return h.pread(SIZE, 0)
    finally:
        del h


def away(daemon, *names: str) -> None:
    """Their files moved away (the daemon is stopped): not served at start."""
    for name in names:
        os.rename(daemon.volume_path(name), daemon.volume_path(name) + ".away")


def back(daemon, *names: str) -> None:
    for name in names:
        os.rename(daemon.volume_path(name) + ".away", daemon.volume_path(name))


def back_then_restored_whole(daemon, clone: str, clone_data: bytes) -> None:
    """The clone's file back at the next start: a restore from it brings
    back every byte of it, not only what its old delta map named."""
    assert daemon.stop() == 0
    back(daemon, clone)
    daemon.start()
    daemon.cli("restore", "src", "--from", clone, "--wait")
    assert whole_of(daemon, "src") == clone_data


def _back(live, name: str) -> None:
    path = live.engine.volumes.path(name)
    os.rename(path + ".away", path)


def test_resume_with_the_source_still_missing_serves_none_of_its_clones(live):
    """'restore resume' of a source whose restore's clone was missing: the
    clone is back but the source is not; the command fails in one line and
    serves none of the source's clones (they would have no policy)."""
    live.fractured_clone(data=pattern(b"a"))
    live.cmd("clone_create", source="src", name="c2")
    live.wait_clone("c2", "synchronized")
    live.write("src", pattern(b"b", 8 * EXT), 0)
    live.cmd("restore", source="src", clone_name="c1", rate_limit="64K")
    live.restart_without("src", "c1")
    _back(live, "c1")
    vols = live.engine.volumes
    with pytest.raises(NotFound) as e:
        live.cmd("restore_resume", source="src")
    assert "'src' is not served" in e.value.message and "\n" not in e.value.message
    for name in ("c1", "c2"):
        assert name not in vols.served, f"{name} served again while its source is not"
        with pytest.raises(LuncloneError, match="not served"):
            live.engine.open_export(name, False)
    _back(live, "src")
    live.cmd("restore_resume", source="src")
    assert set(live.family("src").clones) == {"c1", "c2"}
    live.cmd("restore_rate", source="src", limit="0")
    live.wait(lambda: live.family("src").restore is None, what="restore done")
    assert live.whole("src") == pattern(b"a")


def test_a_resume_whose_distrust_fails_serves_nothing(live):
    """'restore resume' serves src again while c2 stays away; the commit
    that distrusts c2 fails (a full disk): src goes back to unserved
    (no client may write while nothing tracks its writes for c2), and
    the next resume, with room again, distrusts c2 and serves src."""
    live.restoring_beside_c2()
    live.restart_without("c1", "c2")
    _back(live, "c1")
    vols = live.engine.volumes

    def full():
        raise sqlite3.OperationalError("database or disk is full")
    faults.arm("metadata.commit", full)
    try:
        with pytest.raises(LuncloneError, match="disk is full"):
            live.cmd("restore_resume", source="src")
    finally:
        faults.disarm()
    assert "src" not in vols.served and "c1" not in vols.served
    with pytest.raises(LuncloneError, match="not served"):
        live.engine.open_export("src", False)
    live.cmd("restore_resume", source="src")
    assert "src" in vols.served
    assert read_bitmap(live.state_dir, "c2", "delta") == set(range(SIZE // EXT))


def test_a_resume_that_fails_loading_a_clone_serves_none_of_them(live, monkeypatch):
    """'restore resume' opens src's clones again, then loads the family;
    reading c2's delta map fails (a disk I/O error): c2 goes back to
    unserved with src, not left served with no family (a client's
    writes to it would be in no delta map: a later restore from c2, or
    its sync, would miss them)."""
    live.restoring_beside_c2()
    live.restart_without("c1")
    _back(live, "c1")
    vols, md = live.engine.volumes, live.engine.md
    assert "c2" in vols.broken  # with its source
    real = md.load_bitmap

    def failing(owner, kind, nbits):
        if (owner, kind) == ("c2", "delta"):
            raise sqlite3.OperationalError("disk I/O error")
        return real(owner, kind, nbits)
    monkeypatch.setattr(md, "load_bitmap", failing)
    with pytest.raises((LuncloneError, sqlite3.Error), match="disk I/O error"):
        live.cmd("restore_resume", source="src")
    monkeypatch.setattr(md, "load_bitmap", real)
    for name in ("src", "c1", "c2"):
        assert name not in vols.served and name in vols.broken, name
        with pytest.raises(LuncloneError, match="not served"):
            live.engine.open_export(name, False)
    live.cmd("restore_resume", source="src")
    assert {"src", "c1", "c2"} <= set(vols.served)


def test_resume_of_a_clone_whose_source_is_missing_serves_nothing(live):
    """'restore resume' names the clone, not its source: refused, the clone
    stays unserved."""
    live.fractured_clone(data=pattern(b"a"))
    live.restart_without("src")
    vols = live.engine.volumes
    with pytest.raises(NotFound, match="its source 'src' is not served"):
        live.cmd("restore_resume", source="c1")
    assert "c1" not in vols.served, "c1 served with its source not served"
    with pytest.raises(LuncloneError, match="not served"):
        live.engine.open_export("c1", False)


def test_serve_again_keeps_a_volume_that_is_open(live):
    """Never a second Volume for a name: the first one's descriptor would
    leak, and its clients would write past the second one's policy."""
    live.cmd("create", name="v", size=SIZE)
    vols = live.engine.volumes
    vol = vols.served["v"]
    vols.broken["v"] = "test"
    with vols.maps_lock:
        vols.serve_again("v")
    assert vols.served["v"] is vol, "a second Volume was opened for v"
    assert vol.fd >= 0 and "v" not in vols.broken
