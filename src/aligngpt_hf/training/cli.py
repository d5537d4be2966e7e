"""`aligngpt-hf pretrain|instruct RECIPE.yaml [--field value ...]`: TrlParser-style YAML recipes plus overrides.

A thin shell over the library: the recipe fills `AlignGPTScriptArguments` (model and data) and the stage's
`AlignGPTPretrainConfig`/`AlignGPTInstructConfig`; command-line `--field value` pairs override it. RECIPE may be a path
or the name of a shipped recipe (`pretrain_7b`, `instruct_13b`, `pretrain_tiny`, `mplug-owl-stage1`, ...; `-` and `_`
are interchangeable in names). Multi-GPU: run the same command
under `accelerate launch --config_file <shipped config> -m aligngpt_hf.cli ...` (see docs/training.md#paper-runs-on-8-gpus).

Model assembly lives in `aligngpt_hf.training.model_setup`, the dry run (`--dry-run`: plan the run, write
OUTPUT_DIR/dry_run.json) in `aligngpt_hf.training.dry_run`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from aligngpt_hf.training.configs import AlignGPTScriptArguments

PACKAGE_DIR = Path(__file__).resolve().parent
RECIPES_DIR = PACKAGE_DIR / "recipes"
ACCELERATE_CONFIGS_DIR = PACKAGE_DIR / "accelerate_configs"


def resolve_recipe(name: str) -> Path:
    """A recipe path, or the name of a shipped recipe (with or without `.yaml`; `-` and `_` interchangeable)."""
    path = Path(name)
    if path.is_file():
        return path
    if path.is_dir():
        raise IsADirectoryError(f"The recipe {name} is a folder; pass the recipe's YAML file (or a shipped recipe's "
                                "name).")
    stem = name.removesuffix(".yaml")
    for candidate in (stem, stem.replace("_", "-"), stem.replace("-", "_")):
        shipped = RECIPES_DIR / f"{candidate}.yaml"
        if shipped.is_file():
            return shipped
    available = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
    raise FileNotFoundError(f"No recipe {name!r}: not a file, nor a shipped recipe ({available}).")


def accelerate_config_path(name: str) -> Path:
    """Path of a shipped accelerate config: ddp, zero2, zero3 or fsdp."""
    path = ACCELERATE_CONFIGS_DIR / f"{name}.yaml"
    if not path.is_file():
        available = ", ".join(sorted(p.stem for p in ACCELERATE_CONFIGS_DIR.glob("*.yaml")))
        raise FileNotFoundError(f"No accelerate config {name!r}; shipped: {available}.")
    return path


def _unique_keys_loader():
    """PyYAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last one silently, so a
    field appended to a recipe that already sets it would win or lose by position)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"`{key}` is set twice (first on line {seen[key] + 1})", key_node.start_mark)
                seen[key] = key_node.start_mark.line
            return super().construct_mapping(node, deep)

    return UniqueKeyLoader


def read_recipe(path: Path) -> dict:
    """The recipe's `field: value` mapping; a file that is not YAML, or not a mapping, is named with the line."""
    import yaml

    try:
        config = yaml.load(path.read_text(encoding="utf-8"), Loader=_unique_keys_loader())
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 (byte {error.start}); re-save the recipe as UTF-8.") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ValueError(f"{where}: the recipe is not valid YAML ({problem}).") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: a recipe is a YAML mapping of `field: value` lines, got "
                         f"{type(config).__name__ if config is not None else 'an empty file'}.")
    return config


def check_recipe_types(parser, config: dict, path: Path) -> None:
    """Values YAML already typed skip argparse's conversion: a list, a float or a bool where a number is due, or the
    bool YAML makes of a bare `no` for a choice (`save_strategy: no`), would reach the trainer as they are."""
    for action in parser._actions:
        if action.dest not in config or config[action.dest] is None or isinstance(config[action.dest], str):
            continue
        value = config[action.dest]
        if action.choices is not None and isinstance(value, bool):
            raise ValueError(f"{path}: `{action.dest}: {value}`: YAML reads a bare yes/no/on/off as true/false; quote "
                             f"the choice, e.g. `{action.dest}: \"no\"` (one of {', '.join(map(str, action.choices))}).")
        numeric = (int,) if action.type is int else (int, float) if action.type is float else None
        if numeric is not None and (isinstance(value, bool) or not isinstance(value, numeric)):
            kind = "an integer" if action.type is int else "a number"
            raise ValueError(f"{path}: `{action.dest}` is {value!r}; it must be {kind}.")


def check_fields(stage: str, recipe: str, overrides: list[str]) -> None:
    """Every recipe key and `--field` override must name a field of the stage, and an override may be given once:
    the parser would name an unknown key without its file or the field meant (`Max_Steps`), and keep the last of two
    `--max_steps` silently."""
    import difflib

    from trl import TrlParser

    from aligngpt_hf.training.configs import AlignGPTInstructConfig, AlignGPTPretrainConfig

    config_class = AlignGPTPretrainConfig if stage == "pretrain" else AlignGPTInstructConfig
    parser = TrlParser((AlignGPTScriptArguments, config_class), exit_on_error=False)
    fields = {option[2:].replace("-", "_") for action in parser._actions for option in action.option_strings
              if option.startswith("--")}
    path = resolve_recipe(recipe)

    def unknown(name: str, where: str) -> ValueError:
        close = difflib.get_close_matches(name.replace("-", "_").lower(), sorted(fields), n=1)
        hint = f" Did you mean `{close[0]}`?" if close else f" See `aligngpt-hf {stage} --help` for the fields."
        return ValueError(f"{where}: `{name}` is not a field of `aligngpt-hf {stage}`.{hint}")

    for key in read_recipe(path):
        if str(key) not in fields:
            raise unknown(str(key), str(path))
    seen = set()
    for token in overrides:
        if not token.startswith("--"):
            continue
        name = token[2:].split("=", 1)[0].replace("-", "_")
        if name not in fields:
            raise unknown(token[2:].split("=", 1)[0], "command line")
        if name in seen:
            raise ValueError(f"command line: `--{name}` is given twice; give each field once (the recipe {path} "
                             "holds the defaults the command line overrides).")
        seen.add(name)


def parse_recipe(stage: str, recipe: str, overrides: list[str] | None = None):
    """(script arguments, trainer config) from a recipe plus `--field value` overrides."""
    from aligngpt_hf.training.configs import AlignGPTInstructConfig, AlignGPTPretrainConfig

    config_class = AlignGPTPretrainConfig if stage == "pretrain" else AlignGPTInstructConfig
    return _parse((AlignGPTScriptArguments, config_class), recipe, overrides or [])


def _parse(dataclass_types, recipe: str, overrides: list[str], **options):
    """TrlParser on a checked recipe; a bad `--field value` is one error naming it, not argparse's usage text."""
    import argparse

    from trl import TrlParser

    path = resolve_recipe(recipe)
    parser = TrlParser(dataclass_types, exit_on_error=False)
    check_recipe_types(parser, read_recipe(path), path)
    try:
        return parser.parse_args_and_config(args=["--config", str(path), *overrides], **options)
    except argparse.ArgumentError as error:
        raise ValueError(f"{error} (recipe {path} and its command-line overrides).") from None


@dataclass
class _RecipePrecision:
    """The precision flags of a recipe, read apart for a dry run: the trainer config refuses bf16/tf32 on a machine
    without a GPU, and a dry run plans for the GPUs the recipe names, on any machine."""

    bf16: bool | None = None
    fp16: bool = False
    tf32: bool | None = None


PLAN_ANYWHERE = ["--bf16", "false", "--fp16", "false", "--tf32", "false"]


@dataclass
class _RecipeDeepSpeed:
    """The `deepspeed` field of a recipe, read apart: the trainer config fails on a missing file or package with
    transformers' words ("No package metadata was found for The 'deepspeed>=0.9.3' distribution ...")."""

    deepspeed: str | None = None


def check_deepspeed(recipe: str, overrides: list[str], dry_run: bool) -> None:
    """A `deepspeed` config must exist and DeepSpeed be installed; a dry run plans zero2/zero3 without either."""
    import importlib.util

    _, launch, _ = _parse((AlignGPTScriptArguments, _RecipeDeepSpeed), recipe, overrides,
                          return_remaining_strings=True)
    value = launch.deepspeed
    if not value:
        return
    if not value.lstrip().startswith("{") and not Path(value).is_file():
        state = "is a folder" if Path(value).is_dir() else "does not exist"
        raise FileNotFoundError(f"the `deepspeed` config {value} {state}; pass a DeepSpeed JSON file (or launch with "
                                "a shipped accelerate config: `python -m aligngpt_hf.training.cli --accelerate-config "
                                "zero2`).")
    if importlib.util.find_spec("deepspeed") is None:
        plan = " A dry run estimates zero2/zero3 memory without it: drop `deepspeed`." if dry_run else ""
        raise ImportError(f"`deepspeed` {value} needs the DeepSpeed package, which is not installed (pip install -e "
                          f"'.[deepspeed]').{plan}")


def planned_precision(recipe: str, overrides: list[str]) -> dict | None:
    """The precision flags a dry run plans with (None: not a dry run)."""
    script_args, precision, _ = _parse((AlignGPTScriptArguments, _RecipePrecision), recipe, overrides,
                                       return_remaining_strings=True)
    return asdict(precision) if script_args.dry_run else None


def run_cli(args) -> int:
    """`aligngpt-hf pretrain|instruct`: train, or with `--dry-run` plan the run and write OUTPUT_DIR/dry_run.json."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    stage = args._command
    check_fields(stage, args.recipe, args.overrides)
    overrides = [*args.overrides, *(["--dry_run", "true"] if getattr(args, "dry_run", False) else [])]
    precision = planned_precision(args.recipe, overrides)
    check_deepspeed(args.recipe, overrides, precision is not None)
    if precision is not None:
        from aligngpt_hf.training.dry_run import dry_run

        script_args, training_args = parse_recipe(stage, args.recipe, [*overrides, *PLAN_ANYWHERE])
        dry_run(stage, script_args, training_args, precision)
        return 0
    script_args, training_args = parse_recipe(stage, args.recipe, overrides)
    check_output_dir(script_args, training_args)
    if train(stage, script_args, training_args).args.should_save:  # the run's last line: where the model is
        print(f"aligngpt-hf {stage}: model saved to {os.path.abspath(training_args.output_dir)}", flush=True)
    return 0


def check_output_dir(script_args: AlignGPTScriptArguments, training_args) -> None:
    """The run must not save over the model folder it starts from (a failed run would leave neither), nor find a
    file where it saves the merged LoRA model, after all the training."""
    start = script_args.model_name_or_path
    if start and start != "tiny" and Path(start).is_dir() and Path(start).resolve() == Path(
            training_args.output_dir).resolve():
        raise ValueError(f"`output_dir` {training_args.output_dir} is the `model_name_or_path` folder this run starts "
                         "from; saving there would overwrite it. Choose another `output_dir`.")
    output = Path(os.path.realpath(training_args.output_dir))
    for folder, what, inside in _data_folders(script_args):
        real = Path(os.path.realpath(folder))
        if output == real or (inside and real in output.parents):
            where = "is" if output == real else "is inside"
            raise ValueError(f"`output_dir` {training_args.output_dir} {where} the {what} {folder}; the checkpoints "
                             "and model files would be written among the training data (and could replace its "
                             "files). Choose an `output_dir` outside it.")
    merged = Path(training_args.output_dir) / "merged"
    if script_args.use_lora and script_args.merge_lora and merged.exists() and not merged.is_dir():
        raise NotADirectoryError(f"{merged} is a file, but the merged LoRA model is saved in a folder of that name "
                                 "after training; move the file, or set `merge_lora` to false.")


def _data_folders(script_args: AlignGPTScriptArguments) -> list[tuple[str, str, bool]]:
    """(folder, what, refuse outputs inside it too) for each folder the run reads its data from."""
    folders = []
    if script_args.data_path is not None:
        folders.append((os.path.dirname(os.path.abspath(script_args.data_path)), "folder of `data_path`", False))
        if script_args.image_folder is not None:
            folders.append((script_args.image_folder, "`image_folder`", True))
    elif script_args.dataset_name is not None and os.path.isdir(script_args.dataset_name):
        folders.append((script_args.dataset_name, "`dataset_name` folder", True))
    return folders


def train(stage: str, script_args: AlignGPTScriptArguments, training_args):
    """Build the model, processor and data of `stage`, train, save (and merge a LoRA adapter); returns the trainer."""
    from aligngpt_hf.training.model_setup import build_stage_model, load_training_data, lora_config
    from aligngpt_hf.training.stage_handoff import merge_lora
    from aligngpt_hf.training.trainers import AlignGPTInstructTrainer, AlignGPTPretrainTrainer

    peft_config = lora_config(stage, script_args)
    model, processor = build_stage_model(stage, script_args, training_args)
    if script_args.image_aspect_ratio is not None:
        processor.image_processor.do_pad = script_args.image_aspect_ratio == "pad"
    dataset = load_training_data(stage, script_args, num_alignment_levels=model.config.num_alignment_levels)
    trainer_class = AlignGPTPretrainTrainer if stage == "pretrain" else AlignGPTInstructTrainer
    trainer = trainer_class(model=model, args=training_args, train_dataset=dataset, processing_class=processor,
                            peft_config=peft_config)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    if peft_config is not None and script_args.merge_lora and trainer.args.should_save:
        merge_lora(trainer.model, os.path.join(training_args.output_dir, "merged"), processor)
    finish_processes(trainer)
    return trainer


def finish_processes(trainer) -> None:
    """Under a multi-process launch, every rank waits until rank 0 has saved, then the process group is closed: a
    rank that exits while another still works can abort in the collective library's threads (a failed launch)."""
    import torch

    trainer.accelerator.wait_for_everyone()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    """`python -m aligngpt_hf.training.cli --accelerate-config zero2` prints a shipped accelerate config's path."""
    parser = argparse.ArgumentParser(prog="python -m aligngpt_hf.training.cli")
    parser.add_argument("--accelerate-config", required=True, help="ddp | zero2 | zero3 | fsdp")
    args = parser.parse_args(argv)
    print(accelerate_config_path(args.accelerate_config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
