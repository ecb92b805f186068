"""Markers for the tests that need a newer torch than the lowest the package declares.

The package runs on every torch from its declared lower bound (pyproject.toml); a feature that
needs a newer release refuses, naming it, when used (tests/test_compiled_torch_versions.py). The
tests of such a feature are skipped on older releases, where `make test-torch TORCH=X.Y.Z` runs
the suite.
"""

import pytest

from higher._tracing import COMPILE_NEEDS_TORCH, compile_supported

#: Compiling an inner loop (torch.compile tracing torch.autograd.grad into the graph).
needs_compile = pytest.mark.skipif(
    not compile_supported(), reason=f"torch.compile of an inner loop needs torch >= {COMPILE_NEEDS_TORCH}"
)
