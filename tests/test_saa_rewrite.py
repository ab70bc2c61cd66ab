"""SAA in the backend: which sites option ``saa`` rewrites to ``attncompiler::saa_attention``, and the report.

Without a GPU the kernels run on CPU through Triton's interpreter (conftest sets
``TRITON_INTERPRET=1``).
"""

import math

import pytest
import torch
import torch.nn.functional as F

import attncompiler
from attncompiler import hf_zoo, saa_ops
from attncompiler.reference import attention_reference
from attncompiler.saa import SAAProgram, saa_forward, saa_program
from attncompiler.saa_config import SAAConfig
from attncompiler.saa_ops import SAA_CALLS, SAA_SITES, SHORT_CALLS, relative_error

SMALL = dict(block_m=16, block_n=16, min_keys=0)  # SAA at every length
DENSE_EQUIVALENT = dict(SMALL, top_k=64)  # more routed blocks than any test has: every block exact
FINFO_MIN = torch.finfo(torch.float32).min


@pytest.fixture(autouse=True)
def gate():
    torch.manual_seed(0)
    SAA_SITES.clear()
    SAA_CALLS.clear()
    SHORT_CALLS.clear()
    yield SAA_SITES
    SAA_SITES.clear()


def qkv(b=1, h=2, s=40, d=32):
    return torch.randn(b, h, s, d), torch.randn(b, h, s, d), torch.randn(b, h, s, d)


def causal_sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def biased(q, k, v, bias):
    return ((q @ k.transpose(-2, -1)) * 0.125 + bias).softmax(-1) @ v


def compile_and_run(fn, *args, saa):
    with torch.no_grad(), attncompiler.collect() as report:
        out = torch.compile(fn, backend="attncompiler", options={"inner": "eager", "saa": saa})(*args)
    return out, report


def test_short_calls_run_dense_and_the_report_says_so():
    """Under min_keys the site computes dense attention, and the report tells why SAA has not run."""
    q, k, v = qkv()
    out, report = compile_and_run(causal_sdpa, q, k, v, saa=dict(DENSE_EQUIVALENT, min_keys=41))
    (site,) = report.sites
    assert site.kernel.startswith("saa:") and site.saa is None and SAA_CALLS == {"dense": 1}
    assert site.describe_saa() == "saa (not run yet: 1 call below min_keys ran dense)"
    torch.testing.assert_close(out, causal_sdpa(q, k, v), atol=1e-5, rtol=1e-5)


def test_dense_equivalent_operating_point_equals_eager():
    """With every block exact the SAA site computes dense attention; the SAA op actually ran."""
    q, k, v = qkv()
    out, report = compile_and_run(causal_sdpa, q, k, v, saa=DENSE_EQUIVALENT)
    (site,) = report.sites
    assert site.rewritten and site.kernel.startswith("saa:") and site.saa_reason is None
    assert "attncompiler.saa_attention.default(" in report.graph_after
    assert SAA_CALLS["saa"] == 1 and SAA_CALLS["dense"] == 1  # the first call also measured dense
    assert site.saa.density == 1.0 and site.saa.fallback is None and site.saa.error < 1e-5
    assert "saa: density 1, error" in report.table()
    torch.testing.assert_close(out, causal_sdpa(q, k, v))


def test_first_call_on_a_timed_device_reports_the_speedup_over_dense(monkeypatch):
    """Where the first call is timed (GPUs; here the CPU too), one more SAA call and one more dense
    call are timed, outside the call counts, and the report shows dense's time over SAA's."""
    monkeypatch.setattr(saa_ops, "TIMED_DEVICES", ("cpu",))
    q, k, v = qkv()
    out, report = compile_and_run(causal_sdpa, q, k, v, saa=DENSE_EQUIVALENT)
    (site,) = report.sites
    assert site.saa.saa_ms > 0 and site.saa.dense_ms > 0
    assert site.saa.speedup == pytest.approx(site.saa.dense_ms / site.saa.saa_ms)
    assert f"speedup {site.saa.speedup:.2f}x" in site.describe_saa()
    assert SAA_CALLS["saa"] == 1 and SAA_CALLS["dense"] == 1
    torch.testing.assert_close(out, causal_sdpa(q, k, v))


def test_a_site_slower_than_dense_warns_and_keeps_running_saa(monkeypatch, caplog):
    times = iter([2.0, 0.5])  # SAA's call, then dense's
    monkeypatch.setattr(saa_ops, "TIMED_DEVICES", ("cpu",))
    monkeypatch.setattr(saa_ops, "_milliseconds", lambda call, device: next(times))
    q, k, v = qkv()
    with caplog.at_level("WARNING", logger="attncompiler"):
        _, report = compile_and_run(causal_sdpa, q, k, v, saa=DENSE_EQUIVALENT)
    (site,) = report.sites
    assert site.saa.speedup == 0.25 and site.saa.fallback is None
    assert "took 2 ms against dense attention's 0.5" in caplog.text and "raise min_keys" in caplog.text
    assert site.describe_saa().endswith("speedup 0.25x")


def test_sites_without_saa_option_stay_on_the_dense_op():
    q, k, v = qkv()
    _, report = compile_and_run(causal_sdpa, q, k, v, saa=None)
    assert report.sites[0].saa_site is None and "saa" not in report.table().splitlines()[0].split()
    assert "saa_attention" not in report.graph_after and not SAA_CALLS


def test_site_with_a_bias_operand_stays_dense_with_a_reason():
    q, k, v = qkv()
    bias = torch.randn(1, 1, 40, 40)
    out, report = compile_and_run(biased, q, k, v, bias, saa=DENSE_EQUIVALENT)
    (site,) = report.sites
    assert site.rewritten and not site.kernel.startswith("saa") and site.saa_site is None
    assert "mask/bias tensor" in site.saa_reason and "dense: the score program reads" in report.table()
    assert "saa_attention" not in report.graph_after and not SAA_CALLS
    torch.testing.assert_close(out, biased(q, k, v, bias))


def test_site_whose_inputs_require_grad_stays_dense():
    q, k, v = (t.requires_grad_() for t in qkv())
    with attncompiler.collect() as report:
        out = torch.compile(causal_sdpa, backend="attncompiler",
                            options={"inner": "eager", "saa": DENSE_EQUIVALENT})(q, k, v)
    out.sum().backward()
    assert "SAA has no backward" in report.sites[0].saa_reason and not SAA_CALLS
    assert q.grad is not None


def test_error_gate_fallback_is_in_the_report():
    """An operating point over its error budget: the site runs dense attention and the report says why."""
    q, k, v = qkv(s=96)
    sparse = dict(SMALL, top_k=0, sinks=0, local_blocks=0, centroids=1, max_error=0.01)
    out, report = compile_and_run(causal_sdpa, q, k, v, saa=sparse)
    (site,) = report.sites
    assert site.saa.fallback.startswith("relative error") and site.saa.error > 0.01 and site.saa.density < 1
    assert "dense after fallback: relative error" in report.table()
    assert SAA_CALLS == {"dense": 1}
    torch.testing.assert_close(out, causal_sdpa(q, k, v))


def test_a_site_at_a_denser_point_is_in_the_report():
    """A site over budget at the given point but within it at a denser one: the report's saa column says which
    point it runs, and its output is that point's SAA."""
    q, k, v = qkv(s=96)
    given = SAAConfig(**SMALL, top_k=1, tau=None, sinks=0, local_blocks=0)
    dense = causal_sdpa(q, k, v)
    outs = [saa_forward(q, k, v, q.shape[-1] ** -0.5, True, c)[0] for c in (given, given.denser_points()[0])]
    given_error, denser_error = (relative_error(out, dense) for out in outs)
    assert denser_error < given_error
    budget = (given_error + denser_error) / 2
    out, report = compile_and_run(causal_sdpa, q, k, v, saa=dict(SMALL, top_k=1, tau=None, sinks=0, local_blocks=0,
                                                                 max_error=budget))
    (site,) = report.sites
    assert site.saa.point is not None and site.saa.error == pytest.approx(denser_error, rel=1e-4)
    assert "saa at the denser top_k 2 (the given point's error" in report.table()
    torch.testing.assert_close(out, outs[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("program, expected", [
    # Hugging Face eager masks without padding: finfo.min added to the masked scores
    (f"(where (le k q) (mul s 0.125) (add (mul s 0.125) {FINFO_MIN!r}))", SAAProgram(0.125, True, sentinel_fill=True)),
    (f"(where (le k q) (mul s 0.125) {FINFO_MIN!r})", SAAProgram(0.125, True, sentinel_fill=True)),
    (f"(where (le k (add q (sub Sk Sq))) (mul s 0.125) (add (mul s 0.125) {FINFO_MIN!r}))",
     SAAProgram(0.125, True, bottom_right=True, sentinel_fill=True)),
    # ... with a padding operand: the kernel reads $0, SAA cannot
    (f"(where (and $0 (le k q)) (mul s 0.125) (add (mul s 0.125) {FINFO_MIN!r}))", None),
    ("(where (and $0 (le k q)) (mul s 0.125) -inf)", None),
    # a fill that is not a sentinel, or a sentinel added to another score
    ("(where (le k q) (mul s 0.125) (add (mul s 0.125) -65504.0))", None),
    (f"(where (le k q) (mul s 0.125) (add (mul s 0.5) {FINFO_MIN!r}))", None),
])
def test_smollm2_program_forms(program, expected):
    assert saa_program(program) == expected


def test_sentinel_fill_with_rows_that_see_no_key_runs_dense():
    """Bottom-right with Sk < Sq: the first rows see no key and, under finfo.min, average every key."""
    q, k, v = torch.randn(1, 2, 40, 32), torch.randn(1, 2, 24, 32), torch.randn(1, 2, 24, 32)
    program = f"(where (le k (add q (sub Sk Sq))) (mul s 0.125) (add (mul s 0.125) {FINFO_MIN!r}))"
    config = SAAConfig(**DENSE_EQUIVALENT).to_json()
    out = torch.ops.attncompiler.saa_attention(q, k, v, program, config, "site", "auto")
    assert SAA_CALLS == {"dense": 1} and "site" not in SAA_SITES
    expected = attention_reference(q, k, v, [], program)
    assert not math.isnan(float(expected.sum()))
    torch.testing.assert_close(out, expected)


def test_hf_llama_eager_attention_runs_saa_without_padding_and_dense_with_it():
    """Tiny random-weight Llama (SmolLM2's architecture) with eager attention: the finfo.min causal mask
    runs SAA; passing an attention_mask adds a padding operand, and the sites stay dense."""
    model, inputs = hf_zoo.build("llama", "eager", seq=40, batch=1)
    options = {"inner": "eager", "saa": DENSE_EQUIVALENT}
    with torch.no_grad():
        expected = model(input_ids=inputs["input_ids"]).logits
        with attncompiler.collect() as report:
            got = torch.compile(model, backend="attncompiler", options=options)(input_ids=inputs["input_ids"]).logits
        torch.compiler.reset()
        with attncompiler.collect() as padded:
            torch.compile(model, backend="attncompiler", options=options)(**inputs)
    assert [s.kernel.startswith("saa:") for s in report.sites] == [True, True], report.table()
    assert all(s.saa.density == 1.0 for s in report.sites) and SAA_CALLS["saa"] == 2
    torch.testing.assert_close(got, expected)
    assert all(s.rewritten and "mask/bias tensor" in s.saa_reason for s in padded.sites), padded.table()
