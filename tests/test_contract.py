"""The JSON contract (issue 18, item 5): every output a tool reads, taken
from a real daemon in every state it can show, validates against
docs/status.schema.json."""
import json
import os
import socket

import jsonschema
import pytest

from helpers import MiB, fractured_clone, wait_clone_state, wait_restore_done
from servers import NbdkitFile

SCHEMA_PATH = os.path.join(os.path.dirname(__file__), "..", "docs", "status.schema.json")


@pytest.fixture(scope="module")
def schema():
    with open(SCHEMA_PATH) as f:
        schema = json.load(f)
    jsonschema.Draft202012Validator.check_schema(schema)
    return schema


def check(schema, name: str, instance) -> None:
    """``instance`` against ``$defs/name`` of the schema."""
    jsonschema.Draft202012Validator({**schema, "$ref": f"#/$defs/{name}"}).validate(instance)


def raw_reply(daemon, line: bytes) -> dict:
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(os.path.join(daemon.run_dir, "control.sock"))
        s.sendall(line)
        return json.loads(s.makefile("rb").readline())
    finally:
        s.close()


def test_every_state_validates(daemon, workdir, schema):
    remote = NbdkitFile(os.path.join(workdir, "remote.img"), os.path.join(workdir, "remote.sock"),
                        size=16 * MiB)
    remote.start()
    try:
        src = fractured_clone(daemon, 16 * MiB, 2 * MiB)
        src.pwrite(b"x" * 4096, 3 * 65536)
        daemon.cli("create", "plain", "--size", "1M")
        daemon.cli("clone", "create", "src", "far", "--remote", remote.uri)
        wait_clone_state(daemon, "src", "far", "synchronized")
        seen = []
        for step in ("fractured", "dry-run", "restoring", "paused", "done"):
            if step == "restoring":
                daemon.cli("restore", "src", "--from", "c1", "--rate", "4K")
            elif step == "paused":
                daemon.cli("restore", "pause", "src")
            elif step == "done":
                daemon.cli("restore", "resume", "src")
                daemon.cli("restore", "rate", "src", "0")
                wait_restore_done(daemon, "src")
            if step == "dry-run":
                check(schema, "restore_plan",
                      daemon.json("restore", "src", "--from", "c1", "--dry-run"))
                continue
            everything = daemon.json("status")
            check(schema, "list", everything)
            check(schema, "list", daemon.json("list"))
            for v in everything:
                check(schema, "status", daemon.json("status", v["name"]))
            check(schema, "clone_diff", daemon.json("clone", "diff", "c1"))
            for name in ("src", "c1", "plain"):
                check(schema, "extent_map", daemon.json("status", name, "--map"))
            st = daemon.json("status", "src")
            seen.append((st["restore"] or {}).get("state"))
            assert {c["name"]: bool(c["remote"]) for c in st["clones"]} == {"c1": False,
                                                                            "far": True}
        assert seen == [None, "running", "paused", "done"]
    finally:
        remote.stop()


def test_control_replies_validate(daemon, schema):
    from lunclone.client import Client
    with Client(daemon.run_dir) as c:
        ping = c.call("ping")
    check(schema, "ping", ping)
    daemon.cli("create", "v", "--size", "1M")
    for line in (b'{"cmd": "ping"}\n', b'{"cmd": "status", "args": {"name": "v"}}\n',
                 b'{"cmd": "status", "args": {"name": "nope"}}\n', b'not json\n',
                 b'{"cmd": "create", "args": {"name": "a/b", "size": "1M"}}\n'):
        reply = raw_reply(daemon, line)
        check(schema, "reply", reply)
    assert raw_reply(daemon, b'{"cmd": "status", "args": {"name": "v"}}\n')["ok"][
        "schema_version"] == schema["$defs"]["volume"]["properties"]["schema_version"]["const"]


def test_the_version_is_the_packages():
    import tomllib

    import lunclone
    with open(os.path.join(os.path.dirname(SCHEMA_PATH), "..", "pyproject.toml"), "rb") as f:
        assert tomllib.load(f)["project"]["version"] == lunclone.__version__


def test_the_schema_refuses_a_renamed_field_or_an_unknown_state(daemon, schema):
    """The checks above can fail: a field renamed, a state that is not one."""
    fractured_clone(daemon, 4 * MiB, MiB)
    st = daemon.json("status", "src")
    check(schema, "status", st)
    renamed = {("clone_list" if k == "clones" else k): v for k, v in st.items()}
    with pytest.raises(jsonschema.ValidationError):
        check(schema, "status", renamed)
    st["clones"][0]["state"] = "mirroring"
    with pytest.raises(jsonschema.ValidationError):
        check(schema, "status", st)
