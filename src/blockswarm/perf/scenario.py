"""Load and validate a scenario file (YAML); every error names the offending field.

It lives in perf, not core, because filling in a server's per-block times from its hardware
is the performance model's job (perf/hardware.py). Format (see scenarios/clustered-9.yaml):

    name: clustered-9
    model: {catalogue: bloom-176b, weight_bytes_per_param: 0.53125, weight_overhead: 1.01, kv_bytes: 2}
    servers:
      - {count: 2, hardware: a100-80gb, location: cluster1, memory_gb: 79.13}   # times from the catalogue
      - {count: 1, location: x, memory_gb: 8, decode_ms: 16, prefill_ms_per_token: 0.1, prefill_base_ms: 200}
    clients: [{name: client0, location: cluster0}]
    network:
      rtt_ms: {within: 5, between: 100}          # or pairs: {"cluster0 cluster1": 100, ...}
      # or, instead of rtt_ms: coordinates: {cluster0: [48.86, 2.35], ...} and stretch: 1.5
      # (RTT from great-circle distance through fibre, perf/network.py)
      decode_overhead_ms: 100
      prefill_overhead_ms: 67
      prefill_ms_per_token: 0.7049
      setup_ms: 70
    workload: {rate: 0.1, requests: 100, prompt_tokens: 20, output_tokens: 128}
    # optional: how the published studies' swarms behaved (published-runs.md), all off by default
    behaviour:
      profile: published                     # = the three lines below
      allocation_delay_s: {cgbprr: 60, petals: 250}
      backoff_rounding: true                 # WS-RR waits end at PETALS' back-off instants 1, 3, 7, 15 … s
      max_blocks: {mig-1g.10gb: 4}           # CG-BP's cap per hardware
      petals_join_order: [7, 2, 5, 0, 4, 1, 6, 8, 3]   # server indices; default: random per seed
    # or what blockswarm's runtime does (the testbed fits these to measurements):
    behaviour:
      profile: runtime                       # = hop_level: true
      hop_level: true                        # every step's every hop; a server computes one step at a time
      host_block_s: 0.0012                   # its serial work per block per step (default: its device's time)
      client_step_s: 0.0017                  # the client's own work per step
      open_rtts: 3                           # set-up: network.setup_ms + this many RTTs to each hop's server
      open_hop_s: 0.0008                     #   + this per hop
      coordinator: london                    #   + open_rtts RTTs to a coordinator at this location (default: none)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from blockswarm.core.catalogue import MODELS
from blockswarm.core.errors import ConfigError
from blockswarm.core.specs import Behaviour, ClientSpec, ModelSpec, NetworkSpec, Scenario, ServerSpec, WorkloadSpec
from blockswarm.perf.hardware import block_times, hardware
from blockswarm.perf.network import STRETCH, rtt_from_coordinates
from blockswarm.perf.trace import trace_rows


def load_scenario(path: str | Path) -> Scenario:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"scenario file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    return parse_scenario(data, source=str(path))


def parse_scenario(data: Any, source: str = "scenario") -> Scenario:
    data = _mapping(data, source)
    model = _model(_mapping(data.get("model"), "model"))
    servers = _servers(data.get("servers"), model)
    clients = _clients(data.get("clients"))
    locations = {s.location for s in servers} | {c.location for c in clients}
    network = _network(_mapping(data.get("network"), "network"), locations)
    workload = _workload(_mapping(data.get("workload", {}), "workload"), source)
    behaviour = _behaviour(_mapping(data.get("behaviour", {}), "behaviour"), servers, locations)
    return Scenario(str(data.get("name", Path(source).stem)), model, servers, clients, network, workload, behaviour)


# What the published clustered runs did beyond their inputs (published-runs.md §A)
PUBLISHED = dict(allocation_delay_s={"cgbprr": 60.0, "petals": 250.0}, backoff_rounding=True,
                 max_blocks={"mig-1g.10gb": 4})
PROFILES = {"default": {}, "published": PUBLISHED, "runtime": {"hop_level": True}}


def _behaviour(data: dict, servers: tuple[ServerSpec, ...], locations: set[str]) -> Behaviour:
    known = {"profile", "allocation_delay_s", "backoff_rounding", "max_blocks", "petals_join_order", "hop_level",
             "host_block_s", "client_step_s", "open_rtts", "open_hop_s", "coordinator"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"behaviour.{unknown[0]}: unknown field; known: {', '.join(sorted(known))}")
    profile = data.get("profile", "default")
    if profile not in PROFILES:
        raise ConfigError(f"behaviour.profile: must be one of {', '.join(PROFILES)}, got {profile!r}")
    values = dict(PROFILES[profile])
    if "allocation_delay_s" in data:
        delays = _mapping(data["allocation_delay_s"], "behaviour.allocation_delay_s")
        values["allocation_delay_s"] = {str(k): float(_number(delays, k, "behaviour.allocation_delay_s"))
                                        for k in delays}
    if "backoff_rounding" in data:
        if not isinstance(data["backoff_rounding"], bool):
            raise ConfigError(f"behaviour.backoff_rounding: must be true or false, got {data['backoff_rounding']!r}")
        values["backoff_rounding"] = data["backoff_rounding"]
    if "max_blocks" in data:
        caps = _mapping(data["max_blocks"], "behaviour.max_blocks")
        values["max_blocks"] = {str(k): _number(caps, k, "behaviour.max_blocks", minimum=1, integer=True)
                                for k in caps}
    if "petals_join_order" in data:
        order = data["petals_join_order"]
        if not isinstance(order, list) or sorted(order) != list(range(len(servers))):
            raise ConfigError(f"behaviour.petals_join_order: must list every server index 0..{len(servers) - 1} "
                              f"once, got {order!r}")
        values["petals_join_order"] = tuple(order)
    if "hop_level" in data:
        if not isinstance(data["hop_level"], bool):
            raise ConfigError(f"behaviour.hop_level: must be true or false, got {data['hop_level']!r}")
        values["hop_level"] = data["hop_level"]
    for key in ("host_block_s", "client_step_s", "open_rtts", "open_hop_s"):
        if key in data:
            values[key] = float(_number(data, key, "behaviour"))
    if "coordinator" in data:
        if data["coordinator"] not in locations:
            raise ConfigError(f"behaviour.coordinator: must be a location of a server or client "
                              f"({', '.join(sorted(locations))}), got {data['coordinator']!r}")
        values["coordinator"] = data["coordinator"]
    return Behaviour(profile=profile, **values)


def _mapping(value, field: str) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"{field}: must be a mapping, got {type(value).__name__}")
    return value


def _number(data: dict, key: str, field: str, default=None, minimum: float = 0.0, integer: bool = False):
    value = data.get(key, default)
    if value is None:
        raise ConfigError(f"{field}.{key}: required")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise ConfigError(f"{field}.{key}: must be {'an integer' if integer else 'a number'}, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{field}.{key}: must be >= {minimum}, got {value}")
    return value


def _model(data: dict) -> ModelSpec:
    if "catalogue" in data:
        name = data["catalogue"]
        if name not in MODELS:
            raise ConfigError(f"model.catalogue: unknown model {name!r}; known: {', '.join(sorted(MODELS))}")
        base = MODELS[name]
    else:
        base = ModelSpec(name=str(data.get("name", "custom")),
                         num_blocks=_number(data, "num_blocks", "model", minimum=1, integer=True),
                         d_model=_number(data, "d_model", "model", minimum=1, integer=True),
                         d_kv=_number(data, "d_kv", "model", default=data.get("d_model"), minimum=1, integer=True),
                         params_per_block=_number(data, "params_per_block", "model", minimum=1, integer=True))
    overrides = {key: _number(data, key, "model", minimum=1e-9)
                 for key in ("weight_bytes_per_param", "weight_overhead", "kv_bytes") if key in data}
    return dataclasses.replace(base, **overrides)


def _servers(groups, model: ModelSpec) -> tuple[ServerSpec, ...]:
    if not isinstance(groups, list) or not groups:
        raise ConfigError("servers: must be a non-empty list of server groups")
    servers = []
    for index, group in enumerate(groups):
        field = f"servers[{index}]"
        group = _mapping(group, field)
        count = _number(group, "count", field, default=1, minimum=1, integer=True)
        if "location" not in group:
            raise ConfigError(f"{field}.location: required")
        hw_name = group.get("hardware")
        hw = hardware(hw_name) if hw_name else None
        if hw is None and "memory_gb" not in group:
            raise ConfigError(f"{field}: give hardware (one of the catalogue) or memory_gb and times")
        memory = _number(group, "memory_gb", field, default=hw.memory_bytes / 1e9 if hw else None, minimum=1e-9) * 1e9
        decode, slope, base = block_times(model, hw) if hw else (None, None, None)
        decode = _number(group, "decode_ms", field, default=decode * 1e3 if decode else None, minimum=1e-9) / 1e3
        slope = _number(group, "prefill_ms_per_token", field, default=slope * 1e3 if slope is not None else 0.0) / 1e3
        base = _number(group, "prefill_base_ms", field, default=base * 1e3 if base is not None else 0.0) / 1e3
        for k in range(count):
            name = str(group.get("name", f"{hw_name or 'server'}-{len(servers)}"))
            if count > 1 and "name" in group:
                name = f"{name}-{k}"
            servers.append(ServerSpec(name, str(group["location"]), memory, decode, slope, base, hw_name or "custom"))
    return tuple(servers)


def _clients(items) -> tuple[ClientSpec, ...]:
    if not isinstance(items, list) or not items:
        raise ConfigError("clients: must be a non-empty list of {name, location}")
    clients = []
    for index, item in enumerate(items):
        item = _mapping(item, f"clients[{index}]")
        if "location" not in item:
            raise ConfigError(f"clients[{index}].location: required")
        rate = _number(item, "rate", f"clients[{index}]") if "rate" in item else None
        clients.append(ClientSpec(str(item.get("name", f"client{index}")), str(item["location"]), rate))
    return tuple(clients)


def _pairs(data, field: str, locations: set[str], scale: float) -> dict[tuple[str, str], float]:
    data = _mapping(data, field)
    if set(data) <= {"within", "between"}:
        within = _number(data, "within", field, default=0.0)
        between = _number(data, "between", field, default=within)
        return {(a, b): (within if a == b else between) * scale for a in locations for b in locations}
    pairs = {}
    for key, value in data.items():
        parts = str(key).split()
        if len(parts) != 2:
            raise ConfigError(f"{field}: keys must be 'LOCATION_A LOCATION_B', got {key!r}")
        pairs[(parts[0], parts[1])] = _number(data, key, field) * scale
    for a in locations:
        for b in locations:
            if (a, b) not in pairs and (b, a) not in pairs:
                raise ConfigError(f"{field}: no value for {a} <-> {b}")
    return pairs


def _coordinates(data, locations: set[str]) -> dict[str, tuple[float, float]]:
    data = _mapping(data, "network.coordinates")
    sites = {}
    for name, value in data.items():
        if (not isinstance(value, list) or len(value) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
                or not -90 <= value[0] <= 90 or not -180 <= value[1] <= 180):
            raise ConfigError(f"network.coordinates.{name}: must be [latitude, longitude] in degrees, got {value!r}")
        sites[str(name)] = (float(value[0]), float(value[1]))
    missing = sorted(locations - sites.keys())
    if missing:
        raise ConfigError(f"network.coordinates: no coordinates for {', '.join(missing)}")
    return sites


def _network(data: dict, locations: set[str]) -> NetworkSpec:
    if "coordinates" in data:
        if "rtt_ms" in data:
            raise ConfigError("network: give rtt_ms or coordinates, not both")
        stretch = _number(data, "stretch", "network", STRETCH, minimum=1.0)
        rtt = rtt_from_coordinates(_coordinates(data["coordinates"], locations), stretch)
    else:
        rtt = _pairs(data.get("rtt_ms", {"within": 5, "between": 100}), "network.rtt_ms", locations, 1e-3)
    bandwidth = _pairs(data.get("bandwidth_mbps", {"within": 1000, "between": 100}), "network.bandwidth_mbps",
                       locations, 1e6)
    defaults = NetworkSpec(rtt_s={})
    return NetworkSpec(
        rtt_s=rtt, bandwidth_bps=bandwidth,
        decode_overhead_s=_number(data, "decode_overhead_ms", "network", defaults.decode_overhead_s * 1e3) / 1e3,
        prefill_overhead_s=_number(data, "prefill_overhead_ms", "network", defaults.prefill_overhead_s * 1e3) / 1e3,
        prefill_s_per_token=_number(data, "prefill_ms_per_token", "network", defaults.prefill_s_per_token * 1e3) / 1e3,
        setup_s=_number(data, "setup_ms", "network", defaults.setup_s * 1e3) / 1e3,
    )


def _workload(data: dict, source: str) -> WorkloadSpec:
    if "trace" in data:
        return _trace_workload(data, source)
    prompt = _number(data, "prompt_tokens", "workload", 20, minimum=1, integer=True)
    output = _number(data, "output_tokens", "workload", 128, minimum=1, integer=True)
    return WorkloadSpec(
        rate=_number(data, "rate", "workload", 0.1, minimum=1e-12),
        num_requests=_number(data, "requests", "workload", 100, minimum=1, integer=True),
        prompt_tokens=prompt, output_tokens=output,
        max_prompt_tokens=_number(data, "max_prompt_tokens", "workload", prompt, minimum=prompt, integer=True),
        max_output_tokens=_number(data, "max_output_tokens", "workload", output, minimum=output, integer=True),
        seed=_number(data, "seed", "workload", 0, integer=True),
        arrivals=_choice(data, "arrivals", "workload", ("poisson", "matlab")),
        matlab_seed=_number(data, "matlab_seed", "workload", 42, integer=True),
        matlab_skip=_number(data, "matlab_skip", "workload", 0, integer=True),
    )


def _trace_workload(data: dict, source: str) -> WorkloadSpec:
    """A trace replay: the rows used give the typical lengths (their means, for planners) and the
    cache's size (the longest prompt + output among them)."""
    unknown = sorted(set(data) - {"trace", "requests", "context_tokens", "time_scale", "seed"})
    if unknown:
        raise ConfigError(f"workload.{unknown[0]}: not used with a trace (its rows give arrivals and lengths)")
    path = Path(str(data["trace"]))
    if not path.is_absolute():
        path = Path(source).parent / path
    return trace_workload(str(path), _number(data, "requests", "workload", 1000, minimum=1, integer=True),
                          _number(data, "context_tokens", "workload", 0, minimum=0, integer=True) or None,
                          _number(data, "time_scale", "workload", 1.0, minimum=1e-9),
                          _number(data, "seed", "workload", 0, integer=True))


def trace_workload(path: str, count: int, context: int | None, time_scale: float = 1.0,
                   seed: int = 0) -> WorkloadSpec:
    """The workload replaying a trace's first `count` rows: their rate, their mean lengths (what
    planners size for) and the longest prompt + output among them (what caches are sized for)."""
    rows = trace_rows(path, count, context, time_scale)
    span = rows[-1][0] - rows[0][0]
    longest_output = max(r[2] for r in rows)
    return WorkloadSpec(
        rate=(len(rows) - 1) / span if span > 0 else 1.0, num_requests=len(rows),
        prompt_tokens=max(1, round(sum(r[1] for r in rows) / len(rows))),
        output_tokens=max(1, round(sum(r[2] for r in rows) / len(rows))),
        max_prompt_tokens=max(r[1] + r[2] for r in rows) - longest_output, max_output_tokens=longest_output,
        seed=seed, trace=path, context_tokens=context, trace_time_scale=time_scale)


def _choice(data: dict, key: str, field: str, choices: tuple[str, ...]) -> str:
    value = data.get(key, choices[0])
    if value not in choices:
        raise ConfigError(f"{field}.{key}: must be one of {', '.join(choices)}, got {value!r}")
    return value
