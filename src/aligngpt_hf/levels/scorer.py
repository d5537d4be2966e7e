"""The scorer behind `aligngpt-hf levels`: a CLIP/SigLIP dual encoder that gives raw image-caption cosines.

Accepts a Hub id or path, a `(model, processor)` pair (hashed for the resumable cache key) or a `Scorer`; runs on the
GPU in bf16 when there is one. Embeddings are normalised and multiplied in float32.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from aligngpt_hf.paths import check_local_or_hub

DEFAULT_SCORER = "openai/clip-vit-large-patch14-336"


class ScorerLoadError(OSError):
    """The scorer named by id or path cannot be loaded (the `levels` command prints it as one line)."""


@dataclass
class Scorer:
    """A CLIP-like dual encoder plus its processor, placed on a device; `score` gives raw cosines."""

    model: Any
    processor: Any
    name: str
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    revision: str = ""  # which weights `name` held when loaded (files of a local folder, commit of a Hub model)

    @property
    def max_length(self) -> int:
        """Text context of the scorer (CLIP: 77); longer captions are truncated and counted."""
        tokenizer_max = getattr(self.processor.tokenizer, "model_max_length", None) or 10**9
        text_config = getattr(self.model.config, "text_config", None)
        model_max = getattr(text_config, "max_position_embeddings", None) or 10**9
        return int(min(tokenizer_max, model_max))

    @property
    def padding(self) -> str | bool:
        # SigLIP pools the last position and was trained on max_length padding; CLIP pools at EOS.
        return "max_length" if "siglip" in str(getattr(self.model.config, "model_type", "")) else True

    def fingerprint(self) -> str:
        revision = f"|{self.revision}" if self.revision else ""
        return hashlib.sha256(f"{self.name}{revision}|{self.dtype}|{self.max_length}".encode()).hexdigest()[:16]

    def preprocess_image(self, image) -> dict[str, torch.Tensor]:
        """One image through the image processor (called from worker threads)."""
        return dict(self.processor.image_processor(images=[image], return_tensors="pt"))

    def count_truncated(self, captions: list[str]) -> list[bool]:
        lengths = self.processor.tokenizer(captions, truncation=True, max_length=self.max_length + 1)["input_ids"]
        return [len(ids) > self.max_length for ids in lengths]

    @torch.inference_mode()
    def score(self, pixel_inputs: dict[str, torch.Tensor], captions: list[str]) -> np.ndarray:
        """Cosine similarity of matching image/caption rows, computed in float32 after the encoders."""
        text = self.processor.tokenizer(
            captions, padding=self.padding, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        if self.padding == "max_length":  # SigLIP: no attention mask, as in training and its processor
            text = {"input_ids": text["input_ids"]}
        text = {k: v.to(self.device) for k, v in text.items()}
        pixels = {k: v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device)
                  for k, v in pixel_inputs.items()}
        image_emb = _embeddings(self.model.get_image_features(**pixels)).float()
        text_emb = _embeddings(self.model.get_text_features(**text)).float()
        image_emb = torch.nn.functional.normalize(image_emb, dim=-1)
        text_emb = torch.nn.functional.normalize(text_emb, dim=-1)
        return (image_emb * text_emb).sum(-1).cpu().numpy().astype(np.float64)


def _embeddings(output) -> torch.Tensor:
    """transformers 5.x returns an output object whose `pooler_output` holds the projected embeddings."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _hash_model(model, processor) -> str:
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    digest.update(str(len(processor.tokenizer)).encode())
    digest.update(processor.image_processor.to_json_string().encode())
    return "model-" + digest.hexdigest()[:16]


def _device(device) -> torch.device:
    """The device to score on (default: CUDA when present); a name torch does not know, or an accelerator this
    machine lacks, is refused here instead of failing deep inside `model.to`."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"--device {device!r} is not a torch device ({error}); use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and (not torch.cuda.is_available()
                                  or (device.index or 0) >= torch.cuda.device_count()):
        found = f"{torch.cuda.device_count()} CUDA device(s)" if torch.cuda.is_available() else "no CUDA device"
        raise ValueError(f"--device {device} is not available on this machine ({found}); use cpu or another device")
    return device


def load_scorer(scorer: Any = DEFAULT_SCORER, device: str | torch.device | None = None,
                dtype: torch.dtype | None = None) -> Scorer:
    """Accept a Hub id / local path, a `(model, processor)` pair or a `Scorer`; GPU + bf16 when present."""
    device = _device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    revision = ""
    if isinstance(scorer, Scorer):
        model, processor, name, revision = scorer.model, scorer.processor, scorer.name, scorer.revision
    elif isinstance(scorer, (tuple, list)) and len(scorer) == 2:
        model, processor = scorer
        name = _hash_model(model, processor)
    elif isinstance(scorer, (str, os.PathLike)):
        from transformers import AutoModel, AutoProcessor

        name = check_local_or_hub(scorer, "scorer")
        if os.path.isfile(name):
            raise ScorerLoadError(f"the scorer {name!r} is a file; pass --scorer a CLIP or SigLIP model folder or Hub "
                                  "id (AutoModel + AutoProcessor)")
        try:
            model = AutoModel.from_pretrained(name, dtype=dtype)
            processor = AutoProcessor.from_pretrained(name)
        except OSError as error:  # offline and not cached, a typo, no such folder
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ScorerLoadError(
                f"cannot load the scorer {name!r} ({reason}). Pass --scorer a local CLIP or SigLIP folder, or a Hub "
                "id that is cached or reachable; an offline example with a tiny CLIP is in docs/levels.md"
            ) from None
        revision = _folder_revision(name) or str(getattr(model.config, "_commit_hash", None) or "")
    else:
        raise TypeError(f"scorer must be a model id/path, a (model, processor) pair or a Scorer, got {type(scorer)}")
    for method in ("get_image_features", "get_text_features"):
        if not hasattr(model, method):
            raise ValueError(f"scorer {name!r} has no {method}: use a CLIP or SigLIP dual encoder (AutoModel)")
    model = model.to(device=device, dtype=dtype).eval()
    return Scorer(model=model, processor=processor, name=name, device=device, dtype=dtype, revision=revision)


def _folder_revision(name: str) -> str:
    """Size and modification time of every file of a local scorer folder: new weights saved under the same folder
    name change it, so cached scores of the old weights are not reused ("" for a Hub id)."""
    if not os.path.isdir(name):
        return ""
    digest = hashlib.sha256()
    for entry in sorted(os.scandir(name), key=lambda entry: entry.name):
        if entry.is_file():
            stat = entry.stat()
            digest.update(f"{entry.name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return "files-" + digest.hexdigest()[:16]


__all__ = ["DEFAULT_SCORER", "Scorer", "ScorerLoadError", "load_scorer"]
