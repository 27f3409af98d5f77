"""`blockswarm testbed run|down`: real swarms on emulated hosts and devices, against the simulator."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from blockswarm.cli.common import _check_writable, _fail, _interruptible, _require, _write_json, app

testbed_app = typer.Typer(help="Real swarms on an emulated wide-area network, next to the simulator.",
                          no_args_is_help=True)
app.add_typer(testbed_app, name="testbed")


@testbed_app.command("run")
def run(
    scenario: str = typer.Argument(..., help="A testbed scenario, e.g. scenarios/testbed/clustered-9.yaml."),
    policies: str = typer.Option("petals,cgbprr", help="Comma-separated policies, each run on its own swarm."),
    seed: int = typer.Option(1, help="Seed of the measured run (arrivals, lengths, PETALS' join order); "
                             "calibration uses seed + 1000."),
    calibration: Optional[str] = typer.Option(None, help="Reuse the runtime's constants of an earlier run's --json "
                                              "file (or benchmarks/sim_vs_real.py's) instead of calibrating "
                                              "again (they were fitted on the scenario's testbed.calibration)."),
    time_scale: Optional[float] = typer.Option(None, help="Divide every delay, device time and arrival gap by "
                                               "this (default: the scenario's testbed.time_scale)."),
    requests: Optional[int] = typer.Option(None, help="Requests of the measured run (default: the scenario's)."),
    json_path: Optional[str] = typer.Option(None, "--json", help="Write the results here."),
    plot: Optional[str] = typer.Option(None, help="Write a PNG: per-request predicted vs measured, and CDFs."),
    workdir: Optional[str] = typer.Option(None, help="Folder for the processes' logs (default: a temporary one)."),
):
    """Run the scenario on a real swarm (link emulator, coordinator, emulated servers, clients on their
    own loopback addresses) for each policy, and the simulator on the same seed; print both with the
    relative error per metric. The simulator's constants for the runtime's own costs are first
    fitted on runs of the calibration scenario the scenario names (one per policy, seed + 1000).

    Example: blockswarm testbed run scenarios/testbed/clustered-9.yaml --policies petals,cgbprr --seed 1 --json out.json"""
    _check_writable(json_path, "--json")
    _check_writable(plot, "--plot")
    _require(Path(scenario).is_file(), f"scenario file {scenario} does not exist")
    _require(calibration is None or Path(calibration).is_file(), f"--calibration file {calibration} does not exist")
    _require(time_scale is None or time_scale > 0, f"--time-scale must be positive, got {time_scale}")
    _require(requests is None or requests >= 1, f"--requests must be at least 1, got {requests}")
    names = [p.strip() for p in policies.split(",") if p.strip()]
    _require(bool(names), "--policies needs at least one policy, e.g. petals,cgbprr")
    import dataclasses
    import json
    import tempfile

    from blockswarm.core.errors import BlockswarmError
    from blockswarm.testbed.report import cgbprr_reduction, print_table, write_plot
    from blockswarm.testbed.calibration import Calibration
    from blockswarm.testbed.run import TestbedSettings, calibrate_on, run_policy

    with _interruptible("interrupted; the testbed's processes were stopped"):
        try:
            settings = TestbedSettings.of(scenario)
            if time_scale is not None:
                settings = dataclasses.replace(settings, time_scale=time_scale)
            if requests is not None:
                settings = dataclasses.replace(settings, requests=requests)
            folder = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="blockswarm-testbed-"))
            folder.mkdir(parents=True, exist_ok=True)
            typer.echo(f"testbed: {scenario}, time scale {settings.time_scale:g}, logs in {folder}", err=True)
            say = lambda line: typer.echo(line, err=True)  # noqa: E731
            if calibration:
                try:
                    fitted = Calibration.from_json(json.loads(Path(calibration).read_text()))
                except json.JSONDecodeError as exc:
                    _fail(f"--calibration {calibration} is not JSON: {exc}")
                say(f"constants of {calibration} (fitted on {fitted.scenario}, seed {fitted.seed})")
            else:
                fitted = calibrate_on(scenario, names, seed, settings, folder, say)
            results = {}
            for policy in names:
                results[policy] = run_policy(scenario, policy, seed, settings, folder, fitted.constants, say)
        except BlockswarmError as exc:
            _fail(str(exc))
    print_table(results)
    document = {"scenario": scenario, "seed": seed, "time_scale": settings.time_scale, "policies": results,
                "cgbprr_reduction": cgbprr_reduction(results), "calibration": fitted.to_json()}
    if json_path:
        from blockswarm.testbed.report import metadata

        _write_json(json_path, "--json", {**document, "meta": metadata()})
    if plot:
        write_plot(results, plot)


@testbed_app.command("down")
def down():
    """Stop whatever a crashed or killed testbed left running (its link emulator, coordinator, servers).

    Example: blockswarm testbed down"""
    from blockswarm.testbed.procs import down as stop_leftovers, our_listeners

    stopped = stop_leftovers()
    left = our_listeners()
    typer.echo(f"testbed down: {stopped} process(es) stopped" + (f"; still listening: {', '.join(left)}" if left else
                                                                 "; nothing of the testbed is left"))
    if left:
        raise typer.Exit(1)
