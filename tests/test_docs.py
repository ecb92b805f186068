"""The docs stay true: the API reference matches the docstrings, tutorials run, links resolve."""

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"docs_{name}", DOCS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_api_reference_is_generated_from_the_current_docstrings():
    expected = load_script("make_api").render()
    actual = (DOCS / "api.md").read_text(encoding="utf-8")
    assert actual == expected, "docs/api.md is out of date: run python docs/make_api.py"


def test_diagram_script_draws_the_png(tmp_path):
    out = tmp_path / "diagram.png"
    load_script("make_diagram").main(out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (DOCS / "meta-gradients.png").exists()


def python_blocks(markdown: str) -> str:
    return "\n".join(re.findall(r"```python\n(.*?)```", markdown, flags=re.S))


@pytest.mark.parametrize("tutorial", ["maml-tutorial.md", "hyperparameter-tutorial.md"])
def test_tutorial_code_runs(tutorial, capsys):
    code = python_blocks((DOCS / tutorial).read_text(encoding="utf-8"))
    assert "ITERATIONS = " in code
    code, replaced = re.subn(r"ITERATIONS = \d+", "ITERATIONS = 10", code)  # a few iterations: seconds, not minutes
    assert replaced == 1
    exec(compile(code, tutorial, "exec"), {"__name__": "tutorial"})
    assert capsys.readouterr().out


MARKDOWN = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


@pytest.mark.parametrize("page", MARKDOWN, ids=lambda p: p.name)
def test_relative_links_and_images_resolve(page):
    text = page.read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target) or target.startswith("#"):
            continue
        path = target.split("#")[0]
        assert (page.parent / path).exists(), f"{page.name} links to missing {target}"


def test_docs_are_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for page in (
        "meta-gradients.md",
        "maml-tutorial.md",
        "hyperparameter-tutorial.md",
        "migrating.md",
        "api.md",
        "reference-run.md",
    ):
        assert f"docs/{page}" in readme, page


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
