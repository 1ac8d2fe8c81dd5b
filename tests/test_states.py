"""The clone and restore state machines (docs/DESIGN.md, "Clone states",
"Restore"), on the real engine in this process, through the control
server's command table only: every transition, what each state allows the
host, and the refusals (which change nothing)."""
from __future__ import annotations

import time

import pytest

from lunclone.errors import LuncloneError, ReadOnly
from helpers import EXT, SMALL as SIZE, read_bitmap


def clone_state(live, name: str = "c1") -> str:
    src = live.cmd("status", name=name)["source"]
    return next(c["state"] for c in live.cmd("status", name=src)["clones"] if c["name"] == name)


def restore(live, source: str = "src") -> dict | None:
    return live.cmd("status", name=source)["restore"]


def refused(live, cmd: str, words: str, **args) -> None:
    """``cmd`` fails with a one-line message containing ``words``, and the
    status of every volume is what it was."""
    before = states(live)
    with pytest.raises(LuncloneError) as e:
        live.cmd(cmd, **args)
    assert words in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert states(live) == before, f"a refused {cmd} changed something"


def states(live) -> list:
    """What a command may change, as status shows it (not rates or times)."""
    out = []
    for v in live.cmd("status"):
        r = v["restore"] or {}
        out.append((v["name"], v["clone_state"],
                    [(c["name"], c["state"], c["delta_extents"]) for c in v["clones"]],
                    {k: r.get(k) for k in ("from", "state", "pending_extents",
                                           "protected_extents", "rate_limit_bytes_per_s")}))
    return out


def test_clone_goes_synchronized_fractured_and_back(live):
    live.cmd("create", name="src", size=SIZE)
    live.write("src", b"a" * EXT, 0)
    live.cmd("clone_create", source="src", name="c1")
    live.wait_clone("c1", "synchronized")
    with pytest.raises(ReadOnly):  # a synchronized clone follows its source
        live.write("c1", b"x" * 4096, 0)
    live.write("src", b"m" * 4096, EXT)  # mirrored
    assert live.read("c1", EXT, 4096) == b"m" * 4096
    live.cmd("clone_fracture", name="c1")
    assert clone_state(live) == "fractured"
    live.write("c1", b"c" * 4096, 2 * EXT)  # writable now, recorded in its delta map
    live.write("src", b"s" * 4096, 3 * EXT)
    live.commit()
    assert read_bitmap(live.state_dir, "c1", "delta") >= {2, 3}
    live.cmd("clone_sync", name="c1")
    live.wait_clone("c1", "synchronized")
    assert live.whole("c1") == live.whole("src")
    live.cmd("clone_delete", name="c1")
    assert live.cmd("status", name="src")["clones"] == []


def test_restore_runs_then_leaves_its_clone_fractured_with_the_hosts_writes(live):
    live.fractured_clone(size=SIZE, data=b"C" * SIZE)
    live.write("src", b"S" * SIZE, 0)
    live.cmd("restore", source="src", clone_name="c1", rate_limit="64K")
    assert clone_state(live) == "restoring" and restore(live)["state"] == "running"
    live.cmd("restore_pause", source="src")
    assert restore(live)["state"] == "paused"
    live.write("src", b"h" * 4096, 5 * EXT)
    live.cmd("restore_resume", source="src")
    assert restore(live)["state"] == "running"
    live.cmd("restore_rate", source="src", limit="0")
    live.wait(lambda: restore(live)["state"] == "done", what="restore done")
    assert clone_state(live) == "fractured"
    live.commit()
    assert read_bitmap(live.state_dir, "c1", "delta") == {5}  # delta := protected
    assert live.read("c1", 5 * EXT, 4096) == b"C" * 4096


def test_unprotected_restore_ends_with_its_clone_synchronized(live):
    live.fractured_clone(size=SIZE, data=b"C" * SIZE)
    live.write("src", b"S" * SIZE, 0)
    live.cmd("restore", source="src", clone_name="c1", protected=False)
    live.wait(lambda: restore(live)["state"] == "done", what="restore done")
    live.wait_clone("c1", "synchronized")
    assert live.whole("src") == b"C" * SIZE == live.whole("c1")


def test_restore_fractures_the_other_clones_and_marks_the_restored_extents(live):
    live.fractured_clone(size=SIZE, data=b"C" * SIZE)
    live.cmd("clone_create", source="src", name="c2")
    live.wait_clone("c2", "synchronized")
    live.write("src", b"S" * EXT, 7 * EXT)
    live.cmd("restore", source="src", clone_name="c1", rate_limit="64K")
    assert clone_state(live, "c2") == "fractured"
    live.commit()
    assert 7 in read_bitmap(live.state_dir, "c2", "delta")
    live.cmd("restore_rate", source="src", limit="0")
    live.wait(lambda: restore(live)["state"] == "done", what="restore done")


def test_refusals_change_nothing(live):
    live.fractured_clone(size=SIZE, data=b"C" * SIZE)
    live.cmd("clone_create", source="src", name="c2")
    live.wait_clone("c2", "synchronized")
    live.cmd("create", name="other", size=SIZE)
    refused(live, "restore", "only a fractured clone", source="src", clone_name="c2")
    refused(live, "restore", "not of other", source="other", clone_name="c1")
    refused(live, "restore_pause", "", source="src")
    refused(live, "clone_create", "exists already", source="src", name="c1")
    refused(live, "delete", "has clones", name="src")
    live.write("src", b"S" * SIZE, 0)
    live.cmd("restore", source="src", clone_name="c1", rate_limit="64K")
    live.cmd("restore_pause", source="src")
    time.sleep(0.3)  # a copy the job started before the pause ends
    refused(live, "restore", "already being restored", source="src", clone_name="c1")
    refused(live, "clone_delete", "running restore", name="c1")
    refused(live, "clone_sync", "restoring", name="c1")
    refused(live, "delete", "being restored", name="src", force=True)
    with pytest.raises(ReadOnly):
        live.write("c1", b"x" * 4096, 0)
    live.cmd("restore_rate", source="src", limit="0")
    live.cmd("restore_resume", source="src")
    live.wait(lambda: restore(live)["state"] == "done", what="restore done")
