"""QEMU's snapshot jobs on real KVM, driven by the ``qemu.qmp`` library: a ``dirtylog run --qmp --snapshot-dir``
process saves (full, then an incremental live layer), loads (the guest's counters go back, then rise again),
deletes (refused while a layer depends on a tag), with QEMU's JOB_STATUS_CHANGE sequence, query-jobs and
job-dismiss; failures (no snapshot dir, unknown tag, duplicate or bad job ids, a corrupt or foreign file) conclude
the job with an error and leave the VM running as it was. An in-process monitor shows that a loaded VM's memory
is the snapshot's."""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from qemu.qmp import EventListener, ExecuteError, QMPClient

from dirtylog.snapshot.layer import Layer
from dirtylog.units import PAGE_SIZE
from tests.control.conftest import DIRTYLOG, Monitors, Served, error_of, running_machine
from tests.snapshot.helpers import changed_pages, corrupt, held_pages, restored_memory

pytestmark = pytest.mark.kvm

Serve = Callable[..., Served]
GUEST = ["--memory", "128M", "--vcpus", "2", "--workload", "random", "--rate", "20000"]
SUCCESS = ["created", "running", "waiting", "pending", "concluded"]
FAILURE = ["created", "running", "aborting", "concluded"]


class Session:
    """A QMPClient on a dirtylog process, with its events and a way to run a job to its end."""

    def __init__(self, client: QMPClient, listener: EventListener) -> None:
        self.client = client
        self.listener = listener
        self.events: list[dict[str, Any]] = []

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        return await self.client.execute(command, arguments)

    async def error(self, command: str, arguments: dict[str, Any] | None = None) -> str:
        try:
            await self.client.execute(command, arguments)
        except ExecuteError as error:
            assert error.error_class == "GenericError"
            return str(error)
        raise AssertionError(f"{command} {arguments} succeeded")

    async def job(self, command: str, job_id: str, **arguments: Any) -> tuple[dict[str, Any], list[str]]:
        """Run ``command`` as job ``job_id`` until it concludes; its JobInfo and the events it caused (STOP,
        RESUME and its JOB_STATUS_CHANGE statuses, in order). The job is dismissed."""
        self.listener.clear()
        assert await self.execute(command, {"job-id": job_id, **arguments}) == {}
        deadline = time.monotonic() + 60
        while True:
            jobs = await self.execute("query-jobs")
            info = next(job for job in jobs if job["id"] == job_id)
            if info["status"] == "concluded":
                break
            assert time.monotonic() < deadline, info
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.05)  # the last event may still be on its way
        seen = []
        for event in self.listener.clear():
            if event["event"] == "JOB_STATUS_CHANGE":
                assert event["data"]["id"] == job_id
                seen.append(event["data"]["status"])
            elif event["event"] in ("STOP", "RESUME"):
                seen.append(event["event"])
        assert await self.execute("job-dismiss", {"id": job_id}) == {}
        await asyncio.sleep(0.05)
        assert [e["data"] for e in self.listener.clear() if e["event"] == "JOB_STATUS_CHANGE"] == \
            [{"status": "null", "id": job_id}]
        assert all(job["id"] != job_id for job in await self.execute("query-jobs"))
        return info, seen

    async def progress(self) -> int:
        return int((await self.execute("x-dirtylog-query-progress"))["progress"])

    async def rising(self, beyond: int, timeout: float = 10) -> int:
        """Wait until the guest's progress passes ``beyond`` (the VM runs); returns it."""
        deadline = time.monotonic() + timeout
        while (now := await self.progress()) <= beyond:
            assert time.monotonic() < deadline, f"the guest's progress stays at {now}, not past {beyond}"
            await asyncio.sleep(0.02)
        return now

    async def quit(self) -> None:
        await self.execute("quit")
        with contextlib.suppress(EOFError):
            await self.client.disconnect()


async def connect(path: str) -> Session:
    client = QMPClient("dirtylog")
    await client.connect(path)
    listener = EventListener()
    client.register_listener(listener)
    return Session(client, listener)


def first_data_page(path: Path) -> int:
    """A page of the full snapshot ``path`` that is not all zero (so it is in the file)."""
    with Layer.open(path) as layer:
        zero = np.unpackbits(layer.zero_words().copy().view(np.uint8), bitorder="little")
    return int(np.flatnonzero(zero == 0)[0])


async def save_load_delete(path: str, folder: Path) -> None:
    qmp = await connect(path)
    assert await qmp.execute("query-jobs") == []

    # A full save: QEMU's job sequence, the VM stopped around it.
    info, seen = await qmp.job("snapshot-save", "save0", tag="s0", vmstate="disk0", devices=["disk0"])
    assert seen == ["created", "running", "STOP", "RESUME", "waiting", "pending", "concluded"]
    snapshot = info.pop("x-dirtylog-snapshot")
    assert info == {"current-progress": 1, "status": "concluded", "total-progress": 1, "type": "snapshot-save",
                    "id": "save0"}
    assert snapshot["kind"] == "full" and snapshot["file"] == str(folder / "s0.dlsnap") and not snapshot["live"]
    assert (folder / "s0.dlsnap").exists() and snapshot["pages"] == (128 << 20) // PAGE_SIZE
    assert await qmp.execute("query-status") == {"running": True, "status": "running"}

    # Job ids: QEMU's rules and messages, checked before any job exists.
    assert await qmp.error("snapshot-save", {"job-id": "1st", "tag": "x"}) == "Invalid job ID '1st'"
    assert await qmp.error("job-dismiss", {"id": "nobody"}) == "Job not found"

    # Saved again: an incremental layer, live (the guest is not stopped, so no STOP/RESUME).
    await asyncio.sleep(0.3)
    info, seen = await qmp.job("snapshot-save", "save1", tag="s1", **{"x-dirtylog-live": True})
    assert seen == SUCCESS
    layer = info["x-dirtylog-snapshot"]
    assert (layer["kind"], layer["parent"], layer["live"]) == ("incremental", "s0", True)
    assert 0 < layer["pages"] < snapshot["pages"]  # (not fewer bytes: the full one's zero pages are holes)
    with Layer.open(folder / "s1.dlsnap") as s1:
        saved_progress = sum(s1.info["vcpu_progress"])

    # A duplicate job id: refused while the first job is still listed (until job-dismiss).
    assert await qmp.execute("snapshot-save", {"job-id": "dup", "tag": "s1"}) == {}  # s1 exists: the job fails
    assert await qmp.error("snapshot-save", {"job-id": "dup", "tag": "s9"}) == "Job ID 'dup' already in use"
    deadline = time.monotonic() + 30
    while (dup := (await qmp.execute("query-jobs"))[0])["status"] != "concluded":
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    assert dup["error"].startswith("Snapshot 's1' already exists") and dup["id"] == "dup"
    await qmp.execute("job-dismiss", {"id": "dup"})

    # Load s1: the guest's counters go back to the snapshot's, and rise again.
    ahead = await qmp.rising(saved_progress + 20000, timeout=60)  # well past the snapshot, however loaded the host
    info, seen = await qmp.job("snapshot-load", "load1", tag="s1", vmstate="disk0", devices=["disk0"])
    assert seen == ["created", "running", "STOP", "RESUME", "waiting", "pending", "concluded"]
    assert info == {"current-progress": 1, "status": "concluded", "total-progress": 1, "type": "snapshot-load",
                    "id": "load1"}
    back = await qmp.progress()
    assert saved_progress <= back < ahead, (saved_progress, back, ahead)
    await qmp.rising(back)
    assert await qmp.execute("query-status") == {"running": True, "status": "running"}

    # After the load the chain goes on from s1: the next save is a layer on it.
    info, _ = await qmp.job("snapshot-save", "save2", tag="s2")
    assert (info["x-dirtylog-snapshot"]["kind"], info["x-dirtylog-snapshot"]["parent"]) == ("incremental", "s1")

    # Delete: refused while a layer depends on the tag; then newest first; an unknown tag is no error (QEMU).
    info, seen = await qmp.job("snapshot-delete", "del0", tag="s0", devices=[])
    assert seen == FAILURE and info["type"] == "snapshot-delete"
    assert "cannot be deleted" in info["error"] and "s1" in info["error"] and (folder / "s0.dlsnap").exists()
    for job_id, tag in (("del2", "s2"), ("del1", "s1"), ("del0b", "s0"), ("del-none", "never")):
        info, seen = await qmp.job("snapshot-delete", job_id, tag=tag)
        assert seen == SUCCESS and "error" not in info, info
    assert not list(folder.glob("*.dlsnap"))

    # The loaded tag is gone: the next save is a full snapshot again.
    info, _ = await qmp.job("snapshot-save", "save3", tag="s3")
    assert info["x-dirtylog-snapshot"]["kind"] == "full"

    # Unknown, corrupt and foreign snapshots: the job fails, the VM runs on as it was (its counters never went back).
    before = await qmp.progress()
    info, seen = await qmp.job("snapshot-load", "load-none", tag="nope")
    assert seen == FAILURE and info["error"].startswith("Snapshot 'nope' does not exist")
    s3 = folder / "s3.dlsnap"
    corrupt(s3, PAGE_SIZE + first_data_page(s3) * PAGE_SIZE + 100)
    info, seen = await qmp.job("snapshot-load", "load-corrupt", tag="s3")
    assert seen == FAILURE and "corrupt" in info["error"] and "the VM runs on as it was" in info["error"], info
    (folder / "junk.dlsnap").write_bytes(b"not a snapshot at all\n" * 1000)
    info, seen = await qmp.job("snapshot-load", "load-junk", tag="junk")
    assert seen == FAILURE and "junk" in info["error"] and "the VM runs on as it was" in info["error"], info
    assert await qmp.execute("query-status") == {"running": True, "status": "running"}
    await qmp.rising(before)
    await qmp.quit()


def test_snapshot_jobs_save_load_and_delete_as_qemus_do(serve: Serve, tmp_path: Path) -> None:
    folder = tmp_path / "snapshots"
    served = serve("vm", "run", *GUEST, "--snapshot-dir", str(folder))
    asyncio.run(save_load_delete(served.path, folder))
    assert served.finish()[-1]["vm"] == "running" and served.process.returncode == 0


async def without_a_snapshot_dir(path: str) -> None:
    qmp = await connect(path)
    before = await qmp.progress()
    for command, arguments in (("snapshot-save", {"tag": "a"}), ("snapshot-load", {"tag": "a"}),
                               ("snapshot-delete", {"tag": "a"})):
        info, seen = await qmp.job(command, "j0", **arguments)
        assert seen == FAILURE, (command, seen)
        assert "--snapshot-dir DIR" in info["error"] and info["error"].startswith(command), info
    assert await qmp.execute("query-status") == {"running": True, "status": "running"}
    await qmp.rising(before)
    await qmp.quit()


def test_snapshot_jobs_fail_without_a_snapshot_dir_and_the_vm_runs_on(serve: Serve) -> None:
    served = serve("vm", "run", *GUEST)
    asyncio.run(without_a_snapshot_dir(served.path))
    assert served.process.wait(30) == 0


def wait_concluded(client: Any, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while True:
        info = next(job for job in client.cmd("query-jobs") if job["id"] == job_id)
        if info["status"] == "concluded":
            client.cmd("job-dismiss", id=job_id)
            return dict(info)
        assert time.monotonic() < deadline, info
        time.sleep(0.02)


def test_a_loaded_vm_has_the_snapshots_memory(monitors: Monitors, tmp_path: Path) -> None:
    machine = running_machine()
    monitor, client = monitors("vm", machine=machine, snapshot_dir=str(tmp_path / "snaps"))
    client.cmd("stop")
    client.cmd("snapshot-save", **{"job-id": "a", "tag": "a"})
    assert re.fullmatch("Job 'a' in state '(created|running)' cannot accept command verb 'dismiss'",
                        error_of(client, "job-dismiss", id="a"))
    assert "error" not in wait_concluded(client, "a")
    saved = machine.progress
    client.cmd("cont")
    time.sleep(0.5)
    client.cmd("stop")
    assert machine.progress > saved
    client.cmd("snapshot-load", **{"job-id": "load", "tag": "a"})
    assert "error" not in wait_concluded(client, "load")
    loaded = monitor.vm.machine
    assert loaded is not None and loaded is not machine
    assert client.cmd("query-status") == {"running": False, "status": "paused"}  # a paused VM stays paused
    # The loaded VM ran for a moment before it was paused again; a layer on "a" holds what it wrote then, and
    # every other page is the snapshot's, byte for byte.
    client.cmd("snapshot-save", **{"job-id": "b", "tag": "b"})
    info = wait_concluded(client, "b")
    assert info["x-dirtylog-snapshot"]["kind"] == "incremental", info
    written = set(held_pages(tmp_path / "snaps" / "b.dlsnap").tolist())
    differ = set(changed_pages(restored_memory(tmp_path / "snaps" / "a.dlsnap"), loaded.memory).tolist())
    # (the bounds only say "a moment", with room for a loaded host: the subset is the check)
    assert differ <= written and len(written) < 8192, (len(differ), len(written))
    assert saved <= loaded.progress < saved + 20000
    client.cmd("cont")
    before = loaded.progress
    time.sleep(0.2)
    assert loaded.progress > before
    # The chain's dirty log holds the VM's until x-dirtylog-end-snapshot-chain; the next save is then full.
    assert loaded.tracker is not None
    assert error_of(client, "migrate", uri="tcp:127.0.0.1:1").startswith("the VM's dirty log is in use")
    assert client.cmd("x-dirtylog-end-snapshot-chain") == {}
    assert loaded.tracker is None
    client.cmd("snapshot-save", **{"job-id": "c", "tag": "c"})
    assert wait_concluded(client, "c")["x-dirtylog-snapshot"]["kind"] == "full"
    # The job's own errors are the command's only when the command itself is wrong.
    assert error_of(client, "snapshot-load", **{"job-id": "load"}) == "Parameter 'tag' is missing"
    assert error_of(client, "snapshot-save", **{"job-id": "x", "tag": "t", "devices": "disk0"}) == \
        "Invalid parameter type for 'devices', expected: array"


def test_a_snapshot_dir_that_cannot_be_made_fails_before_the_socket_exists(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    socket_path = tmp_path / "vm.sock"
    done = subprocess.run([*DIRTYLOG, "run", *GUEST, "--qmp", f"unix:{socket_path}", "--snapshot-dir",
                           str(blocker / "snaps")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and f"cannot use --snapshot-dir {blocker / 'snaps'}: Not a directory" in done.stderr
    assert not socket_path.exists()
