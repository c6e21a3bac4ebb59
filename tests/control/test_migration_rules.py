"""Migration parameters, capabilities and query-migrate answers as pure functions (no VM, no socket)."""

from __future__ import annotations

from typing import Any

import pytest

from dirtylog.control.errors import QmpError
from dirtylog.control.migration import (
    CAPABILITIES,
    MIGRATION_PARAMETERS,
    SET_CAPABILITIES_ARGUMENTS,
    SUPPORTED_CAPABILITIES,
    check_parameters,
    default_parameters,
    migration_address,
)
from dirtylog.control.migration_info import Timing, incoming_info, outgoing_info, socket_address
from dirtylog.migration import MigrationStats, MigrationStatus
from dirtylog.migration.policy.precopy import RoundStats
from dirtylog.migration.transports import parse_endpoint

MIB = 1 << 20


def test_defaults_are_qemus() -> None:
    defaults = default_parameters(None)
    assert defaults["downtime-limit"] == 300
    assert defaults["max-bandwidth"] == 128 * MIB
    assert defaults["multifd-channels"] == 2
    assert (defaults["cpu-throttle-initial"], defaults["cpu-throttle-increment"], defaults["max-cpu-throttle"]) == \
        (20, 10, 99)
    assert defaults["throttle-trigger-threshold"] == 50
    assert defaults["zero-page-detection"] == "multifd"
    assert defaults["vcpu-dirty-limit"] == 1


@pytest.mark.parametrize(("changes", "message"), [
    ({"downtime-limit": 0}, "Parameter 'downtime-limit' expects an integer in the range of 1 to 2000000"),
    ({"downtime-limit": 2_000_001}, "Parameter 'downtime-limit' expects an integer in the range of 1 to 2000000"),
    ({"multifd-channels": 65}, "Parameter 'multifd-channels' expects an integer in the range of 1 to 64"),
    ({"cpu-throttle-initial": 100}, "Parameter 'cpu-throttle-initial' expects an integer in the range of 1 to 99"),
    ({"throttle-trigger-threshold": 0}, "Parameter 'throttle-trigger-threshold' expects an integer in the range"),
    ({"vcpu-dirty-limit": 0}, "Parameter 'vcpu-dirty-limit' must be at least 1 MB/s"),
    ({"cpu-throttle-initial": 60, "max-cpu-throttle": 50}, "cpu-throttle-initial (60) must not exceed"),
    ({"multifd-compression": "zlib"}, "multifd-compression 'zlib' is not available in dirtylog"),
    ({"x-dirtylog-key-file": "/nonexistent/key"}, "key file /nonexistent/key does not exist"),
])
def test_bad_values_are_refused_and_nothing_changes(changes: dict[str, Any], message: str) -> None:
    current = default_parameters(None)
    before = dict(current)
    with pytest.raises(QmpError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_parameters(current, MIGRATION_PARAMETERS.check(changes))
    assert current == before


def test_good_values_are_applied_together() -> None:
    new = check_parameters(default_parameters(None), MIGRATION_PARAMETERS.check(
        {"downtime-limit": 50, "max-bandwidth": 0, "multifd-channels": 4, "multifd-compression": "zstd",
         "zero-page-detection": "none"}))
    assert (new["downtime-limit"], new["max-bandwidth"], new["multifd-channels"]) == (50, 0, 4)
    assert (new["multifd-compression"], new["zero-page-detection"]) == ("zstd", "none")


def test_qemu_parameters_dirtylog_lacks_are_refused_by_name_unless_neutral() -> None:
    with pytest.raises(QmpError, match="Parameter 'tls-creds' is not supported by dirtylog"):
        MIGRATION_PARAMETERS.check({"tls-creds": "tls0"})
    with pytest.raises(QmpError, match="Parameter 'xbzrle-cache-size' is not supported by dirtylog"):
        MIGRATION_PARAMETERS.check({"xbzrle-cache-size": 1 << 26})
    with pytest.raises(QmpError, match="Parameter 'direct-io' is not supported"):
        MIGRATION_PARAMETERS.check({"direct-io": 0})  # 0 is not false
    # What libvirt sends to say "no TLS" is what dirtylog does anyway.
    assert MIGRATION_PARAMETERS.check({"tls-creds": "", "tls-hostname": None, "direct-io": False}) == \
        {"tls-creds": "", "tls-hostname": None, "direct-io": False}
    with pytest.raises(QmpError, match="Parameter 'warp-factor' is unexpected"):
        MIGRATION_PARAMETERS.check({"warp-factor": 9})
    with pytest.raises(QmpError, match="Parameter 'max-bandwidth' expects uint64"):
        MIGRATION_PARAMETERS.check({"max-bandwidth": "1G"})


def test_capabilities_are_qemus_list() -> None:
    assert {"auto-converge", "dirty-limit", "multifd", "events", "zero-blocks", "xbzrle"} <= set(CAPABILITIES)
    assert set(CAPABILITIES) >= SUPPORTED_CAPABILITIES
    with pytest.raises(QmpError, match="Parameter 'capability' does not accept value 'compress'"):
        SET_CAPABILITIES_ARGUMENTS.check({"capabilities": [{"capability": "compress", "state": True}]})


@pytest.mark.parametrize(("uri", "message"), [
    ("exec:cat", "Parameter 'uri' expects a valid migration protocol"),
    ("rdma:10.0.0.2:4444", "Parameter 'uri' expects a valid migration protocol"),
    ("tcp:host-without-port", "Parameter 'uri' expects a valid migration address"),
    ("file:/tmp/vm,offset=4096", "file: migration takes no options"),
    (None, "need either 'uri' or 'channels' argument"),
])
def test_migration_uris(uri: str | None, message: str) -> None:
    with pytest.raises(QmpError, match=message):
        migration_address(uri, None)


def test_qemu_uris_are_engine_addresses() -> None:
    for uri in ("tcp:10.0.0.2:4444", "tcp:[::1]:4444", "unix:/run/vm-migrate.sock", "file:/var/tmp/vm.state"):
        assert migration_address(uri, None) == uri
    with pytest.raises(QmpError, match="'channels' is not supported"):
        migration_address(None, [{"channel-type": "main"}])


def stats_after(rounds: int, *, final: bool) -> MigrationStats:
    stats = MigrationStats(status=MigrationStatus.ACTIVE, page_size=4096, total_pages=1000, setup_time=0.5,
                           transferred=4_000_000, remaining_pages=10, duplicate_pages=5, normal_pages=900,
                           dirty_sync_count=rounds, expected_downtime=0.02, throttle=0.3)
    for index in range(rounds):
        stats.rounds.append(RoundStats(index, 0.5 + index, 1.0, 500, 5, 2_000_000, 100, 0.3, False))
    if final:
        stats.rounds.append(RoundStats(rounds, 0.5 + rounds, 0.01, 10, 0, 40_000, 0, 0.3, False, final=True))
        stats.downtime, stats.remaining_pages, stats.total_time = 0.015, 0, 2.6
    return stats


def test_an_active_migration_reports_live_ram_and_the_expected_downtime() -> None:
    info = outgoing_info("active", stats_after(2, final=False), Timing(10.0, None, 12.5), downtime_limit=0.3,
                         multifd=False)
    assert info["status"] == "active" and info["total-time"] == 2500 and info["setup-time"] == 500
    assert info["expected-downtime"] == 20 and info["cpu-throttle-percentage"] == 30
    assert "downtime" not in info and "error-desc" not in info
    ram = info["ram"]
    assert ram["transferred"] == 4_000_000 and ram["remaining"] == 10 * 4096 and ram["total"] == 1000 * 4096
    assert ram["normal-bytes"] == 900 * 4096 and ram["dirty-sync-count"] == 2 and ram["dirty-pages-rate"] == 100
    assert ram["mbps"] == pytest.approx(4_000_000 * 8 / 1e6 / 2.0, rel=1e-3)
    assert ram["precopy-bytes"] == 4_000_000 and ram["downtime-bytes"] == 0 and ram["multifd-bytes"] == 0
    assert set(ram) >= {"postcopy-requests", "page-size", "pages-per-second", "postcopy-bytes",
                        "dirty-sync-missed-zero-copy", "duplicate", "normal"}


def test_a_completed_migration_reports_downtime_and_no_expectation() -> None:
    info = outgoing_info("completed", stats_after(2, final=True), Timing(10.0, 12.6, 99.0), downtime_limit=0.3,
                         multifd=True)
    assert info["downtime"] == 15 and info["total-time"] == 2600
    assert "expected-downtime" not in info and "cpu-throttle-percentage" not in info
    assert info["ram"]["downtime-bytes"] == 40_000 and info["ram"]["remaining"] == 0
    assert info["ram"]["multifd-bytes"] == 4_000_000


def test_setup_and_failure_follow_qemus_member_rules() -> None:
    setup = outgoing_info("setup", MigrationStats(), Timing(1.0, None, 1.2), downtime_limit=0.3, multifd=False)
    assert setup == {"status": "setup", "total-time": 200, "expected-downtime": 300}
    failed = outgoing_info("failed", stats_after(1, final=False), Timing(1.0, 2.0, 5.0), downtime_limit=0.3,
                           multifd=False, error="nobody listens")
    assert failed["error-desc"] == "nobody listens" and "ram" not in failed and "expected-downtime" not in failed


def test_the_destination_reports_where_it_listens() -> None:
    assert incoming_info("setup", socket_address(parse_endpoint("tcp:127.0.0.1:4444"))) == {
        "status": "setup", "socket-address": [{"type": "inet", "host": "127.0.0.1", "port": "4444"}]}
    assert incoming_info("active", socket_address(parse_endpoint("unix:/run/m.sock")))["socket-address"] == \
        [{"type": "unix", "path": "/run/m.sock"}]
    assert incoming_info("failed", socket_address(parse_endpoint("file:/tmp/vm")), "digest mismatch") == \
        {"status": "failed", "error-desc": "digest mismatch"}
