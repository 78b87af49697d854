"""The induction circuit of the shipped ``induction-2l`` model: a task that exercises it and the
edges it is made of, known from how the model was trained.

In ``[... A B ... A] -> B`` the previous-token head of layer 0 writes "the previous token was
A" at B's position, where the induction head of layer 1 finds it with its key (K-composition)
when its query is the second A, and copies B (its value) to the logits. Half the prompt pairs
corrupt the earlier B (the copied value), half the earlier A (what the previous-token head
hands on), so that both paths carry a difference.
"""

from __future__ import annotations

import json

import torch

from mechinterp.circuits.task import CircuitTask
from mechinterp.heads import induction_pairs
from mechinterp.patching import LogitDiff


def induction_task(model: object, *, pairs: int = 32, span: int = 8, k: int = 4, seed: int = 0,
                   **options: object) -> CircuitTask:
    """A :class:`CircuitTask` of induction prompt pairs, scored by the logit difference between
    the induced answer and the corrupted one. ``options`` go to :class:`CircuitTask`."""
    data = induction_pairs(model, pairs=pairs, span=span, k=k, seed=seed)
    clean = data.clean.input_ids
    corrupt = data.corrupt.input_ids.clone()
    half = pairs // 2
    corrupt[half:] = clean[half:]
    generator = torch.Generator().manual_seed(seed + 2)
    special = set(getattr(model.tokenizer, "all_special_ids", []) or [])
    for row in range(half, pairs):
        # A token that occurs nowhere in the row, in place of the earlier A.
        present = set(clean[row].tolist()) | special
        candidates = [t for t in range(model.dims.d_vocab) if t not in present]
        corrupt[row, data.changed - 1] = candidates[int(torch.randint(len(candidates), (1,),
                                                                      generator=generator))]
    return CircuitTask(model, clean, corrupt, metric=LogitDiff(data.answer, data.wrong), **options)


def induction_circuit(report: dict | None = None) -> list[str]:
    """The edges of the induction circuit, with the heads recorded in the model's training
    report (``training_report.json`` of ``induction-2l`` by default)."""
    if report is None:
        from mechinterp.zoo import zoo_path

        report = json.loads((zoo_path("induction-2l") / "training_report.json").read_text())
    previous = f"a{report['previous_token_head']['layer']}.h{report['previous_token_head']['head']}"
    induction = f"a{report['induction_head']['layer']}.h{report['induction_head']['head']}"
    last = report["induction_head"]["layer"]
    return [
        f"embed->{previous}.v",
        f"{previous}->{induction}.k",
        f"embed->{induction}.v",
        # MLP 0 works on the embeddings alone: an extended embedding the value also reads.
        "embed->m0",
        f"m0->{induction}.v",
        f"{induction}->logits",
        f"{induction}->m{last}",
        f"m{last}->logits",
    ]
