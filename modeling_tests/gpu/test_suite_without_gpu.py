"""The GPU suite on a machine without CUDA: its tests skip with their reason, and the whole suite runs end to end at
tiny sizes on the CPU (`--cpu-smoke`), through the same code a GPU run takes up to the device."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

GPU_DIR = Path(__file__).resolve().parent
REPO_ROOT = GPU_DIR.parents[1]
sys.path.insert(0, str(GPU_DIR))
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the suite runs for real")


def test_gpu_tests_skip_without_cuda_and_say_why():
    env = {key: value for key, value in os.environ.items() if key != "ALIGNGPT_GPU_CPU_SMOKE"}
    result = subprocess.run([sys.executable, "-m", "pytest", str(GPU_DIR / "test_gpu_checks.py"), "-q", "-rs",
                             "-p", "no:cacheprovider"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-2000:]
    assert "10 skipped" in result.stdout and "passed" not in result.stdout, result.stdout[-2000:]
    reasons = re.findall(r"SKIPPED \[(\d+)\] \S+: (.*)", result.stdout)
    assert sum(int(count) for count, _ in reasons) == 10
    assert {reason for _, reason in reasons} == {"needs a CUDA GPU: run modeling_tests/gpu/run_gpu_checks.sh on a GPU "
                                                 "machine (ALIGNGPT_GPU_CPU_SMOKE=1 rehearses these tests on the CPU)"}


def test_the_checks_refuse_to_run_without_cuda_unless_rehearsing(tmp_path, capsys):
    import gpu_checks

    assert gpu_checks.main(["--out", str(tmp_path / "report.json")]) == 2
    assert "no CUDA device; use --cpu-smoke" in capsys.readouterr().err
    assert not (tmp_path / "report.json").exists()


def test_cpu_smoke_runs_every_check_and_writes_one_report(tmp_path):
    import gpu_checks

    out = tmp_path / "report.json"
    assert gpu_checks.main(["--cpu-smoke", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["mode"] == "cpu-smoke" and report["failed"] == [] and report["skipped"] == []
    assert list(report["checks"]) == list(gpu_checks.CHECKS)
    assert report["requirement_problems"] == []
    checks = report["checks"]
    assert checks["remote_code"]["tokens_equal"] and checks["decode_compile"]["tokens_equal"]
    for key in ("pretrain/sdpa", "instruct/sdpa"):
        entry = checks["packed_equals_padded"][key]
        assert entry["samples"] > 1 and entry["float32"]["relative_difference"] <= 1e-4, entry
    for key in ("pretrain/sdpa/padded", "pretrain/sdpa/packed", "instruct/sdpa/padded", "instruct/sdpa/packed"):
        run = checks["train_steps"][key]
        assert run["steps"] == gpu_checks.gm.SMOKE.steps and run["finite_loss"] and run["tokens_per_s"] > 0, run
        assert run["dry_run_estimate"]["total_gib"] > 0
    assert checks["train_steps"]["pretrain/sdpa/padded"]["trainable_params"] < \
        checks["train_steps"]["instruct/sdpa/padded"]["trainable_params"]  # stage 1 trains projector + levels only
    trl = checks["trl_llava_vs_packed"]
    assert trl["samples_per_s_ratio"] > 0 and trl["trl_llava_padded"]["finite_loss"]
    assert checks["vs_llava"]["train_step_ratio"] > 0 and checks["vs_llava"]["decode_speed_ratio"] > 0


def test_runner_script_runs_the_checks_from_the_repository(tmp_path):
    """`run_gpu_checks.sh` with no wheels carried: the installed packages, the report where REPORT says."""
    env = {**os.environ, "PYTHON": sys.executable, "WHEELS": str(tmp_path / "no-wheels"),
           "REPORT": str(tmp_path / "report.json")}
    result = subprocess.run(["bash", str(GPU_DIR / "run_gpu_checks.sh"), "--cpu-smoke", "--only", "vs_llava"],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "no wheels in" in result.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert list(report["checks"]) == ["vs_llava"] and report["failed"] == []
