"""Prometheus text format (node_exporter's textfile collector reads it)."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .iopath import LATENCY_BUCKETS, LATENCY_MASK
from .status import CLONE_STATES, RESTORE_STATES

if TYPE_CHECKING:
    from .engine import Engine


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Writer:
    """Samples grouped by family, as the text format requires."""

    def __init__(self) -> None:
        self.families: dict[str, tuple[str, str, list[str]]] = {}

    def metric(self, name: str, kind: str, help_: str, value: float, *,
               family: str | None = None, **labels: str) -> None:
        fam = family or name
        if fam not in self.families:
            self.families[fam] = (kind, help_, [])
        lab = ",".join(f'{k}="{_esc(str(v))}"' for k, v in labels.items())
        self.families[fam][2].append(f"{name}{{{lab}}} {value}" if lab else f"{name} {value}")

    def text(self) -> str:
        out = []
        for fam, (kind, help_, samples) in self.families.items():
            out += [f"# HELP {fam} {help_}", f"# TYPE {fam} {kind}", *samples]
        return "\n".join(out) + "\n"


def render(engine: "Engine") -> str:
    w = Writer()
    w.metric("lunclone_up", "gauge", "1 while the daemon serves.", 1)
    w.metric("lunclone_metadata_commit_failures_total", "counter",
             "Metadata transactions SQLite refused (a full or failing disk): host writes "
             "needing a map bit got errors.", engine.md.commit_failures)
    _state_dir(w, engine.state_dir)
    w.metric("lunclone_io_flusher", "gauge",
             "1 if the daemon runs with PR_SET_IO_FLUSHER (no reclaim deadlock).",
             int(engine.io_flusher))
    for name, vol in sorted(engine.volumes.served.items()):
        _volume(w, name, vol)
        w.metric("lunclone_volume_writeback_failed", "gauge",
                 "1 once an fdatasync of the volume failed (data may be lost; restart "
                 "the daemon).", int(vol.fd >= 0 and vol.fd in engine.committer.failed_fds),
                 volume=name)
    sources = {rec.source for rec in engine.volumes.records.values() if rec.source}
    for src in sorted(sources | set(engine.families.by_source)):  # a clone not loaded too
        for c in engine.status.clones(src):
            for st in CLONE_STATES:
                w.metric("lunclone_clone_state", "gauge", "1 for the clone's current state.",
                         int(c["state"] == st), source=src, clone=c["name"], state=st)
            w.metric("lunclone_clone_error", "gauge",
                     "1 while the clone has an error (a sync stopped, a mirror write failed).",
                     int(bool(c["error"])), source=src, clone=c["name"])
            w.metric("lunclone_clone_delta_extents", "gauge",
                     "Extents that may differ between source and clone.",
                     c["delta_extents"], source=src, clone=c["name"])
            if c.get("remote"):
                _remote(w, src, c["name"], c["remote"])
        r = engine.status.restore(src)
        if r is not None:
            _restore(w, src, r)
    return w.text()


def _volume(w: Writer, name: str, vol) -> None:
    w.metric("lunclone_volume_size_bytes", "gauge", "Volume size.", vol.size, volume=name)
    for op, n, b in (("read", vol.reads, vol.read_bytes), ("write", vol.writes, vol.write_bytes)):
        w.metric("lunclone_requests_total", "counter", "Host requests.", n, volume=name, op=op)
        w.metric("lunclone_request_bytes_total", "counter", "Bytes of host requests.", b,
                 volume=name, op=op)
    h = vol.latency
    fam, help_ = "lunclone_request_latency_seconds", (
        f"Latency of host reads and writes, one request in {LATENCY_MASK + 1} sampled.")
    cum = 0
    for bound, n in zip(LATENCY_BUCKETS, h.counts):
        cum += n
        w.metric(fam + "_bucket", "histogram", help_, cum, family=fam, volume=name,
                 le=repr(bound))
    cum += h.counts[-1]
    w.metric(fam + "_bucket", "histogram", help_, cum, family=fam, volume=name, le="+Inf")
    w.metric(fam + "_sum", "histogram", help_, h.total, family=fam, volume=name)
    w.metric(fam + "_count", "histogram", help_, cum, family=fam, volume=name)


def _state_dir(w: Writer, path: str) -> None:
    """The state directory's filesystem: volumes are sparse files there."""
    try:
        st = os.statvfs(path)
    except OSError:
        return
    w.metric("lunclone_state_dir_size_bytes", "gauge",
             "Size of the state directory's filesystem.", st.f_blocks * st.f_frsize)
    w.metric("lunclone_state_dir_avail_bytes", "gauge",
             "Bytes free for lunclone on the state directory's filesystem.",
             st.f_bavail * st.f_frsize)


def _remote(w: Writer, src: str, clone: str, remote: dict) -> None:
    labels = {"source": src, "clone": clone}
    w.metric("lunclone_remote_connected", "gauge",
             "1 while every connection to a remote clone is up.", int(remote["connected"]),
             **labels)
    w.metric("lunclone_remote_reconnects_total", "counter",
             "Connections to a remote clone made again after a loss.", remote["reconnects"],
             **labels)
    w.metric("lunclone_remote_requests_in_flight", "gauge",
             "NBD requests to a remote clone awaiting a reply.", remote["in_flight"], **labels)


def _restore(w: Writer, src: str, r: dict) -> None:
    labels = {"source": src, "clone": r["from"]}
    for st in RESTORE_STATES:
        w.metric("lunclone_restore_state", "gauge", "1 for the restore's current state.",
                 int(r["state"] == st), state=st, **labels)
    w.metric("lunclone_restore_error", "gauge",
             "1 while the restore is paused on an error ('lunclone restore resume' goes on).",
             int(r["state"] == "paused" and bool(r["error"])), **labels)
    w.metric("lunclone_restore_pending_extents", "gauge", "Extents still to copy.",
             r["pending_extents"], **labels)
    w.metric("lunclone_restore_total_extents", "gauge", "Extents the restore started with.",
             r["total_extents"], **labels)
    w.metric("lunclone_restore_copied_bytes_total", "counter", "Bytes copied clone to source.",
             r["copied_bytes"], **labels)
    w.metric("lunclone_restore_on_demand_extents_total", "counter",
             "Extents copied on demand for host requests.", r["on_demand_extents"], **labels)
    w.metric("lunclone_restore_protected_extents", "gauge",
             "Extents the host wrote during the restore.", r["protected_extents"], **labels)
    w.metric("lunclone_restore_rate_bytes_per_second", "gauge", "Current copy rate.",
             r["rate_bytes_per_s"] or 0, **labels)
