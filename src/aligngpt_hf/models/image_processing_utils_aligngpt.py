# Copyright 2026 The aligngpt-hf authors. Licensed under the Apache License, Version 2.0.
"""The one image-loading path of AlignGPT (processor, training data, levels, answer) and the input-message checks.

Why one path: the same picture must become the same pixels in training, level scoring and evaluation. Every picture
is turned upright by its EXIF orientation tag (as `datasets` and transformers' `load_image` do), and every mode becomes
RGB the same way: transparency is composited on WHITE (as transformers' `convert_to_rgb` does), 16-bit and 32-bit
integer greyscale is scaled to 8 bits (not clipped), float greyscale in 0..1 is scaled by 255. Empty (0x0) images and
objects that are not images are refused, naming the input. `http(s)://` URLs are fetched by transformers' `load_image`;
a string that is no file is read as base64 (or a `data:image/` URI), as `load_image` does.
"""

import base64
import binascii
import io
import math
import os

from transformers import image_utils
from transformers.image_utils import PIL

ROLES = ("system", "user", "assistant")
CONTENT_TYPES = ("image", "text")
_ARRAY_TYPES = ("ndarray", "Tensor")  # numpy / torch images pass through to the image processor unchanged
URL_SCHEMES = ("http://", "https://")
_ORIENTATION = 0x0112  # the EXIF tag that says how the camera was turned


def upright(image):
    """`image` turned by its EXIF orientation tag (a phone photo stored sideways), as `datasets` decodes it."""
    if image.getexif().get(_ORIENTATION, 1) in (None, 1):
        return image
    return PIL.ImageOps.exif_transpose(image)


def to_rgb(image, where: str = "image"):
    """A PIL image of any mode -> RGB; transparency on white, 16/32-bit integer and float greyscale rescaled."""
    if image.width == 0 or image.height == 0:
        raise ValueError(f"{where} is empty ({image.width}x{image.height} pixels); give an image with pixels.")
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode == "I":
        image = image.convert("I") if mode != "I" else image
        high = image.getextrema()[1]
        scale = 1 / 257 if mode.startswith("I;16") or high > 255 else 1.0
        if mode == "I" and high > 65535:
            scale = 255 / high
        return image.point(lambda value: value * scale).convert("L").convert("RGB")
    if mode == "F":
        high = image.getextrema()[1]
        return image.point(lambda value: value * (255.0 if high <= 1.0 else 1.0)).convert("L").convert("RGB")
    if mode in ("La", "RGBa"):  # premultiplied alpha: PIL converts La only to LA
        image = image.convert("LA" if mode == "La" else "RGBA")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        image = image.convert("RGBA")
        background = PIL.Image.new("RGBA", image.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")


def load_image(image, where: str = "image"):
    """A path, bytes, `{"path"|"bytes": ...}` (an undecoded `datasets.Image`) or PIL image -> RGB PIL image.

    Errors name `where` (the record, sample or question) and say what to do. A path from a data file is checked
    against its image folder first (`aligngpt_hf.paths.resolve_image_path`).
    """
    if isinstance(image, dict) and (image.get("bytes") or image.get("path")):
        image = image.get("bytes") or image.get("path")
    if isinstance(image, str) and image.startswith(URL_SCHEMES):
        try:
            image = image_utils.load_image(image)  # fetched and decoded by transformers (EXIF orientation applied)
        except Exception as error:  # noqa: BLE001 (network, HTTP and decoding errors of any client library)
            raise ValueError(f"{where}: could not load the image URL {image} ({type(error).__name__}: {error}).") \
                from None
        return to_rgb(image, where)
    if isinstance(image, PIL.Image.Image):
        return to_rgb(upright(image), where)
    if isinstance(image, (bytes, bytearray)):
        source, name = io.BytesIO(image), "the given bytes"
    elif isinstance(image, (str, os.PathLike)) and str(image):
        source = name = str(image)
        if os.path.isdir(source):
            raise IsADirectoryError(f"{where}: {name} is a folder, not an image file; give the image's own path.")
        data = None if os.path.isfile(source) else decoded_base64(source)  # as transformers' `load_image` reads it
        if data is not None:
            source, name = io.BytesIO(data), f"{name[:40]}... (no such file; decoded as base64)"
        elif not os.path.isfile(source):
            raise FileNotFoundError(f"{where}: image file {name} not found. Check the path and the image folder.")
    elif isinstance(image, (str, os.PathLike)):
        raise TypeError(f"{where}: expected an image path (string), got {type(image).__name__} {image!r}.")
    else:
        raise TypeError(
            f"{where} is a {type(image).__name__}, not an image: pass a PIL image, a path or bytes (the processor "
            "also takes numpy/torch arrays, H, W, C or C, H, W).")
    try:
        with PIL.Image.open(source) as opened:
            opened.load()
            return to_rgb(upright(opened), where)
    except (OSError, SyntaxError, PIL.Image.DecompressionBombError) as error:
        why = f"{type(error).__name__}: {error}" + (
            " It is larger than PIL's limit for untrusted files; shrink it, or raise `PIL.Image.MAX_IMAGE_PIXELS` if "
            "you trust it" if isinstance(error, PIL.Image.DecompressionBombError)
            else "; the file is cut short" if "truncated" in str(error) else "")
        raise ValueError(f"{where}: {name} is not a readable image ({why}). Replace or re-download it.") from None


def decoded_base64(text: str) -> bytes | None:
    """The bytes of a base64 image string or `data:image/...;base64,` URI (OpenAI-style messages), else None."""
    payload = text.split(",", 1)[-1] if text.startswith("data:image/") else text
    try:
        return base64.b64decode("".join(payload.split()), validate=True) or None
    except (binascii.Error, ValueError):
        return None


def check_text(text):
    """`text` must be a string or a list of strings (not ids, not a number); returned unchanged."""
    if text is None or isinstance(text, str):
        return text
    if isinstance(text, (list, tuple)) and all(isinstance(sample, str) for sample in text):
        return text
    bad = text if not isinstance(text, (list, tuple)) else next(s for s in text if not isinstance(s, str))
    raise TypeError(
        f"`text` must be a string or a list of strings, got {type(bad).__name__} {str(bad)[:40]!r}; render "
        "conversations with `processor.apply_chat_template(..., tokenize=False)` first.")


def load_images(images):
    """The processor's `images` (one image, a flat list, or one list per sample) with every item loaded to RGB.

    Arrays and tensors pass through unchanged (the image processor checks them); the nesting is kept.
    """
    if images is None or not isinstance(images, (list, tuple)):
        return None if images is None else _load_one(images, "images")
    return [[_load_one(inner, f"images[{i}][{j}]") for j, inner in enumerate(item)] if isinstance(item, (list, tuple))
            else _load_one(item, f"images[{i}]") for i, item in enumerate(images)]


def _load_one(image, where: str):
    if type(image).__name__ in _ARRAY_TYPES:
        if 0 in tuple(image.shape):
            raise ValueError(f"{where} is empty (shape {tuple(image.shape)}); give an image with pixels.")
        if not -math.inf < float(image.min()) <= float(image.max()) < math.inf:  # False for NaN too
            raise ValueError(f"{where} holds NaN or infinite pixel values; give a decoded image (0..255 or 0..1).")
        if image.ndim == 2:  # (H, W): one grey channel, read as a greyscale picture
            return to_rgb(PIL.Image.fromarray(image.numpy() if hasattr(image, "numpy") else image), where)
        return image
    return load_image(image, where)


def check_conversation(conversation):
    """Refuse messages the chat templates would render wrong or drop: unknown roles, unknown content types, content
    that is neither a string nor a list of parts, two `user` messages in a row (the templates would glue them).
    Accepts one conversation or a batch; returns it as plain dicts: message objects (`role`/`content` attributes)
    become dicts without their None fields, OpenAI `image_url` parts become `{"type": "image", "url": ...}`."""
    if not isinstance(conversation, (list, tuple)) or not conversation:
        what = "empty" if isinstance(conversation, (list, tuple)) else f"a {type(conversation).__name__}"
        raise ValueError(f"The conversation is {what}; give a list of messages [{{'role': 'user', 'content': ...}}, "
                         "...] (or a list of such lists).")
    batched = isinstance(conversation[0], (list, tuple))
    batch = conversation if batched else [conversation]
    normalised = []
    for sample, messages in enumerate(batch):
        prefix = f"conversation {sample}, " if len(batch) > 1 else ""
        messages = [_as_dict(message) for message in messages]
        previous = None
        for index, message in enumerate(messages):
            where = f"{prefix}message {index}"
            if not isinstance(message, dict):
                raise TypeError(f"{where} is a {type(message).__name__}; expected {{'role': ..., 'content': ...}}.")
            role = message.get("role")
            if role not in ROLES:
                raise ValueError(f"{where} has role {role!r}; AlignGPT's chat template knows only {list(ROLES)}.")
            if role == "system" and index > 0:
                raise ValueError(f"{where} is a `system` message; only the first message may be one.")
            if role == "user" and previous == "user":
                raise ValueError(f"{where} is a second `user` message in a row, which the chat template would glue "
                                 "to the first; merge them into one message or put the assistant's answer between.")
            previous = role
            message["content"] = _check_content(message.get("content"), where)
            if role != "user" and any(isinstance(part, dict) and part.get("type") == "image"
                                      for part in message["content"] if not isinstance(message["content"], str)):
                raise ValueError(f"{where} is a `{role}` message with an image; images go in `user` messages (the "
                                 "assistant's text is what the model learns to write).")
        normalised.append(messages)
    return normalised if batched else normalised[0]


def _as_dict(item):
    """A message or content part given as an object (a dataclass, or anything with attributes) -> a dict without
    None values, as transformers renders message objects; dicts are copied the same way."""
    if not isinstance(item, dict):
        fields = getattr(item, "__dataclass_fields__", None)
        if fields is not None:
            item = {name: getattr(item, name) for name in fields}
        elif hasattr(item, "__dict__") and (hasattr(item, "role") or hasattr(item, "type")):
            item = dict(vars(item))
        else:
            return item
    return {key: value for key, value in item.items() if value is not None}


def _check_content(content, where: str):
    if isinstance(content, str):
        return content
    if not isinstance(content, (list, tuple)):
        raise TypeError(
            f"{where} has content of type {type(content).__name__}; give a string or a list of parts like "
            "[{'type': 'image'}, {'type': 'text', 'text': ...}].")
    parts = []
    for part_index, part in enumerate(content):
        part = _as_dict(part)
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image_url":  # OpenAI style: {"type": "image_url", "image_url": {"url": ...} or "..."}
            url = part.get("image_url")
            part = {"type": "image", "url": url.get("url") if isinstance(url, dict) else url}
            kind = "image"
        if kind not in CONTENT_TYPES:
            raise ValueError(
                f"{where}, content part {part_index} has type {kind!r}; accepted types: {list(CONTENT_TYPES)} and "
                "'image_url' (an image part is {'type': 'image'} plus the image in `images`, or carries it under "
                "'image', 'url', 'path' or 'base64').")
        if kind == "text" and not isinstance(part.get("text"), str):
            raise TypeError(f"{where}, content part {part_index} is a text part whose `text` is not a string.")
        parts.append(part)
    return parts


def call_with_truncation_check(call, processor, images, text, kwargs: dict):
    """Run the processor's tokenization; with truncation, refuse a sample that lost image tokens or `<align>` (left
    truncation cuts BOS/`<align>`, right truncation image tokens), naming it and the length it needs."""
    text_kwargs = kwargs.get("text_kwargs") or {}
    if text is None or not (kwargs.get("truncation") or text_kwargs.get("truncation")):
        return call(images=images, text=text, **kwargs)
    texts = [text] if isinstance(text, str) else list(text)
    try:
        outputs = call(images=images, text=text, **kwargs)
    except ValueError as error:
        if "token count" not in str(error):  # transformers' own check of cut image tokens, without the sample
            raise
        outputs = None
    rows = None if outputs is None else outputs["input_ids"]
    rows = rows.tolist() if hasattr(rows, "tolist") else rows
    cut = None if rows is None else [  # samples whose image tokens or `<align>` did not survive tokenization
        index for index, (row, sample) in enumerate(zip(rows, texts))
        if row.count(processor.image_token_id) != sample.count(processor.image_token) * processor.image_seq_length
        or (processor.image_token in sample and processor.add_alignment_token and processor.alignment_token_id not in row)]
    if cut == []:
        return outputs
    untruncated = {key: value for key, value in kwargs.items() if key not in ("truncation", "max_length")}
    if text_kwargs:
        untruncated["text_kwargs"] = {k: v for k, v in text_kwargs.items() if k not in ("truncation", "max_length")}
    lengths = [len(ids) for ids in call(images=images, text=text, **untruncated)["input_ids"]]
    max_length = kwargs.get("max_length", text_kwargs.get("max_length"))
    index = cut[0] if cut else next(i for i, n in enumerate(lengths) if max_length is None or n > max_length)
    side = getattr(processor.tokenizer, "truncation_side", "right")
    raise ValueError(
        f"Sample {index} needs {lengths[index]} tokens (its image tokens and `<align>` included) but truncating it to "
        f"max_length={max_length} ({side} side) would cut its image placeholders or BOS/`<align>`. Raise "
        "`max_length` or pass `truncation=False`: image and alignment tokens are never cut.")


__all__ = ["call_with_truncation_check", "check_conversation", "check_text", "load_image", "load_images", "to_rgb",
           "upright"]
