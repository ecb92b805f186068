"""The tests mirror the source: every public module of ``src/higher`` has tests named for it.

A contributor changing ``src/higher/X.py`` runs ``tests/test_X.py`` and ``tests/test_X_*.py``
(``tests/demos/test_X.py`` for ``src/higher/demos/X.py``); private modules (``_name``) are the
layers under a public front end and are tested through it (docs/development.md lists which).
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "src" / "higher"
TESTS = ROOT / "tests"


def untested_modules(source: Path, tests: Path) -> list[str]:
    """The public modules under ``source`` without a test module named for them under ``tests``."""
    missing = []
    for path in sorted(source.rglob("*.py")):
        relative = path.relative_to(source)
        if path.stem.startswith("_") or any(part.startswith("_") for part in relative.parts[:-1]):
            continue
        folder = tests.joinpath(*relative.parts[:-1])
        if not (folder / f"test_{path.stem}.py").is_file() and not any(folder.glob(f"test_{path.stem}_*.py")):
            missing.append(str(relative))
    return missing


def test_every_public_module_has_tests_named_for_it():
    assert untested_modules(SOURCE, TESTS) == []


def test_the_check_finds_a_module_without_tests(tmp_path):
    source, tests = tmp_path / "src", tmp_path / "tests"
    (source / "sub").mkdir(parents=True)
    tests.mkdir()
    for name in ("a.py", "b.py", "_private.py", "sub/c.py"):
        (source / name).write_text("")
    (tests / "test_a_options.py").write_text("")
    assert untested_modules(source, tests) == ["b.py", "sub/c.py"]
