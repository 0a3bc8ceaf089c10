"""Stock Debian kernels for the VM tier: read tests/vm/kernels.txt, fetch, unpack, prepare.

    python3 tests/vm/kernels.py fetch [NAME...]   # idempotent; needs root (apt, depmod)
    python3 tests/vm/kernels.py paths NAME        # where the unpacked pieces are

Nothing is installed and the system's apt sources are not touched: a private apt
configuration (sources, lists and package cache under the cache directory) lists the
Debian mirror the host's apt already uses, read from /etc/apt/sources.list and
/etc/apt/sources.list.d, plus that mirror's <codename>-backports. The pinned packages
are fetched with ``apt-get download`` and unpacked with ``dpkg-deb -x`` into
CACHE/<release>/root, then prepared so that

* virtme-ng finds the modules: ``vng -r CACHE/<release>/root/boot/vmlinuz-<release>``
  derives the modules directory from the image's location and links it to
  /lib/modules/<release> in the guest (after ``depmod -b``, run here);
* bcc finds the headers: the modules directory gets ``build`` and ``source`` links to the
  unpacked linux-headers-<release> and -common trees, the same layout an installed
  linux-headers package gives (bcc reads /lib/modules/$(uname -r)/{build,source});
* kbuild can build an out-of-tree module against them: Debian's
  linux-headers-<release>/Makefile includes the -common Makefile by absolute /usr/src
  path, which is rewritten to the unpacked copy.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
KERNELS_TXT = HERE / "kernels.txt"
CACHE = Path(os.environ.get("KVMTRACE_KERNEL_CACHE", "/var/cache/kvmtrace-kernels"))
# Bounded network steps: a stalled mirror is a failure, not a hang.
APT_TIMEOUT = 900


class FetchError(Exception):
    """A kernel could not be fetched or prepared; one line for the user."""


@dataclass(frozen=True)
class Kernel:
    name: str
    release: str  # uname -r
    version: str  # Debian package version
    packages: tuple[str, ...]

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


def read_kernels(path: Path = KERNELS_TXT) -> list[Kernel]:
    kernels = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) < 4:
            raise FetchError(f"{path}:{n}: want NAME RELEASE VERSION PACKAGE...")
        kernels.append(Kernel(parts[0], parts[1], parts[2], tuple(parts[3:])))
    return kernels


def select(names: list[str]) -> list[Kernel]:
    kernels = read_kernels()
    if not names:
        return kernels
    by_name = {k.name: k for k in kernels}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise FetchError(f"unknown kernel(s) {unknown}: {KERNELS_TXT} has {sorted(by_name)}")
    return [by_name[n] for n in names]


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


def codename() -> str:
    text = Path("/etc/os-release").read_text()
    m = re.search(r"^VERSION_CODENAME=\"?(\w+)", text, re.M)
    if not m:
        raise FetchError("no VERSION_CODENAME in /etc/os-release")
    return m.group(1)


def private_sources() -> str:
    entries = system_debian_entries()
    archive = [u for u, _, _ in entries if re.search(r"/debian/?$", u)]
    if not archive:
        raise FetchError("no Debian mirror ('deb .../debian SUITE main') in /etc/apt/sources.list"
                         " or /etc/apt/sources.list.d: cannot fetch kernels")
    lines = [f"deb {u} {s} {c}" for u, s, c in entries]
    lines.append(f"deb {archive[0]} {codename()}-backports main")
    return "".join(f"{ln}\n" for ln in dict.fromkeys(lines))


def _apt_dir() -> Path:
    return CACHE / "apt"


def apt_options() -> list[str]:
    d = _apt_dir()
    return [
        "-o", f"Dir::Etc::sourcelist={d / 'sources.list'}",
        "-o", "Dir::Etc::sourceparts=-",
        "-o", f"Dir::State::Lists={d / 'lists'}",
        "-o", f"Dir::Cache={d / 'cache'}",
        "-o", "APT::Get::List-Cleanup=0",
    ]


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


def apt_update(force: bool = False) -> None:
    d = _apt_dir()
    for sub in ("lists/partial", "cache/archives/partial"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    src = private_sources()
    stamp = d / "lists" / ".sources-sha"
    digest = hashlib.sha256(src.encode()).hexdigest()
    fresh = stamp.exists() and stamp.read_text() == digest and any((d / "lists").glob("*Packages*"))
    if fresh and not force:
        return
    (d / "sources.list").write_text(src)
    _run(["apt-get", *apt_options(), "-q", "update"])
    stamp.write_text(digest)


def _deb_glob(pkg: str, version: str) -> str:
    return str(CACHE / "debs" / f"{pkg}_{version.replace(':', '%3a')}_*.deb")


def download(kernel: Kernel) -> list[Path]:
    """The kernel's .debs, from the cache or the mirror."""
    debs_dir = CACHE / "debs"
    debs_dir.mkdir(parents=True, exist_ok=True)
    missing = [p for p in kernel.packages if not glob.glob(_deb_glob(p, kernel.version))]
    if missing:
        apt_update()
        specs = [f"{p}={kernel.version}" for p in missing]
        try:
            _run(["apt-get", *apt_options(), "-q", "download", *specs], cwd=debs_dir)
        except FetchError:
            apt_update(force=True)  # stale lists: refresh once, then give the real error
            try:
                _run(["apt-get", *apt_options(), "-q", "download", *specs], cwd=debs_dir)
            except FetchError as exc:
                raise FetchError(
                    f"{kernel.name}: cannot download {' '.join(specs)} from the host's Debian "
                    f"mirror ({exc}); if the mirror no longer serves this version, pin the "
                    f"current one in {KERNELS_TXT}") from None
    out = []
    for p in kernel.packages:
        found = sorted(glob.glob(_deb_glob(p, kernel.version)))
        if not found:
            raise FetchError(f"{kernel.name}: {p}={kernel.version} missing after download")
        out.append(Path(found[0]))
    return out


def _stamp_text(debs: list[Path]) -> str:
    return "".join(f"{d.name} {d.stat().st_size}\n" for d in debs) + "prepare-v1\n"


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
    if not kernel.image.exists():
        raise FetchError(f"{kernel.name}: no {kernel.image} after unpacking")
    moddir = kernel.moddir
    if not (moddir / "kernel").is_dir():
        raise FetchError(f"{kernel.name}: no modules in {moddir} (is a modules package missing"
                         f" from {KERNELS_TXT}?)")
    headers, common = kernel.headers, kernel.common
    if not (headers / "include/config/kernel.release").exists():
        raise FetchError(f"{kernel.name}: {headers} is not a prepared header tree")
    # The headers package's own links point into the host's /usr/src: replace them.
    for name, target in (("build", headers), ("source", common)):
        link = moddir / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target)
    makefile = headers / "Makefile"
    text = makefile.read_text()
    fixed = re.sub(r"(?m)^include /usr/src/(linux-headers-\S+)/Makefile$",
                   lambda m: f"include {kernel.root}/usr/src/{m.group(1)}/Makefile", text)
    if fixed != text:
        makefile.write_text(fixed)
    base = kernel.root if moddir.is_relative_to(kernel.root / "lib") else kernel.root / "usr"
    _run(["depmod", "-b", str(base), kernel.release], timeout=300)
    if not (moddir / "modules.dep").exists():
        raise FetchError(f"{kernel.name}: depmod made no modules.dep in {moddir}")
    for mod in ("kvm", "kvm_amd"):
        if mod not in (moddir / "modules.dep").read_text().replace("-", "_"):
            raise FetchError(f"{kernel.name}: {mod}.ko not among the unpacked modules")


def fetch(kernel: Kernel) -> Kernel:
    unpack(kernel, download(kernel))
    return kernel


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="download + unpack + prepare (idempotent)")
    f.add_argument("names", nargs="*")
    s = sub.add_parser("paths", help="print the unpacked paths of one kernel")
    s.add_argument("name")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "fetch":
            for k in select(args.names):
                fetch(k)
                print(f"kernels: {k.name} {k.release} ({k.version}) ready in {k.dir}")
        else:
            k = select([args.name])[0]
            print(f"image={k.image}\nmoddir={k.moddir}\nheaders={k.headers}\n"
                  f"common={k.common}")
    except FetchError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
