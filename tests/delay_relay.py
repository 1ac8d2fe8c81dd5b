#!/usr/bin/env python3
"""A TCP delay line: every byte is forwarded ``--delay-ms`` later, in each direction.

    delay_relay.py --listen ADDR:PORT --connect ADDR:PORT --delay-ms ONE_WAY_MS

Each accepted connection gets its own connection to the target.  In each
direction a reader keeps reading (up to 256 KiB at a time) and queues every
chunk with the time it must leave; a writer sends the chunks in order once
their time has come.  Reading never waits for writing, so this is a delay
line, not stop-and-wait: throughput is not capped by delay / chunk size.
End of stream (half-close) is forwarded with the same delay; a reset on one
side aborts the other.

Timers: the event loop uses select() (microsecond timeouts, where epoll
rounds up to whole milliseconds), and writers wake up early by the measured
median lateness of a 1 ms timer (a VM wakes ~0.1-0.2 ms late), so the
average delay is the one asked.  The relay itself adds ~0.1 ms per direction.

``--listen ADDR:0`` picks a free port.  Once listening, the relay prints
``ready PORT`` on stdout.  SIGHUP re-reads the one-way delay (ms) from
``--delay-file`` if one was given and prints ``delay MS`` (or ``error``).
SIGTERM/SIGINT stop it; ``--exit-with-parent`` also when the parent dies.
"""
from __future__ import annotations

import argparse
import asyncio
import selectors
import signal
import socket
import sys

CHUNK = 256 * 1024
QUEUE_CHUNKS = 4096          # backpressure: stop reading when this many wait


def split_hostport(s: str) -> tuple[str, int]:
    host, _, port = s.rpartition(":")
    return host.strip("[]"), int(port)


async def wakeup_latency(samples: int = 20) -> float:
    """Median lateness of a 1 ms timer here (a VM wakes up ~0.1-0.2 ms late):
    the writers wake up that much early, so the average delay is the one asked."""
    loop = asyncio.get_running_loop()
    late = []
    for _ in range(samples):
        t = loop.time()
        await asyncio.sleep(0.001)
        late.append(loop.time() - t - 0.001)
    late.sort()
    return min(max(late[len(late) // 2], 0.0), 0.0005)


def exit_with_parent() -> None:
    import ctypes
    import os
    parent = os.getppid()
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:          # the parent died before prctl
        sys.exit(1)


class Relay:
    def __init__(self, target: tuple[str, int], delay_s: float, early_s: float = 0.0):
        self.target = target
        self.delay_s = delay_s
        self.early_s = early_s

    @staticmethod
    def _tune(writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        writer.transport.set_write_buffer_limits(high=4 * CHUNK)

    async def handle(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter):
        try:
            sreader, swriter = await asyncio.open_connection(*self.target, limit=CHUNK)
        except OSError:
            cwriter.transport.abort()
            return
        self._tune(cwriter)
        self._tune(swriter)
        abort = asyncio.Event()
        dirs = [asyncio.create_task(self.direction(creader, swriter, abort)),
                asyncio.create_task(self.direction(sreader, cwriter, abort))]
        waiter = asyncio.create_task(abort.wait())
        both = asyncio.gather(*dirs, return_exceptions=True)
        await asyncio.wait([both, waiter], return_when=asyncio.FIRST_COMPLETED)
        clean = both.done() and not abort.is_set() and not any(both.result())
        for t in [*dirs, waiter]:
            t.cancel()
        if clean:                     # both directions reached end of stream
            cwriter.close()
            swriter.close()
        else:                         # a reset or an error: reset the other side too
            cwriter.transport.abort()
            swriter.transport.abort()

    async def direction(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        abort: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue(QUEUE_CHUNKS)

        async def read_side():
            while True:
                try:
                    data = await reader.read(CHUNK)
                except (ConnectionError, OSError):
                    data = None                     # reset: forward it as an abort
                await queue.put((loop.time() + self.delay_s, data))
                if not data:
                    return

        async def write_side():
            while True:
                due, data = await queue.get()
                wait = due - loop.time() - self.early_s
                if wait > 0:
                    await asyncio.sleep(wait)
                if data is None:
                    abort.set()
                    return
                try:
                    if not data:
                        if writer.can_write_eof():
                            writer.write_eof()
                        await writer.drain()
                        return
                    writer.write(data)
                    await writer.drain()
                except (ConnectionError, OSError):
                    abort.set()
                    return

        r = asyncio.create_task(read_side())
        try:
            await write_side()
        finally:
            r.cancel()


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--listen", required=True, help="ADDR:PORT (PORT 0: any free port)")
    ap.add_argument("--connect", required=True, help="ADDR:PORT to forward to")
    ap.add_argument("--delay-ms", type=float, required=True, help="one-way delay")
    ap.add_argument("--delay-file", help="SIGHUP re-reads the one-way delay (ms) from it")
    ap.add_argument("--exit-with-parent", action="store_true",
                    help="exit when the parent process does (Linux PR_SET_PDEATHSIG)")
    args = ap.parse_args()
    if args.exit_with_parent:
        exit_with_parent()

    early = await wakeup_latency()
    print(f"delay_relay: timer wake-up latency {early * 1e6:.0f} us, compensated",
          file=sys.stderr, flush=True)
    relay = Relay(split_hostport(args.connect), args.delay_ms / 1000.0, early)
    host, port = split_hostport(args.listen)
    server = await asyncio.start_server(relay.handle, host, port, limit=CHUNK,
                                        reuse_address=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def reload():
        if not args.delay_file:
            print("error", flush=True)
            return
        try:
            with open(args.delay_file) as f:
                relay.delay_s = float(f.read().strip()) / 1000.0
        except (OSError, ValueError) as e:
            print(f"delay_relay: cannot reload delay: {e}", file=sys.stderr, flush=True)
            print("error", flush=True)
            return
        print(f"delay {relay.delay_s * 1000}", flush=True)
    loop.add_signal_handler(signal.SIGHUP, reload)

    print(f"ready {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    # select() takes its timeout in microseconds, epoll_wait() in whole
    # milliseconds (rounded up): with epoll a 1 ms delay becomes up to 2 ms.
    # The relay has a handful of sockets, so select() costs nothing.
    loop = asyncio.SelectorEventLoop(selectors.SelectSelector())
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
