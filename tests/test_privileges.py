"""kvmtrace.privileges: the requirements judged on other hosts' facts (pure); this
process's facts (kvmtrace.access); and the capability drop (kvmtrace.capdrop, in a child
process, which it changes)."""

from __future__ import annotations

import dataclasses
import errno
import struct
import subprocess
import sys

import pytest

from kvmtrace import access
from kvmtrace import privileges as pv
from kvmtrace.privileges import Access

SERVICE = pv.mask_of(pv.BASE_CAPS)
KVM_GID = 994
ALL_CAPS = (1 << 41) - 1

# This host as the documented service runs it: uid 65534, the three capabilities
# ambient, the kvm group, tracefs readable thanks to CAP_DAC_READ_SEARCH; mainline's
# perf_event_paranoid=2, where its own perf_event_open probe opens.
SERVICE_HOST = Access(
    kernel=(6, 18), euid=65534, effective=SERVICE, ambient=SERVICE, bounding=SERVICE,
    groups=(65534, KVM_GID), unprivileged_bpf_disabled=2, perf_event_paranoid=2,
    perf_open_errno=0,
    tracefs=(("/sys/kernel/debug/tracing", None), ("/sys/kernel/tracing", None)),
    kvm_mode=0o660, kvm_uid=0, kvm_gid=KVM_GID, kvm_group="kvm", kvm_group_gid=KVM_GID,
    udev_running=True, headers_path="/usr/src/linux-headers-6.1.0-57-amd64")
DENIED = "permission denied on /sys/kernel/debug"


def without(a: Access, *caps: str) -> Access:
    m = ~pv.mask_of(caps)
    return dataclasses.replace(a, effective=a.effective & m, ambient=a.ambient & m,
                               bounding=a.bounding & m)


def by_name(a: Access) -> dict[str, pv.Requirement]:
    return {r.name: r for r in pv.requirements(a)}


def test_the_documented_set_is_enough():
    reqs = pv.requirements(SERVICE_HOST)
    assert [r.name for r in reqs] == ["CAP_BPF", "CAP_PERFMON", "perf_event_open",
                                      "tracefs", "/dev/kvm", "kernel headers",
                                      "/proc/kallsyms"]
    assert all(r.ok for r in reqs), reqs
    assert pv.missing(SERVICE_HOST) == []


NO_GROUP = dataclasses.replace(SERVICE_HOST, groups=(65534,), kvm_error="Permission denied")
NO_DAC = dataclasses.replace(without(SERVICE_HOST, "CAP_DAC_READ_SEARCH"),
                             tracefs=(("/sys/kernel/debug/tracing", DENIED),
                                      ("/sys/kernel/tracing", "permission denied on "
                                       "/sys/kernel/tracing")))


@pytest.mark.parametrize(("host", "name", "needles"), [
    (without(SERVICE_HOST, "CAP_BPF"), "CAP_BPF",
     ["missing capability CAP_BPF", "load BPF programs", "ambient"]),
    (without(SERVICE_HOST, "CAP_PERFMON"), "CAP_PERFMON",
     ["missing capability CAP_PERFMON", "attach tracepoints"]),
    (NO_DAC, "tracefs", ["tracefs at /sys/kernel/debug/tracing is not readable", DENIED,
                         "grant CAP_DAC_READ_SEARCH"]),
    (NO_GROUP, "/dev/kvm", ["cannot open /dev/kvm (crw-rw---- uid 0 gid 994)",
                            "Permission denied", "group kvm", "SupplementaryGroups=kvm",
                            "CAP_DAC_OVERRIDE"]),
    (dataclasses.replace(SERVICE_HOST, headers_error="are not at /lib/modules/6.18/build"),
     "kernel headers", ["kernel headers are not at /lib/modules/6.18/build",
                        "ProtectKernelModules"]),
    (dataclasses.replace(SERVICE_HOST, kallsyms_error="Permission denied"),
     "/proc/kallsyms", ["cannot read /proc/kallsyms (Permission denied)",
                        "ProtectKernelTunables"]),
])
def test_each_missing_piece_is_one_line_naming_it(host, name, needles):
    lines = pv.missing(host)
    assert len(lines) == 1, lines
    assert by_name(host)[name].ok is False
    for n in needles:
        assert n in lines[0], lines[0]
    assert "\n" not in lines[0]


# Debian's kernels (the kernel tier's 6.1.0-57 and 6.12.95+deb12 guests, measured with
# this uid and these capabilities): kernel.perf_event_paranoid=3 and perf_event_open
# refused with EACCES without CAP_SYS_ADMIN.
DEBIAN_HOST = dataclasses.replace(SERVICE_HOST, kernel=(6, 1), perf_event_paranoid=3,
                                  perf_open_errno=errno.EACCES)


def test_debian_paranoid_3_needs_sys_admin_and_the_line_names_both_fixes():
    (line,) = pv.missing(DEBIAN_HOST)
    assert by_name(DEBIAN_HOST)["perf_event_open"].ok is False
    for n in ("kernel.perf_event_paranoid is 3", "CAP_PERFMON is not enough",
              "grant CAP_SYS_ADMIN as an ambient capability", "drops it once attached",
              "kernel.perf_event_paranoid=2", "/etc/sysctl.d"):
        assert n in line, line
    # the shipped set (deploy/) adds CAP_SYS_ADMIN: enough there, and it is not kept
    shipped = pv.mask_of(pv.SERVICE_CAPS)
    a = dataclasses.replace(DEBIAN_HOST, effective=shipped, ambient=shipped,
                            bounding=shipped, perf_open_errno=0)  # (its probe opens)
    assert pv.missing(a) == []
    assert "CAP_SYS_ADMIN held" in by_name(a)["perf_event_open"].detail
    assert pv.names(pv.keep_after_attach(a, words=False)[0]) == ["CAP_BPF"]  # 6.1 < 6.5
    # and CAP_DAC_READ_SEARCH, for the VMMs' words (their logs), unless --no-vmm-words
    assert pv.names(pv.keep_after_attach(a)[0]) == ["CAP_DAC_READ_SEARCH", "CAP_BPF"]
    # CAP_SYS_ADMIN effective but not ambient: the loader child would not have it
    here = dataclasses.replace(a, ambient=SERVICE)
    (line,) = pv.missing(here)
    assert "CAP_SYS_ADMIN is effective here but not ambient" in line


def test_paranoid_3_on_a_kernel_that_allows_the_probe_is_enough():
    """Mainline treats 3 as 2 (measured on this 6.18 host with the sysctl set to 3):
    the probe opened without CAP_SYS_ADMIN, so CAP_PERFMON is enough."""
    a = dataclasses.replace(SERVICE_HOST, perf_event_paranoid=3, perf_open_errno=0)
    assert pv.missing(a) == []
    assert "treats it as 2" in by_name(a)["perf_event_open"].detail
    # not tried (an unknown architecture, a fixture): judged as Debian's
    untried = dataclasses.replace(a, perf_open_errno=None)
    assert "kernel.perf_event_paranoid is 3" in pv.missing(untried)[0]


@pytest.mark.parametrize(("paranoid", "err", "needle"), [
    (2, errno.EPERM, "EPERM: Operation not permitted"),  # a seccomp filter (Docker's)
    (3, errno.ENOSYS, "ENOSYS"),
    (2, errno.EACCES, "EACCES"),  # at 2 an EACCES is an LSM's, not the sysctl's
    (None, 4242, "errno 4242"),
])
def test_perf_event_open_refused_otherwise_names_seccomp_and_the_lsm(paranoid, err, needle):
    a = dataclasses.replace(SERVICE_HOST, perf_event_paranoid=paranoid, perf_open_errno=err)
    (line,) = pv.missing(a)
    assert line.startswith("perf_event_open(2) is refused to this process (") and \
        needle in line and "SystemCallFilter=perf_event_open" in line, line


def test_an_unreadable_paranoid_is_unknown_not_missing():
    a = dataclasses.replace(SERVICE_HOST, perf_event_paranoid=None, perf_open_errno=None)
    assert by_name(a)["perf_event_open"].ok is None
    assert pv.missing(a) == []


def test_the_probe_asks_this_kernel():
    """This process's own perf_event_open of a user-only dummy event: it opens here
    (pytest runs as root, or at mainline's paranoid <= 2), and gather() records it."""
    assert access.perf_open_probe() == 0
    assert access.perf_open_probe("unknown-machine") is None
    assert access.gather().perf_open_errno == 0
    assert access.gather("/nonexistent").perf_open_errno is None  # a fixture root: not tried


def test_all_missing_one_line_each_and_the_error_prints_them_so():
    nothing = dataclasses.replace(without(NO_DAC, *pv.SERVICE_CAPS), groups=(65534,),
                                  kvm_error="Permission denied", perf_event_paranoid=3,
                                  perf_open_errno=errno.EACCES)
    lines = pv.missing(nothing)
    assert len(lines) == 5, lines
    assert str(pv.PrivilegeError(lines)) == "\nERROR: ".join(lines)


def test_effective_but_not_ambient_is_named_for_the_loader_child():
    a = dataclasses.replace(SERVICE_HOST, ambient=0)
    lines = pv.missing(a)
    assert len(lines) == 2 and all("not ambient" in ln and "loader child" in ln
                                   for ln in lines), lines
    # ...unless the python binary's file capabilities give them to it
    assert pv.missing(dataclasses.replace(a, file_caps=SERVICE)) == []


def test_sys_admin_stands_in_and_old_kernels_need_it():
    admin = pv.mask_of(["CAP_SYS_ADMIN", "CAP_DAC_READ_SEARCH"])
    a = dataclasses.replace(SERVICE_HOST, effective=admin, ambient=admin, bounding=admin)
    assert pv.missing(a) == []
    assert "CAP_SYS_ADMIN stands in" in by_name(a)["CAP_BPF"].detail
    old = dataclasses.replace(SERVICE_HOST, kernel=(5, 4))  # CAP_BPF means nothing there
    assert pv.requirements(old)[0].name == "CAP_SYS_ADMIN"
    assert "predates CAP_BPF and CAP_PERFMON (5.8)" in pv.missing(old)[0]
    assert pv.missing(dataclasses.replace(a, kernel=(5, 4))) == []


def test_root_gets_its_bounding_set_and_owns_tracefs_and_kvm():
    root = Access(kernel=(6, 18), euid=0, effective=ALL_CAPS, bounding=ALL_CAPS,
                  tracefs=(("/sys/kernel/tracing", None),), headers_path="/h")
    assert pv.missing(root) == []
    # a container's root with only BPF + PERFMON in its bounding set
    container = dataclasses.replace(root, effective=pv.mask_of(["CAP_BPF", "CAP_PERFMON"]),
                                    bounding=pv.mask_of(["CAP_BPF", "CAP_PERFMON"]))
    assert pv.missing(container) == []
    assert "missing capability CAP_BPF" in pv.missing(without(container, "CAP_BPF"))[0]


def test_what_does_not_apply_is_neither_ok_nor_missing():
    a = dataclasses.replace(SERVICE_HOST, tracefs=(), kvm_exists=False)
    r = by_name(a)
    assert r["tracefs"].ok is None and "not mounted" in r["tracefs"].detail
    assert r["/dev/kvm"].ok is None and "does not exist" in r["/dev/kvm"].detail
    assert pv.missing(a) == []


def test_kvm_refused_despite_the_mode_bits_points_elsewhere():
    a = dataclasses.replace(SERVICE_HOST, kvm_error="Operation not permitted")
    assert "the mode bits allow it" in pv.missing(a)[0]
    assert "device cgroup" in pv.missing(a)[0]
    unnamed = dataclasses.replace(NO_GROUP, kvm_group=None)  # gid without a name here
    assert "group 994 (gid 994; systemd SupplementaryGroups=994" in pv.missing(unnamed)[0]


# A machine nothing set up as udev would (measured on this machine kind, 2026-12-05: no
# udev, no kvm group, devtmpfs's /dev/kvm 0600 root:root), the service's uid in no group.
NO_UDEV = dataclasses.replace(NO_GROUP, kvm_mode=0o600, kvm_gid=0, kvm_group="root",
                              kvm_group_gid=None, udev_running=False)


def test_kvm_nobody_set_up_names_debians_rule_never_group_root():
    [line] = pv.missing(NO_UDEV)
    assert line.startswith("cannot open /dev/kvm (crw------- uid 0 gid 0): Permission "
                           "denied: no group may open it (rw------- root) and no udev runs "
                           "here to give it Debian's 0660 root:kvm")
    for needle in ("groupadd --system kvm", "chgrp kvm /dev/kvm", "chmod 0660 /dev/kvm",
                   "SupplementaryGroups=kvm", "CAP_DAC_OVERRIDE"):
        assert needle in line
    assert "group root" not in line and "SupplementaryGroups=root" not in line
    # The kvm group exists (made by hand, or by a package) but the device is not in it.
    made = dataclasses.replace(NO_UDEV, kvm_group_gid=KVM_GID)
    [line] = pv.missing(made)
    assert "groupadd" not in line and "chgrp kvm /dev/kvm; chmod 0660 /dev/kvm" in line
    # 0660 with group root is no better: never advise joining root's group.
    root_rw = dataclasses.replace(NO_UDEV, kvm_mode=0o660)
    assert "group root" not in pv.missing(root_rw)[0]
    assert "no group may open it (rw-rw---- root)" in pv.missing(root_rw)[0]
    # Where udev runs and still left it so, the line does not blame udev's absence.
    assert "no udev" not in pv.missing(dataclasses.replace(NO_UDEV, udev_running=True))[0]


def test_root_is_told_what_a_service_user_would_meet_on_such_a_host():
    root = dataclasses.replace(NO_UDEV, euid=0, groups=(0,), kvm_error=None)
    r = by_name(root)["/dev/kvm"]
    assert r.ok is True
    assert r.detail.startswith("/dev/kvm: opened read-write; a service user could not: no "
                               "group may open it (rw------- root) and no udev runs here")
    # On a Debian host (udev: 0660 root:kvm) root is told nothing more.
    assert by_name(dataclasses.replace(SERVICE_HOST, euid=0))["/dev/kvm"].detail == \
        "/dev/kvm: opened read-write"


@pytest.mark.parametrize(("kernel", "ubd", "caps", "keep"), [
    ((6, 18), 2, SERVICE, []),  # this host: map ops on held fds need nothing
    ((6, 5), 1, SERVICE, []),
    ((6, 1), 2, SERVICE, ["CAP_BPF"]),  # Debian 12's kernel
    ((6, 1), None, SERVICE, ["CAP_BPF"]),  # unknown: keep it
    ((6, 1), 0, SERVICE, []),  # unprivileged bpf allowed
    ((5, 4), 1, pv.mask_of(["CAP_SYS_ADMIN", "CAP_DAC_READ_SEARCH"]), ["CAP_SYS_ADMIN"]),
    ((5, 4), 1, ALL_CAPS, ["CAP_SYS_ADMIN"]),  # CAP_BPF's bit means nothing before 5.8
])
def test_what_is_kept_after_attach(kernel, ubd, caps, keep):
    a = dataclasses.replace(SERVICE_HOST, kernel=kernel, unprivileged_bpf_disabled=ubd,
                            effective=caps)
    mask, why = pv.keep_after_attach(a, words=False)
    assert pv.names(mask) == keep
    assert bool(why) == bool(keep)
    if keep:
        assert "< 6.5" in why


def test_dac_override_is_kept_when_it_is_what_opens_kvm():
    a = dataclasses.replace(SERVICE_HOST, groups=(65534,),
                            effective=SERVICE | pv.mask_of(["CAP_DAC_OVERRIDE"]))
    assert pv.names(pv.keep_after_attach(a, words=False)[0]) == ["CAP_DAC_OVERRIDE"]
    assert pv.keep_after_attach(dataclasses.replace(a, groups=(KVM_GID,)), False)[0] == 0


def test_the_vmms_words_keep_ptrace_and_read_search_where_held():
    """/proc/PID/fd of a root QEMU (more capabilities than a dropped exporter) asks
    CAP_SYS_PTRACE, a 0600 log CAP_DAC_READ_SEARCH; --no-vmm-words keeps neither."""
    root = dataclasses.replace(SERVICE_HOST, kernel=(6, 12), euid=0, effective=ALL_CAPS)
    mask, why = pv.keep_after_attach(root)
    assert pv.names(mask) == ["CAP_DAC_READ_SEARCH", "CAP_SYS_PTRACE"]
    assert "/proc/PID/fd/2" in why and "--no-vmm-words drops it" in why
    assert pv.keep_after_attach(root, words=False)[0] == 0


def test_parse_status_and_file_caps():
    status = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000000c000000004\nNoNewPrivs:\t1\n"
    got = pv.parse_status(status)
    assert got == {"CapInh": 0, "CapEff": SERVICE, "NoNewPrivs": 1}
    assert pv.names(got["CapEff"]) == ["CAP_DAC_READ_SEARCH", "CAP_PERFMON", "CAP_BPF"]
    # struct vfs_cap_data, revision 2 (magic 0x02000000), effective flag set
    v2 = struct.pack("<IIIII", 0x02000000 | 1, SERVICE & 0xFFFFFFFF, 0, SERVICE >> 32, 0)
    assert pv.parse_file_caps(v2) == SERVICE
    assert pv.parse_file_caps(struct.pack("<IIIII", 0x02000000, 4, 0, 0, 0)) == 0
    assert pv.parse_file_caps(b"") == 0 and pv.parse_file_caps(b"\x01") == 0


def test_this_process_facts_are_read():
    a = access.gather()
    status = pv.parse_status(open("/proc/self/status").read())
    assert a.effective == status["CapEff"] and a.ambient == status["CapAmb"]
    assert a.kernel >= (3, 0)
    assert {r.name for r in pv.requirements(a)} >= {"tracefs", "/dev/kvm", "kernel headers"}


def run_drop(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=30, check=False)


def test_drop_clears_everything_and_sets_no_new_privs():
    proc = run_drop("from kvmtrace import capdrop; print(capdrop.drop(0))\n"
                    "print(open('/proc/self/status').read())")
    assert proc.returncode == 0, proc.stderr
    after = pv.parse_status(proc.stdout.split("}", 1)[1])
    assert (after["CapEff"], after["CapPrm"], after["CapAmb"], after["CapInh"],
            after["NoNewPrivs"]) == (0, 0, 0, 0, 1)


def test_drop_keeps_what_it_is_asked_to_keep():
    have = pv.parse_status(open("/proc/self/status").read())["CapEff"]
    if not have >> pv.CAPS["CAP_BPF"] & 1:
        pytest.fail("needs CAP_BPF to keep it (CI runs as root)")
    keep = pv.mask_of(["CAP_BPF"])
    proc = run_drop(f"from kvmtrace import capdrop; a = capdrop.drop({keep}); "
                    "print(a['CapEff'], a['CapPrm'], a['NoNewPrivs'])")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(keep), str(keep), "1"]


def test_drop_refuses_once_another_thread_runs():
    proc = run_drop("import threading, time\n"
                    "threading.Thread(target=time.sleep, args=(5,), daemon=True).start()\n"
                    "from kvmtrace import capdrop, privileges\n"
                    "try:\n    capdrop.drop(0)\n"
                    "except privileges.PrivilegeError as e:\n    print(e)\n")
    assert proc.returncode == 0, proc.stderr
    assert "2 threads are running" in proc.stdout
