"""Error checks relative to PyTorch's own low-precision error."""

from __future__ import annotations

import torch


def error(out: torch.Tensor, exact: torch.Tensor) -> float:
    return (out.double() - exact.double()).abs().max().item()


def assert_as_accurate_as_torch(out: torch.Tensor, exact: torch.Tensor, torch_out: torch.Tensor,
                                factor: float = 2.0, floor: float = 1e-5) -> None:
    """``out`` may be at most ``factor``× as far from ``exact`` (fp64) as PyTorch's own ``torch_out``.

    NaN must appear exactly where the exact result has NaN; every other element must be finite.
    """
    assert out.shape == exact.shape, (out.shape, exact.shape)
    nan = torch.isnan(exact)
    assert torch.equal(torch.isnan(out), nan), "NaN pattern differs from the exact result"
    ours = error(out[~nan], exact[~nan]) if (~nan).any() else 0.0
    theirs = error(torch_out[~nan], exact[~nan]) if (~nan).any() else 0.0
    assert ours <= factor * theirs + floor, f"error {ours:.3g} vs PyTorch's {theirs:.3g}"
