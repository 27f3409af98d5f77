"""RTT from geography: the wide-area part of the performance model.

RTT = 2 · stretch · great-circle distance / v_fibre + base, with v_fibre = 2.0e8 m/s (light in
glass, ≈ c / 1.47), stretch = 1.5 (fibre paths are longer than the great circle; measured
stretch between cities is typically 1.3-2) and base = 1 ms for switching and end hosts.
"""

from __future__ import annotations

import math

FIBRE_M_PER_S = 2.0e8
STRETCH = 1.5
BASE_RTT_S = 0.001
EARTH_RADIUS_M = 6_371_000.0
LOCAL_RTT_S = 0.0005  # two hosts at the same site


def great_circle_m(a: tuple[float, float], b: tuple[float, float]) -> float:
    """Distance in metres between two (latitude, longitude) points in degrees (haversine)."""
    lat1, lon1, lat2, lon2 = map(math.radians, (*a, *b))
    h = math.sin((lat2 - lat1) / 2) ** 2 + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2
    return 2 * EARTH_RADIUS_M * math.asin(min(1.0, math.sqrt(h)))


def rtt_from_coordinates(sites: dict[str, tuple[float, float]], stretch: float = STRETCH,
                         base_s: float = BASE_RTT_S) -> dict[tuple[str, str], float]:
    """RTT between every pair of sites given as name -> (latitude, longitude) in degrees."""
    return {(a, b): (LOCAL_RTT_S if a == b else 2 * stretch * great_circle_m(sites[a], sites[b]) / FIBRE_M_PER_S
                     + base_s)
            for a in sites for b in sites}
