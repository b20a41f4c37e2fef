"""The documentation cannot drift from the code: every command README.md and docs/*.md show is
parsed by its script's own parser, and every relative link resolves.

Commands are found in fenced code blocks (a line ending in a backslash continues on the next) and in
inline code spans: ``python experiments/<script>.py ...`` (also after ``torchrun <options>``) and
``python -m flops ...``. A placeholder such as ``<folder>`` becomes a dummy value; the flags, their
values and their combinations must be what the script accepts today. ``parse_command`` is the one
place that knows how each script builds its parser.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SCRIPTS = sorted(p.stem for p in (ROOT / "experiments").glob("*.py") if p.stem != "__init__")
MODULES = ("flops", "qwen_min.convert")   # run with python -m

# python experiments/<script>.py, or torchrun [options] experiments/<script>.py, or python -m flops; in
# prose also a span that starts with a script's name and its flags, `train.py --resume`
COMMAND = re.compile(r"\b(?:python3?|torchrun(?:\s+\S+)*?)\s+"
                     r"(?:experiments/(?P<script>\w+)\.py|-m\s+(?P<module>flops|qwen_min\.convert)\b)(?P<rest>.*)")
SPAN_COMMAND = re.compile(r"^(?P<script>" + "|".join(SCRIPTS) + r")\.py(?P<rest>\s+-.*)$")
PLACEHOLDER = re.compile(r"<[^<>\s]+>")
DUMMY = "1"   # a value every placeholder's flag accepts: a path, a repo id, a count
SHELL_LIST = re.compile(r"\s(?:&&|\|\||\||;)\s")   # commands joined on one line
REDIRECT = re.compile(r"\s\d?>")


@dataclass(frozen=True)
class Command:
    page: str
    line: int
    script: str          # an experiments script's name, or a module run with -m: "flops", "qwen_min.convert"
    argv: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.page}:{self.line}: {self.script} {' '.join(self.argv)}"


class ParseError(Exception):
    """A documented command that its script's parser refuses."""


def parse_command(script: str, argv: list[str]) -> None:
    """Parse ``argv`` as ``script`` would, with the parser the script itself builds (and, for the
    scripts that take a typed config, the config's own checks); ParseError if it is refused."""
    from experiments.lib import errors
    from flops import __main__ as flops_cli

    try:
        if script == "qwen_min.convert":
            from qwen_min import convert

            convert.build_parser().parse_args(argv)
            return
        if script == "flops":
            if argv[:1] == ["ledger"]:
                flops_cli.ledger_parser().parse_args(argv[1:])
            else:
                flops_cli.count_parser().parse_args(argv)
            return
        module = importlib.import_module(f"experiments.{script}")
        if hasattr(module, "parse_args"):      # train, forecast, evaluate: the config too; study, benchmark, gpu_check
            module.parse_args(argv)
        else:                                  # report, make_tiny_checkpoint
            module.build_parser().parse_args(argv)
    except SystemExit as e:                    # a plain argparse parser's refusal (its message is on stderr)
        raise ParseError(f"exit {e.code}") from None
    except (errors.UsageError, flops_cli.UsageError) as e:
        raise ParseError(str(e)) from None


CODE_SPAN = re.compile(r"`([^`]+)`")
SHELL_BLOCKS = ("", "bash", "sh", "shell", "console")   # fenced blocks read as commands (not python, text)


@functools.cache
def known_flags(script: str) -> frozenset[str]:
    """Every option string the script's own --help shows: argparse also takes a unique prefix of a
    flag (``--val-system`` for ``--val-systems``), which a page must not rely on."""
    helps = []
    for argv in ([["--help"], ["ledger", "--help"]] if script == "flops" else [["--help"]]):
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.suppress(ParseError):   # (--help exits 0)
            parse_command(script, argv)
        helps.append(out.getvalue())
    return frozenset(re.findall(r"(?<![\w-])--[a-z][\w-]*", "\n".join(helps)))


def logical_lines(text: str) -> list[tuple[int, str]]:
    """(line number, text) of every shell block's line, continuations joined, and of every inline code
    span outside fenced blocks."""
    out: list[tuple[int, str]] = []
    fence, pending, start = None, "", 0     # fence: the open block's language, None outside one
    for n, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fence = line.strip()[3:].strip() if fence is None else None
            continue
        if fence is not None:
            if fence not in SHELL_BLOCKS:
                continue
            if not pending:
                start = n
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            out.append((start, pending + line))
            pending = ""
        else:
            out += [(n, span) for span in CODE_SPAN.findall(line)]
    return out


def commands(page: Path) -> list[Command]:
    found, name = [], page.relative_to(ROOT).as_posix() if page.is_relative_to(ROOT) else page.name
    for n, line in logical_lines(page.read_text(encoding="utf-8")):
        for part in SHELL_LIST.split(line):
            if m := COMMAND.search(part) or SPAN_COMMAND.match(part):
                rest = PLACEHOLDER.sub(DUMMY, REDIRECT.split(m["rest"])[0])
                try:
                    argv = tuple(shlex.split(rest, comments=True))
                except ValueError as e:         # an unclosed quote: reported by the test, not at collection
                    argv = ("<unreadable>", str(e))
                found.append(Command(name, n, m["script"] or m["module"], argv))
    return found


ALL = [c for page in PAGES for c in commands(page)]


def test_the_documented_commands_cover_every_script():
    assert {c.script for c in ALL} >= {*SCRIPTS, *MODULES}, "a script no page shows how to run"


@pytest.mark.parametrize("command", ALL, ids=str)
def test_a_documented_command_parses(command: Command):
    assert command.script in SCRIPTS or command.script in MODULES, f"{command}: no such script"
    try:
        parse_command(command.script, list(command.argv))
    except ParseError as e:
        pytest.fail(f"{command}: {e}")
    shortened = [a for a in command.argv if a.startswith("--") and a.split("=")[0] not in known_flags(command.script)]
    assert not shortened, f"{command}: {shortened} are not the flags' full names"


@pytest.mark.parametrize("script", [*SCRIPTS, *MODULES])
def test_the_check_refuses_an_unknown_flag(script: str):
    with pytest.raises(ParseError):
        parse_command(script, ["--no-such-flag"])


def test_commands_are_found_in_blocks_continuations_and_spans(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("Run `python experiments/report.py --runs <folder>` or `study.py --dry-run`:\n\n```bash\n"
                    "python experiments/train.py --model <folder> \\\n    --max-steps 5   # comment\n"
                    "ONEDNN_MAX_CPU_ISA=X python experiments/benchmark.py --only train && echo done\n"
                    "torchrun --nproc-per-node 2 experiments/train.py --rank 8\n```\n")
    found = [(c.line, c.script, c.argv) for c in commands(page)]
    assert found == [(1, "report", ("--runs", DUMMY)), (1, "study", ("--dry-run",)),
                     (4, "train", ("--model", DUMMY, "--max-steps", "5")),
                     (6, "benchmark", ("--only", "train")), (7, "train", ("--rank", "8"))]


def test_the_files_the_pages_name_exist():
    """A path in a code span (`flops/counter.py`) exists; a bare file name (`llmtime.py`) exists
    somewhere in the repository, so a page may name a module without its folder."""
    names = {f.name for f in ROOT.rglob("*.py") if ".git" not in f.parts}
    missing = []
    for page in PAGES:
        for span in CODE_SPAN.findall(page.read_text(encoding="utf-8")):
            for ref in re.findall(r"(?<![\w<>/.-])([\w./-]+\.py)\b", span):
                if not ((ROOT / ref).is_file() if "/" in ref else ref in names):
                    missing.append(f"{page.name}: {ref}")
    assert not missing, f"files named in the docs that do not exist: {missing}"


# ---------------------------------------------------------------------------------------------
# links

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def anchors(page: Path) -> set[str]:
    """GitHub's anchors for the headings of a markdown page."""
    out, fenced = set(), False
    for line in page.read_text(encoding="utf-8").splitlines():
        fenced ^= line.lstrip().startswith("```")
        if not fenced and (m := re.match(r"#{1,6}\s+(.*)", line)):
            slug = re.sub(r"[^\w\- ]", "", m[1].strip().lower()).replace(" ", "-")
            out.add(slug)
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page: Path):
    broken = []
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target):      # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists() or (anchor and dest.suffix == ".md" and anchor not in anchors(dest)):
            broken.append(target)
    assert not broken, f"{page.name}: links that do not resolve: {broken}"


def test_every_docs_page_is_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    linked = {Path(t.partition("#")[0]).as_posix() for t in LINK.findall(readme)}
    missing = [p.relative_to(ROOT).as_posix() for p in PAGES[1:] if p.relative_to(ROOT).as_posix() not in linked]
    assert not missing, f"docs pages the README does not link: {missing}"


def test_the_readme_leads_with_results():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    first_table = next(i for i, line in enumerate(lines, 1) if line.startswith("| "))
    first_image = next(i for i, line in enumerate(lines, 1) if line.startswith("!["))
    assert first_table <= 90 and first_image <= 90, (first_table, first_image)
    assert len(lines) <= 230, f"README.md has {len(lines)} lines"


def python_blocks(page: Path) -> list[tuple[int, str]]:
    """The ```python blocks of a page: (line, code)."""
    return [(page.read_text(encoding="utf-8")[:m.start()].count("\n") + 1, m["code"])
            for m in re.finditer(r"^```python\n(?P<code>.*?)^```", page.read_text(encoding="utf-8"), re.M | re.S)]


SNIPPETS = [(page, line, code) for page in PAGES for line, code in python_blocks(page) if "/path/to/" not in code]


@pytest.mark.parametrize("page, line, code", SNIPPETS, ids=[f"{p.name}:{n}" for p, n, _ in SNIPPETS])
def test_a_documented_python_snippet_runs_and_prints_what_its_comment_says(page: Path, line: int, code: str):
    """A snippet that needs no model (a path placeholder marks those that do) runs as written; where its
    last lines are comments, they are what it prints."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, f"{page.name}:{line}", "exec"), {})
    said = [c.removeprefix("# ") for c in code.rstrip().splitlines() if c.startswith("# ")]
    assert out.getvalue().splitlines() == said
