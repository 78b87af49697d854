"""causal_trace equals causal-tracer (ROME's algorithm, PyPI) given the same noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from mechinterp.model import InterpModel
from mechinterp.tracing import causal_trace
from mechinterp.zoo import zoo_path

causal_tracer = pytest.importorskip("causal_tracer", reason="causal-tracer is not installed")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


@pytest.mark.parametrize(("kind", "theirs", "window"),
                         [("hidden", "hidden", 1), ("mlp", "mlp", 10), ("attn", "attention", 10)])
def test_equals_causal_tracer(kind: str, theirs: str, window: int) -> None:
    folder = zoo_path("induction-2l")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(0)  # a random model of the shipped one's shape: less peaked answers
    config = transformers.GPT2Config.from_pretrained(folder)
    config.n_layer = 4
    hf = transformers.GPT2LMHeadModel(config).eval()
    prompt, subject, samples = "fuba bu fafi mabi vetu fuba", "bu fafi", 6
    tracer = causal_tracer.CausalTracer(hf, tokenizer, device=torch.device("cpu"))
    flow = tracer.calculate_hidden_flow(prompt, subject=subject, kind=theirs, samples=samples,
                                        window=window, patch_seed=1)
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    begin, end = flow.subject_range
    draws = torch.from_numpy(np.random.RandomState(1).randn(samples, end - begin, config.n_embd))
    ours = causal_trace(InterpModel(hf, tokenizer), ids, (begin, end), kinds=(kind,),
                        samples=samples, noise=tracer.noise, window=window, draws=draws,
                        progress=False)
    assert ours.answer_text == flow.answer
    assert ours.base == pytest.approx(flow.high_score, rel=1e-5)
    assert ours.low == pytest.approx(flow.low_score, rel=1e-5, abs=1e-7)
    torch.testing.assert_close(ours.scores[0], flow.scores.float(), rtol=1e-4, atol=1e-6)
