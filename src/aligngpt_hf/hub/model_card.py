"""The model card (README.md) written by `aligngpt-hf push`: Hub metadata, a runnable usage snippet, how it works.

The usage snippets are plain ```python blocks that load by repo id with `trust_remote_code=True`; the test suite runs
each of them against a local folder (the repo id replaced by the path), so what users paste is known to work.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from huggingface_hub import ModelCardData

ARXIV_ID = "2405.14129"
DEFAULT_BASE_MODELS = ("lmsys/vicuna-7b-v1.5", "openai/clip-vit-large-patch14-336")
DEFAULT_DATASETS = ("liuhaotian/LLaVA-Pretrain", "liuhaotian/LLaVA-Instruct-150K")
DEFAULT_LICENSE = "llama2"
CARD_TAGS = ("aligngpt", "llava", "vision-language", "multimodal", "custom_code", f"arxiv:{ARXIV_ID}")

# AlignGPT paper (arXiv 2405.14129 v2), Table 1: original checkpoints, vicuna_v1 prompt, greedy, batch size 1.
PAPER_RESULTS = (
    ("Benchmark", "AlignGPT-7B", "AlignGPT-13B", "LLaVA-1.5-7B", "LLaVA-1.5-13B"),
    ("VQAv2 (test-dev)", "79.1", "80.0", "78.5", "80.0"),
    ("GQA", "62.9", "63.6", "62.0", "63.3"),
    ("VizWiz", "54.2", "56.4", "50.0", "53.6"),
    ("ScienceQA-IMG", "68.5", "70.3", "66.8", "71.6"),
    ("TextVQA", "58.4", "60.2", "58.2", "61.3"),
    ("POPE", "86.0", "86.2", "85.9", "85.9"),
    ("MME (perception)", "1527.4", "1572.0", "1510.7", "1531.3"),
    ("MMBench (dev)", "67.3", "69.5", "64.3", "67.7"),
    ("MMBench-CN (dev)", "59.9", "63.7", "58.3", "63.6"),
    ("SEED-Bench (image)", "66.5", "67.8", "66.2", "68.2"),
    ("LLaVA-Bench (in the wild)", "68.4", "75.2", "63.4", "70.7"),
    ("MM-Vet", "30.8", "35.6", "30.5", "35.4"),
)


def base_models_from_config(config) -> list[str]:
    """Hub ids the sub-configs were loaded from (`_name_or_path`), skipping local paths; empty when unknown."""
    found = []
    for sub in (getattr(config, "text_config", None), getattr(config, "vision_config", None)):
        name = str(getattr(sub, "_name_or_path", "") or "")
        if name.count("/") == 1 and not name.startswith((".", "/", "~")) and not os.path.exists(name):
            found.append(name)
    return found


def card_metadata(base_models: Sequence[str], datasets: Sequence[str], license: str) -> str:
    """YAML front matter the Hub indexes: library, task, base models, data, licence, paper."""
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        license=license,
        base_model=list(base_models),
        datasets=list(datasets),
        language=["en"],
        tags=list(CARD_TAGS),
    )
    return f"---\n{data.to_yaml()}\n---\n"


def _details_table(config, num_parameters: int | None) -> str:
    vision, text = config.vision_config, config.text_config
    rows = [
        ("Vision tower", f"`{vision.model_type}`, {vision.image_size} px, patch {vision.patch_size}, "
         f"feature layer {config.vision_feature_layer}, strategy `{config.vision_feature_select_strategy}`"),
        ("Image tokens per image", str(config.image_seq_length)),
        ("Projector", f"`{config.projector_type}`"),
        ("Language model", f"`{text.model_type}`, hidden {text.hidden_size}, {text.num_hidden_layers} layers, "
         f"vocabulary {text.vocab_size}"),
        ("Alignment levels N", f"{config.num_alignment_levels} (row {config.num_alignment_levels - 1} = global)"),
        ("Alignment mode", f"`{config.alignment_mode}`"),
        ("Gate", f"{config.image_seq_length} -> {config.gate_hidden_size} -> GELU -> "
         f"{config.num_alignment_levels - 1}, softmax"),
        ("Special tokens", f"`<image>` = {config.image_token_id}, `<align>` = {config.alignment_token_id}"),
    ]
    if num_parameters:
        rows.append(("Parameters", f"{num_parameters:,}"))
    return "| | |\n|---|---|\n" + "\n".join(f"| {key} | {value} |" for key, value in rows)


def _results_table() -> str:
    header, *body = PAPER_RESULTS
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def usage_section(repo_id: str, config) -> str:
    """Runnable snippets: chat generation with the gate weights, the fixed-level mode, and the pipeline."""
    last = config.num_alignment_levels - 1
    return f'''## Usage

Needs `transformers>=5.23`, `torch` and `pillow`; the model code ships in this repository (`trust_remote_code=True`).

```python
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

repo_id = "{repo_id}"
processor = AutoProcessor.from_pretrained(repo_id, trust_remote_code=True)
model = AutoModelForImageTextToText.from_pretrained(repo_id, trust_remote_code=True, dtype="auto").eval()

image = Image.new("RGB", (640, 480), (200, 30, 30))  # or Image.open("photo.jpg")
messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "What colour is it?"}}]}}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(text=[prompt], images=[image], return_tensors="pt").to(model.device)

output = model.generate(**inputs, max_new_tokens=32, do_sample=False)
print(processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0])

# How strongly this instruction leans on each local alignment level (the gate's softmax, one row per sample):
with torch.no_grad():
    weights = model(**inputs).alignment_weights
print(weights)  # shape [1, {last}]; the global level {last} is always added with weight 1

# Fixed-level mode (paper Fig. 7): use one row of the level table instead of the gate.
output = model.generate(**inputs, alignment_levels=torch.tensor([{last}]), max_new_tokens=32, do_sample=False)
```

With the `pipeline` API (chat-format input):

```python
from PIL import Image
from transformers import pipeline

pipe = pipeline("image-text-to-text", model="{repo_id}", trust_remote_code=True)
chat = [{{"role": "user", "content": [{{"type": "image", "image": Image.new("RGB", (64, 64), "white")}},
                                    {{"type": "text", "text": "Describe the image."}}]}}]
print(pipe(text=chat, max_new_tokens=32, return_full_text=False)[0]["generated_text"])
```

Evaluation with [lmms-eval](https://github.com/EvolvingLMMs-Lab/lmms-eval)'s generic wrapper (no plugin needed):

```bash
lmms-eval --model huggingface --model_args pretrained={repo_id},trust_remote_code=True --tasks pope --batch_size 1
```

Plot the gate's weights for your own prompts (`pip install matplotlib`):

```bash
aligngpt-hf inspect {repo_id} --image photo.jpg --prompt "What colour is it?" --prompt "Describe it." --out gate.png
```
'''


HOW_IT_WORKS = """## How the alignment levels and the gate work

AlignGPT is LLaVA-1.5 (CLIP vision tower -> 2-layer MLP projector -> Vicuna) plus one *alignment token* right
after BOS. Its vector comes from a learned table E of N alignment levels:

* **Pre-training (stage 1)** scores every image-caption pair with CLIP, buckets the scores into N levels and feeds the
  pair's level as the token (`E[level]`), so each row learns how much to trust the caption for that image. The top row
  E[N-1] is the strongest, *global* alignment.
* **Instruction tuning and inference (stage 2)** have no level. A gate looks at the instruction and the image: the mean
  input word embedding of the prompt is dotted with each projected image token, and a small MLP turns those
  `image_seq_length` numbers into softmax weights α over the N-1 *local* levels. The token becomes
  `E[N-1] + Σ_k α_k E[k]`: global alignment always, plus the local mixture the instruction asks for. Different
  instructions on the same image get different α — that is the paper's claim, and `model(...).alignment_weights`
  (or `aligngpt-hf inspect`) shows it.
* Text-only prompts get no alignment token.

### Modes

| `alignment_mode` | alignment vector | note |
|---|---|---|
| `adaptive` (default) | `E[N-1] + Σ α_k E[k]` | paper's full model |
| `local` | `Σ α_k E[k]` | ablation (Table 4a) |
| `global` | `E[N-1]` | ablation (Table 4b); gate weights unused |
| `mean` | `E[N-1] + mean(E[:N-1])` | ablation (Table 4c); gate weights unused |
| `none` | no token | plain LLaVA; build the processor with `add_alignment_token=False` |

Switch at load time, e.g. `from_pretrained(repo_id, trust_remote_code=True, alignment_mode="global")` (loading
reports the unused gate weights). Independently of the mode, passing `alignment_levels=torch.tensor([k])` to
`forward`/`generate` uses the raw row `E[k]` (the "fixed level" inference mode).
"""

LICENCE_NOTES = """## Licence notes

* The language model derives from **Vicuna v1.5**, a fine-tune of **LLaMA 2**: use is governed by the
  [Llama 2 Community License](https://ai.meta.com/llama/license/) and Vicuna's terms (including the OpenAI terms of use
  for the ShareGPT-derived training data). The vision tower is OpenAI CLIP (MIT).
* The training data (LLaVA-Pretrain, LLaVA-Instruct / LLaVA-1.5 mix) is released for **research use** under
  **CC BY-NC 4.0** and the terms of its sources (LAION/CC/SBU, COCO, GPT-4-generated text): non-commercial use only.
* The `*.py` files in this repository are the aligngpt-hf model code (Apache-2.0).
"""

LIMITATIONS = """## Known limitations

* **Remote code**: loading needs `trust_remote_code=True` for the config, model, processor *and* tokenizer (pass the
  flag to every loader, or batch jobs stop at an interactive prompt).
* `AutoModel` in this repository's `auto_map` returns the generation-capable class (what lmms-eval's generic
  `huggingface` wrapper needs); the bare backbone is `model.model`.
* One image per prompt is what the model was trained on; several images are accepted (the gate averages them) but
  untested for quality. Video and audio inputs are rejected.
* The gate's input width is `image_seq_length`: changing the vision resolution or feature strategy needs retraining.
* The gate uses raw (unnormalised) dot products; in float16 check for overflow with very long prompts.
* Scores move with prompt template, batch size and padding (the paper used `vicuna_v1`, greedy decoding, batch size 1);
  lmms-eval's generic wrapper has no log-likelihood scoring, so perplexity-style tasks need a dedicated plugin.
* The original training averaged answer tokens into the gate's text too; checkpoints trained with
  `gate_text_scope="all"` see slightly different text at training than at inference.
"""


CITATION = """## Citation

```bibtex
@article{zhao2024aligngpt,
  title={AlignGPT: Multi-modal Large Language Models with Adaptive Alignment Capability},
  author={Zhao, Fei and Pang, Taotian and Li, Chunhui and Wu, Zhen and Guo, Junjie and Xing, Shangyu and Dai, Xinyu},
  journal={arXiv preprint arXiv:2405.14129},
  year={2024}
}
```
"""


def render_model_card(
    repo_id: str,
    config,
    *,
    base_models: Sequence[str],
    datasets: Sequence[str],
    license: str,
    num_parameters: int | None = None,
) -> str:
    """The full README.md: metadata, summary, usage, mechanism, modes, paper results, licence, limitations."""
    name = repo_id.split("/")[-1]
    sections = [
        card_metadata(base_models, datasets, license),
        f"# {name}\n",
        f"[AlignGPT](https://arxiv.org/abs/{ARXIV_ID}) (*Multi-modal Large Language Models with Adaptive Alignment "
        "Capability*, Zhao et al.; original code [AlignGPT-VL/AlignGPT](https://github.com/AlignGPT-VL/AlignGPT)) "
        "in the Hugging Face-native layout of `aligngpt-hf`: a LLaVA-1.5-style vision-language model with a learned "
        "table of image-text *alignment levels* and a gate that picks, per instruction, how much of each level to "
        "use.\n",
        "## Model details\n\n" + _details_table(config, num_parameters) + "\n",
        usage_section(repo_id, config),
        HOW_IT_WORKS,
        "## Results reported in the paper\n\nFrom the paper (v2, Table 1) for the original AlignGPT checkpoints; they "
        "are not a measurement of this repository's weights.\n\n" + _results_table() + "\n",
        LICENCE_NOTES,
        LIMITATIONS,
        CITATION,
    ]
    return "\n".join(sections)


__all__ = [
    "DEFAULT_BASE_MODELS",
    "DEFAULT_DATASETS",
    "DEFAULT_LICENSE",
    "base_models_from_config",
    "card_metadata",
    "render_model_card",
]
