"""The control server: asyncio, JSON lines on a Unix socket (mode 0600).

One connection may send many requests; each is answered in order.  A bad
request fails alone; the connection and the daemon go on.
"""
from __future__ import annotations

import asyncio
import grp
import inspect
import logging
import os
from typing import Any, Awaitable, Callable

from . import protocol
from .errors import InvalidArgument, LuncloneError

log = logging.getLogger("lunclone.control")


class ControlServer:
    def __init__(self, engine, path: str, group: str | None = None):
        self.engine = engine
        self.path = path
        self.group = group
        self._server: asyncio.base_events.Server | None = None
        self.commands: dict[str, Callable[..., Any]] = {
            "ping": lambda: {"pid": os.getpid(), "io_flusher": engine.io_flusher},
            "create": engine.create_volume,
            "delete": engine.delete_volume,
            "list": engine.list_volumes,
            "status": self._status,
            "clone_create": engine.lifecycle.create_clone,
            "clone_fracture": engine.lifecycle.fracture,
            "clone_sync": engine.lifecycle.sync,
            "clone_delete": engine.lifecycle.delete_clone,
            "restore": engine.lifecycle.start_restore,
            "restore_pause": engine.lifecycle.pause,
            "restore_resume": engine.lifecycle.resume,
            "restore_rate": engine.lifecycle.set_rate,
            "metrics": self._metrics,
        }

    def register(self, name: str, fn: Callable[..., Any]) -> None:
        self.commands[name] = fn

    def _metrics(self) -> str:
        from .metrics import render
        return render(self.engine)

    def _status(self, name: str | None = None):
        if name is None:
            return self.engine.list_volumes()
        return self.engine.describe(name)

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
            return {"error": {"code": "os-error", "message": f"{e.strerror or e}"}}
        except Exception as e:
            log.exception("command failed")
            return {"error": {"code": "internal", "message": f"internal error: {e!r}"}}
