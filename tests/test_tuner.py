"""The autotuner: shape buckets, candidate pruning, checking and timing, run-time selection.

Kernels run through the Triton interpreter; timings come from an injected timer where the test
decides the winner, so no test depends on how fast this machine is.
"""

import logging
import re

import pytest
import torch
import torch.nn.functional as F

import attncompiler
from attncompiler import tuner
from attncompiler.cache import Entry, LocalCache, current_environment
from attncompiler.codegen.configs import (CONFIG_SPACE, MAX_REGISTERS_PER_THREAD, BwdConfig, FlashConfig, bwd_keep,
                                          keep, registers_per_thread)
from attncompiler.options import Options, triton_interpret
from attncompiler.reference import attention_reference

if not triton_interpret():
    pytest.skip("runs the kernels through TRITON_INTERPRET=1", allow_module_level=True)
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # 0/0 in padding rows of the interpreter

SCALED = "(mul s 0.125)"
CAUSAL = "(where (le k q) (mul s 0.125) -inf)"
H100_SMEM = 232448


@pytest.fixture(autouse=True)
def _no_tuning_results(no_tuning_results):
    """Each test starts without tuning results."""


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
        assert registers_per_thread(c, 128, 128, 2) <= MAX_REGISTERS_PER_THREAD
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
    ("(where (le k q) (mul s 0.125) (add (mul s 0.125) -3.4028234663852886e+38))", None,
     {"is_causal": True, "scale": 0.125}),  # Hugging Face's finfo.min causal mask
    ("(where (le k q) (mul s 0.125) (add (mul s 0.5) -3.4028234663852886e+38))", None, None),
    ("(where (le k q) (mul s 0.125) (add (mul s 0.125) -100.0))", None, None),
    ("(where $0 (mul s 0.125) (add (mul s 0.125) -3.4028234663852886e+38))", torch.bool, None),
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


# ----------------------------------------------------------------------------- SDPA winners

MASKED = "(where $0 (mul s 0.125) -inf)"


def sdpa_wins():
    """A scripted timer under which SDPA's math backend beats every Triton config."""
    return ScriptedTimer({"sdpa-math": 0.5, "sdpa-flash": 0.7})


def store_tuned(q, k, v, operands, program, timer):
    entry = tuner.tune(q, k, v, operands, program, "quick", timer)
    LocalCache(current_environment(torch.device("cpu"))).store({key(q, k, v, operands, program): entry})
    tuner.forget_caches()
    return entry


def test_a_faster_sdpa_backend_is_recorded_as_the_winner():
    q, k, v = qkv(seq=40)
    entry = tuner.tune(q, k, v, [], SCALED, "quick", sdpa_wins())
    assert (entry.winner, entry.baseline, entry.baseline_ms) == ("sdpa-math", "sdpa-math", 0.5)
    assert entry.config is not None  # the Triton config stays, for sites SDPA cannot serve
    slower = tuner.tune(q, k, v, [], SCALED, "quick", ScriptedTimer({"sdpa-math": 9.0, "sdpa-flash": 9.0}))
    assert slower.winner == "triton"


@pytest.mark.parametrize("program, heads, kv_heads", [(SCALED, 2, 2), (CAUSAL, 4, 2), ("s", 2, 1)])
def test_an_sdpa_winner_runs_sdpa_with_the_same_result(kernel_calls, program, heads, kv_heads):
    q, k, v = qkv(heads=heads, kv_heads=kv_heads, seq=40)
    store_tuned(q, k, v, [], program, sdpa_wins())
    use("cached")
    out, lse = torch.ops.attncompiler.attention(q, k, v, [], program, "triton")
    assert kernel_calls["sdpa-math"] == 1 and kernel_calls["triton"] == 0
    assert torch.isnan(lse).all()
    torch.testing.assert_close(out, attention_reference(q, k, v, [], program))
    tuner.configure(Options.resolve({"tune": "cached", "tune_sdpa": False}))
    torch.ops.attncompiler.attention(q, k, v, [], program, "triton")
    assert kernel_calls["triton"] == 1 and kernel_calls["sdpa-math"] == 1


def test_an_sdpa_winner_returns_the_layout_the_fake_kernel_promises(kernel_calls):
    """Flash SDPA on [B, S, H, D]-major inputs returns a non-contiguous view; Inductor checks the
    op's strides against its fake kernel (contiguous), so the op returns a contiguous tensor."""
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in qkv(seq=40))
    store_tuned(q, k, v, [], CAUSAL, ScriptedTimer({"sdpa-flash": 0.5, "sdpa-math": 0.7}))
    use("cached")
    out, _ = torch.ops.attncompiler.attention(q, k, v, [], CAUSAL, "triton")
    assert kernel_calls["sdpa-flash"] == 1
    assert out.stride() == torch.empty(out.shape).stride()


def test_sdpa_runs_masked_sites_only_where_empty_rows_give_zeros(kernel_calls):
    q, k, v = qkv(seq=24)
    mask = torch.rand(24, 24) > 0.3
    store_tuned(q, k, v, [mask], MASKED, sdpa_wins())
    use("cached")
    empty = mask.clone()
    empty[3] = False  # a row that sees no key: NaN for softmax, 0 for SDPA
    out, _ = torch.ops.attncompiler.attention(q, k, v, [empty], MASKED, "triton", False)
    assert kernel_calls["triton"] == 1 and kernel_calls["sdpa-math"] == 0 and torch.isnan(out[0, :, 3]).all()
    out, _ = torch.ops.attncompiler.attention(q, k, v, [empty], MASKED, "triton", True)
    assert kernel_calls["sdpa-math"] == 1
    torch.testing.assert_close(out, attention_reference(q, k, v, [empty], MASKED, zero_empty_rows=True))


@pytest.mark.parametrize("program, operand", [
    ("(where (le k (add q 4.0)) (mul s 0.125) -inf)", None),  # a window SDPA has no argument for
    ("(mul (add s $0) 0.5)", torch.float32),                   # a bias inside the scale
    ("(mul (tanh (mul s 0.02)) 50.0)", None),                   # soft-capping
])
def test_programs_sdpa_cannot_compute_never_pick_it(program, operand):
    q, k, v = qkv(seq=24)
    operands = [] if operand is None else [torch.randn(24, 24, dtype=operand)]
    timer = ScriptedTimer({name: 0.001 for name in tuner.sdpa_backends(q.device)})
    entry = tuner.tune(q, k, v, operands, program, "quick", timer)
    assert entry.winner == "triton" and entry.baseline is None
    assert not any(n.startswith("sdpa") for n in timer.timed)


def test_the_backward_of_an_sdpa_forward_recomputes_the_logsumexp(kernel_calls):
    q, k, v = qkv(heads=4, kv_heads=2, seq=24)
    store_tuned(q, k, v, [], CAUSAL, sdpa_wins())
    use("cached")
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, _ = torch.ops.attncompiler.attention(*leaves, [], CAUSAL, "triton")
    grad = torch.randn_like(out)
    out.backward(grad)
    assert kernel_calls["sdpa-math"] == 1 and kernel_calls["triton_recompute"] == 1
    assert kernel_calls["triton_bwd"] == 1
    expected = [t.clone().requires_grad_() for t in (q, k, v)]
    attention_reference(*expected, [], CAUSAL).backward(grad)
    for got, want in zip(leaves, expected):
        torch.testing.assert_close(got.grad, want.grad, atol=1e-4, rtol=1e-4)


def test_a_compiled_site_reports_its_sdpa_winner(kernel_calls):
    def attention(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    q, k, v = qkv(seq=40)
    program = attncompiler.explain(attention, q, k, v, options={"inner": "eager", "tune": "off"}).sites[0] \
        .summary["program"]
    store_tuned(q, k, v, [], program, sdpa_wins())
    kernel_calls.clear()
    report = attncompiler.explain(attention, q, k, v, options={"inner": "eager", "tune": "cached"})
    site, = report.sites
    assert site.kernel == "sdpa-math" and site.choice.kernel == "sdpa-math" and kernel_calls["sdpa-math"] == 1
    assert "sdpa-math (cache" in report.table()
    torch.testing.assert_close(report.output, attention(q, k, v))


# ----------------------------------------------------------------------------- backward configs

def test_backward_configs_fit_shared_memory_and_registers():
    q, _, v = qkv(seq=4096, dim=128, dtype=torch.float16)
    quick = tuner.backward_configs(q, v, 4096, "quick", H100_SMEM)
    exhaustive = tuner.backward_configs(q, v, 4096, "exhaustive", H100_SMEM)
    assert quick[0] == exhaustive[0] and set(quick) < set(exhaustive)
    assert all(bwd_keep(c, 128, 128, 2, H100_SMEM) for c in exhaustive[1:])
    assert {c.dq for c in exhaustive} == {exhaustive[0].dq}  # the dK/dV stage keeps dQ at its default
    tuned = exhaustive[-1]
    dq_stage = tuner.backward_configs(q, v, 4096, "exhaustive", H100_SMEM, tuned_dkdv=tuned)
    assert dq_stage[0] == tuned and {c.dkdv for c in dq_stage} == {tuned.dkdv} and len(dq_stage) > len(quick)
    assert all(bwd_keep(c, 128, 128, 2, H100_SMEM) for c in dq_stage)
    interpreted = tuner.backward_configs(*qkv(seq=20)[::2], 20, "exhaustive", None)
    assert len({(c.block_resident, c.block_streamed) for c in interpreted}) == len(interpreted)
    assert max(c.block_resident for c in interpreted[1:]) == 32


def test_the_fastest_correct_backward_config_wins(monkeypatch, caplog):
    """The dK/dV stage drops a wrong config and keeps the fastest; the dQ stage starts from it."""
    q, k, v = qkv(heads=4, kv_heads=2, seq=20)
    configs = tuner.backward_configs(q, v, 20, "quick", None)
    dq_configs = tuner.backward_configs(q, v, 20, "quick", None, tuned_dkdv=configs[1])
    names, dq_names = ([f"triton-bwd {tuner.config_name(c)}" for c in cs] for cs in (configs, dq_configs))
    assert len(names) >= 2 and len(dq_names) >= 2 and dq_names[0] == names[1]
    from attncompiler.codegen import flash_bwd

    real = flash_bwd.flash_backward

    def wrong_for_one(*args, config=None, **kwargs):
        dq, dk, dv = real(*args, config=config, **kwargs)
        return (dq * 2, dk, dv) if config == configs[0] else (dq, dk, dv)

    monkeypatch.setattr(flash_bwd, "flash_backward", wrong_for_one)
    timer = ScriptedTimer({names[0]: 0.1, names[1]: 1.0, dq_names[1]: 0.5})
    backward = tuner.tune_backward(q, k, v, [], CAUSAL, False, "quick", timer)
    assert backward.config == dq_configs[1] and backward.ms == 0.5
    assert backward.candidates == len(names) + len(dq_names) and names[0] not in timer.timed
    assert any("dropped " + names[0] + " (dq: max error" in r.getMessage() for r in caplog.records)


@pytest.fixture
def backward_tunings(monkeypatch):
    """Every backward tuning the run-time path starts, with a scripted timer."""
    started = []
    real = tuner.tune_backward

    def spy(*args, **kwargs):
        started.append(kwargs["search"])
        return real(*args, **kwargs, timer=ScriptedTimer({}))

    monkeypatch.setattr(tuner, "tune_backward", spy)
    return started


def test_the_first_backward_of_a_bucket_tunes_it_and_the_op_uses_it(monkeypatch, tunings, backward_tunings,
                                                                    kernel_calls):
    seen = []
    from attncompiler.codegen import flash_bwd

    real = flash_bwd.flash_backward
    monkeypatch.setattr(flash_bwd, "flash_backward", lambda *a, **kw: seen.append(kw["config"]) or real(*a, **kw))
    use("on-first-use")
    for seq in (20, 30):  # one bucket
        leaves = [t.requires_grad_() for t in qkv(seq=seq)]
        out, _ = torch.ops.attncompiler.attention(*leaves, [], CAUSAL, "triton")
        out.sum().backward()
    assert tunings == ["quick"] and backward_tunings == ["quick"] and kernel_calls["triton_bwd"] == 2
    stored = LocalCache(current_environment(torch.device("cpu"))).load()[key(*qkv(seq=20), program=CAUSAL)]
    assert isinstance(stored.backward.config, BwdConfig) and seen[-2:] == [stored.backward.config] * 2  # after tuning
    tuner.forget_caches()
    use("cached")
    assert tuner.select_bwd_config(*qkv(seq=20), [], CAUSAL) == stored.backward.config
    use("off")
    assert tuner.select_bwd_config(*qkv(seq=20), [], CAUSAL) is None
    assert backward_tunings == ["quick"]
