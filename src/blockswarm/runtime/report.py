"""Human-readable timing report of a generation: route, TTFT, per-token latency, time per hop."""

from __future__ import annotations

import statistics

from blockswarm.runtime.chain import describe


def timing_report(result) -> str:
    lines = [f"recovered: {repair}" for repair in result.repairs]
    lines += [f"reopened: {reopen}" for reopen in result.reopens]
    lines.append("route: " + describe(result.chain))
    n = len(result.token_ids)
    lines.append(f"tokens: {n}   time to first token: {result.ttft_s * 1e3:.1f} ms   "
                 f"per token (median): {result.median_token_s * 1e3:.1f} ms")
    for hop in result.hops:
        decode_rt = hop.round_trip_s[1:] or hop.round_trip_s
        decode_overhead = hop.overhead_s[1:] or hop.overhead_s
        server_overhead = hop.server_overhead_s[1:] or hop.server_overhead_s
        lines.append(f"  hop {hop.address}: median round trip {statistics.median(decode_rt) * 1e3:.2f} ms, "
                     f"of which transport {statistics.median(decode_overhead) * 1e3:.2f} ms "
                     f"(server side {statistics.median(server_overhead) * 1e3:.2f} ms)")
    return "\n".join(lines)
