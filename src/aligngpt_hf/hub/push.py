"""Publish a trained or converted AlignGPT folder to the Hub: `aligngpt-hf push` and `push_to_hub`.

The folder is loaded with the in-library classes and re-saved into a staging folder, so whatever the source held
(trainer state, optimizer files, one big or pickled weight file) the repository gets exactly: sharded safetensors, the
remote-code files with a complete `auto_map`, processor/tokenizer configs with the chat template, a generation config
that stops at EOS and never emits `<image>`/`<align>`, and a model card. That is the contract evaluation harnesses load
through (lmms-eval's generic `huggingface` wrapper, `pipeline("image-text-to-text")`).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from aligngpt_hf.hub.checks import (
    check_card_options,
    check_private_repo,
    check_repo_id,
    check_revision,
    check_shard_size,
)
from aligngpt_hf.hub.loading import load_for_publishing
from aligngpt_hf.hub.model_card import (
    DEFAULT_BASE_MODELS,
    DEFAULT_DATASETS,
    DEFAULT_LICENSE,
    base_models_from_config,
    render_model_card,
)
from aligngpt_hf.paths import TEMP_MARKER, atomic_path, atomic_write_text, check_apart, check_writable

GENERATION_CLASS = "modeling_aligngpt.AlignGPTForConditionalGeneration"
TOKENIZER_SHIM_FILE = "tokenization_aligngpt.py"
TOKENIZER_AUTO_MAP = [None, "tokenization_aligngpt.AlignGPTTokenizerFast"]
REQUIRED_FILES = (
    "README.md",
    "config.json",
    "generation_config.json",
    "configuration_aligngpt.py",
    "modeling_aligngpt.py",
    "processing_aligngpt.py",
    TOKENIZER_SHIM_FILE,
    "processor_config.json",
    "tokenizer_config.json",
    "tokenizer.json",
    "chat_template.jinja",
)
MODEL_AUTO_CLASSES = (
    "AutoConfig", "AutoModel", "AutoModelForImageTextToText", "AutoModelForCausalLM", "AutoProcessor"
)
# Files a publish folder may contain; only these are ever removed when a staging folder is reused.
PUBLISHED_PATTERNS = (
    *REQUIRED_FILES,
    "*_aligngpt.py",
    "model*.safetensors",
    "model.safetensors.index.json",
    "special_tokens_map.json",
    "preprocessor_config.json",
    "tokenizer.model",
    "added_tokens.json",
)
# Remote weight files a new push replaces: stale shards of an earlier push with another shard count.
STALE_WEIGHT_PATTERNS = ("model*.safetensors", "model.safetensors.index.json")

# `AutoTokenizer` entries in `auto_map` must name a class in a file of the repository. The tokenizer itself is a
# standard fast tokenizer, so this file only gives that entry a target; without remote code, loaders fall back to the
# standard `tokenizer_class` written next to it.
TOKENIZER_SHIM = '''# Copyright 2026 The aligngpt-hf authors. Licensed under the Apache License, Version 2.0.
"""AlignGPT's `AutoTokenizer` entry: the standard fast tokenizer, unchanged (written by `aligngpt-hf push`).

It exists so `auto_map` can name `AutoTokenizer` for tools that load every component with `trust_remote_code=True`;
without remote code, `AutoTokenizer` loads the standard class recorded as `tokenizer_class`.
"""

from transformers import PreTrainedTokenizerFast


class AlignGPTTokenizerFast(PreTrainedTokenizerFast):
    """Same behaviour as `PreTrainedTokenizerFast` (byte-level BPE / SentencePiece from tokenizer.json)."""


__all__ = ["AlignGPTTokenizerFast"]
'''


@dataclass
class PublishResult:
    """What `push_to_hub` did: the staged folder, its files, and (unless a dry run) the commit URL."""

    repo_id: str
    folder: Path
    files: list[str] = field(default_factory=list)
    revision: str | None = None
    commit_url: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def dry_run(self) -> bool:
        return self.commit_url is None


def ensure_generation_config(model, tokenizer) -> None:
    """EOS/PAD/BOS set (harnesses pass them, `generate` needs them) and `<image>`/`<align>` suppressed."""
    generation, text_config = model.generation_config, model.config.text_config
    if generation.eos_token_id is None:
        generation.eos_token_id = tokenizer.eos_token_id
    if generation.eos_token_id is None:
        generation.eos_token_id = text_config.eos_token_id
    if generation.eos_token_id is None:
        raise ValueError("Neither the tokenizer nor the config defines an EOS token; set `tokenizer.eos_token` first.")
    if generation.bos_token_id is None:
        generation.bos_token_id = tokenizer.bos_token_id
    if generation.pad_token_id is None:
        eos = generation.eos_token_id
        generation.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (
            eos[0] if isinstance(eos, list) else eos
        )
    placeholders = {model.config.image_token_id, model.config.alignment_token_id}
    generation.suppress_tokens = sorted(set(generation.suppress_tokens or ()) | placeholders)


def _update_json(path: Path, update) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    update(data)
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def complete_auto_maps(folder: Path, auto_model: str = "generation") -> None:
    """AutoModel -> the generation class (lmms-eval always takes AutoModel for custom types); AutoTokenizer entry."""
    from aligngpt_hf.models.configuration_aligngpt import PROCESSOR_AUTO_MAP, REMOTE_AUTO_MAP

    if auto_model not in ("generation", "base"):
        raise ValueError(f"`auto_model` must be 'generation' or 'base', got {auto_model!r}.")

    def config_map(data):
        data["auto_map"] = {**data.get("auto_map", {}), **REMOTE_AUTO_MAP, **PROCESSOR_AUTO_MAP}
        # REMOTE_AUTO_MAP (and the installed package) map AutoModel to the generation class; "base" opts out here
        data["auto_map"]["AutoModel"] = GENERATION_CLASS if auto_model == "generation" else "modeling_aligngpt.AlignGPTModel"

    def tokenizer_map(data):
        for leaked in ("is_local", "local_files_only"):  # loader arguments transformers writes back on re-save
            data.pop(leaked, None)
        data["auto_map"] = {**data.get("auto_map", {}), **PROCESSOR_AUTO_MAP, "AutoTokenizer": TOKENIZER_AUTO_MAP}

    _update_json(folder / "config.json", config_map)
    _update_json(folder / "tokenizer_config.json", tokenizer_map)
    atomic_write_text(folder / TOKENIZER_SHIM_FILE, TOKENIZER_SHIM)


def check_publish_folder(folder: str | Path) -> list[str]:
    """Static check of a staged folder against the loading contract; returns its files or raises naming each gap."""
    folder = Path(folder)
    files = sorted(p.name for p in folder.iterdir() if p.is_file())
    problems = [f"missing {name}" for name in REQUIRED_FILES if name not in files]
    weights = [name for name in files if name.endswith(".safetensors")]
    if not weights:
        problems.append("no *.safetensors weights")
    if any(name.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt")) for name in files):
        problems.append("pickle-format files present")
    if len(weights) > 1 and "model.safetensors.index.json" not in files:
        problems.append("several shards but no model.safetensors.index.json")
    if "config.json" in files:
        auto_map = json.loads((folder / "config.json").read_text()).get("auto_map", {})
        problems += [f"config.json auto_map lacks {name}" for name in MODEL_AUTO_CLASSES if name not in auto_map]
    if "tokenizer_config.json" in files:
        auto_map = json.loads((folder / "tokenizer_config.json").read_text()).get("auto_map", {})
        needed = ("AutoProcessor", "AutoTokenizer")
        problems += [f"tokenizer_config.json auto_map lacks {name}" for name in needed if name not in auto_map]
    if "generation_config.json" in files:
        generation = json.loads((folder / "generation_config.json").read_text())
        needed = ("eos_token_id", "pad_token_id", "suppress_tokens")
        problems += [f"generation_config.json lacks {key}" for key in needed if generation.get(key) is None]
    if "README.md" in files and not (folder / "README.md").read_text(encoding="utf-8").startswith("---\n"):
        problems.append("README.md has no YAML metadata header")
    if problems:
        raise ValueError(f"{folder} is not ready to publish: " + "; ".join(problems) + ".")
    return files


def _check_output_dir(output_dir: Path, source: Path) -> None:
    """`output_dir` may be new or a previous publish folder (it is replaced whole); refuse anything else, and an
    unwritable place, before the model is loaded. Temporary files of an interrupted run of ours do not count."""
    if output_dir.resolve() == source.resolve():
        raise ValueError(f"The publish folder must differ from the source folder {source}.")
    check_apart(output_dir, source, "The publish folder", "the source folder")
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"{output_dir} is a file; choose another `--out` folder.")
    entries = list(output_dir.iterdir()) if output_dir.is_dir() else []
    foreign = [
        p.name for p in entries if TEMP_MARKER not in p.name
        and (p.is_dir() or not any(fnmatch.fnmatch(p.name, pat) for pat in PUBLISHED_PATTERNS))
    ]
    if foreign:
        raise FileExistsError(
            f"{output_dir} already holds files that are not part of a publish folder "
            f"({', '.join(sorted(foreign)[:5])}); choose another `--out` folder."
        )
    check_writable(output_dir.parent, "publish folder's parent")


def prepare_publish_folder(
    folder: str | Path,
    repo_id: str,
    output_dir: str | Path,
    *,
    max_shard_size: str | int = "5GB",
    base_models: Sequence[str] | None = None,
    datasets: Sequence[str] | None = None,
    license: str | None = None,
    auto_model: str = "generation",
) -> list[str]:
    """Write the publish-ready repository content of `folder` into `output_dir`; returns the file names."""
    output_dir = Path(output_dir)
    _check_output_dir(output_dir, Path(folder))
    model, processor = load_for_publishing(folder)
    ensure_generation_config(model, processor.tokenizer)
    with atomic_path(output_dir, directory=True) as staging:  # a killed run leaves no half folder
        _write_publish_files(staging, model, processor, repo_id, max_shard_size, base_models, datasets, license,
                             auto_model)
        check_publish_folder(staging)
    return check_publish_folder(output_dir)


def _write_publish_files(output_dir: Path, model, processor, repo_id, max_shard_size, base_models, datasets, license,
                         auto_model) -> None:
    model.save_pretrained(output_dir, max_shard_size=max_shard_size)
    processor.save_pretrained(output_dir)
    complete_auto_maps(output_dir, auto_model)
    card = render_model_card(
        repo_id,
        model.config,
        base_models=list(base_models or base_models_from_config(model.config) or DEFAULT_BASE_MODELS),
        datasets=list(datasets or DEFAULT_DATASETS),
        license=license or DEFAULT_LICENSE,
        num_parameters=model.num_parameters(),
    )
    (output_dir / "README.md").write_text(card, encoding="utf-8")


def upload_publish_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
) -> str:
    """Create the repo (and branch), then one commit that adds every file and drops stale weight shards."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    folder = Path(folder)
    files = check_publish_folder(folder)
    api = HfApi(token=token)
    if private:
        check_private_repo(api, repo_id)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if revision and revision != "main":
        api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
    try:
        existing = api.list_repo_files(repo_id, revision=revision, repo_type="model")
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError):
        existing = []
    stale = [name for name in existing if name not in files
             and any(fnmatch.fnmatch(name, pattern) for pattern in STALE_WEIGHT_PATTERNS)]
    operations = [CommitOperationDelete(path_in_repo=name) for name in stale]
    operations += [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name in files]
    info = api.create_commit(
        repo_id,
        operations=operations,
        commit_message=commit_message or "Upload AlignGPT (aligngpt-hf push)",
        revision=revision,
        repo_type="model",
    )
    return str(getattr(info, "commit_url", info))


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    dry_run: bool = False,
    output_dir: str | Path | None = None,
    max_shard_size: str | int = "5GB",
    base_models: Sequence[str] | None = None,
    datasets: Sequence[str] | None = None,
    license: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    auto_model: str = "generation",
) -> PublishResult:
    """Publish `folder` as `repo_id`. A dry run writes the repository content to `output_dir` (default:
    `<folder>/../<repo name>-publish`) and uploads nothing; a push stages in `output_dir` or a temporary folder."""
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"`repo_id` must look like 'user/name', got {repo_id!r}.")
    check_repo_id(repo_id, "REPO_ID")
    check_revision(revision)
    check_shard_size(max_shard_size)
    check_card_options(base_models, datasets, license)
    if dry_run and private:
        raise ValueError("--private applies to the repository an upload creates, but --dry-run uploads nothing; drop "
                         "--private, or drop --dry-run to push.")
    options = dict(max_shard_size=max_shard_size, base_models=base_models, datasets=datasets, license=license,
                   auto_model=auto_model)
    if dry_run or output_dir is not None:
        target = Path(output_dir) if output_dir is not None else default_dry_run_folder(folder, repo_id)
        files = prepare_publish_folder(folder, repo_id, target, **options)
        result = PublishResult(repo_id=repo_id, folder=target, files=files, revision=revision,
                               notes=publish_notes(folder, files))
        if not dry_run:
            result.commit_url = upload_publish_folder(
                target, repo_id, private=private, revision=revision, commit_message=commit_message, token=token
            )
        return result
    with tempfile.TemporaryDirectory(prefix="aligngpt-publish-") as staging:
        target = Path(staging) / repo_id.split("/")[1]
        files = prepare_publish_folder(folder, repo_id, target, **options)
        commit_url = upload_publish_folder(
            target, repo_id, private=private, revision=revision, commit_message=commit_message, token=token
        )
    return PublishResult(repo_id=repo_id, folder=target, files=files, revision=revision, commit_url=commit_url,
                         notes=publish_notes(folder, files))


def publish_notes(folder: str | Path, files: list[str]) -> list[str]:
    """What of `folder` the repository does not get as it is there: its own README.md (the generated card replaces
    it) and every other entry that is not published (trainer state, optimizer files, logs, checkpoints)."""
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in Path(folder).iterdir())
    notes = []
    if "README.md" in entries:
        notes.append(f"{Path(folder) / 'README.md'} was not published: the repository's README.md is the generated "
                     "model card (edit the card on the Hub, or in the --out folder before uploading it).")
    left_out = [name for name in entries if name not in files and name != "README.md"]
    if left_out:
        shown = ", ".join(left_out[:12]) + (f", ... ({len(left_out) - 12} more)" if len(left_out) > 12 else "")
        notes.append(f"Not published from {folder} ({len(left_out)} entries; the model and processor are re-saved "
                     f"from it): {shown}.")
    return notes


def default_dry_run_folder(folder: str | Path, repo_id: str) -> Path:
    return Path(folder).resolve().parent / f"{repo_id.split('/')[-1]}-publish"


def run_cli(args: argparse.Namespace) -> int:
    result = push_to_hub(
        args.folder,
        args.repo_id,
        private=args.private,
        revision=args.revision,
        dry_run=args.dry_run,
        output_dir=args.out,
        max_shard_size=args.max_shard_size,
        base_models=args.base_model,
        datasets=args.dataset,
        license=args.license,
        commit_message=args.commit_message,
        token=args.token,
        auto_model=args.auto_model,
    )
    print(f"{len(result.files)} files: {', '.join(result.files)}")
    for note in result.notes:
        print(note)
    if result.dry_run:
        unused = [option for option, value in (("--revision", args.revision), ("--commit-message", args.commit_message),
                                               ("--token", args.token)) if value is not None]
        if unused:
            print(f"{', '.join(unused)} not used: a dry run uploads nothing.")
        print(f"Dry run: publish-ready folder written to {result.folder} (nothing uploaded).")
    else:
        where = f" (branch {result.revision})" if result.revision else ""
        print(f"Pushed {result.repo_id}{where}: {result.commit_url}")
    return 0


__all__ = [
    "PublishResult",
    "check_repo_id",
    "check_publish_folder",
    "default_dry_run_folder",
    "ensure_generation_config",
    "prepare_publish_folder",
    "push_to_hub",
    "upload_publish_folder",
]
