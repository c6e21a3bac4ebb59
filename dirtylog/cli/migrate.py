"""``dirtylog keygen``, ``dirtylog receive`` and ``dirtylog migrate``: live migration between processes and hosts."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from typing import Any

from rich.markup import escape

from dirtylog.cli.options import (
    add_machine_arguments,
    duration_arg,
    machine_from_args,
    positive_duration_arg,
    positive_int,
    positive_rate_arg,
    size_arg,
    whole_number,
)
from dirtylog.cli.output import RowPrinter, console, emit_json, error_console, key_value_table
from dirtylog.cli.plots import PlotError, plot_series
from dirtylog.cli.plots import plot_faults as draw_faults
from dirtylog.cli.serve import add_qmp_argument, serve_incoming
from dirtylog.guest.machine import State
from dirtylog.machine import TRACKING_MODES, Machine
from dirtylog.migration import (
    Listener,
    MigrationError,
    MigrationParameters,
    MigrationStats,
    migrate,
    preload,
    receive,
)
from dirtylog.migration.keys import KeyFileError, generate_key_file, load_key
from dirtylog.migration.policy.parameters import MAX_STREAMS
from dirtylog.migration.transports import parse_endpoint
from dirtylog.units import PAGE_SIZE, format_duration, format_size


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keygen = subparsers.add_parser("keygen", help="write a fresh pre-shared key file (mode 0600) for migrations")
    keygen.add_argument("file", help="where to write the key; copy it to both hosts")
    keygen.add_argument("--force", action="store_true", help="replace an existing file")
    keygen.add_argument("--json", action="store_true", help="one JSON object: the file written")
    keygen.set_defaults(func=run_keygen)

    recv = subparsers.add_parser("receive", help="wait for one live migration, verify it, and run the VM")
    recv.add_argument("--listen", default=None,
                      help="where: host:port (default 127.0.0.1:7000; loopback unless you name another host), "
                           "unix:PATH, or file:PATH to load a stream `migrate --to file:PATH` wrote; with --qmp the "
                           "default is to wait for QMP's migrate-incoming (QEMU's -incoming defer)")
    recv.add_argument("--key-file", help="pre-shared key file (dirtylog keygen); required unless --qmp, where "
                      "migrate-set-parameters x-dirtylog-key-file can give it")
    recv.add_argument("--memory", type=size_arg, default=None,
                      help="accept only guests of this memory size, and prepare their VM before any source connects")
    recv.add_argument("--max-memory", type=size_arg, default=None,
                      help="without --memory: the largest guest a source may send (default: half of this host's RAM)")
    recv.add_argument("--handshake-timeout", type=positive_duration_arg, default=5.0,
                      help="a connection must authenticate within this, or is refused (default 5s)")
    recv.add_argument("--duration", type=duration_arg, default=2.0,
                      help="after the migration, run the guest this long to show it continues (default 2s)")
    recv.add_argument("--timeout", type=positive_duration_arg, default=30.0,
                      help="give up when the source is silent this long")
    recv.add_argument("--accept-timeout", type=positive_duration_arg, default=None,
                      help="give up if no source connects")
    recv.add_argument("--resume", metavar="ADDRESS", default=None,
                      help="after a broken link in post-copy, listen here for the source to resume (default: where "
                           "--listen listens, which stays open)")
    recv.add_argument("--resume-timeout", type=positive_duration_arg, default=None,
                      help="after a broken link in post-copy, wait this long for the source to resume (default: as "
                           "long as the process lives: the VM is lost if nothing resumes it)")
    recv.add_argument("--fault-path", choices=("compiled", "python"), default="compiled",
                      help="post-copy's faults: compiled (default: read, asked for and installed with no Python "
                           "between a fault and its page) or python (the same, in the interpreter, to compare)")
    recv.add_argument("--json", action="store_true", help="JSON lines for machines")
    recv.add_argument("--plot", metavar="FILE.png", help="draw post-copy's page faults over time and their latencies")
    add_qmp_argument(recv, "run the received VM (--duration does not apply)")
    recv.set_defaults(func=run_receive)

    mig = subparsers.add_parser("migrate", help="start a VM with a workload and live-migrate it to `dirtylog receive`")
    mig.add_argument("--to", required=True, help="destination: host:port, unix:PATH, or file:PATH (save the "
                     "stream; `receive --listen file:PATH` loads it)")
    mig.add_argument("--key-file", required=True, help="pre-shared key file (dirtylog keygen)")
    add_machine_arguments(mig)
    add_migration_arguments(mig)
    mig.add_argument("--warmup", type=duration_arg, default=1.0, help="run the guest this long before migrating")
    mig.add_argument("--json", action="store_true", help="JSON lines for machines")
    mig.add_argument("--plot", metavar="FILE.png", help="draw the migration timeline per round")
    mig.set_defaults(func=run_migrate)


def add_migration_arguments(parser: argparse.ArgumentParser) -> None:
    """The controls of a migration (shared with the demo)."""
    group = parser.add_argument_group("migration")
    group.add_argument("--downtime-limit", type=positive_duration_arg, default=0.3,
                       help="switch over when the rest can be sent within this (default 300ms, as QEMU)")
    group.add_argument("--bandwidth", type=positive_rate_arg, default=None, help="cap the stream, bytes/s, e.g. 500M")
    group.add_argument("--max-time", type=positive_duration_arg, default=None,
                       help="give up (or force) after this long")
    group.add_argument("--on-timeout", choices=("cancel", "force"), default="cancel",
                       help="at --max-time: cancel (the source keeps running) or force the switch-over")
    group.add_argument("--streams", type=whole_number(1, MAX_STREAMS), default=1,
                       help=f"parallel streams, 1 to {MAX_STREAMS} (default 1)")
    group.add_argument("--no-zero-pages", dest="zero_pages", action="store_false", help="send zero pages as data")
    group.add_argument("--compression", choices=("none", "lz4", "zstd"), default="none",
                       help="page compression (default none: on loopback it costs more than it saves)")
    group.add_argument("--mode", choices=TRACKING_MODES, default="log", help="dirty-log mode (default log)")
    privacy = group.add_mutually_exclusive_group()
    privacy.add_argument("--encrypt", dest="encrypt", action="store_true", default=None,
                         help="encrypt guest memory on the wire (AES-256-GCM; the default whenever the stream leaves "
                              "this host: not loopback TCP or a Unix socket)")
    privacy.add_argument("--no-encrypt", dest="encrypt", action="store_false",
                         help="only authenticate frames, even off this host (guest memory then crosses in clear)")
    group.add_argument("--auto-converge", action="store_true", help="throttle vCPUs when the guest outruns the link")
    group.add_argument("--dirty-limit", type=positive_int, default=None,
                       help="cap each vCPU's dirty rate (pages/s) when it outruns the link; needs --mode ring")
    group.add_argument("--postcopy", action="store_true",
                       help="when pre-copy stops converging, move the VM first and send the rest after, pages the "
                            "guest touches on demand (QEMU's postcopy-ram)")
    group.add_argument("--postcopy-after", type=whole_number(0), default=None, metavar="N",
                       help="switch to post-copy after N rounds of pre-copy (0: at once; implies --postcopy)")
    group.add_argument("--resume", metavar="ADDRESS", default=None,
                       help="after a broken link in post-copy, reconnect here to resume (default: --to); the source "
                            "retries every 0.5 s")
    group.add_argument("--resume-timeout", type=positive_duration_arg, default=None,
                       help="give up resuming a broken post-copy after this long (default: never: the destination "
                            "needs this source's pages)")
    group.add_argument("--fault-path", choices=("compiled", "python"), default="compiled",
                       help="post-copy's answers to page requests: compiled (default: no Python between a request "
                            "and its answer) or python (the same frames from the interpreter, to compare)")


def run_keygen(args: argparse.Namespace) -> int:
    path = generate_key_file(args.file, overwrite=args.force)
    if args.json:
        emit_json({"event": "keygen", "file": str(path), "mode": "0600"})
    else:
        console.print(f"wrote a new key to {escape(str(path))} (mode 0600); copy it to the other host over a channel "
                      "you trust")
    return 0


def parameters_from_args(args: argparse.Namespace) -> MigrationParameters:
    """The migration parameters of :func:`add_migration_arguments`'s options; the one place the CLI makes them."""
    return MigrationParameters.parse(
        downtime_limit=args.downtime_limit, bandwidth=args.bandwidth, max_time=args.max_time,
        on_timeout=args.on_timeout, streams=args.streams, zero_pages=args.zero_pages,
        compression=args.compression, mode=args.mode, auto_converge=args.auto_converge,
        dirty_limit=args.dirty_limit, encrypt=args.encrypt, postcopy=args.postcopy or args.postcopy_after is not None,
        postcopy_after=args.postcopy_after, resume_to=args.resume, resume_timeout=args.resume_timeout,
        compiled_faults=args.fault_path == "compiled")


ROUND_COLUMNS = [("round", 5), ("pages", 10), ("MB", 8), ("MB/s", 7), ("dirty", 9), ("dirty/s", 10),
                 ("exp. downtime ms", 16), ("throttle", 8)]


def round_row(rows: RowPrinter, record: dict[str, Any]) -> None:
    """One row of the live migration view (also ``dirtylog ctl SOCKET watch-migration``)."""
    rows.row(record["round"], f"{record['pages']:,}", f"{record['bytes'] / 1e6:,.1f}",
             f"{record['mbps'] / 8:,.0f}", f"{record['dirty_pages']:,}", f"{record['dirty_pages_rate']:,}",
             _ms_cell(record.get("expected_downtime_ms")), f"{record['throttle_percentage']}%")


def _ms_cell(value: float | None) -> str:
    """Milliseconds for a table cell; "-" when unknown (an expected downtime before any page rate is known)."""
    return "-" if value is None else f"{value:,.1f}"


POSTCOPY_COLUMNS = [("post-copy s", 11), ("owed", 10), ("pushed", 10), ("requested", 10), ("requests", 9),
                    ("MB", 8)]


def postcopy_row(rows: RowPrinter, record: dict[str, Any], elapsed: float) -> None:
    """One row of post-copy's live view (the source's side)."""
    rows.row(f"{elapsed:.2f}", f"{record['remaining']:,}", f"{record['pages_pushed']:,}",
             f"{record['pages_requested']:,}", f"{record['requests']:,}", f"{record['bytes'] / 1e6:,.1f}")


def run_migrate(args: argparse.Namespace) -> int:
    load_key(args.key_file)  # a bad key file, address or parameter fails before any VM starts
    parse_endpoint(args.to)
    if args.resume:
        parse_endpoint(args.resume)
    parameters_from_args(args)
    with machine_from_args(args, dirty_ring=args.mode == "ring") as machine:
        machine.start()
        if not args.json:
            console.print(f"source: [bold]{args.workload}[/bold] on {args.vcpus} vCPU(s), {format_size(args.memory)}; "
                          f"warming up {format_duration(args.warmup)}, then migrating to {args.to}")
        warmup_ends = time.perf_counter() + args.warmup
        preload()  # during the warm-up: the migration's setup is then only its connection and handshake
        time.sleep(max(0.0, warmup_ends - time.perf_counter()))
        machine.check()
        stats = migrate_with_progress(machine, args)
        if stats is None:
            if machine.state is State.RUNNING:
                before = machine.progress
                time.sleep(0.5)
                if not args.json:
                    console.print(f"the source VM keeps running here: progress {before:,} -> {machine.progress:,} "
                                  "pages")
            elif machine.state is State.PAUSED:
                return keep_for_operator(machine, args)
            return 1
        if machine.state is State.PAUSED and not args.json:  # a stream to a file takes no VM over
            console.print(escape(f"saved to {args.to}; this VM stays paused here (load it with `dirtylog receive "
                                 f"--listen {args.to} --key-file {args.key_file}`)"))
    return 0


def keep_for_operator(machine: Machine, args: argparse.Namespace) -> int:
    """After a commit the destination went silent: it may be running the VM, so this copy neither resumes nor
    goes away on its own. It waits, paused, for the operator: SIGUSR2 resumes it here (after they checked the
    destination is not running it), SIGINT or SIGTERM discards it."""
    decision: list[str] = []
    signal.signal(signal.SIGUSR2, lambda signum, frame: decision.append("resume"))
    signal.signal(signal.SIGTERM, lambda signum, frame: decision.append("discard"))
    message = (f"this VM stays paused here (pid {os.getpid()}): the destination may be running it. Check the "
               f"destination; then `kill -USR2 {os.getpid()}` resumes it here, Ctrl-C or `kill {os.getpid()}` "
               "discards this copy")
    if args.json:
        emit_json({"event": "kept-paused", "pid": os.getpid(), "message": message})
    else:
        error_console.print(f"[yellow]{escape(message)}[/yellow]")
    try:
        while not decision:
            time.sleep(0.2)
    except KeyboardInterrupt:
        decision.append("discard")
    if decision[0] == "discard":
        return 1
    machine.resume()
    if not args.json:
        console.print("resumed here on the operator's word; running until interrupted")
    try:
        while True:
            time.sleep(0.5)
            machine.check()
    except KeyboardInterrupt:
        return 0


def migrate_with_progress(machine: Machine, args: argparse.Namespace) -> MigrationStats | None:
    """Run the migration with live rows (or JSON lines); None when it failed (already reported)."""
    rows = RowPrinter(ROUND_COLUMNS)
    postcopy_rows = RowPrinter(POSTCOPY_COLUMNS)
    began = [0.0]

    def progress(kind: str, record: dict[str, Any]) -> None:
        if args.json:
            emit_json({**record, "event": kind})
        elif kind == "round":
            round_row(rows, record)
        elif kind == "switchover" and record.get("postcopy"):
            console.print(f"switch-over to post-copy: paused, {record['pages']:,} pages of the system area sent, "
                          f"{record['pending']:,} pages owed to the destination, {record['paused_ms']:.1f} ms in")
        elif kind == "switchover":
            console.print(f"switch-over: paused, final {record['pages']:,} pages "
                          f"({record['bytes'] / 1e6:,.1f} MB) sent in {record['paused_ms']:.1f} ms")
        elif kind == "postcopy":
            began[0] = time.perf_counter()
            console.print(f"post-copy: {escape(record.get('reason', ''))}")
        elif kind == "postcopy-progress":
            postcopy_row(postcopy_rows, record, time.perf_counter() - began[0])
        elif kind == "postcopy-paused":
            console.print(f"[yellow]post-copy paused[/yellow]: {escape(record['reason'])}; this source keeps "
                          f"{record['remaining']:,} pages the destination lacks and reconnects to resume")
        elif kind == "postcopy-resumed":
            console.print(f"post-copy resumed at {escape(record['to'])} after {record['paused_ms']:.0f} ms; "
                          f"{record['remaining']:,} pages still owed")

    try:
        stats = migrate(machine, args.to, key_file=args.key_file, parameters=parameters_from_args(args),
                        progress=progress)
    except MigrationError as error:
        if args.json:
            emit_json({"event": "failed", "error": str(error)})
        else:
            console.print(f"[red bold]migration failed[/red bold]: {escape(str(error))}")
        return None
    if args.plot:
        plot_migration(args.plot, stats)
    if args.json:
        emit_json({"event": "completed", "stats": stats.as_dict()})
    else:
        print_stats("migration completed", stats)
    return stats


def print_stats(title: str, stats: MigrationStats) -> None:
    """The query-migrate style summary for people."""
    info = stats.as_dict()
    ram = info["ram"]
    rows = [
        ("status", info["status"]),
        ("total time", f"{info['total_time_ms']:,.1f} ms (setup {info['setup_time_ms']:,.1f} ms)"),
        ("downtime", f"{info['downtime_ms']:,.1f} ms" if info["downtime_ms"] is not None else "-"),
        ("expected downtime", f"{info['expected_downtime_ms']:,.1f} ms" if info["expected_downtime_ms"] is not None
         else "-"),
        ("transferred", f"{format_size(ram['transferred'])} of {format_size(ram['total'])} guest memory"),
        ("throughput", f"{ram['mbps'] / 8:,.1f} MB/s"),
        ("pages", f"{ram['normal']:,} sent with data, {ram['duplicate']:,} zero"),
        ("dirty sync count", ram["dirty_sync_count"]),
        ("dirty pages rate", f"{ram['dirty_pages_rate']:,} pages/s (last round)"),
        ("throttle", f"{info['cpu_throttle_percentage']}%"
         + (", dirty limit on" if info["dirty_limit_active"] else "")),
        ("streams / compression / mode", f"{info['streams']} / {info['compression']} / {info['mode']}"),
        ("frames", "encrypted (AES-256-GCM)" if info["encrypted"] else "authenticated, not encrypted"),
        ("memory digest", info["digest"]),
    ]
    postcopy = info.get("postcopy")
    if postcopy:
        rows += [
            ("post-copy", f"{postcopy['pending_pages']:,} pages owed at the switch-over; "
                          f"{postcopy['postcopy_time_ms'] or 0:,.1f} ms to the last page"),
            ("pages pushed / requested", f"{postcopy['pages_pushed']:,} / {postcopy['pages_requested']:,} "
                                         f"({postcopy['postcopy_requests']:,} requests)"),
            ("recoveries", f"{postcopy['recoveries']} ({postcopy['paused_ms'] or 0:,.0f} ms paused)"),
        ]
        if "faults" in postcopy:
            rows += [
                ("faults", f"{postcopy['faults']:,} waited for the source, {postcopy['zero_faults']:,} zero pages"),
                ("fault latency", f"mean {postcopy['postcopy_latency'] / 1e3:,.1f} us, median ~"
                                  f"{postcopy['postcopy_latency_median_us']:,.0f} us; per vCPU "
                                  + ", ".join(f"{v / 1e3:,.0f}" for v in postcopy["postcopy_vcpu_latency"]) + " us"),
                ("blocktime", f"{postcopy['postcopy_blocktime']:,} ms all vCPUs at once; per vCPU "
                              + ", ".join(f"{v:,}" for v in postcopy["postcopy_vcpu_blocktime"]) + " ms"),
                ("latency histogram", histogram_text(postcopy["postcopy_latency_dist"])),
            ]
    console.print(key_value_table(title, rows))


def histogram_text(buckets: list[int]) -> str:
    """QEMU's 24 power-of-two microsecond buckets, the non-empty ones: ``[128, 256) us: 40``."""
    return ", ".join(f"[{format_us(1 << n)}, {format_us(2 << n)}): {count:,}" for n, count in enumerate(buckets)
                     if count) or "no faults"


def format_us(micros: int) -> str:
    return f"{micros} us" if micros < 1000 else f"{micros / 1000:g} ms" if micros < 1_000_000 else \
        f"{micros / 1e6:g} s"


def plot_migration(path: str, stats: MigrationStats) -> None:
    """Bytes remaining and dirty rate per round; in post-copy, the pages still owed and the faults that reached
    this source as requests, over time."""
    if stats.postcopy and stats.postcopy_timeline:
        start = stats.postcopy_started or 0.0
        times = [start + t for t, _, _ in stats.postcopy_timeline]
        counts = [n for _, _, n in stats.postcopy_timeline]
        per_interval = [b - a for a, b in zip([0, *counts], counts, strict=False)]
        points = [(r.start + r.seconds, r.dirty_pages * PAGE_SIZE / 1e6, r.bandwidth / 1e6) for r in stats.rounds]
        points += [(t, owed * PAGE_SIZE / 1e6, 0.0) for t, (_, owed, _) in zip(times, stats.postcopy_timeline,
                                                                               strict=True)]
        plot_series(path, "live migration timeline (pre-copy rounds, then post-copy)", [p[0] for p in points],
                    "seconds since start",
                    [("remaining / owed", [p[1] for p in points], "MB"),
                     ("faults sent to the source", [0] * len(stats.rounds) + per_interval, "requests per sample")])
        return
    rounds = stats.rounds
    plot_series(path, "live migration timeline", [r.start + r.seconds for r in rounds], "seconds since start",
                [("remaining", [r.dirty_pages * PAGE_SIZE / 1e6 for r in rounds], "MB"),
                 ("dirty rate", [r.dirty_rate for r in rounds], "pages/s"),
                 ("sent", [r.bandwidth / 1e6 for r in rounds], "MB/s")])


def plot_faults(path: str, stats: MigrationStats) -> None:
    """A destination's post-copy faults over time (per 10 ms) and their latencies (QEMU's buckets)."""
    faults = stats.faults
    if faults is None:
        raise PlotError("--plot draws post-copy's page faults: this migration finished by pre-copy, without any")
    starts, counts = faults.timeline(0.01)
    if not starts:
        starts, counts = [0.0], [0]
    draw_faults(path, starts, counts, faults.histogram, width_ms=10)



def run_receive(args: argparse.Namespace) -> int:
    if args.qmp:
        return serve_incoming(args)
    if not args.key_file:
        raise KeyFileError("receive needs --key-file (the pre-shared key both sides hold; dirtylog keygen makes one)")
    load_key(args.key_file)  # a bad key file fails before anything listens
    listener = Listener(args.listen or "127.0.0.1:7000", memory=args.memory, max_memory=args.max_memory,
                        machine_class=Machine)
    where = listener.address
    if args.json:
        emit_json({"event": "listening", "address": where, "prepared": listener.prepared is not None,
                   "warning": listener.warning})
    else:
        prepared = f" with a {format_size(args.memory)} VM ready" if listener.prepared is not None else ""
        console.print(f"destination: listening on {escape(where)}{prepared}")
        if listener.warning:
            error_console.print(f"[yellow]warning[/yellow]: {escape(listener.warning)}")
    sys.stdout.flush()

    def progress(kind: str, record: dict[str, Any]) -> None:
        if args.json:
            emit_json({**record, "event": f"received-{kind}"})
        elif kind == "round":
            console.print(f"received round {record['round']}: {record['pages']:,} pages on stream 0")
        elif kind == "postcopy":
            console.print(f"post-copy: the VM runs here; {record['pending']:,} pages still to come, on demand or "
                          "pushed")
        elif kind == "postcopy-progress":
            console.print(f"  post-copy: {record['remaining']:,} pages owed ({record['pages_pushed']:,} pushed, "
                          f"{record['pages_requested']:,} requested), {record['faults']:,} faults "
                          f"({record['waiting']} waiting), latency median ~{record['latency_median_us']:,.0f} us, "
                          f"blocktime {record['blocktime_ms']:,.0f} ms")
        elif kind == "postcopy-paused":
            console.print(f"[yellow]post-copy paused[/yellow]: {escape(record['reason'])}; {record['remaining']:,} "
                          "pages missing; vCPUs that touch them wait while the source reconnects")
        elif kind == "postcopy-resumed":
            console.print(f"post-copy resumed after {record['paused_ms']:.0f} ms; {record['missing']:,} pages missing")
        elif kind == "refused":
            error_console.print(f"refused a connection from {escape(record['peer'])}: {escape(record['reason'])}")

    try:
        received = receive(listener, key_file=args.key_file, io_timeout=args.timeout,
                           accept_timeout=args.accept_timeout, handshake_timeout=args.handshake_timeout,
                           progress=progress, resume_timeout=args.resume_timeout, resume_listen=args.resume,
                           compiled_faults=args.fault_path == "compiled")
    except MigrationError as error:
        if args.json:
            emit_json({"event": "failed", "error": str(error)})
        else:
            console.print(f"[red bold]incoming migration failed[/red bold]: {escape(str(error))}")
        return 1
    finally:
        listener.close()
    machine = received.machine
    if args.plot and received.stats.postcopy:
        plot_faults(args.plot, received.stats)
    elif args.plot and not args.json:
        console.print("--plot: this migration finished by pre-copy: there are no page faults to draw")
    with machine:
        if not args.json:
            console.print(f"[green]verified[/green] digest {received.stats.digest}; the VM runs here now "
                          f"({machine.spec.vcpus} vCPUs, {format_size(machine.ram.size)})")
        start, first = time.perf_counter(), machine.progress
        last = first
        while time.perf_counter() - start < args.duration:
            time.sleep(min(0.5, args.duration))
            machine.check()
            now = machine.progress
            if args.json:
                emit_json({"event": "running", "t": round(time.perf_counter() - start, 3), "progress": now})
            else:
                console.print(f"  guest progress {now:,} pages (+{now - last:,})")
            last = now
        machine.pause()
        continued = machine.progress > first or machine.spec.name == "idle"
        if args.json:
            emit_json({"event": "completed", "continued": continued, "progress_at_resume": first,
                       "progress_now": machine.progress, "stats": received.stats.as_dict()})
        else:
            console.print(f"guest progress continued from {first:,} to {machine.progress:,} pages")
            print_stats("incoming migration", received.stats)
    return 0 if continued else 1
