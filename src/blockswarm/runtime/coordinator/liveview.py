"""The planner's view of the live swarm, a mixin of `Swarm`: the `Scenario` its records describe,
the `Placement` routes may use, the cache slots reservations hold, coverage. Everything is cached
until membership or placement changes (`_changed`); reserving and releasing update the load in
O(hops).

The scenario's servers are the members in registration order; its clients are in arrival order
(a new client is appended, so routes remembered for the others stay valid); its RTTs are
`MeasuredRtts`, a live view of the clients' reports (a report only clears remembered routes).
"""

from __future__ import annotations

import dataclasses

from blockswarm.core.specs import ClientSpec, ModelSpec, NetworkSpec, Placement, Scenario, ServerSpec, Span, WorkloadSpec
from blockswarm.planner.routing import block_index
from blockswarm.planner.view import ActiveBySession, SwarmView
from blockswarm.runtime.coordinator.records import (
    TYPICAL_TOKENS, MeasuredRtts, Reservation, ServerRecord, missing_blocks_text,
)


class LiveView:
    def members(self) -> list[ServerRecord]:
        """Servers that are not gone, in join order: the scenario's servers, index for index."""
        if "members" not in self._cache:
            self._cache["members"] = sorted((r for r in self.servers.values() if r.state != "gone"),
                                            key=lambda r: r.sequence)
        return self._cache["members"]

    def scenario(self) -> Scenario:
        if "scenario" not in self._cache:
            self._cache["scenario"] = self._build_scenario(self.members())
        return self._cache["scenario"]

    def _scenario_with(self, extra: ServerRecord) -> Scenario:
        return self._build_scenario([*self.members(), extra])

    def _build_scenario(self, members: list[ServerRecord]) -> Scenario:
        shape, config = self.shape, self.config
        model = ModelSpec(shape["model"], shape["num_blocks"], shape["hidden_size"], shape["d_kv"],
                          shape["params_per_block"],
                          weight_bytes_per_param=float(shape.get("weight_bytes_per_param", shape["itemsize"])),
                          weight_overhead=float(shape.get("weight_overhead", 1.0)),
                          kv_bytes=shape.get("kv_bytes", shape["itemsize"]))
        servers = tuple(ServerSpec(r.address, r.id, float(r.memory_bytes), r.block_decode_s,
                                   r.block_prefill_s_per_token, r.block_prefill_base_s, r.device) for r in members)
        clients = tuple(ClientSpec(name, name) for name in self.client_order()) or (ClientSpec("any", "any"),)
        network = NetworkSpec(MeasuredRtts(self.rtts), {}, decode_overhead_s=config.hop_overhead_s,
                              prefill_overhead_s=config.hop_overhead_s, prefill_s_per_token=0.0, setup_s=0.0)
        half = config.session_tokens // 2
        workload = WorkloadSpec(rate=self.arrival_rate(), num_requests=1, prompt_tokens=min(TYPICAL_TOKENS, half),
                                output_tokens=min(TYPICAL_TOKENS, config.session_tokens - half),
                                max_prompt_tokens=half, max_output_tokens=config.session_tokens - half)
        return Scenario("live", model, servers, clients, network, workload)

    def client_order(self) -> list[str]:
        """Clients in the order they first asked (indices stay valid as clients arrive)."""
        return list(self.clients)

    def _placement(self, records: list[ServerRecord], scenario: Scenario) -> Placement:
        index = self.position()
        spans = tuple(Span(index[r.id], r.start, r.end, r.slots) for r in records)
        return Placement(tuple(sorted(spans, key=lambda s: s.server)), scenario.model.num_blocks)

    def serving(self) -> Placement:
        """The spans routes may use: servers serving the span they were given."""
        if "serving" not in self._cache:
            scenario = self.scenario()
            placement = self._placement([r for r in self.members() if r.state == "serving" and r.loaded], scenario)
            self._cache["serving"] = placement
            self._cache["index"] = block_index(placement)
            self._cache["memo"] = {}
            self._rebuild_load()
        return self._cache["serving"]

    def position(self) -> dict[str, int]:
        """Server id -> its index in the scenario."""
        if "position" not in self._cache:
            self._cache["position"] = {r.id: i for i, r in enumerate(self.members())}
        return self._cache["position"]

    def _rebuild_load(self) -> None:
        self._cache["used"], self._cache["active"] = {}, {}
        for reservation in self.reservations.values():
            self._add_load(reservation, reservation.hops)

    def _add_load(self, reservation: Reservation, hops: list[list]) -> None:
        position, used, active = self.position(), self._cache["used"], self._cache["active"]
        for server, start, end in hops:
            i = position.get(server)
            if i is not None:
                used[i] = used.get(i, 0) + end - start
                active.setdefault(i, {})[reservation.id] = (reservation.expected_end, end - start)

    def _remove_load(self, reservation: Reservation, hops: list[list]) -> None:
        if "used" not in self._cache:
            return  # rebuilt from the reservations when next needed
        position, used, active = self.position(), self._cache["used"], self._cache["active"]
        for server, start, end in hops:
            i = position.get(server)
            if i is not None and active.get(i, {}).pop(reservation.id, None) is not None:
                used[i] -= end - start

    def view(self) -> SwarmView:
        placement = self.serving()
        return SwarmView(self.scenario(), placement, self.clock(), ActiveBySession(self._cache["active"]),
                         self._cache["index"], self._cache["used"], self._cache["memo"])

    def coverage(self) -> list[int]:
        if self.shape is None:
            return []
        if "coverage" not in self._cache:
            per_block = [0] * self.shape["num_blocks"]
            for span in self.serving().spans:
                for block in range(span.start, span.end):
                    per_block[block] += 1
            self._cache["coverage"] = per_block
        return self._cache["coverage"]

    def missing(self) -> str | None:
        """Which blocks no serving server holds, as text; None when the model is covered."""
        if self.shape is None:
            return "no server has joined yet"
        if "missing" not in self._cache:
            self._cache["missing"] = missing_blocks_text(self.coverage())
        return self._cache["missing"]

    def client_position(self, client: str) -> int:
        """The client's index in the scenario. A new client joins the scenario's clients at the end:
        the others keep their indices, so routes remembered for them stay valid."""
        known = client in self.clients
        self.clients[client] = self.clock()
        if not known:
            if "scenario" in self._cache:
                scenario = self._cache["scenario"]
                if scenario.clients and scenario.clients[0].name == "any" and len(self.clients) == 1:
                    self._changed()  # the placeholder client goes: nothing remembered is valid
                else:
                    self._cache["scenario"] = dataclasses.replace(
                        scenario, clients=(*scenario.clients, ClientSpec(client, client)))
            self._cache.pop("client_order", None)
        if "client_order" not in self._cache:
            self._cache["client_order"] = {c: i for i, c in enumerate(self.clients)}
        return self._cache["client_order"][client]
