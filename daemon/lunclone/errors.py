"""Errors that carry data.

    LuncloneError            code "error"          (errno EIO)
     ├─ InvalidArgument      code "invalid"        (EINVAL)
     ├─ NotFound             code "not-found"      (ENOENT)
     ├─ AlreadyExists        code "exists"         (EEXIST)
     ├─ Busy                 code "busy"           (EBUSY)   in use; try again later
     │   └─ WrongState       code "wrong-state"    (EBUSY)   not in a state that allows it
     ├─ ReadOnly             code "read-only"      (EROFS)
     ├─ NoSpace              code "no-space"       (ENOSPC)
     ├─ MetadataError        code "metadata"       (EIO)
     ├─ SystemFailure        code "os-error"       (the OSError's errno)
     ├─ InternalError        code "internal"       (EIO)      a bug: see the log
     └─ DaemonUnavailable    code "unavailable"    (CLI side only)

Errors of the data path that come from a store stay ``OSError`` (a remote
store's are ``nbdconn.RemoteError``, an OSError), so the plugin passes their
errno on; the control server turns a stray one into ``SystemFailure``.

The control server replies ``{"error": {"code", "message"}}``; the plugin
maps an error to the errno a client sees with ``errno_of``.
"""
from __future__ import annotations

import errno


class LuncloneError(Exception):
    code = "error"
    errno = errno.EIO

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def to_json(self) -> dict:
        return {"code": self.code, "message": self.message}


class InvalidArgument(LuncloneError):
    code = "invalid"
    errno = errno.EINVAL


class NotFound(LuncloneError):
    code = "not-found"
    errno = errno.ENOENT


class AlreadyExists(LuncloneError):
    code = "exists"
    errno = errno.EEXIST


class Busy(LuncloneError):
    code = "busy"
    errno = errno.EBUSY


class WrongState(Busy):
    """The volume, clone or restore is not in a state that allows this
    (a restore runs, the clone is not fractured, ...): status says which."""
    code = "wrong-state"


class ReadOnly(LuncloneError):
    code = "read-only"
    errno = errno.EROFS


class NoSpace(LuncloneError):
    code = "no-space"
    errno = errno.ENOSPC


class MetadataError(LuncloneError):
    code = "metadata"


class SystemFailure(LuncloneError):
    code = "os-error"

    @classmethod
    def of(cls, exc: OSError) -> "SystemFailure":
        e = cls(f"{exc.strerror or exc}")
        if exc.errno:
            e.errno = exc.errno
        return e


class InternalError(LuncloneError):
    code = "internal"


class DaemonUnavailable(LuncloneError):
    code = "unavailable"


_BY_CODE = {cls.code: cls for cls in (
    LuncloneError, InvalidArgument, NotFound, AlreadyExists, Busy, WrongState, ReadOnly,
    NoSpace, MetadataError, SystemFailure, InternalError, DaemonUnavailable)}


def from_json(obj: dict) -> LuncloneError:
    """Rebuild the error a control-server reply carries."""
    cls = _BY_CODE.get(obj.get("code", ""), LuncloneError)
    return cls(obj.get("message", "unknown error"))


def no_space(exc: BaseException, what: str) -> NoSpace | None:
    """The one place a full disk becomes NoSpace: ENOSPC or EDQUOT from a
    system call, or SQLite's SQLITE_FULL ("database or disk is full")."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return NoSpace(f"no space left for {what}: {exc.strerror}")
    if not isinstance(exc, OSError) and "database or disk is full" in str(exc):
        return NoSpace(f"no space left for {what}: {exc}")
    return None


def errno_of(exc: BaseException) -> int:
    """The errno an NBD client should see for ``exc``."""
    if isinstance(exc, LuncloneError):
        return exc.errno
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return errno.EIO
