"""The GPU check suite: one command that proves the GPU paths inside a short lease and writes one JSON report.

    python modeling_tests/gpu/gpu_checks.py --out gpu_report.json [--budget 420] [--only NAME ...] [--cpu-smoke]

(`run_gpu_checks.sh` installs the carried wheels first and calls this.) On one GPU, with a ~240M-parameter AlignGPT
of LLaVA-1.5's shapes (`gpu_models.GPU`), in bf16:

* `remote_code`: save, reload through the Auto classes in a fresh Python without `aligngpt_hf`, one greedy
  generation; its tokens must equal the in-process model's.
* `packed_equals_padded`: stage 1 and 2 losses of the same samples packed in one row vs padded, SDPA and
  flex_attention; relative difference <= PACKED_TOLERANCE in bf16 autocast (fp32 beside it for reference).
* `train_steps`: the stage trainers, bf16, SDPA / flex_attention x padded / packed: tokens/s, samples/s, peak memory
  next to the dry run's estimate for the same model, batch and row width (one GPU: ddp terms without DDP buckets).
* `trl_llava_vs_packed`: stock TRL `SFTTrainer` on transformers' LLaVA (same weights, padded, tower frozen) vs
  `AlignGPTInstructTrainer(packing=True)` on the same rows: samples/s.
* `vs_llava`: train step and greedy decode against LLaVA at equal dimensions and shared weights.
* `decode_compile`: greedy decode with a static cache, eager vs `torch.compile`: tokens/s and identical tokens.

Each check runs inside the time budget (a check that would start after it is recorded as skipped), its errors are
recorded with their last lines instead of stopping the run, and the report is rewritten after every check, so a run
cut short still leaves what it measured. `--cpu-smoke` runs the same code on the CPU at tiny sizes (fp32; compiled
decoding with dynamo's `eager` backend): the rehearsal that the suite works before a GPU is rented.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_models as gm  # noqa: E402
import gpu_training as gt  # noqa: E402
import torch  # noqa: E402

PACKED_TOLERANCE = {"bfloat16": 2e-2, "float32": 1e-4}  # relative loss difference, packed vs padded
CHECKS = ("remote_code", "packed_equals_padded", "train_steps", "trl_llava_vs_packed", "vs_llava", "decode_compile")


class Context:
    """What every check shares: device, sizes, tokenizer, data, the deadline and the temporary folder."""

    def __init__(self, cpu_smoke: bool, budget_s: float, workdir: str, flex_on_cpu: bool = False):
        self.device = "cpu" if cpu_smoke or not torch.cuda.is_available() else "cuda"
        self.sizes = gm.SMOKE if cpu_smoke else gm.GPU
        self.dtype = torch.float32 if self.device == "cpu" else torch.bfloat16
        self.cpu_smoke = cpu_smoke
        # flex_attention compiles its kernel first: minutes on a small CPU, so the rehearsal leaves it out by default
        self.attentions = ("sdpa", "flex_attention") if self.device == "cuda" or flex_on_cpu else ("sdpa",)
        self.deadline = time.monotonic() + budget_s
        self.workdir = Path(workdir)
        self.tokenizer, self.dataset = gm.tokenizer_and_data(self.sizes)
        self.processor, self.llava_processor = gm.processors(self.sizes, self.tokenizer)

    def left_s(self) -> float:
        return self.deadline - time.monotonic()


def check_remote_code(ctx: Context) -> dict:
    """Reload through remote code in a Python that cannot import `aligngpt_hf`; same greedy tokens."""
    model = gm.build_aligngpt(ctx.sizes, ctx.tokenizer).to(ctx.device, ctx.dtype).eval()
    folder = ctx.workdir / "remote"
    model.save_pretrained(folder)
    ctx.processor.save_pretrained(folder)
    batch = gt.prompt_batch(ctx, ctx.processor, align=True)
    with torch.no_grad():
        ours = model.generate(**gt.cast_pixels(batch, ctx), max_new_tokens=ctx.sizes.new_tokens, do_sample=False)
    inputs = ctx.workdir / "remote_inputs.pt"
    torch.save({key: value.cpu() for key, value in batch.items()}, inputs)
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", gt.REMOTE_SCRIPT, str(folder), str(inputs), ctx.device,
                             str(ctx.dtype).removeprefix("torch."), str(ctx.sizes.new_tokens)],
                            env=gt.package_free_env(), capture_output=True, text=True, timeout=300)
    if result.returncode:
        raise RuntimeError(f"remote-code reload failed:\n{result.stderr[-2000:]}")
    theirs = json.loads(result.stdout.strip().splitlines()[-1])
    return {"tokens_equal": theirs == ours.tolist(), "new_tokens": ctx.sizes.new_tokens,
            "dtype": str(ctx.dtype), "reload_and_generate_s": round(time.perf_counter() - start, 2),
            "passed": theirs == ours.tolist()}


def check_packed_equals_padded(ctx: Context) -> dict:
    results = {}
    for stage in ("pretrain", "instruct"):
        for attention in ctx.attentions:
            results[f"{stage}/{attention}"] = gt.packed_vs_padded(ctx, stage, attention, PACKED_TOLERANCE)
    results["passed"] = all(entry["passed"] for entry in results.values())
    return results


def check_train_steps(ctx: Context) -> dict:
    results = {}
    for attention in ctx.attentions:
        for stage in ("pretrain", "instruct"):
            for packed in (False, True):
                key = f"{stage}/{attention}/{'packed' if packed else 'padded'}"
                if ctx.left_s() < 20:
                    results[key] = {"skipped": "time budget spent"}
                    continue
                results[key] = gt.train_run(ctx, stage, attention, packed)
    results["passed"] = all(entry.get("finite_loss", True) for entry in results.values())
    return results


def check_trl_llava_vs_packed(ctx: Context) -> dict:
    trl = gt.trl_llava_run(ctx)
    ours = gt.train_run(ctx, "instruct", "sdpa", packed=True)
    return {"trl_llava_padded": trl, "aligngpt_packed": ours,
            "samples_per_s_ratio": round(ours["samples_per_s"] / trl["samples_per_s"], 3), "passed": True}


def check_vs_llava(ctx: Context) -> dict:
    return gt.versus_llava(ctx)


def check_decode_compile(ctx: Context) -> dict:
    return gt.decode_eager_vs_compiled(ctx)


def requirement_problems() -> list[str]:
    """The package's requirements (pyproject.toml) that the running Python does not meet (carried wheels first)."""
    import importlib.metadata

    import tomllib
    from packaging.requirements import Requirement

    project = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]
    problems = []
    for line in project["dependencies"]:
        requirement = Requirement(line)
        try:
            version = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            problems.append(f"{requirement.name}: not installed")
            continue
        if not requirement.specifier.contains(version, prereleases=True):
            problems.append(f"{requirement.name} {version} does not meet {requirement.specifier}")
    return problems


def environment(ctx: Context) -> dict:
    import transformers

    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "transformers": transformers.__version__}
    for name in ("trl", "datasets", "peft", "accelerate"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    device = torch.cuda.get_device_name() if ctx.device == "cuda" else f"cpu x{torch.get_num_threads()}"
    return {"device": device, "cuda": torch.version.cuda, "mode": "cpu-smoke" if ctx.cpu_smoke else "gpu",
            "versions": versions, "requirement_problems": requirement_problems(), "sizes": gm.sizes_dict(ctx.sizes)}


def write_report(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(temp, path)


def run(out: Path, budget_s: float, cpu_smoke: bool = False, only: list[str] | None = None,
        flex_on_cpu: bool = False) -> dict:
    """Run the checks in order inside `budget_s` seconds; returns the report (also written to `out`)."""
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="aligngpt-gpu-") as workdir:
        ctx = Context(cpu_smoke, budget_s, workdir, flex_on_cpu)
        report = {**environment(ctx), "attention": list(ctx.attentions), "budget_s": budget_s, "checks": {},
                  "failed": [], "skipped": []}
        for name in only or CHECKS:
            if ctx.left_s() < 15:
                report["skipped"].append(name)
                report["checks"][name] = {"skipped": "time budget spent"}
                continue
            check_start = time.monotonic()
            try:
                result = globals()[f"check_{name}"](ctx)
            except Exception as error:  # recorded, and the next check still runs
                result = {"error": f"{type(error).__name__}: {error}"[:2000],
                          "traceback": traceback.format_exc().splitlines()[-12:], "passed": False}
            result["seconds"] = round(time.monotonic() - check_start, 1)
            report["checks"][name] = result
            if not result.get("passed", False):
                report["failed"].append(name)
            report["seconds"] = round(time.monotonic() - started, 1)
            write_report(out, report)
            print(f"[gpu-checks] {name}: {'ok' if result.get('passed') else 'FAILED'} ({result['seconds']} s)",
                  flush=True)
    report["seconds"] = round(time.monotonic() - started, 1)
    write_report(out, report)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu_report.json", help="the JSON report")
    parser.add_argument("--budget", type=float, default=420, help="seconds for all checks (default 420)")
    parser.add_argument("--only", nargs="+", choices=CHECKS, help="run only these checks")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU (rehearsal without a GPU)")
    parser.add_argument("--flex-on-cpu", action="store_true", help="--cpu-smoke: include flex_attention (slow)")
    args = parser.parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("gpu-checks: no CUDA device; use --cpu-smoke for the CPU rehearsal", file=sys.stderr)
        return 2
    report = run(Path(args.out), args.budget, args.cpu_smoke, args.only, args.flex_on_cpu)
    print(json.dumps({"failed": report["failed"], "skipped": report["skipped"], "seconds": report["seconds"],
                      "report": str(args.out)}))
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
