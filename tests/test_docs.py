"""The docs stay true: every code block of the README and of the site runs, links resolve, every page
is in the site's navigation, and every public module has an API reference page.

Code blocks. Every fenced block of README.md and of every page under docs/ is either run or marked
as not run, with a reason. The blocks of a page run in order, in one namespace (as a reader pastes
them one after the other), in a temporary working directory. Markers are HTML comments, invisible
on the rendered page and on GitHub, on the lines just above the block they apply to:

* ``<!-- docs-test: skip REASON -->``: the block is not run (a shell command, a program's printed
  output, a ``torchrun`` launch); the reason is required. A block in any language other than
  Python fails the test without it.
* ``<!-- docs-test: replace OLD => NEW -->``: run the block with ``OLD`` (which must occur in it)
  replaced by ``NEW``, e.g. fewer iterations.
* ``<!-- docs-test: compile-backend NAME -->``: ``torch.compile`` uses the backend ``NAME`` in the
  block (``aot_eager``: dynamo and AOTAutograd as with inductor, without its C++ compilation).
* ``<!-- docs-test: one-rank process group -->``: the block initialises ``torch.distributed`` from
  the environment (as under ``torchrun``); it runs as rank 0 of a world of 1.

and, standing alone, ``<!-- docs-test: setup`` followed by Python lines and ``-->``: code run at
that point of the page, hidden from the reader (the ``model``, ``opt`` or data a fragment assumes).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import pkgutil
import re
import socket
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

import higher
from torch_versions import needs_compile

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
PAGES = [README, *sorted(DOCS.rglob("*.md"))]
PAGE_IDS = [str(p.relative_to(ROOT)) for p in PAGES]

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<lang>[\w+-]*)")
_MARKER = re.compile(r"^\s*<!--\s*docs-test:(?P<rest>.*)$")
_MARKERS = ("skip", "replace", "compile-backend", "one-rank process group")


@dataclasses.dataclass
class Block:
    """A fenced code block, or (``lang == "setup"``) a hidden setup comment."""

    page: str
    line: int
    lang: str
    code: str
    markers: list[str]

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"

    def marker(self, name: str) -> list[str]:
        return [m[len(name) :].strip() for m in self.markers if m.startswith(name)]

    @property
    def runs(self) -> bool:
        return self.lang == "setup" or (self.lang in ("python", "py") and not self.marker("skip"))


def parse(path: Path) -> tuple[list[Block], list[str]]:
    """The blocks of a page in order, and the problems found (a marker not above a block...)."""
    page = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name
    lines = path.read_text(encoding="utf-8").split("\n")
    blocks: list[Block] = []
    problems: list[str] = []
    pending: list[tuple[int, str]] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        marker = _MARKER.match(line)
        fence = _FENCE.match(line)
        if marker:
            start = i
            text = marker["rest"]
            while "-->" not in text and i + 1 < len(lines):
                i += 1
                text += "\n" + lines[i]
            body = text.split("-->")[0]
            if body.strip().startswith("setup"):
                if pending:
                    problems.append(f"{page}:{pending[0][0] + 1}: a marker above a setup comment, not a block")
                    pending = []
                code = textwrap.dedent(body.split("\n", 1)[1] if "\n" in body else "")
                blocks.append(Block(page, start + 1, "setup", code, []))
            else:
                pending.append((start, " ".join(body.split())))
        elif fence:
            indent, ticks = fence["indent"], fence["fence"]
            start = i
            body = []
            i += 1
            while i < len(lines) and not re.match(rf"^{re.escape(indent)}{re.escape(ticks)}\s*$", lines[i]):
                body.append(lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i].lstrip())
                i += 1
            if i == len(lines):
                problems.append(f"{page}:{start + 1}: a code block that is never closed")
            blocks.append(
                Block(page, start + 1, fence["lang"].lower(), "\n".join(body) + "\n", [m for _, m in pending])
            )
            pending = []
        elif line.strip() and pending:
            problems.append(f"{page}:{pending[0][0] + 1}: a docs-test marker that is not right above a code block")
            pending = []
        i += 1
    if pending:
        problems.append(f"{page}:{pending[0][0] + 1}: a docs-test marker at the end of the page")
    for block in blocks:
        for marker in block.markers:
            name = next((m for m in _MARKERS if marker.startswith(m)), None)
            if name is None:
                problems.append(f"{block.where}: unknown docs-test marker {marker!r}")
            elif name == "skip" and len(marker[len("skip") :].split()) < 3:
                problems.append(f"{block.where}: 'skip' needs a reason (a few words): {marker!r}")
            elif name == "replace":
                old, sep, _ = marker[len("replace") :].partition(" => ")
                if not sep or old.strip() not in block.code:
                    problems.append(f"{block.where}: 'replace OLD => NEW' whose OLD is not in the block: {marker!r}")
        if block.lang != "setup" and not block.runs and not block.marker("skip"):
            problems.append(
                f"{block.where}: a {block.lang or 'plain'} block that the tests cannot run: run it as python, "
                "or mark it <!-- docs-test: skip REASON -->"
            )
    return blocks, problems


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_every_code_block_is_run_or_marked_with_a_reason(page):
    _, problems = parse(page)
    assert not problems, "\n".join(problems)


def test_the_marker_checks_catch_unmarked_and_unexplained_blocks(tmp_path):
    page = tmp_path / "probe.md"
    text = "```bash\nmake demo\n```\n\n<!-- docs-test: skip no -->\n```text\nout\n```\n\n<!-- docs-test: frobnicate -->\n```python\nx = 1\n```\n"
    page.write_text(text, encoding="utf-8")
    _, problems = parse(page)
    assert len(problems) == 3, problems
    assert "cannot run" in problems[0] and "needs a reason" in problems[1] and "unknown" in problems[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _runnable_pages() -> list[object]:
    """The pages with code to run; one whose code compiles an inner loop runs where torch can
    (tests/torch_versions.py)."""
    params = []
    for page in PAGES:
        running = [b for b in parse(page)[0] if b.runs]
        if running:
            compiles = any("torch.compile(" in b.code for b in running)
            params.append(pytest.param(page, id=str(page.relative_to(ROOT)), marks=[needs_compile] if compiles else []))
    return params


@pytest.mark.parametrize("page", _runnable_pages())
def test_code_blocks_run(page, tmp_path, monkeypatch, capsys):
    blocks, problems = parse(page)
    assert not problems, "\n".join(problems)
    monkeypatch.chdir(tmp_path)  # a block that writes files writes them here
    monkeypatch.syspath_prepend(str(tmp_path))
    page_module = types.ModuleType("docs_page")  # a real module, as a user's script is: dynamo (torch 2.11)
    monkeypatch.setitem(sys.modules, "docs_page", page_module)  # imports the module of the code it traces
    namespace = page_module.__dict__
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    real_compile = torch.compile
    try:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            for block in blocks:
                if not block.runs:
                    continue
                code = block.code
                for replacement in block.marker("replace"):
                    old, _, new = replacement.partition(" => ")
                    code = code.replace(old.strip(), new.strip())
                backend = block.marker("compile-backend")
                torch.compile = functools.partial(real_compile, backend=backend[0]) if backend else real_compile
                if block.marker("one-rank process group"):
                    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(_free_port())),
                                       ("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):  # fmt: skip
                        monkeypatch.setenv(key, value)
                try:
                    exec(compile(code, block.where, "exec"), namespace)
                except Exception as error:
                    raise AssertionError(f"the code block at {block.where} failed: {error!r}") from error
    finally:
        torch.compile = real_compile
        torch.set_default_dtype(dtype)
        torch.set_num_threads(threads)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        torch._dynamo.reset()
    capsys.readouterr()


def test_new_features_examples_were_found():
    """docs/new-features.md: every feature's example is a Python block that runs (was tests/test_docs_examples.py)."""
    blocks, _ = parse(DOCS / "new-features.md")
    assert sum(b.runs and b.lang == "python" for b in blocks) >= 6


@pytest.mark.parametrize("tutorial", ["maml-tutorial.md", "hyperparameter-tutorial.md"])
def test_tutorials_run_with_fewer_iterations(tutorial):
    """The tutorials' full-length loops are shortened for the test, and by the marker only."""
    blocks, _ = parse(DOCS / tutorial)
    replaced = [r for b in blocks for r in b.marker("replace")]
    assert len(replaced) == 1 and replaced[0].startswith("ITERATIONS = ") and replaced[0].endswith("=> ITERATIONS = 10")


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"docs_{name}", DOCS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_diagram_script_draws_the_png(tmp_path):
    out = tmp_path / "diagram.png"
    load_script("make_diagram").main(out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (DOCS / "meta-gradients.png").exists()


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_relative_links_and_images_resolve(page):
    text = page.read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target) or target.startswith("#"):
            continue
        path = target.split("#")[0]
        assert (page.parent / path).exists(), f"{page.name} links to missing {target}"


def _nav_pages() -> list[str]:
    return re.findall(r"^\s*-\s*(?:[^:\n]+:\s*)?([\w./-]+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), flags=re.M)


def test_every_page_is_in_the_site_navigation():
    nav = _nav_pages()
    pages = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md"))
    assert sorted(set(nav)) == pages, f"in docs/ but not in the nav: {sorted(set(pages) - set(nav))}; " + (
        f"in the nav but not in docs/: {sorted(set(nav) - set(pages))}"
    )
    assert len(nav) == len(set(nav)), "a page appears twice in the nav"


def _public_modules() -> list[str]:
    """higher and its modules whose names do not start with '_' (the demos are programs, documented in docs/demo.md)."""
    names = [m.name for m in pkgutil.iter_modules(higher.__path__) if not m.name.startswith("_") and m.name != "demos"]
    return ["higher", *(f"higher.{n}" for n in sorted(names))]


def test_every_public_module_has_an_api_reference_page():
    directives = {}
    for page in (DOCS / "reference").glob("*.md"):
        for module in re.findall(r"^::: ([\w.]+)\s*$", page.read_text(encoding="utf-8"), flags=re.M):
            directives[module] = page.name
    missing = [m for m in _public_modules() if m not in directives]
    assert not missing, f"public modules without an API reference page (docs/reference/, '::: module'): {missing}"
    for (
        path
    ) in directives:  # a module or an object in one: mkdocstrings fails the build on a name that does not resolve
        try:
            importlib.import_module(path)
        except ModuleNotFoundError:
            module, _, name = path.rpartition(".")
            assert hasattr(importlib.import_module(module), name), f"{path} does not resolve"


def test_a_reference_page_that_picks_members_shows_every_public_name():
    """A page that picks a module's members (``members:`` lists, as docs/reference/optim.md and higher.md do)
    must still show or name every name of the module's ``__all__``: one added later would be left out
    silently. A name counts when a directive renders it or the page names it as `` `module.name` ``."""
    for page in (DOCS / "reference").glob("*.md"):
        text = page.read_text(encoding="utf-8")
        picked = re.findall(r"^\s*members: \[([^\]]*)\]", text, flags=re.M)
        if not picked:
            continue
        shown = {name.strip() for names in picked for name in names.split(",")}
        objects = re.findall(r"^::: ([\w.]+)\s*$", text, flags=re.M)
        module = min(objects, key=len)
        shown |= {path.rpartition(".")[2] for path in objects if path != module}
        shown |= set(re.findall(rf"`{re.escape(module)}\.(\w+)`", text))
        missing = sorted(set(importlib.import_module(module).__all__) - shown)
        assert not missing, f"{page.name} leaves out {missing}"


def test_docs_are_linked_from_the_readme():
    readme = README.read_text(encoding="utf-8")
    for page in (
        "meta-gradients.md",
        "maml-tutorial.md",
        "hyperparameter-tutorial.md",
        "migrating.md",
        "reference/index.md",
        "reference-run.md",
        "demo.md",
        "task-batching.md",
        "torch-compile.md",
        "scaling.md",
        "long-horizons.md",
        "choosing-a-method.md",
        "performance.md",
        "compatibility.md",
        "differences.md",
        "known-issues.md",
    ):
        assert f"docs/{page}" in readme, page


def test_the_readme_is_a_front_page():
    """Issue 20: at most 250 lines; the rest lives on the site."""
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 250


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
