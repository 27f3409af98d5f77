"""The garbage collector in long-running processes (servers, the coordinator, the API).

Such a process imports torch and transformers (and loads a model, a tokenizer) before it serves:
~360,000 objects that live as long as it does. Python's full collection walks every one of them,
~235 ms here with every thread of the process held by the GIL: a step stalled in a server, every
stream at once in the API. It runs whenever the objects that outlived younger collections reach
a quarter of the old ones: the API's start-up set off six (30-230 ms each), and 40 s of serving
none, but a process that serves for days may get there. Freezing what is alive once
start-up is done (as vLLM does after loading) takes those objects out of every later collection:
a full collection right after costs ~0 ms instead of 235.
"""

from __future__ import annotations

import gc


def freeze_startup_objects() -> None:
    """Collect start-up's garbage, then keep every object alive now out of later collections."""
    gc.collect()
    gc.freeze()
