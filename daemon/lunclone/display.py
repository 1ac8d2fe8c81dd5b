"""Human-readable views of what the daemon reports (CLI side)."""
from __future__ import annotations

import click

from .units import human_size


def volume_table(vols: list[dict]) -> str:
    if not vols:
        return "no volumes; create one with 'lunclone create NAME --size SIZE'"
    rows = [("NAME", "SIZE", "EXTENT", "ALLOCATED", "CLONES", "STATE")]
    for v in vols:
        rows.append((v["name"], human_size(v["size"]), human_size(v["extent_size"]),
                     human_size(v["allocated"] or 0), str(len(v["clones"])), _state(v)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _state(v: dict) -> str:
    if v.get("error"):
        return "ERROR"
    if v.get("restore"):
        return f"restoring ({v['restore']['state']})"
    if v.get("source"):
        return f"clone of {v['source']}"
    return "ok"


def status_text(obj) -> str:
    if isinstance(obj, list):
        return volume_table(obj) if not obj else "\n\n".join(status_text(v) for v in obj)
    v = obj
    lines = [f"{v['name']}: {human_size(v['size'])}, extent {human_size(v['extent_size'])}, "
             f"{human_size(v['allocated'] or 0)} allocated, {v['connections']} connection(s)",
             f"  export: {v['export']}"]
    if v.get("error"):
        lines.append(f"  ERROR: {v['error']}")
    if v.get("source"):
        lines.append(f"  clone of {v['source']}")
    if v.get("remote"):
        lines.append(f"  kept on {v['remote']}")
    for c in v.get("clones", []):
        lines.append(f"  clone {c['name']}: {c['state']}, {c['delta_extents']} extent(s) differ"
                     + remote_words(c.get("remote")))
        if c.get("error"):
            lines.append(f"    error: {c['error']}")
    r = v.get("restore")
    if r:
        lines.append("  " + restore_line(r))
    u = v.get("undo")
    if u:
        lines.append("  " + undo_line(u))
    for a in v.get("attached", []):
        lines.append("  " + attached_line(a))
    return "\n".join(lines)


def undo_line(u: dict) -> str:
    what = {"capturing": "being captured", "undoing": "being restored (restore undo)"}.get(
        u["state"], "kept ('lunclone restore undo' goes back to it)")
    return (f"undo image of the restore from {u['from']}: {what}, "
            f"{u['captured_extents']} extent(s), {human_size(u['bytes'])}")


def attached_line(a: dict) -> str:
    how = {"netlink": f"kernel NBD, {a['connections']} connection(s)",
           "fuse-loop": "loop device over nbdfuse"}.get(a["kind"], a["kind"])
    watch = "" if a["kind"] != "netlink" else (
        ", reconnected by its supervisor" if a["supervised"] else ", NO SUPERVISOR: "
        "a daemon restart will fail its I/O")
    state = "" if a["state"] == "attached" else " (GONE: detach it to clean up)"
    return f"attached as {a['device']}: {how}{watch}{state}"


def remote_words(remote: dict | None) -> str:
    """', on URI (connected)' or '(UNREACHABLE: why)' for a remote clone."""
    if not remote:
        return ""
    if remote["connected"]:
        state = f"connected, {remote['connections']} connection(s)"
    else:
        state = f"UNREACHABLE: {remote['error']}"
    again = f", {remote['reconnects']} reconnect(s)" if remote["reconnects"] else ""
    return f", on {remote['uri']} ({state}{again})"


def restore_line(r: dict) -> str:
    done = r["total_extents"] - r["pending_extents"]
    pct = 100.0 * done / r["total_extents"] if r["total_extents"] else 100.0
    eta = f"{r['eta_s']:.0f}s" if r.get("eta_s") is not None else "-"
    what = "undo of the restore from" if r.get("kind") == "undo" else "restore from"
    return (f"{what} {r['from']}: {r['state']}, {pct:5.1f}% "
            f"({done}/{r['total_extents']} extents, {human_size(r['copied_bytes'])}), "
            f"{human_size(r['rate_bytes_per_s'] or 0)}/s, ETA {eta}, "
            f"{r['protected_extents']} protected")


def bar(done: int, total: int, width: int = 30) -> str:
    frac = done / total if total else 1.0
    fill = int(frac * width)
    return "[" + "#" * fill + "-" * (width - fill) + f"] {frac * 100:5.1f}%"


def progress_line(v: dict) -> str:
    """One line of progress for a volume: its restore, else its syncing clones."""
    r = v.get("restore")
    if r and r["state"] != "done":
        done = r["total_extents"] - r["pending_extents"]
        return f"{v['name']} restore {bar(done, r['total_extents'])} " + restore_line(r)
    syncing = [c for c in v.get("clones", []) if c["state"] == "synchronizing"]
    parts = []
    for c in syncing:
        s = c.get("sync", {})
        eta = f"{s['eta_s']:.0f}s" if s.get("eta_s") is not None else "-"
        parts.append(f"clone {c['name']} sync: {c['delta_extents']} extents left, "
                     f"{human_size(s.get('copied_bytes', 0))} copied, "
                     f"{human_size(s.get('rate_bytes_per_s', 0))}/s, ETA {eta}")
    if parts:
        return "; ".join(parts)
    if r:
        return f"{v['name']} " + restore_line(r)
    return f"{v['name']}: idle"


MIN_WAIT_S = 0.02  # a wait answered at once while still busy: look again after this


def busy(v: dict) -> bool:
    """Does a job of the volume still run?  A restore paused on an error
    does not (it waits for 'restore resume'), nor a sync stopped on one; a
    restore paused by the admin does."""
    r = v.get("restore") or {}
    restoring = r.get("state") == "running" or (r.get("state") == "paused" and not r.get("error"))
    return restoring or any(c["state"] == "synchronizing" and not c.get("error")
                            for c in v.get("clones", []))


def follow_restore(client, name: str, forever: bool = False, interval: float = 0.5) -> dict:
    """Draw progress (bar, rate, ETA) until the volume's jobs are done; the
    final status.  The daemon's ``wait`` answers as soon as a job ends (or
    after the time left to the next redraw), so this returns right after
    the end without polling; the line is redrawn every ``interval`` (every
    2 s when stderr is not a terminal).  ``forever``: go on after the end."""
    import sys
    import time
    tty = sys.stderr.isatty()
    every = interval if tty else 2.0
    last_draw = -1e9
    v = client.call("status", name=name)
    while True:
        now = time.monotonic()
        if now - last_draw >= every or not busy(v):
            line = progress_line(v)
            sys.stderr.write("\r\x1b[K" + line if tty else line + "\n")
            sys.stderr.flush()
            last_draw = now
        if not busy(v):
            if not forever:
                if tty:
                    sys.stderr.write("\n")
                return v
            time.sleep(interval)
            v = client.call("status", name=name)
            continue
        left = min(max(every - (time.monotonic() - last_draw), MIN_WAIT_S), 60.0)
        t0 = time.monotonic()
        v = client.call("wait", name=name, timeout=round(left, 3))
        if busy(v) and time.monotonic() - t0 < MIN_WAIT_S:
            time.sleep(MIN_WAIT_S)  # a job about to start (a sync after a restore)


def restore_plan_line(p: dict) -> str:
    """``restore --dry-run``."""
    kind = "a protected" if p["protected"] else "an unprotected"
    undo = (f" and keep up to {human_size(p['undo_bytes'])} in its undo image "
            f"({human_size(p['free_bytes'])} free)" if p.get("undo_bytes") else "")
    return (f"dry run: {kind} restore of {p['source']} from {p['from']} would copy "
            f"{p['extents']} extents ({human_size(p['bytes'])}){undo}; nothing was changed")


def diff_lines(ranges: list[dict]) -> str:
    """``clone diff``: one line per range, as ``nbdinfo --map`` prints them."""
    if not ranges:
        return "no differences"
    total = sum(r["length"] for r in ranges)
    lines = [f"{r['offset']:>16} {r['length']:>16}    {r['type']}  {r['description']}"
             for r in ranges]
    return "\n".join(lines + [f"{len(ranges)} ranges, {human_size(total)} may differ"])


# status --map: letter, meaning, colour on a terminal (by the server's priority)
MAP_LEGEND = {
    "restore": ((">", "in flight", "yellow"), ("#", "pending", "red"),
                ("w", "written by the host (protected)", "blue"), ("+", "copied", "green"),
                (".", "unchanged", None)),
    "clone": (("#", "may differ from its source", "red"), (".", "same", None)),
}


def map_cells(columns: int, lines: int) -> tuple[int, int]:
    """(cells per row, cells) for a terminal of that size: the grid and
    its three lines of header and legend fit it."""
    width = max(8, columns - 1)
    rows = max(1, min(lines - 4, 32))
    return width, width * rows


def extent_map(m: dict, width: int, color: bool, restore: dict | None = None) -> str:
    """The grid of ``status --map`` (``Status.extent_map``), ``width``
    cells a row, a header and a legend; coloured only if ``color``.
    ``restore``: the volume's status of its last restore, if known."""
    if m["kind"] == "none":
        if restore and restore.get("state") == "done":
            return (f"{m['name']}: the restore from {restore['from']} is done: no extent "
                    f"pending, {restore['protected_extents']} written by the host meanwhile")
        return (f"{m['name']}: no restore is running and it is not a clone: no map to "
                "draw ('lunclone status CLONE --map' draws where a clone differs)")
    legend = MAP_LEGEND[m["kind"]]
    colours = {ch: fg for ch, _, fg in legend}

    def paint(text: str) -> str:
        if not color:
            return text
        return "".join(click.style(ch, fg=colours[ch]) if colours.get(ch) else ch for ch in text)
    per, cells = m["extents_per_cell"], m["cells"]
    what = "restore" if m["kind"] == "restore" else "difference"
    head = (f"{m['name']}: {what} map, {len(cells)} cells of {per} extent(s) "
            f"({human_size(per * m['extent_size'])}) each")
    rows = [paint(cells[i:i + width]) for i in range(0, len(cells), width)]
    key = "   ".join(f"{paint(ch)} {words}" for ch, words, _ in legend)
    return "\n".join([head, *rows, key])
