"""`aligngpt-hf convert`: parity with the original implementation's golden outputs, round trips, and refusals."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, PreTrainedTokenizerFast

from aligngpt_hf import AlignGPTConfig, AlignGPTForConditionalGeneration, convert_checkpoint
from aligngpt_hf.cli import main as cli_main
from aligngpt_hf.conversion.convert import is_stage1_artefact, load_stage1_artefact
from aligngpt_hf.conversion.mapping import ConversionError
from conftest import ORIGINAL_FIXTURES, package_free_env

ORIGINAL = ORIGINAL_FIXTURES / "original_checkpoint"
PRETRAIN = ORIGINAL_FIXTURES / "pretrain_projector"
VOCAB, IMAGE_ID, ALIGN_ID, PADDED, K = 300, 300, 301, 320, 4
ATOL = 1e-5
FINETUNE_CASES = ("finetune_mixed", "finetune_mixed_truncation", "finetune_text_only")


@pytest.fixture(scope="module")
def cases():
    return json.loads((ORIGINAL_FIXTURES / "cases.json").read_text())["cases"], load_file(
        ORIGINAL_FIXTURES / "cases.safetensors"
    )


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The tiny original checkpoint converted with the real command (no tokenizer in SOURCE)."""
    out = tmp_path_factory.mktemp("convert") / "tiny-aligngpt"
    assert cli_main(["convert", str(ORIGINAL), str(out), "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def model(converted):
    return AutoModelForImageTextToText.from_pretrained(converted).eval()


def original_state(path=ORIGINAL / "pytorch_model.bin"):
    return torch.load(path, map_location="cpu", weights_only=True)


def expand(input_ids, attention_mask, labels=None):
    """Original batch (-200 sentinel, right padding) -> our ids: K `<image>` per -200, `<align>` after BOS."""
    rows, label_rows = [], []
    for r in range(input_ids.shape[0]):
        n = int(attention_mask[r].sum())
        ids = input_ids[r, :n].tolist()
        lab = labels[r, :n].tolist() if labels is not None else [-100] * n
        if -200 in ids:
            p = ids.index(-200)
            ids = [ids[0], ALIGN_ID] + ids[1:p] + [IMAGE_ID] * K + ids[p + 1:]
            lab = [lab[0], -100] + lab[1:p] + [-100] * K + lab[p + 1:]
        rows.append(ids)
        label_rows.append(lab)
    width = max(map(len, rows))
    out_ids = torch.zeros(len(rows), width, dtype=torch.long)
    out_mask, out_labels = torch.zeros_like(out_ids), torch.full_like(out_ids, -100)
    for r, (ids, lab) in enumerate(zip(rows, label_rows)):
        out_ids[r, : len(ids)], out_mask[r, : len(ids)], out_labels[r, : len(lab)] = (
            torch.tensor(ids), 1, torch.tensor(lab))
    return out_ids, out_mask, (out_labels if labels is not None else None)


def run_case(model, case, tensors, name, gate_scope="all"):
    """Run one fixture case through our model; returns (output, captured LLM inputs_embeds)."""
    ids, mask, labels = expand(tensors[f"{name}/input_ids"], tensors[f"{name}/attention_mask"],
                               tensors.get(f"{name}/labels"))
    has_image = (ids == IMAGE_ID).any(-1)
    pixels = tensors[f"{name}/images"][has_image] if has_image.any() else None
    levels = tensors.get(f"{name}/align_ids")
    captured = {}

    def capture(module, args, kwargs):
        captured["embeds"] = kwargs["inputs_embeds"]

    hook = model.model.language_model.register_forward_pre_hook(capture, with_kwargs=True)
    model.config.gate_text_scope = gate_scope  # the original training gate averaged answers too
    try:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels,
                        alignment_levels=levels)
    finally:
        hook.remove()
        model.config.gate_text_scope = "prompt"
    return out, captured["embeds"]


def compare_rows(case, tensors, name, out, embeds, skip_text_rows=False):
    """Max abs differences on valid positions of each output row (mapped back to our input row order)."""
    diffs = {"logits": 0.0, "embeds": 0.0}
    for i, layout in enumerate(case["layout"]):
        if skip_text_rows and layout["kind"] == "text-only":
            continue
        r, n = case["output_row_to_input_row"][i], layout["valid_final_len"]
        ours = out.logits[r, :n, :VOCAB]
        diffs["logits"] = max(diffs["logits"], (ours - tensors[f"{name}/logits"][i, :n]).abs().max().item())
        diffs["embeds"] = max(diffs["embeds"], (embeds[r, :n] - tensors[f"{name}/llm_inputs_embeds"][i, :n]).abs().max().item())
    return diffs


def original_vocab_loss(logits, labels):
    """HF causal-LM loss over the original vocabulary columns, as the original model computed it.

    The model's own loss also normalises over the 20 padded rows (mean-initialised, suppressed at generation), which
    shifts it by about 0.047 on this 300-token vocabulary (about 64/32000 of that on the 7B).
    """
    shifted = logits[:, :-1, :VOCAB].reshape(-1, VOCAB)
    return torch.nn.functional.cross_entropy(shifted, labels[:, 1:].reshape(-1), ignore_index=-100)


def image_rows(case):
    return [case["output_row_to_input_row"][i] for i, lay in enumerate(case["layout"]) if lay["kind"] != "text-only"]


# ---------------------------------------------------------------------------------------------------------------------
# Weights, config, side files


def test_every_tensor_is_bit_identical_and_new_rows_are_extra(converted):
    state = original_state()
    ours = load_file(converted / "model.safetensors")
    vision = torch.load(ORIGINAL / "vision_tower" / "pytorch_model.bin", weights_only=True)
    for key, value in state.items():
        if key.endswith("rotary_emb.inv_freq"):
            continue
        target = (key.replace("vision_tower.vision_tower.vision_model.", "model.vision_tower.")
                  .replace("mm_projector.0.", "model.multi_modal_projector.linear_1.")
                  .replace("mm_projector.2.", "model.multi_modal_projector.linear_2.")
                  .replace("align_indicators.indicator_embs", "model.alignment.level_embeddings")
                  .replace("gated_weight_layer.mlp.0.", "model.alignment.fc1.")
                  .replace("gated_weight_layer.mlp.2.", "model.alignment.fc2."))
        target = "model.language_model." + target[len("model."):] if key.startswith("model.") else target
        got = ours.pop(target)
        if key in ("model.embed_tokens.weight", "lm_head.weight"):
            assert got.shape == (PADDED, 64) and torch.equal(got[:VOCAB], value)
            assert torch.equal(got[VOCAB:], value.mean(0).expand(PADDED - VOCAB, -1))
        else:
            assert torch.equal(got, value), key
        if key.startswith("vision_tower."):
            assert torch.equal(got, vision[key[len("vision_tower.vision_tower."):]])
    assert ours == {}


def test_config_generation_config_and_files(converted, model):
    files = set(os.listdir(converted))
    assert {"config.json", "model.safetensors", "generation_config.json", "configuration_aligngpt.py",
            "modeling_aligngpt.py", "processing_aligngpt.py", "preprocessor_config.json"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    config = json.loads((converted / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_aligngpt.AlignGPTForConditionalGeneration"
    assert config["auto_map"]["AutoProcessor"] == "processing_aligngpt.AlignGPTProcessor"
    assert (config["image_token_id"], config["alignment_token_id"], config["image_seq_length"]) == (300, 301, K)
    assert config["text_config"]["vocab_size"] == PADDED and config["num_alignment_levels"] == 8
    assert config["gate_hidden_size"] == 256 and config["vision_feature_layer"] == -2
    assert not any(key.startswith("mm_") for key in config)
    generation = model.generation_config
    assert (generation.eos_token_id, generation.pad_token_id, generation.bos_token_id) == (2, 0, 1)
    assert generation.suppress_tokens == list(range(VOCAB, PADDED))
    preprocessor = json.loads((converted / "preprocessor_config.json").read_text())
    assert preprocessor["do_pad"] is True and preprocessor["crop_size"] == {"height": 28, "width": 28}


# ---------------------------------------------------------------------------------------------------------------------
# Parity with the original code's golden outputs


def test_inference_parity(model, cases):
    meta, tensors = cases
    case = meta["inference_batch2"]
    out, embeds = run_case(model, case, tensors, "inference_batch2")
    diffs = compare_rows(case, tensors, "inference_batch2", out, embeds)
    assert diffs["logits"] < ATOL and diffs["embeds"] < 1e-6, diffs
    assert torch.allclose(out.alignment_weights, tensors["inference_batch2/gate_scores"], atol=ATOL, rtol=0)
    assert torch.allclose(embeds[:, 1], tensors["inference_batch2/indicator_vectors"], atol=ATOL, rtol=0)


def test_pretrain_parity_with_levels(model, cases):
    meta, tensors = cases
    case = meta["pretrain_batch2"]
    out, embeds = run_case(model, case, tensors, "pretrain_batch2")
    diffs = compare_rows(case, tensors, "pretrain_batch2", out, embeds)
    assert diffs["logits"] < ATOL and diffs["embeds"] < 1e-6, diffs
    labels = expand(tensors["pretrain_batch2/input_ids"], tensors["pretrain_batch2/attention_mask"],
                    tensors["pretrain_batch2/labels"])[2]
    assert abs(original_vocab_loss(out.logits, labels).item() - case["expected"]["loss"]) < ATOL
    assert torch.equal(embeds[:, 1], tensors["pretrain_batch2/indicator_vectors"])
    assert out.alignment_weights is None


@pytest.mark.parametrize("name", FINETUNE_CASES)
def test_finetune_parity(model, cases, name):
    meta, tensors = cases
    case = meta[name]
    out, embeds = run_case(model, case, tensors, name)
    truncated = name == "finetune_mixed_truncation"
    diffs = compare_rows(case, tensors, name, out, embeds, skip_text_rows=truncated)
    assert diffs["logits"] < ATOL and diffs["embeds"] < 1e-6, diffs
    expected_loss = case["expected"]["derived_loss_if_text_only_sample_were_not_truncated" if truncated else "loss"]
    labels = expand(tensors[f"{name}/input_ids"], tensors[f"{name}/attention_mask"], tensors[f"{name}/labels"])[2]
    assert abs(original_vocab_loss(out.logits, labels).item() - expected_loss) < ATOL
    rows = image_rows(case)
    if rows:
        assert torch.allclose(out.alignment_weights[rows], tensors[f"{name}/gate_scores"], atol=ATOL, rtol=0)
        assert torch.allclose(embeds[rows, 1], tensors[f"{name}/indicator_vectors"], atol=ATOL, rtol=0)


def test_greedy_generation_parity(model, cases):
    meta, tensors = cases
    case = meta["generate_greedy"]
    ids, mask, _ = expand(tensors["generate_greedy/input_ids"], tensors["generate_greedy/attention_mask"])
    out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=tensors["generate_greedy/images"],
                         do_sample=False, max_new_tokens=5, output_scores=True, return_dict_in_generate=True)
    assert out.sequences[0, ids.shape[1]:].tolist() == case["expected"]["new_token_ids"] == [174, 45, 124, 17, 32]
    scores = torch.cat([step[:, :VOCAB] for step in out.scores])
    assert torch.allclose(scores, tensors["generate_greedy/step_scores"], atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------------------------------
# Stage-1 artefact, tokenizer/processor, remote code, push


def test_pretrain_projector_converts_to_stage1_artefact(tmp_path, converted):
    out = tmp_path / "stage1"
    result = convert_checkpoint(PRETRAIN, out, vision_tower=ORIGINAL / "vision_tower", progress=False)
    assert result.kind == "pretrain" and is_stage1_artefact(out) and not is_stage1_artefact(converted)
    assert not (out / "model.safetensors").exists()
    config, state = load_stage1_artefact(out)
    assert isinstance(config, AlignGPTConfig) and config.text_config.hidden_size == 64 and config.image_seq_length == K
    original = original_state(PRETRAIN / "mm_projector_align.bin")
    stage2 = load_file(converted / "model.safetensors")
    assert torch.equal(state["model.alignment.level_embeddings"], original["align_indicators.indicator_embs"])
    assert torch.equal(state["model.alignment.level_embeddings"], stage2["model.alignment.level_embeddings"])
    assert torch.equal(state["model.multi_modal_projector.linear_1.weight"], original["mm_projector.0.weight"])
    assert not torch.equal(state["model.multi_modal_projector.linear_1.weight"],
                           stage2["model.multi_modal_projector.linear_1.weight"])
    assert json.loads((out / "preprocessor_config.json").read_text())["do_pad"] is False
    fresh = AlignGPTForConditionalGeneration(config)  # what the stage-2 trainer starts from (+ base LLM and tower)
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    assert not unexpected and not any(k.startswith(("model.multi_modal_projector", "model.alignment.level")) for k in missing)


def tiny_original_tokenizer(folder, chat_template=None):
    """A 300-token BPE with <unk>=0, <s>=1, </s>=2 like the fixture's LLaMA ids, without <image>/<align>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from aligngpt_hf.tiny import DEFAULT_CORPUS

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text.replace("<image>", "") for text in DEFAULT_CORPUS] * 4, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            chat_template=chat_template).save_pretrained(folder)
    return folder


def test_tokenizer_and_processor_are_written(tmp_path, cases):
    from family_builders import OFFICIAL_TEMPLATES

    # a LLaMA-2-chat tokenizer's own template does not change the vicuna_v1 format AlignGPT was trained in
    tok_dir = tiny_original_tokenizer(tmp_path / "tok", OFFICIAL_TEMPLATES["llama2"]["template"])
    out = tmp_path / "with-processor"
    assert cli_main(["convert", str(ORIGINAL), str(out), "--tokenizer", str(tok_dir), "--no-progress"]) == 0
    processor = AutoProcessor.from_pretrained(out)
    assert processor.tokenizer.convert_tokens_to_ids(["<image>", "<align>"]) == [IMAGE_ID, ALIGN_ID]
    assert processor.tokenizer.pad_token == "<unk>" and processor.tokenizer.model_max_length == 2048
    assert processor.image_seq_length == K and processor.image_processor.do_pad
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt.startswith("<s>A chat between") and prompt.endswith("USER: <image>\nWhat colour? ASSISTANT:")
    from PIL import Image

    batch = processor(text=[prompt], images=[Image.new("RGB", (40, 24), (200, 30, 30))], return_tensors="pt")
    ids = batch["input_ids"][0].tolist()
    assert ids[:2] == [1, ALIGN_ID] and ids.count(IMAGE_ID) == K
    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    generated = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert all(token < VOCAB for token in generated[0, len(ids):].tolist())


REMOTE_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["aligngpt_hf"] = None  # only the files next to the weights remain
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForImageTextToText
    folder, inputs_file, outputs_file = sys.argv[1:4]
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
    with torch.no_grad():
        logits = model(**load_file(inputs_file)).logits
    save_file({"logits": logits.contiguous()}, outputs_file)
    print("REMOTE_OK")
    """
)


def test_converted_folder_loads_through_remote_code(converted, model, cases, tmp_path):
    meta, tensors = cases
    ids, mask, _ = expand(tensors["inference_batch2/input_ids"], tensors["inference_batch2/attention_mask"])
    batch = {"input_ids": ids, "attention_mask": mask, "pixel_values": tensors["inference_batch2/images"]}
    save_file(batch, tmp_path / "inputs.safetensors")
    env = package_free_env(tmp_path / "hf_home")
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_SCRIPT, str(converted), str(tmp_path / "inputs.safetensors"),
         str(tmp_path / "outputs.safetensors")], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert "REMOTE_OK" in result.stdout, result.stderr[-3000:]
    with torch.no_grad():
        expected = model(**batch).logits
    assert torch.equal(load_file(tmp_path / "outputs.safetensors")["logits"], expected)


def test_push_to_hub_creates_repo_and_uploads_folder(tmp_path):
    from huggingface_hub import HfApi

    with mock.patch.object(HfApi, "create_repo") as create, mock.patch.object(HfApi, "upload_folder") as upload:
        result = convert_checkpoint(ORIGINAL, tmp_path / "out", push_to_hub="user/aligngpt-tiny", progress=False)
    create.assert_called_once_with("user/aligngpt-tiny", exist_ok=True, private=False)
    assert upload.call_args.kwargs["repo_id"] == "user/aligngpt-tiny"
    assert upload.call_args.kwargs["folder_path"] == str(tmp_path / "out")
    assert any("user/aligngpt-tiny" in note for note in result.notes)


def test_sharded_output_and_dtype_cast(tmp_path, converted):
    out = tmp_path / "sharded"
    convert_checkpoint(ORIGINAL, out, max_shard_size="200KB", dtype="bfloat16", progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / name).is_file() for name in shards)
    loaded = AutoModelForImageTextToText.from_pretrained(out)
    assert loaded.dtype == torch.bfloat16
    reference = load_file(converted / "model.safetensors")
    assert torch.equal(loaded.lm_head.weight[:VOCAB], reference["lm_head.weight"][:VOCAB].to(torch.bfloat16))


# ---------------------------------------------------------------------------------------------------------------------
# Refusals


def rewritten_checkpoint(tmp_path, edit, with_tower=True):
    """A copy of the tiny original checkpoint whose state dict went through `edit` (stored as safetensors)."""
    folder = tmp_path / "edited"
    folder.mkdir(parents=True)
    shutil.copy(ORIGINAL / "config.json", folder / "config.json")
    if with_tower:
        shutil.copytree(ORIGINAL / "vision_tower", folder / "vision_tower")
    state = original_state()
    edit(state)
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors")
    return folder


def test_unknown_key_is_refused_with_its_name(tmp_path):
    source = rewritten_checkpoint(tmp_path, lambda s: s.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}))
    with pytest.raises(ConversionError, match=r"Unknown key.*\n  model\.layers\.0\.self_attn\.q_proj\.bias"):
        convert_checkpoint(source, tmp_path / "out", progress=False)
    source2 = rewritten_checkpoint(tmp_path / "b", lambda s: s.update({"mystery.weight": torch.zeros(1)}))
    with pytest.raises(ConversionError, match=r"Unknown key.*\n  mystery\.weight"):
        convert_checkpoint(source2, tmp_path / "out2", progress=False)
    # nothing written before the mapping is proven complete, and no temporary folder left behind
    assert not (tmp_path / "out2").exists() and not list(tmp_path.glob(".out2*"))


def test_missing_key_is_refused_with_its_name(tmp_path):
    source = rewritten_checkpoint(tmp_path, lambda s: s.pop("gated_weight_layer.mlp.2.bias"))
    with pytest.raises(ConversionError, match=r"Missing key.*\n  model\.alignment\.fc2\.bias"):
        convert_checkpoint(source, tmp_path / "out", progress=False)


def test_shape_mismatch_is_refused(tmp_path):
    source = rewritten_checkpoint(tmp_path, lambda s: s.update({"gated_weight_layer.mlp.0.weight": torch.zeros(256, 576)}))
    with pytest.raises(ConversionError, match=r"(?s)Shape mismatch.*gated_weight_layer\.mlp\.0\.weight \[256, 576\] -> "
                                              r"model\.alignment\.fc1\.weight expects \[256, 4\]"):
        convert_checkpoint(source, tmp_path / "out", progress=False)


def test_wrong_kind_is_refused(tmp_path, converted):
    with pytest.raises(ConversionError, match=r"Expected a 'full' checkpoint, but .* holds a 'pretrain' one"):
        convert_checkpoint(PRETRAIN, tmp_path / "a", kind="full", vision_tower=ORIGINAL / "vision_tower")
    llama_only = rewritten_checkpoint(tmp_path, lambda s: [s.pop(k) for k in list(s) if not k.startswith(("model.", "lm_head"))])
    with pytest.raises(ConversionError, match=r"Wrong kind of checkpoint: this is a plain language model"):
        convert_checkpoint(llama_only, tmp_path / "b")
    llava = rewritten_checkpoint(tmp_path / "c", lambda s: s.pop("align_indicators.indicator_embs"))
    with pytest.raises(ConversionError, match=r"Wrong kind of checkpoint: this is a LLaVA-style projector"):
        convert_checkpoint(llava, tmp_path / "d")
    with pytest.raises(ConversionError, match=r"already in the HF layout"):
        convert_checkpoint(converted, tmp_path / "e")


def test_missing_vision_tower_is_refused(tmp_path, capsys):
    with pytest.raises(ConversionError, match=r"Missing vision tower: .*'vision_tower'.*--vision-tower"):
        convert_checkpoint(PRETRAIN, tmp_path / "a")
    no_tower = rewritten_checkpoint(tmp_path, lambda s: [s.pop(k) for k in list(s) if k.startswith("vision_tower.")],
                                    with_tower=False)
    assert cli_main(["convert", str(no_tower), str(tmp_path / "b")]) == 1
    assert "Missing vision tower" in capsys.readouterr().err


def test_unconverted_original_is_refused_by_loaders():
    for folder in (ORIGINAL, PRETRAIN):
        for loader in (AutoConfig.from_pretrained, AutoModelForImageTextToText.from_pretrained,
                       AlignGPTForConditionalGeneration.from_pretrained):
            with pytest.raises(ValueError, match=r"`aligngpt-hf convert SOURCE OUTPUT`"):
                loader(folder)
