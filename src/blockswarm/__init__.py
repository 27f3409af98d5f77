"""blockswarm: run a language model split by transformer blocks across many servers.

Importing the package does nothing heavy: `DistributedModel` (which needs torch and zmq) is
loaded on first use, so `blockswarm.planner` and `blockswarm.sim` stay torch-free.
"""

__all__ = ["DistributedModel", "__version__"]
__version__ = "0.1.0"  # the fallback when no package metadata is installed (pyproject.toml is the source)


def __getattr__(name: str):
    if name == "DistributedModel":
        from blockswarm.runtime.client import DistributedModel

        return DistributedModel
    raise AttributeError(name)
