"""Two-process DDP on CPU (torchrun, gloo, `use_cpu=True`): both ranks see different data, end with equal weights."""

from __future__ import annotations

import json
import os
import sys
import textwrap

from safetensors.torch import load_file

from conftest import run_launcher

SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch
    from safetensors.torch import save_file
    from aligngpt_hf import AlignGPTInstructConfig, AlignGPTInstructTrainer
    from aligngpt_hf.training.data import synthetic_dataset
    from aligngpt_hf.tiny import build_model, build_processor, build_tokenizer

    out = sys.argv[1]
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)
    torch.manual_seed(0)
    model = build_model(tokenizer)
    model.config.aligngpt_stage = "pretrain"
    seen = []
    model.model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].sum().item()),
                                          with_kwargs=True)
    args = AlignGPTInstructConfig(output_dir=out, max_steps=3, per_device_train_batch_size=2, learning_rate=1e-3,
                                  use_cpu=True, report_to="none", save_strategy="no", activation_checkpointing=False,
                                  dataloader_num_workers=0, disable_tqdm=True)
    trainer = AlignGPTInstructTrainer(model=model, args=args, processing_class=processor,
                                      train_dataset=synthetic_dataset(16, "instruct", text_only_every=2))
    trainer.train()
    rank = trainer.args.process_index
    state = {name: param.detach().contiguous() for name, param in model.named_parameters()}
    save_file(state, os.path.join(out, f"rank{rank}.safetensors"))
    info = {"world_size": trainer.args.world_size, "distributed_type": trainer.accelerator.distributed_type.value,
            "wrapped": type(trainer.model_wrapped).__name__, "seen": seen}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as handle:
        json.dump(info, handle)
    """
)


def test_two_process_ddp_on_cpu_ends_with_identical_weights(tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
               str(tmp_path)]
    result = run_launcher(command, env=env, cwd=tmp_path, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    infos = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for info in infos:
        assert info["world_size"] == 2 and info["distributed_type"] == "MULTI_CPU"
        assert info["wrapped"] == "DistributedDataParallel"
    assert infos[0]["seen"] != infos[1]["seen"]  # data-parallel: each rank trains on its own shard
    weights = [load_file(tmp_path / f"rank{rank}.safetensors") for rank in (0, 1)]
    assert weights[0].keys() == weights[1].keys()
    for name, tensor in weights[0].items():
        assert (tensor == weights[1][name]).all(), name
