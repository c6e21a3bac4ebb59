"""``dirtylog demo``: a VM whose guest keeps writing, migrated live over loopback to a second process."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Any

from rich.markup import escape

from dirtylog.cli.migrate import add_migration_arguments, migrate_with_progress
from dirtylog.cli.options import add_machine_arguments, duration_arg, machine_from_args
from dirtylog.cli.output import console, emit_json
from dirtylog.errors import DirtylogError
from dirtylog.migration import preload
from dirtylog.migration.keys import generate_key_file
from dirtylog.units import format_size


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("demo", help="live-migrate a writing VM to another process over loopback")
    add_machine_arguments(parser, memory="512M", workload="hotset")
    parser.set_defaults(rate=50_000)
    add_migration_arguments(parser)
    parser.set_defaults(downtime_limit=0.05)
    parser.add_argument("--warmup", type=duration_arg, default=1.0, help="run the guest this long first")
    parser.add_argument("--duration", type=duration_arg, default=2.0, help="run the migrated guest this long")
    parser.add_argument("--json", action="store_true",
                        help="JSON lines of both sides (the destination's with \"side\": \"destination\"), then a "
                             "summary")
    parser.set_defaults(func=run, plot=None)


def _relay(stream: IO[str], events: list[dict[str, Any]], address: list[str], ready: threading.Event,
           as_json: bool) -> None:
    """Show the destination's JSON lines (to people, or passed on as JSON), and keep them for the verdict."""
    for line in stream:
        try:
            event = json.loads(line)
        except ValueError:
            console.print(f"[dim]destination:[/dim] {escape(line.rstrip())}")
            continue
        if not isinstance(event, dict):
            continue
        events.append(event)
        if as_json:
            emit_json({"side": "destination", **event})
        kind = event.get("event")
        if kind == "listening":
            address.append(event["address"])
            ready.set()
        elif as_json:
            continue
        elif kind == "running":
            console.print(f"[cyan]destination[/cyan]: guest running, progress {event['progress']:,} pages")
        elif kind == "failed":
            console.print(f"[cyan]destination[/cyan]: [red]{escape(str(event['error']))}[/red]")
    ready.set()


def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="dirtylog-demo-") as folder:
        key_file = str(generate_key_file(Path(folder) / "demo.key"))
        args.key_file = key_file
        def say(text: str) -> None:
            if not args.json:
                console.print(text)

        say("[bold]dirtylog demo[/bold]: two processes on this host, one pre-shared key, loopback TCP")
        destination = subprocess.Popen(
            # --memory: the destination prepares the VM before the source connects, as an operator would.
            [sys.executable, "-m", "dirtylog", "receive", "--listen", "127.0.0.1:0", "--key-file", key_file,
             "--memory", str(args.memory), "--duration", f"{args.duration}s", "--json"],
            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        assert destination.stdout is not None
        events: list[dict[str, Any]] = []
        address: list[str] = []
        ready = threading.Event()
        relay = threading.Thread(target=_relay, args=(destination.stdout, events, address, ready, args.json),
                                 daemon=True)
        relay.start()
        try:
            if not ready.wait(30) or not address:
                raise DirtylogError("the destination process did not start listening")
            args.to = address[0]
            say(f"[cyan]destination[/cyan]: pid {destination.pid} listening on {args.to}")
            with machine_from_args(args, dirty_ring=args.mode == "ring") as machine:
                machine.start()
                say(f"[magenta]source[/magenta]: {args.workload} guest on {args.vcpus} vCPUs, "
                              f"{format_size(args.memory)}, writing {args.rate:,} pages/s per vCPU; "
                              f"migrating after {args.warmup:.1f} s with a {args.downtime_limit * 1e3:.0f} ms "
                              "downtime limit")
                warmup_ends = time.perf_counter() + args.warmup
                preload()  # during the warm-up: the migration's setup is then its connection and handshake
                time.sleep(max(0.0, warmup_ends - time.perf_counter()))
                stats = migrate_with_progress(machine, args)
                paused_progress = machine.progress
            status = destination.wait(timeout=60 + args.duration)
        finally:
            if destination.poll() is None:
                destination.kill()
        relay.join(5)
    final = next((e for e in events if e.get("event") == "completed"), None)
    if stats is None or final is None or status != 0:
        if args.json:
            emit_json({"summary": {"verified": False, "destination_status": status}})
        else:
            console.print("[red bold]demo failed[/red bold]: see the messages above")
        return 1
    if args.json:
        emit_json({"summary": {"verified": True, "digest": final["stats"]["digest"],
                               "downtime_ms": round((stats.downtime or 0) * 1e3, 3),
                               "progress_at_pause": paused_progress, "progress_on_destination": final["progress_now"]}})
        return 0
    console.print(f"[green bold]verified[/green bold]: destination digest {final['stats']['digest']} equals the "
                  f"source's; downtime {stats.downtime * 1e3 if stats.downtime else 0:.1f} ms; the guest's "
                  f"progress went on from {paused_progress:,} (at the pause) to {final['progress_now']:,} pages "
                  "on the destination")
    return 0
