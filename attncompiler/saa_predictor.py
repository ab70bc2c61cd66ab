"""The learned SAA router: per-layer low-rank projections of pooled queries and keys, distilled from true block masses.

The training-free router estimates the logit of key block ``n`` for query block ``m`` from the
mean query ``q̄_m`` (:func:`attncompiler.saa_routing.training_free_logits`, by the operating point's
``router``). The learned router adds, per layer, ``(q̄_m U)·(k̄_n V)`` with ``U``, ``V`` of shape ``[D, rank]`` per key head, and a
bias per query head and distance bucket (``⌈log2(1 + d)⌉`` for a key block ``d`` blocks before the
query block's diagonal block), which pooled queries cannot see: how much a head favours recent keys.
Calibration fits ``U`` and ``V`` so that the softmax of the estimated logits over the allowed key
blocks matches the *true block masses* (the attention probability that falls in each key block,
averaged over the query block's rows) on sample text: it minimizes their KL divergence, which is
also the routing error reported. ``V`` and the biases start at zero, where the learned router is
the training-free one.

Weights are data: a ``torch.save`` dict of tensors and strings, read back with
``weights_only=True`` and validated, stored in ``<cache dir>/saa_predictors/<model>.pt``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .options import cache_dir
from .saa_config import SAAConfig
from .saa_reference import pool_reference
from .saa_routing import BlockGeometry, group_counts, training_free_logits

SCHEMA = 1
BUCKETS = 16  # distance buckets: 0, 1, 2-3, 4-7, ... blocks before the diagonal

# One calibration sample of one layer: q [B, H, S, D], k [B, Hk, S, D] (causal, Sq == Sk), and the scale.
Sample = tuple[torch.Tensor, torch.Tensor, float]


class PredictorError(ValueError):
    """A predictor file that is missing, corrupt, or of another schema."""


@dataclass(frozen=True)
class LayerPredictor:
    """One layer's learned routing term: ``q_proj``, ``k_proj`` ``[Hk, D, rank]``,
    ``distance_bias`` ``[H, BUCKETS]``."""

    q_proj: torch.Tensor
    k_proj: torch.Tensor
    distance_bias: torch.Tensor

    def logits(self, q_means: torch.Tensor, k_means: torch.Tensor, geometry: BlockGeometry) -> torch.Tensor:
        """``[B, H, M, N]``: the learned term for mean queries ``[B, H, M, D]`` and mean keys ``[B, Hk, N, D]``."""
        batch, heads, num_m, dim = q_means.shape
        kv_heads = k_means.shape[1]
        device = q_means.device
        grouped = q_means.float().reshape(batch, kv_heads, (heads // kv_heads) * num_m, dim)
        q_low = torch.matmul(grouped, self.q_proj.to(device))                      # [B, Hk, G·M, r]
        k_low = torch.matmul(k_means.float(), self.k_proj.to(device))              # [B, Hk, N, r]
        learned = torch.matmul(q_low, k_low.transpose(-2, -1)).reshape(batch, heads, num_m, -1)
        return learned + self.distance_bias.to(device)[:, distance_buckets(geometry, device)]


def distance_buckets(geometry: BlockGeometry, device) -> torch.Tensor:
    """``[M, N]``: the distance bucket of key block ``n`` from query block ``m``'s diagonal block."""
    _, last = geometry.query_rows(device)
    diagonal = torch.clamp(last + geometry.key_offset, 0, geometry.seq_k - 1) // geometry.block_n
    distance = (diagonal[:, None] - torch.arange(geometry.num_n, device=device)).abs()
    return torch.ceil(torch.log2(distance.float() + 1)).long().clamp(max=BUCKETS - 1)


@dataclass(frozen=True)
class Predictor:
    """The learned router of one model: a :class:`LayerPredictor` per attention layer, in call order."""

    model: str
    layers: tuple[LayerPredictor, ...]

    @property
    def num_parameters(self) -> int:
        return sum(layer.q_proj.numel() + layer.k_proj.numel() + layer.distance_bias.numel() for layer in self.layers)


def true_block_masses(q: torch.Tensor, k: torch.Tensor, scale: float, geometry: BlockGeometry) -> torch.Tensor:
    """``[B, H, M, N]``: attention probability in each key block, averaged over each query block's rows (fp32)."""
    group = q.shape[1] // k.shape[1]
    scores = torch.matmul(q.float(), k.float().repeat_interleave(group, 1).transpose(-2, -1)) * scale
    if geometry.causal:
        rows = torch.arange(geometry.seq_q, device=q.device)[:, None]
        cols = torch.arange(geometry.seq_k, device=q.device)[None, :]
        scores = scores.masked_fill(cols > rows + geometry.key_offset, -math.inf)
    probs = torch.softmax(scores, -1)
    per_block = pool_reference(probs.transpose(-2, -1), geometry.block_n, geometry.num_n)        # [B, H, N, Sq]
    per_block = per_block * group_counts(geometry.seq_k, geometry.block_n, geometry.num_n, q.device)[:, None]
    return pool_reference(per_block.transpose(-2, -1), geometry.block_m, geometry.num_m)         # [B, H, M, N]


@dataclass(frozen=True)
class _Prepared:
    """What routing sees of one sample (pooled queries and keys) and the masses it should predict."""

    q_means: torch.Tensor
    k_means: torch.Tensor
    geometry: BlockGeometry
    base: torch.Tensor        # training-free logits, -inf where not allowed
    target: torch.Tensor      # true block masses
    allowed: torch.Tensor     # [M, N] bool


def _prepare(sample: Sample, config: SAAConfig) -> _Prepared:
    q, k, scale = sample
    geometry = BlockGeometry(q.shape[-2], k.shape[-2], config.block_m, config.block_n, causal=True)
    q_means = pool_reference(q, config.block_m, geometry.num_m)
    k_means = pool_reference(k, config.block_n, geometry.num_n)
    allowed = torch.arange(geometry.num_n, device=q.device) < geometry.allowed_blocks(q.device)[:, None]
    base = training_free_logits(q, q_means, k, k_means, scale, geometry, config).masked_fill(~allowed, -math.inf)
    return _Prepared(q_means, k_means, geometry, base, true_block_masses(q, k, scale, geometry), allowed)


def _kl(prepared: _Prepared, layer: LayerPredictor | None) -> torch.Tensor:
    """Mean over (batch, head, query block) of KL(true masses ‖ estimated masses)."""
    logits = prepared.base if layer is None else prepared.base + layer.logits(prepared.q_means, prepared.k_means,
                                                                           prepared.geometry)
    log_estimate = torch.log_softmax(logits, -1)
    target = prepared.target
    terms = torch.where(target > 0, target * (torch.log(target.clamp_min(1e-30)) - log_estimate), 0.0)
    return terms.masked_fill(~prepared.allowed, 0.0).sum(-1).mean()


def routing_error(samples: list[list[Sample]], config: SAAConfig, predictor: Predictor | None = None) -> float:
    """Mean KL divergence (nats) between true and estimated block masses over samples × layers;
    ``samples[i][layer]`` as :func:`calibrate` takes them."""
    with torch.no_grad():
        errors = [float(_kl(_prepare(layer_sample, config), None if predictor is None else predictor.layers[i]))
                  for sample in samples for i, layer_sample in enumerate(sample)]
    return sum(errors) / len(errors)


def calibrate(samples: list[list[Sample]], config: SAAConfig, model: str, rank: int = 4, steps: int = 200,
              lr: float = 1e-2) -> Predictor:
    """Fit each layer's projections and biases by distillation: Adam on the KL divergence between true
    and estimated block masses over ``samples`` (``samples[i][layer]``: one sequence's q, k and scale)."""
    if not samples or not samples[0]:
        raise ValueError("calibration needs at least one sample with one layer")
    if rank < 1 or steps < 1:
        raise ValueError(f"calibration needs rank >= 1 and steps >= 1, got rank {rank}, steps {steps}")
    layers = []
    for index in range(len(samples[0])):
        prepared = [_prepare(sample[index], config) for sample in samples]
        heads, (kv_heads, dim) = prepared[0].q_means.shape[1], prepared[0].k_means.shape[1::2]
        generator = torch.Generator().manual_seed(index)
        q_proj = (torch.randn(kv_heads, dim, rank, generator=generator) * dim ** -0.5).requires_grad_()
        k_proj = torch.zeros(kv_heads, dim, rank, requires_grad=True)  # the product starts at zero
        bias = torch.zeros(heads, BUCKETS, requires_grad=True)
        optimizer = torch.optim.Adam([q_proj, k_proj, bias], lr=lr)
        for _ in range(steps):
            optimizer.zero_grad()
            loss = sum(_kl(p, LayerPredictor(q_proj, k_proj, bias)) for p in prepared) / len(prepared)
            loss.backward()
            optimizer.step()
        layers.append(LayerPredictor(*(t.detach().clone() for t in (q_proj, k_proj, bias))))
    return Predictor(model, tuple(layers))


@torch.no_grad()
def capture(model: torch.nn.Module, ids: torch.Tensor) -> list[Sample]:
    """One forward of a transformers model on token ids ``[1, S]``: each attention layer's ``(q, k, scale)``,
    in call order (queries and keys as attention sees them, after rotary embeddings)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    captured: list[Sample] = []

    def record(module, query, key, value, attention_mask, scaling=None, **kwargs):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        captured.append((query.detach().float().cpu(), key.detach().float().cpu(), float(scale)))
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)

    AttentionInterface.register("attncompiler_capture", record)
    previous = model.config._attn_implementation
    model.set_attn_implementation("attncompiler_capture")
    try:
        model(input_ids=ids)
    finally:
        model.set_attn_implementation(previous)
    return captured


def predictor_path(model: str) -> Path:
    """Where the predictor of ``model`` is stored, beside the tuning cache."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", model).strip("._") or "model"
    return cache_dir() / "saa_predictors" / f"{slug}.pt"


def save_predictor(predictor: Predictor, path: Path | None = None) -> Path:
    """Write ``predictor`` as plain tensors and strings (atomically); returns the path."""
    path = Path(path) if path is not None else predictor_path(predictor.model)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"schema": SCHEMA, "model": predictor.model,
            "q_proj": [layer.q_proj.contiguous() for layer in predictor.layers],
            "k_proj": [layer.k_proj.contiguous() for layer in predictor.layers],
            "distance_bias": [layer.distance_bias.contiguous() for layer in predictor.layers]}
    partial = path.with_suffix(path.suffix + ".partial")
    torch.save(data, partial)
    partial.replace(path)
    return path


def load_predictor(path: Path) -> Predictor:
    """Read and validate a predictor file; anything unexpected raises :class:`PredictorError`."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise PredictorError(f"cannot read SAA predictor {path}: {type(e).__name__}: {e}") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA or not isinstance(data.get("model"), str):
        raise PredictorError(f"{path} is not an SAA predictor of schema {SCHEMA}")
    columns = [data.get(name) for name in ("q_proj", "k_proj", "distance_bias")]
    if not (all(isinstance(c, list) for c in columns) and columns[0] and len({len(c) for c in columns}) == 1):
        raise PredictorError(f"{path}: q_proj, k_proj and distance_bias must be lists of one tensor per layer")
    layers = []
    for q_proj, k_proj, bias in zip(*columns):
        tensors = (q_proj, k_proj, bias)
        if not (all(isinstance(t, torch.Tensor) and t.is_floating_point() and bool(torch.isfinite(t).all())
                    for t in tensors)
                and q_proj.dim() == 3 and q_proj.shape == k_proj.shape and bias.dim() == 2
                and bias.shape[1] == BUCKETS and bias.shape[0] % q_proj.shape[0] == 0):
            raise PredictorError(f"{path}: each layer needs finite q_proj, k_proj [Hk, D, rank] and "
                                 f"distance_bias [H, {BUCKETS}]")
        layers.append(LayerPredictor(q_proj, k_proj, bias))
    return Predictor(data["model"], tuple(layers))
