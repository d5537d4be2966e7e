"""Benchmark: the quick demo on an idle machine vs beside one CPU-bound process, per torch thread count.

Why: on a 2-core machine torch's default of one thread per core makes each thread spin waiting for a core whenever
another process runs (an earlier demo took > 420 s beside a busy process vs 81-91 s idle). The demo now picks its
thread count from free cores and load (`aligngpt_hf.demo.stages.choose_threads`); this script measures the result.

    python modeling_tests/benchmarks/bench_demo_busy.py                 # quick demo: auto vs 2 threads, idle vs busy
    python modeling_tests/benchmarks/bench_demo_busy.py --tiny          # tiny budgets (a ~15 s run) for a fast check
    python modeling_tests/benchmarks/bench_demo_busy.py --pytest modeling_tests/demo   # a test folder instead

Prints (and writes with --json) wall seconds, CPU seconds (user + sys of the run and its children) and the load
average before each run, plus the busy/idle ratio per thread setting. Numbers are only meaningful when nothing else
runs on the machine: check the "load before" column.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import subprocess
import sys
import tempfile
import time

TINY = ('{"clip_pairs": 200, "clip_steps": 60, "pretrain_pairs": 64, "instruct_rows": 160, "text_only_rows": 8, '
        '"heldout_per_kind": 4, "stage1_steps": 4, "stage2_steps": 40, "batch_size": 8}')
RUN_TINY = ("import json, sys; from dataclasses import replace; from aligngpt_hf.demo.pipeline import run_demo; "
            "from aligngpt_hf.demo.stages import QUICK; "
            "run_demo(sys.argv[1], settings=replace(QUICK, **json.loads(sys.argv[2])))")


def burn(stop) -> None:
    """One CPU-bound neighbour (a pure-Python loop: one core, no threads of its own)."""
    value = 0
    while not stop.is_set():
        for _ in range(100_000):
            value += 1


def command(args, folder: str) -> list[str]:
    if args.pytest:
        return [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *args.pytest]
    if args.tiny:
        return [sys.executable, "-c", RUN_TINY, folder, TINY]
    return [sys.executable, "-m", "aligngpt_hf.cli", "demo", "--quick", "--out", folder]


def measure(args, threads: str, busy: bool) -> dict:
    """One run: wall and CPU seconds, load before; `threads` "auto" leaves the choice to the demo."""
    env = {**os.environ}
    env.pop("OMP_NUM_THREADS", None)
    if threads != "auto":
        env["OMP_NUM_THREADS"] = threads
    stop = multiprocessing.Event()
    neighbour = multiprocessing.Process(target=burn, args=(stop,), daemon=True) if busy else None
    if neighbour:
        neighbour.start()
        time.sleep(2)
    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    timed_out = False
    with tempfile.TemporaryDirectory() as folder:
        try:
            subprocess.run(command(args, folder), check=True, env=env, stdout=subprocess.DEVNULL,
                           timeout=args.timeout)
        except subprocess.TimeoutExpired:  # subprocess.run has killed the child
            timed_out = True
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if neighbour:
        stop.set()
        neighbour.join()
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return {"threads": threads, "busy": busy, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
            "load_before": round(load, 2), "timed_out": timed_out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny budgets instead of --quick")
    parser.add_argument("--pytest", nargs="*", help="time `pytest -q -x <these>` instead of the demo")
    parser.add_argument("--threads", nargs="+", default=["auto", "2"], help="thread settings to compare")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--timeout", type=float, default=900, help="stop a run after this many seconds")
    args = parser.parse_args()
    rows = [measure(args, threads, busy) for threads in args.threads for busy in (False, True)]
    print("| threads | neighbour | wall s | CPU s | load before |\n| --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['threads']} | {'1 busy process' if row['busy'] else 'none'} | "
              f"{'>' * row['timed_out']}{row['wall_s']} | "
              f"{row['cpu_s']} | {row['load_before']} |")
    for threads in args.threads:
        idle, busy = (next(r for r in rows if r["threads"] == threads and r["busy"] is b) for b in (False, True))
        print(f"threads={threads}: busy/idle wall ratio {busy['wall_s'] / idle['wall_s']:.2f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
