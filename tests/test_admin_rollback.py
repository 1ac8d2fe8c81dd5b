"""Every admin transaction whose COMMIT fails changes nothing: memory is
what the database holds, right after the failure and after a restart, and
the same command then succeeds.

The failure is a real one of SQLite's COMMIT (``faults.arm("metadata.commit")``
raises SQLITE_FULL's error there, as a full disk does), injected only into
the admin command's own transaction, not into the group commits around it.
"""
from __future__ import annotations

import sqlite3
import traceback

import pytest

from lunclone import faults
from lunclone.errors import LuncloneError
from helpers import EXT, SMALL as SIZE


def data(tag: bytes, n: int = SIZE) -> bytes:
    return (tag * (n // len(tag) + 1))[:n]


def admin_commit_fails() -> None:
    """Fail the COMMIT of transactions not made by the group committer."""
    def full():
        if not any(f.name == "commit_now" for f in traceback.extract_stack()):
            raise sqlite3.OperationalError("database or disk is full")
    faults.arm("metadata.commit", full)


def assert_memory_is_database(live, resyncing: str | None = None) -> None:
    """``resyncing``: a clone that may be synchronizing in memory while the
    database says synchronized (with its intent bits set: after a restart
    that resynchronizes too), as a failed fracture leaves it."""
    eng = live.engine
    recs = {r.name: r for r in eng.md.volumes()}
    assert set(recs) == set(eng.volumes.records), "volume records differ"
    for name, rec in recs.items():
        assert eng.volumes.records[name].clone_state == rec.clone_state, name
    for src, fam in eng.families.by_source.items():
        assert set(fam.clones) == {n for n, r in recs.items() if r.source == src}
        for clone in fam.clones.values():
            if clone.name == resyncing and clone.state == "synchronizing":
                assert recs[clone.name].clone_state == "synchronized"
                continue
            assert clone.state == recs[clone.name].clone_state, clone.name
            in_db = eng.md.load_bitmap(clone.name, "delta", fam.nextents)
            if not clone.delta.loaded:  # after a restart, until first use: its count
                assert clone.delta.count() == in_db.count(), clone.name
                continue
            missing = set(clone.delta.iter_set()) - set(in_db.iter_set())
            assert not missing, f"{clone.name}: bits set in memory only: {sorted(missing)}"
    jobs = {j.source: j for j in eng.md.jobs()}
    for src, fam in eng.families.by_source.items():
        r, job = fam.restore, jobs.get(src)
        if r is None:
            assert job is None or job.state == "done", f"{src}: restore in the database only"
        else:
            assert job is not None and job.state == r.state and job.rate_limit == r.rate_limit
            assert job.protected == r.protected_mode


def fractured(live, clone="c1"):
    live.fractured_clone(clone=clone, data=data(b"a"))


def restoring(live):
    fractured(live)
    live.write("src", data(b"b", 8 * EXT), 0)
    live.cmd("restore", source="src", clone_name="c1", rate_limit="64K")


def synchronized(live):
    live.cmd("create", name="src", size=SIZE)
    live.write("src", data(b"a"), 0)
    live.cmd("clone_create", source="src", name="c1")
    live.wait_clone("c1", "synchronized")


CASES = {
    "create": (lambda live: None, "create", dict(name="v", size=SIZE)),
    "clone create": (lambda live: live.cmd("create", name="src", size=SIZE),
                     "clone_create", dict(source="src", name="c1")),
    "fracture": (synchronized, "clone_fracture", dict(name="c1")),
    "sync": (fractured, "clone_sync", dict(name="c1")),
    "clone delete": (fractured, "clone_delete", dict(name="c1")),
    "volume delete": (lambda live: live.cmd("create", name="v", size=SIZE),
                      "delete", dict(name="v")),
    "restore start": (fractured, "restore", dict(source="src", clone_name="c1")),
    "restore pause": (restoring, "restore_pause", dict(source="src")),
    "restore rate": (restoring, "restore_rate", dict(source="src", limit="1M")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_failed_admin_commit_changes_nothing(live, case):
    setup, cmd, args = CASES[case]
    setup(live)
    live.write("src", b"w" * 4096, 2 * EXT) if "src" in live.engine.volumes.served else None
    assert_memory_is_database(live)
    admin_commit_fails()
    with pytest.raises((LuncloneError, OSError)):
        live.cmd(cmd, **args)
    faults.disarm()
    assert_memory_is_database(live, resyncing="c1" if case == "fracture" else None)
    live.restart()
    assert_memory_is_database(live)
    if case == "fracture":
        live.wait_clone("c1", "synchronized")
    live.cmd(cmd, **args)  # and then it works
    assert_memory_is_database(live)


def test_failed_restore_resume_commit_changes_nothing(live):
    restoring(live)
    live.cmd("restore_pause", source="src")
    admin_commit_fails()
    with pytest.raises(LuncloneError):
        live.cmd("restore_resume", source="src")
    faults.disarm()
    assert live.family("src").restore.state == "paused"
    assert_memory_is_database(live)
    live.restart()
    assert_memory_is_database(live)
    live.cmd("restore_resume", source="src")
    assert_memory_is_database(live)
