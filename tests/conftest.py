"""Shared fixtures: tiny random models saved as real checkpoints, and the embedded SmolLM2."""

from __future__ import annotations

import os

import pytest

TINY_FAMILIES = ("llama", "qwen2", "gpt2", "bloom")


def pytest_configure(config):
    # servers and coordinators are forked from one process that imported torch once
    # (runtime/forked.py): ~7 s of CPU saved per server, a few minutes per run
    from blockswarm.runtime import forked

    os.environ.setdefault(forked.ENV, "1")


def build_tiny_model(family: str, directory, num_layers: int = 6, seed: int = 0):
    """A randomly initialised model of `family`, saved with save_pretrained into `directory`."""
    import torch
    from transformers import AutoModelForCausalLM, BloomConfig, GPT2Config, LlamaConfig, Qwen2Config

    common = dict(vocab_size=128, num_hidden_layers=num_layers, num_attention_heads=4,
                  max_position_embeddings=256)
    if family == "llama":
        config = LlamaConfig(hidden_size=64, intermediate_size=128, num_key_value_heads=2, **common)
    elif family == "qwen2":
        config = Qwen2Config(hidden_size=64, intermediate_size=128, num_key_value_heads=2,
                             tie_word_embeddings=False, **common)
    elif family == "bloom":
        config = BloomConfig(hidden_size=64, n_layer=num_layers, n_head=4, vocab_size=128)
    elif family == "gpt2":
        config = GPT2Config(n_embd=64, n_layer=num_layers, n_head=4, n_positions=256, vocab_size=128)
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(directory)
    return model


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory):
    dirs = {}
    for family in TINY_FAMILIES:
        directory = tmp_path_factory.mktemp(f"tiny-{family}")
        build_tiny_model(family, directory)
        dirs[family] = directory
    return dirs


@pytest.fixture(scope="session")
def smollm2_dir():
    from blockswarm.model.checkpoint import ensure_smollm2

    return ensure_smollm2()


@pytest.fixture(scope="session")
def smollm2_coordinated(smollm2_dir, tmp_path_factory):
    """A coordinator and three SmolLM2 servers (400, 300, 200 MiB), none told its blocks, shared by
    every test that needs a real coordinated swarm (each SmolLM2 server loads its span); no
    test may stop its servers."""
    from blockswarm.model.checkpoint import SMOLLM2
    from blockswarm.runtime.launcher import coordinated_swarm

    state = str(tmp_path_factory.mktemp("smollm2-coordinator") / "state.sqlite")
    with coordinated_swarm(SMOLLM2, ["400MiB", "300MiB", "200MiB"], ["--state", state],
                           ["--threads", "1"]) as (address, servers, _):
        wait_until_serving(address)
        yield address, servers


def wait_until_serving(address: str, timeout_s: float = 90.0) -> None:
    """Servers print READY before the coordinator hears they serve (their next heartbeat). Under a
    full `make test` on this 2-core machine this failed twice waiting for every record to serve
    (probably a re-registration's old record, "gone"; the message names each record's state)."""
    import time

    import zmq

    from blockswarm.runtime.coordinator.link import CoordinatorLink

    context = zmq.Context()
    try:
        link = CoordinatorLink(context, address)
        deadline = time.monotonic() + timeout_s
        servers = []
        while time.monotonic() < deadline:
            servers = link.call("status")["servers"]
            # every address serves: a server that missed heartbeats while loading and registered
            # again leaves its old record "gone" in the status for 5 minutes beside the new one
            if servers and {s["address"] for s in servers} == {s["address"] for s in servers
                                                                 if s["state"] == "serving"}:
                return
            time.sleep(0.2)
        states = ", ".join(f"{s['address']} {s['state']} {s.get('start')}:{s.get('end')}" for s in servers)
        raise AssertionError(f"the servers of {address} did not all report serving in {timeout_s} s: {states}")
    finally:
        context.destroy(linger=0)


def run_concurrently(jobs, join_s: float = 120.0):
    """Run each job (a callable) in its own thread; returns (results in job order, exceptions)."""
    import threading

    results, errors = [None] * len(jobs), []

    def run(i):
        try:
            results[i] = jobs[i]()
        except Exception as exc:  # the caller asserts there are none
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(join_s)
    return results, errors


def reference_model(directory):
    """The whole model as transformers loads it, with weights copied into fresh memory.

    from_pretrained leaves weights memory-mapped; the CPU BLAS takes another GEMV path for those
    than for ordinary allocations, which moves logits by up to ~4e-5 even for the whole model
    against itself (enough to flip a near-tie in a random model). Spans copy their weights, so
    the reference does too, to compare like with like.
    """
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    for parameter in model.parameters():
        parameter.data = parameter.data.clone()
    return model
