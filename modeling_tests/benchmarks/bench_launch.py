"""Wall time of the shipped launch paths on CPU: one process vs `accelerate launch` with 2 processes (gloo).

    python modeling_tests/benchmarks/bench_launch.py [--repeats 1]

Each row is a whole command (interpreter start, imports, model build, 4 training steps, save), so on the tiny
recipes it measures launcher + start-up overhead, not training throughput. Same global batch in both columns.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from aligngpt_hf.training.cli import accelerate_config_path

# the console script next to this interpreter (a virtual environment), else the one on PATH
ACCELERATE = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate") or "accelerate"


def _port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def _run(command: list[str], cwd: Path) -> float:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - start


def _single(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "aligngpt_hf.cli", *args]


def _launched(config: str, args: list[str]) -> list[str]:
    return [ACCELERATE, "launch", "--config_file", str(accelerate_config_path(config)), "--num_processes", "2",
            "--mixed_precision", "no", "--main_process_port", _port(), "-m", "aligngpt_hf.cli", *args]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        quiet = ["--disable_tqdm", "true"]
        pretrain = ["pretrain", "pretrain_tiny", *quiet]
        instruct = ["instruct", "instruct_tiny", "--model_name_or_path", str(root / "stage1"), *quiet]
        _run(_single([*pretrain, "--output_dir", "stage1", "--per_device_train_batch_size", "4"]), root)
        rows = [
            ("pretrain, ddp.yaml", _single([*pretrain, "--per_device_train_batch_size", "4", "--output_dir", "a"]),
             _launched("ddp", [*pretrain, "--output_dir", "b"])),
            ("instruct, fsdp.yaml (DDP on CPU)",
             _single([*instruct, "--per_device_train_batch_size", "4", "--output_dir", "c"]),
             _launched("fsdp", [*instruct, "--output_dir", "d"])),
        ]
        print(f"{'path':36} {'1 process':>10} {'2 processes':>12} {'ratio':>6}")
        for name, single, launched in rows:
            one = min(_run(single, root) for _ in range(options.repeats))
            two = min(_run(launched, root) for _ in range(options.repeats))
            print(f"{name:36} {one:9.1f}s {two:11.1f}s {two / one:6.2f}")


if __name__ == "__main__":
    main()
