"""A remote clone on another host, over a real network with TLS.

Two hosts made of network namespaces (tests/netns.py): the lunclone daemon
runs in the client namespace, the clone's storage (nbdkit, TLS-PSK) in the
storage namespace; all TCP traffic crosses the veth pair between them.
Create, sync, fracture and a model-checked restore, at 0 and 2 ms of
added round trip, then a link cut in the middle of a restore.
"""
import os
import random
import threading
import time

import nbd
import pytest

from helpers import (EXT, SIZE, Daemon, MiB, clone_state, read_bitmap, restore_status,
                     wait_clone_state, wait_for, wait_restore_done, whole)
from netns import NetworkHosts, unavailable_reason
from workloads import FlushedWriter, Model, host_io_during_restore

PORT = 10809


@pytest.fixture
def net():
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    with NetworkHosts() as hosts:
        yield hosts


@pytest.fixture
def storage(net, workdir):
    """The clone's file on the storage host, served over TLS: (path, uri)."""
    path = os.path.join(workdir, "remote.img")
    with open(path, "wb") as f:
        f.truncate(SIZE)
    uri = net.serve_file_tls(path, PORT, os.path.join(workdir, "keys.psk"))
    return path, uri


@pytest.fixture
def client(net, workdir):
    """The lunclone daemon on the client host."""
    d = Daemon(os.path.join(workdir, "state"), os.path.join(workdir, "run"),
               prefix=net.exec_prefix(net.client_ns)).start()
    yield d
    assert d.stop() == 0, d.log()


def read_quietly(h, offset: int) -> None:
    """One read that may fail (the link is down); the handle goes with it."""
    try:
        h.pread(4096, offset)
    except nbd.Error:
        pass
    del h


def file_content(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def source_with_fractured_remote_clone(d, uri: str, rng, damage: int = 50,
                                       ) -> tuple[bytes, object]:
    """src with data, a remote clone c1 synchronized over the network and
    fractured, then src damaged: (the clone's content, a handle on src)."""
    d.cli("create", "src", "--size", str(SIZE))
    src = d.connect("src")
    for off in range(0, SIZE, MiB):
        if rng.random() < 0.7:
            src.pwrite(rng.randbytes(MiB), off)
    src.flush()
    d.cli("clone", "create", "src", "c1", "--remote", uri)
    wait_clone_state(d, "src", "c1", "synchronized")
    d.cli("clone", "fracture", "c1")
    clone_data = whole(d.connect("c1"), SIZE)
    assert clone_data == whole(src, SIZE)
    for _ in range(damage):
        src.pwrite(rng.randbytes(EXT), rng.randrange(0, SIZE // EXT) * EXT)
    return clone_data, src


@pytest.mark.parametrize("rtt_ms", [0, 2])
def test_restore_from_clone_on_another_host(net, storage, client, rtt_ms):
    """Claims 1-12 with the clone on another host over TLS: every byte of a
    restore with host I/O on four connections matches the model, the
    remote file is untouched, the delta map ends as the host's writes."""
    path, uri = storage
    lat = net.latency(rtt_ms) if rtt_ms else None
    if lat is not None:
        uri = lat.uri
        print(f"\n{rtt_ms} ms round trip added by {lat.how}")
    assert uri.startswith("nbds://")
    rng = random.Random(60 + rtt_ms)
    clone_data, src = source_with_fractured_remote_clone(client, uri, rng)
    assert file_content(path) == clone_data  # the bytes are on the storage host
    client.cli("restore", "src", "--from", "c1", "--rate", "64K")
    model, touched = host_io_during_restore(client, src, clone_data, 600, 60)
    assert file_content(path) == clone_data
    assert read_bitmap(client.state_dir, "c1", "delta") == touched
    client.cli("clone", "sync", "c1")
    wait_clone_state(client, "src", "c1", "synchronized")
    assert file_content(path) == bytes(model)


@pytest.mark.parametrize("cut_s", [4, 13])
def test_link_cut_during_restore(net, storage, client, cut_s):
    """The link to the storage host goes down mid-restore while a writer
    issues flushed writes and checks reads: no acknowledged write is lost,
    the clone is untouched, and the restore completes.  A 4 s cut is
    bridged by TCP; a 13 s one outlasts the 10 s request timeout, so the
    connection is dropped and made again after the link is back."""
    path, uri = storage
    rng = random.Random(77)
    clone_data, src = source_with_fractured_remote_clone(client, uri, rng, damage=400)
    model = Model(clone_data)
    client.cli("restore", "src", "--from", "c1", "--rate", "32K" if cut_s > 10 else "64K")
    # The writer works in the first half; the job still has the second
    # half to copy when the link goes down.
    w = FlushedWriter(client, model, 78, span=SIZE // 2)
    w.start()
    time.sleep(1.0)
    r = restore_status(client, "src")
    assert r["pending_extents"] > 0, f"nothing left to cut into: {r}"
    net.cut()
    t_cut = time.monotonic()
    # A read of the clone's own export is a request to the remote for sure.
    reader = threading.Thread(target=read_quietly, args=(client.connect("c1"), SIZE - EXT))
    reader.start()
    time.sleep(cut_s)
    net.heal()
    reader.join(60)
    print(f"\nlink down for {time.monotonic() - t_cut:.1f} s; remote: "
          f"{clone_state(client, 'src', 'c1')['remote']}")
    time.sleep(1.0)
    w.stop.set()
    w.join(60)
    if w.error:
        raise w.error
    assert w.ops > 0
    wait_for(lambda: clone_state(client, "src", "c1")["remote"]["connected"], 60,
             what="reconnected after the cut")
    if restore_status(client, "src")["state"] == "paused":  # the cut outlasted the retries
        client.cli("restore", "resume", "src")
    client.cli("restore", "rate", "src", "0", check=False)  # unless already done
    wait_restore_done(client, "src")
    bad = model.mismatches(whole(client.connect("src"), SIZE))
    assert not bad, f"{len(bad)} blocks differ from the model, first at {bad[:4]}"
    assert file_content(path) == clone_data
    delta = read_bitmap(client.state_dir, "c1", "delta")
    assert w.touched <= delta <= w.touched | w.uncertain
    reconnects = clone_state(client, "src", "c1")["remote"]["reconnects"]
    print(f"writer: {w.ops} flushed writes kept; reconnects: {reconnects}")
    if cut_s > 10:
        assert reconnects >= 1
