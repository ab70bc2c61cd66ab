"""The ``attncompiler`` torch.compile backend: run the pass pipeline, then the inner compiler."""

from __future__ import annotations

import logging

import torch

from .options import Options
from .report import GraphRecord, Site, next_graph_index, publish

log = logging.getLogger("attncompiler")


def attncompiler_backend(gm: torch.fx.GraphModule, example_inputs, *, options: dict | None = None,
                         mode: str | None = None):
    """Rewrite the attention sites of one captured graph and compile the rest with the inner compiler.

    Registered as the ``attncompiler`` entry point of ``torch_dynamo_backends``, so
    ``torch.compile(model, backend="attncompiler", options={...}, mode=...)`` finds it.
    """
    opts = Options.resolve(options, mode)
    from . import ops  # noqa: F401  (registers attncompiler::attention)
    from . import tuner

    tuner.configure(opts)
    from .passes import PIPELINE

    index = next_graph_index()
    before = gm.code
    sites: list[Site] = []
    for graph_pass in PIPELINE:
        sites += graph_pass(gm, opts, index)
    publish(GraphRecord(index, before, gm.code), sites)
    rewritten = sum(s.rewritten for s in sites)
    if sites:
        log.info("attncompiler: graph %d: rewrote %d of %d attention sites", index, rewritten, len(sites))
    return _inner_compile(gm, example_inputs, opts)


def _inner_compile(gm: torch.fx.GraphModule, example_inputs, opts: Options):
    if opts.inner == "eager":
        return gm.forward
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    patches = {**(list_mode_options(opts.mode) if opts.mode else {}), **opts.inductor}
    return compile_fx(gm, example_inputs, config_patches=patches or None)
