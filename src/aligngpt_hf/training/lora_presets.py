"""LoRA for AlignGPT: target presets per language-model family, the LoRA config, and the checks that keep adapters on
the language model (vision tower frozen, projector and gate trained in full, level table frozen).

The projections have different names per family (Phi's `dense`/`fc1`/`fc2`, Phi-3's fused `qkv_proj`/`gate_up_proj`),
and `fc1`/`fc2` are also the names of the gate and of every CLIP/SigLIP MLP. So the presets are regexes anchored on
`language_model.layers.<i>.(self_attn|mlp).`: they can never reach the vision tower, the projector or the gate.
"""

from __future__ import annotations

import re

PROJECTOR = "multi_modal_projector"
VISION_TOWER = "vision_tower"
GATE_MODULES = ("alignment.fc1", "alignment.fc2")
LORA_LM_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
LORA_EXCLUDE = r".*(vision_tower|multi_modal_projector|alignment).*"
LLAMA_STYLE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# text_config.model_type -> the linear layers of one decoder layer (attention + MLP) that LoRA adapts.
LORA_TARGETS_BY_FAMILY = {
    "llama": LLAMA_STYLE,
    "mistral": LLAMA_STYLE,
    "qwen2": LLAMA_STYLE,
    "qwen3": LLAMA_STYLE,
    "gemma": LLAMA_STYLE,
    "gemma2": LLAMA_STYLE,
    "gemma3_text": LLAMA_STYLE,
    "phi": ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"),
    "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
}


def lora_target_regex(names) -> str:
    """PEFT `target_modules` regex (matched with `re.fullmatch` against module names) for these layer names."""
    return rf"(.*\.)?language_model\.layers\.\d+\.(self_attn|mlp)\.({'|'.join(names)})"


def lora_target_modules(text_config) -> str:
    """The preset of the language model's family, from `text_config.model_type`."""
    family = getattr(text_config, "model_type", None)
    if family not in LORA_TARGETS_BY_FAMILY:
        raise ValueError(
            f"No LoRA target preset for the language model family {family!r} (config.text_config.model_type); known: "
            f"{', '.join(sorted(LORA_TARGETS_BY_FAMILY))}. Pass the targets yourself: `lora_target_modules` in the "
            "recipe, or `aligngpt_lora_config(target_modules=...)` with a regex over `language_model.layers.*` names."
        )
    return lora_target_regex(LORA_TARGETS_BY_FAMILY[family])


def aligngpt_lora_config(r: int = 128, lora_alpha: int = 256, lora_dropout: float = 0.05, text_config=None,
                         **kwargs):
    """LoRA on the language model only (never the vision tower), projector and gate trained in full and saved
    alongside the adapter (`modules_to_save`); the level table stays frozen. Defaults follow LLaVA's LoRA recipe.
    Without `target_modules` the adapters go on the attention and MLP projections of the language model's family
    (`training/lora_presets.py`): from `text_config` when given (for plain `peft.get_peft_model`), else the trainer
    fills them in from the model it trains."""
    from peft import LoraConfig

    if text_config is not None:
        kwargs.setdefault("target_modules", lora_target_modules(text_config))
    kwargs.setdefault("modules_to_save", [PROJECTOR, *GATE_MODULES])
    return LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, task_type="CAUSAL_LM", **kwargs)


def prepare_peft_config(peft_config, model, train_projector: bool = True):
    """Keep adapters off the vision tower/projector/gate and save the gate (and, if trained, the projector) with the
    adapter; `train_projector=False` refuses a `modules_to_save` that names the projector."""
    if peft_config.target_modules is None:
        peft_config.target_modules = lora_target_modules(model.config.text_config)
    if getattr(peft_config, "exclude_modules", None) is None and hasattr(peft_config, "exclude_modules"):
        peft_config.exclude_modules = LORA_EXCLUDE
    check_lora_targets(peft_config, model)
    if not train_projector and PROJECTOR in (peft_config.modules_to_save or []):
        raise ValueError(f"`train_projector=False`, but the LoRA config's `modules_to_save` names `{PROJECTOR}`; "
                         "drop it there or set `train_projector=True`.")
    wanted = [PROJECTOR] * train_projector + [name for name in GATE_MODULES if getattr(model.model, "alignment", None) is not None
                            and hasattr(model.model.alignment, name.split(".")[1])]
    saved = list(peft_config.modules_to_save or [])
    peft_config.modules_to_save = saved + [name for name in wanted if name not in saved]
    return peft_config


def check_lora_targets(peft_config, model) -> None:
    """A target regex that reaches no language-model module is named with the field and real module names (PEFT
    says only "No modules were targeted")."""
    target, exclude = peft_config.target_modules, getattr(peft_config, "exclude_modules", None)
    if not isinstance(target, str):
        return
    names = [name for name, _ in model.named_modules() if name]
    hits = [name for name in names if re.fullmatch(target, name)]
    kept = [name for name in hits if not (isinstance(exclude, str) and re.fullmatch(exclude, name))]
    if not kept:
        examples = [name for name in names if re.fullmatch(LORA_LM_TARGETS, name)][:2]
        why = (f"it reaches only {hits[0]} and the like, which are kept free of adapters (vision tower, projector, "
               "gate)" if hits else "it matches no module name (whole names, as `re.fullmatch`)")
        raise ValueError(f"`lora_target_modules` {target!r} targets no language-model module: {why}. Name "
                         f"language-model modules, e.g. {', '.join(examples)} (the default: every linear layer of the "
                         "language model).")


def check_peft_model(model) -> None:
    names = [name for name, _ in model.named_parameters()]
    for module, why in ((VISION_TOWER, "AlignGPT keeps it frozen"), (PROJECTOR, "it trains in full or not at all")):
        hits = [name for name in names if "lora_" in name and f".{module}." in name]
        if hits:
            raise ValueError(
                f"LoRA reached the {module.replace('_', ' ')} ({hits[0]}, ...); {why}. Target language-model "
                f"modules only, e.g. `target_modules={LORA_LM_TARGETS!r}` (see `aligngpt_lora_config`)."
            )
    table = [n for n, p in model.named_parameters() if "level_embeddings" in n and p.requires_grad]
    if table:
        raise ValueError(f"The level table must stay frozen in stage 2, but {table[0]} trains; remove it from "
                         "`modules_to_save` (save `alignment.fc1`/`alignment.fc2` for the gate).")


__all__ = ["LORA_TARGETS_BY_FAMILY", "aligngpt_lora_config", "check_lora_targets", "check_peft_model", "lora_target_modules",
           "lora_target_regex", "prepare_peft_config"]
