"""Tiny randomly initialised models of every supported family, for tests."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import transformers

VOCAB = 61


@dataclass(frozen=True)
class Family:
    """A tiny config of one architecture, and where a hand-written hook finds its heads/neurons."""

    name: str
    make: object  # () -> transformers model
    head_input: str  # module whose input is [batch, pos, n_heads * d_head]
    neuron_input: str  # module whose input is [batch, pos, d_mlp]
    causal: bool = True


def _gpt2() -> transformers.PreTrainedModel:
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB,
                                     n_positions=32, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def _llama_like(config_cls, model_cls):
    def make() -> transformers.PreTrainedModel:
        config = config_cls(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                            max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
                            pad_token_id=0)
        return model_cls(config)

    return make


def _neox(parallel: bool):
    def make() -> transformers.PreTrainedModel:
        config = transformers.GPTNeoXConfig(hidden_size=32, intermediate_size=48,
                                            num_hidden_layers=2, num_attention_heads=4,
                                            vocab_size=VOCAB, max_position_embeddings=64,
                                            use_parallel_residual=parallel, bos_token_id=0,
                                            eos_token_id=0)
        return transformers.GPTNeoXForCausalLM(config)

    return make


def _opt() -> transformers.PreTrainedModel:
    # ffn_dim = 4 * hidden_size, the MLP width the shared shape checks assume. GELU rather than
    # OPT's ReLU: gradient checks compare with finite differences, which a ReLU kink breaks.
    config = transformers.OPTConfig(hidden_size=32, ffn_dim=128, num_hidden_layers=2,
                                    num_attention_heads=4, vocab_size=VOCAB,
                                    max_position_embeddings=64, word_embed_proj_dim=32,
                                    activation_function="gelu")
    return transformers.OPTForCausalLM(config)


def _bert() -> transformers.PreTrainedModel:
    config = transformers.BertConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, vocab_size=VOCAB,
                                     max_position_embeddings=64, pad_token_id=0)
    return transformers.BertForMaskedLM(config)


def _roberta() -> transformers.PreTrainedModel:
    config = transformers.RobertaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, vocab_size=VOCAB,
                                        max_position_embeddings=70, pad_token_id=1)
    return transformers.RobertaForMaskedLM(config)


FAMILIES = [
    Family("gpt2", _gpt2, "transformer.h.{layer}.attn.c_proj", "transformer.h.{layer}.mlp.c_proj"),
    Family("llama", _llama_like(transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "model.layers.{layer}.self_attn.o_proj", "model.layers.{layer}.mlp.down_proj"),
    Family("mistral", _llama_like(transformers.MistralConfig, transformers.MistralForCausalLM),
           "model.layers.{layer}.self_attn.o_proj", "model.layers.{layer}.mlp.down_proj"),
    Family("qwen2", _llama_like(transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
           "model.layers.{layer}.self_attn.o_proj", "model.layers.{layer}.mlp.down_proj"),
    Family("gpt_neox", _neox(parallel=True), "gpt_neox.layers.{layer}.attention.dense",
           "gpt_neox.layers.{layer}.mlp.dense_4h_to_h"),
    Family("gpt_neox_sequential", _neox(parallel=False), "gpt_neox.layers.{layer}.attention.dense",
           "gpt_neox.layers.{layer}.mlp.dense_4h_to_h"),
    Family("bert", _bert, "bert.encoder.layer.{layer}.attention.output.dense",
           "bert.encoder.layer.{layer}.output.dense", causal=False),
    Family("roberta", _roberta, "roberta.encoder.layer.{layer}.attention.output.dense",
           "roberta.encoder.layer.{layer}.output.dense", causal=False),
]

# Outside FAMILIES: tests/test_opt.py runs the per-family checks on it, and
# tests/test_circuits.py its circuit graph (both LayerNorm layouts).
OPT = Family("opt", _opt, "model.decoder.layers.{layer}.self_attn.out_proj",
             "model.decoder.layers.{layer}.fc2")


def build(family: Family, seed: int = 0) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    return family.make().eval()


def token_ids(batch: int = 2, length: int = 7, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    # Avoid ids 0 and 1, which some configs use as padding.
    return torch.randint(2, VOCAB, (batch, length), generator=generator)
