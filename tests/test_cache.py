"""The local tuning cache: entry validation, environment keys, corrupt and foreign files, concurrent writers."""

import dataclasses
import json
import logging
import multiprocessing

import pytest
import torch

from attncompiler import cache
from attncompiler.cache import (BackwardEntry, CacheError, Entry, Environment, LocalCache, TuningCache,
                                current_environment, export_payload, import_payload)
from attncompiler.codegen.configs import BwdConfig, FlashConfig

ENV = Environment("NVIDIA H100 80GB HBM3", "9.0", "2.13.0", "3.9.0", "0123456789abcdef")
ENTRY = Entry(FlashConfig(128, 64, 8, 3), ms=0.25, search="quick", candidates=12, baseline="sdpa-flash",
              baseline_ms=0.3)


@pytest.fixture(autouse=True)
def _fresh_warnings():
    cache._warned.clear()


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_entry_round_trips_through_json():
    assert Entry.from_json(json.loads(json.dumps(ENTRY.to_json()))) == ENTRY
    assert ENTRY.speedup == pytest.approx(1.2)
    assert dataclasses.replace(ENTRY, baseline=None, baseline_ms=None).speedup is None


@pytest.mark.parametrize("change", [
    {"ms": float("nan")}, {"ms": -1.0}, {"ms": "0.1"}, {"ms": True}, {"search": "fast"},
    {"candidates": 0}, {"baseline": None}, {"baseline": "rm -rf /"}, {"extra": 1},
    {"config": {"block_m": 96, "block_n": 64, "num_warps": 8, "num_stages": 3}},
    {"config": {"block_m": 128, "block_n": 64, "num_warps": 8, "num_stages": 30}},
    {"config": {"block_m": 128, "block_n": 64, "num_warps": 8}},
    {"config": "__import__('os').system('true')"},
])
def test_malformed_entries_are_rejected(change):
    with pytest.raises(CacheError):
        Entry.from_json({**ENTRY.to_json(), **change})


def test_every_environment_field_gives_its_own_file(tmp_path):
    LocalCache(ENV, tmp_path).store({"b": ENTRY})
    for field, value in [("device", "NVIDIA A100"), ("capability", "8.0"), ("torch", "2.14.0"),
                         ("triton", "3.10.0"), ("kernels", "fedcba9876543210"), ("schema", 1)]:
        other = dataclasses.replace(ENV, **{field: value})
        assert other.file_name() != ENV.file_name(), field
        assert LocalCache(other, tmp_path).load() == {}, field
    assert LocalCache(ENV, tmp_path).load() == {"b": ENTRY}


def test_current_environment_names_this_machine():
    env = current_environment(torch.device("cpu"))
    assert (env.device, env.capability, env.torch, env.schema) == ("cpu", "interpreter", torch.__version__,
                                                                   cache.SCHEMA)
    assert env.kernels == cache.kernel_sources_hash() and len(env.kernels) == 16


def test_store_merges_and_exhaustive_results_are_kept(tmp_path):
    local = LocalCache(ENV, tmp_path)
    exhaustive = dataclasses.replace(ENTRY, search="exhaustive", ms=0.2)
    local.store({"a": ENTRY, "b": exhaustive})
    merged = local.store({"b": ENTRY, "c": ENTRY})
    assert merged == {"a": ENTRY, "b": exhaustive, "c": ENTRY} == local.load()
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe", b"[]", b'{"schema": 99, "environment": {}, "entries": {}}',
                                     b'{"schema": 1, "environment": {"device": 1}, "entries": {}}'])
def test_corrupt_file_is_ignored_with_one_warning_and_rewritten(tmp_path, caplog, content):
    local = LocalCache(ENV, tmp_path)
    local.path.parent.mkdir(parents=True, exist_ok=True)
    local.path.write_bytes(content)
    assert local.load() == {} and local.load() == {}
    assert len(warnings_of(caplog)) == 1 and "will be rewritten" in warnings_of(caplog)[0]
    local.store({"a": ENTRY})
    assert LocalCache(ENV, tmp_path).load() == {"a": ENTRY}


def test_foreign_file_is_ignored_and_rewritten(tmp_path, caplog):
    foreign = dataclasses.replace(ENV, device="NVIDIA A100")
    LocalCache(foreign, tmp_path).store({"a": ENTRY})
    local = LocalCache(ENV, tmp_path)
    local.path.write_bytes(LocalCache(foreign, tmp_path).path.read_bytes())
    assert local.load() == {}
    assert "another environment" in warnings_of(caplog)[0]
    local.store({"b": ENTRY})
    assert json.loads(local.path.read_text())["environment"]["device"] == ENV.device


def test_malformed_entries_in_a_valid_file_are_dropped_alone(tmp_path, caplog):
    local = LocalCache(ENV, tmp_path)
    local.store({"good": ENTRY})
    raw = json.loads(local.path.read_text())
    raw["entries"]["bad"] = {**ENTRY.to_json(), "ms": "soon"}
    raw["entries"]["bad key with spaces"] = ENTRY.to_json()
    local.path.write_text(json.dumps(raw))
    assert local.load() == {"good": ENTRY}
    assert "ignoring 2 malformed tuning entries" in warnings_of(caplog)[0]


def _write_entries(directory, worker: int, count: int) -> None:
    local = LocalCache(ENV, directory)
    for i in range(count):
        local.store({f"w{worker}-{i}": dataclasses.replace(ENTRY, ms=0.1 + worker + i / 100)})


def test_concurrent_writers_lose_no_entries(tmp_path):
    workers, per_worker = 8, 15
    context = multiprocessing.get_context("fork")
    processes = [context.Process(target=_write_entries, args=(tmp_path, w, per_worker)) for w in range(workers)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(60)
    assert [p.exitcode for p in processes] == [0] * workers
    entries = LocalCache(ENV, tmp_path).load()
    assert len(entries) == workers * per_worker
    assert entries["w7-14"].ms == pytest.approx(7.24)


def test_tuning_cache_lookups_come_from_memory(tmp_path):
    tuning = TuningCache(LocalCache(ENV, tmp_path))
    assert tuning.lookup("a") is None
    tuning.store("a", ENTRY)
    assert tuning.lookup("a") == ENTRY
    LocalCache(ENV, tmp_path).path.unlink()
    assert tuning.lookup("a") == ENTRY


def test_export_then_import_restores_every_cache(tmp_path):
    other = dataclasses.replace(ENV, device="NVIDIA A100", capability="8.0")
    LocalCache(ENV, tmp_path / "a").store({"x": ENTRY, "y": ENTRY})
    LocalCache(other, tmp_path / "a").store({"z": ENTRY})
    payload = json.loads(json.dumps(export_payload(tmp_path / "a")))
    assert import_payload(payload, tmp_path / "b") == (3, [])
    assert LocalCache(ENV, tmp_path / "b").load() == {"x": ENTRY, "y": ENTRY}
    assert LocalCache(other, tmp_path / "b").load() == {"z": ENTRY}


def test_import_validates_every_entry(tmp_path):
    LocalCache(ENV, tmp_path / "a").store({"x": ENTRY, "y": ENTRY})
    payload = export_payload(tmp_path / "a")
    payload["caches"][0]["entries"]["y"]["ms"] = -3
    payload["caches"].append({"schema": 1, "environment": {"device": "x"}, "entries": {}})
    imported, rejected = import_payload(payload, tmp_path / "b")
    assert imported == 1 and len(rejected) == 2
    assert "entry y: ms must be a positive finite number" in rejected[0]
    assert "cache 1: environment must have exactly the fields" in rejected[1]
    assert LocalCache(ENV, tmp_path / "b").load() == {"x": ENTRY}
    with pytest.raises(CacheError, match="not an attncompiler cache export"):
        import_payload({"entries": {}}, tmp_path / "b")


def test_winner_and_backward_round_trip_and_are_validated():
    backward = BackwardEntry(BwdConfig(64, 32, 8, 3, 128, 64, 8, 3), ms=0.5, search="exhaustive", candidates=9)
    entry = dataclasses.replace(ENTRY, winner="sdpa-flash", backward=backward)
    assert Entry.from_json(json.loads(json.dumps(entry.to_json()))) == entry
    for change in [{"winner": "sdpa-cudnn"}, {"winner": None},
                   {"backward": {**backward.to_json(), "ms": 0}},
                   {"backward": {**backward.to_json(), "config": {**backward.to_json()["config"], "block_resident": 48}}},
                   {"backward": {**backward.to_json(), "config": {**backward.to_json()["config"], "dq_num_stages": 9}}},
                   {"backward": {**backward.to_json(), "config": {"block_resident": 64, "block_streamed": 32,
                                                                  "num_warps": 8, "num_stages": 3}}},
                   {"backward": {"config": {}}}]:
        with pytest.raises(CacheError):
            Entry.from_json({**entry.to_json(), **change})


def test_forward_and_backward_results_tuned_apart_both_survive(tmp_path):
    local = LocalCache(ENV, tmp_path)
    backward = BackwardEntry(BwdConfig(64, 32, 8, 3, 128, 64, 8, 3), ms=0.5, search="quick", candidates=9)
    local.store({"a": dataclasses.replace(ENTRY, backward=backward)})
    deeper = dataclasses.replace(ENTRY, search="exhaustive", ms=0.2)
    assert local.store({"a": deeper})["a"] == dataclasses.replace(deeper, backward=backward)
    assert cache.improves(deeper, dataclasses.replace(ENTRY, backward=backward))  # a remote backward is taken over
    assert cache.taken_over(deeper, dataclasses.replace(ENTRY, backward=backward)) == \
        dataclasses.replace(deeper, backward=backward)
    assert not cache.improves(dataclasses.replace(deeper, backward=backward), ENTRY)
    assert not cache.improves(ENTRY, dataclasses.replace(ENTRY, ms=0.1))  # a quick result does not replace one
