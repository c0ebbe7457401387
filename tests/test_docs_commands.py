"""Every command the documentation shows works as written.

Commands are read from README.md, docs/*.md and the folder READMEs: each line of a code
block and each inline code span, split at ``&&`` and ``;``, that starts with
``whipcast `` or ``python -m ``. ``whipcast`` commands must parse with the real parser
(flags, choices, values); other modules must exist and list every flag used in their
``--help``; quick ones run. What a documented command needs beyond the base install is
checked too: ``whipcast loadtest`` without ``--chart`` must not need matplotlib.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import itertools
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from whipcast.loadtest import cli as loadtest_cli
from whipcast.signaling.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
DOCS = [
    ROOT / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
    *sorted(ROOT.glob("*/README.md")),
]
PREFIXES = ("whipcast ", "python -m ")
RUN_TIMEOUT_S = 60
QUICK = {"whipcast.loadtest.capacity"}
"""Modules whose documented commands run here in full (seconds, no network)."""
NOT_RUN = {"pytest"}
"""Documented modules only looked up: running pytest from pytest would recurse."""


def _code(text: str) -> list[str]:
    """Lines of fenced and indented code blocks (``\\`` continuations joined), and inline
    code spans."""
    found, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif (fenced or line.startswith("    ")) and found and found[-1].endswith("\\"):
            found[-1] = found[-1][:-1] + line.strip()  # a shell line continued
        elif fenced or line.startswith("    "):
            found.append(line.strip())
        else:
            found += re.findall(r"`([^`]+)`", line)
    return found


def _loop_values(text: str) -> dict[str, str]:
    """``for NAME in A B ...`` in shell examples: NAME stands for A."""
    return {m[1]: m[2].split()[0] for m in re.finditer(r"\bfor (\w+) in ([^;]+);", text)}


def documented_commands() -> list[tuple[str, list[str]]]:
    """(where, argv) for every documented command."""
    out: list[tuple[str, list[str]]] = []
    sources = [(str(doc.relative_to(ROOT)), doc.read_text()) for doc in DOCS]
    # The examples ``whipcast loadtest --help`` prints, one per line.
    sources.append(("whipcast loadtest --help", textwrap.indent(loadtest_cli.__doc__, "    ")))
    for where, text in sources:
        variables = _loop_values(text)
        for code in _code(text):
            code = code.split(" # ")[0].split("   #")[0]
            for part in re.split(r"&&|;| \| ", code):
                part = part.strip()
                prefix = next((p for p in PREFIXES if part.startswith(p)), None)
                if prefix is None:
                    continue
                for name, value in variables.items():
                    part = part.replace(f"${name}", value)
                argv = [t for t in shlex.split(part) if t != "..."]
                if len(argv) <= len(prefix.split()):
                    continue  # a placeholder such as ``python -m ...``, not a command
                # `whipcast ingest|egress|signaling`: one command per alternative.
                choices = [t.split("|") if re.fullmatch(r"\w+(\|\w+)+", t) else [t] for t in argv]
                out += [(f"{where}: {part}", list(c)) for c in itertools.product(*choices)]
    return out


COMMANDS = documented_commands()
WHIPCAST = [(where, argv) for where, argv in COMMANDS if argv[0] == "whipcast"]
MODULES = [(where, argv) for where, argv in COMMANDS if argv[0] == "python"]


def test_the_docs_show_the_commands_this_test_expects() -> None:
    """The extraction itself: a change in how docs are written must not empty it."""
    shown = {" ".join(argv[:2]) for _, argv in WHIPCAST}
    assert {"whipcast dev", "whipcast loadtest", "whipcast kafka", "whipcast ingest"} <= shown
    assert {"whipcast egress", "whipcast signaling"} <= shown
    modules = {argv[2] for _, argv in MODULES}
    assert {"pytest", "bench.gateway_bench", "whipcast.loadtest.capacity"} <= modules
    # A name the restructuring replaced must not come back.
    assert not [where for where, argv in MODULES if argv[2].startswith("loadtest.")]


@pytest.mark.parametrize("argv", [a for _, a in WHIPCAST], ids=[w for w, _ in WHIPCAST])
def test_whipcast_command_parses(argv: list[str]) -> None:
    if len(argv) == 2:
        argv = [*argv, "--help"]  # prose naming a subcommand (`whipcast tap`): it must exist
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            build_parser().parse_args(argv[1:])
        except SystemExit as exc:
            if argv[-1] == "--help" and exc.code == 0:
                return
            pytest.fail(f"{' '.join(argv)} does not parse (exit {exc.code}): {stderr.getvalue()}")


@pytest.mark.parametrize("argv", [a for _, a in MODULES], ids=[w for w, _ in MODULES])
def test_python_module_command_exists_and_takes_its_flags(argv: list[str], tmp_path) -> None:
    """``bench`` runs from the checkout, as documented (it is not installed); every other
    module from another directory, as after ``pip install``."""
    module = argv[2]
    cwd = ROOT if module.startswith("bench.") else tmp_path
    if module in NOT_RUN:
        assert importlib.util.find_spec(module) is not None, f"no module {module}"
        return
    if module in QUICK:
        run = _run([sys.executable, *argv[1:]], cwd)
        assert run.returncode == 0, run.stderr
        assert run.stdout.strip(), "printed nothing"
        return
    run = _run([sys.executable, "-m", module, "--help"], cwd)
    assert run.returncode == 0, run.stderr
    flags = [t.split("=")[0] for t in argv[3:] if t.startswith("--")]
    missing = [f for f in flags if not re.search(rf"{re.escape(f)}\b", run.stdout)]
    assert not missing, f"{module} --help does not list {missing}"


def _run(argv: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        argv, cwd=cwd, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False
    )


HELP = [["--help"]] + [[c, "--help"] for c in ("dev", "ingest", "kafka", "loadtest")]


@pytest.mark.parametrize("argv", HELP, ids=[" ".join(a) for a in HELP])
def test_help_is_plain_text(argv: list[str]) -> None:
    """Docstrings are reStructuredText; ``--help`` must not show their markup."""
    run = _run([sys.executable, "-m", "whipcast.signaling.cli", *argv])
    assert run.returncode == 0, run.stderr
    assert "usage: whipcast" in run.stdout
    assert "``" not in run.stdout and not re.search(r":\w+:`", run.stdout), run.stdout


def test_capacity_help_is_plain_text() -> None:
    run = _run([sys.executable, "-m", "whipcast.loadtest.capacity", "--help"])
    assert run.returncode == 0 and "bench/gateway_bench.py" in run.stdout, run.stderr
    assert "``" not in run.stdout


# Run in a fresh interpreter where matplotlib cannot be imported, as after a base install.
_WITHOUT_MATPLOTLIB = """
import sys
class _Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "matplotlib":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, _Absent())
"""


def test_loadtest_without_chart_needs_no_matplotlib(tmp_path: Path) -> None:
    """The README's ``whipcast loadtest --viewers 5 --duration 15 --json r.json`` on the
    base install: every module a run uses imports, and the command reaches the load test
    (replaced here by a stub: the real run is ``test_loadtest.py``'s) without the chart."""
    script = _WITHOUT_MATPLOTLIB + textwrap.dedent("""
        import whipcast.loadtest.publisher, whipcast.loadtest.runner, whipcast.loadtest.workers
        from whipcast.loadtest import cli
        from whipcast.signaling.cli import main
        cli._load_test = lambda args: print("load test ran", args.viewers, args.json)
        main(["loadtest", "--viewers", "5", "--duration", "15", "--json", "r.json"])
        assert not [m for m in sys.modules if m.startswith("matplotlib")]
    """)
    run = _run([sys.executable, "-c", script])
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "load test ran 5 r.json"


def test_loadtest_chart_without_matplotlib_says_what_to_install(tmp_path: Path) -> None:
    """Before anything runs, not after a long load test."""
    script = _WITHOUT_MATPLOTLIB + textwrap.dedent("""
        from whipcast.loadtest import cli
        from whipcast.signaling.cli import main
        cli._load_test = lambda args: print("load test ran")
        main(["loadtest", "--viewers", "5", "--chart", "r.png"])
    """)
    run = _run([sys.executable, "-c", script])
    assert run.returncode == 1 and "load test ran" not in run.stdout
    assert "--chart needs matplotlib: pip install 'whipcast[loadtest]'" in run.stderr
