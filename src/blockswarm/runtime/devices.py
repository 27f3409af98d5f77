"""Whether a `--device` can be used here: torch alone, without transformers (~6 s less to import),
so that `serve` refuses a missing GPU in a couple of seconds, before anything else loads."""

from __future__ import annotations

import torch

from blockswarm.core.errors import ConfigError


def check_device(device: str) -> None:
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ConfigError(f"--device {device!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: this torch build sees no CUDA GPU; use --device cpu")
    if kind not in ("cpu", "cuda"):
        raise ConfigError(f"--device {device}: only cpu and cuda are supported")
