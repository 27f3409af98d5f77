"""The one-way rule: core, perf, planner and sim load neither torch, transformers nor zmq."""

from __future__ import annotations

import subprocess
import sys

import pytest

PURE = ["blockswarm", "blockswarm.core", "blockswarm.core.errors", "blockswarm.perf", "blockswarm.planner",
        "blockswarm.sim"]


@pytest.mark.parametrize("module", PURE)
def test_pure_layers_import_no_torch_or_network(module):
    code = (f"import sys, importlib; importlib.import_module({module!r}); "
            "bad = [m for m in ('torch', 'transformers', 'zmq') if m in sys.modules]; print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"importing {module} loaded {out}"
