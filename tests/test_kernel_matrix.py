"""The kernel tier's matrix (tests/vm/kernels.py): parsing and resolution, without root.

Resolution is tested against a stand-in for one suite's apt lists, BUILT BY HAND below
from what Debian's mirror served on 2026-12-01 (bookworm's 6.1 and trixie-backports' 7.3
layouts); the real mirror is resolved by `make test-kernels`, which prints and records
every build it boots.
"""

from __future__ import annotations

import os

import pytest

from tests.vm import kernels as k

MATRIX = """
# comment
debian12            bookworm            linux-image-amd64
debian13-backports  trixie-backports    linux-image-amd64   userland=trixie  # trailing
"""


def test_the_shipped_matrix_names_what_not_which_build():
    specs = k.read_kernels()
    assert {(s.suite, s.userland) for s in specs} == {
        ("bookworm", "host"), ("bookworm-backports", "host"),
        ("trixie", "trixie"), ("trixie-backports", "trixie")}
    for s in specs:
        assert s.image_meta == "linux-image-amd64" and s.headers_meta == "linux-headers-amd64"


def test_parse_lines_and_options():
    specs = k.parse_kernels(MATRIX)
    assert specs == [k.Spec("debian12", "bookworm", "linux-image-amd64", "host"),
                     k.Spec("debian13-backports", "trixie-backports", "linux-image-amd64",
                            "trixie")]


@pytest.mark.parametrize(("text", "error"), [
    ("a bookworm", "want NAME SUITE IMAGE-METAPACKAGE"),
    ("a bookworm linux-image-amd64 6.1.0-57-amd64", "want NAME SUITE IMAGE-METAPACKAGE"),
    ("a bookworm linux-image-amd64 version=1", "want NAME SUITE IMAGE-METAPACKAGE"),
    ("a bookworm linux-headers-amd64", r"not a linux-image-\* metapackage"),
    ("a bookworm linux-image-amd64 userland=sid", "userland 'sid' is not one of"),
    ("a bookworm linux-image-amd64\na trixie linux-image-amd64", "duplicate names"),
    ("a bookworm linux-image-amd64 tests=some", "tests 'some' is not one of"),
    ("a bookworm linux-image-amd64 tests=kernel+one_guest\n"
     "b trixie linux-image-amd64 tests=core+one_guest",
     "more than one line runs the one_guest tests"),
])
def test_parse_errors_name_the_line(text, error):
    with pytest.raises(k.FetchError, match=error):
        k.parse_kernels(text, "kernels.txt")


def test_forced_versions():
    assert k.forced_versions({}) == {}
    assert k.forced_versions({k.FORCE_ENV: "debian12=6.1.176-1, debian13=6.12.117-1"}) == {
        "debian12": "6.1.176-1", "debian13": "6.12.117-1"}
    with pytest.raises(k.FetchError, match="want NAME=VERSION"):
        k.forced_versions({k.FORCE_ENV: "6.1.176-1"})


def test_suite_pockets():
    a, s = "http://m/debian", "http://m/debian-security"
    assert k.suite_sources("bookworm", a, s).splitlines() == [
        "deb http://m/debian bookworm main", "deb http://m/debian bookworm-updates main",
        "deb http://m/debian-security bookworm-security main"]
    assert k.suite_sources("trixie-backports", a, s) == (
        "deb http://m/debian trixie-backports main\n")


def test_mirrors_from_the_system_sources(tmp_path):
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n"
        "Components: main\n\nTypes: deb\nURIs: http://mirror.example/debian-security\n"
        "Suites: bookworm-security\nComponents: main\n")
    assert k.mirrors(tmp_path) == ("http://mirror.example/debian",
                                   "http://mirror.example/debian-security")
    (tmp_path / "sources.list.d" / "debian.sources").write_text("")
    with pytest.raises(k.FetchError, match="no Debian mirror"):
        k.mirrors(tmp_path)


class HandBuiltSuite:
    """One suite's packages as {name: {version: depends}}, candidate = the last listed."""

    archive = "http://mirror.example/debian"

    def __init__(self, packages: dict[str, dict[str, list[tuple[str, str | None]]]]):
        self.packages = packages

    def update(self, force: bool = False) -> None:
        pass

    def candidate(self, pkg):
        versions = self.packages.get(pkg)
        return list(versions)[-1] if versions else None

    def depends(self, pkg, version):
        try:
            return self.packages[pkg][version]
        except KeyError:
            raise k.FetchError(f"no {pkg}={version}") from None


BOOKWORM = HandBuiltSuite({
    "linux-image-amd64": {"6.1.176-1": [("linux-image-6.1.0-40-amd64", "6.1.176-1")],
                          "6.1.192-3": [("linux-image-6.1.0-57-amd64", "6.1.192-3")]},
    "linux-headers-amd64": {"6.1.176-1": [("linux-headers-6.1.0-40-amd64", "6.1.176-1")],
                            "6.1.192-3": [("linux-headers-6.1.0-57-amd64", "6.1.192-3")]},
    "linux-image-6.1.0-57-amd64": {"6.1.192-3": [("kmod", None), ("linux-base", None),
                                                 ("initramfs-tools", None)]},
    "linux-image-6.1.0-40-amd64": {"6.1.176-1": [("kmod", None)]},
    "linux-headers-6.1.0-57-amd64": {"6.1.192-3": [
        ("linux-headers-6.1.0-57-common", "6.1.192-3"), ("linux-kbuild-6.1", None),
        ("linux-compiler-gcc-12-x86", None)]},
    "linux-headers-6.1.0-40-amd64": {"6.1.176-1": [
        ("linux-headers-6.1.0-40-common", "6.1.176-1"), ("linux-kbuild-6.1", None)]},
    "linux-headers-6.1.0-57-common": {"6.1.192-3": []},
    "linux-headers-6.1.0-40-common": {"6.1.176-1": []},
    "linux-kbuild-6.1": {"6.1.176-1": [], "6.1.192-3": []},
})

# trixie-backports' 7.x: the image package is empty and depends on binary + modules.
TRIXIE_BPO = HandBuiltSuite({
    "linux-image-amd64": {"7.3.4-1~bpo13+1": [
        ("linux-base-amd64", "7.3.4-1~bpo13+1"),
        ("linux-image-7.3.4+deb13-amd64", "7.3.4-1~bpo13+1"),
        ("linux-modules-amd64", "7.3.4-1~bpo13+1")]},
    "linux-headers-amd64": {"7.3.4-1~bpo13+1": [
        ("linux-headers-7.3.4+deb13-amd64", "7.3.4-1~bpo13+1")]},
    "linux-image-7.3.4+deb13-amd64": {"7.3.4-1~bpo13+1": [
        ("dracut", None), ("linux-binary-7.3.4+deb13-amd64", "7.3.4-1~bpo13+1"),
        ("linux-modules-7.3.4+deb13-amd64", "7.3.4-1~bpo13+1")]},
    "linux-binary-7.3.4+deb13-amd64": {"7.3.4-1~bpo13+1": []},
    "linux-modules-7.3.4+deb13-amd64": {"7.3.4-1~bpo13+1": []},
    "linux-headers-7.3.4+deb13-amd64": {"7.3.4-1~bpo13+1": [
        ("gcc-14-for-host", None), ("linux-headers-7.3.4+deb13-common", "7.3.4-1~bpo13+1"),
        ("linux-kbuild-7.3.4+deb13", None)]},
    "linux-headers-7.3.4+deb13-common": {"7.3.4-1~bpo13+1": []},
    "linux-kbuild-7.3.4+deb13": {"7.3.4-1~bpo13+1": []},
})


def test_resolve_follows_the_metapackage_to_the_current_build():
    spec = k.Spec("debian12", "bookworm", "linux-image-amd64", "host")
    kernel = k.resolve_with(spec, BOOKWORM)
    assert (kernel.release, kernel.version, kernel.forced) == ("6.1.0-57-amd64", "6.1.192-3",
                                                                False)
    assert kernel.packages == (
        ("linux-headers-6.1.0-57-amd64", "6.1.192-3"),
        ("linux-headers-6.1.0-57-common", "6.1.192-3"),
        ("linux-image-6.1.0-57-amd64", "6.1.192-3"),
        ("linux-kbuild-6.1", "6.1.192-3"))
    assert kernel.describe()["packages"][2] == "linux-image-6.1.0-57-amd64=6.1.192-3"


def test_resolve_a_forced_version():
    spec = k.Spec("debian12", "bookworm", "linux-image-amd64", "host")
    kernel = k.resolve_with(spec, BOOKWORM, force="6.1.176-1")
    assert (kernel.release, kernel.version, kernel.forced) == ("6.1.0-40-amd64", "6.1.176-1",
                                                                True)
    with pytest.raises(k.FetchError, match=r"linux-image-amd64=6\.1\.100-1 is not served.*"
                                           + k.FORCE_ENV):
        k.resolve_with(spec, BOOKWORM, force="6.1.100-1")


def test_resolve_the_split_7x_layout():
    spec = k.Spec("debian13-backports", "trixie-backports", "linux-image-amd64", "trixie")
    kernel = k.resolve_with(spec, TRIXIE_BPO)
    assert kernel.release == "7.3.4+deb13-amd64"
    assert [p for p, _ in kernel.packages] == [
        "linux-binary-7.3.4+deb13-amd64", "linux-headers-7.3.4+deb13-amd64",
        "linux-headers-7.3.4+deb13-common", "linux-image-7.3.4+deb13-amd64",
        "linux-kbuild-7.3.4+deb13", "linux-modules-7.3.4+deb13-amd64"]


def test_resolve_fails_naming_what_is_missing():
    spec = k.Spec("x", "bookworm", "linux-image-cloud-amd64", "host")
    with pytest.raises(k.FetchError,
                       match=r"suite 'bookworm' .* serves no linux-image-cloud-amd64"):
        k.resolve_with(spec, BOOKWORM)
    broken = HandBuiltSuite({**BOOKWORM.packages, "linux-kbuild-6.1": {}})
    with pytest.raises(k.FetchError, match=r"needs linux-kbuild-6\.1, which suite 'bookworm'"):
        k.resolve_with(k.Spec("debian12", "bookworm", "linux-image-amd64", "host"), broken)


def test_guests_run_side_by_side_one_per_cpu_within_memory():
    from tests.vm import kernel_tier as tier

    assert tier._bytes("4G") == 4 << 30 and tier._bytes("4096M") == 4 << 30
    assert tier._bytes("2048") == 2 << 30  # QEMU's -m default unit is MiB
    assert tier.parallel_guests(4, {"KVMTRACE_VM_PARALLEL": "3"}) == 3
    assert tier.parallel_guests(2, {"KVMTRACE_VM_PARALLEL": "8"}) == 2
    assert tier.parallel_guests(4, {"KVMTRACE_VM_PARALLEL": "0"}) == 1
    chosen = tier.parallel_guests(4, {})
    assert 1 <= chosen <= min(4, len(os.sched_getaffinity(0)))


def test_one_guest_runs_the_one_guest_tests(tmp_path):
    specs = k.read_kernels()
    assert [s.name for s in specs if s.one_guest] == ["debian12-backports"]
    assert all(s.markers == k.GUEST_TESTS[s.tests].markers for s in specs)
    assert all(s.paths and s.bound > 0 for s in specs)
    (tmp_path / "kernels.txt").write_text(MATRIX)
    with pytest.raises(k.FetchError, match=r"no line says tests=\.\.\.\+one_guest"):
        k.read_kernels(tmp_path / "kernels.txt")


def test_each_class_selects_what_it_says():
    """The -m expressions over marker sets: kernel-dependent ones, the core, one_guest."""
    def selects(tests: str, *marks: str) -> bool:
        expr = k.GUEST_TESTS[tests].markers
        names = {"privileged", "host_only", "one_guest", "core"}
        env = {n: n in marks for n in names}
        return eval(expr, {}, env)  # the markers' boolean expression, as pytest reads it

    assert selects("kernel", "privileged") and selects("kernel", "privileged", "core")
    assert not selects("kernel", "privileged", "one_guest")
    assert not selects("kernel", "privileged", "host_only")
    assert selects("core", "privileged", "core") and not selects("core", "privileged")
    assert not selects("core", "privileged", "core", "one_guest")
    assert selects("core+one_guest", "privileged", "one_guest")
    assert selects("core+one_guest", "privileged", "core", "one_guest")
    assert not selects("core+one_guest", "privileged")
    assert selects("kernel+one_guest", "privileged", "one_guest")


def test_core_guests_run_the_probe_tests_of_a_kernel_another_line_covers():
    """A core line's kernel series is run in full by another line (another userland)."""
    specs = k.read_kernels()
    core = [s for s in specs if s.tests.startswith("core")]
    assert core, "the shipped matrix has no core line (docs/testing.md says it has one)"
    for s in core:
        assert "tests/vm/guest_kprobes.py" in s.paths or "tests/privileged" in s.paths
        assert s.userland == "host" and s.suite == "bookworm-backports"
        # the same kernel series in full: trixie's 6.12 (bookworm-backports' is 6.12 too,
        # as both resolved in every dry run; the tier prints what each resolved to)
        assert any(o.suite == "trixie" and o.tests == "kernel" for o in specs)


def test_jobs_start_longest_first_where_they_can_start_at_once():
    from tests.vm import kernel_tier as tier

    specs = k.read_kernels()
    order = tier.job_order(specs, ["trixie"])
    assert order == ["debian12-backports", "debian12", "debian13-backports", "debian13",
                     "readme:trixie"]


def test_worst_case_is_bounded_under_cis_90_minutes():
    """Every job at its bound, two lanes: the tier ends within its deadline, and with the
    host's `make test` and the set-ups before it (measured: under 12 minutes on a fresh
    machine) the whole CI run stays under 80 minutes."""
    from tests.vm import kernel_tier as tier

    assert tier.worst_case([10, 10, 10], 2) == 20
    assert tier.worst_case([30, 10, 10, 10], 2) == 30
    assert tier.worst_case([], 2) == 0
    specs = k.read_kernels()
    bounds = [s.bound for s in specs] + [tier.README_BOUND]
    order = tier.job_order(specs, ["trixie"])
    by_name = {s.name: s.bound for s in specs} | {"readme:trixie": tier.README_BOUND}
    worst = tier.worst_case([by_name[n] for n in order], 2)
    assert sorted(bounds) == sorted(by_name.values())
    assert min(worst, tier.TIER_DEADLINE) + 12 * 60 < 80 * 60, worst
    assert tier.TIER_DEADLINE + 12 * 60 < 80 * 60
