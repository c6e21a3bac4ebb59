"""Live migration end to end on real KVM over real sockets: exact memory, a guest that goes on, every mode."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from dirtylog.guest.machine import MachineError, State
from dirtylog.machine import Machine
from dirtylog.migration import MigrationParameters, MigrationStatus, migrate
from dirtylog.migration.engine.source import SourceMigration
from dirtylog.migration.errors import MigrationError
from dirtylog.migration.keys import load_key
from dirtylog.migration.payload.digest import memory_digest
from dirtylog.migration.payload.memory import DestinationMemory
from dirtylog.units import PAGE_SIZE
from tests.helpers import wait_for
from tests.migration.engine.peers import Receiver, start_receiver

pytestmark = pytest.mark.kvm


def migrate_and_check(key_file: str, receivers: list[Receiver], *, workload: str = "random", rate: int = 20_000,
                      memory: str = "128M", ring: int = 0, filled: bool = False,
                      **options: object) -> tuple[Machine, Receiver]:
    source = Machine(memory, vcpus=2, workload=workload, rate=rate, dirty_ring=ring)  # type: ignore[arg-type]
    if filled:  # no zero pages: round 0 sends whole runs of pages
        area = source.memory[source.workload_pages.start * PAGE_SIZE:]
        area[:] = np.random.default_rng(3).integers(1, 256, area.size, dtype=np.uint8)
    source.start()
    wait_for(lambda: source.progress > 2000, what="the guest to write")
    receiver = start_receiver(key_file)
    receivers.append(receiver)
    stats = migrate(source, receiver.address, key_file=key_file, **options)  # type: ignore[arg-type]
    receiver.join()
    assert receiver.error is None, receiver.error
    assert receiver.result is not None
    destination = receiver.result.machine
    # The source stays paused at the switch-over, handed off: its memory is the memory at the pause.
    assert source.state is State.HANDED_OFF
    assert np.array_equal(receiver.memory_at_resume, source.memory), "destination memory differs from the source's"
    assert stats.digest == memory_digest(source.memory).hex() == receiver.result.stats.digest
    assert stats.status is MigrationStatus.COMPLETED and stats.downtime is not None and stats.downtime > 0
    # The guest goes on from exactly where it stopped.
    paused_at = source.vcpu_progress
    wait_for(lambda: all(d > s for d, s in zip(destination.vcpu_progress, paused_at, strict=True)),
             what="the migrated guest to continue")
    return source, receiver


@pytest.mark.parametrize("mode", ["log", "clear", "ring"])
def test_migration_copies_memory_exactly_and_the_guest_continues(mode: str, key_file: str,
                                                                  receivers: list[Receiver]) -> None:
    source, _ = migrate_and_check(key_file, receivers, mode=mode, ring=4096 if mode == "ring" else 0,
                                  downtime_limit="100ms")
    with pytest.raises(MachineError, match="was migrated to"):
        source.resume()
    source.stop()


def test_one_stream_receives_runs_of_pages_straight_into_guest_memory(key_file: str, receivers: list[Receiver],
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    placed: list[int] = []
    place = DestinationMemory.place_run

    def counted(self: DestinationMemory, round: int, first: int, npages: int) -> memoryview | None:
        target = place(self, round, first, npages)
        placed.append(0 if target is None else len(target))
        return target

    monkeypatch.setattr(DestinationMemory, "place_run", counted)
    source, _ = migrate_and_check(key_file, receivers, filled=True, downtime_limit="100ms")
    assert sum(placed) >= 0.9 * source.memory.size  # round 0 at least, and the copy checked exact above
    source.stop()


@pytest.mark.parametrize("compression", ["lz4", "zstd"])
def test_compressed_streams(compression: str, key_file: str, receivers: list[Receiver]) -> None:
    source, receiver = migrate_and_check(key_file, receivers, workload="sequential", compression=compression)
    assert receiver.result is not None and receiver.result.stats.compression == compression
    source.stop()


def test_parallel_streams_keep_the_latest_copy_of_each_page(key_file: str, receivers: list[Receiver]) -> None:
    source, receiver = migrate_and_check(key_file, receivers, workload="hotset", rate=50_000, streams=3)
    assert receiver.result is not None and receiver.result.stats.streams == 3
    source.stop()


def test_zero_pages_are_elided(key_file: str, receivers: list[Receiver]) -> None:
    source = Machine("128M", vcpus=1, workload="idle")
    source.start()
    receiver = start_receiver(key_file)
    receivers.append(receiver)
    stats = migrate(source, receiver.address, key_file=key_file)
    receiver.join()
    assert receiver.error is None
    # Only the system area holds data; everything else is zero and never crosses the wire.
    assert stats.duplicate_pages > 30_000 and stats.normal_pages < 100
    assert stats.transferred < 1 << 20
    source.stop()


def test_a_time_limit_cancels_and_the_source_keeps_running(key_file: str, receivers: list[Receiver]) -> None:
    source = Machine("128M", vcpus=2, workload="random")
    source.start()
    receiver = start_receiver(key_file)
    receivers.append(receiver)
    # At 20 MB/s the first round alone takes seconds: past the 0.5 s limit, far over 1 ms of downtime.
    with pytest.raises(MigrationError, match=r"did not converge within 0\.5 s.*keeps running"):
        migrate(source, receiver.address, key_file=key_file, downtime_limit="1ms", bandwidth="20M",
                max_time="500ms")
    receiver.join()
    assert isinstance(receiver.error, MigrationError)
    assert source.state is State.RUNNING
    before = source.progress
    wait_for(lambda: source.progress > before, what="the source guest to go on")
    source.stop()


def test_force_switches_over_at_the_time_limit(key_file: str, receivers: list[Receiver]) -> None:
    source, _ = migrate_and_check(key_file, receivers, rate=200_000, downtime_limit="1ms", max_time="300ms",
                                  on_timeout="force")
    source.stop()


def _outrunning_guest(ring: int = 0) -> Machine:
    """A guest that dirties faster than a 100 MB/s link once its memory is all touched."""
    source = Machine("128M", vcpus=2, workload="random", dirty_ring=ring)
    source.start()
    wait_for(lambda: source.progress > 4 * len(source.workload_pages), what="the guest to touch its memory")
    return source


@pytest.mark.parametrize("mode", ["log", "ring"])
def test_a_guest_that_outruns_the_link_never_converges_alone(mode: str, key_file: str,
                                                             receivers: list[Receiver]) -> None:
    source = _outrunning_guest(4096 if mode == "ring" else 0)
    receiver = start_receiver(key_file)
    receivers.append(receiver)
    with pytest.raises(MigrationError, match=r"did not converge within 3\.0 s"):
        migrate(source, receiver.address, key_file=key_file, downtime_limit="20ms", bandwidth="100M",
                mode=mode, max_time="3s")  # type: ignore[arg-type]
    receiver.join()
    source.stop()


def test_auto_converge_throttles_the_guest_until_it_converges(key_file: str, receivers: list[Receiver]) -> None:
    source = _outrunning_guest()
    receiver = start_receiver(key_file)
    receivers.append(receiver)
    stats = migrate(source, receiver.address, key_file=key_file, downtime_limit="20ms", bandwidth="100M",
                    auto_converge=True, max_time="60s")
    receiver.join()
    assert receiver.error is None
    assert stats.throttle > 0
    assert source.throttle == 0  # the throttle is lifted when the migration ends
    source.stop()


def test_dirty_limit_caps_the_guest_until_it_converges(key_file: str, receivers: list[Receiver]) -> None:
    source = _outrunning_guest(4096)
    receiver = start_receiver(key_file)
    receivers.append(receiver)
    stats = migrate(source, receiver.address, key_file=key_file, downtime_limit="20ms", bandwidth="100M",
                    mode="ring", dirty_limit=2000, max_time="60s")
    receiver.join()
    assert receiver.error is None
    assert stats.dirty_limited
    source.stop()


def test_bad_options_are_refused_before_anything_moves(key_file: str) -> None:
    with Machine("64M", vcpus=1, workload="idle") as machine:
        with pytest.raises(MigrationError, match="only a running machine"):
            migrate(machine, "127.0.0.1:1", key_file=key_file)
        machine.start()
        with pytest.raises(MigrationError, match="use mode 'ring'"):
            migrate(machine, "127.0.0.1:1", key_file=key_file, dirty_limit=100)
        with pytest.raises(MigrationError, match="needs a machine created with a dirty ring"):
            migrate(machine, "127.0.0.1:1", key_file=key_file, mode="ring")
        with pytest.raises(MigrationError, match=r"nobody listens at 127\.0\.0\.1:1"):
            migrate(machine, "127.0.0.1:1", key_file=key_file)
        with pytest.raises(MigrationError, match="downtime limit must be positive"):
            migrate(machine, "127.0.0.1:1", key_file=key_file, downtime_limit=0)
        assert machine.state is State.RUNNING
        time.sleep(0.01)


def test_statistics_are_current_while_the_migration_runs(key_file: str, receivers: list[Receiver]) -> None:
    """What query-migrate would show mid-way: active, with the bytes still to send counted down in round 0 and
    the dirty pages left after each round."""
    receiver = start_receiver(key_file)
    receivers.append(receiver)
    with Machine("128M", vcpus=2, workload="random", rate=5_000) as source:
        source.start()
        wait_for(lambda: source.progress > 2000, what="the guest to write")
        seen: list[tuple[str, str, int, int]] = []
        migration = SourceMigration(source, receiver.address, load_key(key_file),
                                    MigrationParameters.parse(downtime_limit="20ms", bandwidth="100M"),
                                    progress=lambda kind, record: seen.append(
                                        (kind, migration.stats.status.value, migration.stats.remaining_pages,
                                         record.get("dirty_pages", -1))))
        sampled: list[int] = []

        def sample() -> None:  # as a query-migrate poller would, from another thread
            for _ in range(20):
                sampled.append(migration.stats.remaining_pages)
                time.sleep(0.05)

        sampler = threading.Thread(target=sample)
        sampler.start()
        stats = migration.run()
        sampler.join()
        receiver.join()
    rounds = [entry for entry in seen if entry[0] == "round"]
    assert rounds and all(status == "active" for _, status, _, _ in rounds)
    assert all(remaining == dirty for _, _, remaining, dirty in rounds)  # left after the round: its dirty pages
    assert len(set(sampled)) > 2  # counted down while round 0 sends 128 MiB at 100 MB/s
    assert stats.status is MigrationStatus.COMPLETED and stats.remaining_pages == 0
