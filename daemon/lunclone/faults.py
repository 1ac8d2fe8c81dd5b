"""Named fault points for tests: pause a thread, fail a call, or crash.

A point costs one module-attribute check when no test arms it, and sits
only on slow paths (admin transactions, copies, commits), never on the
hot path of a host request:

    if faults.armed is not None:
        faults.hit("commit.before_fdatasync")

A test arms a point with an action (``faults.arm(name, fn)``): ``fn`` runs
in the thread that reached the point and may block, raise (an OSError
with an errno, a ``sqlite3.Error``), or kill the process.
"""
from __future__ import annotations

# The points, where they are and what a test can do there:
#   write.bits_committed     a slow-path host write, its map bits committed, data not written
#   copy.data_written        a copy's data written, not yet fdatasync'ed nor its bits cleared
#   commit.before_fdatasync  a group commit with its pages taken, before fdatasync of volumes
#   commit.after_fdatasync   volumes fdatasync'ed, pages not yet written to the database
#   metadata.commit          any transaction, just before SQLite's COMMIT
#   restore.gated            a restore start: gate closed and old writes drained, not committed
#   undo.gated               the same for a 'restore undo' start
#   restore.finish           a restore's end, before its transaction
#   clone.delete_committed   a clone's delete committed, its writes not yet drained
#   remote.write, remote.flush   a write or flush to a remote clone, before it is sent

from typing import Callable

armed: dict[str, Callable[[], None]] | None = None


def hit(point: str) -> None:
    action = (armed or {}).get(point)
    if action is not None:
        action()


def arm(point: str, action: Callable[[], None]) -> None:
    global armed
    armed = {**(armed or {}), point: action}


def disarm(point: str | None = None) -> None:
    """Disarm one point, or every point."""
    global armed
    if point is None or armed is None:
        armed = None
        return
    rest = {k: v for k, v in armed.items() if k != point}
    armed = rest or None
