"""Debian's arm64 packages on an x86 host, without touching the host's dpkg: apt with a private state.

``apt-get`` runs with its own state, cache and sources list under the lab's cache directory and with
``APT::Architecture=arm64``, so ``update`` reads only the arm64 package lists and ``download`` fetches
``.deb`` files into a directory; ``dpkg-deb -x`` unpacks them. Nothing is installed on the host and its
architecture list stays as it was.

The archive is reached through the mirror the host's own apt uses (its sources, Debian's keyring), so
a host behind a registry mirror needs no configuration; ``DIRTYLOG_DEBIAN_MIRROR`` and
``DIRTYLOG_DEBIAN_SECURITY_MIRROR`` override it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from dirtylog.lab.errors import RegistryError

KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
#: The kernels the lab offers, by the name ``--kernel`` takes: (Debian codename, version).
RELEASES = {"debian12": "bookworm", "debian13": "trixie"}
KERNEL_METAPACKAGE = "linux-image-cloud-arm64"


@dataclass(frozen=True)
class Mirrors:
    """Where Debian's archive and its security archive are reached from this host."""

    archive: str
    security: str


def _source_entries(text: str, deb822: bool) -> list[tuple[str, list[str]]]:
    """(URI, suites) of every ``deb`` entry in a sources file."""
    entries = []
    if deb822:
        for stanza in re.split(r"\n\s*\n", text):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if line.startswith("#") or ":" not in line or line[:1].isspace():
                    continue
                key, _, value = line.partition(":")
                fields[key.strip().lower()] = value.strip()
            if "deb" in fields.get("types", "").split() and fields.get("enabled", "yes") != "no":
                entries += [(uri, fields.get("suites", "").split()) for uri in fields.get("uris", "").split()]
    else:
        for line in text.splitlines():
            words = re.sub(r"\[[^]]*\]", "", line.split("#")[0]).split()
            if len(words) >= 3 and words[0] == "deb":
                entries.append((words[1], [words[2]]))
    return entries


def host_mirrors(etc: Path = Path("/etc/apt")) -> Mirrors:
    """The Debian archive and security URIs the host's apt is configured with (or the environment's)."""
    archive = os.environ.get("DIRTYLOG_DEBIAN_MIRROR", "")
    security = os.environ.get("DIRTYLOG_DEBIAN_SECURITY_MIRROR", "")
    files = [(etc / "sources.list", False)]
    files += [(path, path.suffix == ".sources") for path in sorted((etc / "sources.list.d").glob("*"))
              if path.suffix in (".list", ".sources")]
    for path, deb822 in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        for uri, suites in _source_entries(text, deb822):
            uri = uri.rstrip("/")
            if any(suite.endswith("-security") for suite in suites) or uri.endswith("-security"):
                security = security or uri
            elif uri.endswith("/debian"):
                archive = archive or uri
    if not archive:
        raise RegistryError(
            "no Debian archive found in the host's apt sources (/etc/apt): the arm64 lab fetches its kernel "
            "and Python from Debian's arm64 packages; set DIRTYLOG_DEBIAN_MIRROR to a Debian mirror URI")
    return Mirrors(archive, security or archive.removesuffix("/debian") + "/debian-security")


class Apt:
    """``apt-get`` / ``apt-cache`` for one Debian release's arm64 packages, with state under ``root``."""

    def __init__(self, root: Path, codename: str, mirrors: Mirrors) -> None:
        if shutil.which("apt-get") is None:
            raise RegistryError("apt-get is not installed: the arm64 lab needs a Debian or Ubuntu host's apt "
                                "to fetch Debian's arm64 packages")
        if not Path(KEYRING).exists():
            raise RegistryError(f"{KEYRING} is missing: install debian-archive-keyring so apt can check the "
                                "archive's signatures")
        self.root = root
        self.codename = codename
        for sub in ("state/lists/partial", "cache/archives/partial", "etc/parts", "debs"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        (root / "state/status").touch()
        options = f"arch=arm64 signed-by={KEYRING}"
        (root / "etc/sources.list").write_text(
            f"deb [{options}] {mirrors.archive} {codename} main\n"
            f"deb [{options}] {mirrors.archive} {codename}-updates main\n"
            f"deb [{options}] {mirrors.security} {codename}-security main\n")
        parts = root / "etc/parts"
        self._options = [
            f"-oDir::State={root / 'state'}", f"-oDir::State::status={root / 'state/status'}",
            f"-oDir::Cache={root / 'cache'}", f"-oDir::Etc::SourceList={root / 'etc/sources.list'}",
            f"-oDir::Etc::SourceParts={parts}", f"-oDir::Etc::Preferences={root / 'etc/preferences'}",
            f"-oDir::Etc::PreferencesParts={parts}", "-oAPT::Architecture=arm64", "-oAPT::Architectures::=arm64",
            "-oDebug::NoLocking=1", "-oAPT::Sandbox::User=root", "-oAcquire::Retries=2", "-qq",
        ]

    def _run(self, tool: str, *args: str, cwd: Path | None = None) -> str:
        command = [tool, *self._options, *args]
        try:
            done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600, check=False)
        except subprocess.TimeoutExpired:
            raise RegistryError(f"{tool} {' '.join(args)} took more than 10 minutes; is the Debian mirror "
                                "reachable?") from None
        if done.returncode != 0:
            detail = (done.stderr.strip() or done.stdout.strip()).splitlines()[-3:]
            raise RegistryError(f"{tool} {' '.join(args)} for Debian {self.codename} arm64 failed: "
                                f"{' / '.join(detail) or f'exit status {done.returncode}'}")
        return done.stdout

    def update(self) -> None:
        """Fetch the arm64 package lists of the release (about 10 MB)."""
        self._run("apt-get", "update")
        lists = list((self.root / "state/lists").glob("*binary-arm64_Packages*"))
        if not lists:
            raise RegistryError(f"apt-get update found no arm64 package list for Debian {self.codename}; is the "
                                "mirror serving that release?")

    def show(self, *packages: str) -> list[dict[str, str]]:
        """The fields (``Package``, ``Version``, ``Depends``, ...) of the candidate version of each package."""
        text = self._run("apt-cache", "show", "--no-all-versions", *packages)
        stanzas: list[dict[str, str]] = []
        for stanza in re.split(r"\n\s*\n", text.strip()):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if line and not line[0].isspace() and ":" in line:
                    key, _, value = line.partition(":")
                    fields.setdefault(key, value.strip())
            if "Package" in fields:
                stanzas.append(fields)
        found = {fields["Package"] for fields in stanzas}
        absent = [package for package in packages if package not in found]
        if absent:
            raise RegistryError(f"Debian {self.codename} arm64 has no package(s) {absent}")
        return stanzas

    def kernel_package(self) -> str:
        """The versioned kernel package the cloud kernel metapackage points at (linux-image-X-cloud-arm64)."""
        depends = self.show(KERNEL_METAPACKAGE)[0].get("Depends", "")
        match = re.search(r"(linux-image-[^\s,(]+-cloud-arm64)", depends)
        if match is None:
            raise RegistryError(f"{KERNEL_METAPACKAGE} in Debian {self.codename} depends on no versioned kernel "
                                f"({depends!r})")
        return match.group(1)

    def versions(self, packages: list[str]) -> dict[str, str]:
        """Candidate version of each package."""
        return {fields["Package"]: fields["Version"] for fields in self.show(*packages)}

    def download(self, packages: list[str]) -> list[Path]:
        """The ``.deb`` files of ``packages`` at their candidate versions (downloaded once, then kept)."""
        debs = self.root / "debs"
        wanted = self.versions(packages)

        def find(package: str) -> Path | None:
            version = wanted[package].replace(":", "%3a")
            return next(iter(debs.glob(f"{package}_{version}_*.deb")), None)

        missing = [package for package in packages if find(package) is None]
        if missing:
            self._run("apt-get", "download", *missing, cwd=debs)
        found = {package: find(package) for package in packages}
        absent = [package for package, path in found.items() if path is None]
        if absent:
            raise RegistryError(f"apt-get download left no .deb for {absent} (Debian {self.codename} arm64)")
        return [path for path in found.values() if path is not None]


def extract(deb: Path, into: Path) -> None:
    """Unpack a ``.deb``'s files into ``into`` (``dpkg-deb -x``: no maintainer scripts, no dpkg database)."""
    if shutil.which("dpkg-deb") is None:
        raise RegistryError("dpkg-deb is not installed: the arm64 lab unpacks Debian packages with it")
    done = subprocess.run(["dpkg-deb", "-x", str(deb), str(into)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RegistryError(f"dpkg-deb -x {deb.name} failed: {done.stderr.strip()}")
