"""benchmarks/fsdp_memory.py (per-rank memory of MAML through FSDP2 against DDP and one process) runs end
to end on a tiny model, in float64: every variant's meta-gradient is DDP's, the parameters are sharded,
and the gathered weights are kept exactly when ``reshard_after_forward=False``. No memory or time is
asserted (they are the benchmark's to measure, on a quiet machine)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import fsdp_memory  # noqa: E402


def test_every_variant_gives_ddps_meta_gradient_and_fsdp_shards():
    results = fsdp_memory.run(width=8, steps=1, dtype=torch.float64)
    assert list(results) == list(fsdp_memory.VARIANTS)
    one, ddp, reshard, keep = (results[v] for v in fsdp_memory.VARIANTS)
    for variant in (one, reshard, keep):
        assert variant["meta_gradient_difference"] < 1e-12
    # The whole model in one process and under DDP; on a rank under FSDP, its rows of every parameter.
    full = sum(p.numel() * 8 for p in fsdp_memory._model(8).parameters()) / 2**20
    assert one["param_mib"] == ddp["param_mib"] == full
    assert reshard["param_mib"] == keep["param_mib"] < full
    assert one["all_to_all_mib"] == ddp["all_to_all_mib"] == 0 < reshard["all_to_all_mib"]
    assert reshard["gathered_mib"] == 0 < keep["gathered_mib"]
    for variant in results.values():
        assert variant["tensor_peak_mib"] > 0 and variant["seconds"] > 0
