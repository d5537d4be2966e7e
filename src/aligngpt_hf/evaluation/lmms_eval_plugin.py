"""lmms-eval model plugin: `--model aligngpt` for AlignGPT checkpoints, registered without forking lmms-eval.

lmms-eval (>= 0.7) finds external models through the entry-point group `lmms_eval.models`; ours points at
`model_manifests`, which declares one model id `aligngpt` with a *chat* class (`AlignGPTChat`, used by default,
reads the task's `doc_to_messages`) and a *simple* class (`AlignGPT`, chosen with `--force_simple`, reads
`doc_to_visual`/`doc_to_text` and is the one that serves `loglikelihood`/`multiple_choice` tasks, because lmms-eval
builds message-style requests for generation only). `register()` does the same by hand (tests, notebooks).

Both classes batch `generate_until` with left padding (identical answers to batch size 1 in fp32) and score
`loglikelihood` as the sum of the continuation's token log-probabilities after the vicuna_v1 prompt
`... USER: <image>\\n{context} ASSISTANT:`, with image and `<align>` positions never scored and the gate seeing the
prompt only (as at generation). This module imports lmms-eval; `import aligngpt_hf` never imports this module.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Sequence

try:
    from lmms_eval.api.instance import GenerationResult, unwrap_generation_output
    from lmms_eval.api.model import lmms
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "The lmms-eval plugin needs lmms-eval: from the clone of aligngpt-hf, `pip install -e '.[eval]'` (see "
        "docs/evaluation.md#lmms-eval for the light install that avoids torchvision)."
    ) from error

import torch

from aligngpt_hf.evaluation.inputs import (
    check_decoding,
    check_device,
    check_max_new_tokens,
    positive_int,
    set_image_aspect_ratio,
)

MODEL_ID = "aligngpt"
IMAGE_PLACEHOLDER = "<image>"


class ScoredContinuation(GenerationResult):
    """A `(logprob, is_greedy)` pair that survives lmms-eval 0.7.3's evaluator.

    0.7.3 passes every model output through `unwrap_generation_output`, which turns a plain `(float, bool)` tuple into
    its string, so `multiple_choice` tasks crash (`too many values to unpack`). A `GenerationResult` is unwrapped to
    its `.text` untouched; this one also unpacks and indexes like the tuple the `lmms` API documents.
    """

    def __iter__(self):
        return iter(self.text)

    def __getitem__(self, index):
        return self.text[index]

    def __len__(self) -> int:
        return len(self.text)


def _scored(pair: tuple[float, bool]):
    """The pair itself where lmms-eval keeps tuples intact, else wrapped (see ScoredContinuation)."""
    return ScoredContinuation(text=pair) if _STRINGIFIES_TUPLES else pair


_STRINGIFIES_TUPLES = isinstance(unwrap_generation_output((0.0, True))[0], str)


def model_manifests():
    """Entry-point payload for group `lmms_eval.models` (lmms-eval calls it while building its model registry)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [
        ModelManifest(
            model_id=MODEL_ID,
            simple_class_path=f"{__name__}.AlignGPT",
            chat_class_path=f"{__name__}.AlignGPTChat",
            aliases=("aligngpt_hf",),
        )
    ]


def register() -> None:
    """Register `aligngpt` in an already imported lmms-eval (no installed entry point needed); idempotent."""
    from lmms_eval import models

    for manifest in model_manifests():
        models.MODEL_REGISTRY_V2.register_manifest(manifest, overwrite=True)
        models.AVAILABLE_MODELS[manifest.model_id] = "AlignGPTChat"


def _as_bool(value, name: str = "trust_remote_code") -> bool:
    """A model_args switch: true/false, 1/0, yes/no (any case); anything else is an error, not a silent False."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "y"):
        return True
    if text in ("0", "false", "no", "n", "", "none"):
        return False
    raise ValueError(f"aligngpt model_args: {name}={value!r} is not a switch; use true or false.")


def _as_level(value) -> int | None:
    """`alignment_level` from model_args (a string there): None, or an integer row of the level table."""
    if value in (None, "", "None"):
        return None
    text = str(value).strip()
    if isinstance(value, bool) or not text.isdigit():
        raise ValueError(f"aligngpt model_args: alignment_level={value!r} must be an integer >= 0 (a row of the "
                         "level table).")
    return int(text)


def _as_images(visuals) -> list:
    """Flat list of RGB PIL images from whatever `doc_to_visual`/messages give (PIL, paths, nested lists, None)."""
    from PIL import Image

    from aligngpt_hf.models.image_processing_utils_aligngpt import load_image

    images = []
    for item in visuals or []:
        if isinstance(item, (list, tuple)):
            images.extend(_as_images(item))
        elif isinstance(item, (str, Image.Image)):  # the package's one loader: transparency on white, 16-bit scaled
            images.append(load_image(item, f"visual {len(images)}"))
        elif item is None:
            raise ValueError(f"visual {len(images)} is None; a task's doc_to_visual should return [] for a document "
                             "without an image, not [None].")
        else:
            raise TypeError(f"AlignGPT takes images only; got a {type(item).__name__} visual (video/audio?).")
    return images


def _strip_placeholders(text: str) -> str:
    """Drop `<image>` markers a task may have written; the chat template puts one per image first, as original."""
    return text.replace(IMAGE_PLACEHOLDER + "\n", "").replace(IMAGE_PLACEHOLDER, "").strip("\n")


def _decoding(gen_kwargs: dict, default_max_new_tokens: int) -> tuple[dict, list[str]]:
    """lmms-eval generation kwargs -> `generate` kwargs + stop strings; temperature 0 means greedy whatever else (tasks
    write `top_p` next to `temperature: 0`), but values that are no numbers, or out of range, are errors."""
    kwargs = dict(gen_kwargs or {})
    until = kwargs.pop("until", None) or []
    until = [until] if isinstance(until, str) else until
    if not isinstance(until, (list, tuple)) or not all(isinstance(stop, str) for stop in until):
        raise ValueError(f"aligngpt: the task's generation_kwargs `until` is {until!r}; it must be a string or a list "
                         "of strings (the texts an answer is cut at).")
    try:
        temperature = float(kwargs.pop("temperature", 0) or 0)
        max_new_tokens = kwargs.pop("max_new_tokens", None)
        max_new_tokens = default_max_new_tokens if max_new_tokens is None else _whole(max_new_tokens)
        num_beams = kwargs.pop("num_beams", None)
        num_beams = 1 if num_beams is None else _whole(num_beams)
        top_p = kwargs.pop("top_p", None)
        top_p = None if top_p is None or temperature <= 0 else float(top_p)
    except (TypeError, ValueError) as error:
        raise ValueError(f"aligngpt: the task's generation_kwargs {gen_kwargs!r} hold a value that is not a number "
                         f"({error}).") from None
    check_decoding(max_new_tokens, temperature, top_p, num_beams)
    kwargs.pop("do_sample", None)  # sampling follows temperature (> 0), as in LLaVA's own evaluation code
    if kwargs:
        _warn_unused(tuple(sorted(kwargs)))
    decoding = {"max_new_tokens": max_new_tokens, "num_beams": num_beams, "do_sample": temperature > 0}
    if temperature > 0:
        decoding["temperature"] = temperature
        if top_p is not None:
            decoding["top_p"] = top_p
    return decoding, until


@functools.cache
def _warn_unused(names: tuple[str, ...]) -> None:
    """Once per set of names (every request of a task carries the same kwargs)."""
    logging.getLogger(__name__).warning("aligngpt: the task's generation_kwargs %s are not used (AlignGPT decodes with "
                                        "temperature, top_p, num_beams, max_new_tokens and until).", list(names))


def _whole(value) -> int:
    """A count from the task's kwargs (`12`, `"12"`, `12.0`); 1.5 is an error, not 1."""
    number = float(value)
    if not number.is_integer():
        raise ValueError(f"{value!r} is not a whole number")
    return int(number)


def _cut_at(text: str, until: Sequence[str]) -> str:
    for stop in until:
        if stop and stop in text:
            text = text.split(stop, 1)[0]
    return text


def _batched_in_order(items: list, key_of: Callable, length_of: Callable, batch_size: int):
    """Yield (indices, batch) grouped by `key_of` and longest first, so padding is small and results map back."""
    groups: dict[str, list[int]] = {}
    for index, item in enumerate(items):
        groups.setdefault(key_of(item), []).append(index)
    for indices in groups.values():
        indices.sort(key=lambda i: -length_of(items[i]))
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            yield chunk, [items[i] for i in chunk]


def _gen_key(gen_kwargs) -> str:
    return json.dumps(gen_kwargs or {}, sort_keys=True, default=str)


class AlignGPT(lmms):
    """`--model aligngpt --force_simple`: doc_to_visual + doc_to_text requests; generate_until and loglikelihood.

    Model arguments (`--model_args k=v,...`): `pretrained` (folder or Hub id), `device` (default cuda if available),
    `dtype` (auto | float16 | bfloat16 | float32), `batch_size` (1 = paper parity), `alignment_mode` (adaptive |
    global | local | mean | none), `alignment_level` (fixed-level mode, row K of the level table), `max_new_tokens`
    (default when the task sets none: 128, as `model_vqa_loader.py`), `image_aspect_ratio` (pad | square),
    `trust_remote_code` (for Hub checkpoints when `aligngpt_hf` classes should not be used).
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        device: str | None = None,
        dtype: str = "auto",
        batch_size: int | str = 1,
        alignment_mode: str | None = None,
        alignment_level: int | None = None,
        max_new_tokens: int = 128,
        image_aspect_ratio: str | None = None,
        trust_remote_code: bool | str = False,
        max_batch_size: int | None = None,
        **unused,
    ) -> None:
        super().__init__()
        if unused:
            raise ValueError(f"Unknown aligngpt model_args: {sorted(unused)}.")
        from accelerate import PartialState

        from aligngpt_hf.evaluation.answer import check_alignment_level, load_for_answering

        batch_size = 1 if batch_size is None else positive_int(batch_size, "aligngpt model_args: batch_size")
        max_new_tokens = positive_int(max_new_tokens, "aligngpt model_args: max_new_tokens")
        level = _as_level(alignment_level)
        if level is not None and alignment_mode:
            raise ValueError(f"aligngpt model_args: alignment_level={level} replaces what alignment_mode="
                             f"{alignment_mode} computes for every image; pass one of them.")
        if image_aspect_ratio not in (None, "", "pad", "square"):
            raise ValueError(f"aligngpt model_args: image_aspect_ratio={image_aspect_ratio!r}; use pad or square.")

        state = PartialState()
        self._rank, self._world_size = state.process_index, state.num_processes
        if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
            logging.getLogger(__name__).warning("aligngpt model_args: device=%s, but CUDA is not available here; "
                                                "running on the CPU (slow for a real model).", device)
        if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if self._world_size > 1 and str(device).startswith("cuda"):
            device = f"cuda:{state.local_process_index}"
        check_device(device, "aligngpt model_args: device")
        extra = {"trust_remote_code": True} if _as_bool(trust_remote_code) else {}
        self.model, self.processor = load_for_answering(pretrained, alignment_mode or None, dtype, device, **extra)
        set_image_aspect_ratio(self.processor, image_aspect_ratio, "aligngpt model_args: image_aspect_ratio")
        check_alignment_level(level, self.model.config, "alignment_level")
        check_max_new_tokens(max_new_tokens, self.model.config, "aligngpt model_args: max_new_tokens")
        self.tokenizer = self.processor.tokenizer
        self.batch_size, self.alignment_level, self.max_new_tokens = batch_size, level, max_new_tokens

    @property
    def device(self) -> torch.device:
        return self.model.device

    # ---- shared machinery -------------------------------------------------------------------------------------
    def _prompt(self, context: str, num_images: int) -> str:
        content = [{"type": "image"}] * num_images + [{"type": "text", "text": _strip_placeholders(context)}]
        return self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)

    def _inputs(self, texts: list[str], images: list[list]):
        """Left-padded model inputs; images one list per sample (empty for text-only samples, mixing is fine)."""
        has_images = any(len(sample) for sample in images)
        batch = self.processor(
            text=texts, images=images if has_images else None, padding=True, padding_side="left", return_tensors="pt"
        ).to(self.device)
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(self.model.dtype)
        if self.alignment_level is not None:
            batch["alignment_levels"] = torch.full((len(texts),), self.alignment_level, device=self.device)
        return batch

    def _generate(self, texts: list[str], images: list[list], gen_kwargs: dict) -> list[str]:
        decoding, until = _decoding(gen_kwargs, self.max_new_tokens)
        check_max_new_tokens(decoding["max_new_tokens"], self.model.config, "the task's max_new_tokens")
        batch = self._inputs(texts, images)
        with torch.inference_mode():
            output = self.model.generate(
                **batch, pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id, **decoding
            )
        new_tokens = output[:, batch["input_ids"].shape[1] :]
        decoded = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return [_cut_at(text, until).strip() for text in decoded]

    def _score(self, prompts: list[str], continuations: list[str], images: list[list]) -> list[tuple[float, bool]]:
        """Sum of log p(continuation tokens | prompt) and whether greedy decoding would produce them."""
        tokenize = self.tokenizer
        n_cont = []
        for prompt, continuation in zip(prompts, continuations):
            whole = tokenize(prompt + continuation, add_special_tokens=False)["input_ids"]
            n_cont.append(len(whole) - len(tokenize(prompt, add_special_tokens=False)["input_ids"]))
        batch = self._inputs([p + c for p, c in zip(prompts, continuations)], images)
        gate_mask = batch["attention_mask"].clone()
        for row, n in enumerate(n_cont):
            if n > 0:
                gate_mask[row, -n:] = 0  # the gate sees the prompt only, exactly as when generating
        keep = max(n_cont) + 1
        with torch.inference_mode():
            logits = self.model(**batch, gate_text_mask=gate_mask, logits_to_keep=keep).logits.float()
        log_probs = torch.log_softmax(logits[:, :-1], dim=-1)  # position t predicts token t+1
        results = []
        for row, n in enumerate(n_cont):
            if n <= 0:
                results.append((0.0, True))
                continue
            targets = batch["input_ids"][row, -n:]
            row_log_probs = log_probs[row, -n:]
            total = row_log_probs.gather(-1, targets.unsqueeze(-1)).sum().item()
            results.append((float(total), bool((row_log_probs.argmax(-1) == targets).all())))
        return results

    # ---- lmms-eval API ----------------------------------------------------------------------------------------
    def _doc(self, task: str, split: str, doc_id: int) -> dict:
        return self.task_dict[task][split][doc_id]

    def generate_until(self, requests) -> list[str]:
        from tqdm.auto import tqdm

        results: list = [None] * len(requests)
        args = [request.args for request in requests]
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="AlignGPT generating")
        for indices, chunk in _batched_in_order(args, lambda a: _gen_key(a[1]), lambda a: len(a[0]), self.batch_size):
            images = [
                _as_images(doc_to_visual(self._doc(task, split, doc_id)))
                for _, _, doc_to_visual, doc_id, task, split in chunk
            ]
            texts = [self._prompt(a[0], len(imgs)) for a, imgs in zip(chunk, images)]
            for index, answer, a in zip(indices, self._generate(texts, images, chunk[0][1]), chunk):
                results[index] = answer
                self.cache_hook.add_partial("generate_until", (a[0], a[1]), answer)
            bar.update(len(chunk))
        bar.close()
        return results

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        from tqdm.auto import tqdm

        items = []
        for request in requests:
            args = request.args
            if len(args) == 2:  # unconditional scoring (acc_mutual_info): no document, no image
                items.append((args[0], str(args[1]), []))
                continue
            context, target, doc_to_visual, doc_id, task, split = args
            doc = self._doc(task, split, doc_id)
            continuation = target if isinstance(target, str) else str(target(doc))
            items.append((context, continuation, _as_images(doc_to_visual(doc)) if doc_to_visual else []))
        results: list = [None] * len(items)
        bar = tqdm(total=len(items), disable=self.rank != 0, desc="AlignGPT scoring")
        by_length = lambda item: len(item[0]) + len(item[1])  # noqa: E731
        for indices, chunk in _batched_in_order(items, lambda item: "", by_length, self.batch_size):
            prompts, continuations = [], []
            for context, continuation, images in chunk:
                prompt = self._prompt(context, len(images))
                stripped = prompt.rstrip()  # trailing prompt spaces belong to the continuation (lm-eval rule)
                prompts.append(stripped)
                continuations.append(prompt[len(stripped) :] + continuation)
            for index, scored in zip(indices, self._score(prompts, continuations, [c[2] for c in chunk])):
                results[index] = _scored(scored)
            bar.update(len(chunk))
        bar.close()
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("AlignGPT answers single-turn requests; multi-round generation is not supported.")


class AlignGPTChat(AlignGPT):
    """`--model aligngpt` (default): message-style requests (`doc_to_messages`), batched generate_until."""

    is_simple = False

    def generate_until(self, requests) -> list[str]:
        from lmms_eval.protocol import ChatMessages
        from tqdm.auto import tqdm

        results: list = [None] * len(requests)
        args = [request.args for request in requests]
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="AlignGPT generating")
        for indices, chunk in _batched_in_order(args, lambda a: _gen_key(a[2]), lambda a: len(a[0]), self.batch_size):
            texts, images = [], []
            for _context, doc_to_messages, _, doc_id, task, split in chunk:
                messages = ChatMessages(messages=doc_to_messages(self._doc(task, split, doc_id)))
                visuals, videos, audios = messages.extract_media()
                if videos or audios:
                    raise ValueError(f"doc {doc_id} of {task}: AlignGPT takes images and text only.")
                hf_messages = messages.to_hf_messages()
                for message in hf_messages:
                    for part in message["content"]:
                        if part["type"] == "text":
                            part["text"] = _strip_placeholders(part["text"])
                texts.append(self.processor.apply_chat_template(hf_messages, add_generation_prompt=True))
                images.append(_as_images(visuals))
            for index, answer, a in zip(indices, self._generate(texts, images, chunk[0][2]), chunk):
                results[index] = answer
                self.cache_hook.add_partial("generate_until", (a[0], a[2]), answer)
            bar.update(len(chunk))
        bar.close()
        return results

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        raise NotImplementedError(
            "lmms-eval builds loglikelihood/multiple_choice requests for simple models only: add `--force_simple`."
        )


__all__ = ["AlignGPT", "AlignGPTChat", "MODEL_ID", "model_manifests", "register"]
