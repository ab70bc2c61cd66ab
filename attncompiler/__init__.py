"""attncompiler: a torch.compile backend that rewrites attention into generated Triton kernels.

    model = torch.compile(model, backend="attncompiler")   # no import needed

Public API: :func:`explain` (compile, run once, report every attention site), :func:`collect`
(gather reports from compilations inside a block), :class:`Report`, :data:`KERNEL_CALLS`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch

from .backend import attncompiler_backend
from .ops import KERNEL_CALLS
from .options import Options, OptionError
from .report import Report, Site, collect

__version__ = "0.1.0"


def explain(model_or_fn: Callable, *args: Any, options: dict | None = None, **kwargs: Any) -> Report:
    """Compile ``model_or_fn`` with the backend, call it once with ``args``/``kwargs``, return the report.

    Resets Dynamo's caches first so that every graph is captured (and reported) afresh.
    The output of the call is kept as ``report.output``.
    """
    Options.resolve(options)
    torch.compiler.reset()
    compiled = torch.compile(model_or_fn, backend=functools.partial(attncompiler_backend, options=options))
    with collect() as report:
        report.output = compiled(*args, **kwargs)
    return report


__all__ = ["explain", "collect", "Report", "Site", "Options", "OptionError", "KERNEL_CALLS",
           "attncompiler_backend", "__version__"]
