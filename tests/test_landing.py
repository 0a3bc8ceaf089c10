"""The landing page at / (kvmtrace.landing.page) from the shapes the exporter really hands
it: the probe plan rows, TypeReadiness.to_json(), Start.to_json() and Attempt.to_json(). The
browser check is tests/privileged/test_privileged_prometheus.py (headless Chromium)."""

from __future__ import annotations

from html.parser import HTMLParser

from kvmtrace import landing, readiness
from kvmtrace.attempts import Attempt
from kvmtrace.kvmdev import KvmInfo
from kvmtrace.starts import Start

PLAN = [["KVM_CREATE_VM", "tracepoint", "yes", "syscalls:sys_enter_ioctl: the ioctl layer"],
        ["kvm_arch_init_vm", "none", "NO", "no kprobes"]]


def rejected_attempt(comm: str = "qemu-x") -> dict:
    a = Attempt(pid=7, tid=7, comm=comm, vm_type=2, vm_type_name="SEV", start_ns=1,
                end_ns=2, result=-22, errno="EINVAL", rejected=True, verdicts=0,
                reason="type_unsupported", explanation="pid 7 asked for VM type 2 (SEV)",
                hint="SEV-family types need an AMD host",
                cgroup="/kubepods.slice/kubepods-pod1e597579_417e_482f_bf65_5fe170c3aebd.slice",
                owner={"pod_uid": "1e597579-417e-482f-bf65-5fe170c3aebd", "namespace": "ns",
                       "vm": "db"})
    return {"kind": "attempt", **a.to_json()}


def failed_start() -> dict:
    return Start(pid=8, comm="qemu-snp", outcome="failed", stage="before_create",
                 reason="vmm_refused_type", requested_type="SNP", vm_name="guest-1",
                 vmm="qemu", request_evidence="-object sev-snp-guest", mask=1,
                 offered=["DEFAULT"], exit={"how": "exited", "status": 1},
                 hint="needs SNP", summary="qemu-snp refused SNP before KVM_CREATE_VM",
                 owner={"unit": "machine-qemu-1-guest-1.scope", "vm": "guest-1"}).to_json()


class Cells(HTMLParser):
    """Text of each table's cells by table id, and the links."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.links: list[str] = []
        self._table = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self._table = self.tables.setdefault(a.get("id", ""), [])
        elif tag == "tr" and self._table is not None:
            self._table.append([])
        elif tag == "a":
            self.links.append(a["href"])

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._table is not None and self._table:
            self._table[-1].append(data)


def render(**kw) -> Cells:
    types = [t.to_json() for t in readiness.assess_parts("x86_64", KvmInfo(True, 12, 0x1),
                                                         None)]
    args = {"readiness": types, "rejections": [failed_start(), rejected_attempt()], **kw}
    procs = args.pop("processes", [])
    page = landing.page("kvmtrace t on h", PLAN, procs, "/m", **args).decode()
    cells = Cells()
    cells.feed(page)
    return cells


def test_plan_readiness_starts_attempts_and_links():
    c = render()
    assert c.links == ["/m", "/api/rejections", "/api/plan", "/api/processes"]
    assert c.tables["plan"][1:] == PLAN
    ready = {r[1]: r[2] for r in c.tables["readiness"][1:]}
    assert ready["DEFAULT"] == "ready" and ready["SEV"] != "ready", ready
    (start,) = c.tables["starts"][1:]
    owner = "vm guest-1, unit machine-qemu-1-guest-1.scope"
    assert start[:7] == ["8", "qemu-snp", "guest-1", owner, "before_create",
                         "vmm_refused_type", "SNP"]
    (attempt,) = c.tables["attempts"][1:]
    assert attempt[:6] == ["7", "qemu-x", "vm db, pod 1e597579-417e-482f-bf65-5fe170c3aebd, "
                           "namespace ns", "2 SEV", "EINVAL", "type_unsupported"]
    assert attempt[6].startswith("pid 7 asked for VM type 2")


def test_hostile_names_are_escaped():
    c = render(rejections=[rejected_attempt("<script>x</script>")])
    assert c.tables["attempts"][1][1] == "<script>x</script>"  # shown as text
    page = landing.page("t", PLAN, [], rejections=[rejected_attempt("<b>")]).decode()
    assert "<b>" not in page and "&lt;b&gt;" in page


def test_nothing_rejected_says_none():
    page = landing.page("t", PLAN, [], rejections=[]).decode()
    assert page.count("<small>none</small>") == 4  # readiness, starts, attempts, processes
    c = render(rejections=[rejected_attempt()] * 50)
    assert len(c.tables["attempts"]) == 1 + landing.REJECTIONS_SHOWN == 1 + 20  # the newest


def test_a_filter_shows_the_starts_attempts_and_processes_of_one_vm_or_name():
    """``/?filter=TEXT``: rows whose comm, VM name or owner contains TEXT (a busy host's
    other VMs then cannot push them off the page); the text is escaped."""
    procs = [{"pid": 7, "comm": "qemu-x", "owner": {"vm": "db"}, "vm_create_attempts": 1,
              "vm_create_rejected": 1, "types": {}, "vm_types_queries": 0, "type_checks": 0,
              "type_check_rejected": 0},
             {"pid": 9, "comm": "other-vmm", "vm_create_attempts": 1, "vm_create_rejected": 0,
              "types": {}, "vm_types_queries": 0, "type_checks": 0, "type_check_rejected": 0}]
    by_owner = render(filter_text="db", processes=procs)
    assert [r[0] for r in by_owner.tables["attempts"][1:]] == ["7"]
    assert "starts" not in by_owner.tables and "/" in by_owner.links  # none: no table
    assert [r[0] for r in by_owner.tables["processes"][1:]] == ["7"]
    by_name = render(filter_text="guest-1", processes=procs)
    assert [r[0] for r in by_name.tables["starts"][1:]] == ["8"]
    assert "attempts" not in by_name.tables and "processes" not in by_name.tables
    assert [r[0] for r in render(filter_text="", processes=procs).tables["processes"][1:]] == [
        "7", "9"]
    page = landing.page("t", PLAN, [], filter_text="<i>x</i>").decode()
    assert "&lt;i&gt;x&lt;/i&gt;" in page and "<i>x</i>" not in page
