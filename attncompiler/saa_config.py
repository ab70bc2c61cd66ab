"""SAA operating points: the knobs of sparse-aggregate attention, validated in one place.

An operating point says how finely queries and keys are blocked, how many key blocks each query
block computes exactly (the fewest routed blocks whose estimated mass reaches ``tau``, at most
``top_k``; either alone when the other is None; on top of the ``sinks`` first blocks and the
``local_blocks`` diagonal blocks, which are always exact), how many centroids stand in for each
remaining key block (and, beyond ``near_blocks`` of the diagonal, for each group of ``far_group``
key blocks), and the error budget ``max_error``: the largest relative error (Frobenius norm,
against dense attention) a site may show on its first call; over it, the site tries up to ``denser``
denser operating points (:meth:`SAAConfig.denser_points`) before it falls back to dense.
``router`` picks the training-free block estimate (:mod:`attncompiler.saa_routing`); ``graphs``
replays a GPU's calls from CUDA graphs (:mod:`attncompiler.saa_graphs`).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any


ROUTERS = ("sampled-keys", "mean-key")


class SAAConfigError(ValueError):
    """An invalid SAA operating point."""


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclass(frozen=True)
class SAAConfig:
    block_m: int = 128           # queries per query block (the routing granularity and kernel tile)
    block_n: int = 128           # keys per key block
    top_k: int | None = 12       # at most this many routed exact blocks per query block, beyond sinks and local blocks
    tau: float | None = 0.97     # the fewest routed blocks whose estimated mass reaches tau (None: top_k alone)
    sinks: int = 1               # first key blocks, always exact
    local_blocks: int = 2        # key blocks ending at the diagonal, always exact
    centroids: int = 1           # centroids per key block that is not computed exactly
    far_group: int = 32          # key blocks one centroid stands for beyond near_blocks of the diagonal (1: no groups)
    near_blocks: int = 16        # key blocks before a query block's diagonal that keep their own centroids
    max_error: float = 0.1       # relative error budget against dense attention
    router: str = "sampled-keys"  # block logits: "sampled-keys" or "mean-key" (saa_routing)
    key_stride: int = 4          # "sampled-keys": every key_stride-th key of a block is scored against each row
    query_stride: int | None = None  # "sampled-keys": the rows scored, the last of each run of query_stride rows
    #                              of a query block (and its last row); None: 2, or 1 where block_m is 16
    candidates: int | None = 40  # "sampled-keys": score only the max(candidates, top_k) best key blocks by
    #                              "mean-key" (and the forced ones); None: every block
    min_keys: int = 8192         # calls with fewer keys run dense attention (faster there than SAA's planning)
    denser: int = 3              # denser points a site over max_error tries before dense attention (denser_points)
    graphs: bool = True          # on a GPU, replay each input layout's calls from a CUDA graph (saa_graphs)

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not _is_pow2(value) or value < 16:
                raise SAAConfigError(f"SAA {name} must be a power of two >= 16, got {value!r}")
        for name in ("sinks", "local_blocks", "min_keys", "near_blocks", "denser"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise SAAConfigError(f"SAA {name} must be an integer >= 0, got {value!r}")
        if self.top_k is None and self.tau is None:
            raise SAAConfigError("an SAA operating point needs top_k, tau or both")
        if self.top_k is not None and (not isinstance(self.top_k, int) or isinstance(self.top_k, bool)
                                       or self.top_k < 0):
            raise SAAConfigError(f"SAA top_k must be None or an integer >= 0, got {self.top_k!r}")
        if self.tau is not None and not (isinstance(self.tau, (int, float)) and 0.0 < self.tau <= 1.0):
            raise SAAConfigError(f"SAA tau must be None or in (0, 1], got {self.tau!r}")
        if (not isinstance(self.centroids, int) or isinstance(self.centroids, bool) or self.centroids < 1
                or self.block_n % self.centroids):
            raise SAAConfigError(f"SAA centroids must be an integer >= 1 dividing block_n={self.block_n}, "
                                 f"got {self.centroids!r}")
        if (not isinstance(self.far_group, int) or isinstance(self.far_group, bool) or not _is_pow2(self.far_group)
                or self.far_group > 32):
            raise SAAConfigError(f"SAA far_group must be a power of two <= 32, got {self.far_group!r}")
        if (not isinstance(self.key_stride, int) or isinstance(self.key_stride, bool) or not _is_pow2(self.key_stride)
                or self.key_stride > self.block_n):
            raise SAAConfigError(f"SAA key_stride must be a power of two <= block_n={self.block_n}, "
                                 f"got {self.key_stride!r}")
        if self.query_stride is not None and (
                not isinstance(self.query_stride, int) or isinstance(self.query_stride, bool)
                or not _is_pow2(self.query_stride) or self.query_stride > self.block_m // 16):
            raise SAAConfigError(f"SAA query_stride must be a power of two <= block_m / 16 = {self.block_m // 16}, "
                                 f"got {self.query_stride!r}")
        if self.candidates is not None and (not isinstance(self.candidates, int) or isinstance(self.candidates, bool)
                                            or self.candidates < 1):
            raise SAAConfigError(f"SAA candidates must be None or an integer >= 1, got {self.candidates!r}")
        if not isinstance(self.graphs, bool):
            raise SAAConfigError(f"SAA graphs must be True or False, got {self.graphs!r}")
        if self.router not in ROUTERS:
            raise SAAConfigError(f"SAA router must be one of {list(ROUTERS)}, got {self.router!r}")
        if not (isinstance(self.max_error, (int, float)) and math.isfinite(self.max_error) and self.max_error > 0):
            raise SAAConfigError(f"SAA max_error must be a finite number > 0, got {self.max_error!r}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "SAAConfig":
        """An operating point from a dict of some of its fields (the rest keep their defaults)."""
        if not isinstance(values, dict):
            raise SAAConfigError(f"SAA options must be a dict, got {type(values).__name__}")
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(valid))
        if unknown:
            raise SAAConfigError(f"unknown SAA option(s) {unknown}; valid keys are {valid}")
        return cls(**values)

    def to_json(self) -> str:
        """The canonical text form carried through the custom op."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "SAAConfig":
        return cls.from_dict(json.loads(text))

    @property
    def effective_query_stride(self) -> int:
        """The ``query_stride`` in effect: as given, or 2 (1 where ``block_m`` is 16)."""
        return self.query_stride if self.query_stride is not None else min(2, self.block_m // 16)

    def denser_points(self) -> list["SAAConfig"]:
        """The operating points a site whose first call exceeds ``max_error`` tries, in order (``denser`` of
        them): each keeps twice the routed blocks of the one before (``top_k``, at least 1) and leaves out half
        its estimated mass (``1 - tau``); the rest as here. Denser points try none further."""
        points, point = [], self
        for _ in range(self.denser):
            point = replace(point, top_k=None if point.top_k is None else max(1, 2 * point.top_k),
                            tau=None if point.tau is None else 1 - (1 - point.tau) / 2, denser=0)
            points.append(point)
        return points

    def routing(self) -> str:
        """The knobs :meth:`denser_points` moves, as text: e.g. "top_k 24, tau 0.985"."""
        return ", ".join(f"{name} {value:.4g}" for name, value in (("top_k", self.top_k), ("tau", self.tau))
                         if value is not None)

    @property
    def sub_block(self) -> int:
        """Keys per centroid."""
        return self.block_n // self.centroids
