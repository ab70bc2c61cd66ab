"""What the command line compiles: a model and its inputs, from a Python file or a tiny HF architecture.

A *target file* is a Python file with a function (``build`` unless named after a colon, as in
``model.py:make_model``) that takes no arguments and returns ``(model, inputs)``, where
``inputs`` is a tuple of positional arguments or a dict of keyword arguments::

    def build():
        model = MyModel().eval()
        return model, (torch.randn(2, 128, 512),)

A *Hugging Face target* is an architecture name (``llama``, ``mistral``, ``qwen2``, ...) built
from a small config with random weights and eager attention, fed random token ids.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

class TargetError(Exception):
    """A target that cannot be loaded; its message is one readable line."""


@dataclass
class Target:
    name: str
    model: Any
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)


def load_file_target(spec: str) -> Target:
    """``path.py`` or ``path.py:function`` → the target its function builds."""
    path_text, _, function = spec.partition(":")
    path = Path(path_text)
    function = function or "build"
    if path.suffix != ".py" or not path.is_file():
        raise TargetError(f"target {spec!r}: {path_text!r} is not a Python file (expected FILE.py[:FUNCTION])")
    module_spec = importlib.util.spec_from_file_location(f"attncompiler_target_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    sys.path.insert(0, str(path.resolve().parent))
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        raise TargetError(f"target {spec!r}: importing {path} failed: {type(e).__name__}: {e}") from None
    finally:
        sys.path.remove(str(path.resolve().parent))
    build = getattr(module, function, None)
    if not callable(build):
        raise TargetError(f"target {spec!r}: {path} has no function {function}() returning (model, inputs)")
    try:
        built = build()
    except Exception as e:
        raise TargetError(f"target {spec!r}: {function}() failed: {type(e).__name__}: {e}") from None
    if not (isinstance(built, tuple) and len(built) == 2 and callable(built[0])
            and isinstance(built[1], (tuple, list, dict))):
        raise TargetError(f"target {spec!r}: {function}() must return (model, inputs) with inputs a tuple "
                          "of arguments or a dict of keyword arguments")
    model, inputs = built
    if isinstance(inputs, dict):
        return Target(spec, model, kwargs=inputs)
    return Target(spec, model, args=tuple(inputs))


def hf_target(architecture: str, seq: int, batch: int, device: str, dtype: torch.dtype) -> Target:
    """A tiny ``architecture`` model (see :mod:`attncompiler.hf_zoo`) with random weights and eager
    attention on ``device``, and its example inputs."""
    try:
        from attncompiler.hf_zoo import build
        model, inputs = build(architecture, "eager", seq=seq, batch=batch, dtype=dtype, device=device)
    except ImportError:
        raise TargetError("--hf needs transformers: pip install 'attncompiler[hf]'") from None
    except (KeyError, ValueError) as e:
        raise TargetError(f"--hf {architecture}: {str(e.args[0]).splitlines()[0]}") from None
    return Target(f"{architecture} (tiny, random weights)", model, kwargs=inputs)
