"""The code examples in docs/new-features.md run as written."""

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "new-features.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_example_runs(index):
    namespace: dict = {}
    exec("import torch, higher\nfrom torch import nn\n" + BLOCKS[index], namespace)


def test_examples_were_found():
    assert len(BLOCKS) >= 6
