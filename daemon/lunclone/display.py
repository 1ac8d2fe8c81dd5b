"""Human-readable views of what the daemon reports (CLI side)."""
from __future__ import annotations

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
    for c in v.get("clones", []):
        lines.append(f"  clone {c['name']}: {c['state']}, {c['delta_extents']} extent(s) differ")
    r = v.get("restore")
    if r:
        lines.append("  " + restore_line(r))
    return "\n".join(lines)


def restore_line(r: dict) -> str:
    done = r["total_extents"] - r["pending_extents"]
    pct = 100.0 * done / r["total_extents"] if r["total_extents"] else 100.0
    eta = f"{r['eta_s']:.0f}s" if r.get("eta_s") is not None else "-"
    return (f"restore from {r['from']}: {r['state']}, {pct:5.1f}% "
            f"({done}/{r['total_extents']} extents, {human_size(r['copied_bytes'])}), "
            f"{human_size(r['rate_bytes_per_s'] or 0)}/s, ETA {eta}, "
            f"{r['protected_extents']} protected")
