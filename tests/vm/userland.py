"""A Debian userland other than the host's, for the kernel tier: a debootstrapped root.

    python3 tests/vm/userland.py prepare trixie   # debootstrap + this checkout set up inside
    python3 tests/vm/userland.py run trixie CMD   # run CMD in it (chroot, this kernel)

The root lives in CACHE/userland/<codename>/root. It is made once by ``debootstrap
--variant=minbase`` from the host's Debian mirror (with the release's -updates and
-security pockets, as an installed system lists them) and then treated like a user's
fresh Debian host: this checkout is copied to /srv/kvmtrace inside it and
``scripts/setup-host.sh --test`` -- the script behind the README's two commands -- runs
there, in a chroot with /proc, /sys, /dev and /run of this machine, installing that
release's own python3-bpfcc, Python, libbpf and prometheus. The kernel tier then

* runs the README's commands there on this machine's kernel (``make test``; ``make run``
  answering a scrape), and
* boots stock kernels with that root (virtme-ng ``--root``), so the guest's privileged
  tests run with that release's bcc and Python.

Beyond what setup-host.sh installs, the root gets only what the tier itself needs
(TIER_PACKAGES): kmod and iproute2 for the guest, and make + gcc + dwarves because seedsim
is built in the chroot with the release's own compiler, the one its kernels are built with.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from tests.vm import kernels as kernelsmod

REPO = Path(__file__).resolve().parents[2]
# Where the checkout sits inside the root, and the guest's mount point for results.
SRC = Path("/srv/kvmtrace")
GUEST_RUN = Path("/srv/run")
# kmod: modprobe/insmod in the guest; iproute2: virtme-ng's init brings the guest's
# loopback up with `ip` from the root (minbase has none, and serve's tests scrape over
# 127.0.0.1); make, gcc, libc6-dev, dwarves: seedsim, built in a chroot of the root.
TIER_PACKAGES = ("kmod", "iproute2", "make", "gcc", "libc6-dev", "dwarves")
DEBOOTSTRAP_TIMEOUT = 900
SETUP_TIMEOUT = 1800
# A fresh root reaches the package registries the way this host does: its resolver, and
# the CA bundle this host's pip and curl trust, kept at a path of its own (installing
# ca-certificates in the root regenerates the root's own bundle without this host's CAs).
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
ROOT_CA = Path("/etc/kvmtrace-host-ca.crt")
CA_VARIABLES = ("PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")


class UserlandError(Exception):
    """The root could not be made or set up; one line for the user."""


def root_of(codename: str) -> Path:
    return kernelsmod.CACHE / "userland" / codename / "root"


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve()).rstrip("/") + "/"
    with open("/proc/self/mounts") as f:
        points = [line.split()[1].encode().decode("unicode_escape") for line in f]
    return [p for p in points if p.startswith(prefix)]


def _sh(cmd: list[str], timeout: int = 120, **kw) -> subprocess.CompletedProcess:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False,
                           **kw)
    except subprocess.TimeoutExpired:
        raise UserlandError(f"timed out after {timeout} s: {' '.join(map(str, cmd))}") from None
    if p.returncode != 0:
        tail = " | ".join((p.stderr or p.stdout).strip().splitlines()[-4:])
        raise UserlandError(f"{' '.join(map(str, cmd[:3]))} ... failed ({p.returncode}): {tail}")
    return p


def private_kvm_node(root: Path, dev: Path = Path("/dev/kvm")) -> Path | None:
    """The root's own /dev/kvm: a device node with the host's numbers, next to ``root``
    (made once, devtmpfs's 0600 root:root), bound over the host's inside the chroot.

    The root's scripts/setup-host.sh --test gives /dev/kvm the root's own kvm group, as
    udev would on a Debian host; on the host's node that would hand the host's device to
    whatever group has that gid here (measured: the host's kvm gid 995 is trixie's
    "clock"). None where the host has no /dev/kvm."""
    try:
        rdev = os.stat(dev).st_rdev
    except FileNotFoundError:
        return None
    node = root.parent / "dev-kvm"
    if node.exists() and os.stat(node).st_rdev != rdev:
        node.unlink()
    if not node.exists():
        os.mknod(node, 0o600 | stat.S_IFCHR, rdev)
        os.chown(node, 0, 0)
    return node


@contextlib.contextmanager
def mounted(root: Path, binds: tuple[Path, ...] = ()) -> Iterator[Path]:
    """This machine's /proc, /sys (with tracefs, debugfs), /dev and a /run inside ``root``,
    with a /dev/kvm of the root's own (:func:`private_kvm_node`).

    Recursive binds are made slaves so that unmounting them never unmounts the host's.
    ``binds`` are host directories shown at the same path inside.
    """
    done: list[Path] = []

    def mount(args: list[str], target: Path) -> None:
        target.mkdir(parents=True, exist_ok=True)
        _sh(["mount", *args, str(target)])
        done.append(target)

    try:
        mount(["-t", "proc", "proc"], root / "proc")
        for d in ("sys", "dev"):
            mount(["--rbind", f"/{d}"], root / d)
            _sh(["mount", "--make-rslave", str(root / d)])
        node = private_kvm_node(root)
        if node is not None:
            _sh(["mount", "--bind", str(node), str(root / "dev/kvm")])
        mount(["-t", "tmpfs", "tmpfs"], root / "run")
        for b in binds:
            mount(["--bind", str(b)], root / b.relative_to("/"))
        yield root
    finally:
        for target in reversed(done):
            if subprocess.run(["umount", "-R", str(target)], capture_output=True,
                              check=False).returncode != 0:
                subprocess.run(["umount", "-R", "-l", str(target)], capture_output=True,
                               check=False)


def chroot_env() -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items()
            if (k.startswith("PIP_") and k not in CA_VARIABLES) or k in ("CI", "TERM")}
    keep.pop("PIP_FIND_LINKS", None)  # a directory of this host's, absent in the root
    cas = {k: str(ROOT_CA) for k in CA_VARIABLES} if HOST_CA.is_file() else {}
    return {**keep, **cas,
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": "/root", "LANG": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive"}


def run_in(root: Path, command: str, log: Path | None = None, timeout: int = SETUP_TIMEOUT,
           binds: tuple[Path, ...] = ()) -> subprocess.CompletedProcess:
    """``bash -c command`` chrooted in ``root`` (mounted); output appended to ``log``."""
    with mounted(root, binds):
        try:
            p = subprocess.run(["chroot", str(root), "/bin/bash", "-c", command],
                               env=chroot_env(), capture_output=True, text=True,
                               timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise UserlandError(f"timed out after {timeout} s in {root}: {command}") from None
    if log is not None:
        with open(log, "a") as f:
            f.write(f"### chroot {root}: {command} (exit {p.returncode})\n{p.stdout}{p.stderr}\n")
    return p


def debootstrap(codename: str) -> Path:
    """The cached minbase root of ``codename`` (made once)."""
    root = root_of(codename)
    stamp = root.parent / ".debootstrapped"
    if stamp.exists() and (root / "usr/bin/apt-get").exists():
        return root
    if root.exists():
        if _mounts_under(root):
            raise UserlandError(f"{root} still has mounts {_mounts_under(root)}; unmount them")
        shutil.rmtree(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    archive, security = kernelsmod.mirrors()
    _sh(["debootstrap", "--variant=minbase", codename, str(root), archive],
        timeout=DEBOOTSTRAP_TIMEOUT)
    (root / "etc/apt/sources.list").write_text(
        kernelsmod.suite_sources(codename, archive, security))
    stamp.write_text(codename + "\n")
    return root


def copy_checkout(root: Path, repo: Path = REPO) -> Path:
    """This checkout's files (tracked and untracked, not ignored) at SRC in ``root``.

    The venv made there by an earlier run is kept (setup-host.sh reuses it when it still
    imports bcc and pyproject.toml is not newer than its stamp).
    """
    dest = root / SRC.relative_to("/")
    files = _sh(["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others",
                 "--exclude-standard"]).stdout.split("\0")
    if dest.exists():
        for child in dest.iterdir():
            if child.name != ".venv":
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() \
                    else child.unlink()
    dest.mkdir(parents=True, exist_ok=True)
    for rel in filter(None, files):
        src = repo / rel
        if not src.exists() and not src.is_symlink():
            continue  # deleted in the work tree, not yet committed
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            target.symlink_to(os.readlink(src))
        else:
            shutil.copy2(src, target)
    return dest


def prepare(codename: str, log: Path, repo: Path = REPO) -> Path:
    """The root of ``codename`` with this checkout set up by scripts/setup-host.sh --test."""
    root = debootstrap(codename)
    shutil.copy2("/etc/resolv.conf", root / "etc/resolv.conf")
    if HOST_CA.is_file():
        shutil.copy2(HOST_CA, root / ROOT_CA.relative_to("/"))
    p = run_in(root, "apt-get -q update && apt-get install -y -q --no-install-recommends "
               + " ".join(TIER_PACKAGES), log)
    if p.returncode != 0:
        raise UserlandError(f"{codename}: installing {' '.join(TIER_PACKAGES)} failed (exit "
                            f"{p.returncode}); see {log}")
    copy_checkout(root, repo)
    (root / GUEST_RUN.relative_to("/")).mkdir(parents=True, exist_ok=True)
    (root / str(kernelsmod.CACHE).lstrip("/")).mkdir(parents=True, exist_ok=True)
    p = run_in(root, f"cd {SRC} && scripts/setup-host.sh --test", log)
    if p.returncode != 0:
        raise UserlandError(f"{codename}: scripts/setup-host.sh --test failed in the root "
                            f"(exit {p.returncode}): "
                            + " | ".join((p.stderr or p.stdout).strip().splitlines()[-3:]))
    return root


def provide_kernel(root: Path, kernel: kernelsmod.Kernel) -> str:
    """Make ``kernel``'s modules (and, through them, its headers) the root's own.

    virtme-ng boots an external root with that root's /lib/modules. When the root has
    this very build installed (setup-host.sh pulls the release's default kernel in with
    its headers) that is used as it is; otherwise /lib/modules/<release> in the root
    becomes a link to the unpacked tree in the kernel cache, which the guest sees at the
    same path. Returns which of the two it was.
    """
    moddir = root / "usr/lib/modules" / kernel.release
    status = subprocess.run(["chroot", str(root), "dpkg-query", "-W", "-f=${Version}",
                             f"linux-image-{kernel.release}"], capture_output=True, text=True,
                            check=False)
    if status.returncode == 0 and status.stdout.strip():
        if status.stdout.strip() != kernel.version:
            raise UserlandError(f"{root} has linux-image-{kernel.release} "
                                f"{status.stdout.strip()} installed, not the resolved "
                                f"{kernel.version}")
        return f"installed in the root (linux-image-{kernel.release} {kernel.version})"
    if moddir.is_symlink():
        moddir.unlink()
    elif moddir.exists():
        raise UserlandError(f"{moddir} exists but no linux-image-{kernel.release} is "
                            f"installed in {root}")
    moddir.parent.mkdir(parents=True, exist_ok=True)
    moddir.symlink_to(kernel.moddir)
    return f"linked from the kernel cache ({kernel.moddir})"


def os_release(root: Path) -> str:
    for line in (root / "etc/os-release").read_text().splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.split("=", 1)[1].strip('"')
    return "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("codename")
    r = sub.add_parser("run")
    r.add_argument("codename")
    r.add_argument("command")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "prepare":
            log = root_of(args.codename).parent / "prepare.log"
            root = prepare(args.codename, log)
            print(f"userland: {args.codename} ({os_release(root)}) ready in {root}; log {log}")
            return 0
        proc = run_in(root_of(args.codename), args.command)
        sys.stdout.write(proc.stdout)
        sys.stderr.write(proc.stderr)
        return proc.returncode
    except (UserlandError, kernelsmod.FetchError) as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
