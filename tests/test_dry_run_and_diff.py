"""See a restore before starting it, and see where a clone differs
(issue 17, item 4): ``restore --dry-run`` and ``clone diff``, against a
real nbdkit, checked against the bytes read over NBD."""
import os
import shutil
import sqlite3

from helpers import EXT, MiB, differing_extents, fractured_clone, whole

SIZE = 16 * MiB + 4096  # the last extent is short: ranges are cut at the end


def _stored(daemon) -> list:
    db = sqlite3.connect(f"file:{os.path.join(daemon.state_dir, 'lunclone.db')}?mode=ro",
                         uri=True)
    try:
        return [db.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall()
                for t in ("volumes", "jobs", "bitmaps")]
    finally:
        db.close()


def _change(src) -> None:
    """Extents 3, 4, 5 (one range), 9 (a partial write) and the short last one."""
    src.pwrite(b"\x11" * 3 * EXT, 3 * EXT)
    src.pwrite(b"\x22" * 4096, 9 * EXT + 8192)
    src.pwrite(b"\x33" * 4096, SIZE - 4096)
    src.flush()


def _ranges_cover(ranges: list[dict], extents: set[int]) -> set[int]:
    """The extents the ranges cover."""
    out = set()
    for r in ranges:
        assert r["length"] > 0 and r["offset"] % EXT == 0
        out |= set(range(r["offset"] // EXT, (r["offset"] + r["length"] - 1) // EXT + 1))
    return out


def test_dry_run_shows_the_copy_and_changes_nothing(daemon):
    src = fractured_clone(daemon, SIZE, 2 * MiB)
    _change(src)
    before = (_stored(daemon), daemon.json("status", "src"))
    plan = daemon.json("restore", "src", "--from", "c1", "--dry-run")
    free = plan.pop("free_bytes")
    assert 0 < free <= shutil.disk_usage(daemon.state_dir).total
    assert plan == {"source": "src", "from": "c1", "protected": True, "extents": 5,
                    "bytes": 4 * EXT + 4096, "undo_bytes": 0}
    plan = daemon.json("restore", "src", "--from", "c1", "--dry-run", "--undo")
    assert plan["undo_bytes"] == 4 * EXT + 4096
    text = daemon.cli("restore", "src", "--from", "c1", "--dry-run", "--undo").stdout
    assert "would copy 5 extents (260.0 KiB) and keep up to 260.0 KiB in its undo image (" in text
    r = daemon.cli("restore", "src", "--from", "c1", "--dry-run", "--undo", "--unprotected",
                   check=False)
    assert r.returncode != 0 and "--undo needs a protected restore" in r.stderr
    text = daemon.cli("restore", "src", "--from", "c1", "--dry-run", "--unprotected").stdout
    assert text.startswith("dry run: an unprotected restore of src from c1 would copy 5 extents"
                           " (260.0 KiB); nothing was changed"), text
    assert (_stored(daemon), daemon.json("status", "src")) == before
    assert daemon.json("status", "src")["restore"] is None


def test_dry_run_refuses_as_the_restore_would(daemon):
    daemon.cli("create", "src", "--size", "4M")
    daemon.cli("create", "other", "--size", "4M")
    daemon.cli("clone", "create", "src", "c1")  # synchronizing or synchronized: not fractured
    before = _stored(daemon)
    for args, words in ((["src", "--from", "c1"], "only a fractured clone"),
                        (["other", "--from", "c1"], "is a clone of src, not of other"),
                        (["src", "--from", "nope"], "no clone named 'nope'"),
                        (["a/b", "--from", "c1"], "invalid name 'a/b'"),
                        (["src", "--from", "c1", "--rate", "fast"], "fast")):
        r = daemon.cli("restore", *args, "--dry-run", check=False)
        assert r.returncode != 0 and words in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert _stored(daemon) == before


def test_clone_diff_is_every_extent_that_differs_over_nbd(daemon):
    src = fractured_clone(daemon, SIZE, 2 * MiB)
    assert daemon.json("clone", "diff", "c1") == []
    _change(src)
    ranges = daemon.json("clone", "diff", "c1")
    assert ranges == [
        {"offset": 3 * EXT, "length": 3 * EXT, "type": 1, "description": "may differ"},
        {"offset": 9 * EXT, "length": EXT, "type": 1, "description": "may differ"},
        {"offset": SIZE // EXT * EXT, "length": 4096, "type": 1, "description": "may differ"}]
    seen = differing_extents(whole(src, SIZE), whole(daemon.connect("c1"), SIZE), EXT)
    assert _ranges_cover(ranges, seen) == seen
    text = daemon.cli("clone", "diff", "c1").stdout
    assert "3 ranges" in text and str(3 * EXT) in text


def test_clone_diff_during_a_restore_is_what_the_host_wrote_since(daemon):
    """The restoring clone: the source shows its data everywhere (copied or
    pending) except where the host wrote since the restore started."""
    src = fractured_clone(daemon, SIZE, 2 * MiB)
    _change(src)
    daemon.cli("restore", "src", "--from", "c1", "--rate", "64K")
    assert daemon.json("clone", "diff", "c1") == []
    src.pwrite(b"\x44" * 4096, 7 * EXT)
    src.flush()
    ranges = daemon.json("clone", "diff", "c1")
    assert ranges == [{"offset": 7 * EXT, "length": EXT, "type": 1,
                       "description": "may differ"}]
    seen = differing_extents(whole(src, SIZE), whole(daemon.connect("c1"), SIZE), EXT)
    assert seen == {7}
