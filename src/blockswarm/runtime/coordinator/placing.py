"""Where the coordinator's servers go: the first placement, newcomers, repairs, and re-placement
when the measured arrival rate asks for another R. A mixin of `Swarm` (it uses its records,
caches and log); every decision is the planner's (`registry.PLACEMENTS`, `planner.live`)."""

from __future__ import annotations

from blockswarm.core.errors import Infeasible
from blockswarm.core.specs import Scenario, Span
from blockswarm.planner import live, wsrr
from blockswarm.planner.registry import PLACEMENTS
from blockswarm.runtime.coordinator.records import (
    DEFAULT_RATE, R_CHECK_S, R_REPLACE_S, RATE_MIN_ARRIVALS, RATE_WINDOW_S, SETTLE_S, ServerRecord,
)


class Placing:
    def _say_once(self, topic: str, line: str) -> None:
        """Log `line` unless it is what was last said on `topic` (ticks repeat every 0.2 s)."""
        if self._said.get(topic) != line:
            self._said[topic] = line
            self.log.append(line)

    def place(self) -> None:
        """Place servers waiting for a span, once no server joined for SETTLE_S; restore coverage."""
        members = self.members()
        if not members or self.shape is None:
            return
        waiting = [r for r in members if r.start is None]
        settled = self.clock() - self.last_join >= SETTLE_S
        if waiting and any(r.restored for r in members):
            # the servers on record may be back in a moment, or gone: newcomers are placed beside
            # the swarm as it really is, once every one of them reported or missed the grace period
            self._say_once("restored", f"{len(waiting)} server(s) wait to be placed until the servers on record "
                                       "report back or miss the grace period")
            return
        if waiting and settled:
            scenario = self.scenario()
            index = self.position()
            placed = [r for r in members if r.start is not None]
            if not placed:
                self._place_all(scenario, members)
            else:
                R = self.R_placed or 1
                spans = live.extend(self.placement_name, scenario, self._placement(placed, scenario),
                                    [index[r.id] for r in waiting], R)
                for span in spans:
                    self._assign(members[span.server], span, scenario)
                    self.log.append(f"placed the newcomer {members[span.server].address} on blocks "
                                    f"{span.start}:{span.end}")
            self._changed()
        self._repair()
        self._follow_R()

    def _follow_R(self) -> None:
        """Without --R: re-place when the measured arrival rate asks for an R far from the one the
        placement was sized for (hysteresis: at least ×1.5 or ÷2, and 2 apart; checked every
        R_CHECK_S, at most one re-placement per R_REPLACE_S). Servers move one by one, each only
        when it holds no reservation and every block stays held without it."""
        now = self.clock()
        if self.config.R is not None or self.R_placed is None or self.missing():
            return
        if self._pending_moves():
            self._apply_moves()
            return
        if now < self._cache_R.get("next_check", 0.0) or now - self._cache_R.get("replaced", 0.0) < R_REPLACE_S:
            return
        self._cache_R["next_check"] = now + R_CHECK_S
        scenario = self.scenario()
        try:
            R = self.current_R(scenario)
        except Infeasible:
            return
        old = self.R_placed
        if not (R >= 1.5 * old or R <= old / 2) or abs(R - old) < 2:
            return
        try:
            target = PLACEMENTS[self.placement_name](scenario, R, 0)
        except Infeasible:
            return
        members = self.members()
        self._targets = {members[s.server].id: s for s in target.spans
                         if (members[s.server].start, members[s.server].end) != (s.start, s.end)}
        self._cache_R["replaced"] = now
        self.log.append(f"the arrival rate asks for R={R} (placed for R={old}): re-placing, "
                        f"{len(self._targets)} of {len(members)} servers move, one at a time as they become idle")
        self.R_placed = R
        self._save_meta()
        self._apply_moves()

    def _pending_moves(self) -> bool:
        self._targets = {k: v for k, v in self._targets.items()
                         if k in self.servers and self.servers[k].state != "gone"}
        return bool(self._targets)

    def _apply_moves(self) -> None:
        """Start the moves whose server is idle and whose blocks others hold meanwhile."""
        if any(r.state == "loading" for r in self.members()):
            return  # one move at a time: coverage is counted over serving servers
        busy = self._busy_servers()
        scenario = self.scenario()
        members = self.members()
        position = self.position()
        for server_id, span in list(self._targets.items()):
            record = self.servers[server_id]
            if record.state != "serving" or record.sessions or server_id in busy:
                continue
            others = self._placement([r for r in members if r.state == "serving" and r.loaded
                                      and r.id != server_id], scenario)
            if live.missing_blocks(others):
                continue
            del self._targets[server_id]
            self.log.append(f"moving {record.address} from {record.start}:{record.end} to {span.start}:{span.end}")
            self._assign(record, Span(position[server_id], span.start, span.end, span.slots), scenario)
            self._changed()
            return

    def _place_all(self, scenario: Scenario, members: list[ServerRecord]) -> None:
        try:
            R = self.current_R(scenario)
            placement = PLACEMENTS[self.placement_name](scenario, R, 0)
        except Infeasible as exc:
            self._say_once("placement", f"cannot place the swarm yet: {exc}")
            return
        self.R_placed = R
        self._save_meta()
        for span in placement.spans:
            self._assign(members[span.server], span, scenario)
        described = ", ".join(f"{members[s.server].address}[{s.start}:{s.end}]" for s in placement.spans)
        self.log.append(f"placed {len(placement.spans)} servers with {self.placement_name} for R={R}: {described}")

    def _repair(self) -> None:
        """Blocks nobody holds: move idle servers onto them (their own blocks stay covered). Not
        while servers are still joining (within SETTLE_S of the last): a swarm being assembled
        has gaps its next members close, and moving a server that brought its own span (`serve
        --blocks`) into one of them would undo the span it was given."""
        members = self.members()
        holders = [r for r in members if r.start is not None]
        if not holders or any(r.start is None for r in members) or self.clock() - self.last_join < SETTLE_S:
            return
        scenario = self.scenario()
        placement = self._placement(holders, scenario)
        if not live.missing_blocks(placement):
            return
        index = self.position()
        busy = self._busy_servers()
        idle = [index[r.id] for r in holders if r.state == "serving" and r.sessions == 0 and r.id not in busy]
        moves = live.repair(self.placement_name, scenario, placement, idle, self.R_placed or 1)
        for span in moves:
            record = members[span.server]
            self.log.append(f"moving idle server {record.address} from {record.start}:{record.end} to "
                            f"{span.start}:{span.end} to cover blocks nobody holds")
            self._assign(record, span, scenario)
        if moves:
            self._changed()
        else:
            self._say_once("gap", f"the swarm does not cover the model: {self.missing()}; no idle server can take "
                                  "those blocks without uncovering its own. Start a server, or wait for sessions to end.")

    def _busy_servers(self) -> set[str]:
        return {hop[0] for r in self.reservations.values() for hop in r.hops}

    def current_R(self, scenario: Scenario) -> int:
        if self.config.R is not None:
            return self.config.R
        return wsrr.choose_R(scenario, self.arrival_rate())

    def arrival_rate(self) -> float:
        now = self.clock()
        while self.arrivals and self.arrivals[0] < now - RATE_WINDOW_S:
            self.arrivals.popleft()
        if len(self.arrivals) < RATE_MIN_ARRIVALS:
            return DEFAULT_RATE
        return len(self.arrivals) / RATE_WINDOW_S
