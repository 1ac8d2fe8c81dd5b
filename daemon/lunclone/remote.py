"""A clone on another storage system, reached over NBD with libnbd's async API.

One ``NbdStore`` owns one NBD connection and one I/O thread.  Any thread
(nbdkit's workers, the copy pool) submits requests and waits on them; the
I/O thread keeps up to ``depth`` commands in flight on the connection, so a
copy of many extents pays the network's round trip once, not per request.

One connection, not a pool: an NBD FLUSH covers the writes completed on
its own connection, so with one connection a flush after a copy makes
that copy durable whatever the server says about multi-conn.

Failure model, what a caller sees:
- the server refuses a command: that request fails alone, with its errno;
- the connection is lost (server gone, or a link cut: no reply within
  ``timeout``): every request in flight fails with EIO, and the I/O thread
  reconnects with backoff (``BACKOFF_MIN`` doubling to ``BACKOFF_MAX``).
  While the remote is away, new requests fail at once with EIO instead of
  hanging; ``describe`` shows the state and the last error for ``status``.
Nothing here clears a map bit: the policy and the jobs do that only after
the data call (and, into a remote store, a flush) returned without error.
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

DEFAULT_DEPTH = 16
REQUEST_TIMEOUT = 10.0
CONNECT_TIMEOUT = 10.0
BACKOFF_MIN, BACKOFF_MAX = 0.5, 10.0
CHUNK = 1 << 20  # bytes per NBD request of a copy
MAX_REQUEST = 32 << 20  # the largest request a host may send us (nbdkit block_size)
ZERO_CHUNK = 1 << 30

READ, WRITE, ZERO, FLUSH, STATUS = "read", "write", "zero", "flush", "block-status"
SCHEMES = ("nbd://", "nbds://", "nbd+unix://", "nbds+unix://", "nbd+vsock://", "nbds+vsock://")


class RemoteError(OSError):
    """A request to a remote store failed; errno is what the host gets."""


class _Request:
    __slots__ = ("kind", "offset", "length", "buf", "nbuf", "done", "error", "extents",
                 "deadline", "cookie")

    def __init__(self, kind: str, offset: int = 0, length: int = 0, buf=None):
        self.kind, self.offset, self.length, self.buf = kind, offset, length, buf
        self.nbuf = None
        self.done = threading.Event()
        self.error: tuple[int, str] | None = None
        self.extents: list[int] = []
        self.deadline = 0.0
        self.cookie = 0

    def wait(self) -> "_Request":
        self.done.wait()
        if self.error is not None:
            raise RemoteError(*self.error)
        return self

    def finish(self, err: int = 0, message: str = "") -> None:
        if not self.done.is_set():
            if err:
                self.error = (err, message)
            self.done.set()


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
    """A volume's bytes behind an NBD URI (``nbd://``, ``nbds://``, ``nbd+unix://``)."""

    fd = -1
    path = None

    def __init__(self, name: str, uri: str, size: int, depth: int = DEFAULT_DEPTH,
                 timeout: float = REQUEST_TIMEOUT):
        self.name, self.uri, self.size = name, uri, size
        self.depth = max(1, int(depth))
        self.timeout = timeout
        self.connected = False
        self.error: str | None = None
        self.reconnects = 0
        self._ever_connected = False
        self._lock = threading.Lock()
        self._queue: collections.deque[_Request] = collections.deque()
        self._inflight: dict[int, _Request] = {}
        self._h: nbd.NBD | None = None
        self._can_zero = self._can_flush = self._has_status = False
        self._next_try = 0.0
        self._backoff = BACKOFF_MIN
        self._attempted = threading.Event()  # the first connection attempt ended
        self._stop = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._thread: threading.Thread | None = None
        self._buffers = BufferPool()

    def start(self) -> None:
        """Start the I/O thread (inside nbdkit: only after it forked)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"lunclone-nbd-{self.name}",
                                            daemon=True)
            self._thread.start()

    # -- the caller's side ---------------------------------------------------
    def wait_connected(self, timeout: float = CONNECT_TIMEOUT) -> None:
        """Wait for the first attempt; raise its error if it failed."""
        self._attempted.wait(timeout + 1)
        if not self.connected:
            raise RemoteError(errno.EIO, self.error or f"no answer from {self.uri}")

    def submit(self, req: _Request) -> _Request:
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
        return (f"remote clone {self.name} is unreachable ({self.error}); "
                "retrying with backoff")

    def pread(self, buf, offset: int) -> None:
        view = memoryview(buf)
        reqs = [self.submit(_Request(READ, offset + i, len(view[i:i + CHUNK]),
                                     view[i:i + CHUNK]))
                for i in range(0, len(view), CHUNK)]
        for r in reqs:
            r.wait()

    def pwrite(self, buf, offset: int) -> None:
        view = memoryview(buf)
        reqs = [self.submit(_Request(WRITE, offset + i, len(view[i:i + CHUNK]),
                                     view[i:i + CHUNK]))
                for i in range(0, len(view), CHUNK)]
        for r in reqs:
            r.wait()

    def zero(self, offset: int, length: int) -> None:
        for r in self._zero_requests(offset, length):
            r.wait()

    def _zero_requests(self, offset: int, length: int) -> list[_Request]:
        return [self.submit(_Request(ZERO, offset + i, min(ZERO_CHUNK, length - i)))
                for i in range(0, length, ZERO_CHUNK)]

    def flush(self) -> None:
        self.submit(_Request(FLUSH)).wait()

    def extents(self, offset: int, count: int, one: bool) -> list[tuple[int, int, bool]]:
        """For the clone's own export: all data (the remote keeps its own map)."""
        return [(offset, count, False)]

    def allocation(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """(start, length, reads_as_zero) runs covering the range (block status)."""
        out: list[tuple[int, int, bool]] = []
        pos, end = offset, offset + length
        while pos < end:
            req = self.submit(_Request(STATUS, pos, end - pos)).wait()
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
                pending.append(self.submit(_Request(READ, i, len(buf), buf)))
        failure = None
        for req in pending:
            try:
                req.wait()
                dst.pwrite(req.buf, req.offset)
            except OSError as e:
                failure = failure or e
            finally:
                req.nbuf = None
                self._buffers.put(req.buf)
        if failure is not None:
            raise failure

    def copy_from_file(self, src, offset: int, length: int) -> None:
        """local -> remote: holes become NBD zero requests, data is written
        ``depth`` deep.  The caller flushes (``store.copy_range``)."""
        pending: list[_Request] = []
        pos, end = offset, offset + length
        for start, stop in src.data_ranges(offset, end):
            if start > pos:
                pending += self._zero_requests(pos, start - pos)
            for i in range(start, stop, CHUNK):
                buf = self._buffers.get(min(CHUNK, stop - i))
                src.pread(buf, i)
                pending.append(self.submit(_Request(WRITE, i, len(buf), buf)))
            pos = stop
        if pos < end:
            pending += self._zero_requests(pos, end - pos)
        failure = None
        for req in pending:
            try:
                req.wait()
            except OSError as e:
                failure = failure or e
            finally:
                if req.kind == WRITE:
                    req.nbuf = None
                    self._buffers.put(req.buf)
        if failure is not None:
            raise failure

    def describe(self) -> dict:
        return {"uri": self.uri, "connected": self.connected, "error": self.error,
                "reconnects": self.reconnects, "depth": self.depth,
                "in_flight": len(self._inflight)}

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
        self._can_zero, self._can_flush = h.can_zero(), h.can_flush()
        self._has_status = h.can_meta_context("base:allocation")
        with self._lock:
            self._h = h
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
            try:
                os.read(self._wake_r, 4096)
            except BlockingIOError:
                pass
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
            try:
                cookie = self._start(h, req)
            except nbd.Error as e:
                if h.aio_is_dead() or h.aio_is_closed():
                    with self._lock:
                        self._queue.appendleft(req)
                    self._lost(e.string)
                    return
                req.finish(e.errno or errno.EIO, f"remote clone {self.name}: {e.string}")
                continue
            if cookie is not None and not req.done.is_set():
                req.deadline = time.monotonic() + self.timeout
                req.cookie = cookie
                self._inflight[cookie] = req

    def _start(self, h: nbd.NBD, req: _Request) -> int | None:
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
            req.nbuf = nbd.Buffer.from_buffer(bytearray(req.length))
            return h.aio_pwrite(req.nbuf, req.offset, completion=done)
        if kind == FLUSH:
            if not self._can_flush:
                req.finish()
                return None
            return h.aio_flush(completion=done)
        if not self._has_status:
            req.finish()
            return None
        return h.aio_block_status(req.length, req.offset,
                                  functools.partial(self._extents, req), completion=done)

    @staticmethod
    def _extents(req: _Request, metacontext, offset, entries, err) -> int:
        if metacontext == "base:allocation":
            req.extents = list(entries)
        return 0

    def _complete(self, req: _Request, err) -> int:
        """libnbd's completion callback (I/O thread): retire the command."""
        self._inflight.pop(req.cookie, None)
        code = err.value if hasattr(err, "value") else int(err or 0)
        req.finish(code, f"remote clone {self.name}: {req.kind} at {req.offset} failed: "
                         f"{os.strerror(code)}" if code else "")
        return 1

    def _pump(self) -> None:
        h = self._h
        now = time.monotonic()
        oldest = min((r.deadline for r in self._inflight.values()), default=now + 1.0)
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
            try:
                os.read(self._wake_r, 4096)
            except BlockingIOError:
                pass

    # -- losing the connection --------------------------------------------------
    def _lost(self, reason: str | None) -> None:
        reason = reason or "connection closed"
        log.error("remote clone %s: connection to %s lost: %s", self.name, self.uri, reason)
        self._h = None  # closes the socket; libnbd calls no completion after this
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
