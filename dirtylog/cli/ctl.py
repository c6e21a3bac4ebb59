"""``dirtylog ctl SOCKET COMMAND [key=value ...]``: one QMP command from the shell, like qmp-shell's
one-line syntax; and ``dirtylog ctl SOCKET watch-migration``: the live migration view of ``dirtylog
migrate``, from a monitor that is migrating (dirtylog's, or QEMU's).

Values are JSON when they parse as JSON (``state=true``, ``max-bandwidth=0``,
``capabilities=[{"capability":"events","state":true}]``) and strings otherwise (``uri=tcp:10.0.0.2:4444``);
a dotted key builds nested objects (``a.b=1`` is ``{"a": {"b": 1}}``).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from dirtylog.cli.migrate import ROUND_COLUMNS, round_row
from dirtylog.cli.options import duration_arg
from dirtylog.cli.output import RowPrinter, console, emit_json, key_value_table
from dirtylog.control.client import QmpClient
from dirtylog.control.errors import ErrorClass, QmpError
from dirtylog.errors import DirtylogError
from dirtylog.units import format_size

ENDED = ("completed", "failed", "cancelled")
POSTCOPY_STATES = ("postcopy-active", "postcopy-paused", "postcopy-recover")


class CtlArgumentError(DirtylogError):
    """A key=value argument that cannot be turned into QMP arguments."""


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("ctl", help="send a QMP command to a running machine (dirtylog run --qmp, or QEMU)",
                                   description="Send one QMP command, e.g. `dirtylog ctl /tmp/vm.sock query-status` or "
                                   "`dirtylog ctl /tmp/vm.sock migrate uri=tcp:127.0.0.1:4444`; or watch a migration "
                                   "with `dirtylog ctl SOCKET watch-migration`.")
    parser.add_argument("socket", help="unix:PATH, tcp:HOST:PORT, HOST:PORT or a socket path")
    parser.add_argument("command", help="a QMP command name, or watch-migration")
    parser.add_argument("arguments", nargs="*", metavar="key=value",
                        help="command arguments; values are JSON when they parse as JSON, else strings")
    parser.add_argument("--json", action="store_true", help="print the QMP return value (or rows) as JSON lines")
    parser.add_argument("--interval", type=duration_arg, default=0.2, help="watch-migration: poll period "
                        "(default 200ms; MIGRATION_PASS events wake it sooner when the events capability is on)")
    parser.add_argument("--timeout", type=duration_arg, default=30.0, help="how long to wait for an answer")
    parser.set_defaults(func=run)


def parse_arguments(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` words as a QMP arguments object."""
    arguments: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise CtlArgumentError(f"argument {pair!r} is not key=value (e.g. uri=tcp:127.0.0.1:4444)")
        try:
            value: Any = json.loads(text)
        except ValueError:
            value = text
        *parents, leaf = key.split(".")
        target = arguments
        for part in parents:
            child = target.setdefault(part, {})
            if not isinstance(child, dict):
                raise CtlArgumentError(f"{key!r}: {part!r} is already a value, it cannot also hold members")
            target = child
        if leaf in target:
            raise CtlArgumentError(f"{key!r} is given twice")
        target[leaf] = value
    return arguments


def run(args: argparse.Namespace) -> int:
    with QmpClient(args.socket, timeout=args.timeout) as client:
        if args.command == "watch-migration":
            if args.arguments:
                raise CtlArgumentError("watch-migration takes no key=value arguments")
            return watch_migration(client, args.interval, as_json=args.json)
        try:
            result = client.execute(args.command, parse_arguments(args.arguments))
        except QmpError as error:
            if args.json:
                emit_json({"error": {"class": str(error.error_class), "desc": error.desc}})
            else:
                console.print(f"[red bold]{error.error_class}[/red bold]: {error.desc}")
            return 1
    if args.json:
        emit_json({"return": result})
    else:
        show(args.command, result)
    return 0


def show(title: str, value: Any) -> None:
    """A QMP return value for people: objects as key/value tables, lists of objects as rows."""
    if value == {}:
        console.print(f"{title}: done")
    elif isinstance(value, dict):
        console.print(key_value_table(title, list(_flatten(value))))
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        columns: list[str] = []
        for item in value:
            columns += [k for k in item if k not in columns]
        rows = RowPrinter([(c, max(len(c), *(len(_text(i.get(c, ""))) for i in value))) for c in columns])
        for item in value:
            rows.row(*(_text(item.get(c, "")) for c in columns))
    else:
        console.print(_text(value))


def _flatten(value: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    for key, item in value.items():
        if isinstance(item, dict) and item:
            rows += _flatten(item, f"{prefix}{key}.")
        else:
            rows.append((prefix + key, _text(item)))
    return rows


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


# --- watch-migration --------------------------------------------------------------------------------


def watch_migration(client: QmpClient, interval: float, *, as_json: bool) -> int:
    """Follow the current (or next) migration until it ends; exit status 0 only if it completed."""
    rows = RowPrinter(ROUND_COLUMNS)
    own_rounds = True  # dirtylog's x-dirtylog-query-migrate-rounds; QEMU has none: rows come from deltas
    since = 0
    previous: dict[str, Any] | None = None
    waiting_said = False
    last_postcopy: dict[str, Any] | None = None
    while True:
        info = client.execute("query-migrate")
        assert isinstance(info, dict)
        if own_rounds:
            try:
                records = client.execute("x-dirtylog-query-migrate-rounds", {"since": since})
            except QmpError as error:
                if error.error_class is not ErrorClass.COMMAND_NOT_FOUND:
                    raise
                own_rounds, records = False, []
            assert isinstance(records, list)
            since += len(records)
            for record in records:
                _show_round({key.replace("-", "_"): v for key, v in record.items()}, rows, as_json)
        elif "ram" in info:
            record = _round_from_info(previous, info)
            if record is not None:
                _show_round(record, rows, as_json)
            previous = info
        status = info.get("status")
        if status in POSTCOPY_STATES:
            record = postcopy_record(info)
            if record != last_postcopy:
                _show_postcopy(record, as_json)
                last_postcopy = record
        if status is None and not waiting_said and not as_json:
            console.print("no migration yet; waiting for one to start")
            waiting_said = True
        if status in ENDED:
            _summary(info, as_json)
            return 0 if status == "completed" else 1
        client.wait_event(interval)


def _show_round(record: dict[str, Any], rows: RowPrinter, as_json: bool) -> None:
    if as_json:
        emit_json({"event": "round", **record})
    elif "bytes" not in record:  # a destination's record: what arrived in the round
        console.print(f"received round {record['round']}: {record['pages']:,} pages")
    elif not record.get("final"):
        round_row(rows, record)
    else:
        console.print(f"switch-over: final {record['pages']:,} pages ({record['bytes'] / 1e6:,.1f} MB)")


def postcopy_record(info: dict[str, Any]) -> dict[str, Any]:
    """What post-copy's live view shows of a query-migrate answer: the source's pages owed, requests and bytes;
    a destination's blocktime and fault latency (QEMU 10.1's members, when it reports them)."""
    record: dict[str, Any] = {"status": info["status"]}
    ram = info.get("ram")
    if ram:
        record.update({"remaining_pages": ram["remaining"] // max(ram["page-size"], 1),
                       "postcopy_requests": ram["postcopy-requests"], "postcopy_bytes": ram["postcopy-bytes"]})
    if "postcopy-latency" in info:
        record.update({"postcopy_blocktime_ms": info.get("postcopy-blocktime", 0),
                       "postcopy_latency_us": round(info["postcopy-latency"] / 1e3, 1),
                       "faults": sum(info.get("postcopy-latency-dist", []))})
    return record


def _show_postcopy(record: dict[str, Any], as_json: bool) -> None:
    if as_json:
        emit_json({"event": "postcopy", **record})
        return
    parts = [record["status"]]
    if "remaining_pages" in record:
        parts.append(f"{record['remaining_pages']:,} pages owed, {record['postcopy_requests']:,} page requests, "
                     f"{record['postcopy_bytes'] / 1e6:,.1f} MB since the switch")
    if "postcopy_latency_us" in record:
        parts.append(f"{record['faults']:,} faults answered, mean latency {record['postcopy_latency_us']:,.1f} us, "
                     f"blocktime {record['postcopy_blocktime_ms']:,} ms")
    console.print(parts[0] + (": " + "; ".join(parts[1:]) if len(parts) > 1 else ""))


def _round_from_info(previous: dict[str, Any] | None, info: dict[str, Any]) -> dict[str, Any] | None:
    """A row from two query-migrate answers, when a dirty-log sync happened between them (QEMU)."""
    ram, before = info["ram"], (previous or {}).get("ram")
    if before is None or ram["dirty-sync-count"] == before["dirty-sync-count"]:
        return None
    pages = ram["normal"] + ram["duplicate"] - before["normal"] - before["duplicate"]
    return {"round": ram["dirty-sync-count"] - 1, "pages": pages, "bytes": ram["transferred"] - before["transferred"],
            "mbps": ram["mbps"], "dirty_pages": ram["remaining"] // max(ram["page-size"], 1),
            "dirty_pages_rate": ram["dirty-pages-rate"], "expected_downtime_ms": info.get("expected-downtime", 0),
            "throttle_percentage": info.get("cpu-throttle-percentage", 0)}


def _summary(info: dict[str, Any], as_json: bool) -> None:
    if as_json:
        emit_json({"event": info["status"], "query-migrate": info})
        return
    ram = info.get("ram", {})
    rows: list[tuple[str, Any]] = [("status", info["status"])]
    if "total-time" in info:
        rows.append(("total time", f"{info['total-time']:,} ms (setup {info.get('setup-time', 0):,} ms)"))
    if "downtime" in info:
        rows.append(("downtime", f"{info['downtime']:,} ms"))
    if ram:
        rows += [("transferred", f"{format_size(ram['transferred'])} of {format_size(ram['total'])} guest memory"),
                 ("throughput", f"{ram['mbps'] / 8:,.1f} MB/s"),
                 ("pages", f"{ram['normal']:,} sent with data, {ram['duplicate']:,} zero"),
                 ("dirty sync count", ram["dirty-sync-count"]),
                 ("dirty pages rate", f"{ram['dirty-pages-rate']:,} pages/s")]
        if ram.get("postcopy-bytes"):
            rows.append(("post-copy", f"{ram['postcopy-requests']:,} page requests, "
                                      f"{format_size(ram['postcopy-bytes'])} after the switch"))
    if "postcopy-latency" in info:
        rows += [("fault latency", f"mean {info['postcopy-latency'] / 1e3:,.1f} us; per vCPU "
                                   + ", ".join(f"{v / 1e3:,.1f}" for v in info["postcopy-vcpu-latency"]) + " us"),
                 ("blocktime", f"{info['postcopy-blocktime']:,} ms all vCPUs at once; per vCPU "
                               + ", ".join(f"{v:,}" for v in info["postcopy-vcpu-blocktime"]) + " ms")]
    if "error-desc" in info:
        rows.append(("error", info["error-desc"]))
    console.print(key_value_table(f"migration {info['status']}", rows))
