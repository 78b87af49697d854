"""activation_patch equals TransformerLens's patching functions on the same weights."""

from __future__ import annotations

import pytest
import torch
import transformers

from mechinterp import select
from mechinterp.model import InterpModel
from mechinterp.patching import activation_patch

tl = pytest.importorskip("transformer_lens", reason="TransformerLens is not installed")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")

ANSWER, WRONG = 5, 7


def _models() -> tuple[InterpModel, object]:
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=61,
                                     n_positions=32, initializer_range=0.2)
    hf = transformers.GPT2LMHeadModel(config).eval()
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=128, n_ctx=32, d_vocab=61,
        act_fn="gelu_new", eps=config.layer_norm_epsilon, normalization_type="LN",
        positional_embedding_type="standard", original_architecture="GPT2LMHeadModel",
        default_prepend_bos=False, device="cpu",
    )
    hooked = HookedTransformer(cfg)
    hooked.load_and_process_state_dict(convert_gpt2_weights(hf, cfg), fold_ln=False,
                                       center_writing_weights=False, center_unembed=False,
                                       fold_value_biases=False)
    return InterpModel(hf), hooked.eval()


@pytest.fixture(scope="module")
def models():
    return _models()


CASES = {
    "resid_pre": (select("resid_pre").layers().positions(), "get_act_patch_resid_pre"),
    "resid_mid": (select("resid_mid").layers().positions(), "get_act_patch_resid_mid"),
    "attn_out": (select("attn_out").layers().positions(), "get_act_patch_attn_out"),
    "mlp_out": (select("mlp_out").layers().positions(), "get_act_patch_mlp_out"),
    "head_by_pos": (select("head").layers().positions().heads(), "get_act_patch_attn_head_out_by_pos"),
    "head_all_pos": (select("head").layers().heads(), "get_act_patch_attn_head_out_all_pos"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_equals_transformer_lens(models, case: str) -> None:
    from transformer_lens import patching

    model, hooked = models
    g = torch.Generator().manual_seed(3)
    clean = torch.randint(2, 61, (1, 7), generator=g)
    corrupt = clean.clone()
    corrupt[0, 2] = (corrupt[0, 2] + 5) % 61
    torch.testing.assert_close(hooked(clean), model.logits(clean), rtol=1e-4, atol=1e-4)
    selector, function = CASES[case]
    _, clean_cache = hooked.run_with_cache(clean)
    theirs = getattr(patching, function)(
        hooked, corrupt, clean_cache, lambda logits: logits[0, -1, ANSWER] - logits[0, -1, WRONG])
    ours = activation_patch(model, clean, corrupt, selector, lambda z, _p: z[:, ANSWER] - z[:, WRONG],
                            progress=False)
    grid, _, _ = ours.grid()
    torch.testing.assert_close(grid, theirs, rtol=1e-4, atol=1e-4)
