"""Bounded pauses and times: a stalled switch-over gives the guest back, a time limit holds inside a round, and
what happens after the commit is said truthfully. Real sockets on loopback, a relay that stalls or speaks."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from dirtylog.guest.machine import State
from dirtylog.machine import Machine
from dirtylog.migration import MigrationError, migrate
from tests.helpers import wait_for
from tests.migration.engine.peers import Proxy, Receiver, start_receiver

pytestmark = pytest.mark.kvm

# What the destination says before Verified: its CHALLENGE record (16 + 64 bytes) and Ready (16 + 16).
BEFORE_VERIFIED = 80 + 32


def writing_source(memory: str = "64M") -> Machine:
    source = Machine(memory, vcpus=2, workload="sequential", rate=20_000)
    source.start()
    wait_for(lambda: source.progress > 2000, what="the guest to write")
    return source


def test_a_stalled_switch_over_gives_the_guest_back_at_its_deadline(key_file: str, receivers: list[Receiver]) -> None:
    """The destination never says Verified (a hung host): the source holds its guest paused no longer than the
    switch-over deadline, then resumes it and fails; the I/O timeout (30 s) does not decide."""
    receiver = start_receiver(key_file)
    receivers.append(receiver)
    release = threading.Event()

    def stall_verified(way: str, at: int, chunk: bytes) -> bytes | None:
        if way == "down" and at + len(chunk) > BEFORE_VERIFIED:
            release.wait(30)
            return None
        return chunk

    proxy = Proxy(receiver.address, stall_verified).start()
    with writing_source() as source:
        try:
            began = time.monotonic()
            deadline = r"switch-over took longer than its 1\.5 s deadline.*keeps running"
            with pytest.raises(MigrationError, match=deadline):
                migrate(source, proxy.address, key_file=key_file, downtime_limit="100ms", switchover_timeout="1.5s")
            assert time.monotonic() - began < 10  # setup, round 0 and 1.5 s of switch-over, not 30 s
            assert source.state is State.RUNNING
            before = source.progress
            wait_for(lambda: source.progress > before, what="the guest to run again")
        finally:
            release.set()
            proxy.close()
            receiver.join()
    assert receiver.result is None


def test_the_time_limit_holds_inside_a_round(key_file: str, receivers: list[Receiver]) -> None:
    """At 200 KB/s round 0 of 64 MiB would take five minutes: the 3 s limit still ends it within a second."""
    receiver = start_receiver(key_file)
    receivers.append(receiver)
    with writing_source() as source:
        source.memory[source.workload_pages.start * 4096:] = 1  # nothing to elide: every page goes on the wire
        began = time.monotonic()
        with pytest.raises(MigrationError, match=r"did not converge within 3\.0 s.*keeps running"):
            migrate(source, receiver.address, key_file=key_file, bandwidth="200K", max_time="3s")
        assert time.monotonic() - began < 4.5
        assert source.state is State.RUNNING
    receiver.join()


def test_forcing_at_the_time_limit_inside_a_round_sends_the_rest_in_the_switch_over(
        key_file: str, receivers: list[Receiver]) -> None:
    receiver = start_receiver(key_file)
    receivers.append(receiver)
    with writing_source("32M") as source:
        stats = migrate(source, receiver.address, key_file=key_file, bandwidth="20M", max_time="300ms",
                        on_timeout="force", switchover_timeout="30s")
        receiver.join()
        assert receiver.error is None and stats.rounds[-1].final
        assert np.array_equal(receiver.memory_at_resume, source.memory)


def test_a_vcpu_state_kvm_refuses_is_found_before_the_commit(key_file: str, receivers: list[Receiver],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A source whose vCPU state KVM will not load (EFER with reserved bits set): the destination loads it before
    it says Verified, refuses, and the source, still the owner, resumes."""
    receiver = start_receiver(key_file)
    receivers.append(receiver)
    with writing_source() as source:
        honest = source.vcpu_state

        def corrupted(vcpu: int) -> bytes:
            state = bytearray(honest(vcpu))
            efer_at = 18 * 8 + 8 * 16 + 3 * 16 + 5 * 8 + 8  # kvm_regs, then sregs' segments, tables, cr0-cr8, efer
            state[efer_at:efer_at + 8] = (0xFFFF_0000_0000_0D01).to_bytes(8, "little")
            return bytes(state)

        monkeypatch.setattr(source, "vcpu_state", corrupted)
        with pytest.raises(MigrationError, match=r"KVM refused the source's vCPU state.*the source keeps running"):
            migrate(source, receiver.address, key_file=key_file, downtime_limit="100ms")
        assert source.state is State.RUNNING
    receiver.join()
    assert receiver.result is None and "nothing was resumed here" in str(receiver.error)


def test_a_destination_that_fails_after_the_commit_and_says_so_gives_the_vm_back(
        key_file: str, receivers: list[Receiver]) -> None:
    def broken(machine: Machine) -> None:
        raise RuntimeError("the destination host lost its disk")

    receiver = start_receiver(key_file, before_resume=broken)
    receivers.append(receiver)
    with writing_source() as source:
        refused = r"could not run the VM after the commit.*lost its disk.*keeps running"
        with pytest.raises(MigrationError, match=refused):
            migrate(source, receiver.address, key_file=key_file, downtime_limit="100ms")
        assert source.state is State.RUNNING
        before = source.progress
        wait_for(lambda: source.progress > before, what="the source guest to run again")
    receiver.join()


def test_silence_after_the_commit_leaves_the_source_paused_and_says_so(key_file: str,
                                                                     receivers: list[Receiver]) -> None:
    receiver = start_receiver(key_file)
    receivers.append(receiver)
    verified_frame = 16 + 16 + 16  # header, digest, MAC

    def cut_after_verified(way: str, at: int, chunk: bytes) -> bytes | None:
        if way == "down" and at + len(chunk) > BEFORE_VERIFIED + verified_frame:
            keep = BEFORE_VERIFIED + verified_frame - at
            return chunk[:keep] if keep > 0 else None
        return chunk

    proxy = Proxy(receiver.address, cut_after_verified).start()
    with writing_source() as source:
        try:
            with pytest.raises(MigrationError, match=r"commit was sent and the destination went silent.*stays paused"):
                migrate(source, proxy.address, key_file=key_file, downtime_limit="100ms")
            assert source.state is State.PAUSED  # kept for the operator, neither resumed nor handed off
        finally:
            proxy.close()
    receiver.join()
