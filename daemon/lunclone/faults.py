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
