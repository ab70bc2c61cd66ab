"""Writing generated Triton source to the cache directory and loading it as a module.

Triton reads a kernel's source with ``inspect``, so generated kernels must live in real files.
Each source is stored once under ``<cache>/kernels/<name>.py``, named by its content hash, so
the file a user inspects is exactly the code that runs.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
import threading
from pathlib import Path
from types import ModuleType

from attncompiler.options import cache_dir

_loaded: dict[str, ModuleType] = {}
_lock = threading.Lock()


def source_hash(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def kernel_dir() -> Path:
    return cache_dir() / "kernels"


def load_source(name: str, source: str) -> ModuleType:
    """Write ``source`` to ``<cache>/kernels/<name>.py`` (atomically, once) and import it."""
    with _lock:
        if name in _loaded:
            return _loaded[name]
        path = kernel_dir() / f"{name}.py"
        if not path.exists() or path.read_text() != source:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                f.write(source)
            os.replace(tmp, path)
        spec = importlib.util.spec_from_file_location(f"attncompiler_generated.{name}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        _loaded[name] = module
        return module
