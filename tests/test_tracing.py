"""causal_trace against ROME's algorithm written with plain hooks, one forward per cell."""

from __future__ import annotations

import pytest
import torch
from families import FAMILIES, build, token_ids

import mechinterp
from mechinterp import _ops
from mechinterp.errors import InputError, ShapeError
from mechinterp.model import InterpModel
from mechinterp.tracing import KINDS, TraceResult, causal_trace, embedding_noise_scale
from mechinterp.tracing.trace import _embedding_gaussian

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# Where ROME's hooks go, per family: embedding, block, MLP and attention modules.
PATHS = {
    "gpt2": ("transformer.wte", "transformer.h.{}", "transformer.h.{}.mlp", "transformer.h.{}.attn"),
    "llama": ("model.embed_tokens", "model.layers.{}", "model.layers.{}.mlp",
              "model.layers.{}.self_attn"),
}


def rome_trace(hf, ids, begin, end, noise, answer, kind, window, paths, replace=False):
    """ROME's trace_with_patch / trace_with_repatch for every (token, layer): row 0 clean, rows
    1..S noised; restore h[1:, t] = h[0, t] at the module's output; score the mean probability."""
    embed, block, mlp, attn = paths
    n_layers, seq = hf.config.num_hidden_layers, ids.shape[1]
    samples = noise.shape[0]
    batch = ids.repeat(samples + 1, 1)

    def first(output):
        return output[0] if isinstance(output, tuple) else output

    def add_noise(_module, _args, output):
        output = output.clone()
        if replace:
            output[1:, begin:end] = noise
        else:
            output[1:, begin:end] += noise
        return output

    def run(restore: dict, freeze: dict):
        handles = [hf.get_submodule(embed).register_forward_hook(add_noise)]
        for path, positions in restore.items():
            def hook(_m, _a, output, positions=positions):
                h = first(output)
                for t in positions:
                    h[1:, t] = h[0, t]
            handles.append(hf.get_submodule(path).register_forward_hook(hook))
        for path, values in freeze.items():
            def hook(_m, _a, output, values=values):
                first(output)[1:] = values
            handles.append(hf.get_submodule(path).register_forward_hook(hook))
        try:
            with torch.no_grad():
                logits = hf(batch).logits
        finally:
            for handle in handles:
                handle.remove()
        return logits[1:, -1].softmax(-1).mean(0)[answer]

    frozen_kind = {"hidden-no-mlp": mlp, "hidden-no-attn": attn}.get(kind)
    first_pass = {}
    if frozen_kind is not None:  # ROME's first pass records the noised run's outputs
        handles = [hf.get_submodule(embed).register_forward_hook(add_noise)]
        for layer in range(n_layers):
            path = frozen_kind.format(layer)
            handles.append(hf.get_submodule(path).register_forward_hook(
                lambda _m, _a, output, path=path: first_pass.__setitem__(path, first(output)[1:].clone())))
        with torch.no_grad():
            hf(batch)
        for handle in handles:
            handle.remove()
    table = torch.zeros(seq, n_layers)
    for t in range(seq):
        for layer in range(n_layers):
            if kind in ("mlp", "attn"):
                low, high = max(0, layer - window // 2), min(n_layers, layer - (-window // 2))
                module = mlp if kind == "mlp" else attn
                restore = {module.format(l): [t] for l in range(low, high)}
            else:
                restore = {block.format(layer): [t]}
            freeze = {path: first_pass[path] for path in first_pass}
            table[t, layer] = run(restore, freeze)
    return table


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_equals_rome_with_the_same_noise(name) -> None:
    family = next(f for f in FAMILIES if f.name == name)
    model = InterpModel(build(family))
    ids = token_ids(1, 6, seed=4)
    samples, window, begin, end = 3, 3, 1, 3
    trace = causal_trace(model, ids, (begin, end), kinds=KINDS, samples=samples, window=window,
                         seed=5, batch_size=16, progress=False)
    scale = embedding_noise_scale(model)
    noise = _ops.fill_noise(torch.empty(samples, end - begin, model.dims.d_model), seed=5) * scale
    for k, kind in enumerate(KINDS):
        expected = rome_trace(model._module, ids, begin, end, noise, trace.answer, kind, window,
                              PATHS[name])
        torch.testing.assert_close(trace.scores[k], expected, rtol=1e-4, atol=1e-6, msg=kind)
    with torch.no_grad():
        clean = model.run(ids).logits[0, -1].softmax(-1)
    assert trace.answer == int(clean.argmax())
    assert trace.base == pytest.approx(float(clean.max()), rel=1e-5)
    # Restoring the last layer's output at the last position restores the clean answer exactly.
    assert float(trace.table("hidden")[-1, -1]) == pytest.approx(trace.base, rel=1e-5)


def test_multivariate_replacement_equals_rome() -> None:
    """ROME's multivariate option: draws from the Gaussian of the embeddings, replacing them."""
    model = InterpModel(build(FAMILIES[0]))
    ids = token_ids(1, 5, seed=4)
    weight = model._module.transformer.wte.weight.detach().double()
    mean = weight.mean(0)
    factor = torch.linalg.cholesky(torch.cov(weight.T) + 1e-9 * torch.cov(weight.T).diagonal().mean()
                                   * torch.eye(weight.shape[1], dtype=torch.float64))
    trace = causal_trace(model, ids, (1, 3), kinds=("hidden",), samples=4, multivariate=True,
                         replace=True, seed=2, progress=False)
    z = _ops.fill_noise(torch.empty(4, 2, weight.shape[1]), seed=2).double()
    noise = (mean + z @ factor.T).float()
    expected = rome_trace(model._module, ids, 1, 3, noise, trace.answer, "hidden", 1,
                          PATHS["gpt2"], replace=True)
    torch.testing.assert_close(trace.scores[0], expected, rtol=1e-4, atol=1e-6)
    assert trace.multivariate and trace.replace
    # The fitted Gaussian is the embeddings' own: its factor reproduces their covariance.
    fitted_mean, fitted_factor = _embedding_gaussian(model)
    torch.testing.assert_close(fitted_mean, mean)
    torch.testing.assert_close(fitted_factor @ fitted_factor.T, torch.cov(weight.T), rtol=1e-6, atol=1e-9)
    with pytest.raises(InputError, match="leave noise and uniform unset"):
        causal_trace(model, ids, (1, 3), multivariate=True, noise=0.5)


def test_reuse_batching_and_uniform_noise() -> None:
    model = InterpModel(build(FAMILIES[0]))
    ids = token_ids(1, 5, seed=6)
    base = causal_trace(model, ids, (0, 2), samples=4, window=2, reuse=False, batch_size=64,
                        progress=False)
    other = causal_trace(model, ids, (0, 2), samples=4, window=2, reuse=True, batch_size=8,
                         progress=False)
    torch.testing.assert_close(other.scores, base.scores, rtol=1e-5, atol=1e-7)
    uniform = causal_trace(model, ids, (0, 2), samples=4, window=2, uniform=True, progress=False)
    assert not torch.allclose(uniform.scores, base.scores)
    again = causal_trace(model, ids, (0, 2), samples=4, window=2, uniform=True, progress=False)
    assert torch.equal(again.scores, uniform.scores)


def test_induction_model_needs_the_earlier_token() -> None:
    model = mechinterp.load("induction-2l")
    prompt = "fuba bu mabi fafi vetu fuba bu mabi"  # the answer is "fafi", copied by induction
    trace = causal_trace(model, prompt, subject="fafi", kinds=("hidden",), samples=8,
                         progress=False)
    assert trace.answer_text.strip() == "fafi" and trace.base > 0.8 and trace.low < 0.5 * trace.base
    hidden = trace.table("hidden")
    subject, last = trace.subject[0], len(trace.tokens) - 1
    # The noised token matters where layer 1's attention reads it: as layer 0's output. Restored
    # after layer 1 it comes too late; at the last position, layer 1's output holds the answer.
    assert float(hidden[subject, 0]) > 0.9 * trace.base
    assert float(hidden[last, 1]) == pytest.approx(trace.base, rel=1e-4)
    recovered = hidden > trace.low + 0.1 * (trace.base - trace.low)
    assert recovered.sum() == 2 and recovered[subject, 0] and recovered[last, 1]


def test_result_records_plot_and_file(tmp_path) -> None:
    model = InterpModel(build(FAMILIES[0]))
    trace = causal_trace(model, token_ids(1, 4, seed=2), (1, 2), kinds=("hidden", "mlp"),
                         samples=2, progress=False)
    records = trace.to_records()
    assert len(records) == 2 * 4 * 2 and records[0]["kind"] == "hidden"
    assert sum(r["subject"] for r in records) == 2 * 2
    assert torch.equal(trace.indirect_effect(), trace.scores - trace.low)
    assert trace.plot().axes
    trace.save(tmp_path / "trace.safetensors")
    loaded = TraceResult.load(tmp_path / "trace.safetensors")
    assert loaded.kinds == trace.kinds and torch.equal(loaded.scores, trace.scores)
    assert loaded.subject == (1, 2) and loaded.answer == trace.answer
    with pytest.raises(InputError, match="kind must be one of the traced kinds"):
        trace.table("attn")


def test_bad_input_is_named() -> None:
    model = mechinterp.load("induction-2l")
    with pytest.raises(InputError, match="does not occur in the prompt's tokens"):
        causal_trace(model, "fuba bu", subject="mabi")
    with pytest.raises(InputError, match="kinds must be a non-empty selection"):
        causal_trace(model, "fuba bu", subject="bu", kinds=("mlp", "residual"))
    with pytest.raises(InputError, match="samples must be a positive int"):
        causal_trace(model, "fuba bu", subject="bu", samples=0)
    with pytest.raises(ShapeError, match="single prompt"):
        causal_trace(model, ["fuba bu", "bu fuba"], subject="bu")
    with pytest.raises(InputError, match="subject range must select"):
        causal_trace(model, "fuba bu", subject=(2, 2))
    with pytest.raises(InputError, match="noise must be a finite non-negative number"):
        causal_trace(model, "fuba bu", subject="bu", noise=float("nan"))
    assert embedding_noise_scale(model) == pytest.approx(
        3 * float(model._module.transformer.wte.weight.std()))


@pytest.mark.parametrize("family", FAMILIES, ids=[f.name for f in FAMILIES])
def test_every_family_traces(family) -> None:
    """Restoring the last block's output at the last position restores the clean answer
    exactly; in causal models, restoring a state before the subject changes nothing."""
    model = InterpModel(build(family))
    ids = token_ids(1, 5, seed=8)
    trace = causal_trace(model, ids, (2, 4), kinds=("hidden", "mlp"), samples=3, window=2,
                         progress=False)
    hidden = trace.table("hidden")
    assert float(hidden[-1, -1]) == pytest.approx(trace.base, rel=1e-4)
    if family.causal:
        assert torch.equal(hidden[:2], torch.full_like(hidden[:2], hidden[0, 0].item()))
        assert float(hidden[0, 0]) == pytest.approx(trace.low, rel=1e-6)
