"""The documentation against the code (pure): every module of kvmtrace/ in
docs/architecture.md with the imports its layer allows, every flag of every command in
docs/commands.md, every metric family the exporter serves in docs/metrics.md, a README that
stays an entry point (at most 200 lines), and relative links that lead somewhere."""

from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvmtrace import cli
from tests.test_dashboards import recorded_exposition, served_names

ROOT = Path(__file__).parent.parent
PACKAGE = ROOT / "kvmtrace"
DOCS = ROOT / "docs"
README = ROOT / "README.md"
ARCHITECTURE = DOCS / "architecture.md"
COMMANDS = DOCS / "commands.md"
METRICS = DOCS / "metrics.md"
README_MAX_LINES = 200

FENCE = re.compile(r"^```.*?^```[^\n]*$", re.M | re.S)
MODULE_ROW = re.compile(r"^\| `([^`]+\.py)` \| .+ \| ([a-z]+) \|$", re.M)
LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")


def prose(text: str) -> str:
    """``text`` without its fenced code blocks (program output is not markdown)."""
    return FENCE.sub("", text)


def section(text: str, heading: str) -> str:
    """The body under the level-2 ``heading`` up to the next level-2 heading."""
    parts = re.split(r"^## ", prose(text), flags=re.M)
    found = [p for p in parts if p.split("\n", 1)[0].strip() == heading]
    assert len(found) == 1, f"one '## {heading}' expected, found {len(found)}"
    return found[0]


# ---- modules and layers ----------------------------------------------------------

def package_modules() -> set[str]:
    """Every module of kvmtrace/ as a path under it, less __init__.py and __main__.py."""
    return {p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")
            if p.name not in ("__init__.py", "__main__.py")}


def module_rows() -> dict[str, str]:
    """docs/architecture.md's module table: path under kvmtrace/ -> layer."""
    rows = MODULE_ROW.findall(section(ARCHITECTURE.read_text(), "Modules"))
    assert len(rows) == len(dict(rows)), "a module listed twice"
    return dict(rows)


def layer_rules() -> dict[str, set[str]]:
    """docs/architecture.md's layer table: layer -> the layers it may import."""
    rules = {}
    for line in section(ARCHITECTURE.read_text(), "Layers").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0] not in ("layer", "---"):
            rules[cells[0]] = set() if cells[1] == "nothing" else {
                c.strip() for c in cells[1].split(",")}
    return rules


def resolve(parts: list[str]) -> str | None:
    """The module file of dotted ``parts`` under kvmtrace (the longest prefix that is one)."""
    for n in range(len(parts), -1, -1):
        base = PACKAGE.joinpath(*parts[:n])
        if n and base.with_suffix(".py").is_file():
            return base.with_suffix(".py").relative_to(PACKAGE).as_posix()
        if (base / "__init__.py").is_file():
            return (base / "__init__.py").relative_to(PACKAGE).as_posix()
    return None


def imports(module: str) -> tuple[set[str], set[str]]:
    """(kvmtrace modules, top-level outside packages) that ``module`` imports, anywhere in
    it (imports inside functions count)."""
    path = PACKAGE / module
    package = list(Path(module).parent.parts)
    inside, outside = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "kvmtrace":
                    inside.add(resolve(parts[1:]))
                else:
                    outside.add(parts[0])
        elif isinstance(node, ast.ImportFrom):
            named = node.module.split(".") if node.module else []
            if node.level:
                parts = package[:len(package) - node.level + 1] + named
            elif named and named[0] == "kvmtrace":
                parts = named[1:]
            else:
                outside.add(named[0] if named else "")
                continue
            for alias in node.names:
                inside.add(resolve([*parts, alias.name]))
    inside.discard(None)
    inside.discard(module)
    return inside, outside


def test_every_module_of_the_package_is_in_architecture_md():
    modules, rows = package_modules(), module_rows()
    assert len(modules) >= 10, f"kvmtrace/ yielded only {sorted(modules)}"
    missing = sorted(modules - set(rows))
    assert not missing, (f"docs/architecture.md, '## Modules': add one row per module "
                         f"(| `path` | job | layer |) for {missing}")


def test_every_module_architecture_md_lists_exists():
    rows = module_rows()
    assert rows, "docs/architecture.md's module table yielded no rows"
    gone = sorted(m for m in rows if not (PACKAGE / m).is_file())
    assert not gone, f"docs/architecture.md lists modules that are not in kvmtrace/: {gone}"


def test_every_module_imports_only_what_its_layer_may():
    rows, rules = module_rows(), layer_rules()
    assert len(rules) >= 5, f"docs/architecture.md's layer table yielded {rules}"
    unknown = sorted({layer for layer in rows.values() if layer not in rules}
                     | {m for allowed in rules.values() for m in allowed if m not in rules})
    assert not unknown, f"layers used but not in the layer table: {unknown}"
    wrong, checked = [], 0
    for module, layer in sorted(rows.items()):
        if not (PACKAGE / module).is_file():
            continue
        for dep in sorted(imports(module)[0]):
            checked += 1
            dep_layer = rows.get(dep)
            if dep_layer is None:
                wrong.append(f"{module} imports {dep}, which has no row")
            elif dep_layer not in rules[layer]:
                wrong.append(f"{module} ({layer}) imports {dep} ({dep_layer})")
    assert checked, "no import of kvmtrace found in any module"
    assert not wrong, ("imports docs/architecture.md's layers do not allow (move the code, "
                       "or change the table and say why):\n" + "\n".join(wrong))


def test_the_modules_that_import_bcc_are_the_ones_architecture_md_names():
    para = next((p for p in section(ARCHITECTURE.read_text(), "Layers").split("\n\n")
                 if p.startswith("Imports of bcc:")), None)
    assert para, "docs/architecture.md: no 'Imports of bcc:' paragraph under '## Layers'"
    named = set(re.findall(r"`([^`]+\.py)`", para.split(" only", 1)[0]))
    actual = {m for m in module_rows() if (PACKAGE / m).is_file() and "bcc" in imports(m)[1]}
    assert actual, "no module imports bcc: the loader must"
    assert actual == named, f"bcc is imported by {sorted(actual)}; the page says {sorted(named)}"


def test_the_import_reader_resolves_the_kinds_of_import_the_package_uses():
    assert resolve(["plan"]) == "plan.py"
    assert resolve(["plan", "make_plan"]) == "plan.py"
    assert resolve(["__version__"]) == "__init__.py"
    inside, outside = imports("handoff.py")
    assert {"facts.py", "plan.py", "privileges.py", "loader.py", "reader.py"} <= inside
    assert "socket" in outside
    assert "__init__.py" in imports("cli.py")[0]  # from kvmtrace import __version__


# ---- commands ------------------------------------------------------------------

def command_flags(parser: argparse.ArgumentParser | None = None) -> dict[str, list[str]]:
    """Each subcommand's option strings as --help lists them (not -h/--help, not the
    hidden ones: help=SUPPRESS, such as trace --ebpf)."""
    parser = parser or cli.build_parser()
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert len(subparsers) == 1
    return {name: [o for a in sub._actions
                   if not isinstance(a, argparse._HelpAction) and a.help != argparse.SUPPRESS
                   for o in a.option_strings]
            for name, sub in subparsers[0].choices.items()}


def documented(opt: str, text: str) -> bool:
    """``opt`` written in code: `--pid`, `-p PID`, `kvmtrace --version` (not `--pid-label`)."""
    word = re.compile(r"(?<![\w.-])" + re.escape(opt) + r"(?![\w.-])")
    return any(word.search(span) for span in re.findall(r"`([^`\n]+)`", text))


def test_every_flag_of_every_command_is_in_commands_md():
    flags = command_flags()
    assert set(flags) == {"serve", "trace", "explain", "top", "doctor"}, sorted(flags)
    assert all(flags.values()), f"a subcommand yielded no flags: {flags}"
    text = COMMANDS.read_text()
    missing = [f"{name} {opt}" for name, opts in flags.items()
               for opt in opts if not documented(opt, section(text, f"`kvmtrace {name}`"))]
    assert not missing, ("flags --help lists that docs/commands.md does not document under "
                         f"their command's heading: {missing}")


def test_the_top_level_flags_are_in_commands_md():
    opts = [o for a in cli.build_parser()._actions if a.option_strings
            and not isinstance(a, argparse._HelpAction) for o in a.option_strings]
    assert "--version" in opts
    text = COMMANDS.read_text()
    assert [o for o in opts if not documented(o, text)] == []


def test_the_flag_walk_leaves_out_help_and_hidden_flags():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers().add_parser("cmd")
    sub.add_argument("-p", "--pid")
    sub.add_argument("--secret", help=argparse.SUPPRESS)
    assert command_flags(parser) == {"cmd": ["-p", "--pid"]}


@pytest.mark.parametrize("opt, text, found", [
    ("--pid", "| `-p PID`, `--pid PID` |", True),
    ("-p", "| `-p PID`, `--pid PID` |", True),
    ("-q", "| `-q`, `--quiet` |", True),
    ("--pid", "| `--pid-label` |", False),
    ("--web.config", "| `--web.config.file FILE` |", False),
    ("--json", "JSON lines, with --json", False),
    ("--json", "`-p` or --json or `-x`", False),
    ("--version", "`kvmtrace --version`", True),
])
def test_a_flag_counts_only_when_written_as_code(opt, text, found):
    assert documented(opt, text) is found


# ---- metrics -------------------------------------------------------------------

def documented_metrics() -> set[str]:
    return set(re.findall(r"^\| `(kvmtrace_[a-z_]+)` \|", METRICS.read_text(), re.M))


def test_every_metric_family_the_exporter_serves_is_in_metrics_md(recorded_collector):
    text = recorded_exposition(recorded_collector)
    served = served_names(text)
    families = {f.name + ("_total" if f.type == "counter" else ""): f.type
                for f in text_string_to_metric_families(text)}
    assert len(families) >= 20, f"the exposition yielded only {sorted(families)}"
    assert all(name in served or kind == "histogram" for name, kind in families.items())
    missing = sorted(set(families) - documented_metrics())
    assert not missing, f"docs/metrics.md's table lacks a row for {missing}"


def test_every_metric_metrics_md_lists_is_served(recorded_collector):
    listed = documented_metrics()
    assert listed, "docs/metrics.md's table yielded no metric"
    text = recorded_exposition(recorded_collector)
    families = {f.name for f in text_string_to_metric_families(text)}  # histograms' too
    stale = sorted(listed - served_names(text) - families)
    assert not stale, f"docs/metrics.md lists metrics the exporter does not serve: {stale}"


# ---- the README and the links --------------------------------------------------

def test_the_readme_is_an_entry_point():
    lines = README.read_text().splitlines()
    assert lines, "README.md is empty"
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): move detail to docs/")
    assert "make run" in README.read_text() and "make test" in README.read_text()


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of ``path``'s headings (a repeated heading gets -1, -2, ...)."""
    out, counts = set(), {}
    for line in prose(path.read_text()).splitlines():
        m = re.match(r"#{1,6} (.+)", line)
        if m:
            s = slug(m.group(1))
            n = counts.get(s, 0)
            out.add(s if n == 0 else f"{s}-{n}")
            counts[s] = n + 1
    return out


def pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md")), ROOT / "tests" / "vm" / "README.md"]


def test_every_relative_link_leads_to_a_file_and_heading_that_exist():
    broken, checked = [], 0
    for page in pages():
        for target in LINK.findall(prose(page.read_text())):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            checked += 1
            path, _, fragment = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(ROOT)}: ({target})"
            if not dest.exists():
                broken.append(f"{where}: no such file")
            elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
                broken.append(f"{where}: no such heading in {dest.relative_to(ROOT)}")
    assert checked >= 20, f"only {checked} relative links found in {[str(p) for p in pages()]}"
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_manual_pages_exist():
    names = {p.name for p in DOCS.glob("*.md")}
    assert {"probes.md", "commands.md", "metrics.md", "dashboards.md", "service.md",
            "kernels.md", "architecture.md", "testing.md", "benchmarks.md"} <= names


@pytest.mark.parametrize("heading, anchor", [
    ("`--json` schema", "--json-schema"),
    ("The seed's call chain, by simulation", "the-seeds-call-chain-by-simulation"),
    ("What `make test` sets up", "what-make-test-sets-up"),
])
def test_slug_is_githubs(heading, anchor):
    assert slug(heading) == anchor
