"""The devices the device-parametrized tests run on: ``cpu`` always, ``cuda`` where torch sees a GPU.

The ``device`` fixture (tests/conftest.py) is parametrized over :data:`DEVICES`; use the list
directly with ``pytest.mark.parametrize`` where a fixture does not fit. A machine without a GPU
collects no ``[cuda]`` items (none skipped), so the CPU suite keeps its size; on a GPU machine
``pytest -k cuda`` selects the CUDA cases.
"""

import torch

DEVICES = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
