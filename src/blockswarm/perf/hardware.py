"""Hardware catalogue and per-block times: measured profiles where we have them, a formula otherwise.

Profiles (seconds) come from the PETALS measurements in shared/spec/allocation.md §7.
Without a profile, times scale from the A100 profile of BLOOM-176B by memory bandwidth and FLOPs:

    τ_decode   = s_m / (B · η_B),           η_B = s_m,BLOOM / (B_A100 · τ_A100)       ≈ 0.20
    τᴵ_slope   = 2·P_block / (F · η_F),     η_F = 2·P_BLOOM / (F_A100 · slope_A100)    ≈ 0.21
    τᴵ_base    = τ_decode · (base_A100 / τ_A100)                                       ≈ 10.2 τ

with s_m the bytes of one block, P_block its parameters, B memory bandwidth (bytes/s) and F dense
16-bit FLOP/s: decode is bandwidth-bound (every weight read once per token), prefill FLOP-bound.
"""

from __future__ import annotations

from dataclasses import dataclass

from blockswarm.core.errors import ConfigError
from blockswarm.core.specs import ModelSpec


@dataclass(frozen=True, slots=True)
class Hardware:
    name: str
    memory_bytes: float  # usable for weights and cache
    bandwidth_bytes_s: float
    flops: float


GB = 1e9
HARDWARE: dict[str, Hardware] = {
    "a100-80gb": Hardware("a100-80gb", 79.13 * GB, 2039 * GB, 312e12),
    "mig-1g.10gb": Hardware("mig-1g.10gb", 8.2 * GB, 2039 * GB / 8, 312e12 / 7),
    # the follow-up study's slices of an A100 80GB (its config/PetalsProfiledParameters.m)
    "mig-2g.20gb": Hardware("mig-2g.20gb", 20.0 * GB, 2039 * GB / 4, 78e12),
    "mig-3g.40gb": Hardware("mig-3g.40gb", 40.0 * GB, 2039 * GB / 2, 156e12),
    "a10g": Hardware("a10g", 22.5 * GB, 600 * GB, 70e12),
    "t4": Hardware("t4", 14.5 * GB, 320 * GB, 65e12),
    "rtx3090": Hardware("rtx3090", 23.0 * GB, 936 * GB, 71e12),
    "rtx4090": Hardware("rtx4090", 23.0 * GB, 1008 * GB, 165e12),
    "h100": Hardware("h100", 79.0 * GB, 3350 * GB, 989e12),
    "cpu": Hardware("cpu", 32 * GB, 20 * GB, 1e12),
}

# (model, hardware) -> (τ decode, prefill slope per prompt token, prefill base), seconds per block
PROFILES: dict[tuple[str, str], tuple[float, float, float]] = {
    ("bloom-176b", "a100-80gb"): (3.2197e-3, 0.0743e-3, 32.99e-3),
    ("bloom-176b", "mig-1g.10gb"): (16.2488e-3, 0.1041e-3, 206.3547e-3),
}
_REF_DECODE, _REF_SLOPE, _REF_BASE = PROFILES[("bloom-176b", "a100-80gb")]
_REF_BLOCK_BYTES = 2_466_437_120 * 4.25 / 8 * 1.01
_REF_PARAMS = 2_466_437_120
ETA_BANDWIDTH = _REF_BLOCK_BYTES / (HARDWARE["a100-80gb"].bandwidth_bytes_s * _REF_DECODE)
ETA_FLOPS = 2 * _REF_PARAMS / (HARDWARE["a100-80gb"].flops * _REF_SLOPE)


def hardware(name: str) -> Hardware:
    try:
        return HARDWARE[name]
    except KeyError:
        raise ConfigError(f"unknown hardware {name!r}; known: {', '.join(sorted(HARDWARE))}") from None


def block_times(model: ModelSpec, hw: Hardware) -> tuple[float, float, float]:
    """(τ decode, prefill slope, prefill base) in seconds per block, profiled or derived."""
    if (model.name, hw.name) in PROFILES:
        return PROFILES[(model.name, hw.name)]
    decode = model.block_bytes / (hw.bandwidth_bytes_s * ETA_BANDWIDTH)
    slope = 2 * model.params_per_block / (hw.flops * ETA_FLOPS)
    return decode, slope, decode * _REF_BASE / _REF_DECODE
