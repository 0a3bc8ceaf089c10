"""Property-based tests (hypothesis): no input makes kvmtrace raise anything but its own
clear errors. Over raw event and map-key bytes, VM types over the whole u64 range on
every architecture, facts files and command lines."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmtrace import contract, tables
from kvmtrace import plan as planmod
from kvmtrace.cli import build_parser
from kvmtrace.decode import DecodeError, Decoder
from kvmtrace.facts import HostFacts
from tests.conftest import KERNELS

U64 = st.integers(min_value=0, max_value=2**64 - 1)
S64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
U32 = st.integers(min_value=0, max_value=2**32 - 1)
ARCHES = ("x86_64", "aarch64", "s390x", "ppc64le", "riscv64", "loongarch64", "mips", "sparc")


def _decoder() -> Decoder:
    return Decoder(planmod.make_plan(HostFacts.load(KERNELS / "seed-tdx-v12-kprobes.json")),
                   "x86_64")


DECODER = _decoder()


@given(st.binary(max_size=2 * contract.EVENT.size))
def test_any_event_bytes_decode_or_are_a_decode_error(data):
    try:
        ev = DECODER.event(data)
    except DecodeError:
        assert len(data) < contract.EVENT.size
        return
    assert isinstance(ev.comm, str) and isinstance(ev.probe, str)
    json.dumps(ev.to_json())  # every decoded event is JSON


@given(U32, U32, U64, S64, U32, U32, st.binary(max_size=16), st.integers(0, 2**64 - 1))
def test_any_count_key_decodes(tgid, probe, vm_type, result, verdicts, detail, comm, count):
    r = DECODER.count((tgid, probe, vm_type, result, verdicts, detail, comm, count))
    assert r.key() == DECODER.count_labels((tgid, probe, vm_type, result, verdicts, detail,
                                            comm))
    assert r.comm.isprintable() and "\n" not in r.comm
    if probe not in DECODER._points:
        assert r.probe == f"unknown:{probe}"


@given(U64, st.sampled_from(ARCHES))
def test_every_vm_type_has_a_name_on_every_arch(vm_type, arch):
    name = tables.vm_type_name(vm_type, arch)
    assert name and (name.startswith("unknown:") or name.isidentifier()), name
    title = tables.vm_type_title(vm_type, arch)
    assert title is None or arch == "x86_64"


@given(U64)
def test_every_mask_decodes(mask):
    types = tables.supported_vm_types(mask)
    assert types == ([0] if mask == 0 else [b for b in range(64) if mask >> b & 1])


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=12)
REAL_FACTS = json.loads((KERNELS / "seed-tdx-v12-kprobes.json").read_text())


@settings(max_examples=300)
@given(st.one_of(JSON, st.fixed_dictionaries(
    {}, optional={k: JSON for k in REAL_FACTS})))
def test_any_facts_file_is_facts_or_a_clear_error(tmp_path_factory, data):
    """What `doctor --facts` turns into 'bad facts file: ...' (cli catches exactly
    ValueError, TypeError and KeyError): nothing else escapes, and what loads plans."""
    path = tmp_path_factory.mktemp("facts") / "f.json"
    path.write_text(json.dumps(data))
    try:
        facts = HostFacts.load(path)
    except (ValueError, TypeError, KeyError):
        return
    planmod.make_plan(facts)


EVIDENCE = json.loads((KERNELS.parent / "hosts" / "constructed-amd-snp-ready.json"
                       ).read_text())["evidence"]


@settings(max_examples=300)
@given(st.one_of(JSON, st.fixed_dictionaries({}, optional={k: JSON for k in EVIDENCE}),
                 st.fixed_dictionaries({}, optional={
                     "cpu_vendor": st.sampled_from(["AuthenticAMD", "GenuineIntel", "x"]),
                     "cpu_flags": st.lists(st.sampled_from(
                         ["svm", "vmx", "hypervisor", "sev", "sev_es", "sev_snp",
                          "tdx_host_platform"])),
                     "cpuid_8000001f": st.none() | U32,
                     "modules": st.lists(st.sampled_from(["kvm", "kvm_amd", "kvm_intel"])),
                     "params": st.dictionaries(st.sampled_from(
                         ["kvm_amd.sev", "kvm_amd.sev_snp", "kvm_intel.tdx", "kvm.tdp_mmu"]),
                         st.sampled_from(["Y", "N", "1", "0", ""])),
                     "misc_capacity": st.none() | st.dictionaries(
                         st.sampled_from(["sev", "sev_es", "tdx"]), st.integers(0, 2000)),
                     "misc_current": st.none() | st.dictionaries(
                         st.sampled_from(["sev", "sev_es", "tdx"]), st.integers(0, 2000)),
                     "dmesg": st.none() | st.lists(st.text(max_size=80), max_size=5),
                     "cmdline": st.none() | st.text(max_size=40)})),
       st.none() | U64, st.sampled_from(ARCHES))
def test_any_evidence_is_judged_or_a_clear_error(evidence, mask, arch):
    """The readiness evidence of a facts file: a clear ValueError, or every type of the
    architecture gets a verdict (no exception), whatever the values and the mask."""
    from kvmtrace import readiness

    facts = {**REAL_FACTS, "arch": arch, "evidence": evidence,
             "kvm": {"present": True, "api_version": 12, "vm_types_mask": mask, "error": None}}
    try:
        f = HostFacts.from_json(facts)
    except (ValueError, TypeError, KeyError):
        return
    got = readiness.assess(f)
    assert [t.name for t in got] == readiness.type_names(arch)
    assert all(t.verdict in (readiness.READY, readiness.NOT_READY, readiness.NOT_APPLICABLE,
                             readiness.INCOMPLETE) for t in got)


@given(st.lists(st.sampled_from(
    ["serve", "trace", "explain", "doctor", "-p", "-n", "-x", "-T", "--json", "--duration",
     "--retire-interval", "--rejections", "--web.listen-address", "--web.max-requests",
     "--facts", "--strict", "0", "-1", "1", "inf", "nan", "1e9", "4294967297", ":9929",
     "x", "--ebpf", "--dump-facts", "--pid-label", "-q", "--type", "SNP", "tdx,sev",
     "--web.telemetry-path", "/metrics", "?"]), max_size=6))
def test_any_command_line_parses_or_is_a_usage_error(argv):
    try:
        build_parser().parse_args(argv)
    except SystemExit as exc:
        assert exc.code in (0, 2)


@pytest.mark.parametrize("pid", [0, -1, 4194305, 2**32 + 1])
def test_no_pid_outside_the_kernels_range_is_accepted(pid):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["trace", "-p", str(pid)])
