"""The seed document's worked example, run unchanged, prints exactly the seed's output."""

import subprocess
import sys
from pathlib import Path

import pytest

CHECK = Path(__file__).resolve().parents[2] / "shared" / "acceptance" / "check_seed.sh"


@pytest.mark.skipif(not CHECK.exists(), reason="../shared/acceptance is not beside this checkout")
def test_seed_example_output_is_identical():
    result = subprocess.run(["bash", str(CHECK), sys.executable], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "output identical" in result.stdout


def test_copy_initial_weights_example_runs():
    example = Path(__file__).resolve().parents[1] / "examples" / "copy_initial_weights.py"
    result = subprocess.run([sys.executable, str(example)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "finite difference" in result.stdout
