"""kvmtrace: an eBPF tracer of Linux KVM's VM-type dispatch."""

__version__ = "0.1.0"
