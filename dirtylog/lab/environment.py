"""The arm64 environment, built once and cached: a kernel per release, a root filesystem, a per-run payload.

What is cached (under ``$XDG_CACHE_HOME/dirtylog/arm64``, by default ``~/.cache/dirtylog/arm64``):

* ``kernel/<package>/vmlinuz`` and its ``config``: the Debian cloud kernel of a release (``debian12``: 6.1,
  ``debian13``: 6.12), KVM and the PL011 console built in, so no modules are needed;
* ``rootfs-<key>.cpio``: Debian 12's arm64 Python 3.11, glibc and busybox, with PyPI's aarch64 wheels
  unpacked beside it and every module precompiled; the key hashes the package versions and wheels, so a
  new version makes a new file;
* ``<release>.json``: what the last build resolved, so later runs start without touching a registry
  (``refresh=True`` resolves again).

Per run, a small second archive carries dirtylog's current source tree, the command and its
environment; the kernel unpacks both archives of the initrd one after the other.
"""

from __future__ import annotations

import compileall
import hashlib
import io
import json
import os
import shlex
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from py_compile import PycInvalidationMode

from dirtylog.lab import debian, wheels
from dirtylog.lab.cpio import CpioWriter
from dirtylog.lab.errors import LabError

#: Debian 12 arm64 packages of the guest's userland: Python 3.11 and what its modules load.
USERLAND_PACKAGES = [
    "libc6", "libgcc-s1", "libstdc++6", "zlib1g", "libffi8", "libexpat1", "libbz2-1.0", "liblzma5",
    "libpython3.11-minimal", "libpython3.11-stdlib", "python3.11-minimal", "busybox-static",
]
USERLAND_RELEASE = "debian12"
FORMAT = 1  # bump when the root filesystem's layout changes, so old caches are rebuilt
EXIT_MARKER = "@@dirtylog-exit"

_TRIM = [
    "usr/share/doc", "usr/share/man", "usr/share/locale", "usr/share/lintian", "usr/share/info", "usr/share/bug",
    "usr/lib/aarch64-linux-gnu/gconv", "usr/lib/python3.11/test", "usr/lib/python3.11/idlelib",
    "usr/lib/python3.11/tkinter", "usr/lib/python3.11/turtledemo", "usr/lib/python3.11/ensurepip",
    "usr/lib/python3.11/lib2to3", "usr/lib/python3.11/pydoc_data", "usr/lib/python3.11/config-3.11-aarch64-linux-gnu",
]

INIT = r"""#!/bin/busybox sh
# PID 1 of the arm64 lab: mount what dirtylog needs, run the command, report its status, power off.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
mkdir -p /dev/pts /dev/shm /tmp /root
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
export PATH=/usr/local/bin:/usr/bin:/usr/sbin HOME=/root PYTHONPATH=/opt/dirtylog/src:/opt/dirtylog/site
export PYTHONDONTWRITEBYTECODE=1 LANG=C.UTF-8
[ -f /opt/dirtylog/run/env ] && . /opt/dirtylog/run/env
cd /opt/dirtylog/src
if [ -f /opt/dirtylog/run/shell ]; then
    echo "arm64 lab: $(uname -r), $(nproc) CPUs; dirtylog is on PYTHONPATH; exit to power off"
    setsid cttyhack sh -l
    status=$?
else
    sh /opt/dirtylog/run/command
    status=$?
fi
echo
echo "@@dirtylog-exit $status@@"
poweroff -f
"""

PROFILE = r"""export PS1='arm64:\w# '
"""

DIRTYLOG_SCRIPT = """#!/usr/bin/python3.11
import sys
from dirtylog.cli import main
sys.exit(main())
"""


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/dirtylog/arm64`` (default ``~/.cache/dirtylog/arm64``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dirtylog" / "arm64"


@dataclass(frozen=True)
class Environment:
    """A built environment: the kernel to boot and the root filesystem archive."""

    release: str
    kernel_package: str
    kernel: str
    kernel_config: str
    rootfs: str

    @property
    def kernel_version(self) -> str:
        return self.kernel_package.removeprefix("linux-image-")


def _note(progress: bool, text: str) -> None:
    if progress:
        print(f"arm64 lab: {text}", file=sys.stderr, flush=True)


def build(release: str = "debian12", *, refresh: bool = False, progress: bool = True,
          root: Path | None = None) -> Environment:
    """The environment for ``release``'s kernel: from the cache when it is complete, else built now."""
    if release not in debian.RELEASES:
        raise LabError(f"unknown kernel {release!r}; choose one of {', '.join(debian.RELEASES)}")
    root = root or cache_root()
    root.mkdir(parents=True, exist_ok=True)
    manifest = root / f"{release}.json"
    if manifest.exists() and not refresh:
        try:
            cached = Environment(**json.loads(manifest.read_text()))
        except (ValueError, TypeError):
            cached = None
        if cached and all(Path(p).exists() for p in (cached.kernel, cached.kernel_config, cached.rootfs)):
            return cached
    mirrors = debian.host_mirrors()
    kernel_apt = debian.Apt(root / "apt" / debian.RELEASES[release], debian.RELEASES[release], mirrors)
    _note(progress, f"resolving Debian {debian.RELEASES[release]} arm64 packages")
    kernel_apt.update()
    package = kernel_apt.kernel_package()
    kernel, config = _kernel(kernel_apt, package, root / "kernel" / package, progress)
    userland_apt = kernel_apt
    if release != USERLAND_RELEASE:
        codename = debian.RELEASES[USERLAND_RELEASE]
        userland_apt = debian.Apt(root / "apt" / codename, codename, mirrors)
        userland_apt.update()
    rootfs = _rootfs(userland_apt, root, progress)
    environment = Environment(release, package, str(kernel), str(config), str(rootfs))
    manifest.write_text(json.dumps(asdict(environment), indent=1))
    return environment


def _kernel(apt: debian.Apt, package: str, where: Path, progress: bool) -> tuple[Path, Path]:
    kernel, config = where / "vmlinuz", where / "config"
    if kernel.exists() and config.exists():
        return kernel, config
    _note(progress, f"downloading {package}")
    (deb,) = apt.download([package])
    with tempfile.TemporaryDirectory(dir=where.parent.parent) as scratch:
        debian.extract(deb, Path(scratch))
        boot = Path(scratch) / "boot"
        images, configs = sorted(boot.glob("vmlinuz-*")), sorted(boot.glob("config-*"))
        if not images or not configs:
            raise LabError(f"{deb.name} has no /boot/vmlinuz-* and config-*; is it a kernel package?")
        where.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(configs[0], config)
        shutil.copyfile(images[0], kernel)  # last: its presence marks a complete kernel
    return kernel, config


def _rootfs(apt: debian.Apt, root: Path, progress: bool) -> Path:
    versions = apt.versions(USERLAND_PACKAGES)
    _note(progress, "fetching aarch64 wheels from the package index")
    wheel_files = wheels.download(root / "wheels")
    key_source = json.dumps([FORMAT, sorted(versions.items()), sorted(w.name for w in wheel_files)])
    key = hashlib.sha256(key_source.encode()).hexdigest()[:16]
    archive = root / f"rootfs-{key}.cpio"
    if archive.exists():
        return archive
    _note(progress, f"downloading {len(USERLAND_PACKAGES)} Debian packages (Python 3.11, glibc, busybox)")
    debs = apt.download(USERLAND_PACKAGES)
    with tempfile.TemporaryDirectory(dir=root) as scratch:
        tree = Path(scratch) / "root"
        tree.mkdir()
        for deb in debs:
            debian.extract(deb, tree)
        _merge_usr(tree)
        for path in _TRIM:
            shutil.rmtree(tree / path, ignore_errors=True)
        site = tree / "opt/dirtylog/site"
        wheels.unpack(wheel_files, site)
        for tests in [p for p in site.rglob("tests") if p.is_dir()]:
            shutil.rmtree(tests, ignore_errors=True)
        _precompile(tree, ["usr/lib/python3.11", "opt/dirtylog/site"])
        (tree / "init").write_text(INIT)
        (tree / "init").chmod(0o755)
        (tree / "etc").mkdir(exist_ok=True)
        (tree / "etc/profile").write_text(PROFILE)
        (tree / "usr/local/bin").mkdir(parents=True, exist_ok=True)
        (tree / "usr/local/bin/dirtylog").write_text(DIRTYLOG_SCRIPT)
        (tree / "usr/local/bin/dirtylog").chmod(0o755)
        for name in ("python3", "python"):
            (tree / "usr/bin" / name).symlink_to("python3.11")
        for name in ("proc", "sys", "dev", "tmp", "root", "run"):
            (tree / name).mkdir(exist_ok=True)
        partial = archive.with_suffix(".partial")
        with partial.open("wb") as out:
            writer = CpioWriter(out)
            writer.tree(tree)
            writer.close()
        partial.rename(archive)
    _note(progress, f"root filesystem {archive.stat().st_size >> 20} MiB cached in {archive.parent}")
    return archive


def _merge_usr(tree: Path) -> None:
    """Debian 12's merged /usr: /bin, /sbin and /lib are links into /usr, so every path a binary names works."""
    for name in ("bin", "sbin", "lib"):
        top = tree / name
        if top.is_dir() and not top.is_symlink():
            shutil.copytree(top, tree / "usr" / name, symlinks=True, dirs_exist_ok=True)
            shutil.rmtree(top)
        (tree / "usr" / name).mkdir(parents=True, exist_ok=True)
        top.symlink_to(f"usr/{name}")


def _precompile(tree: Path, directories: list[str]) -> None:
    """Bytecode for every module, made here instead of under emulation (the guest's Python is 3.11 too).

    Unchecked-hash pycs are used as they are, whatever the source's timestamp; ``co_filename`` names
    the path inside the guest. Skipped when this host's Python is not 3.11 (other bytecode)."""
    if sys.version_info[:2] != (3, 11):
        return
    for directory in directories:
        compileall.compile_dir(tree / directory, quiet=2, stripdir=str(tree), prependdir="/", workers=1,
                               invalidation_mode=PycInvalidationMode.UNCHECKED_HASH)


def source_tree() -> Path:
    """The dirtylog source tree this process runs from (its ``dirtylog`` package's parent)."""
    import dirtylog

    return Path(dirtylog.__file__).resolve().parent.parent


def payload(command: list[str] | None, *, environment: dict[str, str] | None = None) -> bytes:
    """The per-run archive: dirtylog's source tree, its bytecode, and the command (None: a shell)."""
    source = source_tree()
    out = io.BytesIO()
    writer = CpioWriter(out)
    with tempfile.TemporaryDirectory() as scratch:
        tree = Path(scratch)
        for name in ("dirtylog", "tests", "bench"):
            if (source / name).is_dir():
                shutil.copytree(source / name, tree / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        for name in ("pyproject.toml", "README.md"):
            if (source / name).is_file():
                shutil.copyfile(source / name, tree / name)
        if sys.version_info[:2] == (3, 11):
            compileall.compile_dir(tree, quiet=2, stripdir=str(tree), prependdir="/opt/dirtylog/src", workers=1,
                                   invalidation_mode=PycInvalidationMode.UNCHECKED_HASH)
        writer.tree(tree, "opt/dirtylog/src")
    env = dict(environment or {})
    writer.file("opt/dirtylog/run/env", "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items()).encode())
    if command is None:
        writer.file("opt/dirtylog/run/shell", b"")
    else:
        writer.file("opt/dirtylog/run/command", (shlex.join(command) + "\n").encode())
    writer.close()
    return out.getvalue()
