"""Stock Debian kernels for the VM tier: read tests/vm/kernels.txt, resolve, fetch, unpack.

    python3 tests/vm/kernels.py resolve [NAME...]  # what the mirror serves now (no download)
    python3 tests/vm/kernels.py fetch [NAME...]    # resolve + download + unpack (idempotent)
    python3 tests/vm/kernels.py paths NAME         # where the unpacked pieces are

Each line of kernels.txt names *what* to test -- a Debian suite and the image metapackage
of a kernel flavour (``bookworm linux-image-amd64``) -- never an exact build: Debian's
archive rotates builds (a security upload replaces the ABI, backports keep only the
newest), so exact pins rot. The concrete set is resolved from the mirror at run time:

* every suite gets its own private apt configuration under CACHE/apt/<suite>/ listing
  only that suite's pockets (``X``, ``X-updates`` and ``X-security`` for a release,
  just ``X-backports`` for backports) on the Debian mirror the host's apt already uses,
  read from /etc/apt/sources.list{,.d}; the system's sources and lists are untouched;
* the metapackage's candidate there (its version is the kernel's Debian version) depends
  on ``linux-image-<release>``; its ``linux-*`` dependencies with a version in their name
  are followed recursively (image, binary and modules packages on 7.x, headers, their
  ``-common`` half, kbuild), each at its pinned (``=``) or candidate version;
* ``KVMTRACE_KERNEL_VERSION="NAME=VERSION[,NAME=VERSION]"`` forces the metapackage
  version of a line, to reproduce a failure on a build the mirror still serves.

Packages are fetched with ``apt-get download`` into CACHE/debs (cached by name and
version), unpacked with ``dpkg-deb -x`` into CACHE/<release>/root and prepared so that

* virtme-ng finds the modules: ``vng -r CACHE/<release>/root/boot/vmlinuz-<release>``
  derives the modules directory from the image's location and links it to
  /lib/modules/<release> in the guest (after ``depmod -b``, run here);
* bcc finds the headers: the modules directory gets ``build`` and ``source`` links to the
  unpacked linux-headers-<release> and -common trees, the same layout an installed
  linux-headers package gives (bcc reads /lib/modules/$(uname -r)/{build,source});
* kbuild can build an out-of-tree module against them: Debian's
  linux-headers-<release>/Makefile names the header trees by absolute /usr/src path
  (the -common Makefile it includes; on 7.x also KBUILD_OUTPUT), rewritten to the
  unpacked copies.

A suite the mirror lacks, or a metapackage it does not serve, is an error naming it.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
KERNELS_TXT = HERE / "kernels.txt"
CACHE = Path(os.environ.get("KVMTRACE_KERNEL_CACHE", "/var/cache/kvmtrace-kernels"))
# Bounded network steps: a stalled mirror is a failure, not a hang.
APT_TIMEOUT = 900
# Package lists older than this are refreshed before resolving (setup.sh and the tier
# in one CI run then resolve the same build; a day-old list is never trusted).
LISTS_MAX_AGE = int(os.environ.get("KVMTRACE_APT_LISTS_MAX_AGE", "3600"))
FORCE_ENV = "KVMTRACE_KERNEL_VERSION"
# The userlands a line can ask for: the host's root, or a debootstrapped Debian release.
USERLANDS = ("host", "bookworm", "trixie")
# What a guest runs, by its kernels.txt line's tests=: the pytest -m expression, the test
# paths, and its time bound (seconds from vng start to power-off; past it the VM is killed
# and the tier says which guest ran out). "kernel": the privileged tests whose outcome
# depends on which kernel it is. "core": for a kernel series another line runs in full
# with another userland -- the tests marked `core` (test_privileged.py: the probes
# compile, attach, count and read on it; guest_kprobes.py: the kprobe paths), not the
# VM-start, explain, doctor and service tests. Either "+one_guest" (exactly one line):
# the `one_guest` tests too, which depend on the probe mechanism (kprobes in every guest)
# but not on the kernel's version. The bounds are about twice a guest's time in this
# machine's dry runs: CI's machine has run the same guests 1.5 times slower (a 7.3 guest
# 1135 s here, about 1700 s there); the tier's deadline caps the sum (docs/kernels.md).
PRIVILEGED_PATHS = ("tests/privileged", "tests/vm/guest_kprobes.py")


@dataclass(frozen=True)
class GuestTests:
    markers: str
    paths: tuple[str, ...]
    bound: int

    @property
    def one_guest(self) -> bool:
        return "not one_guest" not in self.markers


GUEST_TESTS = {
    "kernel": GuestTests("privileged and not host_only and not one_guest", PRIVILEGED_PATHS,
                         2400),
    "core": GuestTests("privileged and core and not host_only and not one_guest",
                       PRIVILEGED_PATHS, 1200),
    "kernel+one_guest": GuestTests("privileged and not host_only", PRIVILEGED_PATHS, 2700),
    "core+one_guest": GuestTests("privileged and (core or one_guest) and not host_only",
                                 PRIVILEGED_PATHS, 2400),
}


class FetchError(Exception):
    """A kernel could not be resolved, fetched or prepared; one line for the user."""


@dataclass(frozen=True)
class Spec:
    """One line of kernels.txt: what to test, not which build."""

    name: str
    suite: str  # a Debian suite: bookworm, bookworm-backports, trixie, ...
    image_meta: str  # the flavour's image metapackage, e.g. linux-image-amd64
    userland: str  # "host", or the Debian codename of the guest's root
    tests: str = "kernel"  # a key of GUEST_TESTS

    @property
    def markers(self) -> str:
        """The guest's pytest -m expression."""
        return GUEST_TESTS[self.tests].markers

    @property
    def paths(self) -> tuple[str, ...]:
        """The test paths the guest runs (relative to the checkout)."""
        return GUEST_TESTS[self.tests].paths

    @property
    def bound(self) -> int:
        """Seconds the guest may take, vng start to power-off."""
        return GUEST_TESTS[self.tests].bound

    @property
    def one_guest(self) -> bool:
        """Whether this is the line that runs the one_guest tests."""
        return GUEST_TESTS[self.tests].one_guest

    @property
    def headers_meta(self) -> str:
        return self.image_meta.replace("linux-image-", "linux-headers-", 1)


@dataclass(frozen=True)
class Kernel:
    """A spec resolved against the mirror: the concrete build that is booted."""

    spec: Spec
    release: str  # uname -r
    version: str  # Debian version of linux-image-<release>
    packages: tuple[tuple[str, str], ...]  # (package, version) to unpack
    forced: bool = False

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def dir(self) -> Path:
        return CACHE / self.release

    @property
    def root(self) -> Path:
        return self.dir / "root"

    @property
    def image(self) -> Path:
        return self.root / "boot" / f"vmlinuz-{self.release}"

    @property
    def moddir(self) -> Path:
        for base in ("lib/modules", "usr/lib/modules"):
            p = self.root / base / self.release
            if p.is_dir():
                return p
        return self.root / "lib/modules" / self.release

    @property
    def headers(self) -> Path:
        return self.root / "usr/src" / f"linux-headers-{self.release}"

    @property
    def common(self) -> Path:
        found = sorted(self.root.glob("usr/src/linux-headers-*-common"))
        if not found:
            raise FetchError(f"{self.name}: no linux-headers-*-common under {self.root}/usr/src")
        return found[0]

    def describe(self) -> dict:
        """What was booted, for the results and the log."""
        return {"name": self.name, "suite": self.spec.suite, "metapackage": self.spec.image_meta,
                "userland": self.spec.userland, "tests": self.spec.tests,
                "markers": self.spec.markers, "paths": list(self.spec.paths),
                "bound_seconds": self.spec.bound, "release": self.release,
                "version": self.version, "forced": self.forced,
                "packages": [f"{p}={v}" for p, v in self.packages]}


def parse_kernels(text: str, where: str = "kernels.txt") -> list[Spec]:
    """Lines ``NAME SUITE IMAGE-METAPACKAGE [userland=host|CODENAME] [tests=CLASS]`` (a key
    of GUEST_TESTS); # comments. At most one line may run the one_guest tests
    (read_kernels: exactly one)."""
    specs: list[Spec] = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        opts = dict(p.split("=", 1) for p in parts[3:] if "=" in p)
        if (len(parts) < 3 or any("=" not in p for p in parts[3:])
                or set(opts) - {"userland", "tests"}):
            raise FetchError(f"{where}:{n}: want NAME SUITE IMAGE-METAPACKAGE [userland=...] "
                             "[tests=...]")
        if not parts[2].startswith("linux-image-"):
            raise FetchError(f"{where}:{n}: {parts[2]!r} is not a linux-image-* metapackage")
        userland = opts.get("userland", "host")
        if userland not in USERLANDS:
            raise FetchError(f"{where}:{n}: userland {userland!r} is not one of {USERLANDS}")
        tests = opts.get("tests", "kernel")
        if tests not in GUEST_TESTS:
            raise FetchError(f"{where}:{n}: tests {tests!r} is not one of {tuple(GUEST_TESTS)}")
        specs.append(Spec(parts[0], parts[1], parts[2], userland, tests))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise FetchError(f"{where}: duplicate names in {names}")
    full = [s.name for s in specs if s.one_guest]
    if len(full) > 1:
        raise FetchError(f"{where}: more than one line runs the one_guest tests ({full}): "
                         "they need one guest, not several")
    return specs


def read_kernels(path: Path = KERNELS_TXT) -> list[Spec]:
    specs = parse_kernels(path.read_text(), str(path))
    if not any(s.one_guest for s in specs):
        raise FetchError(f"{path}: no line says tests=...+one_guest: the one_guest tests "
                         "would run in no guest")
    return specs


def select(names: list[str]) -> list[Spec]:
    specs = read_kernels()
    if not names:
        return specs
    by_name = {s.name: s for s in specs}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise FetchError(f"unknown kernel(s) {unknown}: {KERNELS_TXT} has {sorted(by_name)}")
    return [by_name[n] for n in names]


def forced_versions(env: dict[str, str] | None = None) -> dict[str, str]:
    """``KVMTRACE_KERNEL_VERSION="debian12=6.1.176-1,..."`` as {name: version}."""
    raw = (os.environ if env is None else env).get(FORCE_ENV, "").strip()
    out: dict[str, str] = {}
    for item in filter(None, (i.strip() for i in raw.split(","))):
        name, sep, version = item.partition("=")
        if not sep or not name or not version:
            raise FetchError(f"{FORCE_ENV}: want NAME=VERSION[,NAME=VERSION], got {item!r}")
        out[name] = version
    return out


# ---- the host's Debian mirror, from its own apt configuration ----------------

def _deb822_stanzas(text: str) -> list[dict[str, str]]:
    stanzas, cur, key = [], {}, None
    for raw in text.splitlines():
        if raw.startswith("#"):
            continue
        if not raw.strip():
            if cur:
                stanzas.append(cur)
            cur, key = {}, None
            continue
        if raw[0] in " \t" and key:
            cur[key] += " " + raw.strip()
            continue
        if ":" in raw:
            key, value = raw.split(":", 1)
            key = key.strip().lower()
            cur[key] = value.strip()
    if cur:
        stanzas.append(cur)
    return stanzas


def system_debian_entries(etc: Path = Path("/etc/apt")) -> list[tuple[str, str, str]]:
    """(uri, suite, components) of every enabled Debian 'deb' entry in the system config."""
    entries: list[tuple[str, str, str]] = []
    lists = [etc / "sources.list", *sorted((etc / "sources.list.d").glob("*.list"))]
    for f in lists:
        if not f.is_file():
            continue
        for line in f.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            line = re.sub(r"\[[^\]]*\]", "", line)  # [signed-by=...] options
            parts = line.split()
            if len(parts) >= 4 and parts[0] == "deb":
                entries.append((parts[1], parts[2], " ".join(parts[3:])))
    for f in sorted((etc / "sources.list.d").glob("*.sources")):
        for s in _deb822_stanzas(f.read_text()):
            if "deb" not in s.get("types", "").split() or s.get("enabled", "yes") == "no":
                continue
            for uri in s.get("uris", "").split():
                for suite in s.get("suites", "").split():
                    entries.append((uri, suite, s.get("components", "main")))
    # Only the Debian archive itself (".../debian", ".../debian-security").
    return [e for e in entries if re.search(r"/debian(-security)?/?$", e[0])]


def mirrors(etc: Path = Path("/etc/apt")) -> tuple[str, str]:
    """(archive, security) URIs of the host's Debian mirror."""
    entries = system_debian_entries(etc)
    archive = [u for u, _, _ in entries if re.search(r"/debian/?$", u)]
    if not archive:
        raise FetchError("no Debian mirror ('deb .../debian SUITE main') in /etc/apt/sources.list"
                         " or /etc/apt/sources.list.d: cannot fetch kernels")
    security = [u for u, _, _ in entries if re.search(r"/debian-security/?$", u)]
    return archive[0], security[0] if security else re.sub(r"/debian/?$", "/debian-security",
                                                           archive[0])


def suite_sources(suite: str, archive: str, security: str) -> str:
    """The pockets a suite's kernel can come from (a release's point and security updates)."""
    if suite.endswith("-backports") or suite in ("sid", "unstable", "experimental"):
        lines = [f"deb {archive} {suite} main"]
    else:
        lines = [f"deb {archive} {suite} main", f"deb {archive} {suite}-updates main",
                 f"deb {security} {suite}-security main"]
    return "".join(f"{ln}\n" for ln in lines)


def _run(cmd: list[str], cwd: Path | None = None, timeout: int = APT_TIMEOUT) -> str:
    try:
        p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                           check=False)
    except subprocess.TimeoutExpired:
        raise FetchError(f"timed out after {timeout} s: {' '.join(cmd)}") from None
    if p.returncode != 0:
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        raise FetchError(f"{' '.join(cmd[:2])} ... failed ({p.returncode}): {' | '.join(tail)}")
    return p.stdout


class Suite:
    """A private apt configuration that lists exactly one suite's pockets."""

    def __init__(self, suite: str, archive: str, security: str):
        self.suite = suite
        self.archive = archive
        self.dir = CACHE / "apt" / suite
        self.sources = suite_sources(suite, archive, security)
        self._updated = False

    def options(self) -> list[str]:
        d = self.dir
        return ["-o", f"Dir::Etc::sourcelist={d / 'sources.list'}",
                "-o", "Dir::Etc::sourceparts=-",
                "-o", f"Dir::State::Lists={d / 'lists'}",
                "-o", f"Dir::Cache={d / 'cache'}",
                "-o", "APT::Get::List-Cleanup=0"]

    def update(self, force: bool = False) -> None:
        d = self.dir
        for sub in ("lists/partial", "cache/archives/partial"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        stamp = d / "lists" / ".sources-sha"
        digest = hashlib.sha256(self.sources.encode()).hexdigest()
        fresh = (stamp.exists() and stamp.read_text() == digest
                 and time.time() - stamp.stat().st_mtime < LISTS_MAX_AGE)
        if (fresh or self._updated) and not force:
            return
        (d / "sources.list").write_text(self.sources)
        try:
            _run(["apt-get", *self.options(), "-q", "update"])
        except FetchError as exc:
            raise FetchError(f"suite {self.suite!r}: the mirror {self.archive} cannot be read "
                             f"for it (does it serve {self.suite}?): {exc}") from None
        # apt-get update exits 0 when a pocket is missing (it only warns): demand lists.
        if not list((d / "lists").glob(f"*_dists_{self.suite}_main_binary-*_Packages*")):
            raise FetchError(f"suite {self.suite!r}: the mirror {self.archive} has no "
                             f"{self.suite}/main package list")
        stamp.write_text(digest)
        self._updated = True

    def candidate(self, pkg: str) -> str | None:
        out = _run(["apt-cache", *self.options(), "policy", pkg])
        m = re.search(r"^\s*Candidate:\s*(\S+)", out, re.M)
        return m.group(1) if m and m.group(1) != "(none)" else None

    def depends(self, pkg: str, version: str) -> list[tuple[str, str | None]]:
        """(name, exact version or None) of each dependency's first alternative."""
        out = _run(["apt-cache", *self.options(), "show", f"{pkg}={version}"])
        stanza = out.split("\n\n", 1)[0]
        deps: list[tuple[str, str | None]] = []
        for field in re.findall(r"^(?:Pre-)?Depends:(.*(?:\n[ \t].*)*)", stanza, re.M):
            for item in field.replace("\n", " ").split(","):
                first = item.split("|", 1)[0].strip()
                dm = re.match(r"([a-z0-9][a-z0-9+.-]*)(?::\S+)?\s*(?:\(\s*(\S+)\s*([^)\s]+)\s*\))?",
                              first)
                if dm:
                    deps.append((dm.group(1), dm.group(3) if dm.group(2) == "=" else None))
        return deps

    def download(self, specs: list[str], into: Path) -> None:
        _run(["apt-get", *self.options(), "-q", "download", *specs], cwd=into)


def _kernel_package(name: str) -> bool:
    """Release-specific linux-* packages (image, binary, modules, headers, -common, kbuild):
    a version in the name. Metapackages (linux-image-amd64, linux-modules-amd64),
    linux-base and the compiler metapackage (linux-compiler-gcc-12-x86) are not needed
    to boot or to build modules.
    """
    return re.match(r"linux-[a-z]+-.*\d+\.\d+", name) is not None \
        and not name.startswith("linux-compiler-")


def resolve_with(spec: Spec, suite: Suite, force: str | None = None) -> Kernel:
    """The build ``suite`` serves for ``spec`` now (or the forced metapackage version)."""
    suite.update()
    version = force or suite.candidate(spec.image_meta)
    if version is None:
        raise FetchError(f"{spec.name}: suite {spec.suite!r} on {suite.archive} serves no "
                         f"{spec.image_meta}")
    todo = [(spec.image_meta, version)]
    headers_version = force or suite.candidate(spec.headers_meta)
    if headers_version is None:
        raise FetchError(f"{spec.name}: suite {spec.suite!r} serves no {spec.headers_meta}")
    todo.append((spec.headers_meta, headers_version))
    seen: dict[str, str] = {}
    release = None
    while todo:
        pkg, ver = todo.pop(0)
        try:
            deps = suite.depends(pkg, ver)
        except FetchError:
            raise FetchError(f"{spec.name}: {pkg}={ver} is not served by suite {spec.suite!r}"
                             + (f" ({FORCE_ENV} asked for it)" if force else "")) from None
        for dep, exact in deps:
            if not _kernel_package(dep) or dep in seen:
                continue
            if pkg == spec.image_meta and dep.startswith("linux-image-") and release is None:
                release = dep[len("linux-image-"):]
            dep_version = exact or suite.candidate(dep)
            if dep_version is None:
                raise FetchError(f"{spec.name}: {pkg}={ver} needs {dep}, which suite "
                                 f"{spec.suite!r} does not serve")
            seen[dep] = dep_version
            todo.append((dep, dep_version))
    if release is None or f"linux-image-{release}" not in seen:
        raise FetchError(f"{spec.name}: {spec.image_meta}={version} depends on no "
                         f"linux-image-<release> package")
    if f"linux-headers-{release}" not in seen:
        raise FetchError(f"{spec.name}: {spec.headers_meta}={headers_version} does not give "
                         f"linux-headers-{release} (image and headers metapackages disagree)")
    return Kernel(spec, release, seen[f"linux-image-{release}"], tuple(sorted(seen.items())),
                  forced=force is not None)


class Resolver:
    """Resolves specs against the host's mirror, one private apt config per suite."""

    def __init__(self, etc: Path = Path("/etc/apt"), env: dict[str, str] | None = None):
        self.archive, self.security = mirrors(etc)
        self.forced = forced_versions(env)
        self._suites: dict[str, Suite] = {}

    def suite(self, name: str) -> Suite:
        if name not in self._suites:
            self._suites[name] = Suite(name, self.archive, self.security)
        return self._suites[name]

    def resolve(self, spec: Spec) -> Kernel:
        return resolve_with(spec, self.suite(spec.suite), self.forced.get(spec.name))


# ---- download, unpack, prepare ------------------------------------------------

def _deb_glob(pkg: str, version: str) -> str:
    return str(CACHE / "debs" / f"{pkg}_{version.replace(':', '%3a')}_*.deb")


def _cached(kernel: Kernel) -> Iterator[tuple[str, str, list[str]]]:
    for pkg, version in kernel.packages:
        yield pkg, version, sorted(glob.glob(_deb_glob(pkg, version)))


def download(kernel: Kernel, suite: Suite) -> list[Path]:
    """The kernel's .debs, from the cache (by name and version) or the mirror."""
    debs_dir = CACHE / "debs"
    debs_dir.mkdir(parents=True, exist_ok=True)
    missing = [f"{p}={v}" for p, v, found in _cached(kernel) if not found]
    if missing:
        try:
            suite.download(missing, debs_dir)
        except FetchError:
            suite.update(force=True)  # lists older than the mirror: refresh once, retry
            try:
                suite.download(missing, debs_dir)
            except FetchError as exc:
                raise FetchError(f"{kernel.name}: cannot download {' '.join(missing)} from "
                                 f"suite {kernel.spec.suite!r} ({exc})") from None
    out = []
    for p, v, found in _cached(kernel):
        if not found:
            raise FetchError(f"{kernel.name}: {p}={v} missing after download")
        out.append(Path(found[0]))
    return out


def _stamp_text(debs: list[Path]) -> str:
    return "".join(f"{d.name} {d.stat().st_size}\n" for d in debs) + "prepare-v3\n"


def unpack(kernel: Kernel, debs: list[Path]) -> None:
    stamp = kernel.dir / ".unpacked"
    want = _stamp_text(debs)
    if stamp.exists() and stamp.read_text() == want and kernel.image.exists():
        return
    if kernel.root.exists():
        shutil.rmtree(kernel.root)
    kernel.root.mkdir(parents=True)
    for deb in debs:
        _run(["dpkg-deb", "-x", str(deb), str(kernel.root)], timeout=600)
    prepare(kernel)
    stamp.write_text(want)


def prepare(kernel: Kernel) -> None:
    """Make the unpacked tree usable by virtme-ng, bcc and kbuild (see the module doc)."""
    # Merged-/usr packages (trixie's 7.x) ship /usr/lib/modules only; give /lib/modules
    # too, as a merged-/usr root has it, so vng and depmod find them by either path.
    if (kernel.root / "usr/lib/modules").is_dir() and not (kernel.root / "lib").exists():
        (kernel.root / "lib").symlink_to("usr/lib")
    moddir = kernel.moddir
    # 7.x packages ship the image as /usr/lib/modules/<release>/vmlinuz and leave /boot
    # to the postinst (which is not run here): put it where an installed system has it.
    if not kernel.image.exists() and (moddir / "vmlinuz").is_file():
        kernel.image.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(moddir / "vmlinuz", kernel.image)
    if not kernel.image.exists():
        raise FetchError(f"{kernel.name}: no {kernel.image} (nor {moddir}/vmlinuz) after "
                         f"unpacking")
    if not (moddir / "kernel").is_dir():
        raise FetchError(f"{kernel.name}: no modules in {moddir} (no modules package among "
                         f"{[p for p, _ in kernel.packages]}?)")
    headers, common = kernel.headers, kernel.common
    if not (headers / "include/config/kernel.release").exists():
        raise FetchError(f"{kernel.name}: {headers} is not a prepared header tree")
    # The headers package's own links point into the host's /usr/src: replace them.
    for name, target in (("build", headers), ("source", common)):
        link = moddir / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target)
    # Its Makefile names the header trees by absolute /usr/src path (6.x: the include
    # of -common's Makefile; 7.x also KBUILD_OUTPUT=): point them at the unpacked ones.
    makefile = headers / "Makefile"
    text = makefile.read_text()
    fixed = re.sub(r"(?<![^\s=])/usr/src/(linux-headers-[^\s/]+)",
                   lambda m: f"{kernel.root}/usr/src/{m.group(1)}", text)
    if fixed != text:
        makefile.write_text(fixed)
    _run(["depmod", "-b", str(kernel.root), kernel.release], timeout=300)
    if not (moddir / "modules.dep").exists():
        raise FetchError(f"{kernel.name}: depmod made no modules.dep in {moddir}")
    for mod in ("kvm", "kvm_amd"):
        if mod not in (moddir / "modules.dep").read_text().replace("-", "_"):
            raise FetchError(f"{kernel.name}: {mod}.ko not among the unpacked modules")


def fetch(spec: Spec, resolver: Resolver | None = None) -> Kernel:
    """Resolve ``spec`` now, download what the cache lacks, unpack; the resolved kernel."""
    resolver = resolver or Resolver()
    kernel = resolver.resolve(spec)
    unpack(kernel, download(kernel, resolver.suite(spec.suite)))
    (kernel.dir / "resolved.json").write_text(json.dumps(kernel.describe(), indent=2) + "\n")
    return kernel


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for cmd, what in (("resolve", "print the build each line resolves to now"),
                      ("fetch", "resolve + download + unpack + prepare (idempotent)")):
        p = sub.add_parser(cmd, help=what)
        p.add_argument("names", nargs="*")
    s = sub.add_parser("paths", help="print the unpacked paths of one kernel")
    s.add_argument("name")
    args = ap.parse_args(argv)
    try:
        resolver = Resolver()
        if args.cmd == "resolve":
            for spec in select(args.names):
                print(json.dumps(resolver.resolve(spec).describe()))
        elif args.cmd == "fetch":
            for spec in select(args.names):
                k = fetch(spec, resolver)
                print(f"kernels: {k.name}: {spec.suite} {spec.image_meta} -> {k.release} "
                      f"({k.version}{', forced' if k.forced else ''}) ready in {k.dir}")
        else:
            k = resolver.resolve(select([args.name])[0])
            print(f"release={k.release}\nversion={k.version}\nimage={k.image}\n"
                  f"moddir={k.moddir}\nheaders={k.headers}\ncommon={k.common}")
    except FetchError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
