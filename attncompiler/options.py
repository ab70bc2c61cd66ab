"""Every option of the backend and every ATTNCOMPILER_* environment variable, validated in one place.

Precedence: ``options=`` passed to ``torch.compile`` > environment variable > default.

| option   | environment           | values                                   | default    |
|----------|-----------------------|------------------------------------------|------------|
| inner    | ATTNCOMPILER_INNER    | "inductor", "eager"                      | "inductor" |
| kernel   | ATTNCOMPILER_KERNEL   | "auto", "triton", "reference"            | "auto"     |
| rewrite  | ATTNCOMPILER_REWRITE  | True, False (False: only report sites)   | True       |
| inductor | –                     | dict of Inductor config overrides        | {}         |
| tune     | ATTNCOMPILER_TUNE     | "off", "cached", "on-first-use",         | "cached"   |
|          |                       | "exhaustive"                             |            |
| cache_url| ATTNCOMPILER_CACHE_URL| None or "redis://host:port/db"           | None       |
| tune_sdpa| –                     | True, False (False: never run SDPA)      | True       |
| saa      | –                     | None, or dict of SAAConfig fields        | None       |
| –        | ATTNCOMPILER_CACHE_DIR| directory for generated kernels & tuning | XDG cache  |

``kernel="auto"`` runs the Triton kernel on CUDA tensors, and on CPU tensors when
``TRITON_INTERPRET=1``; otherwise the PyTorch reference. ``mode`` is ``torch.compile``'s mode
and is passed on to Inductor; ``mode="max-autotune"`` also means ``tune="exhaustive"`` unless
``tune`` is given. ``tune`` picks kernel configs per shape bucket (see :mod:`attncompiler.tuner`):
"off" uses the defaults, "cached" the tuning cache (defaults on a miss), "on-first-use" tunes a
bucket the first time it runs, "exhaustive" searches every config that fits. Where a tuned SDPA
backend beat every Triton config, the bucket runs SDPA; ``tune_sdpa=False`` keeps the Triton kernel
everywhere. ``cache_url`` adds a shared Redis level to the cache (see :mod:`attncompiler.fleet`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .saa_config import SAAConfig

CHOICES = {
    "inner": ("inductor", "eager"),
    "kernel": ("auto", "triton", "reference"),
    "tune": ("off", "cached", "on-first-use", "exhaustive"),
}
MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class OptionError(ValueError):
    """A bad option key or value."""


@dataclass(frozen=True)
class Options:
    inner: str = "inductor"
    kernel: str = "auto"
    rewrite: bool = True
    inductor: dict = field(default_factory=dict)
    tune: str = "cached"
    cache_url: str | None = None
    tune_sdpa: bool = True
    saa: SAAConfig | None = None  # approximate attention allowed, at this operating point
    mode: str | None = None

    @classmethod
    def resolve(cls, options: dict[str, Any] | None = None, mode: str | None = None) -> "Options":
        """Validate ``options`` (a dict) and ``mode``, fill the rest from the environment and defaults."""
        if options is None:
            options = {}
        if not isinstance(options, dict):
            raise OptionError(f"attncompiler options must be a dict, got {type(options).__name__}")
        valid = sorted(f.name for f in fields(cls) if f.name != "mode")
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise OptionError(f"unknown attncompiler option(s) {unknown}; valid keys are {valid}")
        if mode not in MODES:
            raise OptionError(f"unknown mode {mode!r}; valid modes are {[m for m in MODES if m]}")
        merged = {**_from_environment(), **options}
        for key, allowed in CHOICES.items():
            if key in merged and merged[key] not in allowed:
                raise OptionError(f"option {key!r} must be one of {list(allowed)}, got {merged[key]!r}")
        for key in ("rewrite", "tune_sdpa"):
            if not isinstance(merged.get(key, True), bool):
                raise OptionError(f"option {key!r} must be True or False, got {merged[key]!r}")
        if not isinstance(merged.get("inductor", {}), dict):
            raise OptionError("option 'inductor' must be a dict of Inductor config overrides")
        if merged.get("cache_url") is not None:
            _check_cache_url(merged["cache_url"])
        if mode in ("max-autotune", "max-autotune-no-cudagraphs") and "tune" not in options:
            merged["tune"] = "exhaustive"
        if merged.get("saa") is not None:
            merged["saa"] = _saa_config(merged["saa"])
        return cls(**merged, mode=mode)


def _saa_config(value: Any) -> SAAConfig:
    """The SAA operating point of option 'saa' (a dict of SAAConfig fields, or an SAAConfig)."""
    from .saa_config import SAAConfig, SAAConfigError

    if isinstance(value, SAAConfig):
        return value
    try:
        return SAAConfig.from_dict(value)
    except (SAAConfigError, TypeError) as e:
        raise OptionError(f"option 'saa': {e}") from None


def _from_environment() -> dict[str, Any]:
    env: dict[str, Any] = {}
    for key in CHOICES:
        raw = os.environ.get(f"ATTNCOMPILER_{key.upper()}")
        if raw:
            env[key] = raw.strip().lower()
    raw = os.environ.get("ATTNCOMPILER_REWRITE")
    if raw:
        if raw.strip().lower() not in ("0", "1", "true", "false"):
            raise OptionError(f"ATTNCOMPILER_REWRITE must be 0/1/true/false, got {raw!r}")
        env["rewrite"] = raw.strip().lower() in ("1", "true")
    raw = os.environ.get("ATTNCOMPILER_CACHE_URL")
    if raw:
        env["cache_url"] = raw.strip()
    return env


def _check_cache_url(url: Any) -> None:
    from .fleet import parse_url

    if not isinstance(url, str):
        raise OptionError(f"option 'cache_url' must be a redis:// URL string, got {url!r}")
    try:
        parse_url(url)
    except ValueError as e:
        raise OptionError(f"option 'cache_url': {e}") from None


def cache_dir() -> Path:
    """Where generated kernels and tuning results live: ``$ATTNCOMPILER_CACHE_DIR`` or the XDG cache."""
    explicit = os.environ.get("ATTNCOMPILER_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "attncompiler"


def triton_interpret() -> bool:
    """Whether Triton kernels run through the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")
