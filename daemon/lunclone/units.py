"""Parsing and checking of what admins type: sizes and names."""
from __future__ import annotations

import re

from .errors import InvalidArgument

SECTOR = 4096
MIN_EXTENT = 4 * 1024
MAX_EXTENT = 1024 * 1024
DEFAULT_EXTENT = 64 * 1024
MAX_NAME = 200
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")
_SIZE = re.compile(r"\s*(\d+)\s*([KMGTPE]?)(i?B?)?\s*\Z", re.IGNORECASE)
_SHIFT = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40, "P": 50, "E": 60}


def parse_size(text: str | int) -> int:
    """'10G', '64K', '4096' -> bytes (binary units)."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise InvalidArgument(
            f"cannot parse size {text!r}: use a number with an optional K, M, G or T suffix")
    return int(m.group(1)) << _SHIFT[m.group(2).upper()]


def check_volume_size(size: int) -> int:
    if size <= 0:
        raise InvalidArgument("size must be greater than zero")
    if size % SECTOR:
        raise InvalidArgument(f"size {size} is not a multiple of {SECTOR} bytes")
    if size > 1 << 60:
        raise InvalidArgument(f"size {size} is too large (at most 1 EiB)")
    return size


def check_extent_size(size: int) -> int:
    if size < MIN_EXTENT or size > MAX_EXTENT or size & (size - 1):
        raise InvalidArgument(
            f"extent size {size} must be a power of two from 4K to 1M")
    return size


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name) or len(name) > MAX_NAME:
        shown = name if isinstance(name, str) and len(name) <= 40 else f"{str(name)[:40]}..."
        raise InvalidArgument(
            f"invalid name {shown!r}: use letters, digits, '.', '_' and '-', "
            f"starting with a letter or digit, at most {MAX_NAME} characters")
    return name


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
