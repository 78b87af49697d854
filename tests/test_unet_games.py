"""Games on diffusion U-Nets: text-token and spatial-region players, one generation row per
coalition.

Each game is held to a hand-built reference: ``model.generate`` on masked encoder states, or
with hand-written ``Zero``/``Set`` edits, one coalition at a time, on a tiny random float64
U-Net. The shipped ``toy-unet`` gives the known answer: its colour word carries the colour.
"""

from __future__ import annotations

import itertools

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from test_unet import WIDTH, tiny_unet

import mechinterp
from mechinterp import Set, Site, Zero
from mechinterp.diffusion import DiffusionModel
from mechinterp.diffusion.games import RegionGame, TextTokenGame
from mechinterp.errors import DTypeError, InputError, ShapeError, SiteError
from mechinterp.interactions import exact, moebius_transform, shapley_values
from mechinterp.zoo.train_toy_unet import ColourShift

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 3
TOKENS = 5
# Rounding of a batched forward differs from a one-row forward by float64 ulps, which the
# float32 images round to at most one float32 ulp per pixel.
ATOL = 1e-6


@pytest.fixture(scope="module")
def tiny() -> DiffusionModel:
    return DiffusionModel(tiny_unet(), scheduler=diffusers.DDIMScheduler(), name="tiny")


@pytest.fixture(scope="module")
def toy() -> DiffusionModel:
    return mechinterp.load("toy-unet")


def draw(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


PROMPT = draw(1, TOKENS, WIDTH, seed=1)
NEGATIVE = draw(1, TOKENS, WIDTH, seed=2)
CORRUPT = draw(1, TOKENS, WIDTH, seed=3)
NOISE = draw(1, 3, 8, 8, seed=4)
WEIGHTS = draw(1, 3, 8, 8, seed=5)


def metric(images: torch.Tensor) -> torch.Tensor:
    """A smooth score of every pixel (a thresholded one would hide small differences)."""
    return (images.double() * WEIGHTS).mean((1, 2, 3))


def every_coalition(n: int) -> torch.Tensor:
    return torch.tensor(list(itertools.product([False, True], repeat=n)))


def run(model: DiffusionModel, states: torch.Tensor, **options) -> torch.Tensor:
    """The metric of one generation from the shared noise."""
    images = model.generate(states, steps=STEPS, noise=NOISE, **options).images
    return metric(images)


# -- text tokens ----------------------------------------------------------------------------


PLAYERS = [1, [2, 3], -1]  # a position, a group, a position counted from the end
COLUMNS = [[1], [2, 3], [4]]


@pytest.mark.parametrize("baseline", ["negative", "zero", "tensor"])
def test_text_token_values_equal_generations_from_masked_states(tiny: DiffusionModel,
                                                                 baseline: str) -> None:
    given = {"negative": "negative", "zero": "zero", "tensor": CORRUPT[0, 0]}[baseline]
    replacement = {"negative": NEGATIVE, "zero": torch.zeros_like(PROMPT),
                   "tensor": CORRUPT[:, :1].expand(1, TOKENS, WIDTH)}[baseline]
    game = TextTokenGame(tiny, PROMPT, metric=metric, players=PLAYERS, baseline=given,
                         steps=STEPS, noise=NOISE, negative_prompt=NEGATIVE, batch_size=1,
                         progress=False)
    assert game.n_players == 3 and game.players == ("1", "2,3", "4")
    assert game.columns == COLUMNS
    coalitions = every_coalition(3)
    values = game(coalitions)
    assert game.evaluations == 8
    for coalition, value in zip(coalitions, values):
        states = PROMPT.clone()  # position 0 belongs to no player: always the prompt's
        for player, columns in enumerate(COLUMNS):
            if not coalition[player]:
                states[:, columns] = replacement[:, columns]
        expected = run(tiny, states)
        torch.testing.assert_close(value, expected[0], rtol=0, atol=0)
    assert values.unique().numel() == 8  # every player moves the metric


def test_batched_evaluation_equals_one_at_a_time(tiny: DiffusionModel) -> None:
    coalitions = every_coalition(3)[[5, 0, 7, 2, 7, 3, 6]]  # repeats, any order
    one = TextTokenGame(tiny, PROMPT, metric=metric, players=PLAYERS, steps=STEPS, noise=NOISE,
                        negative_prompt=NEGATIVE, batch_size=1, progress=False)
    single = one(coalitions)
    for batch_size in (3, 7):
        game = TextTokenGame(tiny, PROMPT, metric=metric, players=PLAYERS, steps=STEPS,
                             noise=NOISE, negative_prompt=NEGATIVE, batch_size=batch_size,
                             progress=False)
        torch.testing.assert_close(game(coalitions), single, rtol=0, atol=ATOL)
        assert game.evaluations == 7
    # The batch size of the call overrides the game's.
    torch.testing.assert_close(one(coalitions, batch_size=4), single, rtol=0, atol=ATOL)


def test_guidance_masks_only_the_conditional_half(tiny: DiffusionModel) -> None:
    game = TextTokenGame(tiny, PROMPT, metric=metric, players=PLAYERS, baseline="zero",
                         steps=STEPS, noise=NOISE, guidance_scale=3.0, negative_prompt=NEGATIVE,
                         progress=False)
    coalitions = torch.tensor([[True, False, True], [False, False, False], [True, True, True]])
    seen: list[torch.Tensor] = []

    def note(_module, _args, kwargs):
        seen.append(kwargs["encoder_hidden_states"].clone())

    handle = tiny._module.register_forward_pre_hook(note, with_kwargs=True)
    try:
        values = game(coalitions)
    finally:
        handle.remove()
    masked = game.masked_states(coalitions)
    assert len(seen) == STEPS
    for states in seen:  # unconditional rows first: the negative prompt, never masked
        assert torch.equal(states[:3], NEGATIVE.expand(3, -1, -1))
        assert torch.equal(states[3:], masked)
    assert torch.equal(masked[1, 1:], torch.zeros(TOKENS - 1, WIDTH, dtype=torch.float64))
    for row, coalition in enumerate(coalitions):
        expected = run(tiny, game.masked_states(coalition[None]), guidance_scale=3.0,
                       negative_prompt=NEGATIVE)
        torch.testing.assert_close(values[row], expected[0], rtol=0, atol=ATOL)


def test_subtract_empty_and_the_out_of_memory_fallback(tiny: DiffusionModel,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    options = {"metric": metric, "players": PLAYERS, "steps": STEPS, "noise": NOISE,
               "negative_prompt": NEGATIVE, "progress": False}
    plain = TextTokenGame(tiny, PROMPT, **options)
    shifted = TextTokenGame(tiny, PROMPT, subtract_empty=True, **options)
    coalitions = every_coalition(3)
    values = plain(coalitions)
    torch.testing.assert_close(shifted(coalitions), values - values[0], rtol=0, atol=ATOL)
    assert shifted.evaluations == 8  # the empty coalition's own run is not counted

    # A batch larger than 2 rows runs out of memory: the game halves it and finishes.
    game = TextTokenGame(tiny, PROMPT, batch_size=8, **options)
    generate = game._generate

    def small_only(rows: torch.Tensor):
        if rows.shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return generate(rows)

    monkeypatch.setattr(game, "_generate", small_only)
    torch.testing.assert_close(game(coalitions), values, rtol=0, atol=ATOL)
    assert game.batch_size == 2 and game.evaluations == 8


# -- spatial regions ------------------------------------------------------------------------


SITE = Site("block", layer=0)  # the first down block's output, a 4 x 4 grid in the tiny U-Net
REGIONS = [(0, 2, 0, 4), (2, 4, 0, 1), (3, 4, 2, 4)]  # positions (2, 1), (2, 2)... in none
AT_STEPS = (0, 2)


def positions(boxes: list[tuple[int, int, int, int]], width: int = 4) -> tuple[int, ...]:
    return tuple(sorted(h * width + w for h0, h1, w0, w1 in boxes
                        for h in range(h0, h1) for w in range(w0, w1)))


@pytest.mark.parametrize("ablation", ["zero", "mean", "corrupt"])
def test_region_values_equal_hand_written_edits(tiny: DiffusionModel, ablation: str) -> None:
    corrupt = CORRUPT if ablation == "corrupt" else None
    game = RegionGame(tiny, PROMPT, metric=metric, site="block.0", regions=REGIONS,
                      ablation=ablation, corrupt=corrupt, at_steps=AT_STEPS, steps=STEPS,
                      noise=NOISE, batch_size=8, progress=False)
    assert game.site == SITE and game.grid == (4, 4) and game.at_steps == AT_STEPS
    assert game.players == ("h0:2 w0:4", "h2:4 w0:1", "h3:4 w2:4")
    source = {"zero": None, "mean": PROMPT, "corrupt": CORRUPT}[ablation]
    cache = None if source is None else tiny.generate(
        source, steps=STEPS, noise=NOISE, cache=[SITE], cache_steps=AT_STEPS).cache
    coalitions = every_coalition(3)
    values = game(coalitions)
    for coalition, value in zip(coalitions, values):
        where = positions([box for box, keep in zip(REGIONS, coalition) if not keep])
        edits = {}
        if where:
            site = SITE.at(pos=where)
            for step in AT_STEPS:
                if ablation == "zero":
                    edits[step] = [Zero(site)]
                elif ablation == "mean":
                    edits[step] = [Set(site, cache[step][SITE].mean(1, keepdim=True))]
                else:
                    edits[step] = [Set(site, cache[step][SITE][:, list(where)])]
        expected = run(tiny, PROMPT, edits=edits)
        torch.testing.assert_close(value, expected[0], rtol=0, atol=ATOL)
    assert values.unique().numel() == 8
    # One coalition per generation gives the same values.
    single = RegionGame(tiny, PROMPT, metric=metric, site=SITE, regions=REGIONS,
                        ablation=ablation, corrupt=corrupt, at_steps=AT_STEPS, steps=STEPS,
                        noise=NOISE, batch_size=1, progress=False)
    torch.testing.assert_close(single(coalitions), values, rtol=0, atol=ATOL)


@pytest.mark.parametrize("edit_rows", ["both", "cond", "uncond"])
def test_guided_regions_reach_the_chosen_half(tiny: DiffusionModel, edit_rows: str) -> None:
    guided = {"guidance_scale": 3.0, "negative_prompt": NEGATIVE}
    game = RegionGame(tiny, PROMPT, metric=metric, site=SITE, regions=REGIONS, steps=STEPS,
                      noise=NOISE, edit_rows=edit_rows, progress=False, **guided)
    coalitions = torch.tensor([[True, False, True], [False, False, False]])
    values = game(coalitions)
    for coalition, value in zip(coalitions, values):
        where = positions([box for box, keep in zip(REGIONS, coalition) if not keep])
        expected = run(tiny, PROMPT, edits=[Zero(SITE.at(pos=where))], edit_rows=edit_rows,
                       **guided)
        torch.testing.assert_close(value, expected[0], rtol=0, atol=ATOL)
    if edit_rows == "cond":
        # A corrupted prompt's conditional values, written to the conditional half only.
        game = RegionGame(tiny, PROMPT, metric=metric, site=SITE, regions=REGIONS,
                          ablation="corrupt", corrupt=CORRUPT, at_steps=[1], steps=STEPS,
                          noise=NOISE, edit_rows="cond", progress=False, **guided)
        cache = tiny.generate(CORRUPT, steps=STEPS, noise=NOISE, cache=[SITE], cache_steps=[1],
                              **guided).cache[1][SITE]  # [uncond; cond]
        where = positions(REGIONS[1:])
        edits = {1: [Set(SITE.at(pos=where), cache[1:, list(where)])]}
        expected = run(tiny, PROMPT, edits=edits, edit_rows="cond", **guided)
        got = game(torch.tensor([[True, False, False]]))
        torch.testing.assert_close(got[0], expected[0], rtol=0, atol=ATOL)


def test_the_default_regions_tile_the_grid(tiny: DiffusionModel) -> None:
    game = RegionGame(tiny, PROMPT, metric=metric, site=Site("resnet", layer=0), split=3,
                      steps=1, noise=NOISE, progress=False)  # an 8 x 8 grid in thirds
    assert game.grid == (8, 8) and game.n_players == 9
    assert game.regions[:3] == [(0, 3, 0, 3), (0, 3, 3, 5), (0, 3, 5, 8)]
    cover = torch.zeros(8, 8, dtype=torch.int64)
    for h0, h1, w0, w1 in game.regions:
        cover[h0:h1, w0:w1] += 1
    assert (cover == 1).all()
    # Every region is absent in the empty coalition; none in the full one.
    assert game.absent(torch.zeros(1, 9, dtype=torch.bool)).all()
    assert not game.absent(torch.ones(1, 9, dtype=torch.bool)).any()


# -- the known answer -------------------------------------------------------------------------


@pytest.mark.parametrize(("prompt", "colour", "other"),
                         [("red circle", "red", "blue"), ("blue square", "blue", "red")])
def test_the_colour_word_has_the_largest_shapley_value(toy: DiffusionModel, prompt: str,
                                                       colour: str, other: str) -> None:
    game = TextTokenGame(toy, prompt, metric=ColourShift([colour], [other]), steps=4,
                         progress=False)
    assert game.players == (f"1:{colour}", f"2:{prompt.split()[1]}")  # <bos>, <eos> are special
    table = game.table()
    assert game.evaluations == 4
    phi = shapley_values(moebius_transform(table))
    torch.testing.assert_close(phi.sum(), table[-1] - table[0], rtol=0, atol=1e-12)
    assert int(phi.argmax()) == 0 and phi[0] > 0.1 > abs(float(phi[1]))
    # The interactions package's own exact computer agrees, with the game's labels.
    result = exact(game)
    torch.testing.assert_close(result.values[1:], phi, rtol=0, atol=1e-12)
    assert result.players == game.players


def test_region_shapley_values_are_efficient(toy: DiffusionModel) -> None:
    # The last up block (16 x 16) in quadrants, each taking the blue circle's values: every
    # quadrant holds part of the shape, so each one restores some of the red.
    game = RegionGame(toy, "red circle", metric=ColourShift(["red"], ["blue"]), site="block.4",
                      ablation="corrupt", corrupt="blue circle", steps=4, progress=False)
    table = game.table()
    phi = shapley_values(moebius_transform(table))
    torch.testing.assert_close(phi.sum(), table[-1] - table[0], rtol=0, atol=1e-12)
    assert table[-1] > 0.2 > -0.2 > table[0]
    assert (phi > 0).all()


# -- bad input --------------------------------------------------------------------------------


def test_bad_input_names_what_was_expected(tiny: DiffusionModel) -> None:
    options = {"metric": metric, "steps": 1, "noise": NOISE, "progress": False}
    with pytest.raises(InputError, match="baseline must be one of \\['negative', 'zero'\\]"):
        TextTokenGame(tiny, PROMPT, baseline="mean", **options)
    with pytest.raises(ShapeError, match=f"baseline must have shape \\[{WIDTH}\\]"):
        TextTokenGame(tiny, PROMPT, baseline=torch.zeros(3, WIDTH, dtype=torch.float64),
                      **options)
    with pytest.raises(DTypeError, match="baseline as a tensor must be floating"):
        TextTokenGame(tiny, PROMPT, baseline=torch.zeros(WIDTH, dtype=torch.int64), **options)
    with pytest.raises(InputError, match="loaded without a text encoder"):
        TextTokenGame(tiny, PROMPT, **options)  # "negative" with a text negative prompt
    with pytest.raises(InputError, match="positions must lie in \\[-5, 5\\).*got 7"):
        TextTokenGame(tiny, PROMPT, players=[1, 7], baseline="zero", **options)
    with pytest.raises(InputError, match="must not share positions"):
        TextTokenGame(tiny, PROMPT, players=[1, [1, 2]], baseline="zero", **options)
    with pytest.raises(ShapeError, match="prompt must be one prompt"):
        TextTokenGame(tiny, PROMPT.repeat(2, 1, 1), baseline="zero", **options)
    with pytest.raises(InputError, match="model must be a DiffusionModel"):
        TextTokenGame(torch.nn.Linear(2, 2), PROMPT, **options)
    with pytest.raises(InputError, match="metric must be callable"):
        TextTokenGame(tiny, PROMPT, baseline="zero", **{**options, "metric": "colour"})

    game = TextTokenGame(tiny, PROMPT, baseline="zero", **{**options, "metric": lambda x: x.mean()})
    with pytest.raises(ShapeError, match="metric must map images \\[2, ...\\] to a tensor of "
                                         "shape \\[2\\].*got \\[\\]"):
        game(torch.ones(2, TOKENS, dtype=torch.bool))
    game.metric = lambda x: x.sum((1, 2, 3)) > 0
    with pytest.raises(DTypeError, match="metric must return floating scores"):
        game(torch.ones(1, TOKENS, dtype=torch.bool))
    with pytest.raises(ShapeError, match="coalitions must have shape \\[coalition, 5\\]"):
        game(torch.ones(1, 3, dtype=torch.bool))

    regions = {"site": SITE, **options}
    with pytest.raises(InputError, match="ablation must be one of \\['zero', 'mean', 'corrupt'\\]"):
        RegionGame(tiny, PROMPT, ablation="resample", **regions)
    with pytest.raises(InputError, match="corrupt \\(a prompt\\) goes with ablation='corrupt'"):
        RegionGame(tiny, PROMPT, ablation="corrupt", **regions)
    with pytest.raises(InputError, match="corrupt \\(a prompt\\) goes with ablation='corrupt'"):
        RegionGame(tiny, PROMPT, corrupt=CORRUPT, **regions)
    with pytest.raises(InputError, match="regions\\[1\\] must be a box .* 0 <= h0 < h1 <= 4 .* "
                                         "got \\(2, 5, 0, 1\\)"):
        RegionGame(tiny, PROMPT, regions=[(0, 1, 0, 1), (2, 5, 0, 1)], **regions)
    with pytest.raises(InputError, match="regions\\[0\\] must be a box"):
        RegionGame(tiny, PROMPT, regions=[(1, 1, 0, 1)], **regions)  # empty
    with pytest.raises(InputError, match="regions must not overlap; regions\\[0\\]"):
        RegionGame(tiny, PROMPT, regions=[(0, 2, 0, 2), (1, 3, 1, 3)], **regions)
    with pytest.raises(InputError, match="split must be an int in \\[1, 4\\]"):
        RegionGame(tiny, PROMPT, split=5, **regions)
    with pytest.raises(InputError, match="edit_rows='cond' needs classifier-free guidance"):
        RegionGame(tiny, PROMPT, edit_rows="cond", **regions)
    with pytest.raises(InputError, match="at_steps must hold step indices in \\[-1, 1\\)"):
        RegionGame(tiny, PROMPT, at_steps=[3], **regions)
    with pytest.raises(SiteError, match="site must be a component with spatial positions"):
        RegionGame(tiny, PROMPT, **{**regions, "site": "cross_k.0"})
    with pytest.raises(SiteError, match="whole component at one layer"):
        RegionGame(tiny, PROMPT, **{**regions, "site": SITE.at(pos=3)})
    with pytest.raises(SiteError, match="layer for block.9"):
        RegionGame(tiny, PROMPT, **{**regions, "site": "block.9"})
    with pytest.raises(InputError, match="site must be a Site or a component name"):
        RegionGame(tiny, PROMPT, **{**regions, "site": 3})
