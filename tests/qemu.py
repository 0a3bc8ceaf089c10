"""A VMM that reads KVM_CAP_VM_TYPES, for the VM-start tests: QEMU >= 9.

    python3 tests/qemu.py install   # as root; idempotent (scripts/setup-host.sh --test)
    python3 tests/qemu.py version   # the installed qemu-system-x86_64's version

Debian 12's own QEMU (7.2) predates KVM_CAP_VM_TYPES; bookworm-backports serves 10.0.x.
Debian 13's own is 10.0.x. So: when the system's candidate is older than 9, QEMU is
installed from ``<codename>-backports`` with a private apt configuration (its own
sources file naming the release's pockets and its backports on the host's Debian
mirror, and its own lists under CACHE), as tests/vm/kernels.py fetches kernels: the
system's apt sources are never changed. Whatever version the mirror serves today is
taken (nothing is pinned).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.vm.kernels import mirrors, suite_sources

PACKAGE = "qemu-system-x86"
BINARY = "qemu-system-x86_64"
MIN_MAJOR = 9  # QEMU 9.0 reads KVM_CAP_VM_TYPES (its sev-snp-guest needs it)
CACHE = Path(os.environ.get("KVMTRACE_APT_CACHE", "/var/cache/kvmtrace-apt"))
TIMEOUT = 900


def _major(version: str | None) -> int:
    """The upstream major of a Debian version ("1:10.0.2+ds-2~bpo12+1" -> 10)."""
    m = re.match(r"(?:\d+:)?(\d+)\.", version or "")
    return int(m.group(1)) if m else 0


def installed_version() -> str | None:
    exe = shutil.which(BINARY)
    if exe is None:
        return None
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60,
                         check=False).stdout
    m = re.search(r"version (\d+\.\d+\.\d+)", out)
    return m.group(1) if m else None


def _apt(args: list[str], options: list[str] = ()) -> str:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    p = subprocess.run(["apt-get", *options, *args] if args[0] != "policy"
                       else ["apt-cache", *options, *args],
                       capture_output=True, text=True, timeout=TIMEOUT, env=env, check=False)
    if p.returncode != 0:
        tail = " | ".join((p.stderr or p.stdout).strip().splitlines()[-3:])
        raise SystemExit(f"ERROR: {' '.join(args[:2])} failed ({p.returncode}): {tail}")
    return p.stdout


def _candidate(options: list[str] = (), release: str | None = None) -> str | None:
    out = _apt(["policy", PACKAGE], options)
    if release is None:
        m = re.search(r"^\s*Candidate:\s*(\S+)", out, re.M)
        return m.group(1) if m and m.group(1) != "(none)" else None
    # The version a release serves (its line in the version table).
    best = None
    for ver, origin in re.findall(r"^\s+(?:\*\*\* )?(\S+) \d+\n\s+\d+ \S+ (\S+)/", out, re.M):
        if origin == release and (best is None or _major(ver) > _major(best)):
            best = ver
    return best


def install() -> str:
    """Make sure qemu-system-x86_64 >= MIN_MAJOR is installed; return its version."""
    have = installed_version()
    if _major(have) >= MIN_MAJOR:
        return have
    codename = _codename()
    if _major(_candidate()) >= MIN_MAJOR:  # the release's own is new enough (trixie)
        _apt(["install", "-y", "-q", "--no-install-recommends", PACKAGE])
        return installed_version() or "none"
    archive, security = mirrors()
    backports = f"{codename}-backports"
    d = CACHE / backports
    for sub in ("lists/partial", "cache/archives/partial"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    (d / "sources.list").write_text(suite_sources(codename, archive, security)
                                    + suite_sources(backports, archive, security))
    options = ["-o", f"Dir::Etc::sourcelist={d / 'sources.list'}",
               "-o", "Dir::Etc::sourceparts=-", "-o", f"Dir::State::Lists={d / 'lists'}",
               "-o", f"Dir::Cache={d / 'cache'}", "-o", "APT::Get::List-Cleanup=0"]
    _apt(["-q", "update"], options)
    version = _candidate(options, backports)
    if _major(version) < MIN_MAJOR:
        raise SystemExit(f"ERROR: {backports} on {archive} serves no {PACKAGE} >= "
                         f"{MIN_MAJOR} (found {version or 'none'})")
    print(f"qemu: installing {PACKAGE} {version} from {backports} ({archive}; private "
          "sources, the system's are unchanged)", file=sys.stderr)
    _apt(["install", "-y", "-q", "--no-install-recommends", "-t", backports, PACKAGE], options)
    got = installed_version()
    if _major(got) < MIN_MAJOR:
        raise SystemExit(f"ERROR: installed {PACKAGE} from {backports}, but "
                         f"{BINARY} reports {got}")
    return got


def _codename() -> str:
    text = Path("/etc/os-release").read_text()
    m = re.search(r"^VERSION_CODENAME=\"?(\w+)", text, re.M)
    if not m:
        raise SystemExit("ERROR: /etc/os-release names no VERSION_CODENAME")
    return m.group(1)


def main(argv: list[str]) -> int:
    if argv[1:] == ["install"]:
        print(f"qemu: {BINARY} {install()}", file=sys.stderr)
        return 0
    if argv[1:] == ["version"]:
        print(installed_version() or "none")
        return 0
    print(__doc__.strip().splitlines()[2], file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
