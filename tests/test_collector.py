"""The collector against a fresh registry and a recorded source."""

import shutil
import subprocess

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kvmtrace import catalogue, collector, contract, families
from kvmtrace import plan as planmod
from kvmtrace.collector import KvmtraceCollector
from kvmtrace.decode import Decoder
from kvmtrace.facts import HostFacts
from kvmtrace.kvmdev import KvmInfo
from kvmtrace.plan import Attachment
from kvmtrace.runtime import Runtime
from tests.conftest import HERE
from tests.recorded import RecordedSource


def test_counts_per_comm_type_and_errno(recorded_collector):
    reg, _, _ = recorded_collector()
    g = reg.get_sample_value
    q = {"comm": "qemu-system-x86"}
    assert g("kvmtrace_vm_create_attempts_total", {**q, "vm_type": "0",
                                                   "vm_type_name": "DEFAULT"}) == 4
    assert g("kvmtrace_vm_create_attempts_total", {**q, "vm_type": "2",
                                                   "vm_type_name": "SEV"}) == 4
    assert g("kvmtrace_vm_create_rejected_total", {**q, "vm_type": "2", "vm_type_name": "SEV",
                                                   "errno": "EINVAL",
                                                   "reason": "type_unsupported"}) == 4
    assert g("kvmtrace_vm_create_rejected_total", {**q, "vm_type": "0",
                                                   "vm_type_name": "DEFAULT",
                                                   "errno": "EINVAL",
                                                   "reason": "type_unsupported"}) is None
    assert g("kvmtrace_vm_create_rejected_total", {
        "comm": "fuzz\\x07er", "vm_type": "4294967297", "vm_type_name": "unknown:4294967297",
        "errno": "EINVAL", "reason": "type_unsupported"}) == 1
    assert g("kvmtrace_vm_types_queries_total", q) == 2
    chk = {"probe": "kvm_arch_init_vm", **q, "vm_type": "2", "vm_type_name": "SEV"}
    assert g("kvmtrace_vm_type_checks_total", chk) == 3
    assert g("kvmtrace_vm_type_check_rejected_total", chk) == 3
    vmx = {"probe": "vmx_is_vm_type_supported", **q}
    assert g("kvmtrace_vm_type_checks_total", {**vmx, "vm_type": "0",
                                               "vm_type_name": "DEFAULT"}) == 4
    assert g("kvmtrace_vm_type_check_rejected_total", {**vmx, "vm_type": "0",
                                                       "vm_type_name": "DEFAULT"}) is None
    assert g("kvmtrace_vm_type_check_rejected_total", {**vmx, "vm_type": "2",
                                                       "vm_type_name": "SEV"}) == 3


def test_host_support_attachments_health_and_build_info(recorded_collector):
    reg, _, _ = recorded_collector()
    g = reg.get_sample_value
    assert g("kvmtrace_host_kvm_up") == 1
    assert g("kvmtrace_host_vm_type_supported", {"vm_type": "0", "vm_type_name": "DEFAULT"}) == 1
    assert g("kvmtrace_host_vm_type_supported", {"vm_type": "5", "vm_type_name": "TDX"}) == 0
    assert g("kvmtrace_probe_attached", {"probe": "vmx_is_vm_type_supported",
                                         "mechanism": "kprobe"}) == 1
    assert g("kvmtrace_probe_attached", {"probe": "svm_is_vm_type_supported",
                                         "mechanism": "none"}) == 0
    for name in ("events_lost", "counts_dropped", "calls_dropped", "decode_errors",
                 "exited_processes"):
        assert g(f"kvmtrace_{name}_total") == 0, name
    assert g("kvmtrace_collect_success") == 1
    assert g("kvmtrace_build_info", {"version": "t", "bcc_version": "0.26.0",
                                     "kernel": "6.3"}) == 1


@pytest.mark.parametrize(("with_pid", "host", "fail"), [
    (False, None, False), (True, "constructed-amd-snp-ready", False),
    (False, "constructed-intel-tdx-ready", True)])
def test_the_catalogue_and_a_recorded_exposition_agree(recorded_collector, with_pid, host,
                                                       fail):
    """Every catalogued family is served, in catalogue order, with its type and help, and
    nothing else is; each sample has the catalogue's labels (pid too with --pid-label)."""
    facts = HostFacts.load(HERE / "hosts" / f"{host}.json") if host else None
    reg, _, _ = recorded_collector(with_pid=with_pid, fail=fail,
                                   kvm=facts.kvm if facts else None,
                                   evidence=facts.evidence if facts else None)
    served = list(text_string_to_metric_families(generate_latest(reg).decode()))
    assert len(served) >= 30 and len(catalogue.FAMILIES) >= 30
    assert [f.name for f in served] == [f.name for f in catalogue.FAMILIES]
    samples = 0
    for fam in served:
        entry = catalogue.family(fam.name)
        assert (fam.type, fam.documentation) == (entry.type, entry.help), fam.name
        for s in fam.samples:
            assert set(s.labels) - {"le"} == set(families.label_names(entry, with_pid)), (
                fam.name, s.labels)
            samples += 1
    assert samples >= 30


def test_the_per_series_indices_name_the_catalogues_per_process_families():
    names = [f.name for f in collector.per_series()]
    assert len(names) == collector.N_SERIES
    assert [names[i] for i in (collector.ATTEMPTS, collector.REJECTED, collector.CHECKS,
                               collector.CHECK_REJECTED, collector.QUERIES,
                               collector.ENCRYPT)] == [
        "kvmtrace_vm_create_attempts", "kvmtrace_vm_create_rejected",
        "kvmtrace_vm_type_checks", "kvmtrace_vm_type_check_rejected",
        "kvmtrace_vm_types_queries", "kvmtrace_encrypt_ops"]


def test_without_dev_kvm_no_support_series_and_health_says_so(recorded_collector):
    reg, _, _ = recorded_collector(kvm=KvmInfo(False, error="/dev/kvm does not exist"))
    assert reg.get_sample_value("kvmtrace_host_kvm_up") == 0
    text = generate_latest(reg).decode()
    assert "kvmtrace_host_vm_type_supported{" not in text


def test_a_failing_map_read_degrades_to_partial_output(recorded_collector):
    reg, _, _ = recorded_collector(fail=True)
    assert reg.get_sample_value("kvmtrace_collect_success") == 0
    assert reg.get_sample_value("kvmtrace_host_kvm_up") == 1


def test_scrape_errors_are_logged_once_per_kind_and_counted(recorded_collector, caplog):
    reg, _, source = recorded_collector(fail=True)
    for _ in range(2):
        generate_latest(reg)
    # Three scrapes (make's own registration does none): get_sample_value is one more.
    assert reg.get_sample_value("kvmtrace_scrape_errors_total", {"kind": "OSError"}) == 3
    warnings = [r for r in caplog.records if "reading the BPF maps failed" in r.getMessage()]
    assert len(warnings) == 1 and "OSError" in warnings[0].getMessage()
    source.fail = False
    assert reg.get_sample_value("kvmtrace_collect_success") == 1
    assert reg.get_sample_value("kvmtrace_scrape_errors_total", {"kind": "OSError"}) == 3


def test_retiring_exited_processes_keeps_every_count(recorded_collector):
    reg, rt, source = recorded_collector(live={100})
    before = generate_latest(reg)
    assert rt.retire_exited() == 2  # pid 101's two entries
    assert {r[0] for r in source.deleted} == {101}
    after = generate_latest(reg).replace(b"kvmtrace_exited_processes_total 1.0",
                                         b"kvmtrace_exited_processes_total 0.0")
    assert after == before


def test_pid_label_behind_a_flag(recorded_collector):
    reg, _, _ = recorded_collector(with_pid=True)
    assert reg.get_sample_value("kvmtrace_vm_create_rejected_total", {
        "comm": "qemu-system-x86", "pid": "101", "vm_type": "2", "vm_type_name": "SEV",
        "errno": "EINVAL", "reason": "type_unsupported"}) == 1


def test_promtool_accepts_the_exposition(recorded_collector):
    reg, _, _ = recorded_collector()
    assert shutil.which("promtool"), "promtool missing: 'make test' installs Debian's prometheus"
    out = subprocess.run(["promtool", "check", "metrics"], input=generate_latest(reg),
                         capture_output=True, check=False)
    assert out.returncode == 0 and out.stdout == b"" and out.stderr == b"", out


def test_one_sample_per_label_set_and_reasons_from_verdicts_and_errno(recorded_collector):
    from kvmtrace.contract import VERDICT_ARCH_INIT_FAILED, VERDICT_ARCH_INIT_SEEN

    raws = [
        (100, contract.PROBE_CREATE_VM, 0, 0, 0, 0, b"vmm", 5),
        (100, contract.PROBE_CREATE_VM, 0, -24, 0, 0, b"vmm", 2),  # EMFILE on type 0
        (100, contract.PROBE_CREATE_VM, 0, -24, VERDICT_ARCH_INIT_SEEN, 0, b"vmm", 1),
        (100, contract.PROBE_CREATE_VM, 0, -12,
         VERDICT_ARCH_INIT_SEEN | VERDICT_ARCH_INIT_FAILED, 0, b"vmm", 1),  # ENOMEM
        (100, contract.PROBE_CREATE_VM, 0, -22,
         VERDICT_ARCH_INIT_SEEN | VERDICT_ARCH_INIT_FAILED, 0, b"vmm", 3),  # supported type
    ]
    reg, _, _ = recorded_collector(raws=raws)
    text = generate_latest(reg).decode()
    lines = [ln for ln in text.splitlines() if ln.startswith("kvmtrace_vm_create_")]
    assert len(lines) == len(set(ln.rsplit(" ", 1)[0] for ln in lines))
    g = reg.get_sample_value
    base = {"comm": "vmm", "vm_type": "0", "vm_type_name": "DEFAULT"}
    assert g("kvmtrace_vm_create_attempts_total", base) == 12
    assert g("kvmtrace_vm_create_rejected_total",
             {**base, "errno": "EMFILE", "reason": "fd_exhausted"}) == 3
    assert g("kvmtrace_vm_create_rejected_total",
             {**base, "errno": "ENOMEM", "reason": "no_memory"}) == 1
    assert g("kvmtrace_vm_create_rejected_total",
             {**base, "errno": "EINVAL", "reason": "arch_init_failed"}) == 3


def test_latency_histogram_from_log2_slots(recorded_collector):
    reg, _, source = recorded_collector()
    # 3 accepted calls in slot 18 (262-524 µs), 2 rejected in slot 13 (8-16 µs).
    source.latency = ([(0, 18, 3), (1, 13, 2)], [900_000, 20_000])
    g = reg.get_sample_value
    acc, rej = {"outcome": "accepted"}, {"outcome": "rejected"}
    assert g("kvmtrace_vm_create_duration_seconds_count", acc) == 3
    assert g("kvmtrace_vm_create_duration_seconds_sum", acc) == 0.0009
    assert g("kvmtrace_vm_create_duration_seconds_bucket", {**acc, "le": "0.000262144"}) == 0
    assert g("kvmtrace_vm_create_duration_seconds_bucket", {**acc, "le": "0.000524288"}) == 3
    assert g("kvmtrace_vm_create_duration_seconds_bucket", {**rej, "le": "8.192e-06"}) == 0
    assert g("kvmtrace_vm_create_duration_seconds_bucket", {**rej, "le": "1.6384e-05"}) == 2
    assert g("kvmtrace_vm_create_duration_seconds_bucket", {**rej, "le": "+Inf"}) == 2


def test_a_process_list_that_cannot_be_read_skips_the_pass_and_loses_nothing(
        recorded_collector, caplog):
    reg, rt, source = recorded_collector(live={100})
    before = reg.get_sample_value("kvmtrace_vm_create_attempts_total",
                                  {"comm": "qemu-system-x86", "vm_type": "2",
                                   "vm_type_name": "SEV"})

    def no_fds():
        raise OSError(24, "Too many open files", "/proc")

    live = rt._live_pids
    rt._live_pids = no_fds
    assert rt.retire_exited() == 0 and rt.retire_exited() == 0
    assert source.deleted == []
    assert reg.get_sample_value("kvmtrace_retire_errors_total") == 2
    assert len([r for r in caplog.records if "cannot list processes" in r.getMessage()]) == 1
    rt._live_pids = live  # /proc readable again: the exited pid 101 is folded, exactly
    assert rt.retire_exited() == 2
    assert reg.get_sample_value("kvmtrace_vm_create_attempts_total",
                                {"comm": "qemu-system-x86", "vm_type": "2",
                                 "vm_type_name": "SEV"}) == before


def _names_collector(kernel_facts, raws, max_series, live, clock=None):
    from kvmtrace.aggregate import Aggregator, NameBudget

    plan = planmod.make_plan(kernel_facts("seed-tdx-v12-kprobes"))
    source = RecordedSource(raws)
    rt = Runtime(source, Decoder(plan, "x86_64"), Aggregator(NameBudget(max_series)),
                 live_pids=lambda: live, series_ttl=60, clock=clock or (lambda: 0.0))
    reg = CollectorRegistry()
    reg.register(KvmtraceCollector(
        rt, [Attachment(p, True) for p in plan.points], lambda: KvmInfo(True, 12, 0x1),
        "x86_64", {"version": "t", "bcc_version": "x", "kernel": "k"}))
    return reg, rt, source


def _attempts_by_comm(reg):
    out = {}
    for fam in reg.collect():
        if fam.name == "kvmtrace_vm_create_attempts":
            for s in fam.samples:
                if s.name.endswith("_total"):
                    out[s.labels["comm"]] = out.get(s.labels["comm"], 0) + s.value
    return out


def test_names_past_the_series_budget_fold_into_other_and_sums_stay_exact(kernel_facts):
    # One process through 50 names, a rejected create under each (2 samples per name:
    # attempts and rejected); a budget of 20 samples.
    raws = [(100, contract.PROBE_CREATE_VM, 2, -22, 0, 0, f"vmm{i:02d}".encode(), 3)
            for i in range(50)]
    live = {100}
    reg, rt, _ = _names_collector(kernel_facts, raws, 20, live=live)
    got = _attempts_by_comm(reg)
    assert sum(got.values()) == 150
    own = {c for c in got if c != "other"}
    assert 10 <= len(own) <= 11 and got["other"] == 3 * (50 - len(own))
    assert reg.get_sample_value("kvmtrace_names_folded_total") == 50 - len(own)
    # Counts keep growing: every sum only goes up, the folded names stay folded.
    rt.source.raws = [(*r[:7], r[7] + 1) for r in raws]
    again = _attempts_by_comm(reg)
    assert set(again) == set(got) and sum(again.values()) == 200
    # The process exits: its folded names stay "other" in the exited residual.
    live.clear()
    assert rt.retire_exited() == 50
    assert _attempts_by_comm(reg) == again


def test_a_name_unseen_for_the_ttl_folds_into_other(kernel_facts):
    now = [0.0]
    raws = [(100, contract.PROBE_CREATE_VM, 2, -22, 0, 0, b"gone", 4),
            (101, contract.PROBE_CREATE_VM, 2, -22, 0, 0, b"alive", 1)]
    reg, rt, _ = _names_collector(kernel_facts, raws, 1000, live={101},
                                  clock=lambda: now[0])
    assert _attempts_by_comm(reg) == {"gone": 4, "alive": 1}
    assert rt.retire_exited() == 1  # pid 100 exits at t=0
    now[0] = 30.0
    rt.retire_exited()
    assert _attempts_by_comm(reg) == {"gone": 4, "alive": 1}  # within the ttl (60 s)
    now[0] = 61.0
    rt.retire_exited()
    assert _attempts_by_comm(reg) == {"other": 4, "alive": 1}  # the sum is unchanged
    assert reg.get_sample_value("kvmtrace_names_folded_total") == 1


def test_names_of_processes_that_exited_between_scrapes_count_against_the_budget(
        kernel_facts):
    """The retirement pass meets names no scrape has seen (the processes came and went
    in between): they are admitted only while the budget lasts."""
    raws = [(100 + i, contract.PROBE_CREATE_VM, 2, -22, 0, 0, f"brief{i:02d}".encode(), 1)
            for i in range(40)]
    reg, rt, _ = _names_collector(kernel_facts, raws, 20, live=set())
    assert rt.retire_exited() == 40  # before any scrape
    got = _attempts_by_comm(reg)
    assert sum(got.values()) == 40 and len([c for c in got if c != "other"]) == 10


def test_names_met_at_retirement_cost_what_their_records_will_make(kernel_facts):
    """Each name with a rejected create and a rejected kvm_arch_init_vm (4 samples):
    a budget of 20 admits 5 of them, not 10."""
    raws = []
    for i in range(40):
        comm = f"chk{i:02d}".encode()
        raws += [(100 + i, contract.PROBE_CREATE_VM, 2, -22, 0, 0, comm, 1),
                 (100 + i, contract.PROBE_ARCH_INIT_VM, 2, -22, 0, 0, comm, 1)]
    reg, rt, _ = _names_collector(kernel_facts, raws, 20, live=set())
    rt.retire_exited()
    got = _attempts_by_comm(reg)
    assert sum(got.values()) == 40 and len([c for c in got if c != "other"]) == 5
