"""The `blockswarm` command. Thin: parse, call the library, print; user mistakes exit 2 with a message.

Heavy imports (torch, transformers, zmq) happen inside the commands that need them, so planning
and simulating start instantly.
"""

from __future__ import annotations

import logging
import sys
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Run a language model split by transformer blocks across many servers.")

DEFAULT_PROMPT = "What is the capital of France?"


def _fail(message: str, code: int = 2):
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _parse_span(text: str) -> tuple[int, int]:
    try:
        start, end = (int(x) for x in text.split(":"))
    except ValueError:
        _fail(f"--blocks must look like START:END (end exclusive), e.g. 0:10; got {text!r}")
    return start, end


@app.command()
def serve(
    model: str = typer.Option("smollm2", help="`smollm2` (embedded) or a local Hugging Face model directory."),
    blocks: str = typer.Option(..., help="Blocks to hold, START:END with END exclusive, e.g. 10:20."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(0, help="Control port (info/open/close); 0 picks a free one (printed in the READY line)."),
    data_port: int = typer.Option(0, help="Port for steps (hidden states); 0 picks a free one, which clients learn "
                                  "from the server. Fix it when a firewall must let it through."),
    device: str = typer.Option("cpu", help="torch device for the blocks, e.g. cpu or cuda."),
    dtype: str = typer.Option("float32", help="float32, float16 or bfloat16."),
    cache_tokens: int = typer.Option(16384, help="KV-cache budget in tokens for the whole span, shared by sessions."),
    session_timeout: float = typer.Option(300.0, help="Close sessions idle for this many seconds."),
    threads: Optional[int] = typer.Option(None, help="torch threads for compute (default: torch's choice)."),
):
    """Hold a span of blocks and serve sessions over ZeroMQ until Ctrl-C."""
    from blockswarm.core.errors import BlockswarmError
    from blockswarm.runtime.server import ServeConfig, run_server

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    start, end = _parse_span(blocks)
    try:
        run_server(ServeConfig(model=model, start=start, end=end, host=host, port=port, data_port=data_port,
                               device=device, dtype=dtype,
                               cache_tokens=cache_tokens, session_timeout_s=session_timeout, threads=threads))
    except BlockswarmError as exc:
        _fail(str(exc))


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="The prompt."),
    servers: str = typer.Option(..., help="Comma-separated host:port of servers, in any order."),
    model: str = typer.Option("smollm2", help="The same model the servers hold (the client needs its head)."),
    max_new_tokens: int = typer.Option(64, help="Stop after this many new tokens."),
    temperature: float = typer.Option(0.0, help="0 is greedy; above 0 samples."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling threshold."),
    seed: Optional[int] = typer.Option(None, help="Seed for sampling."),
    chat_template: bool = typer.Option(True, help="Wrap the prompt in the model's chat template."),
):
    """Generate text through a chain of servers: text on stdout, route and timings on stderr.

    List spare servers too: one that fails mid-generation is replaced, and the output stays the same."""
    from blockswarm.core.errors import BlockswarmError
    from blockswarm.model.sampling import SamplingParams
    from blockswarm.runtime.client import DistributedModel

    try:
        sampling = SamplingParams(temperature=temperature, top_p=top_p, seed=seed)
        model_ = DistributedModel.from_servers([s for s in servers.split(",") if s.strip()], model=model)
        result = model_.generate(prompt, max_new_tokens=max_new_tokens, sampling=sampling,
                                 chat_template=chat_template,
                                 on_token=lambda _id, delta: (sys.stdout.write(delta), sys.stdout.flush()))
    except BlockswarmError as exc:
        _fail(str(exc))
    sys.stdout.write("\n")
    _report(result)


@app.command()
def info(
    servers: str = typer.Option(..., help="Comma-separated host:port of servers to ask."),
    json_path: Optional[str] = typer.Option(None, "--json", help="Also write what they answered to this file."),
    timeout: float = typer.Option(5.0, help="Seconds to wait for each server."),
):
    """Ask servers what they hold and how loaded they are; exit code 1 if any does not answer."""
    import json

    from blockswarm.core.errors import BlockswarmError
    from blockswarm.runtime.connection import client_context, fetch_info

    context = client_context()
    answers, down = {}, {}
    for address in [s.strip() for s in servers.split(",") if s.strip()]:
        try:
            answers[address] = fetch_info(context, address, timeout)
        except BlockswarmError as exc:
            down[address] = str(exc)
    for address, i in answers.items():
        typer.echo(f"{address}  blocks {i.start}:{i.end} of {i.num_blocks}  {i.dtype}  "
                   f"decode {i.block_decode_s * 1e3:.3f} ms/block/token  "
                   f"cache {i.free_cache_tokens}/{i.cache_tokens} tokens free  sessions {i.sessions}  "
                   f"model {i.model}")
    for address, why in down.items():
        typer.echo(f"{address}  down: {why}")
    if json_path:
        with open(json_path, "w") as handle:
            json.dump({"up": {a: i.to_wire() for a, i in answers.items()}, "down": down}, handle, indent=2)
    if down:
        raise typer.Exit(1)


def _report(result) -> None:
    from blockswarm.runtime.report import timing_report

    typer.echo(timing_report(result), err=True)


@app.command()
def demo(
    prompt: str = typer.Option(DEFAULT_PROMPT, help="The question to ask."),
    servers: int = typer.Option(3, help="How many local server processes to split the model over."),
    max_new_tokens: int = typer.Option(48, help="Stop after this many new tokens."),
):
    """Start local servers holding SmolLM2-135M in spans, answer a prompt through them, shut down."""
    from blockswarm.core.errors import BlockswarmError
    from blockswarm.model.checkpoint import SMOLLM2, ensure_smollm2, load_config
    from blockswarm.model.families import num_blocks
    from blockswarm.runtime.client import DistributedModel
    from blockswarm.runtime.launcher import even_spans, local_swarm

    try:
        typer.echo("Preparing SmolLM2-135M-Instruct (converted once, then cached)...", err=True)
        blocks = num_blocks(load_config(ensure_smollm2()))
        spans = even_spans(blocks, servers)
        typer.echo(f"Starting {servers} servers: " + ", ".join(f"blocks {a}:{b}" for a, b in spans), err=True)
        with local_swarm(SMOLLM2, spans, ["--threads", "1"]) as addresses:
            typer.echo(f"Servers ready at {', '.join(addresses)}", err=True)
            model = DistributedModel.from_servers(addresses, model=SMOLLM2)
            typer.echo(f"\nQ: {prompt}\nA: ", nl=False)
            result = model.generate(prompt, max_new_tokens=max_new_tokens,
                                    on_token=lambda _id, delta: (sys.stdout.write(delta), sys.stdout.flush()))
            typer.echo("\n")
            _report(result)
        typer.echo("Servers stopped.", err=True)
    except KeyboardInterrupt:
        typer.echo("\nInterrupted; servers stopped.", err=True)
        raise typer.Exit(130)
    except BlockswarmError as exc:
        _fail(str(exc))


@app.command()
def plan(
    scenario: str = typer.Argument(..., help="Scenario YAML file, e.g. scenarios/clustered-9.yaml."),
    policy: str = typer.Option("cgbprr", help="petals, cgbprr, wsrr, milp or rr-ilp."),
    r: Optional[int] = typer.Option(None, "--R", help="Concurrent requests to size for (default: from the "
                                    "workload's rate, R = round(λT + sqrt(λT)))."),
    milp_requests: int = typer.Option(10, help="The MILP solves for at most this many concurrent requests."),
    time_limit: float = typer.Option(60.0, help="Solver time limit in seconds (milp, rr-ilp)."),
    json_path: Optional[str] = typer.Option(None, "--json", help="Write the plan as JSON here."),
):
    """Place blocks and route each client with a policy; print predictions and the bound."""
    import json

    from blockswarm.core.errors import BlockswarmError
    from blockswarm.perf.scenario import load_scenario
    from blockswarm.planner.registry import plan as make_plan
    from blockswarm.planner.report import print_plan

    try:
        result = make_plan(load_scenario(scenario), policy, R=r, milp_requests=milp_requests,
                           time_limit_s=time_limit)
    except BlockswarmError as exc:
        _fail(str(exc))
    print_plan(result)
    if json_path:
        with open(json_path, "w") as handle:
            json.dump(result.to_json(), handle, indent=2)


def _load_for_sim(scenario: str, rate, output_tokens, requests, topology, topology_seed):
    from blockswarm.perf.scenario import load_scenario
    from blockswarm.sim.runner import with_workload

    loaded = with_workload(load_scenario(scenario), rate=rate, output_tokens=output_tokens, requests=requests)
    if topology:
        from blockswarm.sim.topology import place_on_topology, rtt_from_gml

        loaded = place_on_topology(loaded, rtt_from_gml(topology), topology_seed)
    return loaded


def _progress(label: str):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    transient=True, console=Console(stderr=True))


@app.command()
def simulate(
    scenario: str = typer.Argument(..., help="Scenario YAML file."),
    policies: str = typer.Option("petals,cgbprr", help="Comma-separated PLACEMENT+ROUTING pairs (placements: "
                                 "petals, cgbp; routings: petals, shortest, wsrr) or shorthands petals, cgbprr."),
    seeds: int = typer.Option(5, help="Independent runs per policy (seeds 0..N-1)."),
    rate: Optional[float] = typer.Option(None, help="Override the workload's arrival rate (requests/s)."),
    output_tokens: Optional[int] = typer.Option(None, help="Override the workload's output length."),
    requests: Optional[int] = typer.Option(None, help="Override the number of requests per run."),
    burstiness: float = typer.Option(1.0, help="Coefficient of variation of inter-arrival gaps (1 = Poisson)."),
    topology: Optional[str] = typer.Option(None, help="GML topology: servers and clients go on its nodes."),
    topology_seed: int = typer.Option(0, help="Seed for placing servers and clients on the topology."),
    trace: Optional[str] = typer.Option(None, help="Replay this CSV trace (arrival_s,prompt_tokens,output_tokens"
                                        "[,client]) instead of generating arrivals."),
    json_path: Optional[str] = typer.Option(None, "--json", help="Write per-policy results as JSON here."),
    plot: Optional[str] = typer.Option(None, help="Write a PNG comparing the policies here."),
):
    """Simulate the scenario's workload under each policy; print a table, optionally JSON and a plot."""
    import json

    from rich.console import Console
    from rich.table import Table

    from blockswarm.core.errors import BlockswarmError
    from blockswarm.sim.experiments import compare

    names = [p.strip() for p in policies.split(",") if p.strip()]
    try:
        loaded = _load_for_sim(scenario, rate, output_tokens, requests, topology, topology_seed)
        options = {"burstiness": burstiness}
        if trace:
            from blockswarm.sim.runner import fit_to_requests
            from blockswarm.sim.workload import load_trace

            options["requests"] = load_trace(trace, len(loaded.clients))
            loaded = fit_to_requests(loaded, options["requests"])
        with _progress("simulating") as progress:
            task = progress.add_task("runs", total=len(names) * seeds)
            table = compare(loaded, names, seeds, progress=lambda: progress.advance(task), **options)
    except BlockswarmError as exc:
        _fail(str(exc))
    w = loaded.workload
    view = Table(title=f"{loaded.name}: {w.num_requests} requests × {seeds} seeds, {w.rate} req/s, "
                       f"{w.prompt_tokens} → {w.output_tokens} tokens (mean ± 95 % CI)")
    for column in ("policy", "R", "per-token s", "TTFT s", "p90 per-token s", "wait s", "cache mean / peak"):
        view.add_column(column)
    for name, row in table.items():
        view.add_row(name, str(row["R"] or "-"), f"{row['mean_per_token_s']:.3f} ± {row['mean_per_token_s_ci95']:.3f}",
                     f"{row['mean_ttft_s']:.2f} ± {row['mean_ttft_s_ci95']:.2f}", f"{row['p90_per_token_s']:.3f}",
                     f"{row['mean_wait_s']:.2f}",
                     f"{row['cache_occupancy_mean']:.0%} / {row['cache_occupancy_peak']:.0%}")
    Console().print(view)
    if json_path:
        out = {name: {k: v for k, v in row.items() if k != "per_token_samples"} for name, row in table.items()}
        with open(json_path, "w") as handle:
            json.dump({"scenario": loaded.name, "rate": w.rate, "output_tokens": w.output_tokens,
                       "seeds": seeds, "policies": out, **out}, handle, indent=2)
    if plot:
        from blockswarm.sim.plots import plot_comparison

        plot_comparison(table, f"{loaded.name}, {w.rate} req/s, {w.output_tokens} tokens", plot)


@app.command()
def sweep(
    scenario: str = typer.Argument(..., help="Scenario YAML file."),
    parameter: str = typer.Option(..., help="servers, rate, output or fast-share."),
    values: str = typer.Option(..., help="Comma-separated values, e.g. 0.1,0.2,0.5."),
    policies: str = typer.Option("petals,cgbprr", help="Comma-separated policies (see simulate)."),
    seeds: int = typer.Option(3, help="Runs per point."),
    requests: Optional[int] = typer.Option(None, help="Override the number of requests per run."),
    json_path: Optional[str] = typer.Option(None, "--json", help="Write the curves as JSON here."),
    plot: Optional[str] = typer.Option(None, help="Write a PNG of the curves here."),
):
    """Vary one parameter and plot the mean per-token time per policy."""
    import json

    from blockswarm.core.errors import BlockswarmError
    from blockswarm.sim.experiments import compare, vary

    names = [p.strip() for p in policies.split(",") if p.strip()]
    try:
        points = [float(v) for v in values.split(",") if v.strip()]
    except ValueError:
        _fail(f"--values must be numbers separated by commas, got {values!r}")
    curves: dict[str, list] = {name: [] for name in names}
    try:
        base = _load_for_sim(scenario, None, None, requests, None, 0)
        with _progress(f"sweeping {parameter}") as progress:
            task = progress.add_task("runs", total=len(points) * len(names) * seeds)
            for value in points:
                table = compare(vary(base, parameter, value), names, seeds, progress=lambda: progress.advance(task))
                for name in names:
                    curves[name].append((value, table[name]["mean_per_token_s"], table[name]["mean_per_token_s_ci95"]))
    except BlockswarmError as exc:
        _fail(str(exc))
    for name, curve in curves.items():
        typer.echo(f"{name:>16}: " + "  ".join(f"{parameter}={v:g}: {m:.3f}±{h:.3f}s" for v, m, h in curve))
    if json_path:
        with open(json_path, "w") as handle:
            json.dump({"parameter": parameter, "curves": {n: [{"value": v, "mean_per_token_s": m, "ci95": h}
                                                              for v, m, h in c] for n, c in curves.items()}},
                      handle, indent=2)
    if plot:
        from blockswarm.sim.plots import plot_sweep

        plot_sweep(curves, parameter, f"{base.name}: sweep of {parameter}", plot)


def main() -> None:
    app()
