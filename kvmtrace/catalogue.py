"""The metric catalogue: every family kvmtrace exports, in exposition order.

One table, data only: each family's name (as prometheus_client names it: a counter's
samples add ``_total``, a histogram's ``_bucket``, ``_sum`` and ``_count``), type,
help and label names. The collector (kvmtrace.collector, kvmtrace.families) builds
fresh families from it at every scrape; tests/test_collector.py holds it to a real
exposition and tests/test_dashboards.py and tests/test_alerts.py hold the dashboard's
queries and the alert rules to it.
"""

from __future__ import annotations

from dataclasses import dataclass

COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"


@dataclass(frozen=True)
class Family:
    name: str
    type: str  # COUNTER, GAUGE or HISTOGRAM
    help: str
    labels: tuple[str, ...] = ()
    # A series per process name (the per-series families, first in the exposition):
    # with --pid-label, a "pid" label follows "comm".
    per_process: bool = False
    # Takes serve --metrics.labels' owner labels (vm, unit, pod, namespace) after "comm"
    # (and "pid"): the per-process families and the failed starts.
    by_owner: bool = False
    # A counter of the exporter's own health (kvmtrace.runtime's health(), keyed by the
    # name without "kvmtrace_"): what it lost, dropped or folded.
    health: bool = False


def _health(name: str, help: str) -> Family:
    """A counter of the exporter's own health, ``kvmtrace_<name>``."""
    return Family(f"kvmtrace_{name}", COUNTER, help, health=True)


FAMILIES: tuple[Family, ...] = (
    Family("kvmtrace_vm_create_attempts", COUNTER,
           "KVM_CREATE_VM calls seen at the ioctl layer.",
           ("comm", "vm_type", "vm_type_name"), per_process=True),
    Family("kvmtrace_vm_create_rejected", COUNTER,
           "KVM_CREATE_VM calls that failed, by errno.",
           ("comm", "vm_type", "vm_type_name", "errno", "reason"), per_process=True),
    Family("kvmtrace_vm_type_checks", COUNTER,
           "Calls of kernel functions seen by function probes (kvm_arch_init_vm, "
           "*_is_vm_type_supported, the confidential launch's functions).",
           ("probe", "comm", "vm_type", "vm_type_name"), per_process=True),
    Family("kvmtrace_vm_type_check_rejected", COUNTER,
           "Function-probe calls that said no (false, or a negative errno).",
           ("probe", "comm", "vm_type", "vm_type_name"), per_process=True),
    Family("kvmtrace_vm_types_queries", COUNTER,
           "KVM_CHECK_EXTENSION(KVM_CAP_VM_TYPES) calls.",
           ("comm",), per_process=True),
    Family("kvmtrace_encrypt_ops", COUNTER,
           "KVM_MEMORY_ENCRYPT_OP calls (the confidential launch), by command, errno and "
           "firmware status; vm_type: the VM the fd belongs to.",
           ("comm", "vm_type", "vm_type_name", "command", "errno", "firmware_status"),
           per_process=True),
    Family("kvmtrace_vm_create_duration_seconds", HISTOGRAM,
           "KVM_CREATE_VM latency, entry to return at the ioctl layer, by outcome.",
           ("outcome",)),
    Family("kvmtrace_vm_start_failures", COUNTER,
           "Followed processes whose VM start failed, by stage (before_create, at_create, "
           "during_launch, at_first_run), reason, cause (kvmtrace's fixed table) and the "
           "VM type their command line asked for.",
           ("comm", "stage", "reason", "cause", "requested_type"), by_owner=True),
    Family("kvmtrace_probe_calls", COUNTER,
           "Calls seen at each probe point, host-wide and exact whatever processes do "
           "(VM types above 255 count as vm_type=\"other\"), by result (ok, an errno, "
           "or true/false).", ("probe", "vm_type", "vm_type_name", "result")),
    Family("kvmtrace_host_kvm_up", GAUGE,
           "1 when /dev/kvm answered the exporter's KVM_CAP_VM_TYPES query."),
    Family("kvmtrace_host_vm_type_supported", GAUGE,
           "1 when the host's KVM_CAP_VM_TYPES mask has the VM type's bit.",
           ("vm_type", "vm_type_name")),
    Family("kvmtrace_vm_type_ready", GAUGE,
           "1 when the VM type is usable here (offered by KVM_CAP_VM_TYPES, no layer "
           "failed, capacity left), else 0; verdict ready, not_ready, not_applicable or "
           "incomplete, and the id of the check that decided it (as kvmtrace doctor).",
           ("vm_type", "vm_type_name", "verdict", "failed_check")),
    Family("kvmtrace_host_encryption_ids", GAUGE,
           "ASIDs (sev, sev_es: SNP uses SEV-ES's) or TDX KeyIDs (tdx) the host has, "
           "from the misc cgroup's misc.capacity.", ("resource",)),
    Family("kvmtrace_host_encryption_ids_used", GAUGE,
           "Of those, in use by running VMs (misc.current).", ("resource",)),
    Family("kvmtrace_host_firmware_info", GAUGE,
           "1 for each firmware or TDX module version the kernel log states.",
           ("component", "version")),
    Family("kvmtrace_probe_attached", GAUGE,
           "1 for each planned probe point that is attached, else 0.",
           ("probe", "mechanism")),
    _health("events_lost",
            "Events the live stream could not carry (buffer full)."),
    _health("events_throttled",
            "Events left out of the live stream by the per-CPU event budget (counts stay "
            "exact)."),
    _health("counts_dropped",
            "Count updates lost because the counts map was full."),
    _health("counts_over_share",
            "Calls of a process past its share of the counts map (256 keys), counted under "
            "comm=\"other\" without their VM type above 255, reason or detail (sums stay "
            "exact)."),
    _health("counts_inserted",
            "Keys inserted into the kernel's counts map (its fill is this less what the "
            "retirement passes folded out)."),
    _health("calls_dropped",
            "Calls not tracked because the in-flight map was full."),
    _health("procs_dropped",
            "Processes not followed to their end because the map of followed processes "
            "was full."),
    _health("totals_dropped",
            "Host-wide total updates lost because the totals map was full (its keys are "
            "bounded: expected to stay 0)."),
    _health("decode_errors",
            "Events that could not be decoded."),
    _health("retire_errors",
            "Retirement passes skipped because the process list could not be read (e.g. "
            "out of file descriptors)."),
    _health("exited_processes",
            "Count entries of exited processes folded out of the map."),
    _health("live_entries_folded",
            "Count entries of live processes folded out of the map early, because it was "
            "half full (sums stay exact)."),
    _health("live_lines_dropped",
            "Lines of serve's live view dropped because its stdout was not read (counting "
            "never waits for it)."),
    _health("names_folded",
            "Process names (with --metrics.labels: each name with its owner labels) "
            "exported as comm=\"other\" instead of their own series (past --max-series, or "
            "unseen for --series-ttl)."),
    _health("kernel_log_missed",
            "Kernel log records the kernel overwrote before kvmtrace read them (gaps in "
            "/dev/kmsg's sequence numbers)."),
    _health("kernel_log_evicted",
            "Kernel log lines of kvm, kvm_amd, kvm_intel, SEV or TDX pushed out of the "
            "kept ones by their bound (512) before a failed start could be given them."),
    Family("kvmtrace_collect_success", GAUGE,
           "1 when the BPF maps were read at this scrape."),
    Family("kvmtrace_scrape_errors", COUNTER,
           "Scrapes whose BPF map reads failed, by exception kind.", ("kind",)),
    Family("kvmtrace_build_info", GAUGE,
           "kvmtrace build and host information.", ("bcc_version", "kernel", "version")),
)


def family(name: str) -> Family:
    """The catalogue's entry named ``name`` (KeyError if none)."""
    for entry in FAMILIES:
        if entry.name == name:
            return entry
    raise KeyError(name)
