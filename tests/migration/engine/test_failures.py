"""Nothing lost, nobody let in: every failure leaves the source running with its memory, the destination
never resumes a partial VM, and a retry afterwards succeeds. Real sockets, a relay that injects faults."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dirtylog.guest.machine import State
from dirtylog.machine import Machine
from dirtylog.migration import migrate
from dirtylog.migration.errors import MigrationError
from dirtylog.migration.keys import generate_key_file
from tests.helpers import wait_for
from tests.migration.engine.peers import Mutator, Proxy, Receiver, start_receiver

pytestmark = pytest.mark.kvm


def running_source() -> Machine:
    source = Machine("64M", vcpus=2, workload="sequential", rate=20_000)
    source.start()
    wait_for(lambda: source.progress > 2000, what="the guest to write")
    return source


def assert_source_intact(source: Machine) -> None:
    """Still running, still writing where it was, nothing crashed."""
    assert source.state is State.RUNNING
    source.check()
    before = source.vcpu_progress
    wait_for(lambda: all(a > b for a, b in zip(source.vcpu_progress, before, strict=True)),
             what="the source guest to keep running")


def assert_retry_succeeds(source: Machine, key_file: str, receivers: list[Receiver]) -> None:
    receiver = start_receiver(key_file)
    receivers.append(receiver)
    migrate(source, receiver.address, key_file=key_file, downtime_limit="200ms")
    receiver.join()
    assert receiver.error is None and receiver.result is not None
    assert np.array_equal(receiver.memory_at_resume, source.memory)


def run_through_proxy(key_file: str, receivers: list[Receiver], mutate: Mutator, match: str,
                      dest_key: str | None = None, in_handshake: bool = False, retry_here: bool = True,
                      **receive_options: object) -> None:
    """Migrate through a relay that does ``mutate``: the source fails with ``match`` and keeps its VM. A failure
    after the destination admitted the stream ends that destination with nothing resumed; one ``in_handshake``
    is a refused connection, which the destination reports while it keeps listening for a real source."""
    source = running_source()
    refusals: list[dict[str, Any]] = []

    def note_refusal(kind: str, record: dict[str, Any]) -> None:
        if kind == "refused":
            refusals.append(record)

    receiver = start_receiver(dest_key or key_file, progress=note_refusal, accept_timeout=20.0, **receive_options)
    receivers.append(receiver)
    proxy = Proxy(receiver.address, mutate).start()
    try:
        with pytest.raises(MigrationError, match=match):
            migrate(source, proxy.address, key_file=key_file, downtime_limit="200ms", io_timeout=5)
        assert_source_intact(source)
        if in_handshake:
            wait_for(lambda: bool(refusals), what="the destination to report the refused connection")
            assert refusals[0]["peer"].startswith("127.0.0.1:") and refusals[0]["reason"]
            assert receiver.thread is not None and receiver.thread.is_alive(), "the listener gave up"
            if retry_here:  # the same destination takes a real source now
                migrate(source, receiver.address, key_file=key_file, downtime_limit="200ms")
                receiver.join()
                assert receiver.error is None and receiver.result is not None
                assert np.array_equal(receiver.memory_at_resume, source.memory)
                return
            receiver.listener.close()
            receiver.join()
            return
        receiver.join()
        assert isinstance(receiver.error, MigrationError), receiver.error
        assert receiver.result is None, "the destination resumed a VM from a failed migration"
        assert "nothing was resumed here" in str(receiver.error)
        assert_retry_succeeds(source, key_file, receivers)
    finally:
        proxy.close()
        source.stop()


def cut_after(direction: str, offset: int) -> Mutator:
    """Forward bytes until ``offset`` of ``direction``, then drop the connection."""
    def mutate(way: str, at: int, chunk: bytes) -> bytes | None:
        if way == direction and at + len(chunk) > offset:
            return None
        return chunk
    return mutate


@pytest.mark.parametrize(("direction", "offset", "phase"), [
    ("up", 40, "handshake"),
    ("up", 2_000, "header"),
    ("up", 3 << 20, "round 0"),
    ("down", 0, "challenge"),
    ("down", 80, "ready"),
])
def test_connection_loss_at_any_phase(direction: str, offset: int, phase: str, key_file: str,
                                      receivers: list[Receiver]) -> None:
    run_through_proxy(key_file, receivers, cut_after(direction, offset), match=".",
                      in_handshake=phase in ("handshake", "challenge"))


def test_connection_loss_before_verified(key_file: str, receivers: list[Receiver]) -> None:
    """The destination's third message is Verified: cut it, and the source keeps the VM."""
    replies = []

    def mutate(way: str, at: int, chunk: bytes) -> bytes | None:
        if way == "down":
            replies.append(len(chunk))
            if len(replies) == 3:
                return None
        return chunk
    run_through_proxy(key_file, receivers, mutate, match=".")


def test_a_corrupt_frame_is_refused(key_file: str, receivers: list[Receiver]) -> None:
    def flip(way: str, at: int, chunk: bytes) -> bytes:
        target = 1_500_000
        if way == "up" and at <= target < at + len(chunk):
            data = bytearray(chunk)
            data[target - at] ^= 0x40
            return bytes(data)
        return chunk
    run_through_proxy(key_file, receivers, flip, match="failed authentication|corrupt|tampered")


def test_a_replayed_frame_is_refused(key_file: str, receivers: list[Receiver]) -> None:
    state = {"done": False}

    def duplicate(way: str, at: int, chunk: bytes) -> bytes:
        if way == "up" and at > 2_000_000 and not state["done"]:
            state["done"] = True
            return chunk + chunk
        return chunk
    run_through_proxy(key_file, receivers, duplicate, match="out of sequence|replay|authentication|corrupt")


def test_a_version_mismatch_is_named(key_file: str, receivers: list[Receiver]) -> None:
    def other_version(way: str, at: int, chunk: bytes) -> bytes:
        if way == "up" and at == 0:
            return chunk[:8] + bytes([7]) + chunk[9:]
        return chunk
    run_through_proxy(key_file, receivers, other_version, match="version", in_handshake=True)


def test_a_peer_without_the_key_is_refused(key_file: str, tmp_path: Path, receivers: list[Receiver]) -> None:
    other = str(generate_key_file(tmp_path / "other.key"))
    run_through_proxy(key_file, receivers, lambda way, at, chunk: chunk, dest_key=other,
                      match="key does not match", in_handshake=True, retry_here=False)


def test_a_memory_size_mismatch_is_named(key_file: str, receivers: list[Receiver]) -> None:
    run_through_proxy(key_file, receivers, lambda way, at, chunk: chunk, memory=128 << 20, in_handshake=True,
                      retry_here=False,
                      match=r"refused the migration: destination: the source's guest has 64\.0 MiB \(16384 pages in 1 "
                            r"slot\) of memory, this destination accepts 128\.0 MiB \(--memory\): give both sides")


def test_a_destination_that_stops_reading(key_file: str, receivers: list[Receiver]) -> None:
    """The path stalls mid-round (a hung host, a dead link that sends no reset): the source's write times out
    after io_timeout, it says so, and keeps the VM."""
    source = running_source()
    receiver = start_receiver(key_file)
    receivers.append(receiver)
    release = threading.Event()

    def stall(way: str, at: int, chunk: bytes) -> bytes | None:
        if way == "up" and at > 2_000_000:
            release.wait(30)  # the relay reads nothing more: the source's socket fills up
            return None
        return chunk
    proxy = Proxy(receiver.address, stall).start()
    try:
        began = time.monotonic()
        with pytest.raises(MigrationError, match=r"sending failed.*keeps running"):
            migrate(source, proxy.address, key_file=key_file, downtime_limit="200ms", io_timeout=2)
        assert time.monotonic() - began < 15
        release.set()
        receiver.join()
        assert isinstance(receiver.error, MigrationError) and receiver.result is None
        assert_source_intact(source)
        assert_retry_succeeds(source, key_file, receivers)
    finally:
        release.set()
        proxy.close()
        source.stop()


def test_the_destination_dying_mid_migration(key_file: str, receivers: list[Receiver]) -> None:
    """A real destination process, killed with SIGKILL while pages flow."""
    source = Machine("256M", vcpus=2, workload="random", rate=20_000)
    source.start()
    wait_for(lambda: source.progress > 2000, what="the guest to write")
    destination = subprocess.Popen([sys.executable, "-m", "dirtylog", "receive", "--listen", "127.0.0.1:0",
                                    "--key-file", key_file, "--json"], stdout=subprocess.PIPE, text=True)
    try:
        assert destination.stdout is not None
        address = __import__("json").loads(destination.stdout.readline())["address"]

        def kill_later() -> None:
            time.sleep(0.3)
            os.kill(destination.pid, signal.SIGKILL)

        threading.Thread(target=kill_later, daemon=True).start()
        with pytest.raises(MigrationError, match="keeps running"):
            migrate(source, address, key_file=key_file, downtime_limit="1ms", bandwidth="100M", io_timeout=5)
        assert_source_intact(source)
        assert_retry_succeeds(source, key_file, receivers)
    finally:
        destination.kill()
        destination.wait()
        source.stop()


def test_the_source_dying_leaves_nothing_running(key_file: str) -> None:
    """A real source process killed mid-migration: the destination discards its copy."""
    receiver = start_receiver(key_file, io_timeout=3.0)
    source = subprocess.Popen([sys.executable, "-m", "dirtylog", "migrate", "--to", receiver.address, "--key-file",
                               key_file, "--memory", "256M", "--workload", "random", "--rate", "20000",
                               "--bandwidth", "50M", "--warmup", "200ms", "--json"], stdout=subprocess.PIPE)
    try:
        assert source.stdout is not None
        source.stdout.readline()  # the setup event: streaming has begun
        time.sleep(0.3)
        source.kill()
        receiver.join()
        assert isinstance(receiver.error, MigrationError)
        assert receiver.result is None
    finally:
        source.kill()
        source.wait()
