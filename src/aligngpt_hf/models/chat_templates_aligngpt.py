# Copyright 2026 The aligngpt-hf authors. Licensed under the Apache License, Version 2.0.
"""Chat formats of the language-model families as jinja templates for AlignGPTProcessor (remote-code file).

Text-only, each renders as the model's own template does. Every one writes `<image>\\n` first in its message per image
part, wraps each answer + its turn end in `{% generation %}` (assistant-only loss reads it), and never writes `<align>`
(the processor inserts it). Qwen3's `<think>` blocks are not written: answers train and prompt without them.
"""

import json
import re

VICUNA_V1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                    "helpful, detailed, and polite answers to the user's questions.")
# family: (BOS?, role header ({role} or per role), user/assistant turn end ("eos": the tokenizer's EOS), text after a
# turn, system ("turn", "fold" into the first user turn, "plain" text), trim?, generation prompt (None: the assistant
# header), text closing a finished conversation)
FORMATS = {
    "vicuna_v1": (True, {"user": "USER: ", "assistant": " ASSISTANT: "}, ("", "eos"), "", "plain", 0, " ASSISTANT:", ""),
    "llama3": (True, "<|start_header_id|>{role}<|end_header_id|>\n\n", ("<|eot_id|>",) * 2, "", "turn", 1, None, ""),
    "chatml": (False, "<|im_start|>{role}\n", ("<|im_end|>",) * 2, "\n", "turn", 0, None, ""),
    "gemma": (True, "<start_of_turn>{role}\n", ("<end_of_turn>",) * 2, "\n", "fold", 1, None, ""),  # assistant: model
    "mistral": (True, {"user": "[INST] ", "assistant": ""}, (" [/INST]", "eos"), "", "fold", 0, "", ""),
    "phi3": (False, "<|{role}|>\n", ("<|end|>",) * 2, "\n", "turn", 0, None, "eos"),
}
MARKERS = (("<|start_header_id|>", "llama3"), ("<|im_start|>", "chatml"), ("<start_of_turn>", "gemma"),
           ("<|user|>", "phi3"), ("[INST]", "mistral"), ("ASSISTANT:", "vicuna_v1"))
CHATML_SYSTEM = re.compile(r"<\|im_start\|>system(?:\\n|\n)([^'\"{}<]+)<\|im_end\|>")


def _text(value: str) -> str:
    return "{{ eos_token }}" if value == "eos" else "{{ " + json.dumps(value) + " }}" if value else ""


def chat_template(family: str, default_system: str | None = None) -> str:
    """The template of `family`; `default_system` is written when no system message leads (Qwen2/2.5, not Qwen3)."""
    bos, head, (user_end, end), after, system, trim, prompt, closing = FORMATS[family]
    roles = {"system": "system", "user": "user", "assistant": "model" if family == "gemma" else "assistant"}
    heads = {role: head.format(role=name) for role, name in roles.items()} if isinstance(head, str) else head
    default_system = VICUNA_V1_SYSTEM if family == "vicuna_v1" and default_system is None else default_system
    strip, when_first = "|trim" * trim, "{%- if loop.first and system is not none -%}"
    out = ("{%- macro render(content) -%}{%- if content is string -%}{{ content" + strip + " }}{%- else -%}"
           "{%- for part in content if part['type'] == 'image' -%}{{ '<image>\\n' }}{%- endfor -%}"
           "{{ content|selectattr('type', 'equalto', 'text')|map(attribute='text')|join" + strip + " }}"
           "{%- endif -%}{%- endmacro -%}" + "{{ bos_token }}" * bos + "{%- set system = none -%}"
           "{%- if messages and messages[0]['role'] == 'system' -%}{%- set system = render(messages[0]['content']) -%}"
           "{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set loop_messages = messages -%}{%- endif -%}")
    if default_system is not None:
        out += "{%- if system is none -%}{%- set system = " + json.dumps(default_system) + " -%}{%- endif -%}"
    if system != "fold":  # a system turn, or vicuna_v1's plain text
        out += "{%- if system is not none -%}" + _text(heads.get("system", "")) + "{{ system }}" + (
            _text(user_end) + _text(after) if system == "turn" else "") + "{%- endif -%}"
    user = _text(heads["user"]) + (when_first + "{{ system + '\\n\\n' }}{%- endif -%}" if system == "fold" else "")
    out += ("{%- for message in loop_messages -%}{%- if message['role'] == 'assistant' -%}" + _text(heads["assistant"])
            + "{% generation %}{{ render(message['content']) }}" + _text(end) + "{% endgeneration %}" + _text(after)
            + "{%- else -%}" + (when_first + "{{ ' ' }}{%- endif -%}" if system == "plain" else "") + user
            + "{{ render(message['content']) }}" + _text(user_end) + _text(after) + "{%- endif -%}{%- endfor -%}"
            + "{%- if add_generation_prompt -%}" + _text(heads["assistant"] if prompt is None else prompt)
            + ("{%- else -%}" + _text(closing)) * bool(closing) + "{%- endif -%}")
    return out


def template_family(template) -> str | None:
    """The family whose markers `template` carries, or None (look-alikes: Llama-2's `<<SYS>>`, Phi-4's `<|im_sep|>`)."""
    known = isinstance(template, str) and not any(mark in template for mark in ("<<SYS>>", "<|im_sep|>"))
    return next((family for marker, family in MARKERS if marker in template), None) if known else None


def template_for_tokenizer(tokenizer) -> str:
    """Our template for the tokenizer's own format; vicuna_v1 without one; an unknown one only with generation marks."""
    own = getattr(tokenizer, "chat_template", None)
    own = own.get("default") if isinstance(own, dict) else own
    family = template_family(own) if own else "vicuna_v1"
    if family is not None:
        return chat_template(family, next(iter(CHATML_SYSTEM.findall(own)), None) if family == "chatml" else None)
    if re.search(r"{%-?\s*generation\s*-?%}", own):
        return own
    raise ValueError(
        "The tokenizer's chat template is in no format AlignGPTProcessor knows and has no `{% generation %}` block, so "
        "the answers to train on cannot be found. Pass AlignGPTProcessor `chat_template=chat_template(family)` from "
        f"chat_templates_aligngpt ({', '.join(FORMATS)}) or a template with each answer + its end in `{{% generation %}}`.")


def resolve_chat_template(tokenizer, template):
    """None: our template for the tokenizer's format; a family name ("chatml", ...): that family's template; anything
    else must be a Jinja template (a typo would otherwise render as literal text for every conversation)."""
    if template is None:
        return template_for_tokenizer(tokenizer)
    if isinstance(template, str) and template in FORMATS:
        return chat_template(template)
    if isinstance(template, str) and "{{" not in template and "{%" not in template:
        raise ValueError(f"`chat_template` {template[:60]!r} is neither a Jinja template nor a format name "
                         f"({', '.join(FORMATS)}).")
    return template


def turn_end(template) -> str:
    """The text ending an answer in `template`'s format (`<|eot_id|>`, ...), "eos" for EOS or an unknown format."""
    family = template_family(template)
    return FORMATS[family][2][1] if family is not None else "eos"


def check_turn_end_token(tokenizer, template) -> None:
    """Refuse a known format whose turn-end token the tokenizer lacks: it would be split into plain text pieces, so
    answers would never end on one id and generation would not stop at the turn end."""
    end = turn_end(template)
    if end != "eos" and tokenizer is not None and end not in tokenizer.get_vocab():
        raise ValueError(
            f"The chat template is in the {template_family(template)} format, which ends each turn with {end}, but the tokenizer has no "
            f"such token. Use the language model's own tokenizer, add it (`tokenizer.add_special_tokens("
            f"{{'additional_special_tokens': [{end!r}]}})`), or pass a `chat_template` in the tokenizer's format.")


def stop_token_ids(tokenizer, template, eos_token_id=None) -> list[int]:
    """`eos_token_id` (an id or list; the tokenizer's EOS when None) plus the id ending an answer in `template`'s
    family where that is not EOS (`<|eot_id|>`, `<|im_end|>`, `<end_of_turn>`, `<|end|>`): generation stops on both."""
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [tokenizer.eos_token_id])
    end = turn_end(template)
    return list(dict.fromkeys(i for i in [*ids, tokenizer.get_vocab().get(end) if end != "eos" else None] if i is not None))

