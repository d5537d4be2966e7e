"""Every subcommand's options, declared with the standard library only (see the package docstring for why).

Defaults the library also uses (the default scorer, binnings, tie tolerance, dtypes, card licence) and the training
recipes' fields are read from the library's source files with `ast`, so there is one place each is written.
"""

from __future__ import annotations

import argparse
import ast
import functools
import importlib.util
import textwrap
from pathlib import Path

# subcommand -> one-line help (the module that runs each one: aligngpt_hf.cli.SUBCOMMANDS)
SUBCOMMAND_HELP: dict[str, str] = {
    "convert": "convert a released original-layout AlignGPT checkpoint to this layout",
    "from-llava": "start an AlignGPT from a transformers LLaVA checkpoint (fresh level table and gate)",
    "levels": "score image-caption pairs with CLIP and bucket them into alignment levels",
    "pretrain": "stage 1: train the projector and level table (YAML recipe)",
    "instruct": "stage 2: instruction-tune LLM, projector and gate (YAML recipe)",
    "push": "publish a trained or converted folder to the Hub with remote code and a card",
    "inspect": "plot the gate's alignment weights for an image and prompts",
    "answer": "answer a LLaVA-style question JSONL into an answer JSONL (benchmarks)",
    "demo": "the whole pipeline end to end on an embedded synthetic task, offline",
}


@functools.cache
def library_folder() -> Path:
    """The installed `aligngpt_hf` package folder, found without importing it."""
    spec = importlib.util.find_spec("aligngpt_hf")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("aligngpt-hf: the `aligngpt_hf` package is not installed next to its command line")
    return Path(next(iter(spec.submodule_search_locations)))


@functools.cache
def _module_tree(relative_path: str) -> ast.Module:
    return ast.parse((library_folder() / relative_path).read_text(encoding="utf-8"))


def _assigned_value(relative_path: str, name: str) -> ast.expr:
    for node in _module_tree(relative_path).body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        if any(isinstance(target, ast.Name) and target.id == name for target in targets) and node.value is not None:
            return node.value
    raise LookupError(f"aligngpt-hf: no module-level `{name} = ...` in aligngpt_hf/{relative_path}")


def library_constant(relative_path: str, name: str):
    """A literal module-level constant of the library (`DEFAULT_SCORER = "..."`), read from its source."""
    return ast.literal_eval(_assigned_value(relative_path, name))


def library_dict_keys(relative_path: str, name: str) -> tuple[str, ...]:
    """The literal keys of a module-level dict whose values are not literals (`DTYPES = {"float32": torch.float32}`)."""
    return tuple(ast.literal_eval(key) for key in _assigned_value(relative_path, name).keys)


def dataclass_fields(relative_path: str, *class_names: str) -> list[str]:
    """Annotated field names of the named classes of a library file, in source order."""
    return [node.target.id for cls in _module_tree(relative_path).body
            if isinstance(cls, ast.ClassDef) and cls.name in class_names
            for node in cls.body if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)]


def add_training_arguments(parser: argparse.ArgumentParser, stage: str = "pretrain") -> None:
    owl = "mplug-owl-stage1" if stage == "pretrain" else "mplug-owl-stage2"
    parser.add_argument("recipe", help=f"YAML recipe: a path or a shipped name (e.g. {stage}_7b, {stage}_tiny, {owl})")
    parser.add_argument("--dry-run", action="store_true",
                        help="plan the run instead of training: full-size model on the meta device, trainable "
                        "parameters, memory per GPU for ddp/zero2/zero3/fsdp, data check -> OUTPUT_DIR/dry_run.json "
                        "(offline, any machine; also accepted after RECIPE)")
    parser.add_argument("overrides", nargs=argparse.REMAINDER,
                        help="`--field value` pairs overriding the recipe (any script or trainer-config field)")
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = recipe_help_epilog(stage)


def recipe_help_epilog(stage: str) -> str:
    """Shipped recipes and overridable fields, read from the library's source (TRL is not imported)."""
    config_class = "AlignGPTPretrainConfig" if stage == "pretrain" else "AlignGPTInstructConfig"
    trainer_fields = dataclass_fields("training/configs.py", "_AlignGPTTrainingConfig", config_class)
    script_fields = dataclass_fields("training/configs.py", "AlignGPTScriptArguments")
    recipes = sorted(p.stem for p in (library_folder() / "training" / "recipes").glob("*.yaml")
                     if p.stem.startswith((stage, "mplug-owl")))

    def wrapped(items):
        return textwrap.fill(", ".join(items), width=100, initial_indent="  ", subsequent_indent="  ")

    return (
        f"shipped recipes:\n{wrapped(recipes)}\n\n"
        f"model and data fields (--field value):\n{wrapped(script_fields)}\n\n"
        f"AlignGPT trainer fields ({config_class}):\n{wrapped(sorted(set(trainer_fields)))}\n\n"
        "and every field of TRL's SFTConfig / transformers' TrainingArguments (e.g. --output_dir, --max_steps,\n"
        "--per_device_train_batch_size, --learning_rate). Example:\n"
        f"  aligngpt-hf {stage} {stage}_tiny --output_dir runs/{stage} --max_steps 5"
    )


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="SOURCE", help="original checkpoint: local folder or Hub id")
    parser.add_argument("output", metavar="OUTPUT", help="folder for the converted checkpoint")
    parser.add_argument("--vision-tower", metavar="SRC",
                        help="CLIP folder or Hub id (default: the tower inside SOURCE, else its mm_vision_tower)")
    parser.add_argument("--tokenizer", metavar="SRC", help="tokenizer folder or Hub id (default: the one in SOURCE)")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="upload OUTPUT to this Hub repo afterwards")
    parser.add_argument("--private", action="store_true", help="create the Hub repo as private")
    parser.add_argument("--kind", choices=("auto", "full", "pretrain"), default="auto",
                        help="refuse SOURCE unless it is this kind (default: detect from the keys)")
    parser.add_argument("--dtype", choices=("auto", *library_dict_keys("conversion/convert.py", "DTYPES")), default="auto",
                        help="cast floating weights (default: keep the checkpoint's dtype, bit-identical)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUTPUT")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_from_llava_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="SOURCE",
                        help="transformers LLaVA checkpoint with its LlavaProcessor: local folder or Hub id")
    parser.add_argument("output", metavar="OUTPUT", help="folder for the AlignGPT model and processor")
    parser.add_argument("--alignment-mode", choices=["adaptive", "global", "local", "mean", "none"], default="adaptive",
                        help="the model's alignment mode (none = no alignment token: LLaVA's logits)")
    parser.add_argument("--num-alignment-levels", type=int, default=8, help="rows N of the level table")
    parser.add_argument("--image-aspect-ratio", choices=("pad", "square"), default=None,
                        help="pad = AlignGPT's expand-to-square; square = resize + crop; None = as SOURCE's processor")
    parser.add_argument("--dtype", choices=("auto", *library_dict_keys("conversion/convert.py", "DTYPES")),
                        default="auto", help="cast the weights (auto = keep SOURCE's dtype)")
    parser.add_argument("--reuse-alignment-token", action="store_true",
                        help="SOURCE's tokenizer already has <align>: use its id (refused by default)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUTPUT")


def add_levels_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="LLaVA-format JSON (a list, or *.jsonl with one record per line), or a "
                        "datasets save_to_disk folder")
    parser.add_argument("output", help="output LLaVA JSON (similarity = level); report and plot go next to it")
    parser.add_argument("--image-folder", default=None,
                        help="folder the records' `image` paths are relative to (required for LLaVA JSON input)")
    parser.add_argument("--scorer", default=library_constant("levels/scorer.py", "DEFAULT_SCORER"), help="CLIP or SigLIP model id or path (AutoModel)")
    parser.add_argument("--num-levels", type=int, default=8, help="number of alignment levels N >= 2")
    parser.add_argument("--binning", choices=library_constant("levels/binning.py", "BINNINGS"), default="quantile",
                        help="quantile: equal-count levels by rank; uniform: equal-width score bins")
    parser.add_argument("--skip-bad", action="store_true", help="skip bad records; they are counted in the report")
    parser.add_argument("--batch-size", type=int, default=64, help="image-caption pairs scored per forward pass")
    parser.add_argument("--num-workers", type=int, default=None, help="image decoding threads (default: min(8, CPUs))")
    parser.add_argument("--chunk-size", type=int, default=10_000, help="rows per cached chunk (resume granularity)")
    parser.add_argument("--cache-dir", default=None, help="score cache (default: .<output stem>.levels-cache/ next to OUTPUT); delete it after "
                        "changing image files")
    parser.add_argument("--image-column", default="image", help="image column of a saved dataset")
    parser.add_argument("--text-column", default="caption", help="caption column of a saved dataset")
    parser.add_argument("--id-column", default="id", help="record id column of a saved dataset")
    parser.add_argument("--split", default=None, help="split of a saved DatasetDict")
    parser.add_argument("--num-shards", type=int, default=None,
                        help="score only every K-th chunk (set automatically under `accelerate launch`)")
    parser.add_argument("--shard-index", type=int, default=None, help="which of the --num-shards this process runs")
    parser.add_argument("--tie-tolerance", type=float, default=library_constant("levels/binning.py", "DEFAULT_TIE_TOLERANCE"),
                        help="scores closer than this are ties and share a level (raise to 1e-3 for bf16 scoring)")
    parser.add_argument("--allow-outside-image-folder", action="store_true",
                        help="read `image` paths that resolve outside --image-folder (refused by default)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda in bf16 when available, else cpu in fp32)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG histogram (no matplotlib needed)")


def add_push_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", metavar="FOLDER", help="trained or converted model folder (with its processor)")
    parser.add_argument("repo_id", metavar="REPO_ID", help="Hub repository, e.g. user/aligngpt-7b")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--revision", default=None, help="branch to commit to (created if missing)")
    parser.add_argument("--dry-run", action="store_true",
                        help="write the publish-ready folder (see --out) and upload nothing")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="where to write the publish folder (default for --dry-run: FOLDER/../REPO_NAME-publish)")
    parser.add_argument("--max-shard-size", default="5GB", help="safetensors shard size")
    parser.add_argument("--base-model", action="append", default=None, metavar="ID",
                        help="card base_model (repeatable; default: from the config, else Vicuna-7B v1.5 and "
                        "CLIP-L/336)")
    parser.add_argument("--dataset", action="append", default=None, metavar="ID",
                        help="card datasets (repeatable; default: LLaVA-Pretrain, LLaVA-Instruct-150K)")
    parser.add_argument("--license", default=None, help=f"card licence id (default: {library_constant('hub/model_card.py', 'DEFAULT_LICENSE')})")
    parser.add_argument("--auto-model", choices=("generation", "base"), default="generation",
                        help="class `AutoModel` loads: generation (what lmms-eval needs, default) or base backbone")
    parser.add_argument("--commit-message", default=None, help="commit message on the Hub (default: a generated one)")
    parser.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN / the cached login)")


def add_inspect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="model folder or Hub repo id")
    parser.add_argument("--image", required=True, help="image file")
    parser.add_argument("--prompt", action="append", required=True, help="instruction (repeat for several)")
    parser.add_argument("--out", required=True, metavar="PLOT.png", help="where to write the bar charts")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the weights as JSON")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                        help="weights dtype (auto = as saved)")
    parser.add_argument("--device", default="cpu", help="torch device to run the model on (e.g. cpu, cuda)")
    parser.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) of MODEL")


def add_answer_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="converted AlignGPT folder or Hub id")
    parser.add_argument("--questions", "--question-file", dest="questions", required=True, help="question JSONL")
    parser.add_argument("--image-folder", required=True, help="folder the questions' `image` paths are relative to")
    parser.add_argument("--answers", "--answers-file", dest="answers", required=True, help="answer JSONL to write")
    parser.add_argument("--model-id", help="`model_id` written in each answer (default: the model folder's name)")
    parser.add_argument("--num-chunks", type=int, default=1, help="split the questions into N chunks (multi-GPU)")
    parser.add_argument("--chunk-idx", type=int, default=0, help="which chunk this process answers")
    parser.add_argument("--resume", action="store_true", help="keep the answers file; skip question_ids in it")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing answers file (refused without --resume or --overwrite)")
    parser.add_argument("--skip-missing-images", action="store_true", help="skip and count, instead of failing")
    parser.add_argument("--allow-outside-image-folder", action="store_true",
                        help="read `image` paths that resolve outside --image-folder (refused by default)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="128 = model_vqa_loader; 1024 = model_vqa")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (paper setting)")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling cut-off (only with --temperature > 0)")
    parser.add_argument("--num-beams", type=int, default=1, help="beam-search width (1 = greedy or sampling)")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=1,
        help="1 = paper parity. Larger batches use left padding and give the same answers in fp32; in fp16/bf16 "
        "padded kernels can flip near-tied tokens, so scores may move slightly.",
    )
    parser.add_argument(
        "--alignment-mode",
        choices=["adaptive", "global", "local", "mean", "none"],
        help="override the checkpoint's alignment mode (paper Table 4 ablations)",
    )
    parser.add_argument("--alignment-level", type=int, help="fixed-level mode: use level table row K for every image")
    parser.add_argument(
        "--image-aspect-ratio",
        choices=["pad", "square"],
        help="pad = expand-to-square (model_vqa_loader); square = resize + centre crop "
        "(model_vqa / model_vqa_science, used for LLaVA-W, MM-Vet, SQA). Default: the processor's.",
    )
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                        help="weights dtype (auto = as saved)")
    parser.add_argument("--device", help="cuda | cpu | cuda:1 ... (default: cuda if available)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="smoke version (smaller data and budgets; its time: docs/demo.md#how-long-it-takes)")
    parser.add_argument("--out", default=None, help="run folder (default: runs/demo, or runs/demo-compare with --compare)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (--compare: the first seed)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: from free cores and load; 1 on a 2-core machine)")
    parser.add_argument("--wrong-share", type=float, default=None,
                        help="share of wrong pre-training captions (default: 0.5)")
    parser.add_argument("--stage1-steps", type=int, default=None, help="override the preset's stage-1 steps")
    parser.add_argument("--stage2-steps", type=int, default=None, help="override the preset's stage-2 steps")
    parser.add_argument("--compare", action="store_true",
                        help="train AlignGPT, plain LLaVA and AlignGPT with shuffled levels on the same data")
    parser.add_argument("--seeds", type=int, default=None, help="--compare: number of seeds (default: 3)")
    parser.set_defaults(_early_check=check_demo_folder)


def demo_option_problem(args: argparse.Namespace) -> str | None:
    """Why the demo's numeric options cannot run (None: they can): counts are positive, the wrong-caption share lies
    strictly between 0 and 1 (levels need right and wrong captions), --seeds needs --compare."""
    positive = {"--threads": args.threads, "--stage1-steps": args.stage1_steps, "--stage2-steps": args.stage2_steps,
                "--seeds": args.seeds}
    for option, value in positive.items():
        if value is not None and value < 1:
            return f"aligngpt-hf demo: error: {option} must be >= 1, got {value}"
    if not 0 <= args.seed < 2**32:
        return f"aligngpt-hf demo: error: --seed must be in 0..{2**32 - 1}, got {args.seed}"
    if args.out is not None and not args.out.strip():  # "" would silently mean the default folder
        return "aligngpt-hf demo: error: --out is empty; give the run folder, or leave --out out for the default"
    share = args.wrong_share
    if share is not None and not 0 < share < 1:  # NaN fails both comparisons
        return (f"aligngpt-hf demo: error: --wrong-share must be between 0 and 1 (exclusive: the levels rank right "
                f"against wrong captions), got {share}")
    if args.seeds is not None and not args.compare:
        return "aligngpt-hf demo: error: --seeds applies to --compare only; add --compare or drop --seeds"
    return None


def demo_folder_problem(run: Path, overwrite: bool, marker: str) -> str | None:
    """Why the demo may not write into `run` (None: it may): a non-empty folder needs `--overwrite`, and
    `--overwrite` deletes only a folder the demo made (it holds `marker`)."""
    code = library_folder().resolve().parent  # the package and its neighbours (src/ of a clone, site-packages)
    if code == run.resolve() or code in run.resolve().parents:
        return (f"aligngpt-hf demo: error: --out {run} lies inside {code}, where the aligngpt_hf code is installed; a "
                "run writes data, checkpoints and plots: choose a folder outside it (default: runs/demo)")
    blocking = next((path for path in (run, *run.parents) if path.exists() and not path.is_dir()), None)
    if blocking is not None:
        where = "is a file" if blocking == run else f"is inside {blocking}, which is a file"
        return f"aligngpt-hf demo: error: --out {run} {where}; give a folder for the run (it is created if missing)"
    if not run.is_dir() or not any(run.iterdir()):
        return None
    if not overwrite:
        return (f"aligngpt-hf demo: {run} already exists and is not empty (an earlier run?); pass --overwrite to "
                "replace it, or choose another --out")
    if not (run / marker).is_file():
        return (f"aligngpt-hf demo: {run} is not empty and was not made by the demo (no {marker} file); refusing "
                "to delete it even with --overwrite: choose another --out")
    return None


def check_demo_folder(args: argparse.Namespace) -> None:
    """The demo's option and run-folder refusals as usage errors, before torch and the library are imported (~25 s)."""
    run = Path(args.out or ("runs/demo-compare" if args.compare else "runs/demo"))
    problem = demo_option_problem(args) or demo_folder_problem(run, args.overwrite,
                                                               library_constant("demo/runs.py", "MARKER"))
    if problem:
        raise SystemExit(problem)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends `(default: X)` once: not when the help already states the default, nor for an unset default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if "default" in help_text.lower() or action.default is None or action.default is False:
            return help_text
        return super()._get_help_string(action)


def add_subcommand_arguments(name: str, parser: argparse.ArgumentParser) -> None:
    """Declare subcommand `name`'s options on `parser`."""
    declare = {
        "convert": add_convert_arguments,
        "from-llava": add_from_llava_arguments,
        "levels": add_levels_arguments,
        "pretrain": functools.partial(add_training_arguments, stage="pretrain"),
        "instruct": functools.partial(add_training_arguments, stage="instruct"),
        "push": add_push_arguments,
        "inspect": add_inspect_arguments,
        "answer": add_answer_arguments,
        "demo": add_demo_arguments,
    }
    declare[name](parser)
