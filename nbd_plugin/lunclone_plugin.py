"""nbdkit plugin for lunclone: a thin adapter onto lunclone's engine.

    nbdkit python lunclone_plugin.py state_dir=DIR run_dir=DIR [socket=PATH]

Holds no rules: every callback calls the engine in one line.  Engine errors
become the errno the client sees in ``_fail``.  ``lunclone serve`` puts the
package on PYTHONPATH, because the embedded interpreter does not see the venv,
and keeps the caller's Python environment away from it (serve.nbdkit_env).
Note: the callback ``open`` shadows the builtin in this file.
"""
import logging
import os
import sys

import nbdkit

API_VERSION = 2
_config = {}
_KEYS = ("state_dir", "run_dir", "socket", "log_level", "control_group", "tcp", "tls",
         "remote_depth", "remote_timeout", "remote_connections")
engine = None
_HOLE = nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO


def _fail(exc):
    from lunclone.errors import errno_of
    nbdkit.set_error(errno_of(exc))
    raise exc


def _refuse(message):
    """A start-up refusal: one line and exit 1.  An exception would reach
    nbdkit, which prints it with its Python traceback.  Only called before
    nbdkit serves: no sockets, no threads yet."""
    sys.stderr.write(f"lunclone: error: {message}\n")
    sys.stderr.flush()
    os._exit(1)


def config(key, value):
    if key not in _KEYS:
        _refuse(f"unknown parameter {key!r}; known: {', '.join(_KEYS)}")
    _config[key] = value


def config_complete():
    global engine
    for key in ("state_dir", "run_dir"):
        if key not in _config:
            _refuse(f"missing parameter {key}=")
    logging.basicConfig(stream=sys.stderr, level=_config.get("log_level", "INFO"),
                        format="lunclone: %(levelname)s %(name)s: %(message)s")
    try:
        from lunclone.engine import Engine
    except ImportError as e:  # e.g. no nbd: nbdkit's Python is not the system's
        _refuse(f"nbdkit's Python ({sys.prefix}) cannot load lunclone: {e}")
    try:
        engine = Engine(_config["state_dir"], _config["run_dir"], _config.get("socket"),
                        control_group=_config.get("control_group"), tcp=_config.get("tcp"),
                        tls=_config.get("tls") == "1",
                        remote_depth=int(_config.get("remote_depth", 0)),
                        remote_timeout=float(_config.get("remote_timeout", 0)),
                        remote_connections=int(_config.get("remote_connections", 0)))
    except Exception as e:  # one clear line, not a traceback
        _refuse(getattr(e, "message", str(e)))


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def after_fork():
    engine.exit_hook = nbdkit.shutdown
    engine.start()


def cleanup():
    if engine is not None:
        engine.stop()


def list_exports(readonly, is_tls):
    return engine.export_names()


def default_export(readonly, is_tls):
    return ""


def open(readonly):
    try:
        return engine.open_export(nbdkit.export_name(), readonly)
    except Exception as e:
        _fail(e)


def close(h):
    engine.close_export(h)


def get_size(h):
    return h.size


def block_size(h):
    return (1, 4096, 32 * 1024 * 1024)


def can_write(h):
    return True


def can_multi_conn(h):
    return True


def can_flush(h):
    return True


def can_trim(h):
    return True


def can_zero(h):
    return True


def can_fast_zero(h):
    return True


def can_fua(h):
    return nbdkit.FUA_NATIVE


def can_extents(h):
    return True


def is_rotational(h):
    return False


def pread(h, buf, offset, flags):
    try:
        h.pread(buf, offset)
    except Exception as e:
        _fail(e)


def pwrite(h, buf, offset, flags):
    try:
        h.pwrite(buf, offset, flags & nbdkit.FLAG_FUA)
    except Exception as e:
        _fail(e)


def flush(h, flags):
    try:
        h.flush()
    except Exception as e:
        _fail(e)


def trim(h, count, offset, flags):
    try:
        h.trim(count, offset, flags & nbdkit.FLAG_FUA)
    except Exception as e:
        _fail(e)


def zero(h, count, offset, flags):
    try:
        h.zero(count, offset, flags & nbdkit.FLAG_FUA, bool(flags & nbdkit.FLAG_MAY_TRIM),
               bool(flags & nbdkit.FLAG_FAST_ZERO))
    except Exception as e:
        _fail(e)


def extents(h, count, offset, flags):
    try:
        return [(o, n, _HOLE if hole else 0)
                for o, n, hole in h.extents(count, offset, flags & nbdkit.FLAG_REQ_ONE)]
    except Exception as e:
        _fail(e)
