from kvmtrace import plan as planmod
from kvmtrace.aggregate import Aggregator, per_process
from kvmtrace.decode import Decoder


def records(decoder, raws):
    return [decoder.count(r) for r in raws]


def test_exited_processes_fold_into_a_residual_without_losing_counts(kernel_facts):
    d = Decoder(planmod.make_plan(kernel_facts("firecracker-6.18-no-kprobes")), "x86_64")
    live = records(d, [
        (10, 0, 0, 0, 0, 0, b"qemu", 3), (10, 0, 2, -22, 0, 0, b"qemu", 2),
        (11, 0, 2, -22, 0, 0, b"qemu", 5), (12, 1, 0, 1, 0, 0, b"libvirtd", 4),
    ])
    agg = Aggregator()
    before = agg.totals(live)
    dead = agg.retire(live, live_pids={12})
    assert {r.pid for r in dead} == {10, 11}
    assert agg.exited_processes == 2
    remaining = [r for r in live if r.pid == 12]
    assert agg.totals(remaining) == before
    # The same comm's series stays one series: 2 + 5 rejected SEV for qemu.
    sev = [n for s, n in before.items() if s.comm == "qemu" and s.vm_type == 2]
    assert sev == [7]


def test_pid_label_keeps_processes_apart(kernel_facts):
    d = Decoder(planmod.make_plan(kernel_facts("firecracker-6.18-no-kprobes")), "x86_64")
    live = records(d, [(10, 0, 2, -22, 0, 0, b"qemu", 2), (11, 0, 2, -22, 0, 0, b"qemu", 5)])
    totals = Aggregator().totals(live, with_pid=True)
    assert sorted((s.pid, n) for s, n in totals.items()) == [(10, 2), (11, 5)]


def test_per_process_summary(kernel_facts):
    d = Decoder(planmod.make_plan(kernel_facts("firecracker-6.18-no-kprobes")), "x86_64")
    procs = per_process(records(d, [
        (10, 0, 0, 0, 0, 0, b"qemu", 3), (10, 0, 5, -22, 0, 0, b"qemu", 2),
        (10, 1, 0, 1, 0, 0, b"qemu", 1)]))
    assert procs == [{
        "pid": 10, "comm": "qemu", "vm_create_attempts": 5, "vm_create_rejected": 2,
        "vm_types_queries": 1, "type_checks": 0, "type_check_rejected": 0,
        "types": {"DEFAULT": {"accepted": 3, "rejected": 0},
                  "TDX": {"accepted": 0, "rejected": 2}},
    }]
