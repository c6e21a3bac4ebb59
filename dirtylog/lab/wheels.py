"""PyPI's aarch64 wheels for the arm64 guest, fetched on the x86 host with ``pip download --platform``.

Debian 12's own ``python3-numpy`` is 1.24, older than the NumPy 2 dirtylog needs, so the guest's
packages come from PyPI as wheels for CPython 3.11 on glibc aarch64 (Debian 12's Python and libc),
through whatever index the host's pip is configured with. A wheel is a zip: unpacking it into a
directory on ``PYTHONPATH`` is an installation as far as ``import`` cares.

Left out on purpose: Numba and llvmlite (aarch64 wheels exist, but llvmlite alone is 43 MB and JIT
compiling under emulation costs seconds; :mod:`dirtylog.bitmap` has a pure NumPy path for ``runs()``),
matplotlib (``--plot`` is for people at the host), iced-x86 (x86 guest programs only).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from dirtylog.lab.errors import RegistryError

#: What dirtylog imports at run time inside the guest, and what its tests need there.
GUEST_REQUIREMENTS = (
    "numpy>=2.0", "rich>=13", "lz4>=4.3", "zstandard>=0.22", "xxhash>=3.4", "blake3>=0.4", "cryptography>=42",
    "pytest>=8", "hypothesis>=6.100",
)
# Debian 12 has glibc 2.36: every manylinux tag up to it runs there.
PLATFORMS = ("manylinux_2_36_aarch64", "manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64")
PYTHON_VERSION = "3.11"


def download(into: Path, requirements: tuple[str, ...] = GUEST_REQUIREMENTS) -> list[Path]:
    """Download the aarch64 / CPython 3.11 wheels of ``requirements`` and their dependencies into ``into``."""
    into.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
               "--only-binary=:all:", "--python-version", PYTHON_VERSION, "--implementation", "cp",
               *[f"--platform={platform}" for platform in PLATFORMS], "--dest", str(into), *requirements]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
    except subprocess.TimeoutExpired:
        raise RegistryError("pip download of the aarch64 wheels took more than 15 minutes; is the package index "
                            "reachable?") from None
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if "is ignored" not in line][-3:]
        raise RegistryError("pip download of the aarch64 wheels failed (is the package index reachable from "
                            f"this host?): {' / '.join(lines) or f'exit status {done.returncode}'}")
    return sorted(into.glob("*.whl"))


def unpack(wheels: list[Path], site: Path) -> None:
    """Unpack each wheel into ``site`` as pip would install it (``.data/purelib|platlib`` moved up)."""
    site.mkdir(parents=True, exist_ok=True)
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(site)
    for data in site.glob("*.data"):
        for kind in ("purelib", "platlib"):
            if (data / kind).is_dir():
                shutil.copytree(data / kind, site, dirs_exist_ok=True)
        shutil.rmtree(data)
