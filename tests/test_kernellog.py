"""kvmtrace.kernellog: /dev/kmsg records, which lines are kept, sequence gaps, a window.

The records are in /dev/kmsg's format (Documentation/ABI/testing/dev-kmsg); their texts
are the kernel's own lines as public reports quote them (vm-start-paths.md section 6)
and as the kernel tier's guests print them (kvm_amd's bring-up) -- written by hand here
into records. KernelLog reads them from a real pipe standing in for /dev/kmsg (one
write, one record, as the device gives them)."""

from __future__ import annotations

import os

import pytest

from kvmtrace import kernellog


def rec(seq: int, text: str, ts_us: int = 0, pri: int = 6) -> bytes:
    return f"{pri},{seq},{ts_us},-;{text}\n SUBSYSTEM=x\n".encode()


@pytest.mark.parametrize(("text", "subsystem"), [
    ("kvm_amd: Nested Virtualization enabled", "kvm_amd"),  # the 7.3 guest
    ("SVM: kvm: Nested Paging enabled", "kvm_amd"),  # the 6.1 guest
    ("kvm_amd: SEV-SNP enabled (ASIDs 1 - 99)", "kvm_amd"),
    ("ccp 0000:22:00.1: SEV API:1.55 build:21", "sev"),
    ("ccp 0000:22:00.1: SEV-SNP: failed to INIT rc -5, error 0x3", "sev"),
    ("SEV-SNP: RMP table physical range [0x0000000035600000 - 0x0000000075bfffff]", "sev"),
    ("virt/tdx: module initialization failed (-5)", "tdx"),
    ("kvm_intel: TDX not supported by the host platform", "kvm_intel"),
    ("SEAMCALL TDH_MEM_PAGE_ADD failed: 0xc000010000000000", "tdx"),
    ("kvm: kvmtrace test: guest_memfd refused", "kvm"),
    ("usb 1-1: new high-speed USB device number 2", None),
    ("EXT4-fs (vda): mounted filesystem", None),
    ("audit: type=1400 audit(0.0:1): apparmor=\"DENIED\"", None),
])
def test_which_subsystem_a_line_is_from(text, subsystem):
    assert kernellog.subsystem(text) == subsystem


def test_parse_a_record_and_refuse_what_is_not_one():
    r = kernellog.parse(rec(42, "kvm: hello; world", 1_500_000, pri=12))
    assert (r.seq, r.ts_us, r.level, r.text) == (42, 1_500_000, 4, "kvm: hello; world")
    assert r.line() == "[    1.500000] kvm: hello; world"
    assert kernellog.parse(b"no semicolon here") is None
    assert kernellog.parse(b"x,y,z;text") is None


def feed(records: list[bytes], keep: int = 512) -> kernellog.KernelLog:
    """A KernelLog over a pipe holding ``records`` (O_NONBLOCK: read to its end)."""
    r, w = os.pipe()  # a pipe read may join writes: one write, one poll, in turn
    os.set_blocking(r, False)
    log = kernellog.KernelLog(r, keep)
    for raw in records:
        os.write(w, raw)
        log.poll()
    os.close(w)
    return log


def test_only_the_start_deciding_lines_are_kept_and_a_gap_is_counted():
    log = feed([rec(1, "kvm_amd: SEV enabled", 10), rec(2, "usb 1-1: device", 20),
                rec(7, "kvm: late", 30), rec(7, "kvm: late", 30), rec(8, "EXT4: x", 40)])
    assert [ln.text for ln in log.lines] == ["[    0.000010] kvm_amd: SEV enabled",
                                             "[    0.000030] kvm: late"]
    assert (log.read, log.missed, log.last_seq) == (4, 4, 8)  # seqs 3-6 overwritten; 7 once


def test_the_bound_pushes_the_oldest_out_and_counts_it():
    log = feed([rec(i, f"kvm: line {i}", i) for i in range(1, 11)], keep=4)
    assert [ln.seq for ln in log.lines] == [7, 8, 9, 10]
    assert log.evicted == 6


def test_a_warn_splat_naming_kvm_is_one_line_and_another_is_not_kept():
    splat = ["------------[ cut here ]------------",
             "WARNING: CPU: 1 PID: 4242 at arch/x86/kvm/x86.c:11100 "
             "kvm_arch_vcpu_ioctl_run+0x5c/0x600 [kvm]",
             "Modules linked in: kvm_amd kvm",
             "Call Trace:",
             " <TASK>",
             " kvm_vcpu_ioctl+0x2b1/0x6c0 [kvm]",
             " __x64_sys_ioctl+0x90/0xd0",
             "---[ end trace 0000000000000000 ]---"]
    other = ["WARNING: CPU: 0 PID: 1 at drivers/usb/core/hub.c:1 hub_event+0x1/0x2",
             "Call Trace:", " hub_event+0x1/0x2", "---[ end trace 0000000000000001 ]---"]
    records = [rec(i + 1, t, 100 + i) for i, t in enumerate([*splat, *other])]
    log = feed(records)
    (kept,) = log.lines
    assert kept.subsystem == "warn"
    assert kept.text.startswith("[    0.000101] WARNING: CPU: 1 PID: 4242 at arch/x86/kvm/x86.c")
    assert "kvm_vcpu_ioctl+0x2b1/0x6c0 [kvm]" in kept.text


def test_a_starts_window_by_sequence_number():
    log = feed([rec(1, "kvm: before", 1_000_000), rec(2, "kvm: inside", 5_000_000),
                rec(3, "kvm: after", 9_000_000)])
    assert log.between(1, 2) == ["[    5.000000] kvm: inside"]
    assert log.between(1, None) == ["[    5.000000] kvm: inside", "[    9.000000] kvm: after"]
    assert len(log.between(None, None)) == 3 and log.between(3, None) == []


def test_an_events_time_gives_the_position_the_log_had_then():
    """Read late (the reader was busy), an event still gets the position of the last
    poll before its time: the lines logged after it are in its window."""
    now = [100]
    r, w = os.pipe()
    os.set_blocking(r, False)
    log = kernellog.KernelLog(r, clock=lambda: now[0])
    assert log.position_at(50) is None  # before any mark: from the first line
    for seq, t in ((1, 100), (2, 200), (3, 300)):
        os.write(w, rec(seq, f"kvm: line {seq}", seq))
        now[0] = t
        log.poll()
    log.poll()  # no record: no new mark
    os.close(w)
    assert [log.position_at(t) for t in (99, 100, 150, 299, 300, 10**9)] == \
        [None, 1, 1, 2, 3, 3]
    assert log.between(log.position_at(250), None) == ["[    0.000003] kvm: line 3"]


def test_a_kmsg_that_cannot_be_opened_says_why_in_one_line(tmp_path):
    log, why = kernellog.open_log(str(tmp_path / "no-kmsg"))
    assert log is None and why.startswith(f"{tmp_path}/no-kmsg: No such file")
