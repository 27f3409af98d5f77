"""The acceptance commands on the real embedded model: `generate` over three servers, and `demo`."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from blockswarm.model.checkpoint import SMOLLM2
from blockswarm.runtime.launcher import local_swarm

from conftest import reference_model

pytestmark = pytest.mark.slow
PROMPT = "The three primary colors are"


def test_cli_generate_prints_transformers_greedy_continuation(smollm2_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    ids = torch.tensor([tokenizer(PROMPT)["input_ids"]])
    out = reference_model(smollm2_dir).generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24,
                                                do_sample=False)
    expected = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    with local_swarm(SMOLLM2, [(0, 10), (10, 20), (20, 30)], ["--threads", "1"]) as addresses:
        run = subprocess.run(
            [sys.executable, "-m", "blockswarm", "generate", "--servers", ",".join(addresses),
             "--max-new-tokens", "24", "--temperature", "0", "--no-chat-template", PROMPT],
            capture_output=True, text=True, timeout=300,
        )
    assert run.returncode == 0, run.stderr
    assert run.stdout == expected + "\n"
    assert "route:" in run.stderr and "per token" in run.stderr


def test_demo_answers_paris():
    run = subprocess.run([sys.executable, "-m", "blockswarm", "demo", "--prompt", "What is the capital of France?"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "Paris" in run.stdout
    assert "Servers stopped." in run.stderr


def test_generate_with_no_servers_is_a_clear_error():
    run = subprocess.run([sys.executable, "-m", "blockswarm", "generate", "--servers", "127.0.0.1:1", "hi"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "nothing accepts connections at 127.0.0.1:1" in run.stderr and "is the server running?" in run.stderr
    assert "Traceback" not in run.stderr
