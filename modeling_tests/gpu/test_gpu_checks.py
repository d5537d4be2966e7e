"""The GPU check suite's pass/fail checks as tests, at the suite's sizes on one GPU (skipped without CUDA).

`run_gpu_checks.sh` runs the same checks (and the timings) in one go and writes the JSON report; these tests are for
`pytest modeling_tests/gpu` on a GPU machine. With ALIGNGPT_GPU_CPU_SMOKE=1 they run on the CPU at tiny sizes.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
CPU_SMOKE = os.environ.get("ALIGNGPT_GPU_CPU_SMOKE") == "1"
SKIP_REASON = ("needs a CUDA GPU: run modeling_tests/gpu/run_gpu_checks.sh on a GPU machine "
               "(ALIGNGPT_GPU_CPU_SMOKE=1 rehearses these tests on the CPU)")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available() and not CPU_SMOKE, reason=SKIP_REASON)


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    import gpu_checks

    return gpu_checks.Context(cpu_smoke=CPU_SMOKE, budget_s=3600, workdir=str(tmp_path_factory.mktemp("gpu")))


def test_remote_code_reload_generates_the_same_tokens(ctx):
    import gpu_checks

    result = gpu_checks.check_remote_code(ctx)
    assert result["tokens_equal"], result


@pytest.mark.parametrize("stage", ["pretrain", "instruct"])
@pytest.mark.parametrize("attention", ["sdpa", "flex_attention"])
def test_packed_loss_equals_padded(ctx, stage, attention):
    import gpu_checks
    import gpu_training

    if attention not in ctx.attentions:
        pytest.skip("flex_attention compiles its kernel first: minutes on a small CPU")
    result = gpu_training.packed_vs_padded(ctx, stage, attention, gpu_checks.PACKED_TOLERANCE)
    assert result["samples"] > 1 and result["passed"], result


@pytest.mark.parametrize("stage", ["pretrain", "instruct"])
@pytest.mark.parametrize("packed", [False, True])
def test_stages_train_and_peak_memory_is_near_the_dry_run_estimate(ctx, stage, packed):
    import gpu_training

    result = gpu_training.train_run(ctx, stage, "sdpa", packed)
    assert result["finite_loss"] and result["tokens_per_s"] > 0, result
    if ctx.device == "cuda":  # the estimate leaves out the allocator's workspaces: within a factor of 2 either way
        ratio = result["peak_memory_gib"] / result["dry_run_estimate"]["total_gib"]
        assert 0.5 <= ratio <= 2.0, result


def test_compiled_static_cache_decode_gives_the_eager_tokens(ctx):
    import gpu_training

    result = gpu_training.decode_eager_vs_compiled(ctx)
    assert result["tokens_equal"], result
