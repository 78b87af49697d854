"""InteractionResult: lookup in canonical order, summaries, plots, files, tables."""

from __future__ import annotations

import json

import matplotlib
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mechinterp.errors import InputError, ShapeError
from mechinterp.interactions.result import InteractionResult
from mechinterp.interactions.subsets import count_up_to, subset_masks, subsets_up_to

matplotlib.use("Agg")


def make(n: int = 4, min_order: int = 1, max_order: int = 2, *, stderr: bool = True,
         seed: int = 0) -> InteractionResult:
    generator = torch.Generator().manual_seed(seed)
    length = count_up_to(n, max_order, min_order=min_order)
    values = torch.randn(length, generator=generator, dtype=torch.float64)
    return InteractionResult(values, n, index="k-SII", min_order=min_order, max_order=max_order,
                             players=[f"p{i}" for i in range(n)],
                             stderr=values.abs() / 10 if stderr else None, evaluations=100,
                             estimator="test", baseline_value=0.5, full_value=2.0)


def test_lookup_by_indices_and_labels_in_any_order() -> None:
    result = make()
    for position, subset in enumerate(subsets_up_to(4, 2, min_order=1)):
        assert result.position(subset) == position
        assert result[tuple(reversed(subset))] == float(result.values[position])
        assert result[tuple(f"p{i}" for i in subset)] == float(result.values[position])
    assert result[2] == result[(2,)] == result["p2"]


@given(st.integers(1, 12).flatmap(lambda n: st.tuples(
    st.just(n), st.sets(st.integers(0, n - 1)))))
def test_position_is_the_canonical_rank(case) -> None:
    n, players = case
    result = InteractionResult(torch.zeros(2**n, dtype=torch.float64), n, index="Moebius",
                               min_order=0, max_order=n)
    assert result.subsets[result.position(tuple(players))] == tuple(sorted(players))


@pytest.mark.parametrize(("subset", "match"), [
    (("p9",), "label"), ((0, 0), "repeat"), ((0, 1, 2), "sizes 1..2"), ((7,), "index in"),
    ((), "sizes 1..2"), (1.5, "tuple"),
])
def test_bad_lookups(subset, match) -> None:
    with pytest.raises(InputError, match=match):
        make()[subset]


def test_construction_checks() -> None:
    with pytest.raises(ShapeError, match=r"values must have shape \[10\]"):
        InteractionResult(torch.zeros(9), 4, min_order=1, max_order=2)
    with pytest.raises(ShapeError, match="stderr"):
        InteractionResult(torch.zeros(4), 4, stderr=torch.zeros(3))
    with pytest.raises(InputError, match="min_order <= max_order"):
        InteractionResult(torch.zeros(4), 4, min_order=2, max_order=1)
    with pytest.raises(InputError, match="one label per player"):
        InteractionResult(torch.zeros(4), 4, players=["a"])
    result = InteractionResult(torch.arange(4, dtype=torch.float32), 4)
    assert result.values.dtype == torch.float64 and result.players == ("0", "1", "2", "3")


def test_summaries() -> None:
    values = torch.tensor([3.0, -1.0, 0.1, 0.0, -4.0, 0.05], dtype=torch.float64)
    result = InteractionResult(values, 3, index="k-SII", min_order=1, max_order=2)
    assert result.top_k(2) == [((0, 2), -4.0), ((0,), 3.0)]
    assert [s for s, _ in result.top_k(5, order=1)] == [(0,), (1,), (2,)]
    strength = result.strength_by_order()
    assert strength[1] == pytest.approx(4.1) and strength[2] == pytest.approx(4.05)
    assert [s for s, _ in result.salient(0.05)] == [(0, 2), (0,), (1,)]
    stats = result.sparsity(0.05)
    assert stats["n_salient"] == 3 and stats["n_interactions"] == 6
    assert stats["salient_strength"] == pytest.approx(8.0 / 8.15)
    assert 0 < stats["gini"] < 1


def test_empty_set_is_left_out_of_rankings() -> None:
    result = make(min_order=0)
    result.values[0] = 1e6
    assert all(len(s) > 0 for s, _ in result.top_k(3))
    assert () not in [s for s, _ in result.salient()]


def test_to_frame() -> None:
    pytest.importorskip("pandas")
    frame = make().to_frame()
    assert list(frame.columns) == ["subset", "labels", "order", "value", "stderr"]
    assert frame.iloc[4]["subset"] == (0, 1) and frame.iloc[4]["labels"] == ("p0", "p1")
    assert frame["order"].tolist() == [1] * 4 + [2] * 6


@pytest.mark.parametrize("kind", ["bar", "heatmap", "orders"])
def test_plots_return_figures(kind: str) -> None:
    import matplotlib.pyplot as plt

    figure = make().plot(kind)
    assert isinstance(figure, matplotlib.figure.Figure)
    plt.close(figure)


def test_plot_errors() -> None:
    with pytest.raises(InputError, match="kind"):
        make().plot("pie")
    with pytest.raises(InputError, match="order 2"):
        make(max_order=1).plot("heatmap")


def test_save_and_load_round_trip(tmp_path) -> None:
    for result in (make(), make(stderr=False, min_order=0, max_order=4)):
        path = tmp_path / "result.safetensors"
        result.save(path)
        loaded = InteractionResult.load(path)
        assert torch.equal(loaded.values, result.values)
        assert (loaded.stderr is None) == (result.stderr is None)
        for name in ("n_players", "index", "min_order", "max_order", "players", "evaluations",
                     "estimator", "baseline_value", "full_value"):
            assert getattr(loaded, name) == getattr(result, name)


def test_load_refuses_malformed_files(tmp_path) -> None:
    from safetensors.torch import save_file

    with pytest.raises(InputError, match="safetensors"):
        InteractionResult.load(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a tensor file at all")
    with pytest.raises(InputError, match="safetensors"):
        InteractionResult.load(junk)
    meta = json.dumps(make()._metadata())
    cases = {
        "format": ({"values": torch.zeros(10, dtype=torch.float64)}, {"format": "other"}),
        "malformed": ({"values": torch.zeros(10, dtype=torch.float64)},
                      {"format": "mechinterp.InteractionResult/1", "result": "{"}),
        "consistent": ({"values": torch.zeros(7, dtype=torch.float64)},
                       {"format": "mechinterp.InteractionResult/1", "result": meta}),
        "float64": ({"values": torch.zeros(10, dtype=torch.float32)},
                    {"format": "mechinterp.InteractionResult/1", "result": meta}),
        "tensors": ({"other": torch.zeros(10, dtype=torch.float64)},
                    {"format": "mechinterp.InteractionResult/1", "result": meta}),
    }
    for match, (tensors, metadata) in cases.items():
        path = tmp_path / f"{match}.safetensors"
        save_file(tensors, str(path), metadata=metadata)
        with pytest.raises(InputError, match=match):
            InteractionResult.load(path)


def test_from_table() -> None:
    n = 5
    table = torch.randn(1 << n, dtype=torch.float64)
    result = InteractionResult.from_table(table, min_order=1, max_order=3, players=list("abcde"))
    assert torch.equal(result.values, table[subset_masks(n, 3, min_order=1)])
    assert result.baseline_value == float(table[0])
    assert result.full_value == pytest.approx(float(table.sum()))
    assert result[("a", "c")] == float(table[0b101])
    with pytest.raises(ShapeError, match="power-of-two"):
        InteractionResult.from_table(torch.zeros(12))
    with pytest.raises(InputError, match="max_order"):
        InteractionResult.from_table(table, max_order=6)
