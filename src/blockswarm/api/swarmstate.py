"""What the swarm page draws, kept fresh by a background thread: from the coordinator's `status`,
or, without one, from every listed server's `info`.

The snapshot (`GET /api/swarm`) is one JSON object:
    model, num_blocks, source ("coordinator" or "servers"), coordinator (its address or null),
    servers: [{address, start, end, state, device, block_decode_ms, sessions, free_cache_tokens,
               cache_tokens}],
    coverage: serving servers per block, missing: which blocks nobody serves (text) or null,
    routes: [{id, hops: [{address, start, end}], by: "api" or "client"}] (requests in flight),
    api: {running, waiting, slots}, updated: unix time of the last poll, error: why the last poll failed or null.
Without a coordinator a server is "serving" while it answers and "gone" once it does not; with
one, states are the coordinator's (joining, serving, moving, draining, gone).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from blockswarm.core.errors import BlockswarmError
from blockswarm.runtime.coordinator.records import missing_blocks_text

log = logging.getLogger("blockswarm.api")
POLL_S = 1.0


class SwarmState:
    """Polls the swarm every `POLL_S`; `snapshot` is the latest picture, `version` counts changes."""

    def __init__(self, engine, context, coordinator: str | None = None, servers: list[str] | None = None,
                 keys=None):
        self.engine, self.context, self.keys = engine, context, keys
        self.coordinator, self.addresses = coordinator, list(servers or [])
        self.version, self._snapshot = 0, None  # (the event stream sends a snapshot when `version` moves)
        self._stop = threading.Event()
        self._refused: set[str] = set()
        self._thread = threading.Thread(target=self._run, name="swarm-state", daemon=True)
        self._askers = ThreadPoolExecutor(max_workers=min(8, max(1, len(self.addresses))),
                                          thread_name_prefix="swarm-info")  # servers asked in parallel

    def start(self) -> "SwarmState":
        self._poll()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._askers.shutdown(wait=False, cancel_futures=True)

    def snapshot(self) -> dict:
        snapshot = dict(self._snapshot)
        snapshot["api"] = {"running": self.engine.running, "waiting": self.engine.waiting, "slots": self.engine.slots}
        if self.coordinator is None:
            snapshot["routes"] = self._api_routes()
        return snapshot

    def missing(self) -> str | None:
        return self._snapshot.get("missing") if self._snapshot else None

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            self._poll()

    def _poll(self) -> None:
        try:
            fresh = self._from_coordinator() if self.coordinator else self._from_servers()
            fresh["error"] = None
        except Exception as exc:  # the coordinator is down or the context closing: say so on the page
            fresh = dict(self._snapshot or self._empty())
            fresh["error"] = f"could not ask the swarm: {exc}"
        fresh["updated"] = time.time()
        old = {k: v for k, v in (self._snapshot or {}).items() if k != "updated"}
        self._snapshot = fresh
        if old != {k: v for k, v in fresh.items() if k != "updated"}:
            self.version += 1

    def _empty(self) -> dict:
        return {"model": self.engine.name, "num_blocks": self.engine.model.head.num_blocks,
                "source": "coordinator" if self.coordinator else "servers", "coordinator": self.coordinator,
                "servers": [], "coverage": [], "missing": None, "routes": []}

    def _from_coordinator(self) -> dict:
        from blockswarm.runtime.coordinator.link import CoordinatorLink

        link = CoordinatorLink(self.context, self.coordinator, self.keys)
        try:
            status = link.call("status", timeout_s=2.0)
        finally:
            link.close()
        ours = self.engine.model.coordinator.client if self.engine.model.coordinator else None
        snapshot = self._empty()
        snapshot.update(
            servers=[{"address": s["address"], "start": s["start"], "end": s["end"], "state": s["state"],
                      "device": s["device"], "block_decode_ms": _ms(s["block_decode_s"]), "sessions": s["sessions"],
                      "free_cache_tokens": s["free_cache_tokens"], "cache_tokens": s["cache_tokens"]}
                     for s in status["servers"]],
            coverage=status["coverage"], missing=status["missing"],
            routes=[{"id": r["reservation"], "by": "api" if r["client"] == ours else "client",
                     "hops": [{"address": a, "start": s, "end": e} for a, s, e in r["hops"]]}
                    for r in status["routes"]])
        return snapshot

    def _from_servers(self) -> dict:
        from blockswarm.runtime.connection import fetch_info

        def ask(address):
            try:
                return fetch_info(self.context, address, 1.0, self.keys)
            except BlockswarmError:
                return None

        answers = dict(zip(self.addresses, self._askers.map(ask, self.addresses)))
        L = self.engine.model.head.num_blocks
        coverage, servers = [0] * L, []
        for address, info in answers.items():
            if info is None:
                known = self.engine.model.infos.get(address)
                servers.append({"address": address, "start": known.start if known else None,
                                "end": known.end if known else None, "device": known.device if known else None,
                                "state": "gone", "block_decode_ms": None, "sessions": None,
                                "free_cache_tokens": None, "cache_tokens": None})
                continue
            self._readmit(address, info)
            for block in range(info.start, min(info.end, L)):
                coverage[block] += 1
            servers.append({"address": address, "start": info.start, "end": info.end, "state": "serving",
                            "device": info.device, "block_decode_ms": _ms(info.block_decode_s),
                            "sessions": info.sessions, "free_cache_tokens": info.free_cache_tokens,
                            "cache_tokens": info.cache_tokens})
        snapshot = self._empty()
        snapshot.update(servers=servers, coverage=coverage, missing=missing_blocks_text(coverage))
        return snapshot

    def _readmit(self, address: str, info) -> None:
        """A listed server that answers again (restarted, back from a network cut, or moved) serves
        new sessions again; one of another model is said once and left out."""
        known = self.engine.model.infos.get(address)
        if known is not None and (known.start, known.end) == (info.start, info.end):
            return
        try:
            if self.engine.model.readmit(address, info):
                log.info("%s serves blocks %d:%d again", address, info.start, info.end)
        except BlockswarmError as exc:
            if address not in self._refused:
                log.warning("leaving out %s: %s", address, exc)
                self._refused.add(address)

    def _api_routes(self) -> list[dict]:
        return [{"id": flight, "by": "api",
                 "hops": [{"address": h.address, "start": h.start, "end": h.end} for h in session.chain]}
                for flight, session in list(self.engine.flights.items())]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 3)
