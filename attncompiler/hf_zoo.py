"""Tiny Hugging Face architectures built from small configs with random weights.

Used by the tests, ``attncompiler inspect --hf NAME`` and the benchmarks: each entry builds a
model of that architecture with a chosen attention implementation and example inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

SMALL = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=128,
             vocab_size=128, max_position_embeddings=4096)
DECODER = dict(SMALL, num_key_value_heads=2)


@dataclass(frozen=True)
class Arch:
    config: str                      # transformers config class name
    model: str                       # transformers model class name
    params: dict[str, Any]
    inputs: str = "tokens"           # "tokens" (left padded), "padded tokens" (right padded), "seq2seq", "pixels"
    sdpa: bool = True                # whether transformers offers sdpa attention for it
    sites_per_layer: int = 1         # attention calls per layer (3 for an encoder-decoder: self, self, cross)


ARCHS: dict[str, Arch] = {
    "gpt2": Arch("GPT2Config", "GPT2LMHeadModel",
                 dict(n_embd=64, n_head=4, n_layer=2, vocab_size=128, n_positions=4096,
                      scale_attn_by_inverse_layer_idx=True)),
    "llama": Arch("LlamaConfig", "LlamaForCausalLM", DECODER),
    "mistral": Arch("MistralConfig", "MistralForCausalLM", dict(DECODER, sliding_window=8)),
    "qwen2": Arch("Qwen2Config", "Qwen2ForCausalLM", DECODER),
    "qwen3": Arch("Qwen3Config", "Qwen3ForCausalLM", dict(DECODER, head_dim=16)),
    "gemma": Arch("GemmaConfig", "GemmaForCausalLM", dict(DECODER, head_dim=16)),
    "gemma2": Arch("Gemma2Config", "Gemma2ForCausalLM",
                   dict(DECODER, head_dim=16, sliding_window=8, attn_logit_softcapping=50.0,
                        query_pre_attn_scalar=16), sdpa=False),
    "phi": Arch("PhiConfig", "PhiForCausalLM", SMALL),
    "phi3": Arch("Phi3Config", "Phi3ForCausalLM", dict(DECODER, pad_token_id=0)),
    "starcoder2": Arch("Starcoder2Config", "Starcoder2ForCausalLM", DECODER),
    "opt": Arch("OPTConfig", "OPTForCausalLM",
                dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, ffn_dim=128,
                     vocab_size=128, max_position_embeddings=4096, word_embed_proj_dim=64)),
    "bloom": Arch("BloomConfig", "BloomForCausalLM", dict(hidden_size=64, n_head=4, n_layer=2, vocab_size=128),
                  sdpa=False),
    "gpt_neox": Arch("GPTNeoXConfig", "GPTNeoXForCausalLM", SMALL),
    "falcon": Arch("FalconConfig", "FalconForCausalLM",
                   dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, vocab_size=128,
                        new_decoder_architecture=False, multi_query=True)),
    "t5": Arch("T5Config", "T5ForConditionalGeneration",
               dict(d_model=64, d_kv=16, d_ff=128, num_heads=4, num_layers=2, vocab_size=128,
                    decoder_start_token_id=0), inputs="seq2seq", sdpa=False, sites_per_layer=3),
    "bart": Arch("BartConfig", "BartForConditionalGeneration",
                 dict(d_model=64, encoder_attention_heads=4, decoder_attention_heads=4, encoder_layers=2,
                      decoder_layers=2, encoder_ffn_dim=128, decoder_ffn_dim=128, vocab_size=128,
                      max_position_embeddings=4096), inputs="seq2seq", sites_per_layer=3),
    "bert": Arch("BertConfig", "BertModel", SMALL, inputs="padded tokens"),
    "roberta": Arch("RobertaConfig", "RobertaModel", dict(SMALL, pad_token_id=1), inputs="padded tokens"),
    "distilbert": Arch("DistilBertConfig", "DistilBertModel",
                       dict(dim=64, n_heads=4, n_layers=2, hidden_dim=128, vocab_size=128),
                       inputs="padded tokens"),
    "vit": Arch("ViTConfig", "ViTModel", dict(SMALL, image_size=32, patch_size=8), inputs="pixels"),
}


def attention_sites(name: str) -> int:
    """How many attention computations one forward of the tiny ``name`` model runs."""
    arch = ARCHS[name]
    layers = next(arch.params[k] for k in ("num_hidden_layers", "n_layer", "num_layers", "n_layers",
                                           "encoder_layers") if k in arch.params)
    return layers * arch.sites_per_layer


def build(name: str, attn_implementation: str = "eager", seq: int = 12, batch: int = 2,
          dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", seed: int = 0):
    """``(model, inputs)`` for architecture ``name``: an eval-mode model with random weights."""
    import transformers

    if name not in ARCHS:
        raise KeyError(f"unknown architecture {name!r}; known: {', '.join(ARCHS)}")
    arch = ARCHS[name]
    if attn_implementation == "sdpa" and not arch.sdpa:
        raise ValueError(f"{name} has no sdpa attention in transformers")
    torch.manual_seed(seed)
    config = getattr(transformers, arch.config)(**arch.params)
    model = getattr(transformers, arch.model)._from_config(config, attn_implementation=attn_implementation)
    model = model.to(device=device, dtype=dtype).eval()
    return model, example_inputs(arch, config, seq, batch, device)


def example_inputs(arch: Arch, config, seq: int, batch: int, device) -> dict[str, torch.Tensor]:
    """Random token ids with padding on all but the first row (on the left for "tokens", as for
    generation, on the right for "padded tokens"), encoder/decoder ids of different lengths for
    "seq2seq", or pixel values."""
    g = torch.Generator().manual_seed(1)
    vocab = getattr(config, "vocab_size", 128)
    if arch.inputs == "pixels":
        return {"pixel_values": torch.randn(batch, 3, config.image_size, config.image_size, generator=g).to(device)}
    ids = torch.randint(2, vocab, (batch, seq), generator=g)
    if arch.inputs == "seq2seq":
        decoder_ids = torch.randint(2, vocab, (batch, max(1, seq // 2 + 1)), generator=g)
        return {"input_ids": ids.to(device), "decoder_input_ids": decoder_ids.to(device)}
    mask = torch.ones(batch, seq, dtype=torch.long)
    for row in range(1, batch):
        pad = min(seq - 1, 3 * row)
        if arch.inputs == "padded tokens":
            mask[row, seq - pad:] = 0
        else:
            mask[row, :pad] = 0
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
