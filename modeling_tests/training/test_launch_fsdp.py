"""FSDP2 on 2 CPU processes (gloo), driven by the shipped fsdp.yaml through `accelerate launch`, and the shipped
DeepSpeed configs as accelerate reads them.

accelerate 1.15 only enters its FSDP path on a GPU-class device: with `use_cpu` it runs DDP (MULTI_CPU), without it
a CPU-only process gets distributed type NO (accelerate/state.py `_prepare_backend`). So the Trainer's FSDP path
needs GPUs. What runs here is the part that breaks VLMs: `accelerate launch --config_file fsdp.yaml` starts the
processes and exports the config, `FullyShardedDataParallelPlugin()` reads it back, and accelerate's own
`fsdp2_prepare_model` shards the tiny AlignGPT with `fully_shard` (wrap policy, embedding/tail units, rank-0 loading).
Stage-2 freezing (frozen vision tower, trainable projector/gate/LLM), a step where one rank's batch is text-only,
full-state-dict gathering into a safetensors folder that `from_pretrained` loads: same weights as one process
averaging the two ranks' losses (1e-5).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import textwrap
from pathlib import Path

import torch
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

from aligngpt_hf import AlignGPTForConditionalGeneration
from aligngpt_hf.tiny import build_model, build_processor, build_tokenizer
from aligngpt_hf.training.cli import accelerate_config_path
from aligngpt_hf.training.data import AlignGPTDataCollator, synthetic_dataset
from aligngpt_hf.training.trainers import freeze_for_instruct
from conftest import run_launcher

# the console script next to this interpreter (a virtual environment), else the one on PATH
ACCELERATE = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate") or "accelerate"
# rows of synthetic_dataset(8, "instruct", text_only_every=2): odd rows are text-only
PLAN = [[[0, 2], [1, 3]], [[4, 5], [6, 7]]]  # step -> rank -> rows; step 0: rank 1 sees no image

SCRIPT = textwrap.dedent(
    """
    import json, os, sys, types
    import torch, torch.distributed as dist
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FSDPModule
    from aligngpt_hf.tiny import build_model, build_processor, build_tokenizer
    from aligngpt_hf.training.data import AlignGPTDataCollator, synthetic_dataset
    from aligngpt_hf.training.static_graph import attach_static_graph
    from aligngpt_hf.training.trainers import freeze_for_instruct

    out, plan = sys.argv[1], json.loads(sys.argv[2])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)
    torch.manual_seed(0)
    model = build_model(tokenizer)
    freeze_for_instruct(model)
    attach_static_graph(model)  # what AlignGPT's trainers do: a text-only rank runs the projector and gate too
    plugin = FullyShardedDataParallelPlugin()  # from the variables `accelerate launch` exported from fsdp.yaml
    # accelerate's own FSDP2 preparation, given what it reads off an Accelerator (none can exist on CPU, see above)
    accelerator = types.SimpleNamespace(state=types.SimpleNamespace(fsdp_plugin=plugin), mixed_precision="no",
                                        torch_device_mesh=None, device=torch.device("cpu"), is_main_process=rank == 0)
    model = fsdp2_prepare_model(accelerator, model)
    units = sorted(name for name, module in model.named_modules() if isinstance(module, FSDPModule))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    collator = AlignGPTDataCollator(processor=processor, max_length=2048)
    rows = synthetic_dataset(8, "instruct", text_only_every=2)
    losses = []
    for step_rows in plan:
        loss = model(**collator([rows[i] for i in step_rows[rank]])).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        model.save_pretrained(out, state_dict=state)
    info = {"world_size": dist.get_world_size(), "fsdp_version": plugin.fsdp_version, "units": units,
            "state_dict_type": str(plugin.state_dict_type), "losses": losses}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as handle:
        json.dump(info, handle)
    dist.barrier()
    """
)


def free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def reference_weights() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(initial, trained) weights on one process, same rows: each step's loss is the mean of the two ranks' losses
    (FSDP averages gradients)."""
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)
    torch.manual_seed(0)
    model = build_model(tokenizer)
    initial = {name: param.detach().clone() for name, param in model.named_parameters()}
    freeze_for_instruct(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    collator = AlignGPTDataCollator(processor=processor, max_length=2048)
    rows = synthetic_dataset(8, "instruct", text_only_every=2)
    for step_rows in PLAN:
        losses = [model(**collator([rows[i] for i in part])).loss for part in step_rows]
        (sum(losses) / len(losses)).backward()
        optimizer.step()
        optimizer.zero_grad()
    return initial, {name: param.detach() for name, param in model.named_parameters()}


def test_fsdp2_from_the_shipped_config_shards_trains_text_only_ranks_and_saves_loadable_weights(tmp_path):
    script = tmp_path / "fsdp_train.py"
    script.write_text(SCRIPT)
    out = tmp_path / "fsdp-out"
    out.mkdir()
    command = [ACCELERATE, "launch", "--config_file", str(accelerate_config_path("fsdp")), "--num_processes", "2",
               "--mixed_precision", "no", "--main_process_port", free_port(), str(script), str(out), json.dumps(PLAN)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = run_launcher(command, env=env, cwd=tmp_path, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    infos = [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert infos[0]["world_size"] == 2 and infos[0]["fsdp_version"] == 2
    assert infos[0]["state_dict_type"] == "StateDictType.FULL_STATE_DICT"
    units = infos[0]["units"]
    assert "" in units and "model.language_model.layers.0" in units and "model.language_model.layers.1" in units
    assert not [unit for unit in units if "vision_tower" in unit]  # vision tower, projector, gate: in the root unit
    assert infos[0]["losses"] != infos[1]["losses"]  # each rank trained on its own rows

    loaded = AlignGPTForConditionalGeneration.from_pretrained(out, dtype=torch.float32)
    initial, expected = reference_weights()
    for name, param in loaded.named_parameters():
        torch.testing.assert_close(param, expected[name], rtol=0, atol=1e-5, msg=name)
    changed = {name for name in expected if not torch.equal(expected[name], initial[name])}
    assert "model.multi_modal_projector.linear_1.weight" in changed and "lm_head.weight" in changed
    assert not [name for name in changed if "vision_tower" in name or "level_embeddings" in name]


def _launcher_env(name: str) -> dict[str, str]:
    """The environment `accelerate launch --config_file <shipped name>.yaml --num_processes 2` gives its processes."""
    args = launch_command_parser().parse_args(
        ["--config_file", str(accelerate_config_path(name)), "--num_processes", "2", "train.py"])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        env = prepare_multi_gpu_env(args)
    return {key: value for key, value in env.items() if key.startswith(("ACCELERATE_", "FSDP_"))}


def test_shipped_fsdp_config_as_accelerate_reads_it(monkeypatch):
    env = _launcher_env("fsdp")
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]
    assert str(plugin.state_dict_type) == "StateDictType.FULL_STATE_DICT" and plugin.cpu_ram_efficient_loading


def test_shipped_deepspeed_configs_as_accelerate_reads_them(monkeypatch):
    """DeepSpeed itself is not needed to resolve them (it is an optional extra, see docs/multi-gpu.md)."""
    expected = {"zero2": (2, False), "zero3": (3, True)}
    for name, (stage, gather_16bit) in expected.items():
        env = _launcher_env(name)
        assert env["ACCELERATE_USE_DEEPSPEED"] == "true" and env["ACCELERATE_MIXED_PRECISION"] == "bf16"
        with monkeypatch.context() as patch:
            for key, value in env.items():
                patch.setenv(key, value)
            plugin = DeepSpeedPlugin()
        zero = plugin.deepspeed_config["zero_optimization"]
        assert (zero["stage"], zero["stage3_gather_16bit_weights_on_model_save"]) == (stage, gather_16bit), name
        assert zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == "none"
