"""Graph passes, applied in order by the backend to each graph Dynamo captures.

Each pass takes ``(graph_module, options, graph_index)``, changes the graph module in place and
returns the :class:`attncompiler.report.Site` records of what it found.
"""

from .rewrite import rewrite_attention

PIPELINE = [rewrite_attention]

__all__ = ["PIPELINE"]
