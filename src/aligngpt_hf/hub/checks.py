"""Checks of what `aligngpt-hf push` is given, made before any work: the repo id, the branch, the shard size, the card
fields, the kind of model in the folder and whether `--private` can hold. `convert --push-to-hub` and `from-llava` use
the repo-id, `--private` and loading-report checks too.

Why up front: the Hub refuses a bad name only at upload, after minutes of loading and re-saving; a LLaVA folder would
otherwise fail with a message about token ids; and `--private` onto an existing public repository would publish.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}  # what save_pretrained accepts after a number


def check_repo_id(repo_id: str, option: str, owner_required: bool = True) -> str:
    """`owner/name` as the Hub accepts it, checked before any work (the Hub would refuse it only at upload); ids that
    are only cited (a card's base models, data sets) may be legacy names without an owner."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        slashes = repo_id.count("/") if isinstance(repo_id, str) else -1
        if slashes != 1 and (owner_required or slashes not in (0, 1)):
            raise HFValidationError("it needs exactly one '/' between owner and name")
        validate_repo_id(repo_id)
    except HFValidationError as error:
        reason = " ".join(str(error).split())
        raise ValueError(f"{option} {repo_id!r} is not a Hub repo id ({reason}); write it as 'owner/name' "
                         "with letters, digits, '-', '_' and '.'.") from None
    return repo_id


def check_revision(revision: str | None) -> str | None:
    """A branch name git and the Hub accept (no spaces, `..`, `~^:?*[\\`, leading '-' or '/', trailing '.lock')."""
    if revision is None:
        return None
    bad = (not revision or revision.startswith(("-", "/")) or revision.endswith(("/", ".", ".lock"))
           or ".." in revision or "//" in revision or "@{" in revision
           or any(ch.isspace() or ch in "~^:?*[\\" or ord(ch) < 32 for ch in revision))
    if bad:
        raise ValueError(f"--revision {revision!r} is not a valid branch name (no spaces, '..', '~^:?*[\\', leading "
                         "'-' or '/'); write it like 'v1' or 'stage2-run3'.")
    if revision.startswith("refs/") or revision in ("HEAD", "@") or re.fullmatch(r"[0-9a-f]{40}", revision):
        raise ValueError(f"--revision {revision!r} is a git reference or commit, not a branch name: the push commits "
                         "to a branch (created if missing), and the Hub keeps `refs/...` (pull requests `refs/pr/N`) "
                         "and commit ids to itself. Give the branch's own name, e.g. 'main' or 'v1'.")
    return revision


def check_shard_size(max_shard_size: str | int) -> None:
    """`--max-shard-size` as `save_pretrained` reads it (bytes, or a number with KB/MB/GB/TB), checked before the model
    is loaded; a size that rounds to zero bytes would write one shard per tensor."""
    size = max_shard_size if isinstance(max_shard_size, int) and not isinstance(max_shard_size, bool) else None
    if isinstance(max_shard_size, str) and max_shard_size.strip()[-2:].upper() in SIZE_UNITS:
        try:
            size = int(float(max_shard_size.strip()[:-2]) * SIZE_UNITS[max_shard_size.strip()[-2:].upper()])
        except ValueError:
            size = None
    if size is None or size < 1:
        raise ValueError(f"--max-shard-size {max_shard_size!r} is not a positive size; write it like 5GB or 500MB "
                         "(a number of bytes, or with KB, MB, GB or TB: save_pretrained reads no MiB/GiB).")


def check_card_options(base_models, datasets, license: str | None) -> None:
    """Model-card fields the Hub validates at upload: repo ids for `--base-model`/`--dataset`, a licence id."""
    for option, values in (("--base-model", base_models), ("--dataset", datasets)):
        for value in values or ():
            check_repo_id(value, option, owner_required=False)
    if license is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.+_-]*", license):
        raise ValueError(f"--license {license!r} is not a licence id; use the Hub's id, e.g. apache-2.0, llama2, "
                         "cc-by-nc-4.0 or other.")


def check_not_partial(folder: Path) -> None:
    """A PEFT adapter or a stage-1 artefact is not a model a harness can load: name it and the step that makes one."""
    if (folder / "adapter_config.json").is_file():
        raise ValueError(f"{folder} holds a PEFT adapter (adapter_config.json), not a full model; merge it first "
                         "(`model.merge_and_unload().save_pretrained(OUT)` plus the processor), then push OUT.")
    if (folder / "aligngpt_stage.json").is_file():
        raise ValueError(f"{folder} is a stage-1 artefact (projector and level table only, no language model); run "
                         "stage 2 (`aligngpt-hf instruct`) and push its output folder.")


def check_generation_config_file(path: Path) -> None:
    """A generation_config.json that is not a JSON object: transformers would drop it with a warning and the
    repository would get default generation settings instead of the folder's."""
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); re-save it (`model.generation_config.save_pretrained"
                         "(FOLDER)`) or delete it to publish the default generation settings.") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, not a generation config; re-save it or delete it.")


def check_model_type(folder: Path) -> None:
    """Only AlignGPT folders are published: a LLaVA or an original-layout checkpoint is named with the command that
    turns it into one (loading it would fail later with a message about token ids)."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{folder / 'config.json'} is not valid JSON ({error}); re-save the model.") from None
    if not isinstance(config, dict):
        raise ValueError(f"{folder / 'config.json'} holds a JSON {type(config).__name__}, not a model config.")
    model_type = config.get("model_type")
    if "mm_vision_tower" in config:
        raise ValueError(f"{folder} is an original-layout checkpoint (config.json has `mm_vision_tower`); convert it "
                         "first: `aligngpt-hf convert FOLDER OUTPUT`, then push OUTPUT.")
    if model_type == "llava":
        raise ValueError(f"{folder} is a transformers LLaVA (model_type 'llava'), not AlignGPT; turn it into one "
                         "first: `aligngpt-hf from-llava FOLDER OUTPUT`, then push OUTPUT.")
    if model_type != "aligngpt":
        raise ValueError(f"{folder} holds a {model_type!r} model, not AlignGPT (model_type 'aligngpt'); push a folder "
                         "written by training, convert or from-llava.")


def check_private_repo(api, repo_id: str) -> None:
    """`--private` creates a private repository, but cannot make an existing public one private: uploading there
    would publish what the user meant to keep private."""
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        info = api.repo_info(repo_id, repo_type="model")
    except RepositoryNotFoundError:
        return
    if getattr(info, "private", None) is False:
        raise ValueError(f"--private was given, but {repo_id} already exists and is public: --private does not change "
                         "an existing repository. Make it private on the Hub first (Settings), or push to a new "
                         "repository.")


@contextlib.contextmanager
def config_values_checked(path: Path, error_class: type[ValueError] = ValueError):
    """A config.json value transformers cannot build the model from (an unknown activation or RoPE type, a token id of
    the wrong type) named with the file, instead of a KeyError from deep inside the model classes."""
    from huggingface_hub.errors import StrictDataclassError

    try:
        yield
    except (KeyError, TypeError, StrictDataclassError) as error:
        reason = f"unknown name {error}" if isinstance(error, KeyError) else " ".join(str(error).split())[:300]
        raise error_class(f"{path}: a value the model cannot be built from ({type(error).__name__}: {reason}); "
                          "restore the checkpoint's own config.json.") from None


def check_finite_weights(model, where: str, fix: str, what: str = "weight(s)", error_class: type[ValueError] = ValueError):
    """NaN or infinite weights (a diverged run, a damaged file) would give garbage without a word: refuse them, named."""
    import torch

    broken = [name for name, tensor in model.state_dict().items()
              if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    if broken:
        raise error_class(f"{where}: {len(broken)} {what} hold NaN or infinite values ({', '.join(broken[:5])}); the "
                          f"run diverged or the file is damaged: {fix}.")


def loading_problems(info: dict) -> list[str]:
    """What `from_pretrained(..., output_loading_info=True)` left out: weights missing (transformers initialises them
    randomly), not in the model (dropped) or of the wrong shape, each counted with up to five names."""
    problems = []
    for kind, keys in (("missing (would be random)", info.get("missing_keys")),
                       ("not in the model (would be dropped)", info.get("unexpected_keys")),
                       ("of the wrong shape", [f"{k} {list(a)} vs {list(b)}" for k, a, b in
                                               info.get("mismatched_keys") or ()])):
        if keys:
            listed = sorted(map(str, keys))
            problems.append(f"{len(listed)} weight(s) {kind}: {', '.join(listed[:5])}")
    return problems


__all__ = ["check_card_options", "check_finite_weights", "check_generation_config_file", "check_model_type",
           "check_not_partial", "check_private_repo", "check_repo_id", "check_revision", "check_shard_size",
           "config_values_checked", "loading_problems"]
