"""The `lunclone` command line (click).

Everything but `serve` talks to the daemon over its control socket.  An
error prints one line on stderr and exits 1.
"""
from __future__ import annotations

import functools
import json
import os
import sys
import time

import click

from . import display
from .client import Client, run_dir_default
from .errors import LuncloneError

DEFAULT_STATE_DIR = "/var/lib/lunclone"

run_dir_option = click.option(
    "--run-dir", default=run_dir_default, show_default="/run/lunclone or $LUNCLONE_RUN_DIR",
    help="Where the daemon's sockets are.")
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


def handle_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LuncloneError as e:
            click.echo(f"lunclone: error: {e.message}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            sys.exit(130)
    return wrapper


def call(run_dir: str, cmd: str, **args):
    with Client(run_dir) as c:
        return c.call(cmd, **args)


def emit(obj, as_json: bool, human) -> None:
    if as_json:
        click.echo(json.dumps(obj, indent=2, sort_keys=True))
    else:
        click.echo(human(obj))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--run-dir", "group_run_dir", metavar="DIR",
              help="Where the daemon's sockets are (also accepted after the command).")
def main(group_run_dir: str | None) -> None:
    """lunclone: volumes over NBD with clones and instant restore."""
    if group_run_dir:
        os.environ["LUNCLONE_RUN_DIR"] = group_run_dir


@main.command()
@click.option("--state-dir", default=lambda: os.environ.get("LUNCLONE_STATE_DIR", DEFAULT_STATE_DIR),
              show_default="/var/lib/lunclone or $LUNCLONE_STATE_DIR", help="Volumes and metadata.")
@run_dir_option
@click.option("--tcp", metavar="HOST:PORT", help="Serve NBD over TCP instead of the Unix socket.")
@click.option("--group", help="Open the control socket to this group (mode 0660).")
@click.option("--verbose", is_flag=True, help="nbdkit debug output.")
@handle_errors
def serve(state_dir: str, run_dir: str, tcp: str | None, group: str | None, verbose: bool) -> None:
    """Run the daemon (nbdkit with the lunclone plugin) in the foreground."""
    from .serve import exec_daemon
    exec_daemon(state_dir, run_dir, tcp=tcp, verbose=verbose, group=group)


@main.command()
@click.argument("name")
@click.option("--size", required=True, help="Size, e.g. 10G (a multiple of 4096 bytes).")
@click.option("--extent-size", help="Tracking unit, a power of two from 4K to 1M [64K].")
@run_dir_option
@json_option
@handle_errors
def create(name: str, size: str, extent_size: str | None, run_dir: str, as_json: bool) -> None:
    """Create a volume (a sparse file), served at once."""
    info = call(run_dir, "create", name=name, size=size, extent_size=extent_size)
    emit(info, as_json, lambda v: f"created {v['name']}: {v['export']}")


@main.command("list")
@run_dir_option
@json_option
@handle_errors
def list_(run_dir: str, as_json: bool) -> None:
    """List volumes."""
    emit(call(run_dir, "list"), as_json, display.volume_table)


@main.command()
@click.argument("name")
@click.option("--force", is_flag=True, help="Also delete a source that has clones.")
@run_dir_option
@handle_errors
def delete(name: str, force: bool, run_dir: str) -> None:
    """Delete a volume and its file."""
    call(run_dir, "delete", name=name, force=force or None)
    click.echo(f"deleted {name}")


@main.command()
@click.argument("name", required=False)
@run_dir_option
@json_option
@click.option("--watch", is_flag=True, help="Refresh every second until interrupted.")
@click.option("--interval", default=1.0, show_default=True, help="Seconds between refreshes.")
@handle_errors
def status(name: str | None, run_dir: str, as_json: bool, watch: bool, interval: float) -> None:
    """Show volumes, clones and jobs (one volume with NAME)."""
    with Client(run_dir) as c:
        if not watch:
            emit(c.call("status", name=name), as_json, display.status_text)
            return
        while True:
            obj = c.call("status", name=name)
            if as_json:
                click.echo(json.dumps(obj, sort_keys=True))
            else:
                click.echo("\x1b[2J\x1b[H" + display.status_text(obj))
            time.sleep(interval)


if __name__ == "__main__":
    main()
