"""Peak RSS and time of `aligngpt-hf convert` on a synthetic original-layout checkpoint of a few hundred MB.

The input mimics the released `nlpzhaof/aligngpt-7b` layout at a smaller width: bf16 `torch.save` shards
(`pytorch_model-0000x-of-00002.bin` + `pytorch_model.bin.index.json`, original key names, rotary `inv_freq`
buffers, an embedded CLIP copy) plus a `vision_tower/` folder named by `mm_vision_tower`. The pickles are the
*input format being simulated*; they live in a temporary folder that is deleted afterwards (nothing is committed).

Each conversion runs in a fresh process; its peak RSS comes from `os.wait4` (ru_maxrss), and the RSS of a process
that only imports the converter is reported as the baseline. Run:

    python modeling_tests/benchmarks/bench_convert.py [--layers 8] [--hidden 1024] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

SEVEN_B_BYTES = 14.13e9  # the two released bf16 shards of nlpzhaof/aligngpt-7b (9.98 GB + 4.15 GB)
SEVEN_B_LARGEST_SHARD = 9.98e9


def build_original(folder: Path, layers: int, hidden: int, vocab: int = 32000, vision_hidden: int = 512) -> int:
    """Write a bf16 original-layout AlignGPT checkpoint; returns its tensor bytes."""
    torch.manual_seed(0)
    folder.mkdir(parents=True)
    inter, k, levels = int(hidden * 2.6875), 576, 8
    vision = CLIPVisionModel(CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=4 * vision_hidden,
                                              num_hidden_layers=layers, num_attention_heads=8, image_size=336,
                                              patch_size=14)).to(torch.bfloat16)
    vision.save_pretrained(folder / "vision_tower")
    state = {"model.embed_tokens.weight": torch.randn(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            state[p + f"self_attn.{name}.weight"] = torch.randn(hidden, hidden) * 0.02
        state[p + "self_attn.rotary_emb.inv_freq"] = torch.rand(hidden // 32)
        state[p + "mlp.gate_proj.weight"] = torch.randn(inter, hidden) * 0.02
        state[p + "mlp.up_proj.weight"] = torch.randn(inter, hidden) * 0.02
        state[p + "mlp.down_proj.weight"] = torch.randn(hidden, inter) * 0.02
        state[p + "input_layernorm.weight"] = torch.ones(hidden)
        state[p + "post_attention_layernorm.weight"] = torch.ones(hidden)
    state["model.norm.weight"] = torch.ones(hidden)
    state["lm_head.weight"] = torch.randn(vocab, hidden) * 0.02
    state.update({f"vision_tower.vision_tower.vision_model.{k_}": v for k_, v in vision.state_dict().items()})
    state.update({"mm_projector.0.weight": torch.randn(hidden, vision_hidden), "mm_projector.0.bias": torch.zeros(hidden),
                  "mm_projector.2.weight": torch.randn(hidden, hidden), "mm_projector.2.bias": torch.zeros(hidden),
                  "align_indicators.indicator_embs": torch.randn(levels, hidden),
                  "gated_weight_layer.mlp.0.weight": torch.randn(256, k), "gated_weight_layer.mlp.0.bias": torch.zeros(256),
                  "gated_weight_layer.mlp.2.weight": torch.randn(levels - 1, 256),
                  "gated_weight_layer.mlp.2.bias": torch.zeros(levels - 1)})
    state = {key: value.to(torch.bfloat16).contiguous() for key, value in state.items()}
    keys = list(state)
    halves = [keys[: int(len(keys) * 0.7)], keys[int(len(keys) * 0.7):]]  # 70/30 like the released 9.98/4.15 GB
    weight_map = {}
    for i, part in enumerate(halves):
        name = f"pytorch_model-{i + 1:05d}-of-00002.bin"
        torch.save({key: state[key] for key in part}, folder / name)
        weight_map.update(dict.fromkeys(part, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(_original_config(layers, hidden, inter, vocab, vision_hidden)))
    return total


def _original_config(layers, hidden, inter, vocab, vision_hidden) -> dict:
    return {"architectures": ["AlignGPTForCausalLM"], "model_type": "aligngpt", "bos_token_id": 1, "eos_token_id": 2,
            "pad_token_id": 0, "hidden_act": "silu", "hidden_size": hidden, "intermediate_size": inter,
            "num_hidden_layers": layers, "num_attention_heads": hidden // 128, "num_key_value_heads": hidden // 128,
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "vocab_size": vocab, "tie_word_embeddings": False,
            "image_aspect_ratio": "pad", "mm_hidden_size": vision_hidden, "mm_projector_type": "mlp2x_gelu",
            "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "mm_vision_tower": "vision_tower",
            "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "torch_dtype": "bfloat16",
            "tokenizer_model_max_length": 2048, "tokenizer_padding_side": "right"}


CHILD = """
import json, sys, time
def hwm():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(fields["VmHWM"].split()[0]) / 1024
from aligngpt_hf.cli import main
imported = hwm()
start = time.perf_counter()
code = main(sys.argv[1:]) if len(sys.argv) > 1 else 0
print(json.dumps({"code": code, "seconds": time.perf_counter() - start, "imported_mb": imported, "peak_mb": hwm()}))
"""


def measured(argv: list[str]) -> dict:
    """Run the CLI in a fresh interpreter; VmHWM (peak RSS of that process image, reset at exec) and time."""
    result = subprocess.run([sys.executable, "-c", CHILD, *argv], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{argv} failed:\n{result.stderr[-2000:]}")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    if report["code"] != 0:
        raise SystemExit(f"{argv} exited with {report['code']}:\n{result.stderr[-2000:]}")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--keep", type=Path, help="keep the synthetic checkpoint and outputs here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root = args.keep or Path(scratch)
        source = root / "original"
        total = build_original(source, args.layers, args.hidden)
        print(f"synthetic original checkpoint: {total / 1e6:.0f} MB bf16 in 2 pickle shards "
              f"(largest {max(p.stat().st_size for p in source.glob('*.bin')) / 1e6:.0f} MB)")
        rows = []
        for shard in ("100MB", "5GB"):
            out = root / f"converted-{shard}"
            r = measured(["convert", str(source), str(out), "--max-shard-size", shard, "--no-progress", "--overwrite"])
            largest = max(p.stat().st_size for p in out.glob("*.safetensors"))
            extra = r["peak_mb"] - r["imported_mb"]
            rows.append((shard, r["peak_mb"], extra, r["seconds"], largest))
            print(f"--max-shard-size {shard}: peak RSS {r['peak_mb']:.0f} MB = {r['imported_mb']:.0f} MB after imports "
                  f"+ {extra:.0f} MB converting ({extra * 1e6 / total:.2f}x the checkpoint); conversion "
                  f"{r['seconds']:.1f} s ({total / 1e6 / r['seconds']:.0f} MB/s) excluding imports; largest output shard "
                  f"{largest / 1e6:.0f} MB")
        baseline = rows[-1][1] - rows[-1][2]
        _extrapolate(rows, total, baseline, 2 * 32064 * args.hidden * 2)


def _extrapolate(rows, total: float, baseline: float, vocab_copies: float) -> None:
    """Model: peak ~ imports + one output shard of mmap pages + the two padded vocabulary copies."""
    for shard, _, extra, _seconds, largest in rows:
        print(f"  {shard}: converting memory {extra:.0f} MB vs model {(largest + vocab_copies) / 1e6:.0f} MB "
              f"(largest shard {largest / 1e6:.0f} MB + padded embed/lm_head copies {vocab_copies / 1e6:.0f} MB)")
    rate = total / rows[-1][3]
    copies_7b = 2 * 32064 * 4096 * 2
    for shard_7b in (5e9, 1e9):
        peak = baseline * 1e6 + shard_7b + copies_7b
        print(f"7B extrapolation, --max-shard-size {shard_7b / 1e9:.0f}GB: peak RSS ~ {peak / 1e9:.1f} GB (one copy of "
              f"the weights = {SEVEN_B_BYTES / 1e9:.1f} GB)")
    print(f"7B extrapolation, time: ~{SEVEN_B_BYTES / rate / 60:.1f} min at the measured {rate / 1e6:.0f} MB/s "
          "(bound by disk reads/writes) + ~7 s of imports")


if __name__ == "__main__":
    main()
