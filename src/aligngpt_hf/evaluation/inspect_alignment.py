"""Show which alignment levels the gate picks for an image under different instructions: `aligngpt-hf inspect`.

The paper's claim is that different instructions need different degrees of image-text alignment. The gate makes that
decision per prompt (softmax weights over the N-1 local levels; the global level is always added with weight 1), and
the model reports it as `alignment_weights`. This module collects those weights for one image and a list of prompts,
prints them as a table and draws one bar chart per prompt.
"""

from __future__ import annotations

import argparse
import json
import math
import textwrap
from collections.abc import Sequence
from pathlib import Path

import torch

from aligngpt_hf.evaluation.inputs import (
    check_device,
    check_dtype,
    check_input_file,
    check_model_folder,
    check_output_file,
    check_prompt_text,
    model_files_checked,
    positive_int,
)
from aligngpt_hf.hub.checks import check_finite_weights
from aligngpt_hf.models.image_processing_utils_aligngpt import URL_SCHEMES
from aligngpt_hf.paths import atomic_path, atomic_write_text, check_local_or_hub, check_writable

PLOT_EXTRA_HINT = 'Plotting needs matplotlib: pip install matplotlib (or pip install -e ".[plot]" in the aligngpt-hf clone)'


def _as_rgb_image(image):
    """Through the package's one image loader, so inspection sees the pixels training and evaluation see."""
    from aligngpt_hf.models.image_processing_utils_aligngpt import load_image

    return load_image(image)


@torch.no_grad()
def alignment_weights_for_prompts(
    model, processor, image, prompts: Sequence[str], batch_size: int = 8
) -> torch.Tensor:
    """Gate weights [P, N-1] (float32, CPU) for `image` under each prompt, rendered with the chat template.

    Only the base model runs (the gate sits before the language model's LM head), in batches of `batch_size`.
    """
    if not prompts:
        raise ValueError("Give at least one prompt.")
    batch_size = positive_int(batch_size, "batch_size")
    for index, prompt in enumerate(prompts):
        where = f"prompt {index} ({textwrap.shorten(str(prompt), 40, placeholder='...')!r})"
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{where} is empty or not a string; give the instruction text.")
        check_prompt_text(prompt, processor, where)
    mode = model.config.alignment_mode
    if mode not in ("adaptive", "local"):
        raise ValueError(
            f"alignment_mode={mode!r} has no gate, so there are no alignment weights to report; load the model with "
            "alignment_mode='adaptive' (or 'local')."
        )
    image = _as_rgb_image(image)
    base = model.base_model if hasattr(model, "base_model") else model
    rows = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        texts = [
            processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}],
                add_generation_prompt=True,
            )
            for prompt in chunk
        ]
        batch = processor(text=texts, images=[image] * len(chunk), padding=True, return_tensors="pt")
        rows.append(base(**batch.to(model.device)).alignment_weights.float().cpu())
    return torch.cat(rows)


def format_weights_table(weights: torch.Tensor, prompts: Sequence[str], width: int = 40) -> str:
    """Plain-text table: one row per prompt, one column per local level, plus the level the gate favours."""
    _check_rows(weights, prompts)
    num_levels = weights.shape[1]
    header = f"{'prompt':<{width}} " + " ".join(f"{'L' + str(k):>6}" for k in range(num_levels)) + "    top"
    lines = [header, "-" * len(header)]
    for prompt, row in zip(prompts, weights.tolist()):
        label = textwrap.shorten(prompt.replace("\n", " "), width=width, placeholder="...")
        cells = " ".join(f"{value:6.3f}" for value in row)
        lines.append(f"{label:<{width}} {cells}    L{max(range(num_levels), key=row.__getitem__)}")
    if len(prompts) > 1:
        spread = (weights.max(0).values - weights.min(0).values).max().item()
        lines.append(f"largest difference between prompts on one level: {spread:.4f}")
    lines.append(f"(levels L0..L{num_levels - 1} are local; the global level L{num_levels} is always added at 1.0)")
    return "\n".join(lines)


def _check_rows(weights: torch.Tensor, prompts: Sequence[str]) -> None:
    """One row of weights per prompt: a mismatch would pair rows with the wrong prompts or drop some."""
    if weights.dim() != 2 or weights.shape[0] != len(prompts) or weights.shape[0] == 0:
        raise ValueError(f"weights of shape {tuple(weights.shape)} for {len(prompts)} prompt(s); expected one row per "
                         "prompt ([len(prompts), N-1], as `alignment_weights_for_prompts` returns).")


def plot_alignment_weights(
    weights: torch.Tensor, prompts: Sequence[str], out_path: str | Path, title: str | None = None
) -> Path:
    """One bar chart per prompt (levels on the x axis, shared y axis) saved as PNG; returns the path."""
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(PLOT_EXTRA_HINT) from error

    _check_rows(weights, prompts)
    values = weights.float().cpu()
    count, num_levels = values.shape
    columns = min(count, 3)
    grid_rows = math.ceil(count / columns)
    titles = ["\n".join(textwrap.wrap(prompt, 40)) for prompt in prompts]  # whole prompts: captions differ at the end
    title_lines = max(title.count("\n") + 1 for title in titles)
    figure = Figure(figsize=(4.2 * columns, (3.1 + 0.16 * title_lines) * grid_rows + 0.8), layout="constrained")
    axes = figure.subplots(grid_rows, columns, squeeze=False, sharey=True)
    top = max(float(values.max()) * 1.15, 1.5 / num_levels)
    levels = list(range(num_levels))
    for index, axis in enumerate(axes.flat):
        if index >= count:
            axis.axis("off")
            continue
        row = values[index].tolist()
        best = max(levels, key=row.__getitem__)
        colours = ["#d95f02" if level == best else "#1b9e77" for level in levels]
        axis.bar(levels, row, color=colours, edgecolor="black", linewidth=0.4)
        axis.axhline(1.0 / num_levels, color="grey", linestyle="--", linewidth=0.8)
        axis.set_title(titles[index], fontsize=9)
        axis.set_xticks(levels, [f"L{level}" for level in levels], fontsize=8)
        axis.set_ylim(0, top)
        axis.set_xlabel("local alignment level", fontsize=8)
        if index % columns == 0:
            axis.set_ylabel("gate weight", fontsize=8)
    figure.suptitle(
        title or f"AlignGPT gate weights per prompt over the local levels L0-L{num_levels - 1} (dashed: uniform).\n"
        f"The global level L{num_levels} is not drawn: it is always added at weight 1.0",
        fontsize=10,
    )
    out_path = Path(out_path)
    with atomic_path(out_path) as temp:
        figure.savefig(temp, dpi=110, format="png")
    return out_path


def load_model_and_processor(model_id: str, dtype: str = "auto", device: str = "cpu", revision: str | None = None):
    """In-library classes for a local folder or a Hub repo id (any checkpoint with `model_type="aligngpt"`)."""
    from aligngpt_hf.models.modeling_aligngpt import AlignGPTForConditionalGeneration
    from aligngpt_hf.models.processing_aligngpt import AlignGPTProcessor

    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    with model_files_checked(model_id):
        model = AlignGPTForConditionalGeneration.from_pretrained(model_id, dtype=torch_dtype, revision=revision)
        processor = AlignGPTProcessor.from_pretrained(model_id, revision=revision)
    check_finite_weights(model, str(model_id), "use an earlier checkpoint")
    return model.to(device).eval(), processor


def check_options(args: argparse.Namespace):
    """Files, prompts, device and dtype before a model loads; returns the decoded image (a bad one fails here)."""
    try:
        import matplotlib  # noqa: F401  (fail before loading a 7B model, not after)
    except ImportError as error:
        raise ImportError(PLOT_EXTRA_HINT) from error
    for index, prompt in enumerate(args.prompt):
        if not prompt.strip():
            raise ValueError(f"--prompt number {index + 1} is empty; give the instruction text.")
    check_dtype(args.dtype)
    check_device(args.device)
    check_local_or_hub(args.model, "MODEL")
    check_model_folder(args.model)
    if args.revision and Path(args.model).expanduser().is_dir():
        raise ValueError(f"--revision {args.revision} selects a Hub revision, but MODEL {args.model} is a local folder; "
                         "drop --revision or give the Hub repo id.")
    _check_gate(args.model)
    _check_prompts(args.model, args.prompt, args.revision)
    if not str(args.image).startswith(URL_SCHEMES):  # a URL is fetched (and its errors named) by the loader
        check_input_file(args.image, "--image")
    outputs = {"--out": args.out, **({"--json": args.json} if args.json else {})}
    for option, path in outputs.items():
        check_output_file(path, option, {"--image": args.image, **{o: p for o, p in outputs.items() if o != option}})
        check_writable(Path(path).parent, f"folder of {option} {path}")
    if Path(args.out).suffix.lower() != ".png":
        raise ValueError(f"--out {args.out} must end in .png: the plot is written as a PNG.")
    if args.json and Path(args.json).expanduser().absolute() == Path(args.out).expanduser().absolute():
        raise ValueError(f"--json and --out are both {args.out}; give them different files.")
    return _as_rgb_image(args.image)


def _check_prompts(model: str, prompts: Sequence[str], revision: str | None) -> None:
    """Placeholders in a prompt, named from the (cheap) processor before the model loads."""
    from aligngpt_hf.models.processing_aligngpt import AlignGPTProcessor

    with model_files_checked(model):  # the processor reads the model's config too
        processor = AlignGPTProcessor.from_pretrained(model, revision=revision)
    for index, prompt in enumerate(prompts):
        check_prompt_text(prompt, processor, f"--prompt number {index + 1} ({textwrap.shorten(prompt, 40)!r})")


def _check_gate(model: str) -> None:
    """A local model without a gate has no weights to show: say so from its config.json, before loading it."""
    config = Path(model).expanduser() / "config.json"
    if not config.is_file():
        return
    try:
        mode = json.loads(config.read_text(encoding="utf-8")).get("alignment_mode", "adaptive")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return  # the loader names a broken config
    if mode not in ("adaptive", "local"):
        raise ValueError(f"MODEL {model} has alignment_mode={mode!r}, which has no gate, so there are no alignment "
                         "weights to show; inspect a model trained with alignment_mode 'adaptive' (or 'local').")


def run_cli(args: argparse.Namespace) -> int:
    image = check_options(args)
    model, processor = load_model_and_processor(args.model, args.dtype, args.device, args.revision)
    weights = alignment_weights_for_prompts(model, processor, image, args.prompt)
    print(format_weights_table(weights, args.prompt))
    path = plot_alignment_weights(weights, args.prompt, args.out)
    print(f"Plot written to {path}")
    if args.json:
        record = {"model": args.model, "image": str(args.image), "prompts": args.prompt, "weights": weights.tolist()}
        atomic_write_text(args.json, json.dumps(record, indent=2) + "\n")
    return 0


__all__ = [
    "alignment_weights_for_prompts",
    "format_weights_table",
    "load_model_and_processor",
    "plot_alignment_weights",
]
