"""The Redis level of the tuning cache, against a real ``redis-server`` started on loopback."""

import dataclasses
import json
import logging
import shutil
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from attncompiler import cache
from attncompiler.cache import Entry, Environment, LocalCache, TuningCache
from attncompiler.codegen.configs import FlashConfig
from attncompiler.fleet import RedisClient, RedisError, RemoteCache, encode, parse_url

ENV = Environment("NVIDIA H100 80GB HBM3", "9.0", "2.13.0", "3.9.0", "0123456789abcdef")
ENTRY = Entry(FlashConfig(128, 64, 8, 3), ms=0.25, search="quick", candidates=12, baseline="sdpa-flash",
              baseline_ms=0.3)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    def __init__(self):
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/3"
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                if RedisClient("127.0.0.1", self.port).execute("PING") == "PONG":
                    return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


@pytest.fixture
def redis():
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (Debian: apt-get install redis-server; .ci/run installs it)")
    server = RedisServer()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def _fresh_warnings():
    cache._warned.clear()


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_parse_url():
    assert parse_url("redis://cache.local:6380/2") == ("cache.local", 6380, 2, None)
    assert parse_url("redis://:secret@10.0.0.1") == ("10.0.0.1", 6379, 0, "secret")
    for bad in ("http://host", "redis://", "redis://host/x"):
        with pytest.raises(ValueError):
            parse_url(bad)


def test_commands_are_resp_arrays_of_bulk_strings():
    assert encode(("HSET", "k", "f", "vé")) == b"*4\r\n$4\r\nHSET\r\n$1\r\nk\r\n$1\r\nf\r\n$3\r\nv\xc3\xa9\r\n"


def test_client_speaks_to_a_real_server(redis):
    client = RedisClient.from_url(redis.url)
    assert client.execute("SET", "greeting", "hi\r\nthere") == "OK"
    assert client.execute("GET", "greeting") == "hi\r\nthere"
    assert client.execute("GET", "missing") is None
    assert client.hset("h", "a", "1") == 1 and client.hset("h", "b", "2") == 1
    assert client.hgetall("h") == {"a": "1", "b": "2"} and client.hgetall("nothing") == {}
    with pytest.raises(RedisError, match="WRONGTYPE"):
        client.hgetall("greeting")
    assert client.execute("SELECT", 0) == "OK" and RedisClient.from_url(redis.url).execute("GET", "greeting")


def test_remote_entries_are_validated_like_local_ones(redis, caplog):
    remote = RemoteCache(redis.url, ENV)
    remote.store("good", ENTRY)
    client = RedisClient.from_url(redis.url)
    client.hset(remote.key, "bad", json.dumps({**ENTRY.to_json(), "search": "lucky"}))
    client.hset(remote.key, "not-json", "exec('boom')")
    assert RemoteCache(redis.url, ENV).load() == {"good": ENTRY}
    assert "ignoring 2 malformed tuning entries" in warnings_of(caplog)[0]


def test_environments_do_not_share_entries(redis):
    RemoteCache(redis.url, ENV).store("a", ENTRY)
    assert RemoteCache(redis.url, dataclasses.replace(ENV, triton="3.10.0")).load() == {}


SHARE = textwrap.dedent("""
    import sys
    from pathlib import Path
    from attncompiler.cache import Entry, Environment, LocalCache, TuningCache
    from attncompiler.codegen.configs import FlashConfig
    from attncompiler.fleet import RemoteCache
    url, directory, role = sys.argv[1:]
    env = Environment("NVIDIA H100 80GB HBM3", "9.0", "2.13.0", "3.9.0", "0123456789abcdef")
    tuning = TuningCache(LocalCache(env, Path(directory)), RemoteCache(url, env))
    if role == "tune":
        tuning.store("f16/d64", Entry(FlashConfig(64, 32, 4, 2), 0.5, "quick", 3, "sdpa-flash", 0.4))
    else:
        print(tuning.lookup("f16/d64").config)
""")


def test_two_processes_share_through_redis(redis, tmp_path):
    def run(directory, role):
        return subprocess.run([sys.executable, "-c", SHARE, redis.url, str(tmp_path / directory), role],
                              capture_output=True, text=True, timeout=60, check=True).stdout

    run("machine-a", "tune")
    assert run("machine-b", "read").strip() == "FlashConfig(block_m=64, block_n=32, num_warps=4, num_stages=2)"
    assert "f16/d64" in LocalCache(ENV, tmp_path / "machine-b").load()  # fetched into the first level


def test_a_deeper_remote_result_replaces_a_quick_local_one(redis, tmp_path):
    exhaustive = dataclasses.replace(ENTRY, search="exhaustive", ms=0.2)
    RemoteCache(redis.url, ENV).store("a", exhaustive)
    RemoteCache(redis.url, ENV).store("b", ENTRY)
    LocalCache(ENV, tmp_path).store({"a": ENTRY, "b": dataclasses.replace(ENTRY, ms=0.1)})
    tuning = TuningCache(LocalCache(ENV, tmp_path), RemoteCache(redis.url, ENV))
    assert tuning.lookup("a") == exhaustive and tuning.lookup("b").ms == 0.1


def test_server_stopped_mid_run_costs_one_warning(redis, tmp_path, caplog):
    tuning = TuningCache(LocalCache(ENV, tmp_path), RemoteCache(redis.url, ENV))
    tuning.store("before", ENTRY)
    redis.stop()
    start = time.monotonic()
    tuning.store("after", ENTRY)
    tuning.store("later", ENTRY)
    reopened = TuningCache(LocalCache(ENV, tmp_path), RemoteCache(redis.url, ENV))
    assert time.monotonic() - start < 3
    assert set(reopened.table) == {"before", "after", "later"}
    messages = warnings_of(caplog)
    assert len(messages) == 1 and "unavailable" in messages[0] and "local cache only" in messages[0]


def test_no_server_at_all_is_a_warning_not_a_failure(tmp_path, caplog):
    url = f"redis://127.0.0.1:{free_port()}/0"
    tuning = TuningCache(LocalCache(ENV, tmp_path), RemoteCache(url, ENV))
    tuning.store("a", ENTRY)
    assert tuning.lookup("a") == ENTRY
    assert len(warnings_of(caplog)) == 1
