"""The `lunclone` command line (click).

Everything but `serve` talks to the daemon over its control socket.  An
error prints one line on stderr and exits 1.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import sys
import time

import click

from . import display
from .attach import DEFAULT_CONNECTIONS, MAX_CONNECTIONS
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
@click.option("--tls-psk", metavar="FILE", help="With --tcp: TLS with these pre-shared keys.")
@click.option("--tls-certificates", metavar="DIR", help="With --tcp: TLS with these certificates.")
@click.option("--insecure", is_flag=True, help="With --tcp: allow plain TCP without TLS.")
@click.option("--remote-depth", type=click.IntRange(1, 256),
              help="NBD requests kept in flight to each remote clone [32].")
@click.option("--remote-connections", type=click.IntRange(1, 16),
              help="NBD connections to each remote clone [4].")
@click.option("--remote-timeout", type=click.FloatRange(0.5, 600),
              help="Seconds without a reply before a remote connection is dropped "
              "and made again [10].")
@click.option("--verbose", is_flag=True, help="nbdkit debug output.")
@handle_errors
def serve(state_dir: str, run_dir: str, tcp: str | None, group: str | None,
          tls_psk: str | None, tls_certificates: str | None, insecure: bool,
          remote_depth: int | None, remote_connections: int | None,
          remote_timeout: float | None,
          verbose: bool) -> None:
    """Run the daemon (nbdkit with the lunclone plugin) in the foreground."""
    from .serve import exec_daemon
    exec_daemon(state_dir, run_dir, tcp=tcp, verbose=verbose, group=group, tls_psk=tls_psk,
                tls_certificates=tls_certificates, insecure=insecure,
                remote={"remote_depth": remote_depth, "remote_timeout": remote_timeout,
                        "remote_connections": remote_connections})


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
@click.option("--until-done", is_flag=True, help="With --watch and NAME: stop when no job runs.")
@click.option("--map", "draw_map", is_flag=True,
              help="With NAME: draw the volume as a grid: a restore's pending, in-flight, "
                   "copied and host-written extents, or where a clone differs.")
@handle_errors
def status(name: str | None, run_dir: str, as_json: bool, watch: bool, interval: float,
           until_done: bool, draw_map: bool) -> None:
    """Show volumes, clones and jobs (one volume with NAME)."""
    if draw_map:
        if not name:
            raise click.UsageError("--map needs a volume NAME")
        _status_map(name, run_dir, as_json, watch, interval, until_done)
        return
    with Client(run_dir) as c:
        if not watch:
            emit(_with_attachments(c.call("status", name=name), run_dir), as_json,
                 display.status_text)
            return
        if name and not as_json:
            display.follow_restore(c, name, forever=not until_done, interval=interval)
            return
        while True:
            obj = c.call("status", name=name)
            if as_json:
                click.echo(json.dumps(obj, sort_keys=True))
            else:
                click.echo("\x1b[2J\x1b[H" + display.status_text(obj))
            time.sleep(interval)


def _with_attachments(obj, run_dir: str):
    """Each volume object gets ``attached``: the block devices made from it
    on this host (the CLI's records, not the daemon's)."""
    from .attach import attachments
    found = attachments(run_dir)
    for v in obj if isinstance(obj, list) else [obj]:
        v["attached"] = found.get(v["name"], [])
    return obj


def _status_map(name: str, run_dir: str, as_json: bool, watch: bool, interval: float,
                until_done: bool) -> None:
    """``status NAME --map [--watch [--until-done]]``: colours only on a
    terminal and without NO_COLOR (https://no-color.org)."""
    columns, lines = shutil.get_terminal_size((80, 24))
    width, cells = display.map_cells(columns, lines)
    color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    with Client(run_dir) as c:
        while True:  # the last drawing is made after the job's end was seen
            st = c.call("status", name=name)
            going = watch and (not until_done or display.busy(st))
            m = c.call("map", name=name, cells=cells)
            if as_json:
                click.echo(json.dumps(m, sort_keys=True))
            else:
                clear = "\x1b[2J\x1b[H" if watch and sys.stdout.isatty() else ""
                click.echo(clear + display.extent_map(m, width, color, st.get("restore")),
                           color=color)
            if not going:
                return
            time.sleep(interval)


@main.group()
def clone() -> None:
    """Full-copy clones of a volume."""


wait_option = click.option("--wait", is_flag=True,
                           help="Show progress (bar, rate, ETA) until synchronized.")


def _follow_sync(c: Client, clone_name: str, source: str) -> None:
    display.follow_restore(c, source)
    for cl in c.call("status", name=source)["clones"]:
        if cl["name"] == clone_name and cl.get("error"):
            raise LuncloneError(f"clone {clone_name}: {cl['error']}")


@clone.command("create")
@click.argument("source")
@click.argument("name")
@click.option("--remote", metavar="NBD-URI", help="Keep the clone behind this NBD export.")
@wait_option
@run_dir_option
@json_option
@handle_errors
def clone_create(source: str, name: str, remote: str | None, wait: bool, run_dir: str,
                 as_json: bool) -> None:
    """Create clone NAME of SOURCE; it synchronizes in the background."""
    with Client(run_dir) as c:
        info = c.call("clone_create", source=source, name=name, remote=remote)
        emit(info, as_json,
             lambda v: f"clone {name} of {source} created, synchronizing: {v['export']}")
        if wait:
            _follow_sync(c, name, source)


@clone.command("fracture")
@click.argument("name")
@run_dir_option
@json_option
@handle_errors
def clone_fracture(name: str, run_dir: str, as_json: bool) -> None:
    """Make a synchronized clone a point-in-time copy."""
    emit(call(run_dir, "clone_fracture", name=name), as_json,
         lambda v: f"clone {name}: fractured")


@clone.command("sync")
@click.argument("name")
@wait_option
@click.option("--force", is_flag=True,
              help="Also if the clone holds an undo point (the point is dropped).")
@run_dir_option
@json_option
@handle_errors
def clone_sync(name: str, wait: bool, force: bool, run_dir: str, as_json: bool) -> None:
    """Re-synchronize a fractured clone incrementally."""
    with Client(run_dir) as c:
        info = c.call("clone_sync", name=name, force=force or None)
        emit(info, as_json, lambda v: f"clone {name}: synchronizing")
        if wait:
            _follow_sync(c, name, info["source"])


@clone.command("diff")
@click.argument("name")
@run_dir_option
@json_option
@handle_errors
def clone_diff(name: str, run_dir: str, as_json: bool) -> None:
    """Where clone NAME and its source may differ: byte ranges, shaped as
    'nbdinfo --map --json' prints them with --json."""
    emit(call(run_dir, "clone_diff", name=name), as_json, display.diff_lines)


@clone.command("delete")
@click.argument("name")
@click.option("--force", is_flag=True,
              help="Also if the clone holds an undo point (the point is dropped).")
@run_dir_option
@handle_errors
def clone_delete(name: str, force: bool, run_dir: str) -> None:
    """Delete a clone and its file."""
    call(run_dir, "clone_delete", name=name, force=force or None)
    click.echo(f"deleted clone {name}")


class RestoreGroup(click.Group):
    """`restore SOURCE --from CLONE` beside `restore pause|resume|rate SOURCE`.
    Its help shows both forms and the start's options, not only the verbs."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = ["start", *args]
        return super().parse_args(ctx, args)

    def format_usage(self, ctx, formatter) -> None:
        formatter.write_usage(ctx.command_path, "SOURCE --from CLONE [OPTIONS]")
        formatter.write_usage(ctx.command_path, "pause|resume|undo|forget SOURCE | rate SOURCE LIMIT",
                              prefix="       ")

    def format_options(self, ctx, formatter) -> None:
        start = self.commands["start"]
        with click.Context(start, info_name="start", parent=ctx) as sctx:
            rows = [r for p in start.get_params(sctx) if (r := p.get_help_record(sctx))]
        with formatter.section("Options"):
            formatter.write_dl(rows)
        self.format_commands(ctx, formatter)


@main.group(cls=RestoreGroup)
def restore() -> None:
    """Instant restore: lunclone restore SOURCE --from CLONE [--unprotected] [--wait]."""


@restore.command("start", hidden=True)
@click.argument("source")
@click.option("--from", "clone_name", required=True, metavar="CLONE", help="The clone to restore from.")
@click.option("--unprotected", is_flag=True,
              help="Mirror host writes to the clone; it ends synchronized.")
@click.option("--wait", is_flag=True,
              help="Show progress until the restore is done; exit 1 if it pauses on an error.")
@click.option("--rate", metavar="LIMIT", help="Copy at most LIMIT bytes/s (e.g. 100M).")
@click.option("--dry-run", is_flag=True,
              help="Check and show what the restore would copy; change nothing.")
@click.option("--force", is_flag=True,
              help="Start even if SOURCE has an undo point (the point is dropped).")
@click.option("--undo/--no-undo", "keep_undo", default=False,
              help="Keep an undo image: the source's data the restore overwrites, "
                   "captured first (STATE/undo/SOURCE.img).  [default: --no-undo]")
@run_dir_option
@json_option
@handle_errors
def restore_start(source: str, clone_name: str, unprotected: bool, wait: bool,
                  rate: str | None, dry_run: bool, force: bool, keep_undo: bool,
                  run_dir: str, as_json: bool) -> None:
    """Start an instant restore of SOURCE from CLONE."""
    if dry_run:
        plan = call(run_dir, "restore_plan", source=source, clone_name=clone_name,
                    protected=not unprotected, rate_limit=rate, keep_undo=keep_undo,
                    force=force or None)
        emit(plan, as_json, display.restore_plan_line)
        return
    _start_restore(run_dir, source, wait, as_json,
                   f"restore of {source} from {clone_name}", "the clone's data",
                   "restore", dict(source=source, clone_name=clone_name,
                                   protected=not unprotected, rate_limit=rate,
                                   keep_undo=keep_undo, force=force or None))


def _start_restore(run_dir: str, source: str, wait: bool, as_json: bool, what: str,
                   shows: str, cmd: str, args: dict) -> None:
    """Start a restore (or an undo) with control command ``cmd``; say how
    long the start took and what SOURCE shows now, then with ``wait``
    follow it to its end (exit 1 if it pauses on an error)."""
    with Client(run_dir) as c:
        t0 = time.monotonic()
        info = c.call(cmd, **args)
        took = time.monotonic() - t0
        if as_json and not wait:
            emit(info, True, str)
            return
        click.echo(f"{what} started in {took * 1000:.0f} ms: {source} shows {shows} now",
                   err=as_json)
        if wait:
            info = display.follow_restore(c, source)
            if as_json:
                emit(info, True, str)
            _check_restore_ended(info)


class RestorePaused(LuncloneError):
    """``restore --wait``: the restore paused on an error instead of ending."""


def _check_restore_ended(info: dict) -> None:
    r = info.get("restore") or {}
    if r.get("state") == "paused" and r.get("error"):
        name = info["name"]
        raise RestorePaused(f"restore of {name} paused: {r['error']}; "
                            f"'lunclone restore resume {name}' goes on")


def _restore_command(cmd: str, doc: str):
    @click.argument("source")
    @run_dir_option
    @handle_errors
    def command(source: str, run_dir: str) -> None:
        info = call(run_dir, cmd, source=source)
        click.echo(display.restore_line(info["restore"]))
    command.__doc__ = doc
    return command


restore.command("pause")(_restore_command("restore_pause", "Pause the restore of SOURCE."))
restore.command("resume")(_restore_command("restore_resume", "Resume the restore of SOURCE."))


@restore.command("undo")
@click.argument("source")
@click.option("--wait", is_flag=True,
              help="Show progress until the undo is done; exit 1 if it pauses on an error.")
@click.option("--rate", metavar="LIMIT", help="Copy at most LIMIT bytes/s (e.g. 100M).")
@run_dir_option
@json_option
@handle_errors
def restore_undo(source: str, wait: bool, rate: str | None, run_dir: str,
                 as_json: bool) -> None:
    """Go back, instantly, to SOURCE as it was just before its last restore
    (a restore started with --undo): an instant protected restore from its
    undo image and its clone.  The undo point is used up."""
    _start_restore(run_dir, source, wait, as_json, f"undo of the restore of {source}",
                   "its data from before that restore", "restore_undo",
                   dict(source=source, rate_limit=rate))


@restore.command("forget")
@click.argument("source")
@run_dir_option
@handle_errors
def restore_forget(source: str, run_dir: str) -> None:
    """Drop the undo point of SOURCE's finished restore (its undo image)."""
    call(run_dir, "restore_forget", source=source)
    click.echo(f"undo point of {source} dropped")


@restore.command("rate")
@click.argument("source")
@click.argument("limit")
@run_dir_option
@handle_errors
def restore_rate(source: str, limit: str, run_dir: str) -> None:
    """Limit the restore's copy rate to LIMIT bytes/s (0 = unlimited; 50M works)."""
    info = call(run_dir, "restore_rate", source=source, limit=limit)
    click.echo(display.restore_line(info["restore"]))


@main.command()
@run_dir_option
@handle_errors
def metrics(run_dir: str) -> None:
    """Print metrics in the Prometheus text format."""
    click.echo(call(run_dir, "metrics"), nl=False)


@main.command()
@click.option("--timeout", type=float, default=60.0, show_default=True,
              help="Seconds to wait for the daemon to exit.")
@run_dir_option
@handle_errors
def shutdown(timeout: float, run_dir: str) -> None:
    """Stop the daemon without cutting its clients off.

    New connections are refused, each client's requests already sent are
    answered, then the daemon exits.  A device attached with 'lunclone
    attach' waits, and its supervisor reconnects it to the next daemon.
    lunclone.service runs this to stop (a plain SIGTERM would wait for
    every client to disconnect)."""
    released = call(run_dir, "shutdown")["released"]
    deadline = time.monotonic() + timeout
    while os.path.exists(os.path.join(run_dir, "control.sock")):
        if time.monotonic() > deadline:
            raise LuncloneError(f"the daemon did not exit in {timeout:g} s; see its log")
        time.sleep(0.05)
    click.echo(f"stopped; {released} client connection(s) handed back")


@main.command("attach")
@click.argument("name")
@click.argument("device", required=False)
@click.option("--connections", type=click.IntRange(1, MAX_CONNECTIONS),
              default=DEFAULT_CONNECTIONS, show_default=True,
              help="NBD connections the kernel spreads the device's I/O over.")
@click.option("--foreground", is_flag=True,
              help="Supervise the device in this process (the systemd unit's way); "
                   "tells systemd when the device is ready.")
@run_dir_option
@handle_errors
def attach_cmd(name: str, device: str | None, connections: int, foreground: bool,
               run_dir: str) -> None:
    """Attach volume NAME as a block device; prints the device.

    With the kernel's NBD module the device is /dev/nbdX, set up over the
    kernel's netlink interface; a supervisor process reconnects it when
    the daemon restarts, so I/O pauses instead of failing.  Without the
    module, a loop device over nbdfuse (and a warning)."""
    from .attach import attach
    from .engine import notify_systemd
    call(run_dir, "status", name=name)  # a clear error for an unknown volume

    def ready(dev: str) -> None:
        click.echo(dev)
        sys.stdout.flush()
        notify_systemd(b"READY=1")

    attach(run_dir, name, device, connections, foreground, ready=ready,
           warn=lambda text: click.echo(f"warning: {text}", err=True))


@main.command("detach")
@click.argument("device")
@run_dir_option
@handle_errors
def detach_cmd(device: str, run_dir: str) -> None:
    """Detach a block device made by 'lunclone attach'."""
    from .attach import detach
    detach(run_dir, device)
    click.echo(f"detached {device}")


# The examples each --help ends with (help2man makes them the man pages'
# EXAMPLES section: scripts/build_man.py), by command path.
EXAMPLES = {
    "": ["lunclone serve --state-dir /var/lib/lunclone --run-dir /run/lunclone",
         "lunclone create db --size 100G && lunclone attach db",
         "lunclone restore db --from db-snap --wait"],
    "serve": ["lunclone serve",
              "lunclone serve --tcp 0.0.0.0:10809 --tls-psk /etc/lunclone/keys.psk",
              "lunclone serve --group disk --remote-timeout 30"],
    "create": ["lunclone create db --size 100G", "lunclone create big --size 16T --extent-size 1M"],
    "list": ["lunclone list", "lunclone list --json"],
    "delete": ["lunclone delete scratch", "lunclone delete db --force   # and its clones"],
    "status": ["lunclone status", "lunclone status db --json",
               "lunclone status db --map --watch --until-done"],
    "clone": ["lunclone clone create db db-snap --wait && lunclone clone fracture db-snap",
              "lunclone clone sync db-snap", "lunclone clone diff db-snap --json"],
    "clone create": ["lunclone clone create db db-snap --wait",
                     "lunclone clone create db db-far --remote nbds://storage2:10809/db"],
    "clone fracture": ["lunclone clone fracture db-snap"],
    "clone sync": ["lunclone clone sync db-snap --wait"],
    "clone diff": ["lunclone clone diff db-snap", "lunclone clone diff db-snap --json"],
    "clone delete": ["lunclone clone delete db-snap"],
    "restore": ["lunclone restore db --from db-snap --dry-run",
                "lunclone restore db --from db-snap --undo --rate 200M --wait",
                "lunclone restore pause db ; lunclone restore rate db 50M"],
    "restore rate": ["lunclone restore rate db 100M", "lunclone restore rate db 0   # unlimited"],
    "restore pause": ["lunclone restore pause db"],
    "restore resume": ["lunclone restore resume db"],
    "restore forget": ["lunclone restore forget db   # the clone is free to change again"],
    "restore undo": ["lunclone restore undo db   # db as it was before its last restore --undo",
                     "lunclone restore undo db --rate 100M --wait"],
    "metrics": ["lunclone metrics > /var/lib/node_exporter/textfile_collector/lunclone.prom"],
    "attach": ["lunclone attach db", "lunclone attach db /dev/nbd3 --connections 4",
               "lunclone attach db --foreground   # as lunclone-attach@db.service runs it"],
    "detach": ["lunclone detach /dev/nbd0"],
    "shutdown": ["lunclone shutdown", "lunclone shutdown --run-dir /run/lunclone --timeout 30"],
}


def _add_examples() -> None:
    """Each command's help ends with an "Examples:" section (a heading
    like "Options:", which help2man turns into EXAMPLES)."""
    for path, lines in EXAMPLES.items():
        cmd = main
        for word in path.split():
            cmd = cmd.commands[word]

        def format_epilog(ctx, formatter, lines=lines) -> None:
            with formatter.section("Examples"):
                for line in lines:
                    formatter.write_text(line)
        cmd.format_epilog = format_epilog


_add_examples()


def run() -> None:
    """The console script: click's usage errors also become one line."""
    try:
        rv = main(standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as e:
        ctx = getattr(e, "ctx", None)
        where = f"'{ctx.command_path} --help'" if ctx is not None else "'lunclone --help'"
        click.echo(f"lunclone: error: {e.format_message()} (see {where})", err=True)
        sys.exit(e.exit_code)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    run()
