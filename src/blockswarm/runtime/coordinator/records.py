"""The coordinator's plain data: server and reservation records, its settings and constants, and the
live RTT view the planner reads. No decisions here (`swarm.py`, `placing.py`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

HEARTBEAT_S = 1.0  # servers report their load this often...
MISSES = 3  # ...and one silent for this many periods is gone
SETTLE_S = 2.0  # servers that join within this window of each other are placed together
GRACE_S = 15.0  # after a restart, servers on record must report within this or are dropped
DEFAULT_RTT_S = 0.001  # a client-server pair nobody has measured yet (loopback/LAN scale)
DEFAULT_RATE = 0.1  # requests/s assumed for R before any arrival was seen (the scenario default)
RATE_WINDOW_S = 300.0  # arrival rate measured over this sliding window...
RATE_MIN_ARRIVALS = 5  # ...once it holds this many arrivals
TICKET_S = 600.0  # a ticket opens sessions for this long after it was issued
R_CHECK_S = 30.0  # without --R, the rate's R is compared with the placed one this often...
R_REPLACE_S = 300.0  # ...and the swarm is re-placed at most this often
GONE_KEPT_S = 300.0  # a gone server stays in `status` this long
TYPICAL_TOKENS = 64  # prompt and output lengths for predictions and R (not for cache sizing)
STATES = ("loading", "serving", "draining", "gone")


@dataclass
class ServerRecord:
    id: str
    address: str  # control host:port
    data_port: int
    device: str
    memory_bytes: int
    block_decode_s: float
    block_prefill_s_per_token: float
    block_prefill_base_s: float
    secret: str  # tickets for this server are signed with it
    key: str | None = None  # its CURVE public key (z85), as authenticated, in a private swarm
    start: int | None = None
    end: int | None = None
    slots: int = 0  # block-sessions the coordinator may reserve here
    cache_tokens: int = 0  # the server's cache budget, tokens per block of its span
    state: str = "loading"
    loaded: bool = False  # the server reported serving its assigned span
    free_cache_tokens: int = 0
    sessions: int = 0
    joined: float = 0.0
    last_seen: float = 0.0
    sequence: int = 0  # registration order: the scenario's server order (times can tie)
    restored: bool = False  # read from the state file and not heard from since


@dataclass
class Reservation:
    id: str
    client: str
    hops: list[list]  # [server id, start, end] per hop
    max_length: int
    start_at: float  # when every hop has its slots (WS-RR may answer with a later time)
    expected_end: float
    lease_until: float  # a vanished client's reservation is dropped then


@dataclass(frozen=True)
class SwarmConfig:
    model: str  # the name servers must report (e.g. smollm2)
    policy: str = "cgbprr"
    R: int | None = None  # fixed R; None: from the measured arrival rate
    session_tokens: int = 2048  # the longest session (prompt + new tokens) cache is sized for
    hop_overhead_s: float = 0.001  # the runtime's per-hop transport cost, t_cj = RTT + this
    hold_s: float = 30.0  # a request WS-RR would start later than this gets cache_full instead


class MeasuredRtts(Mapping):
    """RTTs as NetworkSpec reads them: what clients measured, DEFAULT_RTT_S for any pair not
    measured. A view onto the live measurements, so a report changes no scenario."""

    def __init__(self, measured: dict):
        self._measured = measured

    def __getitem__(self, pair):
        measured = self._measured.get(pair)
        if measured is None:
            measured = self._measured.get(pair[::-1], DEFAULT_RTT_S)
        return measured

    def __contains__(self, pair) -> bool:
        return True

    def __iter__(self):
        return iter(self._measured)

    def __len__(self):
        return max(1, len(self._measured))


def missing_blocks_text(coverage: list[int]) -> str | None:
    """'blocks 10..14 and 20 have no server', or None when every block is held."""
    gaps, run = [], None
    for block, holders in enumerate([*coverage, 1]):
        if holders == 0 and run is None:
            run = block
        elif holders and run is not None:
            gaps.append(f"{run}..{block - 1}" if block - 1 > run else f"{run}")
            run = None
    if not gaps:
        return None
    return f"block{'s' if len(gaps) > 1 or '..' in gaps[0] else ''} {', '.join(gaps)} of {len(coverage)} " \
           "have no serving server"
