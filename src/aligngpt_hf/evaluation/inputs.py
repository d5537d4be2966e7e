"""Checks shared by `aligngpt-hf answer`, `aligngpt-hf inspect` and the lmms-eval plugin, run before a model loads.

Why here: loading a 7B model takes minutes, so a bad decoding value, device, dtype, model folder or prompt must be
named before that, as one error that says which option or record is wrong and how to fix it, not as a torch
traceback after the load (or, worse, silently turned into greedy decoding).
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

from aligngpt_hf.hub.checks import config_values_checked

DTYPES = ("auto", "float32", "bfloat16", "float16")


def positive_int(value, name: str) -> int:
    """`value` as an integer >= 1 (bools, floats and numeric strings with a fraction refused)."""
    number = value
    if isinstance(value, str) and value.strip().lstrip("+").isdigit():
        number = int(value)
    if isinstance(number, bool) or not isinstance(number, int) or number < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return number


def check_decoding(max_new_tokens=128, temperature=0.0, top_p=None, num_beams=1) -> None:
    """The decoding values `generation_kwargs` turns into `generate` arguments; sampling-only values need sampling."""
    positive_int(max_new_tokens, "max_new_tokens")
    positive_int(num_beams, "num_beams")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
            or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}.")
    if top_p is None:
        return
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}.")
    if temperature == 0:
        raise ValueError(f"top_p={top_p} applies to sampling only, but temperature is 0 (greedy decoding); set "
                         "temperature > 0 to sample, or drop top_p.")


def check_max_new_tokens(max_new_tokens: int, config, option: str = "--max-new-tokens") -> None:
    """The answer must fit in the language model's positions with its prompt: a larger budget would run until it
    (a model that never says EOS generates for hours), past the positions the model was trained on."""
    text_config = getattr(config, "text_config", config)
    limit = getattr(text_config, "max_position_embeddings", None)
    if isinstance(limit, int) and max_new_tokens >= limit:
        raise ValueError(f"{option} {max_new_tokens} does not fit in the model's {limit} positions "
                         "(text_config.max_position_embeddings), which the prompt and the answer share; give at most "
                         f"{limit - 1} (the original scripts use 128, or 1024 for long answers).")


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}.")
    return dtype


def check_device(device: str | None, option: str = "--device") -> None:
    """A device string torch knows, and CUDA only where it is available."""
    if device is None:
        return
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{option} {device!r} is not a torch device; use cpu, cuda, cuda:1, mps, ...") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{option} {device!r} asks for CUDA, but this torch build sees no CUDA GPU; use cpu.")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise ValueError(f"{option} {device!r}: there are only {torch.cuda.device_count()} CUDA device(s).")
    if parsed.type == "meta":
        raise ValueError(f"{option} {device!r} holds shapes only, no weights, so nothing can be computed there; use "
                         "cpu or cuda.")
    if parsed.type not in ("cpu", "cuda"):
        try:  # mps, xla, xpu, ...: whether this torch build and machine have one
            torch.empty(0, device=parsed)
        except RuntimeError:
            raise ValueError(f"{option} {device!r}: this torch build or machine has no {parsed.type} backend; use cpu "
                             "or cuda.") from None


def check_model_folder(name: str, option: str = "MODEL") -> None:
    """A local MODEL must be a folder with the config.json of an AlignGPT (a Hub id is left to the loader); a LLaVA or
    an original-layout checkpoint is named with the command that makes an AlignGPT folder of it."""
    path = Path(str(name)).expanduser()
    if path.is_file():
        raise NotADirectoryError(f"{option} {name} is a file; give the model folder (the one holding config.json) "
                                 "or a Hub repo id.")
    if path.is_dir() and not (path / "config.json").is_file():
        raise FileNotFoundError(f"{option} folder {name} has no config.json; give a saved or converted AlignGPT "
                                "folder (original-layout checkpoints: `aligngpt-hf convert SOURCE OUTPUT` first).")
    if not path.is_dir():
        return
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path / 'config.json'} is not valid JSON ({error}); save the model again.") from None
    kind = config.get("model_type") if isinstance(config, dict) else None
    if isinstance(config, dict) and "mm_vision_tower" in config:
        raise ValueError(f"{option} {name} is an original-layout checkpoint (config.json has `mm_vision_tower`); "
                         "convert it first: `aligngpt-hf convert SOURCE OUTPUT`, then use OUTPUT.")
    if kind != "aligngpt":
        fix = ("make an AlignGPT of it first: `aligngpt-hf from-llava SOURCE OUTPUT`" if kind == "llava" else
               "give a folder written by training, convert or from-llava")
        raise ValueError(f"{option} {name} holds a {kind!r} model, not AlignGPT (model_type 'aligngpt'); {fix}.")


@contextlib.contextmanager
def model_files_checked(model: str):
    """Loading MODEL: a config.json value the model cannot be built from (`hub.checks.config_values_checked`), or a
    processor/tokenizer file that is not JSON, named with the folder (transformers' messages name neither)."""
    try:
        with config_values_checked(Path(str(model)) / "config.json"):
            yield
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{model}: a model or processor file (tokenizer.json, processor_config.json, ...) is not "
                         f"valid JSON ({error}); download it again or save the model and processor again.") from None


def check_prompt_text(text: str, processor, where: str) -> None:
    """A question or prompt is plain text: the image placeholder and the alignment token are the processor's to
    place (a literal one would add an image slot or move the alignment token into the question)."""
    reserved = [token for token in (getattr(processor, "image_token", None),
                                    getattr(processor, "alignment_token", None)) if token]
    found = [token for token in reserved if token in text]
    if found:
        raise ValueError(f"{where}: the text contains {' and '.join(found)}; the prompt gets one image placeholder and "
                         "the alignment token from the processor. Remove them from the text.")


def set_image_aspect_ratio(processor, mode: str | None, option: str = "--image-aspect-ratio") -> None:
    """`pad` (expand to a square of the mean colour, then resize) or `square` (resize and centre-crop) on the
    processor's image processor; `pad` needs one that can pad to a square (LLaVA's), else the option would be ignored."""
    if not mode:
        return
    if mode not in ("pad", "square"):
        raise ValueError(f"{option} must be pad or square, got {mode!r}.")
    image_processor = processor.image_processor
    if mode == "pad" and not hasattr(image_processor, "pad_to_square"):
        raise ValueError(f"{option} pad needs an image processor that pads to a square (LlavaImageProcessor), but this "
                         f"model's is a {type(image_processor).__name__}, which would ignore it; use {option} square "
                         "or leave the option out.")
    image_processor.do_pad = mode == "pad"


def check_input_file(path, option: str) -> Path:
    """An input file that exists and is not a folder."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{option} {path} is a folder; give the file.")
    if not path.exists():
        raise FileNotFoundError(f"{option} {path} does not exist; check the path.")
    return path


def check_output_file(path, option: str, inputs: dict) -> Path:
    """An output file that is not a folder and is none of the `inputs` ({option: path}) it would overwrite."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{option} {path} is a folder; give a file name inside it.")
    for other, source in inputs.items():
        if source is not None and Path(source).exists() and path.exists() and path.samefile(source):
            raise ValueError(f"{option} {path} is the same file as {other}; writing it would overwrite that input. "
                             "Choose another file.")
    return path


__all__ = ["DTYPES", "check_decoding", "check_device", "check_dtype", "check_input_file", "check_max_new_tokens",
           "check_model_folder", "check_output_file", "check_prompt_text", "model_files_checked", "positive_int",
           "set_image_aspect_ratio"]
