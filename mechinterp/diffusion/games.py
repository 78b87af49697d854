"""Games on a diffusion U-Net: the players are a prompt's text tokens or a site's spatial regions.

A coalition's value is a metric of the image generated with its players present and every
other player masked (text tokens) or ablated (regions), from the same starting noise for every
coalition. Each coalition is one generation row, and a call denoises ``batch_size`` coalitions
at once, so a table of ``2**n`` coalitions costs ``2**n / batch_size`` denoising loops rather
than ``2**n``:

- :class:`TextTokenGame`: absent tokens' encoder hidden states are replaced by a baseline's
  states at the same positions (the negative prompt's, zeros, or given ones). Under
  classifier-free guidance only the conditional half of the U-Net's batch is masked; the
  unconditional half keeps the negative prompt.
- :class:`RegionGame`: absent regions (boxes on one site's feature map) are zeroed, set to the
  site's mean over positions, or set to a corrupted prompt's value there, at chosen steps. One
  edit per forward writes every row's regions at once.

The schedulers that draw noise inside their step (DDPM, ancestral samplers) draw it per batch,
so a coalition's value would depend on which coalitions share its batch; use a deterministic
sampler (DDIM, DPM-Solver) for games.

Examples:
    >>> import mechinterp
    >>> from mechinterp.diffusion.games import RegionGame, TextTokenGame
    >>> from mechinterp.interactions import moebius_transform, shapley_values
    >>> from mechinterp.zoo.train_toy_unet import ColourShift
    >>> model = mechinterp.load("toy-unet")
    >>> redness = ColourShift(["red"], ["blue"])
    >>> game = TextTokenGame(model, "red circle", metric=redness, steps=4, progress=False)
    >>> game.players
    ('1:red', '2:circle')
    >>> table = game.table()  # 4 coalitions, generated together
    >>> phi = shapley_values(moebius_transform(table))  # sums to v(N) - v(empty)
    >>> game.players[int(phi.argmax())], game.evaluations
    ('1:red', 4)
    >>> regions = RegionGame(model, "red circle", metric=redness, site="block.4", steps=4,
    ...                      split=2, progress=False)  # quadrants of the last 16 x 16 block
    >>> regions.players
    ('h0:8 w0:8', 'h0:8 w8:16', 'h8:16 w0:8', 'h8:16 w8:16')
    >>> regions.table().shape
    torch.Size([16])
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

from mechinterp.diffusion.denoise import EDIT_ROWS, Generation, _noise, _states, _step_set, generate
from mechinterp.diffusion.model import DiffusionModel
from mechinterp.errors import DTypeError, InputError, ShapeError, SiteError
from mechinterp.interactions.games import BatchedGame
from mechinterp.interactions.model_games import position_players
from mechinterp.interventions import TensorEdit
from mechinterp.scores import checked_scores
from mechinterp.sites import Site

__all__ = ["ABLATIONS", "BASELINES", "SPATIAL_COMPONENTS", "DiffusionGame", "RegionGame",
           "TextTokenGame"]

Metric = Callable[[torch.Tensor], torch.Tensor]
Prompt = str | torch.Tensor
Box = tuple[int, int, int, int]

BASELINES = ("negative", "zero")
ABLATIONS = ("zero", "mean", "corrupt")
#: Components whose positions are the feature map's spatial locations (axis 1 of the tensor).
#: ``cross_k``/``cross_v`` index text tokens and patterns put heads first, so they are not here.
SPATIAL_COMPONENTS = ("embed", "resid_pre", "resid_post", "attn_out", "mlp_out", "head", "q",
                      "k", "v", "neuron", "resnet", "block", "cross_attn", "cross_head",
                      "cross_q")


# -- inputs --------------------------------------------------------------------------------------


def _checked_model(model: object) -> DiffusionModel:
    if not isinstance(model, DiffusionModel):
        msg = (f"model must be a DiffusionModel from mechinterp.load (a diffusion U-Net); got "
               f"{type(model).__name__}")
        raise InputError(msg)
    if model.scheduler is None:
        msg = "model was loaded without a scheduler; games generate images and need one"
        raise InputError(msg)
    return model


def _one_prompt(model: DiffusionModel, prompt: object, name: str) -> torch.Tensor:
    """Encoder hidden states ``[1, tokens, width]`` of one prompt (text or states)."""
    if not isinstance(prompt, (str, torch.Tensor)):
        msg = (f"{name} must be one prompt (a string) or its encoder hidden states "
               f"[1, tokens, width]; got {type(prompt).__name__}")
        raise InputError(msg)
    states = _states(model, [prompt] if isinstance(prompt, str) else prompt, name)
    if states.shape[0] != 1:
        msg = f"{name} must be one prompt; got encoder hidden states of {states.shape[0]} rows"
        raise ShapeError(msg)
    return states


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        msg = f"{name} must be a positive int; got {value!r}"
        raise InputError(msg)
    return value


def _default_batch_size(model: DiffusionModel, guided: bool) -> int:
    """Coalitions per generation: a quarter of the free memory on GPUs, 1 GiB on the CPU.

    A row's live activations are dominated by the top-resolution blocks; a few tens of copies
    of the first block's feature map is a rough bound (out-of-memory halves the batch anyway).
    """
    channels = model.config.block_out_channels[0]
    _, height, width = model.sample_shape
    per_row = 32 * channels * height * width * next(model._module.parameters()).element_size()
    per_row *= 2 if guided else 1
    if model.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(model.device)
        return int(max(1, min(256, 0.25 * free // per_row)))
    return int(max(1, min(64, 2**30 // per_row)))


def parse_site(site: object) -> Site:
    """A :class:`~mechinterp.sites.Site`, or its string form (``"block.1"``), as a site."""
    return site if isinstance(site, Site) else Site.parse(site)


# -- the shared machinery ---------------------------------------------------------------------


class DiffusionGame(BatchedGame):
    """A game whose value is a metric of images generated one coalition per row.

    Subclasses resolve their players in :meth:`_setup` and generate a batch of coalitions in
    :meth:`_generate`; this class fixes the starting noise and the negative prompt, scores the
    finished images, subtracts ``v(empty)`` if asked, halves the batch on CUDA out-of-memory
    and shows progress.

    Args:
        model: a :class:`~mechinterp.diffusion.DiffusionModel` with a scheduler.
        prompt: one prompt, or its encoder hidden states ``[1, tokens, width]``.
        metric: finished images ``[rows, 3, height, width]`` in [0, 1] (the final sample for a
            latent model without a VAE) -> ``[rows]`` floating scores.
        steps, seed, noise, guidance_scale, negative_prompt: the generation's, as in
            ``model.generate``; ``noise`` is one row ``[1, channels, height, width]``, shared by
            every coalition.
        subtract_empty: report ``v(S) - v(empty)``.
        batch_size: coalitions per generation (default: sized to the device's memory).
        progress: show a progress bar when a call takes more than one generation.

    The empty coalition's generation that ``subtract_empty`` subtracts is not counted in
    ``evaluations``.

    Attributes:
        model: the model.
        states: ``[1, tokens, width]`` the prompt's encoder hidden states.
        noise: ``[1, channels, height, width]`` the starting noise.
    """

    def __init__(self, model: DiffusionModel, prompt: Prompt, *, metric: Metric, steps: int,
                 seed: int, noise: torch.Tensor | None, guidance_scale: float | None,
                 negative_prompt: Prompt, subtract_empty: bool, batch_size: int | None,
                 progress: bool) -> None:
        self.model = _checked_model(model)
        if not callable(metric):
            msg = f"metric must be callable (images [rows, 3, H, W] -> [rows]); got {metric!r}"
            raise InputError(msg)
        self.metric = metric
        self.steps = _positive_int(steps, "steps")
        self.seed = seed
        self.guidance_scale = guidance_scale
        self.prompt = prompt
        self.states = _one_prompt(self.model, prompt, "prompt")
        self.noise = _noise(self.model, noise, 1, seed)
        self._negative_arg = negative_prompt
        self._negative: torch.Tensor | None = None
        labels = self._setup()
        if batch_size is None:
            batch_size = _default_batch_size(self.model, guidance_scale is not None)
        super().__init__(len(labels), players=labels, batch_size=batch_size,
                         device=self.model.device)
        self._start_batching(progress=progress, subtract_empty=subtract_empty)
        self._refresh_offset()

    # -- for subclasses -------------------------------------------------------------------

    def _setup(self) -> list[str]:
        """Resolve the players against the model and the prompt; return their labels."""
        raise NotImplementedError

    def _generate(self, coalitions: torch.Tensor) -> Generation:
        """One generation with one row per coalition."""
        raise NotImplementedError

    @property
    def negative_states(self) -> torch.Tensor:
        """``[1, tokens, width]`` the negative prompt's encoder hidden states (encoded once)."""
        if self._negative is None:
            self._negative = _one_prompt(self.model, self._negative_arg, "negative_prompt")
        return self._negative

    def _run(self, states: torch.Tensor, edits: object = ()) -> Generation:
        """Generate ``states`` (one row per coalition) from the shared noise."""
        rows = states.shape[0]
        negative = self.negative_states if self.guidance_scale is not None else ""
        return generate(self.model, states, steps=self.steps, seed=self.seed,
                        noise=self.noise.expand(rows, -1, -1, -1),
                        guidance_scale=self.guidance_scale, negative_prompt=negative,
                        edits=edits)

    # -- evaluation -----------------------------------------------------------------------

    def _score(self, generation: Generation, rows: int) -> torch.Tensor:
        images = generation.images if generation.images is not None else generation.sample
        return checked_scores(self.metric(images), rows, name="metric",
                              given=f"images [{rows}, ...]", each="coalition", floating=True)

    def _batch_values(self, coalitions: torch.Tensor) -> torch.Tensor:
        return self._score(self._generate(coalitions), coalitions.shape[0])

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(n_players={self.n_players}, steps={self.steps}, "
                f"guided={self.guidance_scale is not None})")


# -- text tokens --------------------------------------------------------------------------------


class TextTokenGame(DiffusionGame):
    """A game whose players are the prompt's text tokens (or groups of token positions).

    A coalition generates from the prompt's encoder hidden states with its players' positions
    as they are and every other player's positions replaced by the baseline's states there.
    Positions that belong to no player keep the prompt's states. Note that a causal text
    encoder (CLIP) writes each token's context into later positions, padding included: masking
    a word's position then leaves what later positions carry of it (group them with it to mask
    those too).

    Args:
        model: a :class:`~mechinterp.diffusion.DiffusionModel` with a scheduler.
        prompt: one prompt, or its encoder hidden states ``[1, tokens, width]``.
        metric: finished images ``[rows, 3, height, width]`` -> ``[rows]`` scores.
        players: None for every position whose token is not a special token of the tokenizer
            (every position when the prompt is given as states), or a list whose items are
            positions or groups (lists) of positions, negative counting from the end; groups
            are masked together. Players must not overlap.
        baseline: ``"negative"`` (the negative prompt's states at the same positions),
            ``"zero"``, or a tensor ``[width]``, ``[tokens, width]`` or ``[1, tokens, width]``.
        steps, seed, noise, guidance_scale, negative_prompt: the generation's, as in
            ``model.generate``; every coalition starts from the same noise. Under guidance
            only the conditional half is masked.
        batch_size: coalitions per generation (default: sized to the device's memory).
        progress: show a progress bar when a call takes more than one generation.
        subtract_empty: report ``v(S) - v(empty)``.

    Attributes:
        columns: per player, its token positions.
        baseline: ``[1, tokens, width]`` the states absent positions take.
    """

    def __init__(self, model: DiffusionModel, prompt: Prompt, *, metric: Metric,
                 players: Sequence[int | Sequence[int]] | None = None,
                 baseline: str | torch.Tensor = "negative", steps: int = 50, seed: int = 0,
                 noise: torch.Tensor | None = None, guidance_scale: float | None = None,
                 negative_prompt: Prompt = "", batch_size: int | None = None,
                 progress: bool = True, subtract_empty: bool = False) -> None:
        if not isinstance(baseline, torch.Tensor) and baseline not in BASELINES:
            msg = (f"baseline must be one of {list(BASELINES)} or a tensor of encoder hidden "
                   f"states; got {baseline!r}")
            raise InputError(msg)
        self._players_arg, self._baseline_arg = players, baseline
        super().__init__(model, prompt, metric=metric, steps=steps, seed=seed, noise=noise,
                         guidance_scale=guidance_scale, negative_prompt=negative_prompt,
                         subtract_empty=subtract_empty, batch_size=batch_size,
                         progress=progress)

    def _setup(self) -> list[str]:
        length = self.states.shape[1]
        ids = self.model.token_ids(self.prompt)[0].tolist() if isinstance(self.prompt, str) else None
        special = set(getattr(self.model.tokenizer, "all_special_ids", None) or [])
        default = [[c] for c in range(length) if ids is None or ids[c] not in special]
        self.columns = position_players(self._players_arg, length, default)
        if not self.columns:
            msg = "players must name at least one position; every token of the prompt is special"
            raise InputError(msg)
        owner = torch.full((length,), -1, dtype=torch.int64)
        for index, columns in enumerate(self.columns):
            owner[columns] = index
        # Column -> its player; columns of no player are always present.
        self._owner = owner.clamp(min=0).to(self.model.device)
        self._fixed = (owner < 0)[None].to(self.model.device)
        self.baseline = self._baseline_states()
        return [self._label(columns, ids) for columns in self.columns]

    def _label(self, columns: list[int], ids: list[int] | None) -> str:
        where = ",".join(str(c) for c in columns)
        tokenizer = self.model.tokenizer
        if ids is None or tokenizer is None:
            return where
        return f"{where}:" + " ".join(tokenizer.decode([ids[c]]).strip() for c in columns)

    def _baseline_states(self) -> torch.Tensor:
        """``[1, tokens, width]`` states of absent positions, from the ``baseline`` argument."""
        given, states = self._baseline_arg, self.states
        if isinstance(given, torch.Tensor):
            _, length, width = states.shape
            if not given.is_floating_point():
                msg = f"baseline as a tensor must be floating; got {given.dtype}"
                raise DTypeError(msg)
            if tuple(given.shape) not in ((width,), (length, width), (1, length, width)):
                msg = (f"baseline must have shape [{width}], [{length}, {width}] or [1, {length}, "
                       f"{width}] (width, or one row per prompt position); got {list(given.shape)}")
                raise ShapeError(msg)
            return given.detach().to(states.device, states.dtype).expand_as(states)
        if given == "zero":
            return torch.zeros_like(states)
        negative = self.negative_states
        if negative.shape != states.shape:
            msg = (f"baseline='negative' replaces positions by the negative prompt's: "
                   f"negative_prompt must encode to the prompt's shape {list(states.shape)}; got "
                   f"{list(negative.shape)}")
            raise ShapeError(msg)
        return negative

    def masked_states(self, coalitions: torch.Tensor) -> torch.Tensor:
        """``[rows, tokens, width]`` the prompt's states with each row's absent players masked.

        Args:
            coalitions: ``[rows, player]`` bool.
        """
        coalitions = coalitions.to(self.model.device)
        present = coalitions[:, self._owner] | self._fixed  # [rows, tokens]
        return torch.where(present[..., None], self.states, self.baseline)

    def _generate(self, coalitions: torch.Tensor) -> Generation:
        # The unconditional half of a guided batch is the negative prompt's (unet_states).
        return self._run(self.masked_states(coalitions))


# -- spatial regions ----------------------------------------------------------------------------


class _RegionEdit(TensorEdit):
    """Absent regions of every row of one forward written at once.

    ``absent`` is ``[halves, rows, positions]`` bool (one half without guidance, else the
    unconditional then the conditional rows); ``source`` is None (zero) or the value per half,
    ``[halves, 1, positions or 1, *features]``.
    """

    def __init__(self, site: Site, absent: torch.Tensor, source: torch.Tensor | None):
        super().__init__(site)
        self.absent, self.source = absent, source

    def write(self, tensor: torch.Tensor, current: torch.Tensor | None) -> None:
        halves = self.absent.shape[0]
        view = tensor.unflatten(0, (halves, -1))  # a view: the write reaches the model
        mask = self.absent.view(*self.absent.shape, *([1] * (view.dim() - 3)))
        if self.source is None:
            view.masked_fill_(mask, 0)
        else:
            view.copy_(torch.where(mask, self.source.to(view.dtype), view))


def _grid_split(grid: tuple[int, int], split: object) -> list[Box]:
    """``split x split`` boxes tiling the grid, row-major, as even as integers allow."""
    height, width = grid
    if isinstance(split, bool) or not isinstance(split, int) or not 1 <= split <= min(grid):
        msg = (f"split must be an int in [1, {min(grid)}] (regions per side of the site's "
               f"{height} x {width} grid); got {split!r}")
        raise InputError(msg)
    rows = [round(i * height / split) for i in range(split + 1)]
    cols = [round(i * width / split) for i in range(split + 1)]
    return [(rows[i], rows[i + 1], cols[j], cols[j + 1])
            for i in range(split) for j in range(split)]


def _checked_regions(regions: object, grid: tuple[int, int]) -> list[Box]:
    height, width = grid
    if isinstance(regions, (str, bytes)) or not isinstance(regions, Sequence) or not regions:
        msg = (f"regions must be a non-empty list of boxes (h0, h1, w0, w1) on the site's "
               f"{height} x {width} grid; got {regions!r}")
        raise InputError(msg)
    out = []
    for index, box in enumerate(regions):
        valid = (isinstance(box, Sequence) and len(box) == 4
                 and all(isinstance(v, int) and not isinstance(v, bool) for v in box))
        if not valid or not (0 <= box[0] < box[1] <= height and 0 <= box[2] < box[3] <= width):
            msg = (f"regions[{index}] must be a box (h0, h1, w0, w1) of ints with 0 <= h0 < h1 <= "
                   f"{height} and 0 <= w0 < w1 <= {width} (the site's grid, ends exclusive); got "
                   f"{box!r}")
            raise InputError(msg)
        out.append(tuple(box))
    return out


class RegionGame(DiffusionGame):
    """A game whose players are spatial regions of one U-Net site's feature map.

    A coalition generates the prompt with its regions as they are and every other region's
    positions at ``site`` ablated at each of ``at_steps``: set to zero, to the site's mean over
    every position (per channel, from the prompt's own unablated generation at that step), or
    to their value in the generation of a corrupted prompt from the same noise. Positions of
    no region are never ablated. One edit per U-Net forward writes every coalition's regions.

    Args:
        model: a :class:`~mechinterp.diffusion.DiffusionModel` with a scheduler.
        prompt: one prompt, or its encoder hidden states ``[1, tokens, width]``.
        metric: finished images ``[rows, 3, height, width]`` -> ``[rows]`` scores.
        site: a whole component at one layer whose positions are spatial (one of
            :data:`SPATIAL_COMPONENTS`): a :class:`~mechinterp.sites.Site` or its string,
            ``"block.1"``.
        regions: boxes ``(h0, h1, w0, w1)`` on the site's grid (``model.grid``), ends
            exclusive, that must not overlap; default: a ``split x split`` tiling of the grid.
        split: regions per side of the default tiling.
        ablation: ``"zero"``, ``"mean"`` or ``"corrupt"``.
        corrupt: for ``"corrupt"``, one prompt (or its states) whose generation gives the
            values; its site values are cached at ``at_steps``.
        at_steps: step indices at which absent regions are ablated (0 is the noisiest,
            negative counting from the end); default every step.
        edit_rows: under guidance, the half of the U-Net's batch that is ablated: ``"both"``,
            ``"cond"`` or ``"uncond"``.
        steps, seed, noise, guidance_scale, negative_prompt: the generation's, as in
            ``model.generate``; every coalition starts from the same noise.
        batch_size: coalitions per generation (default: sized to the device's memory).
        progress: show a progress bar when a call takes more than one generation.
        subtract_empty: report ``v(S) - v(empty)``.

    Attributes:
        site: the ablated site.
        grid: ``(height, width)`` of its feature map.
        regions: the players' boxes.
        at_steps: the steps at which absent regions are ablated.
    """

    def __init__(self, model: DiffusionModel, prompt: Prompt, *, metric: Metric,
                 site: Site | str, regions: Sequence[Box] | None = None, split: int = 2,
                 ablation: str = "zero", corrupt: Prompt | None = None,
                 at_steps: Iterable[int] | None = None, edit_rows: str = "both",
                 steps: int = 50, seed: int = 0, noise: torch.Tensor | None = None,
                 guidance_scale: float | None = None, negative_prompt: Prompt = "",
                 batch_size: int | None = None, progress: bool = True,
                 subtract_empty: bool = False) -> None:
        if ablation not in ABLATIONS:
            msg = f"ablation must be one of {list(ABLATIONS)}; got {ablation!r}"
            raise InputError(msg)
        if (ablation == "corrupt") != (corrupt is not None):
            msg = (f"corrupt (a prompt) goes with ablation='corrupt' and only with it; got "
                   f"ablation={ablation!r} and corrupt={'None' if corrupt is None else 'a prompt'}")
            raise InputError(msg)
        if edit_rows not in EDIT_ROWS:
            msg = f"edit_rows must be one of {list(EDIT_ROWS)}; got {edit_rows!r}"
            raise InputError(msg)
        if edit_rows != "both" and guidance_scale is None:
            msg = f"edit_rows={edit_rows!r} needs classifier-free guidance (guidance_scale)"
            raise InputError(msg)
        self.ablation, self.edit_rows = ablation, edit_rows
        self._site_arg, self._regions_arg, self._split = site, regions, split
        self._corrupt_arg, self._at_steps_arg = corrupt, at_steps
        super().__init__(model, prompt, metric=metric, steps=steps, seed=seed, noise=noise,
                         guidance_scale=guidance_scale, negative_prompt=negative_prompt,
                         subtract_empty=subtract_empty, batch_size=batch_size,
                         progress=progress)

    def _setup(self) -> list[str]:
        model = self.model
        site = parse_site(self._site_arg)
        if site.component not in SPATIAL_COMPONENTS:
            msg = (f"site must be a component with spatial positions, one of "
                   f"{list(SPATIAL_COMPONENTS)}; got {site}")
            raise SiteError(msg)
        if any(getattr(site, axis) is not None for axis in ("pos", "head", "neuron")):
            msg = f"site must name a whole component at one layer (regions pick the positions); got {site}"
            raise SiteError(msg)
        self.site = model.sites([site])[0]
        self.grid = model.grid(site.component, site.layer, tuple(self.noise.shape[-2:]))
        boxes = (_grid_split(self.grid, self._split) if self._regions_arg is None
                 else _checked_regions(self._regions_arg, self.grid))
        owner = torch.full(self.grid, -1, dtype=torch.int64)
        for index, (h0, h1, w0, w1) in enumerate(boxes):
            taken = owner[h0:h1, w0:w1]
            if (taken >= 0).any():
                other = int(taken[taken >= 0][0])
                msg = (f"regions must not overlap; regions[{other}] {boxes[other]} and "
                       f"regions[{index}] {boxes[index]} share positions")
                raise InputError(msg)
            taken[...] = index
        self.regions = boxes
        owner = owner.flatten()  # positions are row-major, h * width + w
        self._owner = owner.clamp(min=0).to(model.device)
        self._covered = (owner >= 0)[None].to(model.device)
        self.at_steps = tuple(sorted(_step_set(self._at_steps_arg, self.steps, "at_steps")))
        self._sources = self._ablation_sources()
        return [f"h{h0}:{h1} w{w0}:{w1}" for h0, h1, w0, w1 in boxes]

    def _ablation_sources(self) -> dict[int, torch.Tensor | None]:
        """Step -> the value absent positions take, ``[halves, 1, positions or 1, ...]``."""
        if self.ablation == "zero":
            return dict.fromkeys(self.at_steps)
        states = self.states if self.ablation == "mean" else _one_prompt(
            self.model, self._corrupt_arg, "corrupt")
        negative = self.negative_states if self.guidance_scale is not None else ""
        with torch.no_grad():
            source = generate(self.model, states, steps=self.steps, seed=self.seed,
                              noise=self.noise, guidance_scale=self.guidance_scale,
                              negative_prompt=negative, cache=[self.site],
                              cache_steps=self.at_steps)
        out = {}
        for step in self.at_steps:
            value = source.cache[step][self.site]  # [halves, positions, ...], a row per half
            if self.ablation == "mean":
                value = value.mean(1, keepdim=True)
            out[step] = value[:, None]
        return out

    def absent(self, coalitions: torch.Tensor) -> torch.Tensor:
        """``[rows, positions]`` bool: the positions each coalition ablates.

        Args:
            coalitions: ``[rows, player]`` bool.
        """
        coalitions = coalitions.to(self.model.device)
        return ~coalitions[:, self._owner] & self._covered

    def _generate(self, coalitions: torch.Tensor) -> Generation:
        absent = self.absent(coalitions)
        if self.guidance_scale is not None:
            # The U-Net's rows: unconditional, then conditional; the other half is untouched.
            untouched = torch.zeros_like(absent)
            halves = {"both": (absent, absent), "cond": (untouched, absent),
                      "uncond": (absent, untouched)}[self.edit_rows]
            absent = torch.stack(halves)
        else:
            absent = absent[None]
        edits = {step: [_RegionEdit(self.site, absent, self._sources[step])]
                 for step in self.at_steps}
        return self._run(self.states.expand(coalitions.shape[0], -1, -1), edits)
