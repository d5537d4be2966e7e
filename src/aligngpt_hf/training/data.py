"""Training data for AlignGPT: the stage-1 "plain" template, the stage-1 data check and the batch collator (the
LLaVA JSON adapter, `load_llava_json`, lives in `llava_json.py` and is re-exported here).

Rows follow TRL's vision format, `{"images": [...], "messages": [...]}`, so the same data works with the stock
`SFTTrainer`. Images are decoded lazily (a `datasets.Image` feature holding paths, or paths decoded in the collator),
and everything that can go wrong with a sample (overlong, no supervised token, missing level) raises an error naming it.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

import torch
from trl.data_utils import prepare_multimodal_messages
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

from aligngpt_hf.models.image_processing_utils_aligngpt import check_conversation, load_image, load_images
from aligngpt_hf.training.llava_json import IMAGE_PLACEHOLDER, LEVEL_COLUMN, load_llava_json

# Stage 1 (LLaVA's "plain" template, as AlignGPT pre-trains): BOS, one <image> per image of the user turns (their text is dropped), then
# each assistant text followed by "\n" inside {% generation %}: labels = caption + "\n", no EOS. The processor inserts
# <align> after BOS and keeps the assistant mask right.
PLAIN_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] if part['type'] == 'text' -%}{{ part['text'] }}{%- endfor -%}"
    "{%- endif -%}"
    "{{ '\\n' }}{% endgeneration %}"
    "{%- elif message['role'] == 'user' and message['content'] is not string -%}"
    "{%- for part in message['content'] if part['type'] == 'image' -%}<image>{%- endfor -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


def check_stage1_data(dataset, level_column: str | None = LEVEL_COLUMN, num_levels: int | None = None) -> None:
    """Stage 1 learns from image-caption pairs and feeds each image row's level to the model: the data is checked
    before training (some row has an image; with `level_column`, levels are integers in 0..N-1, none missing where
    there is an image), not at the batch that lacks one hours into the run. Streaming datasets are left to the
    collator, which checks every batch."""
    names = getattr(dataset, "column_names", None)
    if names is None or not hasattr(dataset, "__len__"):
        return
    if not any(image_count(row) for row in undecoded(dataset)):  # stops at the first image row
        raise ValueError(f"Stage 1 trains the projector and level table on image-caption pairs, but none of the "
                         f"{len(dataset)} rows has an image. Check the data's `images` (LLaVA JSON: `image`) field.")
    if level_column is None:
        return
    ids = dataset["id"] if "id" in names else None
    label = (lambda index: f"{ids[index]!r} (#{index})") if ids is not None else (lambda index: f"#{index}")
    levels = dataset[level_column] if level_column in names else [None] * len(dataset)
    missing = [index for index, level in enumerate(levels) if level is None]
    if missing:
        rows = undecoded(dataset)
        missing = [index for index in missing if image_count(rows[index])]
    if missing:
        where = "" if level_column in names else f"(the data has no `{level_column}` column) "
        raise ValueError(
            f"Stage 1: {len(missing)} row(s) with an image {where}have no `{level_column}` (first: "
            f"{', '.join(label(i) for i in missing[:5])}). Stage 1 feeds each pair's alignment level to the model; "
            "add levels with `aligngpt-hf levels` (LLaVA JSON field `similarity`)."
        )
    top = num_levels - 1 if num_levels is not None else None
    wrong = [
        index for index, level in enumerate(levels) if level is not None and (
            isinstance(level, bool) or not is_integral(level) or level < 0 or (top is not None and level > top))
    ]
    if wrong:
        allowed = f"integers in 0..{top}" if top is not None else "integers >= 0"
        shown = ", ".join(f"{label(i)}={levels[i]!r}" for i in wrong[:5])
        raise ValueError(
            f"Stage 1: {len(wrong)} row(s) have a `{level_column}` that is not a level of this model ({allowed}; "
            f"first: {shown}). Recompute levels with `aligngpt-hf levels --num-levels N` for the model's N."
        )


def open_image(image: Any, where: str = "image"):
    """A path, bytes, `{"path"|"bytes": ...}` (an undecoded Image feature) or PIL image -> RGB PIL image, through the
    package's one loader (transparency on white, 16-bit scaled), so training sees what the processor sees. A numpy or
    torch array (H, W, C or C, H, W) is checked as the processor checks it and kept as an array."""
    if type(image).__name__ in ("ndarray", "Tensor"):
        try:
            return load_images([image])[0]
        except (TypeError, ValueError) as error:
            raise type(error)(f"{where}: {str(error).removeprefix('images[0] ')}") from None
    return load_image(image, where)


def as_messages_example(example: dict) -> dict:
    """Normalise one row to `{"messages", "images", ...}`: `image` -> `images`, prompt + completion -> messages."""
    example = dict(example)
    if "image" in example:
        image = example.pop("image")
        example["images"] = [] if image is None else [image]
    if "messages" not in example:
        if "prompt" in example and "completion" in example and isinstance(example["prompt"], list):
            example["messages"] = list(example.pop("prompt")) + list(example.pop("completion"))
        else:
            raise ValueError(
                f"AlignGPT trainers take conversational rows (`messages`, or `prompt` + `completion` lists of "
                f"messages) with `images`; got keys {sorted(example)}. Convert LLaVA JSON with `load_llava_json`."
            )
    name = f"sample {example['id']!r}" if example.get("id") is not None else "sample"
    if not isinstance(example["messages"], (list, tuple)):
        raise ValueError(f"{name[0].upper()}{name[1:]} has `messages`={example['messages']!r}; expected a list of "
                         "{'role': ..., 'content': ...} messages.")
    images = example.get("images") or []
    if not isinstance(images, (list, tuple)):  # one image given bare (a path or a PIL image), not a list of them
        images = [images]
    example["images"] = [open_image(image, f"{name} image {i}") for i, image in enumerate(images)]
    return example


def _check_no_image_text(example: dict, index: int) -> None:
    """TRL's vision format gives each image as an `{"type": "image"}` part and adds them to the first user message
    when its content is a string; an `<image>` written in that string as well would count every image twice."""
    if not example["images"]:
        return
    for number, message in enumerate(example["messages"]):
        if isinstance(message.get("content"), str) and IMAGE_PLACEHOLDER in message["content"]:
            raise ValueError(
                f"Sample {sample_name(example, index)}: message {number} holds the text `<image>` while the row's "
                "images come in `images`; in TRL's format the images become `{'type': 'image'}` parts of the first "
                "user message. Remove `<image>` from the text (or load LLaVA JSON with `load_llava_json`)."
            )


def _check_answers(example: dict, index: int) -> None:
    """A last `user` message has no answer to learn (its text costs tokens and trains nothing); an empty assistant
    message teaches the model to answer with the end token alone."""
    messages = example["messages"]
    if messages and messages[-1].get("role") == "user" and any(m.get("role") == "assistant" for m in messages):
        raise ValueError(f"Sample {sample_name(example, index)}: message {len(messages) - 1} is a `user` message with "
                         "no assistant answer after it, so it would train on nothing. Add the answer, or drop it.")
    for number, message in enumerate(messages):
        content = message.get("content")
        text = content if isinstance(content, str) else "".join(
            part.get("text") or "" for part in content or [] if isinstance(part, dict) and part.get("type") == "text")
        if message.get("role") == "assistant" and not text.strip():
            raise ValueError(f"Sample {sample_name(example, index)}: message {number} is an empty assistant answer "
                             "and would teach the model to answer with the end token alone. Fill it in or remove it.")


def _with_images(example: dict, index: int) -> list[dict]:
    """TRL's messages with the row's images put into their `{"type": "image"}` parts; a count mismatch names the
    sample (TRL's own error names neither the sample nor the fix)."""
    try:
        return prepare_multimodal_messages(example["messages"], images=example["images"])
    except ValueError as error:
        raise ValueError(
            f"Sample {sample_name(example, index)}: {error} Give one {{'type': 'image'}} part per entry of `images` "
            "(or string contents: the images then go in front of the first user message)."
        ) from None


def sample_name(example: dict, index: int) -> str:
    return f"{example['id']!r}" if example.get("id") is not None else f"#{index} of the batch"


@dataclass
class AlignGPTDataCollator(DataCollatorForVisionLanguageModeling):
    """TRL's VLM collator made safe for AlignGPT: no truncation ever, labels only where they belong, extra inputs.

    * Renders every row with `chat_template` (the plain template in stage 1, vicuna_v1 in stage 2) and no truncation;
      a row longer than `max_length` (image tokens and `<align>` included) raises, naming the sample.
    * Labels: the `{% generation %}` spans (assistant answers + EOS; caption + "\\n" in stage 1) when
      `assistant_only_loss`, else every text token; `<image>`/`<align>`/padding never. A batch with no label raises.
    * `level_column`: copies each row's level into `alignment_levels` (stage 1); `gate_text_mask`: adds
      `(labels == -100) & attention_mask`, so the gate averages the prompt only, as at inference.

    Example:

    ```python
    >>> from aligngpt_hf.training.data import AlignGPTDataCollator, synthetic_dataset
    >>> from aligngpt_hf.tiny import build_processor
    >>> collator = AlignGPTDataCollator(processor=build_processor(), max_length=2048, assistant_only_loss=True,
    ...                                 gate_text_mask=True)
    >>> batch = collator([synthetic_dataset(2, "instruct")[i] for i in range(2)])
    >>> sorted(batch)
    ['attention_mask', 'gate_text_mask', 'input_ids', 'labels', 'pixel_values']
    ```
    """

    level_column: str | None = None
    gate_text_mask: bool = False
    num_alignment_levels: int | None = None

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        examples = [as_messages_example(example) for example in examples]
        for index, example in enumerate(examples):
            try:
                check_conversation(example["messages"])
            except (TypeError, ValueError) as error:
                raise type(error)(f"Sample {sample_name(example, index)}: {error}") from None
            _check_answers(example, index)
            if self.chat_template != PLAIN_CHAT_TEMPLATE:  # the plain template drops the user's text
                _check_no_image_text(example, index)
        messages = [_with_images(example, index) for index, example in enumerate(examples)]
        output = self.processor.apply_chat_template(
            messages,
            chat_template=self.chat_template,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            return_assistant_tokens_mask=True,
            processor_kwargs={
                "padding": True,
                "padding_side": "right",
                "pad_to_multiple_of": self.pad_to_multiple_of,
                "add_special_tokens": False,
            },
        )
        self._check_lengths(output["attention_mask"], examples)
        output["labels"] = self._labels(output, examples)
        if self.level_column is not None:
            output["alignment_levels"] = self._levels(examples, output["input_ids"])
        if self.gate_text_mask:
            output["gate_text_mask"] = (output["labels"] == -100) & output["attention_mask"].bool()
        return output

    def _check_lengths(self, attention_mask: torch.Tensor, examples: list[dict]) -> None:
        if self.max_length is None:
            return
        lengths = attention_mask.sum(-1).tolist()
        for index, length in enumerate(lengths):
            if length > self.max_length:
                raise ValueError(
                    f"Sample {sample_name(examples[index], index)} is {length} tokens long (its "
                    f"{len(examples[index]['images'])} image(s) and `<align>` included) but `max_length` is "
                    f"{self.max_length}. Image tokens are never cut: raise `max_length`, shorten the sample, or set "
                    "`skip_overlong_samples=True` to drop such samples before training (they are counted)."
                )

    def _labels(self, output, examples: list[dict]) -> torch.Tensor:
        input_ids, attention_mask = output["input_ids"], output["attention_mask"]
        assistant_masks = output.pop("assistant_masks")
        labels = input_ids.clone()
        labels[attention_mask == 0] = -100
        if self.assistant_only_loss:
            labels[torch.as_tensor(assistant_masks) == 0] = -100
        for token_id in (self.processor.image_token_id, self.processor.alignment_token_id):
            labels[input_ids == token_id] = -100
        empty = [index for index, row in enumerate((labels[:, 1:] != -100).any(-1).tolist()) if not row]
        if len(empty) == len(examples):
            names = ", ".join(sample_name(example, index) for index, example in enumerate(examples))
            raise ValueError(
                f"Every label of this batch is -100 (samples {names}): nothing would be learned and the loss would "
                "be a silent 0. Each sample needs an assistant turn (a caption in stage 1) that the chat template "
                "marks with {% generation %}."
            )
        if empty:
            raise ValueError(
                f"Sample {sample_name(examples[empty[0]], empty[0])} has no supervised token (no assistant turn, or "
                "an empty one) and would train on nothing. Add the answer (a caption in stage 1) or remove the sample."
            )
        return labels

    def _levels(self, examples: list[dict], input_ids: torch.Tensor) -> torch.LongTensor:
        has_image = (input_ids == self.processor.image_token_id).any(-1).tolist()
        levels = []
        for index, example in enumerate(examples):
            level = example.get(self.level_column)
            if level is None and has_image[index]:
                raise ValueError(
                    f"Sample {sample_name(example, index)} has an image but no `{self.level_column}`: stage 1 feeds "
                    "each pair's alignment level to the model. Add levels with `aligngpt-hf levels` (LLaVA JSON "
                    "field `similarity`)."
                )
            levels.append(0 if level is None else self._check_level(level, example, index))
        return torch.tensor(levels, dtype=torch.long)

    def _check_level(self, level, example: dict, index: int) -> int:
        """An integer in 0..N-1, checked here so the error names the record, not a batch position mid-training."""
        integral = is_integral(level)
        top = self.num_alignment_levels
        if isinstance(level, bool) or not integral or level < 0 or (top is not None and level >= top):
            allowed = f"0..{top - 1}" if top is not None else "an integer >= 0"
            raise ValueError(
                f"Sample {sample_name(example, index)} has `{self.level_column}`={level!r}; levels must be integers "
                f"in {allowed} (never rounded). Recompute them with `aligngpt-hf levels`."
            )
        return int(level)


def is_integral(level) -> bool:
    """An integer level: Python or NumPy integers (rows built with pandas/NumPy hold `np.int64`) and integral floats;
    never a bool."""
    if isinstance(level, bool):
        return False
    return isinstance(level, numbers.Integral) or (isinstance(level, float) and level.is_integer())


def undecoded(dataset):
    """The dataset without image decoding (image columns as paths/bytes), for cheap passes over all rows."""
    import datasets

    for column in ("images", "image"):
        feature = dataset.features.get(column) if dataset.features else None
        if isinstance(feature, datasets.Image):
            dataset = dataset.cast_column(column, datasets.Image(decode=False))
        elif isinstance(feature, (datasets.List, datasets.Sequence)) and isinstance(feature.feature, datasets.Image):
            dataset = dataset.cast_column(column, datasets.List(datasets.Image(decode=False)))
    return dataset


def check_row_format(dataset) -> None:
    """The rows must be TRL conversations before training starts: LLaVA's `conversations` rows or plain text would
    otherwise meet TRL's "the dataset is not conversational" (naming neither the columns nor the fix) or the first
    batch."""
    names = getattr(dataset, "column_names", None)
    if not names:
        return
    if "messages" not in names and not {"prompt", "completion"} <= set(names):
        hint = (" The rows are in LLaVA's format (`conversations`): load that file with `load_llava_json` (CLI: "
                "--data_path)." if "conversations" in names else "")
        raise ValueError(f"AlignGPT trainers take conversational rows: a `messages` column (or `prompt` + "
                         f"`completion`) of {{'role': ..., 'content': ...}} messages, with `images`; the dataset has "
                         f"the columns {names}.{hint}")
    column = "messages" if "messages" in names else "prompt"
    messages = next(iter(dataset.select_columns([column])))[column]  # no image of the row is opened
    if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise ValueError(f"The first row's `{column}` is {str(messages)[:80]!r}; AlignGPT trainers take lists of "
                         "{'role': ..., 'content': ...} messages (plain text or prompt/completion strings are not "
                         "conversations).")


def check_image_paths(dataset) -> None:
    """Image paths held as plain strings (not an Image feature) must name files before training, not at the batch
    that reaches a missing one hours in; relative ones are read from the working directory, not the dataset's folder.
    Only string columns are read (an Image column may embed gigabytes of bytes)."""
    import os

    import datasets

    features = getattr(dataset, "features", None)
    if not features or not hasattr(dataset, "__len__"):
        return
    column = next((name for name in ("images", "image") if name in features), None)
    feature = features[column] if column else None
    inner = getattr(feature, "feature", None)
    is_text = isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")
    is_text_list = isinstance(inner, datasets.Value) and inner.dtype in ("string", "large_string")
    if not (is_text or is_text_list):
        return
    values = dataset[column]
    ids = dataset["id"] if "id" in features else None
    missing = [(index, path) for index, row in enumerate(values)
               for path in ([row] if is_text else row or []) if isinstance(path, str)
               and not path.startswith(("http://", "https://")) and not os.path.isfile(path)]
    if missing:
        shown = ", ".join(f"{ids[i]!r} (#{i}): {path}" if ids else f"#{i}: {path}" for i, path in missing[:3])
        relative = any(not os.path.isabs(path) for _, path in missing)
        where = f" Relative paths are read from the working directory {os.getcwd()}." if relative else ""
        raise FileNotFoundError(f"{len(missing)} image path(s) of the `{column}` column name no file (first: {shown})."
                                f"{where} Fix the paths, or store the images in the dataset (an Image feature).")


def with_images_column(dataset):
    """A text-only dataset (no `images`/`image` column) gets an empty `images` column: without one, TRL takes it for
    a language-model dataset, tokenises and truncates it to `max_length` itself and drops `messages`, so the
    collator would see token ids instead of conversations."""
    names = getattr(dataset, "column_names", None)
    if names is None or "images" in names or "image" in names:
        return dataset
    import datasets

    if isinstance(dataset, datasets.Dataset):
        return dataset.add_column("images", [[] for _ in range(len(dataset))],
                                  feature=datasets.List(datasets.Image(decode=False)))
    return dataset.map(lambda row: {"images": []})


def image_count(row: dict) -> int:
    if "images" in row:
        return len(row["images"] or [])
    return 0 if row.get("image") is None else 1


def sample_token_lengths(dataset, processor, chat_template: str | None = None) -> list[int]:
    """Exact token length of every row as the collator builds it (image tokens and `<align>` included), no images
    decoded: the rendered text's tokens plus `image_seq_length - 1` per `<image>` and one `<align>` per image row."""
    tokenizer = processor.tokenizer
    per_image = processor.image_seq_length - 1
    lengths = []
    for row in undecoded(dataset):
        row = dict(row)
        count = image_count(row)
        row.pop("image", None)
        row["images"] = []
        example = as_messages_example(row)
        messages = prepare_multimodal_messages(example["messages"], images=[None] * count)
        text = processor.apply_chat_template(messages, chat_template=chat_template, tokenize=False)
        length = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        align = 1 if count and getattr(processor, "add_alignment_token", True) else 0
        lengths.append(length + count * per_image + align)
    return lengths


SYNTHETIC_COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


def synthetic_dataset(num_samples: int = 16, stage: str = "pretrain", text_only_every: int = 0, num_levels: int = 8,
                      image_size: int = 32):
    """A tiny in-memory dataset of coloured squares in TRL's vision format, for smoke runs and tests (no files).

    `pretrain` rows carry a caption and `alignment_level`; `instruct` rows a question and answer; with
    `text_only_every=k`, every k-th row is text-only (`images: []`).
    """
    import datasets
    from PIL import Image

    names = list(SYNTHETIC_COLOURS)
    rows = []
    for index in range(num_samples):
        colour = names[index % len(names)]
        image = Image.new("RGB", (image_size + 8 * (index % 3), image_size), SYNTHETIC_COLOURS[colour])
        text_only = text_only_every and index % text_only_every == text_only_every - 1
        if stage == "pretrain":
            user, answer = "Render a clear and concise summary of the photo.", f"A {colour} square."
        elif text_only:
            user, answer = "How many?", "There are two circles."
        else:
            user, answer = "What colour is the shape?", f"The shape is {colour}."
        rows.append({
            "id": f"{stage}-{index}",
            "images": [] if text_only else [image],
            "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
            LEVEL_COLUMN: index % num_levels,
        })
    return datasets.Dataset.from_list(rows)


__all__ = [
    "LEVEL_COLUMN",
    "PLAIN_CHAT_TEMPLATE",
    "AlignGPTDataCollator",
    "check_stage1_data",
    "load_llava_json",
    "sample_token_lengths",
    "synthetic_dataset",
]
