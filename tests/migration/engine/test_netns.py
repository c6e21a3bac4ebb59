"""Migration between two hosts: two network namespaces joined by a veth pair, one process in each.

The test builds the namespaces itself (root and iproute2 needed) and removes them afterwards; it skips
with the reason where namespaces cannot be made.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from dirtylog.migration.keys import generate_key_file

pytestmark = [pytest.mark.kvm, pytest.mark.netns]
SOURCE_IP, DESTINATION_IP = "10.213.0.1", "10.213.0.2"


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@pytest.fixture
def hosts() -> Iterator[tuple[str, str]]:
    if shutil.which("ip") is None:
        pytest.skip("iproute2 (`ip`) is not installed: cannot build network namespaces")
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    tag = f"dl{os.getpid()}"
    source, destination = f"{tag}-src", f"{tag}-dst"
    try:
        ip("netns", "add", source)
        ip("netns", "add", destination)
        ip("link", "add", f"{tag}a", "type", "veth", "peer", "name", f"{tag}b")
        ip("link", "set", f"{tag}a", "netns", source)
        ip("link", "set", f"{tag}b", "netns", destination)
        for namespace, device, address in ((source, f"{tag}a", SOURCE_IP), (destination, f"{tag}b", DESTINATION_IP)):
            ip("-n", namespace, "addr", "add", f"{address}/24", "dev", device)
            ip("-n", namespace, "link", "set", device, "up")
            ip("-n", namespace, "link", "set", "lo", "up")
    except subprocess.CalledProcessError as error:
        for namespace in (source, destination):
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
        pytest.skip(f"cannot build network namespaces here: {error.stderr.strip()}")
    yield source, destination
    for namespace in (source, destination):
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True)


def test_migration_between_two_hosts(hosts: tuple[str, str], tmp_path: Path) -> None:
    source_ns, destination_ns = hosts
    key = str(generate_key_file(tmp_path / "k"))
    dirtylog = [sys.executable, "-m", "dirtylog"]
    receiver = subprocess.Popen(["ip", "netns", "exec", destination_ns, *dirtylog, "receive", "--listen",
                                 f"{DESTINATION_IP}:7000", "--key-file", key, "--duration", "500ms", "--json"],
                                stdout=subprocess.PIPE, text=True)
    try:
        assert receiver.stdout is not None
        assert json.loads(receiver.stdout.readline())["address"] == f"{DESTINATION_IP}:7000"
        source = subprocess.run(["ip", "netns", "exec", source_ns, *dirtylog, "migrate", "--to",
                                 f"{DESTINATION_IP}:7000", "--key-file", key, "--memory", "128M", "--workload",
                                 "random", "--rate", "20000", "--warmup", "300ms", "--json"],
                                capture_output=True, text=True, timeout=120)
        out, _ = receiver.communicate(timeout=120)
    finally:
        receiver.kill()
    assert source.returncode == 0, source.stdout + source.stderr
    assert receiver.returncode == 0, out
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    done = next(e for e in events if e["event"] == "completed")
    assert done["continued"] is True


def test_the_destination_is_unreachable_from_loopback_only_listeners(hosts: tuple[str, str], tmp_path: Path) -> None:
    """A listener left at its loopback default cannot be reached from the other host."""
    source_ns, destination_ns = hosts
    key = str(generate_key_file(tmp_path / "k"))
    dirtylog = [sys.executable, "-m", "dirtylog"]
    receiver = subprocess.Popen(["ip", "netns", "exec", destination_ns, *dirtylog, "receive", "--key-file", key,
                                 "--json", "--accept-timeout", "5s"], stdout=subprocess.PIPE, text=True)
    try:
        assert receiver.stdout is not None
        assert json.loads(receiver.stdout.readline())["address"].startswith("127.0.0.1:")
        source = subprocess.run(["ip", "netns", "exec", source_ns, *dirtylog, "migrate", "--to",
                                 f"{DESTINATION_IP}:7000", "--key-file", key, "--memory", "64M", "--warmup", "100ms"],
                                capture_output=True, text=True, timeout=60)
    finally:
        receiver.kill()
        receiver.wait()
    assert source.returncode == 1
    assert "nobody listens" in source.stdout or "cannot connect" in source.stdout
