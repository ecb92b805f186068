"""Write docs/api.md, the API reference, from the docstrings of the public modules.

Run: python docs/make_api.py   (tests/test_docs.py checks that docs/api.md is up to date)

For each module, every name in its ``__all__``: the signature and the docstring; for classes,
also the public methods and properties that the class itself defines.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "api.md"
MODULES = [
    "higher",
    "higher.algorithms",
    "higher.data",
    "higher.optim",
    "higher.patch",
    "higher.utils",
    "higher.rules",
    "higher.checkpointing",
    "higher.forward_mode",
    "higher.implicit",
    "higher.hypergradients",
    "higher.distributed",
    "higher.compiled",
    "higher.cli",
]
HEADER = """# API reference

Generated from the docstrings by [`make_api.py`](make_api.py) (`python docs/make_api.py`); the
test suite checks that this file is up to date. Tutorials: [MAML](maml-tutorial.md),
[hyperparameters](hyperparameter-tutorial.md); concepts: [Where meta-gradients go](meta-gradients.md).
"""


class _Annotation:
    """An annotation kept as the source text (``from __future__ import annotations``), shown unquoted."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


def _unquoted(annotation: object) -> object:
    return _Annotation(annotation) if isinstance(annotation, str) else annotation


def _signature(obj: object) -> str:
    try:
        signature = inspect.signature(obj)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return ""
    parameters = [p.replace(annotation=_unquoted(p.annotation)) for p in signature.parameters.values()]
    return str(signature.replace(parameters=parameters, return_annotation=_unquoted(signature.return_annotation)))


def _doc(obj: object) -> str:
    doc = inspect.getdoc(obj)
    return doc.strip() if doc else "(no docstring)"


def _fenced(text: str, language: str = "text") -> str:
    return f"```{language}\n{text}\n```"


def _members(cls: type) -> dict[str, object]:
    """What the class itself defines, with what its private layers define (the bases of higher's
    named ``_Something`` right under it, such as ``higher._fmodel``'s layers of
    ``FunctionalModule``): the class as its users see it, without what it inherits from torch or
    from a public class of its own (documented there)."""
    layers = [cls]
    for base in cls.__mro__[1:]:
        if not (base.__name__.startswith("_") and base.__module__.startswith("higher.")):
            break
        layers.append(base)
    members: dict[str, object] = {}
    for layer in reversed(layers):
        members.update(layer.__dict__)
    return members


def _is_documented_member(name: str, value: object) -> bool:
    if name.startswith("_"):
        return False
    return inspect.isfunction(value) or isinstance(value, property)


def _render_object(module_name: str, name: str, obj: object) -> list[str]:
    qualified = f"{module_name}.{name}"
    lines = [f"### `{qualified}`", ""]
    if inspect.isclass(obj):
        lines += [_fenced(f"class {name}{_signature(obj)}", "python"), "", _fenced(_doc(obj)), ""]
        for member_name, member in sorted(_members(obj).items()):
            if not _is_documented_member(member_name, member):
                continue
            if isinstance(member, property):
                lines += [f"#### property `{name}.{member_name}`", "", _fenced(_doc(member)), ""]
            else:
                lines += [
                    f"#### `{name}.{member_name}`",
                    "",
                    _fenced(f"def {member_name}{_signature(member)}", "python"),
                    "",
                    _fenced(_doc(member)),
                    "",
                ]
    elif inspect.ismodule(obj):
        lines += [f"The module `{obj.__name__}`, documented in its own section.", ""]
    elif callable(obj):
        lines += [_fenced(f"def {name}{_signature(obj)}", "python"), "", _fenced(_doc(obj)), ""]
    elif isinstance(obj, dict):
        lines += [f"A dict with the keys {', '.join(f'`{k}`' for k in obj)}.", ""]
    else:
        lines += [_fenced(f"{name} = {obj!r}", "python"), ""]
    return lines


def render() -> str:
    """The contents of docs/api.md for the package on the import path."""
    lines = [HEADER]
    lines.append("Modules: " + ", ".join(f"[`{m}`](#{m.replace('.', '')})" for m in MODULES) + ".")
    lines.append("")
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        lines += [f"## {module_name}", "", _fenced(_doc(module)), ""]
        for name in module.__all__:
            lines += _render_object(module_name, name, getattr(module, name))
    return "\n".join(lines).rstrip() + "\n"


def main() -> None:
    OUT.write_text(render(), encoding="utf-8")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    main()
