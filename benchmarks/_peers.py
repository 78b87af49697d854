"""Peer models built from ours, for side-by-side benchmarks."""

from __future__ import annotations


def transformer_lens_gpt2(hf, device, dtype, **options):
    """A TransformerLens HookedTransformer with the weights of the transformers GPT-2 ``hf``,
    unprocessed so that logits (not only log-probs) agree; ``options`` are further
    ``HookedTransformerConfig`` fields. Raises ImportError without TransformerLens."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights

    c = hf.config
    cfg = HookedTransformerConfig(
        n_layers=c.n_layer, d_model=c.n_embd, n_heads=c.n_head, d_head=c.n_embd // c.n_head,
        d_mlp=c.n_inner or 4 * c.n_embd, n_ctx=c.n_positions, d_vocab=c.vocab_size,
        act_fn=c.activation_function, eps=c.layer_norm_epsilon, normalization_type="LN",
        positional_embedding_type="standard", use_attn_scale=c.scale_attn_weights,
        scale_attn_by_inverse_layer_idx=c.scale_attn_by_inverse_layer_idx,
        original_architecture="GPT2LMHeadModel", default_prepend_bos=False, device=str(device),
        dtype=dtype, **options,
    )
    tl = HookedTransformer(cfg)
    tl.load_and_process_state_dict(convert_gpt2_weights(hf, cfg), fold_ln=False,
                                   center_writing_weights=False, center_unembed=False,
                                   fold_value_biases=False)
    return tl.eval()
