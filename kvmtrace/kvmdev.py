"""Talk to /dev/kvm: the host's own answer to KVM_CAP_VM_TYPES."""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

from kvmtrace import kvmabi, tables


@dataclass(frozen=True)
class KvmInfo:
    """What /dev/kvm said. ``error`` is set when it could not be asked."""

    present: bool
    api_version: int | None = None
    # KVM_CHECK_EXTENSION(KVM_CAP_VM_TYPES): bitmap of supported types.
    # 0 means the kernel does not know the capability (before 6.8): only
    # type 0 is accepted there.
    vm_types_mask: int | None = None
    error: str | None = None

    @property
    def supported_types(self) -> list[int]:
        if self.vm_types_mask is None:
            return []
        return tables.supported_vm_types(self.vm_types_mask)


def _ioctl(libc: ctypes.CDLL, fd: int, request: int, arg: int) -> int:
    ret = libc.ioctl(fd, ctypes.c_ulong(request), ctypes.c_ulong(arg))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def query(path: str = "/dev/kvm") -> KvmInfo:
    """Ask ``path`` for its API version and supported VM types."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return KvmInfo(present=False, error=f"{path} does not exist (KVM not loaded)")
    except OSError as exc:
        return KvmInfo(present=True, error=f"cannot open {path}: {exc.strerror}")
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        api = _ioctl(libc, fd, kvmabi.KVM_GET_API_VERSION, 0)
        mask = _ioctl(libc, fd, kvmabi.KVM_CHECK_EXTENSION, kvmabi.KVM_CAP_VM_TYPES)
    except OSError as exc:
        return KvmInfo(present=True, error=f"ioctl on {path} failed: {exc.strerror}")
    finally:
        os.close(fd)
    return KvmInfo(present=True, api_version=api, vm_types_mask=mask)
