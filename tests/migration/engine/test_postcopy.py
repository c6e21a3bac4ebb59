"""Post-copy on real KVM over real sockets: the VM moves before its memory, pages follow on demand and pushed, the
copy is exact, no page goes back in time, and a broken link pauses and resumes instead of losing the VM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np
import pytest

from dirtylog.guest.machine import State
from dirtylog.machine import Machine
from dirtylog.migration import MigrationStatus, migrate
from dirtylog.migration.errors import MigrationError
from dirtylog.migration.payload.digest import memory_digest
from dirtylog.migration.protocol.gmac_nogil import UNAVAILABLE
from dirtylog.units import PAGE_SIZE
from tests.helpers import wait_for
from tests.migration.engine.peers import Proxy, Receiver, start_receiver
from tests.migration.engine.postcopy_helpers import PostcopyCut, fill, read_stamps

pytestmark = pytest.mark.kvm


def writing_source(memory: str = "64M", workload: str = "random", rate: int | None = None, filled: bool = False,
                   **options: Any) -> Machine:
    source = Machine(memory, vcpus=2, workload=workload, rate=rate, **options)  # type: ignore[arg-type]
    if filled:
        fill(source)
    source.start()
    wait_for(lambda: source.progress > 4000, what="the guest to write")
    return source


def keep_at_switchover(source: Machine, kept: dict[str, Any]) -> Any:
    """A progress callback that keeps the source's memory as it is at the switch-over (the guest is paused then)."""
    def progress(kind: str, record: dict[str, Any]) -> None:
        if kind == "switchover":
            kept["memory"] = source.memory.copy()
        kept.setdefault("kinds", []).append(kind)
    return progress


@pytest.mark.parametrize("after", [0, 1, 2])
def test_postcopy_copies_memory_exactly(after: int, key_file: str, receivers: list[Receiver]) -> None:
    """A destination that arrives paused (QEMU's -S) gets every page pushed: its memory is the source's at the
    switch-over, byte for byte, and both digests say so. After 0 rounds nothing was sent before the switch."""
    source = writing_source()
    receiver = start_receiver(key_file, start_paused=True)
    receivers.append(receiver)
    stats = migrate(source, receiver.address, key_file=key_file, postcopy=True, postcopy_after=after,
                    downtime_limit="1ms")
    receiver.join()
    assert receiver.error is None, receiver.error
    assert receiver.result is not None
    destination = receiver.result.machine
    assert source.state is State.HANDED_OFF and destination.state is State.PAUSED
    assert stats.status is MigrationStatus.COMPLETED and stats.postcopy
    assert len([r for r in stats.rounds if not r.final]) == after
    assert np.array_equal(destination.memory, source.memory), "the destination's memory differs from the source's"
    assert stats.digest == memory_digest(source.memory).hex() == receiver.result.stats.digest
    received = receiver.result.stats
    assert received.pages_pushed + received.pages_requested == received.postcopy_pending == stats.postcopy_pending
    owed_at_once = source.ram.npages - source.workload_pages.start  # all but the system area, sent in the downtime
    assert stats.postcopy_pending == owed_at_once if after == 0 else 0 < stats.postcopy_pending < owed_at_once
    assert stats.downtime is not None
    destination.resume()  # and it runs from where the source stopped
    paused_at = source.vcpu_progress
    wait_for(lambda: all(d > s for d, s in zip(destination.vcpu_progress, paused_at, strict=True)),
             what="the migrated guest to continue")
    source.stop()


@pytest.mark.parametrize(("compiled", "encrypt"), [(True, False), (False, False), (True, True)],
                         ids=["compiled fault path", "fault path in Python", "encrypted: Python by necessity"])
def test_pages_a_thread_touches_are_fetched_on_demand(compiled: bool, encrypt: bool, key_file: str,
                                                      receivers: list[Receiver]) -> None:
    """With the push held back by a slow link, reading owed pages on the destination asks the source for them:
    they arrive as answers long before the push could bring them, and hold the source's bytes. Both fault paths:
    compiled on both ends, and the interpreter's (asked for, or what an encrypted session uses: the compiled path
    only MACs frames)."""
    source = writing_source("256M", filled=True)
    receiver = start_receiver(key_file, start_paused=True, compiled_faults=compiled)
    receivers.append(receiver)
    started = threading.Event()
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["stats"] = migrate(source, receiver.address, key_file=key_file, postcopy=True, postcopy_after=0,
                                      bandwidth="30M", compiled_faults=compiled, encrypt=encrypt,
                                      progress=lambda kind, record: kind == "postcopy" and started.set())
        except BaseException as error:  # reported below
            result["error"] = error

    migration = threading.Thread(target=run)
    migration.start()
    assert started.wait(30)
    wait_for(lambda: receiver.migration is not None
             and receiver.migration.stats.status is MigrationStatus.POSTCOPY_ACTIVE, what="the destination's post-copy")
    assert receiver.migration is not None and receiver.migration.machine is not None
    destination = receiver.migration.machine
    # Far from where the push is (it goes up from the start), and read downwards: after each answer the push goes
    # on from just past the page asked for, which is never the next page read.
    half = np.arange((source.workload_pages.start + source.workload_pages.stop) // 2, source.workload_pages.stop)
    pages = np.sort(np.random.default_rng(5).choice(half, 64, replace=False))[::-1].astype(np.int64)
    began = time.perf_counter()
    stamps = read_stamps(destination, pages)
    took = time.perf_counter() - began
    migration.join(120)
    receiver.join()
    assert "error" not in result, result.get("error")
    words = source.memory.reshape(-1, PAGE_SIZE)[pages].view(np.uint64)[:, 0]
    assert np.array_equal(stamps, words), "a page fetched on demand differs from the source's"
    assert took < 5, f"64 pages on demand took {took:.1f} s: they waited for the push"
    assert receiver.result is not None and receiver.result.stats.pages_requested >= 64
    faults = receiver.result.stats.faults
    assert faults is not None and faults.non_vcpu_resolved >= 64 and sum(faults.histogram) >= 64
    assert result["stats"].postcopy_requests >= 1
    # Both ends counted the same requests, whoever served them; and they say who did.
    assert result["stats"].postcopy_requests == receiver.result.stats.postcopy_requests
    expected = "compiled" if compiled and not encrypt and not UNAVAILABLE else "python: "
    assert result["stats"].encrypted == encrypt
    assert result["stats"].fault_path.startswith(expected) and receiver.result.stats.fault_path.startswith(expected)
    source.stop()


def test_the_guest_runs_during_postcopy_and_no_stamp_goes_back(key_file: str, receivers: list[Receiver]) -> None:
    """The stamp workload runs through the switch-over: it writes its iteration number into the pages it touches,
    so a page's stamp only grows. On the destination, sampled while pages still arrive and at the end, no page
    holds a stamp older than the source's at the switch-over, and no sample is older than the one before it: the
    guest never reads a page older than its last write, and no pushed page overwrites what the guest wrote."""
    source = writing_source("128M", workload="stamp", writes_per_iteration=512)
    receiver = start_receiver(key_file)
    receivers.append(receiver)
    kept: dict[str, Any] = {}
    started = threading.Event()

    def progress(kind: str, record: dict[str, Any]) -> None:
        keep_at_switchover(source, kept)(kind, record)
        if kind == "postcopy":
            started.set()

    result: dict[str, Any] = {}
    migration = threading.Thread(target=lambda: result.setdefault("stats", migrate(
        source, receiver.address, key_file=key_file, postcopy=True, postcopy_after=1, bandwidth="60M",
        progress=progress)))
    migration.start()
    assert started.wait(60)
    wait_for(lambda: receiver.migration is not None and receiver.migration.postcopy is not None
             and receiver.migration.machine is not None and receiver.migration.machine.state is State.RUNNING,
             what="the guest to run on the destination")
    assert receiver.migration is not None and receiver.migration.machine is not None
    destination = receiver.migration.machine
    at_switch = kept["memory"].reshape(-1, PAGE_SIZE).view(np.uint64)[:, 0]
    rng = np.random.default_rng(7)
    area = np.arange(source.workload_pages.start, source.workload_pages.stop, dtype=np.int64)
    sample = np.sort(rng.choice(area, 512, replace=False))
    previous = at_switch[sample]
    samples = 0
    while migration.is_alive() and samples < 40:
        now = read_stamps(destination, sample)
        behind = np.flatnonzero(now < previous)
        assert not behind.size, (f"page {int(sample[behind[0]])} went back from stamp {int(previous[behind[0]])} "
                                 f"to {int(now[behind[0]])}")
        previous, samples = now, samples + 1
        time.sleep(0.02)
    migration.join(120)
    receiver.join()
    assert receiver.error is None, receiver.error
    assert samples >= 3, "post-copy ended before the samples could watch it"
    destination.pause()
    final = destination.memory.reshape(-1, PAGE_SIZE).view(np.uint64)[:, 0]
    older = np.flatnonzero(final[area] < at_switch[area])
    assert not older.size, f"page {int(area[older[0]])} is older on the destination than at the switch-over"
    assert (final[area] > at_switch[area]).any(), "the guest wrote nothing on the destination"
    stats = result["stats"]
    assert stats.digest == memory_digest(kept["memory"]).hex()  # the transfer was exact
    faults = receiver.result.stats.faults if receiver.result is not None else None
    assert faults is not None and faults.resolved > 0 and faults.mean_latency > 0
    assert sum(faults.vcpu_blocktime) > 0 and len(faults.vcpu_blocktime) == 2
    source.stop()


CUTS = [
    pytest.param(PostcopyCut("up", 1 << 20), id="stream, 1 MiB into the push"),
    pytest.param(PostcopyCut("up", 40 << 20), id="stream, 40 MiB into the push"),
    pytest.param(PostcopyCut("down", 0, connection=1), id="post-copy channel, a request"),
    pytest.param(PostcopyCut("up", 3 << 20, how="flip"), id="stream, a corrupt frame"),
    # The compiled fault path on each end hands a frame that fails its MAC back to the Python path, which says so.
    pytest.param(PostcopyCut("down", 0, connection=1, how="flip"), id="post-copy channel, a corrupt request"),
    pytest.param(PostcopyCut("up", 0, connection=1, how="flip"), id="post-copy channel, a corrupt answer"),
    pytest.param(PostcopyCut("down", 49, trigger="switchover"), id="stream, the destination's Resumed"),
]


@pytest.mark.parametrize("cut", CUTS)
def test_a_broken_link_pauses_both_sides_and_the_migration_resumes(cut: PostcopyCut, key_file: str,
                                                                  receivers: list[Receiver]) -> None:
    """The link breaks (cut, or a frame corrupted on the way) at several points of post-copy: both sides pause;
    the source reconnects with the same key, the destination says what it lacks, and the migration finishes with
    the destination's memory exactly the source's (a destination whose guest runs, to have requests on the post-copy
    channel, checks the digest of the transfer)."""
    source = writing_source("128M", filled=True)
    paused = cut.connection == 0
    receiver = start_receiver(key_file, start_paused=paused)
    receivers.append(receiver)
    holder: list[Proxy] = []
    proxy = Proxy(receiver.address, lambda way, at, chunk: cut.mutate(holder[0], way, at, chunk))
    holder.append(proxy)
    proxy.start()
    kinds: list[str] = []

    def progress(kind: str, record: dict[str, Any]) -> None:
        kinds.append(kind)
        if kind == cut.trigger:
            cut.started.set()

    try:
        stats = migrate(source, proxy.address, key_file=key_file, postcopy=True, postcopy_after=1, bandwidth="200M",
                        downtime_limit="1ms", io_timeout=5, resume_timeout=30, progress=progress)
        receiver.join()
    finally:
        proxy.close()
    assert cut.struck.is_set(), "the relay never struck"
    assert receiver.error is None, receiver.error
    assert receiver.result is not None
    assert "postcopy-paused" in kinds and "postcopy-resumed" in kinds
    assert stats.recoveries >= 1 and receiver.result.stats.recoveries >= 1
    if paused:
        assert np.array_equal(receiver.result.machine.memory, source.memory)
    assert stats.digest == memory_digest(source.memory).hex() == receiver.result.stats.digest
    source.stop()


def test_the_destination_dying_after_the_switch_leaves_the_source_its_pages(key_file: str) -> None:
    """A destination process killed in post-copy: the source pauses, tries to resume until its timeout, then says
    what is lost and what it keeps; it stays paused (never resumed on its own) with its memory as at the switch."""
    source = writing_source("256M", filled=True)
    destination = subprocess.Popen([sys.executable, "-m", "dirtylog", "receive", "--listen", "127.0.0.1:0",
                                    "--key-file", key_file, "--json"], stdout=subprocess.PIPE, text=True)
    kept: dict[str, Any] = {}
    keeper = keep_at_switchover(source, kept)

    def progress(kind: str, record: dict[str, Any]) -> None:
        keeper(kind, record)
        if kind == "postcopy":
            os.kill(destination.pid, signal.SIGKILL)

    try:
        assert destination.stdout is not None
        address = json.loads(destination.stdout.readline())["address"]
        with pytest.raises(MigrationError, match=r"did not come back within 2 s.*lacks [\d,]+ of its pages, which "
                                                 r"this source keeps, paused") as caught:
            migrate(source, address, key_file=key_file, postcopy=True, postcopy_after=1, bandwidth="50M",
                    downtime_limit="1ms", resume_timeout=2, progress=progress)
        assert caught.value.stats.status is MigrationStatus.FAILED and caught.value.stats.postcopy
        assert source.state is State.HANDED_OFF  # never resumed on its own: the VM ran on the destination
        assert np.array_equal(source.memory, kept["memory"])  # everything it had at the switch, intact
    finally:
        destination.kill()
        destination.wait()
        source.stop()


def test_the_source_dying_after_the_switch_is_a_lost_vm_on_the_destination(key_file: str) -> None:
    """A source process killed in post-copy: the destination pauses, waits for a resume until its timeout, then
    stops the VM it could not complete and says so."""
    receiver = start_receiver(key_file, io_timeout=3.0, resume_timeout=2.0)
    source = subprocess.Popen([sys.executable, "-m", "dirtylog", "migrate", "--to", receiver.address, "--key-file",
                               key_file, "--memory", "256M", "--workload", "random", "--bandwidth", "30M",
                               "--postcopy", "--postcopy-after", "0", "--warmup", "200ms", "--json"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert source.stdout is not None
        for line in source.stdout:
            if json.loads(line).get("event") == "postcopy":
                break
        source.kill()
        receiver.join(60)
        assert isinstance(receiver.error, MigrationError)
        assert "did not resume within 2 s" in str(receiver.error)
        assert "it is stopped here" in str(receiver.error)
        assert receiver.result is None
    finally:
        source.kill()
        source.wait()


def test_a_migration_that_converges_finishes_by_precopy(key_file: str, receivers: list[Receiver]) -> None:
    """Post-copy allowed is not post-copy forced: a guest that converges finishes as before, and the unused
    post-copy channel is closed."""
    source = writing_source(rate=2_000)
    receiver = start_receiver(key_file)
    receivers.append(receiver)
    stats = migrate(source, receiver.address, key_file=key_file, postcopy=True, downtime_limit="200ms")
    receiver.join()
    assert receiver.error is None and receiver.result is not None
    assert not stats.postcopy and not receiver.result.stats.postcopy
    assert np.array_equal(receiver.memory_at_resume, source.memory)
    source.stop()


def test_a_guest_that_never_converges_switches_to_postcopy_on_its_own(key_file: str,
                                                                      receivers: list[Receiver]) -> None:
    """Without a round count, post-copy starts when pre-copy stops converging (QEMU's trigger: two rounds dirtying
    more than half of what they sent), where pre-copy alone would run into its time limit."""
    source = writing_source("128M")
    wait_for(lambda: source.progress > 4 * len(source.workload_pages), what="the guest to touch its memory")
    receiver = start_receiver(key_file)
    receivers.append(receiver)
    stats = migrate(source, receiver.address, key_file=key_file, postcopy=True, downtime_limit="20ms",
                    bandwidth="100M", max_time="60s")
    receiver.join()
    assert receiver.error is None and stats.postcopy
    assert "not converging" in stats.postcopy_reason
    assert stats.total_time < 30
    source.stop()


def test_postcopy_options_are_checked_before_anything_moves(key_file: str, tmp_path: Any) -> None:
    with Machine("64M", vcpus=1, workload="idle") as machine:
        machine.start()
        with pytest.raises(MigrationError, match="post-copy runs on one stream"):
            migrate(machine, "127.0.0.1:1", key_file=key_file, postcopy=True, streams=2)
        with pytest.raises(MigrationError, match="only with postcopy=True"):
            migrate(machine, "127.0.0.1:1", key_file=key_file, postcopy_after=1)
        with pytest.raises(MigrationError, match="is a file"):
            migrate(machine, f"file:{tmp_path}/vm.stream", key_file=key_file, postcopy=True)
        assert machine.state is State.RUNNING
