"""Tuning results on disk: one JSON file per environment, validated on read, written atomically.

An *environment* is everything a timing depends on besides the shape: the GPU (name and compute
capability), the torch and Triton versions, a hash of the kernel sources and the schema version.
Each environment has its own file ``<cache>/tuning/<device>-<fingerprint>.json``::

    {"schema": 3, "environment": {...}, "entries": {"<shape bucket>": {"config": {...}, "ms": ...,
                                                                    "winner": "triton", "backward": {...}}}}

so a change in any of them starts a new, empty file (a file of an older schema is never read: its
name differs). Files are data only: every entry is checked
field by field before use, and a corrupt or foreign file is ignored with one warning and rewritten
on the next store. Writers take an exclusive ``fcntl`` lock, merge with what is on disk and replace
the file atomically, so concurrent tuning processes lose no entries.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import math
import os
import re
import tempfile
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Iterator, Protocol

import torch

from attncompiler.codegen.configs import BwdConfig, FlashConfig
from .options import cache_dir

log = logging.getLogger("attncompiler")

SCHEMA = 3
SEARCHES = ("quick", "exhaustive")
_BUCKET_KEY = re.compile(r"^[A-Za-z0-9_.=,+/-]{1,200}$")
_warned: set[str] = set()


class CacheError(ValueError):
    """A cache file or entry that does not validate."""


def warn_once(key: str, message: str, *args: Any) -> None:
    """Log ``message`` as a warning the first time ``key`` is seen in this process."""
    if key not in _warned:
        _warned.add(key)
        log.warning(message, *args)


@functools.lru_cache(maxsize=None)
def kernel_sources_hash() -> str:
    """Hash of every source file of :mod:`attncompiler.codegen`: a kernel change invalidates timings."""
    from attncompiler import codegen

    package = Path(codegen.__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(package.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Environment:
    """What a timing is valid for, besides the shape bucket."""

    device: str
    capability: str
    torch: str
    triton: str
    kernels: str
    schema: int = SCHEMA

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    def file_name(self) -> str:
        device = re.sub(r"[^A-Za-z0-9]+", "-", self.device).strip("-").lower() or "device"
        return f"{device}-{self.fingerprint()}.json"

    @classmethod
    def from_json(cls, raw: Any) -> "Environment":
        expected = {f.name: f.type for f in fields(cls)}
        if not isinstance(raw, dict) or set(raw) != set(expected):
            raise CacheError(f"environment must have exactly the fields {sorted(expected)}")
        if not isinstance(raw["schema"], int) or isinstance(raw["schema"], bool):
            raise CacheError("environment schema must be an integer")
        if not all(isinstance(raw[k], str) for k in expected if k != "schema"):
            raise CacheError("environment fields other than schema must be strings")
        return cls(**raw)


@functools.lru_cache(maxsize=None)
def current_environment(device: torch.device) -> Environment:
    """The environment of ``device``: a CUDA GPU, or the CPU where kernels run interpreted."""
    import triton

    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        name, capability = props.name, f"{props.major}.{props.minor}"
    else:
        name, capability = device.type, "interpreter"
    return Environment(name, capability, torch.__version__, triton.__version__, kernel_sources_hash())


def _config_from_json(raw: Any, kind: type, what: str):
    """A ``FlashConfig`` or ``BwdConfig`` from its JSON object: powers of two, and 1..8 stages."""
    names = {f.name for f in fields(kind)}
    if not isinstance(raw, dict) or set(raw) != names:
        raise CacheError(f"{what} must have exactly the fields {sorted(names)}")
    for name, value in raw.items():
        if name.endswith("num_stages") and not (_is_int(value) and 1 <= value <= 8):
            raise CacheError(f"{what} {name} must be an integer in 1..8, got {value!r}")
        if not name.endswith("num_stages") and not (_is_int(value) and 1 <= value <= 1024 and value & (value - 1) == 0):
            raise CacheError(f"{what} {name} must be a power of two in 1..1024, got {value!r}")
    return kind(**raw)


def _check_search(raw: dict, what: str) -> None:
    if not _is_time(raw["ms"]):
        raise CacheError(f"{what}ms must be a positive finite number, got {raw['ms']!r}")
    if raw["search"] not in SEARCHES:
        raise CacheError(f"{what}search must be one of {list(SEARCHES)}, got {raw['search']!r}")
    if not _is_int(raw["candidates"]) or raw["candidates"] < 1:
        raise CacheError(f"{what}candidates must be a positive integer, got {raw['candidates']!r}")


@dataclass(frozen=True)
class BackwardEntry:
    """The fastest backward config of a shape bucket, among ``candidates`` checked and timed."""

    config: BwdConfig
    ms: float
    search: str
    candidates: int

    def to_json(self) -> dict:
        return {**asdict(self), "config": asdict(self.config)}

    @classmethod
    def from_json(cls, raw: Any) -> "BackwardEntry":
        names = {f.name for f in fields(cls)}
        if not isinstance(raw, dict) or set(raw) != names:
            raise CacheError(f"backward must have exactly the fields {sorted(names)}")
        _check_search(raw, "backward ")
        return cls(_config_from_json(raw["config"], BwdConfig, "backward config"), float(raw["ms"]), raw["search"],
                   raw["candidates"])


@dataclass(frozen=True)
class Entry:
    """The tuning result of one shape bucket.

    ``config`` and ``ms``: the fastest Triton config; ``baseline`` and ``baseline_ms``: the fastest
    SDPA backend that computes the bucket's function; ``winner``: what the bucket runs, "triton" or
    that backend's name where it beat every Triton config; ``backward``: the fastest backward
    config, once a training call tuned it.
    """

    config: FlashConfig
    ms: float
    search: str
    candidates: int
    baseline: str | None = None
    baseline_ms: float | None = None
    winner: str = "triton"
    backward: BackwardEntry | None = None

    @property
    def speedup(self) -> float | None:
        """How many times faster the Triton config is than the best SDPA baseline (None without one)."""
        return self.baseline_ms / self.ms if self.baseline_ms else None

    def to_json(self) -> dict:
        return {**asdict(self), "config": asdict(self.config),
                "backward": self.backward.to_json() if self.backward else None}

    @classmethod
    def from_json(cls, raw: Any) -> "Entry":
        """Validate every field; raise :class:`CacheError` for anything that is not a well-formed entry."""
        names = {f.name for f in fields(cls)}
        if not isinstance(raw, dict) or set(raw) != names:
            raise CacheError(f"entry must have exactly the fields {sorted(names)}")
        config = _config_from_json(raw["config"], FlashConfig, "config")
        _check_search(raw, "")
        if (raw["baseline"] is None) != (raw["baseline_ms"] is None):
            raise CacheError("baseline and baseline_ms must both be set or both be null")
        if raw["baseline"] is not None and not (isinstance(raw["baseline"], str) and
                                                _BUCKET_KEY.match(raw["baseline"])):
            raise CacheError(f"baseline must be a short name, got {raw['baseline']!r}")
        if raw["baseline_ms"] is not None and not _is_time(raw["baseline_ms"]):
            raise CacheError(f"baseline_ms must be a positive finite number, got {raw['baseline_ms']!r}")
        if raw["winner"] not in ("triton", raw["baseline"]):
            raise CacheError(f"winner must be 'triton' or the baseline, got {raw['winner']!r}")
        backward = None if raw["backward"] is None else BackwardEntry.from_json(raw["backward"])
        return cls(**{**raw, "config": config, "ms": float(raw["ms"]), "backward": backward,
                      "baseline_ms": None if raw["baseline_ms"] is None else float(raw["baseline_ms"])})


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_time(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _deeper(old, new):
    """Of two results (forward or backward), the one to keep: an exhaustive search beats a quick one,
    else the newer; a missing one never wins."""
    if new is None or (old is not None and old.search == "exhaustive" and new.search != "exhaustive"):
        return old
    return new


def preferred(old: Entry | None, new: Entry) -> Entry:
    """What to keep for one bucket: the forward part and the backward part are each chosen by
    :func:`_deeper`, so that a forward result and a backward result tuned apart both survive."""
    if old is None:
        return new
    return replace(_deeper(old, new), backward=_deeper(old.backward, new.backward))


def _new_or_deeper(known, offered):
    """``offered`` where it is new or from a deeper search than ``known``, else ``known``."""
    if offered is not None and (known is None or (offered.search == "exhaustive" and known.search != "exhaustive")):
        return offered
    return known


def taken_over(known: Entry | None, offered: Entry) -> Entry:
    """``known`` with the parts of a result from elsewhere that are new or deeper (forward, backward)."""
    if known is None:
        return offered
    return replace(_new_or_deeper(known, offered), backward=_new_or_deeper(known.backward, offered.backward))


def improves(known: Entry | None, offered: Entry) -> bool:
    """Whether a result from elsewhere is worth taking over ``known``: it adds or deepens a part."""
    return taken_over(known, offered) != known


def valid_entries(raw: Any, origin: str) -> dict[str, Entry]:
    """The well-formed ``bucket → entry`` pairs of ``raw``; the others are dropped with one warning."""
    if not isinstance(raw, dict):
        raise CacheError("entries must be an object")
    entries, rejected = {}, []
    for key, value in raw.items():
        try:
            if not _BUCKET_KEY.match(key):
                raise CacheError(f"malformed bucket key {key[:60]!r}")
            entries[key] = Entry.from_json(value)
        except CacheError as e:
            rejected.append(str(e))
    if rejected:
        warn_once(f"entries:{origin}", "attncompiler: ignoring %d malformed tuning entries in %s (first: %s)",
                  len(rejected), origin, rejected[0])
    return entries


def tuning_dir() -> Path:
    return cache_dir() / "tuning"


def read_file(path: Path) -> tuple[Environment, dict[str, Entry]]:
    """The environment and valid entries of one cache file; :class:`CacheError` if it is not one."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CacheError(f"unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(raw, dict) or set(raw) != {"schema", "environment", "entries"}:
        raise CacheError("not an attncompiler tuning file")
    if raw["schema"] != SCHEMA:
        raise CacheError(f"schema {raw['schema']!r}, this version reads schema {SCHEMA}")
    return Environment.from_json(raw["environment"]), valid_entries(raw["entries"], str(path))


def file_payload(environment: Environment, entries: dict[str, Entry]) -> dict:
    return {"schema": SCHEMA, "environment": asdict(environment),
            "entries": {key: entries[key].to_json() for key in sorted(entries)}}


class LocalCache:
    """The tuning file of one environment."""

    def __init__(self, environment: Environment, directory: Path | None = None):
        self.environment = environment
        self.path = (directory or tuning_dir()) / environment.file_name()

    def load(self) -> dict[str, Entry]:
        """Valid entries on disk; a missing file is empty, a corrupt or foreign one is empty with a warning."""
        if not self.path.exists():
            return {}
        try:
            environment, entries = read_file(self.path)
            if environment != self.environment:
                raise CacheError("written for another environment")
        except CacheError as e:
            warn_once(f"file:{self.path}", "attncompiler: ignoring tuning cache %s (%s); it will be rewritten",
                      self.path, e)
            return {}
        return entries

    def store(self, entries: dict[str, Entry]) -> dict[str, Entry]:
        """Merge ``entries`` into the file under an exclusive lock; return everything now in it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._locked():
            merged = self.load()
            for key, entry in entries.items():
                merged[key] = preferred(merged.get(key), entry)
            write_atomically(self.path, json.dumps(file_payload(self.environment, merged), indent=1))
        return merged

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class RemoteLevel(Protocol):
    """A shared second level (see :mod:`attncompiler.fleet`); failures are its own business."""

    def load(self) -> dict[str, Entry]: ...

    def store(self, key: str, entry: Entry) -> None: ...


class TuningCache:
    """Both levels for one environment, with an in-memory table so that a lookup is a dict lookup.

    The table is filled once, from the local file and then the remote level; remote entries that
    the local file lacks are written to it, so the next process finds them locally.
    """

    def __init__(self, local: LocalCache, remote: RemoteLevel | None = None):
        self.local = local
        self.remote = remote
        self.table = local.load()
        if remote is not None:
            fetched = {k: taken_over(self.table.get(k), e) for k, e in remote.load().items()
                       if improves(self.table.get(k), e)}
            if fetched:
                self.table = local.store(fetched)

    def lookup(self, key: str) -> Entry | None:
        return self.table.get(key)

    def store(self, key: str, entry: Entry) -> None:
        self.table = self.local.store({key: entry})
        if self.remote is not None:
            self.remote.store(key, self.table[key])


def cache_files(directory: Path | None = None) -> list[Path]:
    directory = directory or tuning_dir()
    return sorted(directory.glob("*.json")) if directory.is_dir() else []


def export_payload(directory: Path | None = None) -> dict:
    """Every valid cache file of ``directory`` in one document (corrupt files are left out)."""
    caches = []
    for path in cache_files(directory):
        with contextlib.suppress(CacheError):
            environment, entries = read_file(path)
            caches.append(file_payload(environment, entries))
    return {"schema": SCHEMA, "caches": caches}


def import_payload(raw: Any, directory: Path | None = None) -> tuple[int, list[str]]:
    """Validate an exported document entry by entry and merge the valid entries into the local files.

    Returns ``(entries imported, one message per rejected part)``; raises :class:`CacheError` when the
    document as a whole is not an export.
    """
    if not isinstance(raw, dict) or set(raw) != {"schema", "caches"} or not isinstance(raw["caches"], list):
        raise CacheError("not an attncompiler cache export (expected the keys 'schema' and 'caches')")
    if raw["schema"] != SCHEMA:
        raise CacheError(f"export has schema {raw['schema']!r}, this version reads schema {SCHEMA}")
    imported, rejected = 0, []
    for i, cache in enumerate(raw["caches"]):
        try:
            if not isinstance(cache, dict) or set(cache) != {"schema", "environment", "entries"}:
                raise CacheError("not a tuning file")
            environment = Environment.from_json(cache["environment"])
            if environment.schema != SCHEMA or cache["schema"] != SCHEMA:
                raise CacheError(f"schema {cache['schema']!r}, this version reads schema {SCHEMA}")
            if not isinstance(cache["entries"], dict):
                raise CacheError("entries must be an object")
        except CacheError as e:
            rejected.append(f"cache {i}: {e}")
            continue
        entries = {}
        for key, value in cache["entries"].items():
            try:
                if not _BUCKET_KEY.match(str(key)):
                    raise CacheError("malformed bucket key")
                entries[key] = Entry.from_json(value)
            except CacheError as e:
                rejected.append(f"cache {i} ({environment.device}), entry {str(key)[:60]}: {e}")
        if entries:
            LocalCache(environment, directory).store(entries)
            imported += len(entries)
    return imported, rejected
