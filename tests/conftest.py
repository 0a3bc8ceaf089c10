import os
import socket
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
KERNELS = HERE / "kernels"
KVMTRACE = [sys.executable, "-m", "kvmtrace"]


@pytest.fixture
def kernel_facts():
    from kvmtrace.facts import HostFacts

    def load(name: str) -> HostFacts:
        return HostFacts.load(KERNELS / f"{name}.json")

    return load


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unique_comm(prefix: str = "kvmt") -> str:
    """A comm no other process on the host has (15 bytes max)."""
    return f"{prefix}-{os.getpid() % 100000}-{os.urandom(2).hex()}"[:15]
