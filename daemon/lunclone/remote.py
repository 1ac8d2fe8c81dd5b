"""A clone on another storage system, reached over NBD with libnbd's async API.

An ``NbdStore`` spreads requests over a few connections (``nbdconn``), each
with its own I/O thread keeping up to ``depth / connections`` commands in
flight, so a copy of many extents pays the network's round trip once, not
per request, and TLS runs on more than one core.

Durability: an NBD FLUSH covers the writes completed on its own connection
(on all of them only if the server offers multi-conn), and a server may
drop the unflushed writes of a connection that is lost; NBD has no fencing
either, so a write in flight when its connection was lost may be applied
or not.  The rule, per kind of caller:
- a copy (``copy_from_file``) knows its writes: it flushes each connection
  they went out on, and that flush must run on the same connection (the
  same generation, ``nbdconn``) they completed on.  If one of those
  connections was lost first, the copy fails, whatever other flushes did.
- the intent sweep (``sweep_flush``) flushes every connection and fails if
  any connection was lost with unflushed writes since its previous call:
  mirrored writes may have been lost, so no intent bit may be cleared.
- any other flush (the host's, the shutdown's) flushes every connection and
  fails if one was lost with unflushed writes since the previous such flush
  (each loss is reported to one of them, as fsync reports a write error).

Nothing here clears a map bit: the policy and the jobs do that only after
the data call (and, into a remote store, a flush) returned without error.
"""
from __future__ import annotations

import errno
import threading

from . import faults

import nbd

from .nbdconn import (FLUSH, MAX_ZERO, READ, REQUEST_TIMEOUT, STATUS, WRITE, ZERO,
                      Connection, RemoteError, Request)

__all__ = ["NbdStore", "RemoteError", "SCHEMES", "DEFAULT_DEPTH", "DEFAULT_CONNECTIONS",
           "REQUEST_TIMEOUT"]

DEFAULT_DEPTH = 32
DEFAULT_CONNECTIONS = 4
CHUNK = 1 << 20  # bytes per NBD request of a copy
ZERO_CHUNK = MAX_ZERO  # bytes per NBD zero request (its fallback is a write)
STATUS_CHUNK = 1 << 30  # bytes per block status request (NBD lengths are 32-bit)
SCHEMES = ("nbd://", "nbds://", "nbd+unix://", "nbds+unix://", "nbd+vsock://", "nbds+vsock://")


class BufferPool:
    """Reused CHUNK-sized buffers.  A fresh 1 MiB bytearray is a fresh mmap,
    and first touches of fresh memory are slow (on a VM that returns idle
    memory to its host, very slow): a copy reuses the same few buffers."""

    def __init__(self) -> None:
        self._free: list[bytearray] = []
        self._lock = threading.Lock()

    def get(self, n: int) -> memoryview:
        with self._lock:
            buf = self._free.pop() if self._free else bytearray(CHUNK)
        return memoryview(buf)[:n]

    def put(self, view: memoryview) -> None:
        buf = view.obj
        view.release()
        with self._lock:
            if len(self._free) < 256:
                self._free.append(buf)


class NbdStore:
    """A volume's bytes behind an NBD URI, over ``connections`` connections."""

    fd = -1
    path = None

    def __init__(self, name: str, uri: str, size: int, depth: int = DEFAULT_DEPTH,
                 timeout: float = REQUEST_TIMEOUT, connections: int = DEFAULT_CONNECTIONS):
        self.name, self.uri, self.size = name, uri, size
        per_lane = max(1, int(depth) // max(1, connections))
        self.lanes = [Connection(f"{name}/{k}", uri, size, per_lane, timeout)
                      for k in range(max(1, connections))]
        self.depth = per_lane * len(self.lanes)
        self._buffers = BufferPool()
        # ``lost_unflushed`` as the last flush / sweep flush saw it.
        self._flush_seen = self._sweep_seen = 0

    def start(self) -> None:
        for lane in self.lanes:
            lane.start()

    def wait_connected(self) -> None:
        """Wait for the first attempt of every connection; raise its error."""
        for lane in self.lanes:
            lane.wait_connected()

    def submit(self, req: Request) -> Request:
        """To the connected lane with the fewest requests (or the first)."""
        best = None
        for lane in self.lanes:
            if lane.connected and (best is None or lane.load() < best.load()):
                best = lane
        return (best or self.lanes[0]).submit(req)

    @property
    def connected(self) -> bool:
        return all(lane.connected for lane in self.lanes)

    def pread(self, buf, offset: int) -> None:
        self._chunked(READ, buf, offset)

    def pwrite(self, buf, offset: int) -> None:
        if faults.armed is not None:
            faults.hit("remote.write")
        self._chunked(WRITE, buf, offset)

    def _chunked(self, kind: str, buf, offset: int) -> None:
        """One host request as CHUNK-sized NBD requests, all in flight at once."""
        view = memoryview(buf)
        reqs = [self.submit(Request(kind, offset + i, len(part), part))
                for i in range(0, len(view), CHUNK) for part in (view[i:i + CHUNK],)]
        for r in reqs:
            r.wait()

    def zero(self, offset: int, length: int, may_trim: bool = True) -> None:
        for r in self._zero_requests(offset, length):
            r.wait()

    def _zero_requests(self, offset: int, length: int) -> list[Request]:
        return [self.submit(Request(ZERO, offset + i, min(ZERO_CHUNK, length - i)))
                for i in range(0, length, ZERO_CHUNK)]

    @property
    def lost_unflushed(self) -> int:
        """Connections lost so far with writes that no flush covered."""
        return sum(lane.lost_unflushed for lane in self.lanes)

    def flush(self) -> None:
        """Every connection; fails if one was lost with unflushed writes
        since the previous call (see the module docstring)."""
        if faults.armed is not None:
            faults.hit("remote.flush")
        self._flush_checked("_flush_seen", "the previous flush")

    def sweep_flush(self) -> None:
        """The intent sweep's flush: fails if a connection was lost with
        unflushed writes since the previous sweep flush, for those may be
        mirrored writes whose intent bits the sweep is about to clear."""
        self._flush_checked("_sweep_seen", "the previous intent sweep")

    def _flush_checked(self, mark: str, since: str) -> None:
        """Flush every connection, then compare ``lost_unflushed`` with the
        value kept in attribute ``mark`` (and keep the new one)."""
        seen = getattr(self, mark)
        try:
            reqs = [lane.submit(Request(FLUSH)) for lane in self.lanes]
            self._wait_all(reqs)
        finally:
            now = self.lost_unflushed
            setattr(self, mark, now)
        if now != seen:
            raise RemoteError(errno.EIO, f"remote clone {self.name}: a connection was lost "
                                         f"with unflushed writes since {since}; they may "
                                         "not be durable")

    def _flush_writes(self, writes: list[Request]) -> None:
        """Flush each connection these completed writes went out on, on that
        very connection (generation): a flush on a newer one vouches for
        nothing, so the copy fails if one of them was lost."""
        gens: dict[Connection, set[int]] = {}
        for w in writes:
            gens.setdefault(w.lane, set()).add(w.gen)
        if any(len(g) > 1 for g in gens.values()):
            raise RemoteError(errno.EIO, f"remote clone {self.name}: a connection was lost "
                                         "during a copy; its writes may not be durable")
        reqs = [lane.submit(Request(FLUSH, vouch=g.pop())) for lane, g in gens.items()]
        self._wait_all(reqs)

    def extents(self, offset: int, count: int, one: bool) -> list[tuple[int, int, bool]]:
        """For the clone's own export: all data (the remote keeps its own map)."""
        return [(offset, count, False)]

    def allocation(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """(start, length, reads_as_zero) runs covering the range (block status)."""
        out: list[tuple[int, int, bool]] = []
        pos, end = offset, offset + length
        while pos < end:
            # NBD lengths are 32-bit: ask at most STATUS_CHUNK at a time.
            req = self.submit(Request(STATUS, pos, min(end - pos, STATUS_CHUNK))).wait()
            ents = req.extents or [end - pos, 0]
            for k in range(0, len(ents), 2):
                n = min(ents[k], end - pos)
                if n <= 0:
                    break
                out.append((pos, n, bool(ents[k + 1] & nbd.STATE_ZERO)))
                pos += n
        return out

    # -- pipelined copies (store.copy_range) ------------------------------------
    def copy_into_file(self, dst, offset: int, length: int) -> None:
        """remote -> local: zero runs become holes, data is read ``depth`` deep."""
        pending = []
        for start, n, zero in self.allocation(offset, length):
            if zero:
                dst.zero(start, n)
                continue
            for i in range(start, start + n, CHUNK):
                buf = self._buffers.get(min(CHUNK, start + n - i))
                pending.append(self.submit(Request(READ, i, len(buf), buf)))
        self._wait_all(pending, lambda req: dst.pwrite(req.buf, req.offset))

    def copy_from_file(self, src, offset: int, length: int) -> None:
        """local -> remote: holes become NBD zero requests, data is written
        ``depth`` deep, then flushed on the connections that carried it
        (``_flush_writes``): when this returns, the range is durable."""
        pending: list[Request] = []
        pos, end = offset, offset + length
        for start, stop in src.data_ranges(offset, end):
            if start > pos:
                pending += self._zero_requests(pos, start - pos)
            for i in range(start, stop, CHUNK):
                buf = self._buffers.get(min(CHUNK, stop - i))
                src.pread(buf, i)
                pending.append(self.submit(Request(WRITE, i, len(buf), buf)))
            pos = stop
        if pos < end:
            pending += self._zero_requests(pos, end - pos)
        self._wait_all(pending)
        self._flush_writes(pending)

    def _wait_all(self, pending: list[Request], then=None) -> None:
        """Wait for every request (then ``then(req)``), give the buffers
        back, and raise the first failure once all are done."""
        failure = None
        for req in pending:
            try:
                req.wait()
                if then is not None:
                    then(req)
            except OSError as e:
                failure = failure or e
            finally:
                if req.kind in (READ, WRITE):
                    req.nbuf = None
                    self._buffers.put(req.buf)
        if failure is not None:
            raise failure

    def describe(self) -> dict:
        errors = [lane.error for lane in self.lanes if lane.error]
        return {"uri": self.uri, "connected": self.connected,
                "connections": len(self.lanes),
                "connected_connections": sum(lane.connected for lane in self.lanes),
                "error": errors[0] if errors else None,
                "reconnects": sum(lane.reconnects for lane in self.lanes),
                "depth": self.depth,
                "in_flight": sum(lane.in_flight() for lane in self.lanes)}

    def close(self) -> None:
        for lane in self.lanes:
            lane.close()
