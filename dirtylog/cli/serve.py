"""``dirtylog run --qmp`` and ``dirtylog receive --qmp``: a machine that lives until QMP says ``quit``.

Not a sub-command of its own: ``run`` and ``receive`` hand over here when ``--qmp`` is given. The
address is printed (and, with ``--json``, written as the first JSON line) once the socket accepts
clients, so a script can start the process and connect as soon as it reads that line.
"""

from __future__ import annotations

import argparse
import sys

from dirtylog.cli.options import machine_from_args
from dirtylog.cli.output import console, emit_json
from dirtylog.control.monitor import Monitor
from dirtylog.control.server import parse_address
from dirtylog.migration import preload
from dirtylog.migration.keys import load_key
from dirtylog.units import format_size


def add_qmp_argument(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--qmp", metavar="ADDRESS", help=f"serve QMP at unix:PATH (mode 0600) or tcp:127.0.0.1:PORT "
                        f"(loopback only: QMP has no authentication) and {what} until a client sends quit")


def serve_machine(args: argparse.Namespace) -> int:
    """Run the machine ``run``'s options describe under a QMP monitor until quit or a signal."""
    parse_address(args.qmp)  # a bad address fails before a VM is built
    if args.key_file:
        load_key(args.key_file)  # a bad key file fails now, not at the first migrate
    with machine_from_args(args, dirty_ring=args.dirty_ring) as machine:
        machine.start()
        preload()  # the first migrate's setup is then only its connection and handshake
        monitor = Monitor(args.qmp, machine=machine, key_file=args.key_file)
        return _serve(monitor, args, f"[bold]{args.workload}[/bold] on {machine.spec.vcpus} vCPU(s), "
                                     f"{format_size(machine.ram.size)} RAM")


def serve_incoming(args: argparse.Namespace) -> int:
    """Wait for migrate-incoming (or listen at --listen at once), then run the VM until quit."""
    if args.key_file:
        load_key(args.key_file)
    monitor = Monitor(args.qmp, machine=None, incoming=True, key_file=args.key_file, incoming_memory=args.memory,
                      incoming_max_memory=args.max_memory, io_timeout=args.timeout,
                      handshake_timeout=args.handshake_timeout)
    try:
        if args.listen:
            # QEMU's -incoming tcp:...: listening starts with the process, before any client connects.
            scheme = args.listen.partition(":")[0]
            uri = args.listen if scheme in ("tcp", "unix", "file") else f"tcp:{args.listen}"
            monitor.migration.migrate_incoming({"uri": uri})
    except BaseException:
        monitor.close()
        raise
    return _serve(monitor, args, "destination: " + (f"receiving at {args.listen}" if args.listen
                                                     else "waiting for migrate-incoming"))


def _serve(monitor: Monitor, args: argparse.Namespace, what: str) -> int:
    try:
        monitor.start()
        if args.json:
            emit_json({"event": "listening", "qmp": monitor.address})
        else:
            console.print(f"{what}; QMP at [bold]{monitor.address}[/bold] (send quit, or Ctrl-C, to end)")
        sys.stdout.flush()
        status = monitor.wait()
    finally:
        monitor.close()
    state = str(monitor.vm.state)
    if args.json:
        emit_json({"event": "shutdown", "reason": str(monitor.cause) if monitor.cause else None, "status": status,
                   "vm": state, **({"error": monitor.failure} if monitor.failure else {})})
    else:
        console.print(f"shut down ({monitor.cause or 'incoming migration failed'}); the VM was {state}")
    if monitor.failure:
        print(f"dirtylog: error: the incoming migration failed: {monitor.failure}", file=sys.stderr)
    return status
