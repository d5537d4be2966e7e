"""Which checkpoint a run resumes from: the newest COMPLETE one, with a word about each one skipped and why.

Why: a run killed while writing `checkpoint-N` leaves a folder whose weights or optimizer state are cut short;
`resume_from_checkpoint=True` in the stock Trainer picks it by number alone and fails deep inside `torch.load` or
safetensors without naming the file. The checks are cheap (headers and zip directories, never the tensors).
"""

from __future__ import annotations

import json
import logging
import re
import zipfile
from pathlib import Path

logger = logging.getLogger(__name__)

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_WEIGHT_PATTERNS = ("model*.safetensors", "adapter_model.safetensors", "pytorch_model*.bin", "adapter_model.bin")
_STATE_FILES = ("optimizer.pt", "scheduler.pt", "scaler.pt")


def weight_file_problem(path: str | Path) -> str | None:
    """Why `path` (safetensors, or a torch zip file) cannot be read, or None. Reads headers only."""
    path = Path(path)
    if not path.is_file():
        return f"{path.name} is missing"
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt"):
                pass
        except (SafetensorError, OSError) as error:
            return f"{path.name} is truncated or corrupt ({error})"
        return None
    if path.stat().st_size and not zipfile.is_zipfile(path):
        with open(path, "rb") as handle:
            if handle.read(2)[:1] == b"PK":
                return f"{path.name} is truncated (its zip directory is missing)"
        return None  # a legacy (non-zip) pickle: torch.load(weights_only=True) checks it on load
    if path.stat().st_size == 0:
        return f"{path.name} is empty"
    return None


def checkpoint_problem(folder: str | Path) -> str | None:
    """Why `folder` is not a complete Trainer checkpoint, or None."""
    folder = Path(folder)
    state = folder / "trainer_state.json"
    if not state.is_file():
        return "trainer_state.json is missing (the save did not finish)"
    try:
        json.loads(state.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return "trainer_state.json is cut short or not JSON"
    weights = sorted({path for pattern in _WEIGHT_PATTERNS for path in folder.glob(pattern)})
    if not weights:
        return "it holds no model weights"
    for index in folder.glob("*.index.json"):
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (ValueError, KeyError, UnicodeDecodeError):
            return f"{index.name} is cut short or not a shard index"
        weights += [folder / name for name in sorted(shards) if folder / name not in weights]
    for path in weights + [folder / name for name in _STATE_FILES if (folder / name).exists()]:
        problem = weight_file_problem(path)
        if problem:
            return problem
    return None


def newest_complete_checkpoint(output_dir: str | Path) -> str:
    """The newest `checkpoint-N` of `output_dir` that is complete; each newer incomplete one is logged as skipped."""
    output_dir = Path(output_dir)
    found = sorted(
        (int(match.group(1)), path) for path in (output_dir.iterdir() if output_dir.is_dir() else [])
        if path.is_dir() and (match := _CHECKPOINT.match(path.name))
    )
    skipped = []
    for _, path in reversed(found):
        problem = checkpoint_problem(path)
        if problem is None:
            for name, reason in skipped:
                logger.warning("Resuming from %s, not from %s: %s.", path.name, name, reason)
            return str(path)
        skipped.append((path.name, problem))
    if not found:
        raise ValueError(
            f"resume_from_checkpoint=True but {output_dir} holds no checkpoint-N folder; train without resuming, or "
            "pass the folder of the checkpoint to resume from."
        )
    reasons = "; ".join(f"{name}: {reason}" for name, reason in skipped)
    raise ValueError(f"No complete checkpoint in {output_dir} to resume from ({reasons}). Delete the broken folders "
                     "and train from the start, or pass a complete checkpoint folder.")


def resolve_resume(resume_from_checkpoint, output_dir: str | Path):
    """`True` -> the newest complete checkpoint; a folder -> checked, with an error naming the broken file.

    A command line can only give text: `true` (or `latest`) and `false` there mean True and no resume, unless a
    folder of that name exists; an empty value is refused (it would name the working directory)."""
    if isinstance(resume_from_checkpoint, str) and not resume_from_checkpoint.strip():
        raise ValueError(f"`resume_from_checkpoint` is empty; pass a checkpoint-N folder the run saved (in "
                         f"{output_dir}), or true for the newest complete one.")
    if isinstance(resume_from_checkpoint, str) and not Path(resume_from_checkpoint).exists():
        word = resume_from_checkpoint.strip().lower()
        if word in ("true", "latest"):
            resume_from_checkpoint = True
        elif word == "false":
            return None
    if resume_from_checkpoint is True:
        return newest_complete_checkpoint(output_dir)
    if isinstance(resume_from_checkpoint, (str, Path)) and not Path(resume_from_checkpoint).is_dir():
        state = "is a file" if Path(resume_from_checkpoint).exists() else "does not exist"
        raise FileNotFoundError(f"Cannot resume from {resume_from_checkpoint}: it {state}. Pass a checkpoint-N folder "
                                f"the run saved (in {output_dir}), or resume_from_checkpoint=True (CLI: "
                                "--resume_from_checkpoint true) for the newest complete one.")
    if isinstance(resume_from_checkpoint, (str, Path)) and Path(resume_from_checkpoint).is_dir():
        problem = checkpoint_problem(resume_from_checkpoint)
        if problem:
            raise ValueError(
                f"Cannot resume from {resume_from_checkpoint}: {problem}. Resume from an earlier checkpoint "
                "(resume_from_checkpoint=True picks the newest complete one) or delete this folder."
            )
    return resume_from_checkpoint


def check_resumable(checkpoint, args, stage: str) -> None:
    """Refuse to resume from a checkpoint of the other stage (its optimizer holds other parameters, and torch would
    only say the parameter groups differ) or of a run that already reached its end (the stock Trainer would train
    one more step past `max_steps` and write another checkpoint)."""
    folder = Path(checkpoint)
    config = _read_json(folder / "config.json")
    saved_stage = config.get("aligngpt_stage")
    if saved_stage in ("pretrain", "instruct") and saved_stage != stage:
        names = {"pretrain": "stage 1 (`pretrain`", "instruct": "stage 2 (`instruct`"}
        fix = ("start stage 2 FROM the stage-1 output (`model_name_or_path` = its output folder) in a new output_dir, "
               "without resume_from_checkpoint" if stage == "instruct"
               else "resume it with `aligngpt-hf instruct` (AlignGPTInstructTrainer), or use another output_dir")
        raise ValueError(
            f"{folder} is a checkpoint of {names[saved_stage]}, its config.json says aligngpt_stage="
            f"{saved_stage!r}), but this is {names[stage]}): a stage resumes only its own checkpoints. To go on, {fix}."
        )
    saved_optim, optim = _read_json(folder / "training_args.json").get("optim"), getattr(args, "optim", None)
    optim = getattr(optim, "value", optim)
    if saved_optim is not None and optim is not None and saved_optim != optim:  # torch would fail mid-step
        raise ValueError(f"{folder} was saved by a run with optim={saved_optim!r} (its training_args.json), but this "
                         f"run uses optim={optim!r}: the optimizer state cannot be carried over. Resume with "
                         f"`--optim {saved_optim}`, or train in a new output_dir.")
    state = _read_json(folder / "trainer_state.json")
    step, epoch = int(state.get("global_step", 0)), float(state.get("epoch") or 0.0)
    if args.max_steps > 0:
        done, end = step >= args.max_steps, f"max_steps={args.max_steps}"
    else:
        done, end = epoch >= args.num_train_epochs - 1e-6, f"num_train_epochs={args.num_train_epochs}"
    if done:
        raise TrainingCompleteError(
            f"Training is already complete: {folder} is at step {step} (epoch {epoch:g}), the configured end "
            f"({end}). Nothing was trained and no checkpoint was written. Raise {end.split('=')[0]} to train further; "
            f"the trained model is in {folder}."
        )


class TrainingCompleteError(ValueError):
    """Resuming a run that already reached its configured end."""


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def check_finite_loss(loss, inputs: dict, step: int) -> None:
    """NaN policy: a non-finite loss stops training with what is known about the batch (the stock Trainer would
    quietly drop it from the logged average with `logging_nan_inf_filter` and keep stepping on NaN gradients)."""
    import torch

    if torch.isfinite(loss.detach()).all():
        return
    pixels = inputs.get("pixel_values")
    cause = " The inputs are finite: lower the learning rate, use bf16 instead of fp16, or check the data."
    if isinstance(pixels, torch.Tensor) and pixels.is_floating_point() and not torch.isfinite(pixels).all():
        bad = (~torch.isfinite(pixels.flatten(1))).any(-1).nonzero().flatten().tolist()
        cause = (f" `pixel_values` of image(s) {bad} in this batch hold NaN or infinity: fix those images or their "
                 "preprocessing.")
    raise FloatingPointError(f"The training loss is {loss.detach().float().item()} at step {step}.{cause}")
