"""The autotuner: shape buckets, candidate pruning, checking and timing, run-time selection.

Kernels run through the Triton interpreter; timings come from an injected timer where the test
decides the winner, so no test depends on how fast this machine is.
"""

import dataclasses
import logging
import re
import shutil

import pytest
import torch
import torch.nn.functional as F

import attncompiler
from attncompiler import tuner
from attncompiler.cache import Entry, LocalCache, current_environment, tuning_dir
from attncompiler.codegen.configs import CONFIG_SPACE, FlashConfig, keep
from attncompiler.options import Options, triton_interpret
from attncompiler.reference import attention_reference

if not triton_interpret():
    pytest.skip("runs the kernels through TRITON_INTERPRET=1", allow_module_level=True)
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # 0/0 in padding rows of the interpreter

SCALED = "(mul s 0.125)"
CAUSAL = "(where (le k q) (mul s 0.125) -inf)"
H100_SMEM = 232448


@pytest.fixture(autouse=True)
def _no_tuning_results():
    """Each test starts without tuning results (generated kernels stay where the session put them)."""
    shutil.rmtree(tuning_dir(), ignore_errors=True)
    tuner.forget_caches()
    yield
    tuner.configure(Options.resolve())
    tuner.forget_caches()
    shutil.rmtree(tuning_dir(), ignore_errors=True)


def qkv(batch=1, heads=2, seq=16, dim=16, kv_heads=None, seq_k=None, dtype=torch.float32):
    torch.manual_seed(0)
    q = torch.randn(batch, heads, seq, dim, dtype=dtype)
    k = torch.randn(batch, kv_heads or heads, seq_k or seq, dim, dtype=dtype)
    v = torch.randn(batch, kv_heads or heads, seq_k or seq, dim, dtype=dtype)
    return q, k, v


def key(q, k, v, operands=(), program=SCALED):
    return tuner.bucket_key(q, k, v, list(operands), program)


# ----------------------------------------------------------------------------- buckets

def test_lengths_within_a_bucket_share_a_key():
    assert key(*qkv(seq=600)) == key(*qkv(seq=1000)) != key(*qkv(seq=1025))
    assert key(*qkv(seq=1)) != key(*qkv(seq=2)) == key(*qkv(seq=16))
    assert key(*qkv(seq=16, seq_k=300)) == key(*qkv(seq=16, seq_k=512)) != key(*qkv(seq=16, seq_k=513))
    assert key(*qkv(batch=3)) == key(*qkv(batch=4)) != key(*qkv(batch=5))


def test_every_property_of_a_bucket_is_in_its_key():
    base = key(*qkv())
    mask = torch.ones(16, 16, dtype=torch.bool)
    variants = [
        key(*qkv(dtype=torch.float16)), key(*qkv(dim=32)), key(*qkv(heads=4, kv_heads=2)),
        key(*qkv(), [mask], "(where $0 (mul s 0.125) -inf)"), key(*qkv(), [mask.float()], "(add (mul s 0.125) $0)"),
        key(*qkv(), program="(mul s 0.25)"), key(*qkv(), program=CAUSAL),
    ]
    assert len({base, *variants}) == len(variants) + 1
    assert re.fullmatch(r"float32/d16/dv16/g1/positions/p[0-9a-f]{10}/causal/q16/k16/bh2", key(*qkv(), program=CAUSAL))


def test_bucket_keys_are_memoized_per_shape():
    before = tuner._bucket_key.cache_info().hits
    for _ in range(3):
        key(*qkv(seq=48))
    assert tuner._bucket_key.cache_info().hits == before + 2


# ----------------------------------------------------------------------------- candidates

def test_gpu_configs_fit_shared_memory_and_registers():
    q, _, v = qkv(seq=4096, dim=128, dtype=torch.float16)
    quick = tuner.triton_configs(q, v, 4096, "quick", H100_SMEM)
    exhaustive = tuner.triton_configs(q, v, 4096, "exhaustive", H100_SMEM)
    assert quick[0] == exhaustive[0] and set(quick) < set(exhaustive)
    for c in exhaustive[1:]:
        assert keep(c, 128, 128, 2, H100_SMEM)
        assert tuner.registers_per_thread(c, 128, 128, 2) <= tuner.MAX_REGISTERS_PER_THREAD
    assert FlashConfig(128, 128, 4, 2) not in exhaustive  # 128·128 scores over 128 threads: too many registers
    assert len(tuner.triton_configs(q, v, 4096, "exhaustive", 48 * 1024)) < len(exhaustive)


def test_tiles_longer_than_the_sequence_are_pruned():
    q, _, v = qkv(seq=1, dim=64, dtype=torch.float16)
    configs = tuner.triton_configs(q, v, 40, "exhaustive", H100_SMEM)
    assert {c.block_m for c in configs[1:]} == {64} and {c.block_n for c in configs[1:]} <= {32, 64}


def test_the_interpreter_times_each_tile_shape_once():
    q, _, v = qkv(seq=200)
    configs = tuner.triton_configs(q, v, 200, "exhaustive", None)
    assert len({(c.block_m, c.block_n) for c in configs}) == len(configs)
    assert len(configs) < len(CONFIG_SPACE)


@pytest.mark.parametrize("program, operand, expected", [
    (SCALED, None, {"scale": 0.125}),
    ("s", None, {"scale": 1.0}),
    ("(div s 8.0)", None, {"scale": 0.125}),
    (CAUSAL, None, {"is_causal": True, "scale": 0.125}),
    ("(add (mul s 0.125) $0)", torch.float32, {"attn_mask": True, "scale": 0.125}),
    ("(where $0 (mul s 0.125) -inf)", torch.bool, {"attn_mask": True, "scale": 0.125}),
    ("(where $0 (mul s 0.125) -inf)", torch.float32, None),
    ("(where (le k (add q 4.0)) (mul s 0.125) -inf)", None, None),
    ("(mul (add s $0) 0.5)", torch.float32, None),
    ("(neg s)", None, None),
])
def test_sdpa_is_a_baseline_only_where_it_computes_the_same_function(program, operand, expected):
    operands = [] if operand is None else [torch.zeros(4, 4, dtype=operand)]
    found = tuner.sdpa_arguments(program, operands)
    if expected is None:
        assert found is None
    else:
        assert {k: (v is operands[0] if k == "attn_mask" else v) for k, v in found.items()} == expected


def test_the_reduced_problem_keeps_one_kv_head_and_its_query_heads():
    q, k, v = qkv(batch=2, heads=4, kv_heads=2, seq=20)
    bias = torch.randn(2, 1, 20, 20)
    rq, rk, rv, (rbias,) = tuner.reduced_problem((q, k, v, [bias]))
    assert (rq.shape, rk.shape, rv.shape, rbias.shape) == ((1, 2, 20, 16), (1, 1, 20, 16), (1, 1, 20, 16), (1, 2, 20, 20))
    exact, _ = tuner.reference_outputs((rq, rk, rv, [rbias]), "(add (mul s 0.125) $0)")
    full = attention_reference(q, k, v, [bias], "(add (mul s 0.125) $0)")
    torch.testing.assert_close(exact, full[:1, :2])


def test_accuracy_check():
    exact = torch.tensor([[1.0, float("nan")]])
    assert tuner.accuracy_problem(exact.clone(), exact, exact) is None
    assert "NaN" in tuner.accuracy_problem(torch.tensor([[1.0, 2.0]]), exact, exact)
    assert "max error" in tuner.accuracy_problem(torch.tensor([[1.1, float("nan")]]), exact, exact)
    assert tuner.accuracy_problem(torch.tensor([[1.1, float("nan")]]), exact, torch.tensor([[1.2, 0.0]])) is None


# ----------------------------------------------------------------------------- tuning

class ScriptedTimer:
    """Times each candidate as the test says (after running it once on a rotated input)."""

    def __init__(self, times: dict[str, float]):
        self.times, self.timed = times, []

    def __call__(self, candidate, run, rotations):
        assert run(rotations - 1) is not None
        self.timed.append(candidate.name)
        return self.times.get(candidate.name, 5.0)


def test_the_fastest_correct_config_wins_and_sdpa_is_its_baseline():
    q, k, v = qkv(seq=100)
    names = [c.name for c in tuner.candidates(q, k, v, [], SCALED, "exhaustive")]
    triton = [n for n in names if n.startswith("triton")]
    assert len(triton) >= 3 and "sdpa-math" in names
    timer = ScriptedTimer({triton[2]: 1.0, triton[0]: 2.0, "sdpa-math": 1.5, "sdpa-flash": 3.0})
    progress = []
    entry = tuner.tune(q, k, v, [], SCALED, "exhaustive", timer, lambda *a: progress.append(a))
    assert tuner.config_name(entry.config) == triton[2].removeprefix("triton ")
    assert (entry.ms, entry.baseline, entry.baseline_ms, entry.search) == (1.0, "sdpa-math", 1.5, "exhaustive")
    assert entry.candidates == len(triton) and entry.speedup == 1.5
    assert sorted(timer.timed) == sorted(names)
    assert progress[0] == (0, len(names), names[0]) and progress[-1] == (len(names), len(names), "done")


def test_wrong_and_crashing_candidates_are_dropped_with_a_warning(monkeypatch, caplog):
    q, k, v = qkv(seq=32)
    real = tuner.candidates

    def crash(x):
        raise RuntimeError("out of resources: shared memory")

    def with_broken(*args):
        found = real(*args)
        return found + [tuner.Candidate("triton wrong", lambda x: torch.zeros_like(found[0].run(x)),
                                        FlashConfig(64, 64, 4, 3)),
                        tuner.Candidate("triton crash", crash, FlashConfig(64, 64, 8, 3))]

    good = real(q, k, v, [], SCALED, "quick")[0]
    monkeypatch.setattr(tuner, "candidates", with_broken)
    timer = ScriptedTimer({"triton wrong": 0.1, "triton crash": 0.1, good.name: 1.0})
    entry = tuner.tune(q, k, v, [], SCALED, "quick", timer)
    assert entry.config == good.config
    assert "triton wrong" not in timer.timed and "triton crash" not in timer.timed
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("dropped triton wrong (max error" in w for w in warnings)
    assert any("dropped triton crash (RuntimeError: out of resources" in w for w in warnings)


def test_no_correct_triton_config_is_a_tuning_error(monkeypatch):
    q, k, v = qkv()
    monkeypatch.setattr(tuner, "candidates", lambda *a: [tuner.Candidate("triton nan", lambda x: x[0] * float("nan"),
                                                                         FlashConfig(64, 32, 4, 2))])
    with pytest.raises(tuner.TuningError, match="no Triton config ran correctly"):
        tuner.tune(q, k, v, [], SCALED, "quick", ScriptedTimer({}))


def test_gqa_masked_and_causal_sites_tune_against_the_reference():
    q, k, v = qkv(heads=4, kv_heads=2, seq=24)
    mask = torch.rand(24, 24) > 0.2
    for program, operands in [(CAUSAL, []), ("(where $0 (mul s 0.125) -inf)", [mask])]:
        timer = ScriptedTimer({})
        entry = tuner.tune(q, k, v, operands, program, "quick", timer)
        assert entry.config is not None and "sdpa-math" in timer.timed, program


# ----------------------------------------------------------------------------- run time

@pytest.fixture
def tunings(monkeypatch):
    """Every tuning the run-time path starts, with a scripted timer."""
    started = []
    real = tuner.tune

    def spy(*args, **kwargs):
        started.append(kwargs["search"])
        return real(*args, **kwargs, timer=ScriptedTimer({}))

    monkeypatch.setattr(tuner, "tune", spy)
    return started


def use(mode):
    tuner.configure(Options.resolve({"tune": mode}))


def test_on_first_use_tunes_each_bucket_once_and_stores_it(tunings):
    use("on-first-use")
    q, k, v = qkv(seq=20)
    config = tuner.select_config(q, k, v, [], SCALED)
    assert tunings == ["quick"] and config is not None
    assert tuner.select_config(*qkv(seq=30), [], SCALED) == config  # same bucket (32): a lookup
    assert tunings == ["quick"]
    stored = LocalCache(current_environment(torch.device("cpu"))).load()
    assert stored[key(q, k, v)].config == config
    tuner.forget_caches()
    assert tuner.select_config(q, k, v, [], SCALED) == config and tunings == ["quick"]  # from the file
    tuner.select_config(*qkv(seq=40), [], SCALED)
    assert tunings == ["quick", "quick"]


def test_cached_and_off_never_tune(tunings):
    q, k, v = qkv(seq=20)
    use("cached")
    assert tuner.select_config(q, k, v, [], SCALED) is None
    entry = Entry(FlashConfig(64, 64, 4, 2), 1.0, "quick", 3)
    LocalCache(current_environment(torch.device("cpu"))).store({key(q, k, v): entry})
    tuner.forget_caches()
    assert tuner.select_config(q, k, v, [], SCALED) == entry.config
    use("off")
    assert tuner.select_config(q, k, v, [], SCALED) is None
    assert tunings == []


def test_exhaustive_deepens_quick_results_once(tunings):
    q, k, v = qkv(seq=20)
    use("on-first-use")
    tuner.select_config(q, k, v, [], SCALED)
    use("exhaustive")
    tuner.select_config(q, k, v, [], SCALED)
    tuner.select_config(q, k, v, [], SCALED)
    assert tunings == ["quick", "exhaustive"]
    assert tuner.tuning_cache(q.device).lookup(key(q, k, v)).search == "exhaustive"


def test_max_autotune_means_exhaustive():
    assert Options.resolve(None, "max-autotune").tune == "exhaustive"
    assert Options.resolve({"tune": "cached"}, "max-autotune").tune == "cached"
    with pytest.raises(attncompiler.OptionError, match="'tune' must be one of"):
        Options.resolve({"tune": "always"})


def test_a_failed_tuning_falls_back_to_defaults_once(monkeypatch, caplog):
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise tuner.TuningError("no Triton config ran correctly for it")

    monkeypatch.setattr(tuner, "tune", broken)
    use("on-first-use")
    q, k, v = qkv(seq=20)
    assert tuner.select_config(q, k, v, [], SCALED) is None
    assert tuner.select_config(q, k, v, [], SCALED) is None
    assert len(calls) == 1
    assert "using the default config" in caplog.text


def test_the_report_shows_what_each_site_ran_with(kernel_calls, tunings):
    def attention(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    q, k, v = qkv(seq=40)
    options = {"inner": "eager", "tune": "on-first-use"}
    report = attncompiler.explain(attention, q, k, v, options=options)
    site, = report.sites
    assert site.choice.source == "tuned" and site.choice.baseline.startswith("sdpa-")
    assert kernel_calls["triton"] == 1 and tunings == ["quick"]
    assert f"config {site.choice.config} (tuned" in report.table()
    assert report.choices == [site.choice] and site.choice.bucket == key(q, k, v, program=site.summary["program"])

    again = attncompiler.explain(attention, *qkv(seq=60), options={**options, "tune": "cached"})
    assert again.sites[0].choice.source == "cache" and tunings == ["quick"]
    untuned = attncompiler.explain(attention, q, k, v, options={**options, "tune": "off"})
    assert "config default (untuned)" in untuned.table()
    torch.testing.assert_close(again.output, attention(*qkv(seq=60)))


def test_the_op_uses_the_stored_config(monkeypatch):
    q, k, v = qkv(seq=20)
    chosen = FlashConfig(64, 64, 4, 2)
    LocalCache(current_environment(torch.device("cpu"))).store({key(q, k, v): Entry(chosen, 1.0, "quick", 3)})
    seen = []
    from attncompiler.codegen import flash

    real = flash.flash_forward
    monkeypatch.setattr(flash, "flash_forward", lambda *a, **kw: seen.append(kw["config"]) or real(*a, **kw))
    use("cached")
    torch.ops.attncompiler.attention(q, k, v, [], SCALED, "triton")
    assert seen == [chosen]
