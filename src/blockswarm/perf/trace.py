"""Request traces: our CSV (`arrival_s,prompt_tokens,output_tokens[,client]`) or Azure's LLM
inference traces (`TIMESTAMP,ContextTokens,GeneratedTokens`, arrivals counted from the first
timestamp), read once per file. Here rather than in sim because a scenario that names a trace
takes its typical and maximal lengths from it when it is loaded."""

from __future__ import annotations

import csv
import functools
from datetime import datetime
from pathlib import Path

from blockswarm.core.errors import ConfigError

Row = tuple[float, int, int, int]  # arrival_s, prompt_tokens, output_tokens, client


def read_trace(path: str) -> tuple[Row, ...]:
    """Rows sorted by arrival; a clear error naming the line for anything malformed. Read once
    per version of the file (a sweep's runs share it)."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"trace {path} does not exist")
    stat = file.stat()
    return _read(str(file), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _read(path: str, mtime_ns: int, size: int) -> tuple[Row, ...]:
    file = Path(path)
    rows: list[Row] = []
    with file.open(newline="") as handle:
        lines = list(csv.reader(handle))
        head = lines[0][0].strip() if lines and lines[0] else ""
        azure = head == "TIMESTAMP"
        skip = 1 if head in ("TIMESTAMP", "arrival_s") else 0  # a header row, when there is one
        first = None
        for line, row in enumerate(lines[skip:], start=1 + skip):
            if not row or row[0].strip().startswith("#"):
                continue
            try:
                if azure:
                    stamp = datetime.fromisoformat(row[0].strip()[:26])
                    first = first or stamp
                    arrival, client = (stamp - first).total_seconds(), 0
                else:
                    arrival = float(row[0])
                    client = int(row[3]) if len(row) > 3 and row[3].strip() else 0
                prompt, output = int(row[1]), int(row[2])
            except (ValueError, IndexError):
                expected = "TIMESTAMP,ContextTokens,GeneratedTokens" if azure else \
                    "arrival_s,prompt_tokens,output_tokens[,client]"
                raise ConfigError(f"{path}:{line}: expected {expected}") from None
            if arrival < 0 or prompt < 1 or output < 1 or client < 0:
                raise ConfigError(f"{path}:{line}: arrival >= 0, token counts >= 1 and client >= 0 are needed")
            rows.append((arrival, prompt, output, client))
    if not rows:
        raise ConfigError(f"trace {path} has no requests")
    rows.sort()
    return tuple(rows)


def clip(prompt: int, output: int, context: int | None) -> tuple[int, int]:
    """Lengths that fit the model's context: the output kept (up to context − 1), the prompt cut to
    what is left."""
    if context is None or prompt + output <= context:
        return prompt, output
    output = min(output, context - 1)
    return min(prompt, context - output), output


def trace_rows(path: str, count: int, context: int | None, time_scale: float = 1.0) -> list[Row]:
    """The first `count` rows, lengths clipped to `context`, arrival times multiplied by `time_scale`."""
    rows = []
    for arrival, prompt, output, client in read_trace(path)[:count]:
        prompt, output = clip(prompt, output, context)
        rows.append((arrival * time_scale, prompt, output, client))
    return rows
