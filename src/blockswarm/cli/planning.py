"""Commands that plan and simulate deployments: plan, simulate, sweep (torch-free)."""

from __future__ import annotations

from typing import Optional

import typer

from blockswarm.cli.common import _check_writable, _fail, _interruptible, _require, _write_json, _writing, app


WORKERS_HELP = "Local processes to run the independent runs on (0: one per core; 1: in this process)."
RAY_HELP = ("Run them on a Ray cluster instead: `local` (a private instance here), `auto` (the cluster this "
            "machine is in) or ray://HOST:10001. Needs the ray extra. Results equal the serial run's.")


def _names(policies: str) -> list[str]:
    """Policy names, each checked before the first simulation runs (not after the others finished)."""
    from blockswarm.core.errors import ConfigError
    from blockswarm.planner.registry import parse_policy

    names = [p.strip() for p in policies.split(",") if p.strip()]
    _require(bool(names), f"--policies needs at least one policy, e.g. --policies petals,cgbprr; got {policies!r}")
    try:
        for name in names:
            parse_policy(name)
    except ConfigError as exc:
        _fail(str(exc))
    return names


@app.command()
def plan(
    scenario: str = typer.Argument(..., help="Scenario YAML file, e.g. scenarios/clustered-9.yaml."),
    policy: str = typer.Option("cgbprr", help="petals, cgbprr (CG-BP placement + WS-RR routing; wsrr is the same), "
                               "chains (GBP-CR + GCA + JFFC), jffc-whole, loadfit (ours), milp, rr-ilp, or a PLACEMENT+ROUTING "
                               "pair such as cgbp+shortest."),
    r: Optional[int] = typer.Option(None, "--R", help="Concurrent requests to size for (default: from the "
                                    "workload's rate, R = round(λT + sqrt(λT)))."),
    milp_requests: int = typer.Option(10, help="The MILP solves for at most this many concurrent requests."),
    time_limit: float = typer.Option(60.0, help="Solver time limit in seconds (milp, rr-ilp)."),
    json_path: Optional[str] = typer.Option(None, "--json", help="Write the plan as JSON here."),
):
    """Place blocks and route each client with a policy; print predictions and the bound."""
    _require(r is None or r >= 1, f"--R must be at least 1 concurrent request (or left out), got {r}")
    _require(milp_requests >= 1, f"--milp-requests must be at least 1, got {milp_requests}")
    _require(time_limit > 0, f"--time-limit must be a positive number of seconds, got {time_limit}")
    _check_writable(json_path, "--json")
    from blockswarm.core.errors import BlockswarmError
    from blockswarm.perf.scenario import load_scenario
    from blockswarm.planner.registry import plan as make_plan
    from blockswarm.planner.report import print_plan

    with _interruptible("interrupted; no plan"):
        try:
            result = make_plan(load_scenario(scenario), policy, R=r, milp_requests=milp_requests,
                               time_limit_s=time_limit)
        except BlockswarmError as exc:
            _fail(str(exc))
    print_plan(result)
    if json_path:
        _write_json(json_path, "--json", result.to_json())


def _load_for_sim(scenario: str, rate, output_tokens, requests, topology, topology_seed):
    from blockswarm.perf.scenario import load_scenario
    from blockswarm.sim.runner import with_workload

    loaded = with_workload(load_scenario(scenario), rate=rate, output_tokens=output_tokens, requests=requests)
    if topology:
        from blockswarm.sim.topology import place_on_topology, rtt_from_gml

        notes: list[str] = []
        loaded = place_on_topology(loaded, rtt_from_gml(topology, notes), topology_seed)
        for note in notes:
            typer.echo(f"note: {note}", err=True)
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
                                 "petals, cgbp, gbpcr, whole, loadfit; routings: petals, shortest, wsrr, jffc, wsrr-queue) "
                                 "or shorthands petals, cgbprr, chains (GBP-CR + GCA + JFFC from a central queue), "
                                 "jffc-whole, loadfit (ours: docs/POLICY.md)."),
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
    workers: int = typer.Option(0, help=WORKERS_HELP),
    ray: Optional[str] = typer.Option(None, "--ray", help=RAY_HELP),
):
    """Simulate the scenario's workload under each policy; print a table, optionally JSON and a plot.

    Example: blockswarm simulate scenarios/clustered-9.yaml --policies petals,cgbprr,chains --seeds 5 --json out.json
    """
    _check_overrides(seeds, requests, rate=rate, output_tokens=output_tokens)
    _require(burstiness > 0, f"--burstiness is the gaps' coefficient of variation and must be > 0 "
                             f"(1 = Poisson, above 1 burstier), got {burstiness}")
    names = _names(policies)
    fanout = _fanout(workers, ray)
    _check_writable(json_path, "--json")
    _check_writable(plot, "--plot")
    from rich.console import Console
    from rich.table import Table

    from blockswarm.core.errors import BlockswarmError
    from blockswarm.sim.experiments import compare

    with _interruptible("interrupted; nothing written"):
        try:
            loaded = _load_for_sim(scenario, rate, output_tokens, requests, topology, topology_seed)
            loaded, options = _with_trace(loaded, trace)
            options["burstiness"] = burstiness
            with _progress("simulating") as progress:
                task = progress.add_task("runs", total=len(names) * seeds)
                table = compare(loaded, names, seeds, progress=lambda: progress.advance(task), fanout=fanout,
                                **options)
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
        _write_json(json_path, "--json", {"scenario": loaded.name, "rate": w.rate, "output_tokens": w.output_tokens,
                                          "seeds": seeds, "policies": out, **out})
    if plot:
        from blockswarm.sim.plots import plot_comparison

        with _writing(plot, "--plot"):
            plot_comparison(table, f"{loaded.name}, {w.rate} req/s, {w.output_tokens} tokens", plot)


def _fanout(workers: int, ray: Optional[str]):
    """Where the runs execute; the numbers do not depend on it."""
    _require(workers >= 0, f"--workers must be 0 (one per core) or a number of processes, got {workers}")
    if ray:
        from blockswarm.rayfanout import RayFanout

        return RayFanout(ray, workers)
    from blockswarm.sim.fanout import LocalFanout

    return LocalFanout(workers)


def _with_trace(loaded, trace: Optional[str]):
    """(scenario with caches sized for the trace, simulate()'s options replaying it), or as it was."""
    if not trace:
        return loaded, {}
    from blockswarm.sim.runner import fit_to_requests
    from blockswarm.sim.workload import load_trace

    replay = load_trace(trace, len(loaded.clients))
    return fit_to_requests(loaded, replay), {"requests": replay}


def _check_overrides(seeds: int, requests: Optional[int], rate: Optional[float] = None,
                     output_tokens: Optional[int] = None) -> None:
    """Counts and rates that would make a run empty or divide by zero (a table of NaN, a traceback)."""
    _require(seeds >= 1, f"--seeds must be at least 1 (runs per policy), got {seeds}")
    _require(requests is None or requests >= 1, f"--requests must be at least 1 per run, got {requests}")
    _require(rate is None or rate > 0, f"--rate must be a positive number of requests per second, got {rate}")
    _require(output_tokens is None or output_tokens >= 1, f"--output-tokens must be at least 1, got {output_tokens}")


def _sweep_points(parameter: str, values: str) -> list[float]:
    """The values to sweep, each one checked against what `parameter` can take."""
    from blockswarm.sim.experiments import SWEEPABLE

    _require(parameter in SWEEPABLE, f"--parameter {parameter!r} cannot be swept; choose one of "
                                     f"{', '.join(SWEEPABLE)}")
    try:
        points = [float(v) for v in values.split(",") if v.strip()]
    except ValueError:
        _fail(f"--values must be numbers separated by commas, e.g. 0.1,0.2,0.5; got {values!r}")
    _require(bool(points), f"--values needs at least one number, e.g. --values 0.1,0.2,0.5; got {values!r}")
    for value in points:
        if parameter in ("servers", "output"):
            _require(value >= 1 and value.is_integer(), f"--values for {parameter} must be whole numbers >= 1, "
                                                        f"got {value:g}")
        elif parameter == "rate":
            _require(value > 0, f"--values for rate must be positive requests per second, got {value:g}")
        else:
            _require(0 <= value <= 1, f"--values for fast-share must be fractions in [0, 1], got {value:g}")
    return points


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
    rate: Optional[float] = typer.Option(None, help="The arrival rate at every point (requests/s), unless swept."),
    topology: Optional[str] = typer.Option(None, help="GML topology: servers and clients go on its nodes, e.g. "
                                           "scenarios/topologies/GtsCe.gml."),
    topology_seed: int = typer.Option(0, help="Seed for placing servers and clients on the topology."),
    trace: Optional[str] = typer.Option(None, help="Replay this trace at every point (our CSV or Azure's)."),
    workers: int = typer.Option(0, help=WORKERS_HELP),
    ray: Optional[str] = typer.Option(None, "--ray", help=RAY_HELP),
):
    """Vary one parameter and plot the mean per-token time per policy.

    Example: blockswarm sweep scenarios/clustered-9.yaml --parameter rate --values 0.1,0.5,1 --policies petals,cgbprr

    The first study's scattered sweeps: --topology scenarios/topologies/Abvt.gml with --parameter
    servers, fast-share, rate or output.
    """
    points = _sweep_points(parameter, values)
    _check_overrides(seeds, requests, rate=rate)
    _require(not (trace and parameter == "rate"), "--trace fixes the arrivals; sweep another parameter")
    names = _names(policies)
    fanout = _fanout(workers, ray)
    _check_writable(json_path, "--json")
    _check_writable(plot, "--plot")
    from blockswarm.core.errors import BlockswarmError
    from blockswarm.sim.experiments import compare_many, vary

    curves: dict[str, list] = {name: [] for name in names}
    with _interruptible("interrupted; nothing written"):
        try:
            base = _load_for_sim(scenario, rate, None, requests, topology, topology_seed)
            base, options = _with_trace(base, trace)
            with _progress(f"sweeping {parameter}") as progress:
                task = progress.add_task("runs", total=len(points) * len(names) * seeds)
                tables = compare_many([vary(base, parameter, value) for value in points], names, seeds,
                                      progress=lambda: progress.advance(task), fanout=fanout, **options)
                for value, table in zip(points, tables):
                    for name in names:
                        curves[name].append((value, table[name]["mean_per_token_s"],
                                             table[name]["mean_per_token_s_ci95"]))
        except BlockswarmError as exc:
            _fail(str(exc))
    for name, curve in curves.items():
        typer.echo(f"{name:>16}: " + "  ".join(f"{parameter}={v:g}: {m:.3f}±{h:.3f}s" for v, m, h in curve))
    if json_path:
        _write_json(json_path, "--json", {"parameter": parameter,
                                          "curves": {n: [{"value": v, "mean_per_token_s": m, "ci95": h}
                                                         for v, m, h in c] for n, c in curves.items()}})
    if plot:
        from blockswarm.sim.plots import plot_sweep

        with _writing(plot, "--plot"):
            plot_sweep(curves, parameter, f"{base.name}: sweep of {parameter}", plot)
