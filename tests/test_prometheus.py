"""Alerts and dashboard checked by the real tools (issue 18, item 3):
promtool on the rules, their unit tests and a real daemon's metrics; a
real node_exporter reading the textfile the metrics unit writes, scraped
by a real Prometheus on loopback, queried through its HTTP API with every
alert's and every dashboard panel's expression."""
import json
import os
import re
import subprocess
import time
import urllib.parse
import urllib.request

import pytest

from helpers import (MiB, fractured_clone, free_port, wait_clone_state, wait_for,
                     which_or_skip)
from servers import NbdkitFile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RULES = os.path.join(ROOT, "contrib", "prometheus", "lunclone.rules.yml")
RULE_TESTS = os.path.join(ROOT, "contrib", "prometheus", "lunclone.tests.yml")
DASHBOARD = os.path.join(ROOT, "contrib", "grafana", "lunclone.json")
NODE_EXPORTER = "prometheus-node-exporter"  # Debian's name for node_exporter


@pytest.fixture
def promtool():
    which_or_skip(pytest, "promtool")


def busy_daemon(daemon, workdir):
    """A daemon showing every series the rules name: a restore running, a
    remote clone, host I/O (latency samples).  Returns its metrics text and
    the remote server (the caller stops it)."""
    remote = NbdkitFile(os.path.join(workdir, "remote.img"), os.path.join(workdir, "remote.sock"),
                        size=16 * MiB)
    remote.start()
    src = fractured_clone(daemon, 16 * MiB, 2 * MiB)
    daemon.cli("clone", "create", "src", "far", "--remote", remote.uri)
    wait_clone_state(daemon, "src", "far", "synchronized")
    for k in range(64):
        src.pwrite(b"x" * 4096, k * 65536)
        src.pread(4096, k * 65536)
    daemon.cli("restore", "src", "--from", "c1", "--rate", "4K")
    for k in range(200):  # latency samples: one request in 16 is timed
        src.pread(4096, (k % 200) * 65536)
    return remote


def series_in(text: str) -> dict[str, set[frozenset]]:
    """Metric name -> the label-name sets of its samples."""
    out: dict[str, set[frozenset]] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? ", line)
        labels = frozenset(re.findall(r'([a-zA-Z_]+)="', m.group(3) or ""))
        out.setdefault(m.group(1), set()).add(labels)
    return out


def test_rules_pass_promtool_and_their_unit_tests(promtool):
    for argv in (["promtool", "check", "rules", RULES], ["promtool", "test", "rules", RULE_TESTS]):
        r = subprocess.run(argv, capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr


def test_rule_tests_use_series_a_real_daemon_writes(daemon, workdir, promtool):
    """The unit tests' input series have the names and labels of a real
    daemon's output (node_exporter's own series aside), and that output
    passes promtool check metrics."""
    remote = busy_daemon(daemon, workdir)
    try:
        text = daemon.cli("metrics").stdout
    finally:
        remote.stop()
    r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    real = series_in(text)
    with open(RULE_TESTS) as f:
        used = re.findall(r"series: '([a-z_]+)(?:\{(.*?)\})?'", f.read())
    for name, labels in used:
        if name.startswith("node_"):
            continue
        keys = frozenset(re.findall(r'([a-z_]+)="', labels))
        assert name in real, f"{name}: no such series in 'lunclone metrics'"
        assert keys in real[name], f"{name}{{{','.join(sorted(keys))}}}: labels {real[name]}"


def query(port: int, expr: str) -> dict:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.load(r)


def test_prometheus_scrapes_the_textfile_and_runs_every_query(daemon, workdir):
    which_or_skip(pytest, "prometheus", NODE_EXPORTER)
    remote = busy_daemon(daemon, workdir)
    textdir = os.path.join(workdir, "textfile")
    os.makedirs(textdir)
    ne_port, prom_port = free_port(), free_port()
    procs = []
    try:
        def write_metrics() -> None:  # as lunclone-metrics.service does
            tmp = os.path.join(textdir, f"lunclone.prom.{os.getpid()}")
            with open(tmp, "w") as f:
                f.write(daemon.cli("metrics").stdout)
            os.rename(tmp, os.path.join(textdir, "lunclone.prom"))
        write_metrics()
        procs.append(subprocess.Popen(
            [NODE_EXPORTER, f"--web.listen-address=127.0.0.1:{ne_port}",
             "--collector.disable-defaults", "--collector.textfile",
             f"--collector.textfile.directory={textdir}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        config = os.path.join(workdir, "prometheus.yml")
        with open(config, "w") as f:
            f.write("global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
                    f"rule_files: [{RULES}]\n"
                    "scrape_configs:\n  - job_name: node\n"
                    f"    static_configs: [{{targets: ['127.0.0.1:{ne_port}']}}]\n")
        procs.append(subprocess.Popen(
            ["prometheus", f"--config.file={config}", f"--web.listen-address=127.0.0.1:{prom_port}",
             f"--storage.tsdb.path={os.path.join(workdir, 'tsdb')}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

        def up() -> bool:
            try:
                res = query(prom_port, "lunclone_up")["data"]["result"]
            except OSError:
                return False
            return bool(res) and res[0]["value"][1] == "1"
        wait_for(up, 60, what="Prometheus to scrape lunclone_up through node_exporter")
        for _ in range(3):  # a few samples, for rate()
            time.sleep(1.5)
            write_metrics()
        time.sleep(1.5)
        pending = query(prom_port, 'lunclone_restore_pending_extents{source="src"}')
        assert pending["data"]["result"], pending
        mtime = query(prom_port, 'node_textfile_mtime_seconds{file=~".*lunclone.prom"}')
        assert mtime["data"]["result"], "the stale-metrics alert's series is not there"
        with open(RULES) as f:
            alerts = re.findall(r"expr: (\|\n(?:\s{10}.*\n)+|.*)", f.read())
        with open(DASHBOARD) as f:
            panels = [t["expr"] for p in json.load(f)["panels"] for t in p["targets"]]
        for expr in [a.lstrip("|").strip() for a in alerts] + panels:
            r = query(prom_port, expr)
            assert r["status"] == "success", (expr, r)
        for expr in panels:  # every panel draws something from this daemon
            if "on_demand" in expr or "commit_failures" in expr:
                continue
            assert query(prom_port, expr)["data"]["result"], expr
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
        remote.stop()


def test_a_refused_metadata_commit_is_counted(live):
    """What LuncloneMetadataCommitFailing reads: a transaction SQLite
    refuses (the disk full) counts once."""
    import sqlite3

    from lunclone import faults
    from lunclone.metrics import render
    live.cmd("create", name="v", size="1M")

    def full():
        raise sqlite3.OperationalError("database or disk is full")
    faults.arm("metadata.commit", full)
    try:
        with pytest.raises(Exception):
            live.cmd("create", name="w", size="1M")
    finally:
        faults.disarm()
    assert "lunclone_metadata_commit_failures_total 1\n" in render(live.engine)
