"""Simulation runs over a Ray cluster: the same `map(runs, progress)` as `sim.fanout.LocalFanout`.

Ray (an optional extra: `pip install -e .[ray]`; `make test` installs it) is imported only here
and only when asked for, so the simulator stays free of network libraries. The address is Ray's:
`local` starts a private instance on this machine for the duration of the call, `auto` joins
the cluster this machine belongs to, `ray://HOST:10001` connects through Ray Client. The
cluster's nodes need blockswarm importable (the same version) in their Python environment.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from blockswarm.core.errors import ConfigError
from blockswarm.sim.fanout import Run, execute
from blockswarm.sim.runner import SimResult


@dataclass(frozen=True)
class RayFanout:
    address: str
    workers: int = 0  # CPUs of a `local` instance (0: Ray's default, every core)

    def map(self, runs: list[Run], progress: Callable[[], None] | None = None) -> list[SimResult]:
        try:
            import ray
        except ImportError:
            raise ConfigError("--ray needs Ray: pip install 'ray[client]==2.60.0' (or `pip install -e .[ray]`)") \
                from None
        owned = not ray.is_initialized()
        if owned:
            options = dict(include_dashboard=False, log_to_driver=False, logging_level="WARNING")
            if self.address == "local" and self.workers:
                options["num_cpus"] = self.workers
            try:
                ray.init(address=self.address, **options)
            except (ConnectionError, ValueError, RuntimeError) as exc:
                raise ConfigError(f"cannot reach the Ray cluster at {self.address!r}: {exc}; give `local` for a "
                                  "private instance, `auto` on a cluster node, or ray://HOST:10001") from None
        try:
            remote = ray.remote(execute)
            refs = [remote.remote(run) for run in runs]
            pending = list(refs)
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                ray.get(done)  # a failed run raises here, as it would serially
                if progress:
                    progress()
            return ray.get(refs)
        finally:
            if owned:
                ray.shutdown()
