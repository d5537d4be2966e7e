# Copyright 2026 The aligngpt-hf authors. Licensed under the Apache License, Version 2.0.
"""AlignGPT processor: LLaVA's, plus one `<align>` after BOS (or first, without BOS) in every sample with an image
(recorded as a text replacement, so assistant-only masks stay aligned), a fixed token count per image, and the language
model's chat format (`chat_templates_aligngpt.py`).
"""

from transformers.image_utils import make_flat_list_of_images
from transformers.models.llava.processing_llava import LlavaProcessor
from transformers.processing_utils import MultiModalData

from .chat_templates_aligngpt import VICUNA_V1_SYSTEM, chat_template, check_turn_end_token, resolve_chat_template
from .image_processing_utils_aligngpt import call_with_truncation_check, check_conversation, check_text, load_images

VICUNA_V1_CHAT_TEMPLATE = chat_template("vicuna_v1")


class AlignGPTProcessor(LlavaProcessor):
    r"""
    Builds AlignGPT inputs: pixel values, `<image>` expanded to `image_seq_length` tokens, `<align>` after BOS.
    transformers' `LlavaProcessor` with a fixed token count per image (it does not depend on the vision patch size
    alone: the abstractor projector gives `num_queries + 1`) and the `<align>` insertion.

    Args:
        image_processor: a stock image processor. For AlignGPT's `pad` mode use `LlavaImageProcessorPil(do_pad=True)`
            (expand to a square of the mean colour, then resize); for `square` mode use `do_pad=False`.
        tokenizer: a tokenizer that knows `image_token` and `alignment_token` as special tokens.
        chat_template (`str`, *optional*): by default the tokenizer's own format, written with `<image>` and
            `{% generation %}` marks: Llama-3, ChatML (Qwen2/2.5/3), Gemma, Mistral-Instruct, Phi-3; a tokenizer
            without a template gets vicuna_v1 (the released models' format); an unknown template is used as given only
            when it has `{% generation %}` marks, else refused. A format name (`"chatml"`, ...) gives that format.
            `<align>` goes after a leading BOS, or first (Qwen).
        image_seq_length (`int`, defaults to 576): placeholder tokens per image (the model's `image_seq_length`).
        image_token (`str`, defaults to `"<image>"`), alignment_token (`str`, defaults to `"<align>"`).
        add_alignment_token (`bool`, defaults to `True`): `False` for `alignment_mode="none"` (plain LLaVA).

    Example:

    ```python
    >>> from PIL import Image
    >>> from transformers import AutoProcessor
    >>> processor = AutoProcessor.from_pretrained("path/to/aligngpt", trust_remote_code=True)  # doctest: +SKIP
    >>> messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    >>> prompt = processor.apply_chat_template(messages, add_generation_prompt=True)  # doctest: +SKIP
    >>> batch = processor(text=[prompt], images=[Image.new("RGB", (64, 48))], return_tensors="pt")  # doctest: +SKIP
    ```
    """

    _auto_class = "AutoProcessor"

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template=None,
        image_seq_length: int = 576,
        image_token: str = "<image>",
        alignment_token: str = "<align>",
        add_alignment_token: bool = True,
        **kwargs,
    ):
        if isinstance(image_seq_length, bool) or not isinstance(image_seq_length, int) or image_seq_length <= 0:
            raise ValueError(f"`image_seq_length` must be a positive integer (the model's tokens per image), got "
                             f"{image_seq_length!r}.")
        self.image_seq_length = image_seq_length
        self.image_token = image_token
        self.alignment_token = alignment_token
        self.add_alignment_token = add_alignment_token
        self.image_token_id = _special_token_id(tokenizer, image_token)
        self.alignment_token_id = _special_token_id(tokenizer, alignment_token)
        chat_template = resolve_chat_template(tokenizer, chat_template)
        check_turn_end_token(tokenizer, chat_template)
        super().__init__(image_processor, tokenizer, chat_template=chat_template, image_token=image_token)

    def __call__(self, images=None, text=None, videos=None, audio=None, **kwargs):
        """Tokenize `text` (str or list) with its `images`: one image, a flat list, or one list per sample, each an
        image object or a path/URL string as `transformers.image_utils.load_image` reads it (the forms
        `LlavaProcessor` takes). Returns a BatchFeature.

        `videos`/`audio` stay in the signature (callers pass them by name, as to any processor) but are refused when
        given: LLaVA's processor drops them silently, which would answer about a video the model never saw.
        """
        for name, value in (("videos", videos), ("audio", audio), ("audios", kwargs.pop("audios", None))):
            if value is not None and not (isinstance(value, (list, tuple)) and len(value) == 0):
                raise ValueError(f"AlignGPT takes images and text only; got non-empty `{name}`.")
        images, text = load_images(images), check_text(text)  # one RGB path for every mode; refuses non-images
        if isinstance(images, (list, tuple)) and len(images) == 0:
            images = None
        if isinstance(text, (list, tuple)) and len(text) == 0:
            raise ValueError("`text` is an empty list; give one string per sample.")
        for source in (kwargs, kwargs.get("text_kwargs") or {}):
            length = source.get("max_length")
            if length is not None and (isinstance(length, bool) or not isinstance(length, int) or length < 1):
                raise ValueError(f"`max_length` must be a positive integer (tokens per sample), got {length!r}.")
        if text is not None and "add_special_tokens" not in kwargs:
            texts = [text] if isinstance(text, str) else text
            bos = getattr(self.tokenizer, "bos_token", None)
            if bos and texts and all(sample.startswith(bos) for sample in texts):
                kwargs["add_special_tokens"] = False  # the chat template already wrote BOS
        return call_with_truncation_check(super().__call__, self, images, text, kwargs)  # image tokens are never cut

    def apply_chat_template(self, conversation, chat_template=None, **kwargs):
        """Refuse roles and content types the template would render wrong or drop, naming the message."""
        conversation = check_conversation(conversation)  # also: message objects and `image_url` parts -> dicts
        return super().apply_chat_template(conversation, chat_template=chat_template, **kwargs)

    def validate_inputs(self, images=None, text=None, videos=None, audio=None, **kwargs):
        """Name the sample whose `<image>` placeholders and images disagree."""
        if text is not None and images is not None and not isinstance(text, str):
            counts = [sample.count(self.image_token) for sample in text]
            nested = isinstance(images, (list, tuple)) and len(images) == len(text) and all(
                isinstance(item, (list, tuple)) for item in images)  # one list per sample, else one flat list
            if nested:
                per_sample = [len(item) for item in images]
                for index, (placeholders, given) in enumerate(zip(counts, per_sample)):
                    if placeholders != given:
                        raise ValueError(
                            f"Sample {index} has {placeholders} `{self.image_token}` placeholder(s) but {given} "
                            f"image(s). Put one `{self.image_token}` in the text per image (the chat template writes "
                            "it for each {'type': 'image'} content part).")
            else:
                total = len(make_flat_list_of_images(images))
                if total != sum(counts):
                    raise ValueError(
                        f"Got {total} image(s) for {sum(counts)} `{self.image_token}` placeholder(s) "
                        f"(per sample: {counts}). Put one `{self.image_token}` in the text per image.")
        super().validate_inputs(images=images, text=text, videos=videos, audio=audio, **kwargs)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        return self.image_token * self.image_seq_length

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs) -> MultiModalData:
        """Placeholder tokens per image, as serving engines ask for them: `image_seq_length` at any input size (the
        image processor resizes every image to the vision tower's size; `<align>` is one text token per sample)."""
        if image_sizes is None:
            return MultiModalData()
        count = len(image_sizes)
        return MultiModalData(num_image_tokens=[self.image_seq_length] * count, num_image_patches=[1] * count)

    def get_text_with_replacements(self, text, images_replacements=(), videos_replacements=(), audio_replacements=()):
        """Expand `<image>`, then insert `<align>` after a leading BOS of each sample with an image.

        The insertion is recorded as a replacement entry (first in the sample's list, later entries shifted), which is
        what `apply_chat_template(return_assistant_tokens_mask=True)` uses to map assistant spans onto tokens.
        """
        had_image = [self.image_token in sample for sample in text] if images_replacements else [False] * len(text)
        text, offsets = super().get_text_with_replacements(
            text, images_replacements, videos_replacements, audio_replacements
        )
        if not self.add_alignment_token:
            return text, offsets
        offsets = list(offsets) if offsets else [[] for _ in text]
        bos = getattr(self.tokenizer, "bos_token", None) or ""
        inserted = self.alignment_token
        for index, sample in enumerate(text):
            at = len(bos) if bos and sample.startswith(bos) else 0
            present = sample[at:].startswith(inserted)  # written by the caller where it belongs: kept
            if inserted in sample[:at] or inserted in sample[at + len(inserted) * present:]:
                raise ValueError(
                    f"Sample {index} holds `{inserted}` inside its text; the processor inserts it after BOS itself. "
                    f"Remove `{inserted}` from the text (user text must not contain the model's special tokens).")
            if not had_image[index] or present:
                continue
            text[index] = sample[:at] + inserted + sample[at:]
            shifted = [dict(e, new_span=(e["new_span"][0] + len(inserted), e["new_span"][1] + len(inserted)))
                       for e in offsets[index]]
            entry = {"type": "alignment", "span": (at, at), "new_span": (at, at + len(inserted)), "text": ""}
            offsets[index] = [dict(entry, replacement=inserted)] + shifted
        return text, offsets


def _special_token_id(tokenizer, token: str) -> int:
    """The id of a token the tokenizer must know as one special token, or a clear error with the fix."""
    if tokenizer is None:
        raise ValueError("AlignGPTProcessor needs a tokenizer.")
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id or token not in tokenizer.get_vocab():
        raise ValueError(
            f"The tokenizer has no `{token}` token. Add it first: "
            f"`tokenizer.add_special_tokens({{'additional_special_tokens': ['<image>', '<align>']}})` and resize the "
            "model's embeddings (`model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)`).")
    return token_id


__all__ = ["AlignGPTProcessor", "VICUNA_V1_CHAT_TEMPLATE", "VICUNA_V1_SYSTEM"]
