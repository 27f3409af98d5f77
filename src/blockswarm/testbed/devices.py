"""Emulated devices: a scenario server's speed and memory as a runtime `Emulation`, and the tiny
random model with the scenario's number of blocks that computes underneath."""

from __future__ import annotations

import os
from pathlib import Path

from blockswarm.core.errors import ConfigError
from blockswarm.core.specs import Scenario
from blockswarm.perf.scenario import load_scenario
from blockswarm.runtime.serveconfig import Emulation


def emulation_for(scenario: Scenario, server: str, time_scale: float = 1.0) -> Emulation:
    """Server `server` (its name or index) of the scenario, its times divided by `time_scale`."""
    if not time_scale > 0:
        raise ConfigError(f"--time-scale must be positive, got {time_scale}")
    names = [s.name for s in scenario.servers]
    if server in names:
        spec = scenario.servers[names.index(server)]
    elif server.isdigit() and int(server) < len(names):
        spec = scenario.servers[int(server)]
    else:
        raise ConfigError(f"the scenario {scenario.name} has no server {server!r}; its servers are "
                          f"{', '.join(names[:12])}{' …' if len(names) > 12 else ''} (or an index 0..{len(names) - 1})")
    model = scenario.model
    return Emulation(block_decode_s=spec.decode_s / time_scale,
                     block_prefill_s_per_token=spec.prefill_s_per_token / time_scale,
                     block_prefill_base_s=spec.prefill_base_s / time_scale, memory_bytes=int(spec.memory_bytes),
                     d_kv=model.d_kv, params_per_block=model.params_per_block,
                     weight_bytes_per_param=model.weight_bytes_per_param, weight_overhead=model.weight_overhead,
                     kv_bytes=model.kv_bytes,
                     label=f"{spec.name} of {scenario.name}" + (f" at time scale {time_scale:g}" if time_scale != 1 else ""))


def parse_emulate(text: str, time_scale: float) -> Emulation:
    """`SCENARIO:SERVER` (serve --emulate) -> the Emulation."""
    path, sep, server = text.rpartition(":")
    if not sep or not path or not server:
        raise ConfigError(f"--emulate {text!r}: give SCENARIO.yaml:SERVER, e.g. scenarios/testbed/clustered-9.yaml:a100-80gb-0")
    return emulation_for(load_scenario(path), server, time_scale)


def tiny_model(num_blocks: int, root: Path | None = None) -> Path:
    """A random llama of `num_blocks` blocks and hidden size 32 (token ids in and out, no
    tokenizer), built once into the cache. Its compute is ~0.1 ms per block here: negligible
    next to an emulated device's time."""
    from blockswarm.model.checkpoint import cache_root

    directory = Path(root or cache_root()) / f"testbed-tiny-{num_blocks}"
    if (directory / "config.json").is_file():
        return directory
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_key_value_heads=1, num_attention_heads=2,
                         num_hidden_layers=num_blocks, vocab_size=256, max_position_embeddings=8192,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    staging = directory.with_name(directory.name + f".staging-{os.getpid()}")
    AutoModelForCausalLM.from_config(config).eval().save_pretrained(staging)
    try:
        staging.rename(directory)
    except OSError:  # another process built it first
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
    return directory
