"""The screened CPU TopK: a bf16 GEMM bounds every latent, float32 decides; held to float64."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mechinterp import _ops
from mechinterp.errors import InputError, ShapeError
from mechinterp.sae import encode_sparse
from mechinterp.sae.screen import screen_weights
from tests.test_sae_encode import inputs, make_sae


def _operands(rows: int, d_in: int, d_sae: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, d_in, generator=g)
    w = torch.randn(d_in, d_sae, generator=g) / d_in**0.5
    bias = 0.1 * torch.randn(d_sae, generator=g)
    scale = 0.5 + torch.rand(d_sae, generator=g)
    return x, w, bias, scale


def _screen(x: torch.Tensor, w: torch.Tensor):
    w_t = w.T.contiguous()
    w_bf16_t = w_t.bfloat16()
    norms = torch.stack([w_bf16_t.double().norm(dim=1), (w_t.double() - w_bf16_t.double()).norm(dim=1)])
    return x.bfloat16() @ w_bf16_t.T, w_t, norms * (1 + 2**-40)


def _exact_topk(x, w, bias, scale, k):
    """The float32 top-k of float64 pre-activations rounded once: a stable sort, lower index first."""
    values = ((x.double() @ w.double() + bias.double()) * scale.double()).float()
    ref = values.sort(dim=1, descending=True, stable=True)
    return ref.values[:, :k], ref.indices[:, :k]


@pytest.mark.parametrize("k", [1, 8, 40])
def test_screened_topk_is_the_exact_float32_topk(k):
    x, w, bias, scale = _operands(50, 96, 700)
    w[:, 9] = w[:, 5]  # identical latents where scale and bias agree: the lower index first
    bias[9], scale[9] = bias[5], scale[5]
    x[7] = 0.0  # a row ranked by bias * scale alone
    screen, w_t, norms = _screen(x, w)
    values, index, recomputed = _ops.screened_topk(screen, x, w_t, norms, k, bias=bias,
                                                   scale=scale)
    ref_v, ref_i = _exact_topk(x, w, bias, scale, k)
    assert torch.equal(index.long(), ref_i)
    torch.testing.assert_close(values, ref_v, rtol=2**-23, atol=0)
    assert 50 * k <= recomputed < 50 * 700 // 4


def test_screened_topk_without_bias_or_scale_pads_short_rows():
    x, w, _, _ = _operands(6, 40, 10, seed=2)
    screen, w_t, norms = _screen(x, w)
    values, index, _ = _ops.screened_topk(screen, x, w_t, norms, 12)
    _ref_v, ref_i = _exact_topk(x, w, torch.zeros(10), torch.ones(10), 10)
    assert torch.equal(index[:, :10].long(), ref_i)
    assert torch.all(index[:, 10:] == -1) and torch.all(values[:, 10:] == float("-inf"))


def test_rows_with_inf_or_nan_are_recomputed_in_full():
    x, w, bias, scale = _operands(4, 32, 200, seed=3)
    x[1, 3] = float("inf")
    x[2, 0] = float("nan")
    screen, w_t, norms = _screen(x, w)
    values, index, recomputed = _ops.screened_topk(screen, x, w_t, norms, 5, bias=bias,
                                                   scale=scale)
    assert recomputed >= 2 * 200
    exact = ((x.double() @ w.double() + bias.double()) * scale.double()).float()
    ref_v, ref_i = _ops.select_topk(exact, 5)  # the same order: NaN above +inf
    assert torch.equal(index, ref_i)
    torch.testing.assert_close(values, ref_v, rtol=2**-23, atol=0, equal_nan=True)


@pytest.mark.parametrize("extra", [{}, {"rescale_acts_by_decoder_norm": True},
                                   {"normalize_activations": "layer_norm"}])
def test_encode_sparse_screened_equals_the_unscreened_encode(extra):
    sae = make_sae("topk", d_in=64, d_sae=900, k=16, **extra)
    x = inputs(70, sae.d_in)
    screened = encode_sparse(sae, x, screen=True, chunk_bytes=40 * 900 * 2)  # two row blocks
    plain = encode_sparse(sae, x, screen=False)
    assert torch.equal(screened.row_ptr, plain.row_ptr)
    got, want = screened.indices.reshape(70, 16), plain.indices.reshape(70, 16)
    assert all(set(a.tolist()) == set(b.tolist()) for a, b in zip(got, want))
    torch.testing.assert_close(screened.to_dense(), sae.encode(x), rtol=1e-5, atol=1e-6)


def test_screen_weights_follow_in_place_changes_of_the_encoder():
    sae = make_sae("topk", d_in=32, d_sae=256, k=4)
    x = inputs(9, sae.d_in)
    first = screen_weights(sae)
    assert screen_weights(sae) is first
    assert screen_weights(dataclasses.replace(sae, normalize_activations="none")) is first
    encode_sparse(sae, x, screen=True)
    with torch.no_grad():
        sae.W_enc.mul_(-1.0)
    assert screen_weights(sae) is not first
    screened = encode_sparse(sae, x, screen=True)
    torch.testing.assert_close(screened.to_dense(), sae.encode(x), rtol=1e-5, atol=1e-6)


def test_screen_is_refused_where_it_does_not_apply():
    x = inputs(3, 24)
    with pytest.raises(InputError, match="screen=True needs a float32 TopK"):
        encode_sparse(make_sae("relu"), x, screen=True)
    with pytest.raises(InputError, match="screen=True needs a float32 TopK"):
        encode_sparse(make_sae("topk", dtype=torch.bfloat16), x.bfloat16(), screen=True)
    with pytest.raises(InputError, match="screen must be"):
        encode_sparse(make_sae("topk"), x, screen="yes")
    screen, w_t, norms = _screen(x, torch.randn(24, 50))
    # The kernel checks what it reads: a plain ValueError naming the argument.
    with pytest.raises(ValueError, match="norms must be a contiguous \\[2, 50\\]"):
        _ops.screened_topk(screen, x, w_t, norms[0], 3)
    with pytest.raises(ShapeError, match="bias"):
        _ops.screened_topk(screen, x, w_t, norms, 3, bias=torch.zeros(49))
    with pytest.raises(ValueError, match="x must be \\[3, 24\\]"):
        _ops.screened_topk(screen, x[:, :20], w_t, norms, 3)
