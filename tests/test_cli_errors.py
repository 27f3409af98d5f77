"""Command-line mistakes, as users make them: one `error:` line that says what to do, exit code 2, no traceback.

Every case runs the real command in a subprocess. The fast ones never get past validation (the
simulations are tiny: `--requests 5`); the ones that start servers or load SmolLM2 are slow.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

SCENARIO = "scenarios/clustered-9.yaml"
MISSING_DIR = "/nonexistent-blockswarm-dir"
QUICK_SIM = ["--requests", "5", "--seeds", "1"]


def blockswarm(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "blockswarm", *args], capture_output=True, text=True,
                          timeout=timeout)


def assert_user_error(run: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit code 2, no traceback, exactly one `error:` line on stderr containing every fragment."""
    assert "Traceback" not in run.stderr, run.stderr
    assert run.returncode == 2, run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, run.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def test_version_comes_from_the_package_metadata():
    run = blockswarm("--version")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "blockswarm 0.1.0"


@pytest.mark.parametrize("args, fragment", [
    (["--servers", "0"], "--servers"),
    (["--servers", "-2"], "--servers"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
])
def test_demo_rejects_impossible_counts_before_starting_anything(args, fragment):
    assert_user_error(blockswarm("demo", *args), fragment)


def test_demo_with_more_servers_than_it_has_budgets_for():
    assert_user_error(blockswarm("demo", "--servers", "31"), "--servers must be 2..6", "got 31")


@pytest.mark.parametrize("args, fragment", [
    (["--seeds", "0"], "--seeds"),
    (["--seeds", "-1"], "--seeds"),
    (["--burstiness", "0"], "--burstiness"),
    (["--burstiness", "-0.5"], "--burstiness"),
    (["--output-tokens", "0"], "--output-tokens"),
    (["--requests", "0"], "--requests"),
    (["--rate", "0"], "--rate"),
    (["--rate", "-1"], "--rate"),
    (["--policies", ""], "--policies"),
    (["--policies", "petals,magic"], "magic"),
])
def test_simulate_rejects_values_that_mean_nothing(args, fragment):
    assert_user_error(blockswarm("simulate", SCENARIO, *QUICK_SIM, *args), fragment)


def test_simulate_with_an_empty_trace_is_an_error_not_a_table_of_nan(tmp_path):
    trace = tmp_path / "trace.csv"
    trace.write_text("arrival_s,prompt_tokens,output_tokens\n")
    assert_user_error(blockswarm("simulate", SCENARIO, "--seeds", "1", "--trace", str(trace)), "no requests")


@pytest.mark.parametrize("args, fragment", [
    (["--parameter", "rate", "--values", ""], "--values"),
    (["--parameter", "rate", "--values", " , "], "--values"),
    (["--parameter", "rate", "--values", "0.1,fast"], "--values"),
    (["--parameter", "rate", "--values", "0.1,0"], "rate"),
    (["--parameter", "servers", "--values", "0"], "servers"),
    (["--parameter", "servers", "--values", "2.5"], "servers"),
    (["--parameter", "output", "--values", "0"], "output"),
    (["--parameter", "fast-share", "--values", "1.5"], "fast-share"),
    (["--parameter", "colour", "--values", "1"], "--parameter"),
    (["--parameter", "rate", "--values", "0.1", "--seeds", "0"], "--seeds"),
    (["--parameter", "rate", "--values", "0.1", "--requests", "0"], "--requests"),
])
def test_sweep_rejects_bad_points(args, fragment):
    assert_user_error(blockswarm("sweep", SCENARIO, "--requests", "5", "--seeds", "1", *args), fragment)


@pytest.mark.parametrize("command, option", [
    (["plan", SCENARIO], "--json"),
    (["simulate", SCENARIO, *QUICK_SIM], "--json"),
    (["simulate", SCENARIO, *QUICK_SIM], "--plot"),
    (["sweep", SCENARIO, "--parameter", "rate", "--values", "0.1", *QUICK_SIM], "--json"),
    (["sweep", SCENARIO, "--parameter", "rate", "--values", "0.1", *QUICK_SIM], "--plot"),
    (["info", "--servers", "127.0.0.1:1"], "--json"),
])
def test_unwritable_output_fails_before_the_work(command, option):
    """Nothing on stdout: the path was checked before planning, simulating or asking servers."""
    run = blockswarm(*command, option, f"{MISSING_DIR}/out.file")
    assert_user_error(run, option, MISSING_DIR, "does not exist")
    assert run.stdout == ""


def test_output_path_that_is_a_directory(tmp_path):
    run = blockswarm("plan", SCENARIO, "--json", str(tmp_path))
    assert_user_error(run, "--json", "is a directory")


def test_output_is_still_written_when_the_path_is_fine(tmp_path):
    out = tmp_path / "plan.json"
    run = blockswarm("plan", SCENARIO, "--json", str(out))
    assert run.returncode == 0, run.stderr
    assert "placement" in json.loads(out.read_text())


@pytest.mark.parametrize("args, fragment", [
    (["--R", "0"], "--R"),
    (["--milp-requests", "0"], "--milp-requests"),
    (["--time-limit", "0"], "--time-limit"),
])
def test_plan_rejects_non_positive_limits(args, fragment):
    assert_user_error(blockswarm("plan", SCENARIO, *args), fragment)


@pytest.mark.parametrize("args, fragment", [
    (["--servers", ""], "--servers"),
    (["--servers", "127.0.0.1:1", "--timeout", "0"], "--timeout"),
])
def test_info_rejects_bad_options(args, fragment):
    assert_user_error(blockswarm("info", *args), fragment)


@pytest.mark.parametrize("args, fragment", [
    (["--servers", " , "], "--servers"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--timeout", "0"], "--timeout"),
    (["--timeout", "-5"], "--timeout"),
    (["--dtype", "float64"], "--dtype"),
    (["--temperature", "-1"], "--temperature"),
    (["--top-p", "0"], "--top-p"),
    (["--top-p", "1.5"], "--top-p"),
])
def test_generate_rejects_bad_options_before_contacting_servers(args, fragment):
    run = blockswarm("generate", "--servers", "127.0.0.1:1", *args, "hi")
    assert_user_error(run, fragment)


@pytest.mark.parametrize("args, fragment", [
    (["--blocks", "a:b"], "--blocks"),
    (["--blocks", "5:3"], "--blocks"),
    (["--blocks", "-1:3"], "--blocks"),
    (["--blocks", "0:10", "--cache-tokens", "0"], "--cache-tokens"),
    (["--blocks", "0:10", "--session-timeout", "0"], "--session-timeout"),
    (["--blocks", "0:10", "--port", "70000"], "--port"),
    (["--blocks", "0:10", "--data-port", "-1"], "--data-port"),
    (["--blocks", "0:10", "--threads", "0"], "--threads"),
    (["--blocks", "0:10", "--dtype", "float64"], "--dtype"),
])
def test_serve_rejects_bad_options_before_loading(args, fragment):
    assert_user_error(blockswarm("serve", *args), fragment)


def test_serve_blocks_past_the_models_end(tmp_path):
    """A model directory with 6 blocks (config only: the check comes before any weight is read)."""
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "num_hidden_layers": 6, "hidden_size": 64, "intermediate_size": 128,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    run = blockswarm("serve", "--model", str(tmp_path), "--blocks", "2:9")
    assert_user_error(run, "--blocks 2:9", "0:6")


def test_serve_on_a_port_in_use_fails_before_loading_the_model(tmp_path):
    """The ports are bound first: a port in use is one error line at once, not after the weights
    load (the directory has a config but no weights, so loading would fail differently)."""
    import socket

    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "num_hidden_layers": 6, "hidden_size": 64, "intermediate_size": 128,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128}))
    (tmp_path / "model.safetensors").write_bytes(b"")  # no weights in it: loading them would fail
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = blockswarm("serve", "--model", str(tmp_path), "--blocks", "0:6", "--port", str(port))
    assert_user_error(run, f"cannot listen on 127.0.0.1:{port}", "pick another --port")
