"""The cgroup v2 hierarchy: where it is mounted, and a cgroup's path from its id.

The kernel gives a process's cgroup as an id (``bpf_get_current_cgroup_id()``: the
v2 cgroup's kernfs id, which is its directory's inode number there). Debian 12 and 13
mount v2 alone at ``/sys/fs/cgroup``; a hybrid host (systemd's "unified" mode) mounts
it at ``/sys/fs/cgroup/unified`` beside the v1 controllers. An id is resolved to a path
once and kept (bounded); a cgroup that is gone resolves to None and its id stays the
answer (kvmtrace.owners decodes the path).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

CACHE_MAX = 4096  # ids kept resolved
WALK_MAX = 65536  # directories one walk looks at, at most


def v2_mount(mountinfo: str) -> str | None:
    """The mount point of the cgroup2 hierarchy in a mountinfo text
    (/proc/self/mountinfo), or None where there is none (v1 only)."""
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep or not right.startswith("cgroup2 "):
            continue
        parts = left.split()
        if len(parts) >= 5:
            return parts[4].replace("\\040", " ")
    return None


def of_pid(pid: int, proc: str | os.PathLike = "/proc") -> str | None:
    """A live process's v2 cgroup path (its ``0::`` line), or None."""
    try:
        text = (Path(proc) / str(pid) / "cgroup").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("0::"):
            return line[3:] or "/"
    return None


class Resolver:
    """Cgroup ids to paths under one v2 mount, with a bounded cache. A miss walks the
    hierarchy once (every directory seen is cached on the way, up to ``CACHE_MAX``)."""

    def __init__(self, mount: str | os.PathLike, cache_max: int = CACHE_MAX,
                 walk_max: int = WALK_MAX) -> None:
        self.mount = Path(mount)
        self.cache_max = cache_max
        self.walk_max = walk_max
        # None: no cgroup had the id when looked for (ids are never reused: kept too).
        self._cache: OrderedDict[int, str | None] = OrderedDict()
        self.walks = 0

    def keep(self, cid: int, path: str | None) -> None:
        """Remember ``cid``'s path (None: gone), the oldest out past ``cache_max``."""
        self._cache[cid] = path
        self._cache.move_to_end(cid)
        while len(self._cache) > self.cache_max:
            self._cache.popitem(last=False)

    def _walk(self, want: int) -> str | None:
        self.walks += 1
        found = None
        stack, seen = [self.mount], 0
        while stack and seen < self.walk_max:
            here = stack.pop()
            try:
                entries = list(os.scandir(here))
            except OSError:
                continue  # gone, or not ours to read
            for e in entries:
                try:
                    if not e.is_dir(follow_symlinks=False):
                        continue
                    ino = e.inode()
                except OSError:
                    continue
                seen += 1
                rel = "/" + os.path.relpath(e.path, self.mount)
                if ino == want:
                    found = rel
                self.keep(ino, rel)
                stack.append(Path(e.path))
        return found

    def path(self, cid: int) -> str | None:
        """The path of cgroup ``cid`` (``/`` for the root), or None where no cgroup
        under the mount has it now."""
        if cid in self._cache:
            self._cache.move_to_end(cid)
            return self._cache[cid]
        try:
            if self.mount.stat().st_ino == cid:
                self.keep(cid, "/")
                return "/"
        except OSError:
            return None
        found = self._walk(cid)
        if found is None:
            self.keep(cid, None)
        return found


class Locator:
    """A followed process's cgroup path: /proc's (while it lives) where it is the very
    cgroup the kernel saw it in (``cid``, its id at its first KVM call), else the
    kernel's id resolved under the mount; /proc's alone where the kernel kept none."""

    def __init__(self, mount: str | os.PathLike | None, proc: str | os.PathLike = "/proc",
                 resolver: Resolver | None = None) -> None:
        self.mount = Path(mount) if mount is not None else None
        self.proc = proc
        self.resolver = resolver or (Resolver(mount) if mount is not None else None)

    @classmethod
    def of_host(cls, proc: str | os.PathLike = "/proc") -> Locator:
        """The Locator of this host's v2 hierarchy (none mounted: /proc's paths only)."""
        try:
            text = (Path(proc) / "self" / "mountinfo").read_text()
        except OSError:
            text = ""
        return cls(v2_mount(text), proc)

    def __call__(self, pid: int, cid: int | None) -> str | None:
        path = of_pid(pid, self.proc)
        if cid is None or self.resolver is None or self.mount is None:
            return path
        if path is not None:
            try:
                same = (self.mount / path.lstrip("/")).stat().st_ino == cid
            except OSError:
                same = False
            if same:
                self.resolver.keep(cid, path)
                return path
        return self.resolver.path(cid)
