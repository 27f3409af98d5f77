"""A hostile or broken server for tests: a real blockswarm server whose step replies go wrong.

    python tests/misbehaving_server.py MODEL START:END MODE AFTER [serve options...]

After AFTER honest step replies, every step reply is: `shape` (a tensor one column short),
`nan` (NaN hidden states), `garbage` (bytes that are not msgpack), `internal` (an internal
error), `huge` (a reply far larger than any step), or `fail` (the forward raises half-way, after
its first block, as a server with a bug or a full GPU would). It is a separate process speaking
over real sockets, exactly what a client would meet in a swarm it does not control.
"""

from __future__ import annotations

import sys

import torch

from blockswarm.runtime.protocol import encode
from blockswarm.runtime.server import ServeConfig, Server, run_server


def misbehaving(mode: str, after: int) -> type[Server]:
    class Misbehaving(Server):
        honest = after

        def _finish(self, reply, tensors, received):
            if not tensors or mode == "fail":
                return super()._finish(reply, tensors, received)
            if self.honest > 0:
                self.honest -= 1
                return super()._finish(reply, tensors, received)
            (hidden,) = tensors
            if mode == "shape":
                tensors = (hidden[:, :, :-1].contiguous(),)
            elif mode == "nan":
                tensors = (torch.full_like(hidden, float("nan")),)
            elif mode == "huge":
                tensors = (torch.zeros(1, 200_000, hidden.shape[2], dtype=hidden.dtype),)
            elif mode == "garbage":
                return [b"\xc1 not msgpack"]
            elif mode == "internal":
                return encode({"ok": False, "rid": reply.get("rid"), "code": "internal", "retriable": False,
                               "message": "internal server error: KeyError"})
            return super()._finish(reply, tensors, received)

        @classmethod
        def load(cls, config):
            server = super().load(config)
            if mode == "fail":
                _fail_half_way(server, after)
            return server

    return Misbehaving


def _fail_half_way(server: Server, after: int) -> None:
    """The second block raises once, on the step after the first `after`: the first block has by then
    appended this step's keys and values to the cache, which is what a failed step leaves behind."""
    block = server.span.blocks[1]
    original = block.forward
    calls = [0]

    def forward(*args, **kwargs):
        calls[0] += 1
        if calls[0] == after + 1:  # once: the client reopens the session and replays it
            raise RuntimeError("injected failure half-way through a step")
        return original(*args, **kwargs)

    block.forward = forward


def main() -> None:
    model, blocks, mode, after, *extra = sys.argv[1:]
    start, end = (int(x) for x in blocks.split(":"))
    options = dict(zip(extra[::2], extra[1::2]))
    config = ServeConfig(model=model, start=start, end=end, threads=1,
                         cache_tokens=int(options.get("--cache-tokens", 16384)))
    run_server(config, misbehaving(mode, int(after)))


if __name__ == "__main__":
    main()
