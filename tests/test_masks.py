"""Masks built in the graph are read as position predicates and computed inside the kernel."""

import math

import pytest
import torch

import attncompiler

B, H, S, D = 2, 2, 24, 16
OPTIONS = {"inner": "eager"}


def qkv(sq=S, sk=S, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, sq, D, generator=g), torch.randn(B, H, sk, D, generator=g),
            torch.randn(B, H, sk, D, generator=g))


def attend(q, k, v, scores_mask=None, bias=None):
    scores = q @ k.transpose(-2, -1) / math.sqrt(D)
    if bias is not None:
        scores = scores + bias
    if scores_mask is not None:
        scores = scores.masked_fill(~scores_mask, float("-inf"))
    return scores.softmax(-1) @ v


def compiled_site(fn, *inputs, kernel_calls):
    """Compile ``fn``, check it was rewritten exactly with the Triton kernel; return its one site."""
    with torch.no_grad():
        expected = fn(*inputs)
        report = attncompiler.explain(fn, *inputs, options=OPTIONS)
    assert report.num_rewritten == len(report.sites) == 1, report.table()
    assert kernel_calls["triton"] == 1 and kernel_calls["reference"] == 0
    torch.testing.assert_close(report.output, expected, rtol=1e-5, atol=1e-5, equal_nan=True)
    return report.sites[0]


def test_causal_from_aranges_is_computed_in_the_kernel(kernel_calls):
    def fn(q, k, v):
        sq, sk = q.shape[-2], k.shape[-2]
        keep = torch.arange(sq)[:, None] >= torch.arange(sk)[None, :]
        return attend(q, k, v, keep)

    site = compiled_site(fn, *qkv(), kernel_calls=kernel_calls)
    assert site.summary["program"] == "(where (le k q) (div s 4.0) -inf)"
    assert "computed: causal" in site.summary["mask"]


def test_tril_of_ones_is_causal(kernel_calls):
    def fn(q, k, v):
        keep = torch.tril(torch.ones(S, S, dtype=torch.bool))
        return attend(q, k, v, keep)

    site = compiled_site(fn, *qkv(), kernel_calls=kernel_calls)
    assert "(le k q)" in site.summary["program"] and "$" not in site.summary["program"]


def test_triu_float_mask_with_finfo_min(kernel_calls):
    def fn(q, k, v):
        masked = torch.triu(torch.full((S, S), torch.finfo(torch.float32).min), diagonal=1)
        return attend(q, k, v, bias=masked)

    site = compiled_site(fn, *qkv(), kernel_calls=kernel_calls)
    assert "$" not in site.summary["program"], site.summary


def test_sliding_window_and_cache_offset(kernel_calls):
    window, sq, sk = 5, 7, S

    def fn(q, k, v):
        q_pos = torch.arange(q.shape[-2])[:, None] + (k.shape[-2] - q.shape[-2])
        k_pos = torch.arange(k.shape[-2])[None, :]
        keep = (k_pos <= q_pos) & (k_pos > q_pos - window)
        return attend(q, k, v, keep)

    site = compiled_site(fn, *qkv(sq, sk), kernel_calls=kernel_calls)
    assert "sliding window" in site.summary["mask"] and "$" not in site.summary["program"], site.summary


def test_padding_is_loaded_per_key_and_causal_computed(kernel_calls):
    lengths = torch.tensor([S, S - 9])
    key_ok = torch.arange(S)[None, :] < lengths[:, None]          # [B, S]

    def fn(q, k, v, key_ok):
        causal = torch.arange(S)[:, None] >= torch.arange(S)[None, :]
        keep = causal[None, None] & key_ok[:, None, None, :]
        return attend(q, k, v, keep)

    site = compiled_site(fn, *qkv(), key_ok, kernel_calls=kernel_calls)
    assert "padding" in site.summary["mask"] and "causal" in site.summary["mask"]
    assert "bool[2, 1, 1, 24]" in site.summary["mask"], site.summary


def test_fully_masked_rows_with_a_finite_fill_match_eager(kernel_calls):
    """Left padding masks every key of a row's first queries: eager averages v uniformly there."""
    key_ok = torch.ones(B, S, dtype=torch.bool)
    key_ok[1, :6] = False

    def fn(q, k, v, key_ok):
        causal = torch.arange(S)[:, None] >= torch.arange(S)[None, :]
        keep = causal[None, None] & key_ok[:, None, None, :]
        fill = torch.where(keep, 0.0, torch.finfo(torch.float32).min)
        return attend(q, k, v, bias=fill)

    compiled_site(fn, *qkv(), key_ok, kernel_calls=kernel_calls)


def test_chunked_mask_compares_two_small_index_vectors(kernel_calls):
    chunk = 8

    def fn(q, k, v):
        pos = torch.arange(S)
        keep = (pos[:, None] // chunk) == (pos[None, :] // chunk)
        return attend(q, k, v, keep)

    site = compiled_site(fn, *qkv(), kernel_calls=kernel_calls)
    assert "index tensor int64[24, 1]; index tensor int64[1, 24]" in site.summary["mask"], site.summary


def test_unreadable_mask_stays_a_tensor_and_exact(kernel_calls):
    def fn(q, k, v, weights):
        return attend(q, k, v, weights > 0)

    weights = torch.randn(S, S)
    weights[:, 0] = 1.0  # no fully masked row
    site = compiled_site(fn, *qkv(), weights, kernel_calls=kernel_calls)
    assert site.summary["mask"] == "bool mask bool[24, 24]", site.summary


def test_dynamic_lengths_keep_the_offset_symbolic(kernel_calls):
    def fn(q, k, v):
        q_pos = torch.arange(q.shape[-2])[:, None] + (k.shape[-2] - q.shape[-2])
        keep = torch.arange(k.shape[-2])[None, :] <= q_pos
        return attend(q, k, v, keep)

    compiled = torch.compile(fn, backend="attncompiler", options=OPTIONS, dynamic=True)
    with torch.no_grad():
        for sq, sk in ((3, 20), (5, 29), (1, 17)):
            inputs = qkv(sq, sk, seed=sq)
            torch.testing.assert_close(compiled(*inputs), fn(*inputs), rtol=1e-5, atol=1e-5)
    assert kernel_calls["triton"] == 3 and kernel_calls["reference"] == 0


@pytest.mark.parametrize("text, kinds", [
    ("(le k q)", ["causal"]),
    ("(gt k (add q -8.0))", ["sliding window (k > q - 8)"]),
])
def test_classify_names_known_predicates(text, kinds):
    import sympy
    from attncompiler.passes.masks import K, Q, classify

    expr = {"(le k q)": sympy.Le(K, Q), "(gt k (add q -8.0))": sympy.Gt(K, Q - 8)}[text]
    assert classify(expr, []) == kinds


def test_alibi_from_slopes_and_positions_is_computed(kernel_calls):
    slopes = torch.tensor([2.0 ** -1, 2.0 ** -2])

    def fn(q, k, v, slopes):
        distance = torch.arange(S)[None, :] - torch.arange(S)[:, None]        # k - q
        bias = slopes[:, None, None] * distance                                # [H, S, S]
        causal = torch.arange(S)[:, None] >= torch.arange(S)[None, :]
        return attend(q, k, v, causal, bias=bias)

    site = compiled_site(fn, *qkv(), slopes, kernel_calls=kernel_calls)
    assert "bias float32[2, 1, 1]" in site.summary["mask"] and "24, 24]" not in site.summary["mask"], site.summary


def test_an_atom_that_simplifies_away_is_not_an_operand(kernel_calls):
    key_ok = torch.ones(B, S, dtype=torch.bool)

    def fn(q, k, v, key_ok):
        causal = torch.arange(S)[:, None] >= torch.arange(S)[None, :]
        always = torch.ones((), dtype=torch.bool)
        keep = causal[None, None] & (key_ok[:, None, None, :] | always)
        return attend(q, k, v, keep)

    site = compiled_site(fn, *qkv(), key_ok, kernel_calls=kernel_calls)
    assert site.summary["program"] == "(where (le k q) (div s 4.0) -inf)", site.summary


def test_finfo_min_causal_mask_skips_key_blocks_and_keeps_rows_without_keys_exact(kernel_calls):
    """Long enough for several key blocks: blocks past the causal bound are skipped, yet the rows
    that left padding leaves without any key still average every key, as eager does."""
    seq = 80
    key_ok = torch.ones(B, seq, dtype=torch.bool)
    key_ok[1, :20] = False

    def fn(q, k, v, key_ok):
        causal = torch.arange(seq)[:, None] >= torch.arange(seq)[None, :]
        keep = causal[None, None] & key_ok[:, None, None, :]
        return attend(q, k, v, bias=torch.where(keep, 0.0, torch.finfo(torch.float32).min))

    site = compiled_site(fn, *qkv(seq, seq), key_ok, kernel_calls=kernel_calls)
    assert site.summary["program"].startswith("(where (and $0 (le k q))"), site.summary
    source = open(site.source).read()
    assert "kv_end = tl.minimum" in source and "tl.min(m_i, 0) < LOG2E_SAFE_MIN" in source


def _packed_causal(q, k, v, positions):
    """Hugging Face's mask without an attention_mask: positions gathered with index tensors and
    packed-sequence ids from diff/cumsum (``find_packed_sequence_indices``)."""
    step = torch.diff(positions, prepend=positions[:, :1] - 1, dim=-1)
    packed = (step != 1).cumsum(-1)
    b = torch.arange(1)[:, None, None, None]
    qi, ki = torch.arange(S)[None, None, :, None], torch.arange(S)[None, None, None, :]
    keep = (positions[b, ki] <= positions[b, qi]) & (packed[b, qi] == packed[b, ki])
    return attend(q, k, v, keep.expand(B, -1, S, S))


def test_positions_gathered_by_index_tensors_give_causal(kernel_calls):
    def fn(q, k, v):
        return _packed_causal(q, k, v, (torch.arange(S) + 0).unsqueeze(0))

    site = compiled_site(fn, *qkv(), kernel_calls=kernel_calls)
    assert site.summary["program"] == "(where (le k q) (div s 4.0) -inf)", site.summary
    assert "computed: causal" in site.summary["mask"]


def test_gathered_user_positions_stay_loaded_and_exact(kernel_calls):
    """Position ids the graph cannot see (two packed sequences) are loaded, not assumed an arange."""
    positions = torch.cat([torch.arange(10), torch.arange(S - 10)])[None]
    site = compiled_site(_packed_causal, *qkv(), positions, kernel_calls=kernel_calls)
    assert "index tensor" in site.summary["mask"] and "computed: causal from" not in site.summary["mask"], site.summary
