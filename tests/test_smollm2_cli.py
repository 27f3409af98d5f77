"""The acceptance commands on the real embedded model: `generate` over three servers, through a
coordinator that placed three servers none of which was told its blocks, and `demo`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from blockswarm.model.checkpoint import SMOLLM2
from blockswarm.runtime.launcher import local_swarm

from conftest import reference_model

pytestmark = pytest.mark.slow
PROMPT = "The three primary colors are"


def greedy_text(smollm2_dir) -> str:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    ids = torch.tensor([tokenizer(PROMPT)["input_ids"]])
    out = reference_model(smollm2_dir).generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24,
                                                do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_cli_generate_prints_transformers_greedy_continuation(smollm2_dir):
    expected = greedy_text(smollm2_dir)
    with local_swarm(SMOLLM2, [(0, 10), (10, 20), (20, 30)], ["--threads", "1"]) as addresses:
        run = subprocess.run(
            [sys.executable, "-m", "blockswarm", "generate", "--servers", ",".join(addresses),
             "--max-new-tokens", "24", "--temperature", "0", "--no-chat-template", PROMPT],
            capture_output=True, text=True, timeout=300,
        )
    assert run.returncode == 0, run.stderr
    assert run.stdout == expected + "\n"
    assert "route:" in run.stderr and "per token" in run.stderr


def test_coordinated_generate_and_status_as_the_acceptance_commands_run_them(smollm2_dir, smollm2_coordinated,
                                                                          tmp_path):
    import json

    expected = greedy_text(smollm2_dir)
    address, servers = smollm2_coordinated
    run = subprocess.run(
        [sys.executable, "-m", "blockswarm", "generate", "--coordinator", address,
         "--max-new-tokens", "24", "--temperature", "0", "--no-chat-template", PROMPT],
        capture_output=True, text=True, timeout=300,
    )
    out = tmp_path / "status.json"
    status = subprocess.run([sys.executable, "-m", "blockswarm", "status", "--coordinator", address,
                             "--json", str(out)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout == expected + "\n"
    assert status.returncode == 0, status.stderr
    data = json.loads(out.read_text())
    assert sorted(s["address"] for s in data["servers"]) == sorted(servers)
    assert all(isinstance(s["start"], int) and s["end"] > s["start"] and s["state"] == "serving"
               for s in data["servers"])
    assert len(data["coverage"]) == 30 and min(data["coverage"]) >= 1
    assert sum(data["coverage"]) == sum(s["end"] - s["start"] for s in data["servers"])


def test_demo_answers_paris_then_serves_the_api_until_ctrl_c():
    """`demo --api`: the placement explained, Paris, then the API and page over the demo's swarm;
    Ctrl-C stops the API, the coordinator and the servers (one line, code 130)."""
    import httpx

    from blockswarm.runtime.launcher import start, wait_ready

    process = start([sys.executable, "-m", "blockswarm", "demo", "--api", "--api-port", "0", "--prompt",
                     "What is the capital of France?"], stderr=subprocess.PIPE)
    answer = []
    try:
        address = wait_ready(process, 600, on_line=answer.append)
        assert "Paris" in "\n".join(answer)
        assert httpx.get(f"http://{address}/v1/models").json()["data"][0]["id"] == "smollm2"
        swarm = httpx.get(f"http://{address}/api/swarm").json()
        assert len(swarm["servers"]) == 3 and swarm["missing"] is None
        children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
        assert len(children) == 4  # the coordinator and three servers
        process.send_signal(signal.SIGINT)
        stderr = process.communicate(timeout=60)[1]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, stderr
    assert "Placement by cgbp for R=2" in stderr and "predicted per-token time" in stderr
    assert "swarm page: http://" in stderr and "Traceback" not in stderr
    assert "the coordinator and servers stopped" in stderr
    assert not [pid for pid in children if Path(f"/proc/{pid}").exists()]


def test_generate_with_no_servers_is_a_clear_error():
    run = subprocess.run([sys.executable, "-m", "blockswarm", "generate", "--servers", "127.0.0.1:1", "hi"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "nothing accepts connections at 127.0.0.1:1" in run.stderr and "is the server running?" in run.stderr
    assert "Traceback" not in run.stderr


def test_ctrl_c_during_generate_ends_with_one_line_and_code_130(smollm2_coordinated):
    address, _ = smollm2_coordinated  # (a coordinated swarm, shared: the client releases its route on the way out)
    # (what this test process passes on: in two full runs the client went on to its 200th token after
    # the SIGINT, which never happened alone; said in the failure message)
    inherited = [line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(("SigBlk",
                                                                                                      "SigIgn"))]
    process = subprocess.Popen(
        [sys.executable, "-m", "blockswarm", "generate", "--coordinator", address, "--max-new-tokens", "200",
         "--no-chat-template", "Once upon a time"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        preexec_fn=_as_from_a_shell)
    try:
        first = process.stdout.read(1)  # the first token's text has arrived: generation is under way
        assert first, process.stderr.read()
        time.sleep(0.3)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert "Traceback" not in stderr, stderr
    assert process.returncode == 130, (inherited, stderr)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "interrupted" in lines[0], stderr


def _as_from_a_shell() -> None:
    """(In the child, before exec.) Ctrl-C's default and unblocked, as a shell starts a command,
    whatever this test process inherited or set up."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
