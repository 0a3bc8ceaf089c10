"""Edits of kvmtrace's BPF text, measured by bench/bpfload.py (never applied to bpf/)."""

from __future__ import annotations

VARIANTS: dict[str, list[tuple[str, str]]] = {
    "shipped": [],
}


def apply(name: str, text: str) -> str:
    for old, new in VARIANTS[name]:
        if text.count(old) != 1:
            raise SystemExit(f"variant {name}: {old[:60]!r} found {text.count(old)} times")
        text = text.replace(old, new)
    return text
