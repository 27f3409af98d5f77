"""The coordinator's decisions, driven directly with fabricated registrations (no sockets, no model):
placement through the planner's registry, routing equal to the planner's on the same view,
reservations, restarts from the SQLite state, repairs, and tickets."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blockswarm.core.errors import BadRequest, CacheFull, Infeasible, TooLarge
from blockswarm.core.specs import Request
from blockswarm.planner import cgbprr, live, petals
from blockswarm.planner.registry import PLACEMENTS, decide
from blockswarm.planner.view import SwarmView
from blockswarm.runtime.coordinator.store import Store
from blockswarm.runtime.coordinator.swarm import GRACE_S, SETTLE_S, Swarm, SwarmConfig, missing_blocks_text
from blockswarm.runtime.tickets import Ticket, new_secret

MiB = 2**20
SHAPE = {"model": "smollm2", "fingerprint": "llama-576-30", "num_blocks": 30, "hidden_size": 576, "d_kv": 192,
         "params_per_block": 3540096, "dtype": "float32", "itemsize": 4}


class Clock:
    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def registration(port: int, memory_mib: int, decode_ms: float = 4.0) -> dict:
    return {**SHAPE, "address": f"127.0.0.1:{port}", "data_port": port + 1, "device": "cpu",
            "memory_bytes": memory_mib * MiB, "block_decode_s": decode_ms / 1e3,
            "block_prefill_s_per_token": 1e-4, "block_prefill_base_s": 1e-3, "start": None, "end": None}


def serve_all(swarm: Swarm) -> None:
    """Every assigned server reports it serves its span."""
    for record in swarm.members():
        if record.start is not None:
            swarm.heartbeat(record.id, {"state": "serving", "start": record.start, "end": record.end,
                                        "free_cache_tokens": record.cache_tokens, "sessions": 0})


def placed_swarm(memories=(400, 300, 200), decode_ms=(4.0, 8.0, 4.0), R=2, store=None, policy="cgbprr",
                 clock=None) -> Swarm:
    clock = clock or Clock()
    swarm = Swarm(SwarmConfig("smollm2", policy=policy, R=R), store, clock)
    for i, (memory, decode) in enumerate(zip(memories, decode_ms)):
        swarm.register(registration(6000 + 10 * i, memory, decode))
    clock.now += SETTLE_S
    swarm.place()
    serve_all(swarm)
    return swarm


def spans(swarm: Swarm) -> list[tuple[int, int]]:
    return [(r.start, r.end) for r in swarm.members()]


@pytest.mark.parametrize("policy", ["cgbprr", "petals"])
def test_servers_are_placed_by_the_registry_policy_exactly(policy):
    # PETALS keeps a fixed 16k-token cache per block and an autograd reserve: it needs more memory
    swarm = placed_swarm(policy=policy, memories=(400, 300, 200) if policy == "cgbprr" else (900, 700, 500))
    placement = PLACEMENTS[swarm.placement_name](swarm.scenario(), 2, 0)
    assert spans(swarm) == [(s.start, s.end) for s in placement.spans]
    assert [r.slots for r in swarm.members()] == [s.slots for s in placement.spans]
    assert all(r.state == "serving" for r in swarm.members())


def test_servers_that_join_together_are_placed_together():
    clock = Clock()
    swarm = Swarm(SwarmConfig("smollm2", R=2), None, clock)
    swarm.register(registration(6000, 400))
    clock.now += SETTLE_S / 2
    swarm.place()
    assert swarm.members()[0].start is None  # still settling: a second server may be on its way
    swarm.register(registration(6010, 300))
    swarm.register(registration(6020, 200))
    clock.now += SETTLE_S / 2
    swarm.place()
    assert all(r.start is None for r in swarm.members())
    clock.now += SETTLE_S
    swarm.place()
    assert spans(swarm) == [(s.start, s.end) for s in cgbprr.place(swarm.scenario(), 2).placement.spans]


def test_cache_budget_is_what_memory_leaves_after_the_weights():
    swarm = placed_swarm()
    model = swarm.scenario().model
    for record in swarm.members():
        blocks = record.end - record.start
        free = record.memory_bytes - model.block_bytes * blocks
        assert record.cache_tokens == int(free // (2 * 192 * 4 * blocks))
        # the coordinator never reserves more than the server's budget holds
        assert record.slots * swarm.config.session_tokens <= record.cache_tokens * blocks


def independent_view(swarm: Swarm) -> SwarmView:
    """The planner's view of the same state, built here from the records and reservations."""
    scenario = swarm.scenario()
    position = {r.id: i for i, r in enumerate(swarm.members())}
    placement = swarm.serving()
    active: dict[int, list] = {}
    for reservation in swarm.reservations.values():
        for server, start, end in reservation.hops:
            active.setdefault(position[server], []).append((reservation.expected_end, end - start))
    return SwarmView(scenario, placement, swarm.clock(), {k: tuple(v) for k, v in active.items()})


def test_route_equals_the_planners_decision_on_the_same_state():
    swarm = placed_swarm()
    members = swarm.members()
    for n in range(12):  # past the swarm's capacity: WS-RR starts waiting and spreads
        client = f"client{n % 3}"
        swarm.client_position(client)
        view = independent_view(swarm)
        request = Request(swarm.client_position(client), 20, 40)
        expected = decide("wsrr", view, request)
        reservation, start_at = swarm.route(client, 20, 40)
        assert reservation.hops == [[members[h.server].id, h.start, h.end] for h in expected.route.hops]
        assert start_at == pytest.approx(expected.start_s)


def test_sessions_spread_over_replicas_and_no_server_is_overbooked():
    swarm = placed_swarm(memories=(400, 400, 300, 300), decode_ms=(4, 4, 4, 4), R=2)
    used: dict[str, int] = {}
    routes = set()
    for n in range(16):
        reservation, start_at = swarm.route(f"c{n % 4}", 10, 10)
        if start_at > swarm.clock():
            break  # every route is full now: the next ones wait
        routes.add(tuple(tuple(h) for h in reservation.hops))
        for server, start, end in reservation.hops:
            used[server] = used.get(server, 0) + end - start
    assert len(routes) >= 2, "every session took the same chain"
    for record in swarm.members():
        assert used.get(record.id, 0) <= record.slots


def test_petals_routing_never_overbooks_a_server_and_says_cache_full_instead():
    """PETALS' routing does not wait: once its route has no slot left the client is told
    cache_full (it backs off and asks again, as the simulator's PETALS clients do), and a release
    makes room again."""
    swarm = placed_swarm(policy="petals", memories=(900, 700, 500))
    used: dict[str, int] = {}
    reservations = []
    with pytest.raises(CacheFull, match="no cache slot left"):
        for n in range(1000):
            reservation, start_at = swarm.route(f"c{n % 3}", 10, 10)
            assert start_at == swarm.clock()
            reservations.append(reservation)
            for server, start, end in reservation.hops:
                used[server] = used.get(server, 0) + end - start
    assert reservations and all(used.get(r.id, 0) <= r.slots for r in swarm.members())
    swarm.release(reservations[0].id)
    swarm.route("c0", 10, 10)


def test_release_and_lease_free_the_slots():
    clock = Clock()
    swarm = placed_swarm(clock=clock)
    reservation, _ = swarm.route("a", 10, 10)
    assert swarm.release(reservation.id) and not swarm.reservations
    assert sum(swarm.view().used.values()) == 0
    reservation, _ = swarm.route("a", 10, 10)
    clock.now = reservation.lease_until + 1
    swarm.expire()
    assert not swarm.reservations
    assert all(r.state == "gone" for r in swarm.servers.values())  # silent that long: gone too


def test_too_long_and_uncovered_are_clear_errors():
    swarm = placed_swarm()
    with pytest.raises(TooLarge, match="session-tokens"):
        swarm.route("a", 2000, 100)
    empty = Swarm(SwarmConfig("smollm2", R=2), None, Clock())
    with pytest.raises(Infeasible, match="no server has joined"):
        empty.route("a", 10, 10)
    assert missing_blocks_text([1, 0, 0, 2, 0]) == "blocks 1..2, 4 of 5 have no serving server"
    assert missing_blocks_text([1, 1]) is None


def test_a_tail_replaces_the_failed_hop_and_avoids_it():
    swarm = placed_swarm(memories=(300, 300, 300, 300), decode_ms=(4, 4, 4, 4), R=2)
    reservation, _ = swarm.route("a", 10, 10)
    failed = swarm.servers[reservation.hops[-1][0]]
    start = reservation.hops[-1][1]
    tail, _ = swarm.route("a", 10, 10, avoid=(failed.address,), reservation_id=reservation.id, start=start)
    assert tail.hops[-1][2] == 30 and all(h[0] != failed.id for h in tail.hops)
    assert tail.hops[0][1] == 0  # the hops before the failure are kept
    with pytest.raises(BadRequest, match="no such reservation"):
        swarm.route("b", 10, 10, reservation_id=reservation.id, start=start)


def test_restart_keeps_servers_and_reservations_and_drops_the_silent(tmp_path):
    clock = Clock()
    swarm = placed_swarm(store=Store(tmp_path / "state.sqlite"), clock=clock)
    reservation, _ = swarm.route("a", 10, 10)
    before = spans(swarm)
    swarm.store.close()
    restarted = Swarm(SwarmConfig("smollm2", R=2), Store(tmp_path / "state.sqlite"), clock)
    assert spans(restarted) == before and list(restarted.reservations) == [reservation.id]
    assert restarted.shape == SHAPE
    first, *others = restarted.members()
    clock.now += GRACE_S - 1
    for record in others:  # these report back within the grace period; the first does not
        restarted.heartbeat(record.id, {"state": "serving", "start": record.start, "end": record.end,
                                        "free_cache_tokens": 0, "sessions": 0})
    restarted.expire()
    assert first.state == "serving"
    clock.now += 2
    restarted.expire()
    assert first.state == "gone" and all(r.state == "serving" for r in others)
    assert [(r.start, r.end) for r in others] == before[1:]  # not re-placed


def test_blocks_nobody_holds_get_an_idle_server():
    clock = Clock()
    swarm = placed_swarm(clock=clock)
    unique = [r for r in swarm.members() if live.missing_blocks(
        dataclasses.replace(swarm.serving(), spans=tuple(s for s in swarm.serving().spans
                                                          if swarm.members()[s.server] is not r)))]
    assert len(unique) == 2, "the placement has servers whose blocks nobody else holds"
    victim = next(r for r in unique if r.end == 30)  # the others can cover its blocks: one moves
    swarm.leave(victim.id)
    assert swarm.missing()
    swarm.place()
    moved = [r for r in swarm.members() if r.state == "loading"]
    assert len(moved) == 1 and moved[0].start <= victim.start and moved[0].end >= victim.end
    serve_all(swarm)
    assert swarm.missing() is None


def test_a_gap_nobody_can_close_is_a_clear_error():
    clock = Clock()
    swarm = placed_swarm(clock=clock)
    middle = next(r for r in swarm.members() if (r.start, r.end) == (0, 20))  # alone on 15..19
    swarm.leave(middle.id)
    swarm.place()  # moving either other server would uncover its own blocks: nobody moves
    assert not [r for r in swarm.members() if r.state == "loading"]
    assert "does not cover the model: blocks 15..19" in swarm.log[-1]  # the coordinator's log says it
    with pytest.raises(Infeasible, match="blocks 15..19 of 30 have no serving server"):
        swarm.route("a", 10, 10)


def test_servers_that_bring_their_spans_are_not_moved_while_the_swarm_assembles():
    """Servers started with --blocks join one by one: the gap the first leaves is the next one's
    span, so no repair may move anybody until joins have settled."""
    clock = Clock()
    swarm = Swarm(SwarmConfig("smollm2", R=2), None, clock)
    for port, (start, end) in zip((6000, 6010, 6020), ((0, 12), (0, 12), (12, 30))):
        swarm.register({**registration(port, 400), "start": start, "end": end})
        serve_all(swarm)
        swarm.place()  # blocks 12..29 wait for the third server; the second could cover them, and must not
        clock.now += SETTLE_S / 4
    assert spans(swarm) == [(0, 12), (0, 12), (12, 30)]
    assert not [r for r in swarm.members() if r.state == "loading"]


def test_a_pinned_span_gets_no_more_sessions_than_its_cache_holds():
    """PETALS' slots assume its own block count; a server that brings a longer span has less cache
    per block, and the coordinator must not promise the policy's slots there."""
    swarm = placed_swarm(policy="petals", memories=(900, 700, 500))
    swarm.register({**registration(6100, 400), "start": 0, "end": 20})
    record = swarm.members()[-1]
    assert record.cache_tokens * 20 >= record.slots * swarm.config.session_tokens
    assert 0 < record.slots < petals.cache_slots(swarm.scenario(), 20)


def test_a_server_the_coordinator_forgot_keeps_its_span():
    swarm = placed_swarm()
    swarm.register({**registration(6100, 400), "start": 3, "end": 17})
    record = swarm.members()[-1]
    assert (record.start, record.end, record.state) == (3, 17, "serving") and record.slots > 0


def test_a_server_of_another_model_is_refused():
    swarm = placed_swarm()
    with pytest.raises(Exception, match="differs"):
        swarm.register({**registration(6100, 400), "dtype": "float16", "itemsize": 2})


@settings(max_examples=50, deadline=None)
@given(start=st.integers(0, 100), length=st.integers(1, 10**6), flip=st.integers(0, 200))
def test_tickets_open_only_what_they_allow(start, length, flip):
    secret = new_secret()
    ticket = Ticket("r1", start, length, 2e9).mint(secret)
    assert Ticket.check(secret, ticket, start, length, now=1e9).reservation == "r1"
    assert Ticket.check(secret, ticket, start, max(1, length // 2), now=1e9)
    with pytest.raises(BadRequest):
        Ticket.check(secret, ticket, start, length + 1, now=1e9)
    with pytest.raises(BadRequest):
        Ticket.check(secret, ticket, start + 1, length, now=1e9)
    with pytest.raises(BadRequest, match="expired"):
        Ticket.check(secret, ticket, start, length, now=3e9)
    with pytest.raises(BadRequest):
        Ticket.check(new_secret(), ticket, start, length, now=1e9)
    position = flip % len(ticket)
    tampered = ticket[:position] + ("0" if ticket[position] != "0" else "1") + ticket[position + 1:]
    with pytest.raises(BadRequest):
        Ticket.check(secret, tampered, start, length, now=1e9)


def test_a_server_cannot_claim_to_serve_before_it_has_a_span():
    clock = Clock()
    swarm = Swarm(SwarmConfig("smollm2", R=2), None, clock)
    record = swarm.register(registration(6000, 400))
    swarm.heartbeat(record.id, {"state": "serving", "start": None, "end": None, "free_cache_tokens": 0,
                                "sessions": 0})
    assert record.state == "loading" and swarm.coverage() == [0] * 30


def test_without_R_the_measured_rate_re_places_one_idle_server_at_a_time():
    clock = Clock()
    swarm = Swarm(SwarmConfig("smollm2", R=None), None, clock)  # R from the arrival rate
    for i, memory in enumerate((400, 400, 300, 300, 200, 200)):
        swarm.register(registration(6000 + 10 * i, memory, 4.0))
    clock.now += SETTLE_S
    swarm.place()
    serve_all(swarm)
    first_R = swarm.R_placed
    assert first_R >= 1  # sized for the default rate (no arrivals yet)
    for n in range(300):  # a burst: 300 sessions in 30 s, each released at once
        clock.now += 0.1
        reservation, _ = swarm.route(f"c{n % 3}", 16, 16)
        swarm.release(reservation.id)
    swarm.place()
    assert swarm.R_placed >= 1.5 * first_R
    target = PLACEMENTS["cgbp"](swarm.scenario(), swarm.R_placed, 0)
    wanted = {swarm.members()[s.server].id: (s.start, s.end) for s in target.spans}
    for _ in range(10):  # each tick moves at most one server, and never uncovers a block
        loading = [r for r in swarm.members() if r.state == "loading"]
        assert len(loading) <= 1 and swarm.missing() is None
        serve_all(swarm)
        clock.now += 1.0
        swarm.place()
    assert {r.id: (r.start, r.end) for r in swarm.members()} == wanted


def test_servers_on_record_carry_no_route_until_they_report_and_newcomers_wait_for_them(tmp_path):
    clock = Clock()
    swarm = placed_swarm(store=Store(tmp_path / "state.sqlite"), clock=clock)
    swarm.store.close()
    restarted = Swarm(SwarmConfig("smollm2", R=2), Store(tmp_path / "state.sqlite"), clock)
    assert restarted.missing()  # nobody has reported yet: no route may use a server that may be dead
    with pytest.raises(Infeasible):
        restarted.route("a", 10, 10)
    newcomer = restarted.register(registration(6100, 1000))  # enough for the whole model alone
    clock.now += SETTLE_S
    restarted.place()
    assert newcomer.start is None  # placed beside the swarm as it really is, not as it was
    clock.now += GRACE_S
    restarted.heartbeat(newcomer.id, {"state": "loading", "start": None, "end": None, "free_cache_tokens": 0,
                                      "sessions": 0})
    restarted.expire()  # nobody on record reported: they are gone
    restarted.place()
    assert newcomer.start is not None and all(r.state == "gone" for r in restarted.servers.values()
                                              if r is not newcomer)


def test_a_server_a_client_lost_is_gone_once_it_also_misses_a_heartbeat():
    clock = Clock()
    swarm = placed_swarm(clock=clock)
    record = swarm.members()[0]
    swarm.suspect(record.address)
    assert record.state == "serving"  # it reported on time: one client's word moves nothing
    clock.now += 2.0
    swarm.suspect(record.address)
    assert record.state == "gone"
