"""Print a plan as tables (rich): placement, routes, predictions, bound, solver status."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def print_plan(result, console: Console | None = None) -> None:
    console = console or Console()
    scenario = result.scenario
    data = result.to_json()
    table = Table(title=f"{data['scenario']}: placement by {result.policy} (R = {result.R})")
    for column in ("server", "device", "location", "blocks", "span", "sessions guaranteed"):
        table.add_column(column)
    for span in result.placement.spans:
        spec = scenario.servers[span.server]
        table.add_row(spec.name, spec.hardware, spec.location, str(span.length), f"{span.start}:{span.end}",
                      str(span.slots // span.length))
    console.print(table)
    routes = Table(title="routes (no contention)")
    for column in ("client", "route", "per-token s", "TTFT s"):
        routes.add_column(column)
    predictions = result.predictions()
    for client, route in result.routes.items():
        path = " → ".join(f"{scenario.servers[h.server].name}[{h.start}:{h.end}]" for h in route.hops)
        per_token, ttft = predictions[client]
        routes.add_row(scenario.clients[client].name, path, f"{per_token:.4f}", f"{ttft:.3f}")
    console.print(routes)
    console.print(f"predicted per-token time {data['predicted_per_token_s']:.4f} s, TTFT {data['predicted_ttft_s']:.3f} s")
    if result.bound_per_token_s is not None:
        console.print(f"Theorem-2 bound on the average per-token time: {result.bound_per_token_s:.4f} s")
    if result.solver:
        s = result.solver
        gap = f"{s['gap']:.2%}" if s["gap"] is not None else "n/a"
        console.print(f"solver: {s['status']} in {s['seconds']:.2f} s, gap {gap}, {s['requests']} requests")
    for note in result.notes:
        console.print(f"note: {note}")
