"""One NBD connection to a remote store and the I/O thread that drives it.

Any thread submits a request and waits on it; the I/O thread starts queued
requests with libnbd's async API, up to ``depth`` in flight, and retires
them from libnbd's completion callbacks.  It owns the handle: no other
thread calls libnbd on it, so nothing here needs libnbd's own locking.

Failure model, what a request can see:
- the server refuses a command: that request fails alone, with its errno;
- the connection is lost (server gone, or a link cut: no reply within
  ``timeout``): every request in flight fails with EIO, and the thread
  reconnects with backoff (``BACKOFF_MIN`` doubling to ``BACKOFF_MAX``).
  While the remote is away, new requests fail at once with EIO instead of
  hanging.
- writes that completed on a connection that was then lost before a flush
  covered them may not be durable (the server may drop a dead connection's
  unflushed writes), and a write in flight when it was lost may or may not
  be applied.  Each connection is numbered (``generation``, one more per
  connect) and every request records the generation it went out on; a
  flush can be asked to vouch for one generation (``Request.vouch``) and
  then fails if the connection is no longer that one.  ``lost_unflushed``
  counts the connections lost with writes no flush covered (completed or in
  flight), for callers that cannot name their writes (``remote.NbdStore``).
"""
from __future__ import annotations

import collections
import errno
import functools
import logging
import os
import select
import threading
import time

import nbd

log = logging.getLogger("lunclone.remote")

REQUEST_TIMEOUT = 10.0
CONNECT_TIMEOUT = 10.0
BACKOFF_MIN, BACKOFF_MAX = 0.5, 10.0

READ, WRITE, ZERO, FLUSH, STATUS = "read", "write", "zero", "flush", "block-status"

# The most a ZERO request may cover: a server without zero support gets a
# write of that many zeroes, and libnbd refuses writes over 64 MiB.
MAX_ZERO = 32 << 20
_ZEROES = memoryview(bytearray(MAX_ZERO))  # shared by those writes (only read)


class RemoteError(OSError):
    """A request to a remote store failed; errno is what the host gets."""


class Request:
    """One NBD command: submitted by any thread, finished by the I/O thread."""

    __slots__ = ("kind", "offset", "length", "buf", "nbuf", "done", "error", "extents",
                 "deadline", "cookie", "lane", "gen", "vouch")

    def __init__(self, kind: str, offset: int = 0, length: int = 0, buf=None,
                 vouch: int = 0):
        self.kind, self.offset, self.length, self.buf = kind, offset, length, buf
        self.vouch = vouch  # a FLUSH: the connection generation it must run on (0: any)
        self.lane: "Connection | None" = None  # where it was submitted
        self.gen = 0  # the generation of the connection it went out on
        self.nbuf = None
        self.done = threading.Event()
        self.error: tuple[int, str] | None = None
        self.extents: list[int] = []
        self.deadline = 0.0
        self.cookie = 0

    def wait(self) -> "Request":
        self.done.wait()
        if self.error is not None:
            raise RemoteError(*self.error)
        return self

    def finish(self, err: int = 0, message: str = "") -> None:
        if not self.done.is_set():
            if err:
                self.error = (err, message)
            self.done.set()


class Connection:
    """One connection to an NBD URI (``nbd://``, ``nbds://``, ``nbd+unix://``)."""

    def __init__(self, name: str, uri: str, size: int, depth: int,
                 timeout: float = REQUEST_TIMEOUT):
        self.name, self.uri, self.size = name, uri, size
        self.depth = max(1, int(depth))
        self.timeout = timeout
        self.connected = False
        self.error: str | None = None
        self.reconnects = 0
        self.generation = 0  # one more per connect: which connection a request used
        self.lost_unflushed = 0  # connections lost with writes no flush covered
        self._ever_connected = False
        self._lock = threading.Lock()
        self._queue: collections.deque[Request] = collections.deque()
        self._inflight: dict[int, Request] = {}
        self._starting = 0  # 1 while the I/O thread moves a request from queue to flight
        self._h: nbd.NBD | None = None
        self._can_zero = self._has_status = False
        self._next_try = 0.0
        self._backoff = BACKOFF_MIN
        self._attempted = threading.Event()  # the first connection attempt ended
        self._stop = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._thread: threading.Thread | None = None
        # Flush bookkeeping (I/O thread only): writes completed on this
        # connection and how many of them a completed flush covers.
        self._writes_done = 0
        self._flushed_upto = 0

    def start(self) -> None:
        """Start the I/O thread (inside nbdkit: only after it forked)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"lunclone-nbd-{self.name}",
                                            daemon=True)
            self._thread.start()

    # -- the caller's side ---------------------------------------------------
    def load(self) -> int:
        """Requests queued, being started or in flight: where to send the next one."""
        return len(self._queue) + self._starting + len(self._inflight)

    def in_flight(self) -> int:
        return len(self._inflight)

    def wait_connected(self, timeout: float = CONNECT_TIMEOUT) -> None:
        """Wait for the first attempt; raise its error if it failed."""
        self._attempted.wait(timeout + 1)
        if not self.connected:
            raise RemoteError(errno.EIO, self.error or f"no answer from {self.uri}")

    def submit(self, req: Request) -> Request:
        req.lane = self
        with self._lock:
            if self._stop:
                req.finish(errno.EIO, f"remote clone {self.name}: store closed")
                return req
            if not self.connected and time.monotonic() < self._next_try:
                req.finish(errno.EIO, self._down_message())
                return req
            self._queue.append(req)
        self._poke()
        return req

    def _down_message(self) -> str:
        return (f"remote clone {self.name.split('/')[0]} is unreachable ({self.error}); "
                "retrying with backoff")

    def close(self) -> None:
        with self._lock:
            self._stop = True
        self._poke()
        if self._thread is not None:
            self._thread.join(timeout=CONNECT_TIMEOUT + 5)
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    def _poke(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass

    # -- the I/O thread ------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop:
                if self._h is None:
                    self._reconnect_when_due()
                else:
                    self._issue()
                    self._pump()
        except Exception:
            log.exception("remote clone %s: I/O thread failed", self.name)
            self._lost("internal error in the I/O thread")
        finally:
            self._fail_all(f"remote clone {self.name}: store closed")
            self._h = None
            self._attempted.set()

    def _reconnect_when_due(self) -> None:
        delay = self._next_try - time.monotonic()
        if delay > 0:
            self._fail_queue(self._down_message())
            self._sleep(delay)
            return
        try:
            self._connect()
        except (nbd.Error, OSError, TimeoutError, ValueError) as e:
            msg = getattr(e, "string", None) or str(e)
            self._down(f"connect to {self.uri} failed: {msg}")
        finally:
            self._attempted.set()

    def _connect(self) -> None:
        h = nbd.NBD()
        h.set_uri_allow_local_file(True)
        h.add_meta_context("base:allocation")
        h.aio_connect_uri(self.uri)
        deadline = time.monotonic() + CONNECT_TIMEOUT
        while not h.aio_is_ready():
            if h.aio_is_dead() or h.aio_is_closed():
                raise OSError(errno.ECONNREFUSED, "connection closed during the handshake")
            left = deadline - time.monotonic()
            if left <= 0 or self._stop:
                raise TimeoutError(f"no handshake within {CONNECT_TIMEOUT:.0f} s")
            self._wait_fd(h, min(left, 0.5))
        size = h.get_size()
        if size != self.size:
            raise ValueError(f"the export is {size} bytes, the clone must be {self.size}")
        if h.is_read_only():
            raise ValueError("the export is read-only; a clone must be writable")
        if not h.can_flush():
            raise ValueError("the export does not support flush, so no write to it "
                             "could be known durable")
        self._can_zero = h.can_zero()
        self._has_status = h.can_meta_context("base:allocation")
        with self._lock:
            self._h = h
            self.generation += 1
            self.connected = True
            if self._ever_connected:
                self.reconnects += 1
            self._ever_connected = True
            self.error = None
            self._backoff = BACKOFF_MIN
        log.info("remote clone %s: connected to %s", self.name, self.uri)

    def _wait_fd(self, h: nbd.NBD, timeout: float) -> None:
        """One select round on the connection (and our wake pipe)."""
        fd, direction = h.aio_get_fd(), h.aio_get_direction()
        rd = [self._wake_r] + ([fd] if direction & nbd.AIO_DIRECTION_READ else [])
        wr = [fd] if direction & nbd.AIO_DIRECTION_WRITE else []
        r, w, _ = select.select(rd, wr, [], max(0.0, timeout))
        if self._wake_r in r:
            self._drain_wake()
        if fd in r:
            h.aio_notify_read()
        if fd in w:
            h.aio_notify_write()

    def _issue(self) -> None:
        """Start queued requests, up to ``depth`` in flight."""
        h = self._h
        while len(self._inflight) < self.depth:
            with self._lock:
                if not self._queue:
                    return
                req = self._queue.popleft()
                self._starting = 1
            req.gen = self.generation
            try:
                cookie = self._start(h, req)
            except nbd.Error as e:
                if h.aio_is_dead() or h.aio_is_closed():
                    with self._lock:
                        self._queue.appendleft(req)
                    self._lost(e.string)
                    return
                # nbd.Error.errno is the name ("EINVAL"); errnum is the number.
                req.finish(e.errnum or errno.EIO, f"remote clone {self.name}: {e.string}")
                continue
            else:
                if cookie is not None and not req.done.is_set():
                    req.deadline = time.monotonic() + self.timeout
                    req.cookie = cookie
                    self._inflight[cookie] = req
            finally:
                self._starting = 0

    def _start(self, h: nbd.NBD, req: Request) -> int | None:
        done = functools.partial(self._complete, req)
        kind = req.kind
        if kind == READ:
            req.nbuf = nbd.Buffer.from_buffer(req.buf)
            return h.aio_pread(req.nbuf, req.offset, completion=done)
        if kind == WRITE:
            req.nbuf = nbd.Buffer.from_buffer(req.buf)
            return h.aio_pwrite(req.nbuf, req.offset, completion=done)
        if kind == ZERO:
            if self._can_zero:
                return h.aio_zero(req.length, req.offset, completion=done)
            if req.length > MAX_ZERO:
                req.finish(errno.EINVAL, f"remote clone {self.name}: a zero request "
                                         f"covers at most {MAX_ZERO} bytes")
                return None
            req.nbuf = nbd.Buffer.from_buffer(_ZEROES[:req.length])
            return h.aio_pwrite(req.nbuf, req.offset, completion=done)
        if kind == FLUSH:
            if req.vouch and req.vouch != self.generation:
                req.finish(errno.EIO, f"remote clone {self.name}: the connection was lost "
                                      "before a flush; writes sent on it may not be durable")
                return None
            req.length = self._writes_done  # the writes this flush covers
            return h.aio_flush(completion=done)
        if not self._has_status:
            req.finish()
            return None
        return h.aio_block_status(req.length, req.offset,
                                  functools.partial(self._extents, req), completion=done)

    @staticmethod
    def _extents(req: Request, metacontext, offset, entries, err) -> int:
        if metacontext == "base:allocation":
            req.extents = list(entries)
        return 0

    def _complete(self, req: Request, err) -> int:
        """libnbd's completion callback (I/O thread): retire the command."""
        self._inflight.pop(req.cookie, None)
        code = err.value if hasattr(err, "value") else int(err or 0)
        if not code:
            if req.kind in (WRITE, ZERO):
                self._writes_done += 1
            elif req.kind == FLUSH:
                self._flushed_upto = max(self._flushed_upto, req.length)
        req.finish(code, f"remote clone {self.name}: {req.kind} at {req.offset} failed: "
                         f"{os.strerror(code)}" if code else "")
        return 1

    def _pump(self) -> None:
        h = self._h
        now = time.monotonic()
        # Every request gets the same timeout when it starts, and the dict
        # keeps start order: the first one has the nearest deadline.
        first = next(iter(self._inflight.values()), None)
        oldest = first.deadline if first is not None else now + 1.0
        if oldest <= now:
            self._lost(f"no reply within {self.timeout:.0f} s (link down or server hung)")
            return
        try:
            self._wait_fd(h, min(oldest - now, 1.0))
        except nbd.Error as e:
            self._lost(e.string)
            return
        if h.aio_is_dead() or h.aio_is_closed():
            self._lost("connection closed by the server")

    def _sleep(self, seconds: float) -> None:
        r, _, _ = select.select([self._wake_r], [], [], seconds)
        if r:
            self._drain_wake()

    def _drain_wake(self) -> None:
        try:
            os.read(self._wake_r, 4096)
        except BlockingIOError:
            pass

    # -- losing the connection --------------------------------------------------
    def _lost(self, reason: str | None) -> None:
        reason = reason or "connection closed"
        log.error("remote clone %s: connection to %s lost: %s", self.name, self.uri, reason)
        self._h = None  # closes the socket; libnbd calls no completion after this
        if self._writes_done > self._flushed_upto or any(
                r.kind in (WRITE, ZERO) for r in self._inflight.values()):
            self.lost_unflushed += 1
        self._writes_done = self._flushed_upto = 0
        self._down(f"connection lost: {reason}")

    def _down(self, message: str) -> None:
        with self._lock:
            self.connected = False
            self.error = message
            self._next_try = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, BACKOFF_MAX)
        self._fail_all(self._down_message())

    def _fail_all(self, message: str) -> None:
        inflight, self._inflight = list(self._inflight.values()), {}
        for req in inflight:
            req.finish(errno.EIO, message)
        self._fail_queue(message)

    def _fail_queue(self, message: str) -> None:
        with self._lock:
            queued, self._queue = list(self._queue), collections.deque()
        for req in queued:
            req.finish(errno.EIO, message)
