"""Model games held to a golden reference: one plain forward per coalition, with the masking or
the ablation written out by hand (explicit input embeddings, deleted tokens, forward hooks)."""

from __future__ import annotations

import families
import pytest
import torch

import mechinterp
from mechinterp import Site, select
from mechinterp.errors import InputError, ShapeError, SiteError
from mechinterp.interactions import exact_interactions
from mechinterp.interactions.model_games import BaselineLearning, ComponentGame, TokenGame

FAMILIES = [f for f in families.FAMILIES if f.name in ("gpt2", "llama")]
ATOL = 2e-5  # float32 forwards in different batch shapes agree to rounding


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny forwards run on one thread (see conftest's ``one_thread``)."""


@pytest.fixture(scope="module", params=FAMILIES, ids=lambda f: f.name)
def loaded(request):
    family = request.param
    hf = families.build(family)
    return family, hf, mechinterp.load(hf)


@pytest.fixture(scope="module")
def gpt2():
    hf = families.build(FAMILIES[0])
    return hf, mechinterp.load(hf)


PROMPT = families.token_ids(1, 6, seed=3)


def every_coalition(n: int) -> torch.Tensor:
    """``[2**n, n]`` bool, row ``mask`` holds the players whose bits are set."""
    return (torch.arange(1 << n)[:, None] >> torch.arange(n)) & 1 == 1


def some_coalitions(n: int, rows: int = 12, seed: int = 0) -> torch.Tensor:
    """The empty and full coalitions and ``rows`` random ones."""
    g = torch.Generator().manual_seed(seed)
    random = torch.rand(rows, n, generator=g) < 0.5
    return torch.cat([torch.zeros(1, n, dtype=torch.bool), torch.ones(1, n, dtype=torch.bool), random])


def log_odds(z: torch.Tensor, target: int) -> float:
    z = z.double()
    others = z.clone()
    others[target] = float("-inf")
    return float(z[target] - torch.logsumexp(others, 0))


@torch.no_grad()
def last_logits(hf, **inputs) -> torch.Tensor:
    return hf(**inputs).logits[0, -1]


# -- token games ---------------------------------------------------------------------------------


@torch.no_grad()
def reference_baseline(hf, ids, columns, coalition, baseline) -> torch.Tensor:
    """Absent players' token embeddings replaced by ``baseline``, position embeddings untouched."""
    embeds = hf.get_input_embeddings()(ids).clone()
    for player, present in enumerate(coalition.tolist()):
        if not present:
            embeds[0, columns[player]] = baseline
    return last_logits(hf, inputs_embeds=embeds)


@torch.no_grad()
def reference_deleted(hf, ids, columns, coalition) -> torch.Tensor:
    """Absent players' tokens deleted from the prompt."""
    dropped = {c for player, present in enumerate(coalition.tolist()) if not present
               for c in columns[player]}
    kept = [c for c in range(ids.shape[1]) if c not in dropped]
    return last_logits(hf, input_ids=ids[:, kept])


def test_token_game_baseline_matches_reference(loaded):
    _, hf, model = loaded
    game = TokenGame(model, PROMPT, progress=False)
    assert game.n_players == PROMPT.shape[1]  # no tokenizer: every position is a player
    clean = last_logits(hf, input_ids=PROMPT)
    assert game.target == int(clean.argmax())
    mean = hf.get_input_embeddings().weight.mean(0)
    coalitions = some_coalitions(game.n_players)
    ours = game(coalitions)
    theirs = [log_odds(reference_baseline(hf, PROMPT, game.columns, c, mean), game.target)
              for c in coalitions]
    torch.testing.assert_close(ours, torch.tensor(theirs, dtype=torch.float64), rtol=0, atol=ATOL)
    # The full coalition is the unmasked run; the empty one masks every player.
    assert game.full_value == pytest.approx(log_odds(clean, game.target), abs=ATOL)
    assert game.empty_value == pytest.approx(theirs[0], abs=ATOL)


def test_token_game_groups_and_token_baseline(gpt2):
    hf, model = gpt2
    players = [0, [1, 2], -1]
    game = TokenGame(model, PROMPT, players=players, baseline=7, target=5, progress=False)
    assert game.columns == [[0], [1, 2], [5]] and game.target == 5
    baseline = hf.get_input_embeddings().weight[7]
    coalitions = every_coalition(3)
    theirs = [log_odds(reference_baseline(hf, PROMPT, game.columns, c, baseline), 5)
              for c in coalitions]
    torch.testing.assert_close(game(coalitions), torch.tensor(theirs, dtype=torch.float64),
                               rtol=0, atol=ATOL)


def test_token_game_attention_is_deletion(loaded):
    _, hf, model = loaded
    players = [1, 2, [3, 4], 0]  # the scored (last) position cannot be removed
    game = TokenGame(model, PROMPT, players=players, masking="attention", progress=False)
    coalitions = every_coalition(game.n_players)
    theirs = [log_odds(reference_deleted(hf, PROMPT, game.columns, c), game.target)
              for c in coalitions]
    torch.testing.assert_close(game(coalitions), torch.tensor(theirs, dtype=torch.float64),
                               rtol=0, atol=ATOL)


def test_batching_and_counting(gpt2):
    _, model = gpt2
    game = TokenGame(model, PROMPT, batch_size=64, progress=False)
    coalitions = some_coalitions(game.n_players, rows=20, seed=4)
    large = game(coalitions)
    assert game.evaluations == coalitions.shape[0]
    one = game(coalitions, batch_size=1)
    assert game.evaluations == 2 * coalitions.shape[0]
    torch.testing.assert_close(one, large, rtol=0, atol=ATOL)
    game.evaluations = 0
    table = game.table()
    assert game.evaluations == 1 << game.n_players
    torch.testing.assert_close(table[-1], large[1], rtol=0, atol=ATOL)  # the full coalition
    torch.testing.assert_close(table[0], large[0], rtol=0, atol=ATOL)  # the empty one


def test_shapley_efficiency_of_token_game(gpt2):
    _, model = gpt2
    game = TokenGame(model, PROMPT, progress=False)
    table = game.table()
    shapley = exact_interactions(table, index="SV", order=1)[1:]
    assert shapley.shape == (game.n_players,)
    assert float(shapley.sum()) == pytest.approx(float(table[-1] - table[0]), abs=1e-9)


def test_subtract_empty_and_progress(gpt2):
    _, model = gpt2
    plain = TokenGame(model, PROMPT, progress=False)
    shifted = TokenGame(model, PROMPT, subtract_empty=True, batch_size=8, progress=True)
    table, raw = shifted.table(), plain.table()  # progress bar over 8 forwards
    assert float(table[0]) == pytest.approx(0.0, abs=ATOL)
    torch.testing.assert_close(table, raw - raw[0], rtol=0, atol=ATOL)


def test_outputs_logit_diff_logprob_and_callable(gpt2):
    hf, model = gpt2
    coalitions = some_coalitions(PROMPT.shape[1], rows=4)
    mean = hf.get_input_embeddings().weight.mean(0)

    diff = TokenGame(model, PROMPT, output="logit-diff", target=(3, 9), position=-2,
                     progress=False)
    callable_game = TokenGame(model, PROMPT, output=lambda z: z[:, 4] * 2, progress=False)
    continuation = [11, 12, 13]
    logprob = TokenGame(model, PROMPT, output="logprob", target=continuation, progress=False)
    full = torch.cat([PROMPT, torch.tensor([continuation])], dim=1)
    expect_diff, expect_callable, expect_logprob = [], [], []
    for c in coalitions:
        embeds = hf.get_input_embeddings()(full).clone()
        for player, present in enumerate(c.tolist()):
            if not present:
                embeds[0, player] = mean
        with torch.no_grad():
            logits = hf(inputs_embeds=embeds).logits[0]
        t = PROMPT.shape[1]
        short = reference_baseline(hf, PROMPT, diff.columns, c, mean)
        expect_callable.append(float(short[4] * 2))
        with torch.no_grad():
            at_second_last = hf(inputs_embeds=embeds[:, :t]).logits[0, -2]
        expect_diff.append(float(at_second_last[3] - at_second_last[9]))
        log_probs = torch.log_softmax(logits[t - 1:-1].double(), -1)
        expect_logprob.append(float(log_probs[torch.arange(3), torch.tensor(continuation)].sum()))
    for game, expected in ((diff, expect_diff), (callable_game, expect_callable),
                           (logprob, expect_logprob)):
        torch.testing.assert_close(game(coalitions), torch.tensor(expected, dtype=torch.float64),
                                   rtol=0, atol=5 * ATOL)


def test_learned_baseline_sparsifies_and_stays_in_its_box(gpt2):
    hf, model = gpt2
    learning = BaselineLearning(steps=4, lr=0.5, radius=0.5)
    game = TokenGame(model, PROMPT, players=[1, 2, 3, 4], masking="learned", learning=learning,
                     progress=False)
    losses = game.learning_losses
    assert len(losses) == learning.steps + 1
    assert losses[-1] < losses[0]
    assert game.learning_evaluations == 16 * (2 * learning.steps + 1) and game.evaluations == 0
    weight = hf.get_input_embeddings().weight.detach()
    half_width = learning.radius * weight.std(0)
    assert bool(((game.baseline - weight.mean(0)).abs() <= half_width * (1 + 1e-5)).all())
    # The game plays with the learned baseline.
    table = game.table()
    dividends_l1 = float(torch.tensor(losses[-1]))
    from mechinterp.interactions import moebius_transform
    assert float(moebius_transform(table)[1:].abs().sum()) == pytest.approx(dividends_l1, rel=1e-6)


# -- component games -----------------------------------------------------------------------------


def head_hook(family, hf, layer, coalition, players, source):
    """A pre-hook on the attention output projection that ablates the absent players' heads."""
    n_heads = hf.config.num_attention_heads

    def hook(_module, args):
        x = args[0].clone()
        heads = x.view(*x.shape[:2], n_heads, -1)
        for player, present in enumerate(coalition.tolist()):
            site = players[player]
            if not present and site.layer == layer:
                value = 0.0 if source is None else source[layer][:, :, site.head]
                heads[:, :, site.head] = value
        return (x,) + args[1:]

    module = hf.get_submodule(family.head_input.format(layer=layer))
    return module.register_forward_pre_hook(hook)


@torch.no_grad()
def reference_heads(family, hf, ids, coalition, players, source=None) -> torch.Tensor:
    handles = [head_hook(family, hf, layer, coalition, players, source) for layer in range(2)]
    try:
        return last_logits(hf, input_ids=ids)
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def head_means(family, hf, reference) -> dict[int, torch.Tensor]:
    """Per layer, the mean over reference rows of the heads ``[1, pos, head, d_head]``."""
    n_heads = hf.config.num_attention_heads
    means, handles = {}, []
    for layer in range(2):
        def keep(_module, args, layer=layer):
            x = args[0]
            means[layer] = x.view(*x.shape[:2], n_heads, -1).mean(0, keepdim=True)
        module = hf.get_submodule(family.head_input.format(layer=layer))
        handles.append(module.register_forward_pre_hook(keep))
    try:
        hf(input_ids=reference)
    finally:
        for handle in handles:
            handle.remove()
    return means


@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_component_game_heads_match_hooks(loaded, ablation):
    family, hf, model = loaded
    reference = families.token_ids(3, PROMPT.shape[1], seed=9) if ablation == "mean" else None
    game = ComponentGame(model, PROMPT, select("head").layers().heads(), ablation=ablation,
                         reference=reference, progress=False)
    assert game.n_players == 8
    source = None if reference is None else head_means(family, hf, reference)
    coalitions = some_coalitions(game.n_players, rows=10, seed=2)
    theirs = [log_odds(reference_heads(family, hf, PROMPT, c, game.sites, source), game.target)
              for c in coalitions]
    assert_game_values(game, coalitions, theirs, hf, PROMPT)


def assert_game_values(game, coalitions, theirs, hf, prompt) -> None:
    """The game's values of ``coalitions`` are the reference's ``theirs``, and its full value
    (nothing edited) is the model's own log-odds on ``prompt``."""
    torch.testing.assert_close(game(coalitions), torch.tensor(theirs, dtype=torch.float64),
                               rtol=0, atol=ATOL)
    assert game.full_value == pytest.approx(log_odds(last_logits(hf, input_ids=prompt),
                                                     game.target), abs=ATOL)


def test_component_game_neurons_and_positions_match_hooks(gpt2):
    hf, model = gpt2
    family = FAMILIES[0]
    players = [Site("neuron", layer=0, neuron=3), Site("neuron", layer=1, neuron=(5, 7)),
               Site("head", layer=1, head=2, pos=-1)]
    game = ComponentGame(model, PROMPT, players, progress=False)
    coalitions = every_coalition(3)

    @torch.no_grad()
    def reference(coalition):
        handles = []
        absent = [players[i] for i, present in enumerate(coalition.tolist()) if not present]

        def neurons(layer):
            def hook(_module, args):
                x = args[0].clone()
                for site in absent:
                    if site.component == "neuron" and site.layer == layer:
                        x[..., list(site.neuron) if isinstance(site.neuron, tuple) else site.neuron] = 0
                return (x,) + args[1:]
            return hook

        for layer in range(2):
            module = hf.get_submodule(family.neuron_input.format(layer=layer))
            handles.append(module.register_forward_pre_hook(neurons(layer)))

        def last_head(_module, args):
            x = args[0].clone()
            if players[2] in absent:
                x.view(*x.shape[:2], 4, -1)[:, -1, 2] = 0
            return (x,) + args[1:]

        module = hf.get_submodule(family.head_input.format(layer=1))
        handles.append(module.register_forward_pre_hook(last_head))
        try:
            return last_logits(hf, input_ids=PROMPT)
        finally:
            for handle in handles:
                handle.remove()

    theirs = [log_odds(reference(c), game.target) for c in coalitions]
    torch.testing.assert_close(game(coalitions), torch.tensor(theirs, dtype=torch.float64),
                               rtol=0, atol=ATOL)
    torch.testing.assert_close(game(coalitions, batch_size=1), game(coalitions), rtol=0, atol=ATOL)


def test_component_game_resample(gpt2):
    hf, model = gpt2
    reference = families.token_ids(1, PROMPT.shape[1], seed=11)
    players = select("head").layers(1).heads()
    game = ComponentGame(model, PROMPT, players, ablation="resample", reference=reference,
                         progress=False)
    # Resampling every head of the last layer is running its heads on the reference prompt.
    source = head_means(FAMILIES[0], hf, reference)
    empty = reference_heads(FAMILIES[0], hf, PROMPT, torch.zeros(4, dtype=torch.bool),
                            game.sites, source)
    assert game.empty_value == pytest.approx(log_odds(empty, game.target), abs=ATOL)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_games_on_cuda_match_cpu():
    from kernels import CUDA_OK

    if not CUDA_OK:
        pytest.skip("needs a CUDA build of mechinterp._C")
    family = FAMILIES[1]
    cpu, gpu = mechinterp.load(families.build(family)), mechinterp.load(families.build(family).cuda())
    reference = families.token_ids(2, PROMPT.shape[1], seed=9)
    makers = [
        lambda m: TokenGame(m, PROMPT, progress=False),
        lambda m: TokenGame(m, PROMPT, players=[0, 1, [2, 3]], masking="attention", progress=False),
        lambda m: ComponentGame(m, PROMPT, select("head").layers().heads(), ablation="mean",
                                reference=reference, progress=False),
        lambda m: ComponentGame(m, PROMPT, select("neuron").layers(1).neurons(range(6)),
                                progress=False),
    ]
    for make in makers:
        torch.testing.assert_close(make(gpu).table(), make(cpu).table(), rtol=0, atol=1e-4)


# -- errors --------------------------------------------------------------------------------------


def test_errors(gpt2):
    _, model = gpt2
    with pytest.raises(InputError, match="players\\[1\\] positions must lie in"):
        TokenGame(model, PROMPT, players=[0, 6], progress=False)
    with pytest.raises(InputError, match="at least one position"):
        TokenGame(model, PROMPT, players=[], progress=False)
    with pytest.raises(InputError, match="must not share positions"):
        TokenGame(model, PROMPT, players=[[0, 1], 1], progress=False)
    with pytest.raises(ShapeError, match="one prompt"):
        TokenGame(model, families.token_ids(2, 6), progress=False)
    with pytest.raises(InputError, match="scored position"):
        TokenGame(model, PROMPT, players=[0, 5], masking="attention", progress=False)
    with pytest.raises(InputError, match="masking must be one of"):
        TokenGame(model, PROMPT, masking="blur", progress=False)
    with pytest.raises(InputError, match="target=\\(answer, wrong\\)"):
        TokenGame(model, PROMPT, output="logit-diff", progress=False)
    with pytest.raises(ShapeError, match="baseline must have shape"):
        TokenGame(model, PROMPT, baseline=torch.zeros(5), progress=False)
    with pytest.raises(ShapeError, match="must map logits"):
        TokenGame(model, PROMPT, output=lambda z: z[:, :2], progress=False)(
            torch.ones(1, 6, dtype=torch.bool))
    with pytest.raises(InputError, match="at most learning.max_players=2"):
        TokenGame(model, PROMPT, masking="learned", learning=BaselineLearning(max_players=2),
                  progress=False)
    with pytest.raises(SiteError, match="head for"):
        ComponentGame(model, PROMPT, [Site("head", layer=0, head=9)], progress=False)
    with pytest.raises(InputError, match="at least one site"):
        ComponentGame(model, PROMPT, [], progress=False)
    with pytest.raises(InputError, match="must not overlap"):
        ComponentGame(model, PROMPT, [Site("head", layer=0, head=1),
                                      Site("head", layer=0, head=1, pos=-1)], progress=False)
    with pytest.raises(InputError, match="needs reference"):
        ComponentGame(model, PROMPT, select("head").layers(0).heads(), ablation="mean",
                      progress=False)
    with pytest.raises(ShapeError, match="one unpadded prompt"):
        ComponentGame(model, PROMPT, select("head").layers(0).heads(), ablation="resample",
                      reference=families.token_ids(2, 6), progress=False)
