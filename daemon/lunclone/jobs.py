"""Background copy jobs on the asyncio loop: synchronize and restore.

Each job walks its map in order from a cursor, takes runs of consecutive
extents, up to ``RUN_EXTENTS`` extents in all (``Family.take_runs`` decides
which: scattered extents go together), has a worker thread copy them in one
call (copy_file_range releases the GIL, so host requests go on meanwhile),
then clears the bits (``Family.finish_runs``).  Extents it had to skip (a
host write in progress, a copy on demand or a capture in flight) are picked
up on the next pass.  A job ends through its ``finish`` hook (the clone or
restore admin) in one metadata transaction.  ``JobRunner`` keeps the running
jobs by ``JobKey``.

While the host is busy with the source (its request counters moved during
a copy), a job takes at most ``HOST_SHARE`` of the time: after each copy it
waits nine times as long as the copy took.  md's resync backs off under
array I/O in the same spirit (down to ``speed_limit_min``); a share of the
time needs no rate to tune, follows the disk's speed, and never starves the
job.  Host requests on extents a job is copying wait for that copy, and a
slower job leaves more extents for copies on demand, which are cheap (a
read takes a pending extent from the clone; see ``policy``).

Throttle, pause and resume apply to every job; a failing copy is retried
``MAX_RETRIES`` times with backoff, then the job pauses with the error in
``status`` and goes on after ``resume``.  A job to or from a remote clone
retries longer (``REMOTE_RETRIES``, about 20 s): its store reconnects in
the meantime, so a short network cut costs a pause, not a manual resume.
"""
from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import functools
import logging
import time
from typing import Callable, Iterable, Literal, NamedTuple

from .bitmap import Bitmap
from .policy import PAUSED, SYNCHRONIZING, Clone, Family, Progress, Restore
from .store import Store, is_remote

log = logging.getLogger("lunclone.jobs")

RUN_EXTENTS = 64
MAX_RUN_BYTES = 8 << 20
CAPTURE_RUN_EXTENTS = 256
CAPTURE_RUN_BYTES = 32 << 20
MAX_RETRIES = 3
REMOTE_RETRIES = 7
MAX_BACKOFF_S = 5.0
REMOTE_WINDOW = 8
LOCAL_WINDOW = 2
IDLE_WAIT = 0.005
HOST_SHARE = 0.1  # of the time a job may copy while the host is busy
MAX_HOST_WAIT_S = 1.0
STOP_POLL_S = 0.02


class Throttle:
    """Sleep so that bytes copied since the limit was set stay under it."""

    def __init__(self) -> None:
        self.limit = 0
        self._t0 = time.monotonic()
        self._bytes = 0

    def set(self, limit: int) -> None:
        self.limit = max(0, int(limit))
        self._t0 = time.monotonic()
        self._bytes = 0

    async def account(self, n: int) -> None:
        if not self.limit:
            return
        self._bytes += n
        ahead = self._bytes / self.limit - (time.monotonic() - self._t0)
        if ahead > 0:
            await asyncio.sleep(ahead)


class CopyJob(abc.ABC):
    """One pass-based copy loop over a map; subclasses say what and where."""

    kind = "copy"

    def __init__(self, family: Family, pool: concurrent.futures.Executor):
        self.family = family
        self.pool = pool
        self.throttle = Throttle()
        self.failures = 0
        self._backoff_until = 0.0
        self.stopped = False
        self.task: asyncio.Task | None = None
        self.on_failure: Callable[[], None] = lambda: None  # JobRunner.run: wakes waiters
        self._copies: set[asyncio.Future] = set()  # copies whose thread has not returned
        self.run_extents = max(1, min(RUN_EXTENTS, MAX_RUN_BYTES >> family.shift))
        self.alone_run_extents = self.run_extents  # unthrottled, the host idle
        self.host_busy = False  # host requests came in during the last copy

    # what a kind of job says ----------------------------------------------
    @abc.abstractmethod
    def active(self) -> bool:
        """Does the job still count?  (Its copies' bits are cleared only then.)"""

    @abc.abstractmethod
    def paused(self) -> bool: ...

    @abc.abstractmethod
    def bitmap(self) -> Bitmap:
        """The map of extents to copy; a bit is cleared once its copy is done."""

    def skip(self) -> Bitmap | None:
        """Extents that need no copy after all (cleared from ``bitmap`` on the way)."""
        return None

    def taken_under(self) -> Restore | None:
        """The restore this job's copies belong to (they capture for it)."""
        return None

    @abc.abstractmethod
    def stores(self) -> tuple[Store, Store]:
        """(copy from, copy to)."""

    @abc.abstractmethod
    def progress(self) -> Progress: ...

    @abc.abstractmethod
    def finish(self) -> bool:
        """The map is empty: end the job in one transaction; False if it
        found work after all (the job goes on)."""

    @abc.abstractmethod
    def failed(self, message: str) -> None:
        """Copies kept failing: stop or pause, with ``message`` in status."""

    async def run(self) -> None:
        """Take runs in map order and copy them, up to ``window()`` at once
        (a remote store needs several in flight to hide its round trip)."""
        cursor = 0
        running: set[asyncio.Task] = set()
        try:
            while self.active():
                if self.paused() or time.monotonic() < self._backoff_until:
                    if running:
                        _, running = await asyncio.wait(running)
                    await asyncio.sleep(0.05)
                    continue
                if len(running) < self.window():
                    with self.family.maps_lock:
                        runs = self.family.take_runs(self.bitmap(), cursor, self._run_limit(),
                                                     self.skip(), self._runs_per_copy())
                        empty = not runs and not self.bitmap().any()
                    if runs:
                        cursor = runs[-1][0] + runs[-1][1]
                        running.add(asyncio.create_task(self._copy(self._start_copy(runs))))
                        continue
                    if not running:
                        if empty and self.finish():
                            return
                        cursor = 0
                        await asyncio.sleep(IDLE_WAIT)
                        continue
                _, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in running:
                t.cancel()
            await asyncio.gather(*running, return_exceptions=True)
            if self._copies:  # the threads: the job ends when its copies have
                await asyncio.wait(self._copies)

    def _start_copy(self, runs: list[tuple[int, int]]) -> asyncio.Future:
        """Copy runs (marked in flight by ``take_runs``) in one call on the
        pool.  They are finished in the future's done callback, on the loop,
        exactly once and only after the thread returned: their bits are
        cleared if every copy succeeded and the job is still active, else
        left set; their extents are released either way, even if the task
        awaiting it is cancelled before it ever ran."""
        fam, bm = self.family, self.bitmap()
        src, dst = self.stores()
        write_back = self.host_busy
        copy = asyncio.get_running_loop().run_in_executor(
            self.pool, fam.copy_runs, src, dst, runs, write_back, self.taken_under())

        def finished(f: asyncio.Future) -> None:
            ok = not f.cancelled() and f.exception() is None and self.active()
            with fam.maps_lock:
                fam.finish_runs(bm, runs, dst, copied=ok, src=src, durable=write_back)
                if ok:
                    self.progress().add(f.result())
        copy.add_done_callback(finished)
        self._copies.add(copy)
        copy.add_done_callback(self._copies.discard)
        return copy

    async def _copy(self, copy: asyncio.Future) -> None:
        """Wait for a copy (never cancelling it: the thread would go on), then
        account for it; a failure is retried on a later pass."""
        seen, began = self._host_requests(), time.monotonic()
        try:
            copied = await asyncio.shield(copy)
        except OSError as e:
            await self._retry_or_pause(e)
            return
        took = time.monotonic() - began
        self.failures = 0
        await self.throttle.account(copied)
        await self._yield_to_host(seen, took)

    def fail(self, message: str) -> None:
        """``failed``, then tell whoever waits for this job (``JobRunner.wait_any``)."""
        self.failed(message)
        self.on_failure()

    def window(self) -> int:
        """Copies at once: one under a rate limit; two for local files (one
        copies while the loop takes the next runs and finishes the last:
        copy_file_range releases the GIL), but one while the host is busy
        (two overlapping copies, each followed by its own wait, would take
        twice ``HOST_SHARE``); several to a remote."""
        if self.throttle.limit:
            return 1
        if self._remote():
            return REMOTE_WINDOW
        return 1 if self.host_busy else LOCAL_WINDOW

    def _runs_per_copy(self) -> int:
        """Runs one worker call copies: many for local files (a thread
        hand-off per scattered extent would cost more than its copy), one
        to or from a remote, whose round trips the window overlaps instead."""
        return 1 if self._remote() else RUN_EXTENTS

    def _remote(self) -> bool:
        """Does this job copy to or from a remote store?"""
        return any(is_remote(s) for s in self.stores())

    def _host_requests(self) -> int:
        """Reads and writes the host sent to the source so far (the
        volume's metrics counters: no cost on the request path)."""
        source = self.family.source
        return source.reads + source.writes

    async def _yield_to_host(self, seen: int, took: float) -> None:
        """If host requests came in during the last copy, wait so that the
        job takes ``HOST_SHARE`` of the time (see the module docstring), at
        most ``MAX_HOST_WAIT_S`` (a copy slowed by a stall says nothing of
        the disk's speed), and no longer than the job counts: an admin
        command that stops it (clone delete, a restore start stopping the
        syncs) waits for its end."""
        self.host_busy = self._host_requests() != seen
        if not self.host_busy:
            await asyncio.sleep(0)
            return
        until = time.monotonic() + min(took * (1 - HOST_SHARE) / HOST_SHARE, MAX_HOST_WAIT_S)
        while self.active() and (left := until - time.monotonic()) > 0:
            await asyncio.sleep(min(left, STOP_POLL_S))

    def _run_limit(self) -> int:
        """Extents per copy: smaller under a rate limit, so the rate stays
        smooth; larger, if the job has them, when neither a limit nor the
        host holds it back (the host's requests on extents in flight wait)."""
        if self.throttle.limit:
            return max(1, min(self.run_extents, (self.throttle.limit // 10) >> self.family.shift))
        return self.run_extents if self.host_busy else self.alone_run_extents

    async def _retry_or_pause(self, e: OSError) -> None:
        """Count a failure (once per backoff period: runs copied at once fail
        together), then back off, or pause the job after too many."""
        if time.monotonic() < self._backoff_until:
            return
        self.failures += 1
        msg = f"copy failed: {e.strerror or e}"
        log.error("%s job on %s: %s (attempt %d)", self.kind, self.family.source.name,
                  msg, self.failures)
        if self.failures >= (REMOTE_RETRIES if self._remote() else MAX_RETRIES):
            self.failures = 0
            self.fail(msg)
        else:
            delay = min(0.1 * 4 ** self.failures, MAX_BACKOFF_S)
            self._backoff_until = time.monotonic() + delay
            await asyncio.sleep(delay)


class SyncJob(CopyJob):
    """source -> clone for the extents in the clone's delta map."""

    kind = "sync"

    def __init__(self, family: Family, clone: Clone, pool, finish: Callable[[Clone], bool]):
        super().__init__(family, pool)
        self.clone = clone
        self._finish = finish

    async def run(self) -> None:
        """Fast-path writes begun while the clone was still synchronized
        (before a mirror failed) may still write into it: they end before
        the first copy, which could otherwise be overtaken by one."""
        with self.family.maps_lock:
            older = self.family.switch_fast()
        for gen in older:
            while gen and self.active():  # (a stopped job copies nothing)
                await asyncio.sleep(0.001)
        await super().run()

    def active(self) -> bool:
        return (not self.stopped and self.clone.state == SYNCHRONIZING
                and self.family.clones.get(self.clone.name) is self.clone)

    def paused(self) -> bool:
        return False

    def bitmap(self) -> Bitmap:
        return self.clone.delta

    def stores(self) -> tuple[Store, Store]:
        return self.family.source.store, self.clone.volume.store

    def progress(self) -> Progress:
        return self.clone.sync_progress

    def finish(self) -> bool:
        return self._finish(self.clone)

    def failed(self, message: str) -> None:
        """Stop; the clone stays synchronizing with the error in status, and
        'lunclone clone sync' starts the job again."""
        self.clone.error = f"{message}; run 'lunclone clone sync {self.clone.name}' to retry"
        self.stopped = True


class RestoreJob(CopyJob):
    """clone -> source for the restore-pending extents not protected."""

    kind = "restore"

    def __init__(self, family: Family, restore: Restore, pool,
                 finish: Callable[[Family], bool],
                 pause: Callable[[Family, Restore, str | None], None]):
        super().__init__(family, pool)
        self.restore = restore
        self._finish = finish
        self._pause = pause
        self.throttle.set(restore.rate_limit)
        if restore.captured is not None:  # each copy's capture costs an fdatasync and a commit
            self.alone_run_extents = max(1, min(CAPTURE_RUN_EXTENTS,
                                                CAPTURE_RUN_BYTES >> family.shift))

    def active(self) -> bool:
        return not self.stopped and self.family.restore is self.restore

    def paused(self) -> bool:
        return self.restore.state == PAUSED

    def bitmap(self) -> Bitmap:
        return self.restore.pending

    def skip(self) -> Bitmap:
        return self.restore.protected

    def taken_under(self) -> Restore:
        return self.restore

    def stores(self) -> tuple[Store, Store]:
        return self.restore.data_source, self.family.source.store

    def progress(self) -> Progress:
        return self.restore.progress

    def finish(self) -> bool:
        return self._finish(self.family)

    def failed(self, message: str) -> None:
        self._pause(self.family, self.restore, message)


def is_running(job: CopyJob | None) -> bool:
    return job is not None and job.task is not None and not job.task.done()


class JobKey(NamedTuple):
    """A job's name: ("sync", clone name) or ("restore", source name)."""
    kind: Literal["sync", "restore"]
    volume: str

    def __str__(self) -> str:
        return f"{self.kind}:{self.volume}"


class JobRunner:
    """The running jobs, one per key, and the thread pool they copy on.
    Copies of local files are bound by the disk; copies to or from a remote
    clone mostly wait on the network: a few threads each."""

    def __init__(self) -> None:
        self.pool = concurrent.futures.ThreadPoolExecutor(16, thread_name_prefix="lunclone-copy")
        self.jobs: dict[JobKey, CopyJob] = {}
        self.loop: asyncio.AbstractEventLoop | None = None  # set by ``start``
        self._waiters: list[tuple[frozenset[JobKey], asyncio.Future]] = []  # wait_any

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def get(self, key: JobKey) -> CopyJob | None:
        return self.jobs.get(key)

    def running(self, key: JobKey) -> bool:
        return is_running(self.jobs.get(key))

    def tasks(self, keys: Iterable[JobKey]) -> list[asyncio.Task]:
        """The tasks of these keys' jobs that still run."""
        return [job.task for job in map(self.jobs.get, keys) if is_running(job)]

    async def wait_any(self, keys: Iterable[JobKey], timeout: float) -> None:
        """Until one of these keys' running jobs ends or fails (a restore
        pauses on an error: its task goes on), or ``timeout`` seconds; at
        once if none runs.  The jobs are awaited, not polled, and never
        cancelled by this wait."""
        keys = frozenset(keys)
        tasks = self.tasks(keys)
        if not tasks:
            return
        failed = self.loop.create_future()
        waiter = (keys, failed)
        self._waiters.append(waiter)
        try:
            await asyncio.wait([*tasks, failed], timeout=timeout,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._waiters.remove(waiter)
            failed.cancel()

    def _failed(self, key: JobKey) -> None:
        for keys, fut in self._waiters:
            if key in keys and not fut.done():
                fut.set_result(None)

    def run(self, key: JobKey, job: CopyJob) -> None:
        """Start ``job`` on the loop under ``key`` (replacing an ended one)."""
        job.on_failure = functools.partial(self._failed, key)
        job.task = self.loop.create_task(self._run(job, key))
        self.jobs[key] = job

    async def _run(self, job: CopyJob, key: JobKey) -> None:
        try:
            await job.run()
        except asyncio.CancelledError:
            raise
        except OSError as e:  # e.g. its finish found a volume whose write-back failed
            log.error("%s job failed: %s", key, e)
            job.fail(e.strerror or str(e))
        except Exception as e:
            log.exception("%s job failed", key)
            job.fail(f"internal error: {e!r}")

    async def end(self, key: JobKey) -> None:
        """Forget a job and wait until it has stopped (its clone is gone)."""
        job = self.jobs.pop(key, None)
        if job is not None and job.task is not None:
            await asyncio.gather(job.task, return_exceptions=True)

    async def close(self) -> None:
        for job in self.jobs.values():
            if job.task is not None:
                job.task.cancel()
        for job in self.jobs.values():
            if job.task is not None:
                try:
                    await job.task
                except (asyncio.CancelledError, Exception):
                    pass
        self.pool.shutdown(wait=True)

