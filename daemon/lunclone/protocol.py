"""The control protocol: one JSON object per line, parsed in one place.

Request:  {"cmd": "create", "args": {"name": "vol1", "size": "1G"}}
Reply:    {"ok": RESULT}  or  {"error": {"code": "...", "message": "..."}}
"""
from __future__ import annotations

import json

from .errors import InvalidArgument

MAX_LINE = 1 << 20


def encode(obj: dict) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def decode_request(line: bytes) -> tuple[str, dict]:
    try:
        msg = json.loads(line)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidArgument(f"request is not JSON: {e}") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("cmd"), str):
        raise InvalidArgument("request must be an object with a string 'cmd'")
    args = msg.get("args", {})
    if not isinstance(args, dict):
        raise InvalidArgument("'args' must be an object")
    return msg["cmd"], args
