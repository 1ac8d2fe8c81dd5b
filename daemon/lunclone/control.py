"""The control server: asyncio, JSON lines on a Unix socket (mode 0600).

One connection may send many requests; each is answered in order.  A bad
request fails alone; the connection and the daemon go on.
"""
from __future__ import annotations

import asyncio
import functools
import grp
import inspect
import logging
import os
from typing import Any, Awaitable, Callable

from . import __version__, protocol, units
from .errors import InternalError, InvalidArgument, LuncloneError, SystemFailure
from .jobs import JobKey
from .policy import PAUSED
from .status import SCHEMA_VERSION

log = logging.getLogger("lunclone.control")

MAX_WAIT_S = 60.0  # the longest a ``wait`` holds its connection


class ControlServer:
    def __init__(self, engine, path: str, group: str | None = None):
        self.engine = engine
        self.path = path
        self.group = group
        self._server: asyncio.base_events.Server | None = None
        st = engine.status
        self.commands: dict[str, Callable[..., Any]] = {
            "ping": lambda: {"pid": os.getpid(), "io_flusher": engine.io_flusher,
                             "state_dir": engine.state_dir,
                             "version": __version__, "schema_version": SCHEMA_VERSION},
            "create": _then_status(engine.create_volume, "name", st),
            "delete": _then_deleted(engine.delete_volume),
            "list": st.all,
            "status": self._status,
            "wait": self._wait,
            "clone_create": _then_status(engine.clones.create, "name", st),
            "clone_fracture": _then_status(engine.clones.fracture, "name", st),
            "clone_sync": _then_status(engine.clones.sync, "name", st),
            "clone_delete": _then_deleted(engine.delete_clone),
            "clone_diff": st.clone_diff,
            "map": st.extent_map,
            "restore": _then_status(engine.restores.begin, "source", st),
            "restore_plan": engine.restores.plan,
            "restore_pause": _then_status(engine.restores.pause, "source", st),
            "restore_resume": _then_status(engine.restores.resume, "source", st),
            "restore_rate": _then_status(engine.restores.set_rate, "source", st),
            "restore_forget": _then_status(engine.restores.forget, "source", st),
            "restore_undo": _then_status(engine.restores.undo_begin, "source", st),
            "metrics": self._metrics,
            "shutdown": engine.shutdown,
        }

    def register(self, name: str, fn: Callable[..., Any]) -> None:
        self.commands[name] = fn

    def _metrics(self) -> str:
        from .metrics import render
        return render(self.engine)

    def _status(self, name: str | None = None):
        if name is None:
            return self.engine.status.all()
        return self.engine.status.volume(name)

    async def _wait(self, name: str, timeout: float = 1.0) -> dict:
        """A long poll: the volume's status once a job of its family (its
        restore, its clones' syncs, its own sync if it is a clone) ends or
        stops on an error, or after ``timeout`` seconds; at once if none
        runs.  The CLI's ``--wait`` asks it again every redraw."""
        if (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                or not 0 < timeout <= MAX_WAIT_S):
            raise InvalidArgument(f"timeout must be a number of seconds, more than 0 and at "
                                  f"most {MAX_WAIT_S:g}; got {timeout!r}"[:200])
        units.check_name(name)
        self.engine.volumes.record(name)  # NotFound for an unknown volume
        await self.engine.jobs.wait_any(self._jobs_of(name), timeout)
        return self.engine.status.volume(name)

    def _jobs_of(self, name: str) -> list[JobKey]:
        """The jobs a wait on ``name`` waits for; not a restore paused on
        an error (its task goes on, waiting for 'restore resume')."""
        keys = [JobKey("sync", name)]
        fam = self.engine.families.peek(name)
        if fam is not None:
            with self.engine.status.maps_lock:
                r = fam.restore
                if r is not None and not (r.state == PAUSED and r.error):
                    keys.append(JobKey("restore", name))
                keys += [JobKey("sync", c) for c in fam.clones]
        return keys

    async def start(self) -> None:
        if os.path.exists(self.path):
            os.unlink(self.path)
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(
                self._serve, path=self.path, limit=protocol.MAX_LINE)
        finally:
            os.umask(old)
        if self.group:
            os.chown(self.path, -1, grp.getgrnam(self.group).gr_gid)
            os.chmod(self.path, 0o660)
        else:
            os.chmod(self.path, 0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    writer.write(protocol.encode(
                        {"error": InvalidArgument("request line too long").to_json()}))
                    break
                if not line:
                    break
                writer.write(protocol.encode(await self.handle(line)))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception:
            log.exception("control connection failed")
        finally:
            writer.close()

    async def handle(self, line: bytes) -> dict:
        try:
            cmd, args = protocol.decode_request(line)
            fn = self.commands.get(cmd)
            if fn is None:
                raise InvalidArgument(f"unknown command {cmd!r}")
            try:
                inspect.signature(fn).bind(**args)
            except TypeError as e:
                raise InvalidArgument(f"bad arguments for {cmd}: {e}") from None
            result = fn(**args)
            if isinstance(result, Awaitable):
                result = await result
            return {"ok": result}
        except LuncloneError as e:
            return {"error": e.to_json()}
        except OSError as e:
            log.exception("command failed")
            return {"error": SystemFailure.of(e).to_json()}
        except Exception as e:
            log.exception("command failed")
            return {"error": InternalError(f"internal error: {e!r}").to_json()}


def _then_status(op: Callable[..., Any], name_arg: str, status) -> Callable[..., Any]:
    """An admin command that answers with the named volume's status."""
    @functools.wraps(op)
    async def run(**args):
        result = op(**args)
        if inspect.isawaitable(result):
            await result
        return status.volume(args[name_arg])
    return run


def _then_deleted(op: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(op)
    async def run(**args):
        await op(**args)
        return {"deleted": args["name"]}
    return run
