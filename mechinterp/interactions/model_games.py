"""Model games: the players are a prompt's tokens or a model's components, the value is an output.

A coalition's present players keep their values and its absent players are masked (tokens) or
ablated (components); the game's value is one number read from the model's logits. Every call
runs many coalitions per forward pass, one coalition per batch row, on the model's device:

- :class:`TokenGame`: absent tokens get a baseline embedding (the mean embedding, a token's, a
  given vector or a learned one) or are removed from the context through the attention mask.
- :class:`ComponentGame`: absent heads, neurons or other sites are zeroed, set to their mean
  over reference prompts, or to their value on a reference prompt; all the coalitions of a
  forward are written with one kernel call per (component, layer).

Outputs (``output=``): ``"log-odds"`` of a target token ``y``, ``z_y - logsumexp_{c != y} z_c``
(default target: the unmasked run's most likely token); ``"logit-diff"`` of ``(answer,
wrong)``; ``"logprob"``, the summed log-probability of a continuation appended to the prompt
(teacher-forced, one pass); or a callable from the logits ``[rows, vocab]`` at the scored
position to ``[rows]``. ``subtract_empty=True`` reports ``v(S) - v(empty)``, as the papers on
Harsanyi interactions normalise it.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mechinterp import _ops
from mechinterp.engine import Plan, check_indices, resolve
from mechinterp.errors import InputError, ShapeError, SiteError, UnsupportedModelError
from mechinterp.interactions.games import BatchedGame
from mechinterp.interventions import TensorEdit
from mechinterp.model import Inputs, InterpModel, Sites, Tokens
from mechinterp.patching.boxes import (
    BoxPatch,
    as_rows,
    component_extent,
    own_token_count,
    site_rects,
)
from mechinterp.patching.metrics import token_id
from mechinterp.positions import RowSpans
from mechinterp.scores import checked_scores
from mechinterp.sites import Site, base_component, token_axis

__all__ = [
    "ABLATIONS",
    "MASKINGS",
    "OUTPUTS",
    "BaselineLearning",
    "ComponentGame",
    "ModelGame",
    "TokenGame",
]

OUTPUTS = ("log-odds", "logit-diff", "logprob")
MASKINGS = ("baseline", "attention", "learned")
ABLATIONS = ("zero", "mean", "resample")

Output = str | Callable[[torch.Tensor], torch.Tensor]
Token = int | str


# -- inputs --------------------------------------------------------------------------------------


def _checked_model(model: object) -> InterpModel:
    if not isinstance(model, InterpModel):
        msg = f"model must be an InterpModel from mechinterp.load; got {type(model).__name__}"
        raise InputError(msg)
    return model


def _one_row(model: InterpModel, inputs: Inputs, name: str) -> Tokens:
    """``inputs`` as one unpadded tokenized row on the model's device."""
    tokens = model._as_tokens(inputs)
    if tokens.shape[0] != 1:
        msg = f"{name} must be one prompt (one row of tokens); got {tokens.shape[0]} rows"
        raise ShapeError(msg)
    if not bool(tokens.attention_mask.all()):
        msg = f"{name} must be unpadded (its attention mask all ones); got {tokens.attention_mask.tolist()}"
        raise ShapeError(msg)
    return tokens


def _continuation_ids(model: InterpModel, continuation: object) -> list[int]:
    """Token ids of a continuation given as text, ids or a 1-D integer tensor."""
    if isinstance(continuation, str):
        if model.tokenizer is None:
            msg = "target (the continuation) is a string but the model has no tokenizer; pass ids"
            raise InputError(msg)
        ids = list(model.tokenizer(continuation, add_special_tokens=False)["input_ids"])
    elif isinstance(continuation, torch.Tensor):
        if continuation.is_floating_point() or continuation.dim() > 1:
            msg = (f"target (the continuation) must be text, token ids or a 1-D integer tensor; "
                   f"got a {continuation.dtype} tensor of shape {tuple(continuation.shape)}")
            raise InputError(msg)
        ids = continuation.reshape(-1).tolist()
    elif isinstance(continuation, Sequence):
        ids = list(continuation)
    else:
        msg = (f"output='logprob' needs target= the continuation (text or token ids); got "
               f"{type(continuation).__name__}")
        raise InputError(msg)
    if not ids:
        msg = f"target (the continuation) must hold at least one token; got {continuation!r}"
        raise InputError(msg)
    return [token_id(model, i, "target (the continuation)") for i in ids]


@functools.cache
def _parameters(forward: Callable) -> frozenset[str]:
    return frozenset(inspect.signature(forward).parameters)


# -- outputs -------------------------------------------------------------------------------------


class _Scorer:
    """Reads a game's value from the logits, and says which logits the forward must compute."""

    def __init__(self, model: InterpModel, prompt: Tokens, output: Output, target: object,
                 position: int):
        length = prompt.shape[1]
        if callable(output) and not isinstance(output, str):
            self.kind, self.fn = "callable", output
            if target is not None:
                msg = f"target must be None with a callable output (it reads what it needs); got {target!r}"
                raise InputError(msg)
        elif isinstance(output, str) and output in OUTPUTS:
            self.kind, self.fn = output, None
        else:
            msg = f"output must be one of {list(OUTPUTS)} or a callable logits -> [rows]; got {output!r}"
            raise InputError(msg)
        keeps = "logits_to_keep" in _parameters(type(model._module).forward)
        self.tokens = prompt
        self.target: int | None = None
        self.answer = self.wrong = 0
        if self.kind == "logprob":
            if not model.table.causal:
                msg = f"output='logprob' needs a causal language model; {model.family} is not one"
                raise InputError(msg)
            ids = _continuation_ids(model, target)
            self.continuation = torch.tensor(ids, device=prompt.input_ids.device)
            full = torch.cat([prompt.input_ids, self.continuation[None]], dim=1)
            self.tokens = Tokens(full, torch.ones_like(full))
            # Logits at positions length - 1 .. end - 2 predict the continuation's tokens.
            self.keep = len(ids) + 1 if keeps else None
            self.column = length - 1
        else:
            if isinstance(position, bool) or not isinstance(position, int):
                msg = f"position must be an int; got {type(position).__name__} {position!r}"
                raise InputError(msg)
            if not -length <= position < length:
                msg = f"position must lie in [{-length}, {length}) for a prompt of {length} tokens; got {position}"
                raise InputError(msg)
            self.column = position % length
            self.keep = 1 if keeps and self.column == length - 1 else None
            if self.kind == "log-odds" and target is not None:
                self.target = token_id(model, target, "target")
            elif self.kind == "logit-diff":
                if not isinstance(target, (tuple, list)) or len(target) != 2:
                    msg = f"output='logit-diff' needs target=(answer, wrong), two tokens; got {target!r}"
                    raise InputError(msg)
                self.answer = token_id(model, target[0], "target (answer)")
                self.wrong = token_id(model, target[1], "target (wrong)")
        self.extra = {"logits_to_keep": self.keep} if self.keep else {}

    @property
    def needs_target(self) -> bool:
        return self.kind == "log-odds" and self.target is None

    def scored(self, logits: torch.Tensor) -> torch.Tensor:
        """``[rows, vocab]`` logits at the scored position."""
        return logits[:, -1] if self.keep else logits[:, self.column]

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """``[rows]`` values from the forward's logits ``[rows, kept positions, vocab]``."""
        rows = logits.shape[0]
        if self.kind == "logprob":
            k = self.continuation.shape[0]
            predicting = logits[:, -(k + 1):-1] if self.keep else logits[:, self.column:self.column + k]
            log_probs = torch.log_softmax(predicting.float(), dim=-1)
            picked = log_probs.gather(-1, self.continuation.expand(rows, k)[..., None])
            return picked[..., 0].sum(1)
        z = self.scored(logits)
        if self.kind == "callable":
            return checked_scores(self.fn(z), rows, name="output (a callable)",
                                  given=f"logits [{rows}, vocab]", each="coalition", floating=True)
        z = z.float()
        if self.kind == "logit-diff":
            return z[:, self.answer] - z[:, self.wrong]
        target = self.target
        assert target is not None
        picked = z[:, target].clone()
        if torch.is_grad_enabled():
            z = z.clone()
        # The logits are this forward's own, so the target's column is masked in place: a
        # [rows, vocab] copy less, which matters at thousands of rows of a 50k vocabulary.
        z[:, target] = float("-inf")
        return picked - torch.logsumexp(z, dim=1)


# -- the shared machinery -------------------------------------------------------------------------


def _default_batch_size(model: InterpModel, seq_len: int, kept: int) -> int:
    """Rows per forward: about a quarter of the free memory on GPUs, 1 GiB on the CPU."""
    d = model.dims
    itemsize = next(model._module.parameters()).element_size()
    # Live activations of one row in one block (attention scores included), and its logits
    # with a float32 copy for the output.
    per_row = seq_len * (8 * d.d_model + 2 * d.d_mlp + 3 * d.n_heads * seq_len) * itemsize
    per_row += kept * d.d_vocab * (itemsize + 4)
    device = model.device
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(max(1, min(4096, 0.25 * free // per_row)))
    return int(max(1, min(512, 2**30 // per_row)))


class ModelGame(BatchedGame):
    """A game whose value function runs a model on many coalitions per forward pass.

    Subclasses set up their players in :meth:`_setup` and run a batch of coalitions in
    :meth:`_logits`; this class reads the output, subtracts ``v(empty)`` if asked, batches to a
    memory budget (halving the batch on out-of-memory) and shows progress.

    Args:
        model: a model from :func:`mechinterp.load`.
        prompt: one prompt (text, token ids or :class:`~mechinterp.model.Tokens` of one row).
        output: ``"log-odds"``, ``"logit-diff"``, ``"logprob"`` or a callable.
        target: what the output scores: the token of ``"log-odds"`` (default: the most likely
            token of the unmasked run), ``(answer, wrong)`` for ``"logit-diff"``, the
            continuation (text or token ids) for ``"logprob"``; None for a callable.
        position: the prompt position whose logits are scored (counted like ``Site.pos``);
            ``"logprob"`` scores the continuation instead.
        subtract_empty: report ``v(S) - v(empty)``.
        batch_size: coalitions per forward (default: sized to the device's memory).
        progress: show a progress bar when a call takes more than one forward.

    The unmasked run that finds the default target, and the empty coalition's run that
    ``subtract_empty`` subtracts, are not counted in ``evaluations``.

    Attributes:
        model: the model.
        tokens: the row every coalition runs on: the prompt, with the continuation of
            ``"logprob"`` appended.
        target: the scored token of ``"log-odds"`` (resolved), else None.
    """

    def __init__(self, model: InterpModel, prompt: Inputs, *, output: Output = "log-odds",
                 target: object = None, position: int = -1, subtract_empty: bool = False,
                 batch_size: int | None = None, progress: bool = True) -> None:
        self.model = _checked_model(model)
        self.prompt = _one_row(self.model, prompt, "prompt")
        self._scorer = _Scorer(self.model, self.prompt, output, target, position)
        self.tokens = self._scorer.tokens
        labels = self._setup()
        if not labels:
            msg = "players must name at least one player; got none"
            raise InputError(msg)
        seq_len = self.tokens.shape[1]
        if batch_size is None:
            batch_size = _default_batch_size(self.model, seq_len, self._scorer.keep or seq_len)
        super().__init__(len(labels), players=labels, batch_size=batch_size,
                         device=self.model.device)
        self._start_batching(progress=progress, subtract_empty=subtract_empty)
        if self._scorer.needs_target:
            with torch.no_grad():
                full = torch.ones(1, self.n_players, dtype=torch.bool, device=self.device)
                logits = self._logits(full)
            self._scorer.target = int(self._scorer.scored(logits)[0].argmax())
        self.target = self._scorer.target
        self._refresh_offset()

    # -- for subclasses -------------------------------------------------------------------

    def _setup(self) -> list[str]:
        """Resolve the players against the model and the prompt; return their labels."""
        raise NotImplementedError

    def _logits(self, coalitions: torch.Tensor) -> torch.Tensor:
        """Logits ``[rows, kept positions, vocab]`` of one forward, one row per coalition."""
        raise NotImplementedError

    def _forward(self, tokens: Tokens, edits: Sequence[TensorEdit]) -> torch.Tensor:
        model = self.model
        plan = Plan(model.table, model.base, tokens.attention_mask, [], edits, model._resolved)
        output, _ = model._forward(tokens, plan, extra_inputs=self._scorer.extra)
        logits = getattr(output, "logits", None)
        if logits is None:
            model.table.place("logits")  # raises, naming why the model has no head
        return logits

    # -- evaluation -----------------------------------------------------------------------

    def _batch_values(self, coalitions: torch.Tensor) -> torch.Tensor:
        return self._scorer(self._logits(coalitions))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(n_players={self.n_players}, output={self._scorer.kind!r}, "
                f"tokens={self.tokens.shape[1]})")


# -- token games -------------------------------------------------------------------------------


@dataclass(frozen=True)
class BaselineLearning:
    """How :class:`TokenGame` learns baseline embeddings (``masking="learned"``).

    Following Ren et al. (CVPR 2023, "Defining and quantifying the emergence of sparse concepts
    in DNNs"), the baseline embedding of each prompt position is chosen to make the game's
    Harsanyi interactions sparse: it minimises ``sum_{S != empty} |I(S)|`` over every coalition,
    while staying in a box around its starting value so that it keeps meaning "no token"
    rather than becoming a new one. Every step evaluates the ``2**n`` coalitions twice (values,
    then the gradient through them), so it is meant for the small ``n`` at which interactions
    are computed exactly.

    Args:
        steps: optimisation steps (Adam).
        lr: Adam's step size, in units of the box's half-width.
        radius: the box's half-width, in per-dimension standard deviations of the embedding
            matrix's rows.
        max_players: refuse games with more players (each step costs ``2 * 2**n`` rows).
    """

    steps: int = 50
    lr: float = 0.05
    radius: float = 0.5
    max_players: int = 12

    def __post_init__(self) -> None:
        for name in ("steps", "max_players"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                msg = f"{name} must be a positive int; got {value!r}"
                raise InputError(msg)
        for name in ("lr", "radius"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                msg = f"{name} must be a positive number; got {value!r}"
                raise InputError(msg)


class _BaselineEdit(TensorEdit):
    """Token embeddings of absent positions replaced by baseline embeddings, every row at once
    (at ``embed``, or at the input of a multimodal model's language model)."""

    def __init__(self, site: Site, present: torch.Tensor, baseline: torch.Tensor):
        super().__init__(site)
        self.present, self.baseline = present, baseline  # [rows, pos, 1] bool, [pos, d_model]

    def write(self, tensor: torch.Tensor, current: torch.Tensor | None) -> None:
        tensor.copy_(torch.where(self.present, tensor, self.baseline.to(tensor.dtype)))


def position_players(players: object, length: int, default: list[list[int]]) -> list[list[int]]:
    """Players as lists of prompt columns: positions, or groups of positions (disjoint)."""
    if players is None:
        return default
    if isinstance(players, (str, bytes)) or not isinstance(players, Sequence):
        msg = (f"players must be None, a list of positions or a list of groups of positions; got "
               f"{type(players).__name__}")
        raise InputError(msg)
    if not players:
        msg = "players must name at least one position; got an empty list"
        raise InputError(msg)
    out: list[list[int]] = []
    owner: dict[int, int] = {}
    for index, player in enumerate(players):
        group = [player] if isinstance(player, int) else player
        if isinstance(group, (str, bytes)) or not isinstance(group, Sequence) or not group:
            msg = f"players[{index}] must be a position or a non-empty group of positions; got {player!r}"
            raise InputError(msg)
        columns = []
        for position in group:
            if isinstance(position, bool) or not isinstance(position, int):
                msg = f"players[{index}] must hold int positions; got {position!r}"
                raise InputError(msg)
            if not -length <= position < length:
                msg = (f"players[{index}] positions must lie in [{-length}, {length}) for a "
                       f"prompt of {length} tokens; got {position}")
                raise InputError(msg)
            column = position % length
            if column in owner:
                msg = (f"players must not share positions; position {position} is in players"
                       f"[{owner[column]}] and players[{index}]")
                raise InputError(msg)
            owner[column] = index
            columns.append(column)
        out.append(columns)
    return out


class TokenGame(ModelGame):
    """A game whose players are a prompt's tokens (or groups of tokens).

    A coalition runs the prompt with its players' tokens as they are and every other player's
    tokens masked. ``masking="baseline"`` replaces an absent token's embedding (before position
    embeddings are added) with a baseline embedding (in a multimodal model, the language
    model's input embedding, so that image tokens, whose image features replace their token
    embeddings, are masked too); ``"attention"`` removes absent tokens from
    the context through the attention mask, which in models that take position ids is the same
    as deleting them from the prompt (later tokens move up); ``"learned"`` uses baseline
    embeddings learned to make the interactions sparse (:class:`BaselineLearning`).

    Args:
        model: a model from :func:`mechinterp.load`.
        prompt: one prompt: text, token ids, or one row of :class:`~mechinterp.model.Tokens`.
        players: None for every token that is not a special token of the tokenizer (``<bos>``,
            ``[CLS]``...), or a list whose items are positions or groups (lists) of positions,
            counted like ``Site.pos``; groups are masked together. Players must not overlap.
        output: ``"log-odds"``, ``"logit-diff"``, ``"logprob"`` or a callable; see the module.
        target: what the output scores (see :class:`ModelGame`).
        position: the prompt position whose logits are scored (default: the last one).
        masking: ``"baseline"``, ``"attention"`` or ``"learned"``.
        baseline: for ``"baseline"`` and as the starting point of ``"learned"``: None (the mean
            of the embedding matrix's rows), a token id or single-token string (its embedding),
            or a tensor ``[d_model]`` or ``[prompt positions, d_model]``.
        learning: settings of ``"learned"`` (default :class:`BaselineLearning()`).
        subtract_empty: report ``v(S) - v(empty)``.
        batch_size: coalitions per forward (default: sized to the device's memory).
        progress: show a progress bar when a call takes more than one forward.

    Attributes:
        columns: per player, its prompt columns.
        baseline: ``[positions, d_model]`` baseline embeddings (None under ``"attention"``).
        learning_losses: under ``"learned"``, ``sum |I(S)|`` before each step and after the last.
        learning_evaluations: coalitions the learning ran (not counted in ``evaluations``).

    Examples:
        >>> import mechinterp
        >>> from mechinterp.interactions import moebius_transform, shapley_values
        >>> from mechinterp.interactions.model_games import TokenGame
        >>> model = mechinterp.load("induction-2l")
        >>> game = TokenGame(model, "kete vetu fuba mabi kete vetu", progress=False)
        >>> game.n_players, game.players[:3], model.tokenizer.decode([game.target])
        (6, ('1:kete', '2:vetu', '3:fuba'), 'fuba')
        >>> table = game.table()  # all 64 coalitions, in one forward
        >>> game.evaluations
        64
        >>> phi = shapley_values(moebius_transform(table))  # they sum to v(N) - v(empty)
        >>> bool(abs(phi.sum() - (table[-1] - table[0])) < 1e-9)
        True
    """

    def __init__(self, model: InterpModel, prompt: Inputs, *,
                 players: Sequence[int | Sequence[int]] | None = None,
                 output: Output = "log-odds", target: object = None, position: int = -1,
                 masking: str = "baseline", baseline: Token | torch.Tensor | None = None,
                 learning: BaselineLearning | None = None, subtract_empty: bool = False,
                 batch_size: int | None = None, progress: bool = True) -> None:
        if masking not in MASKINGS:
            msg = f"masking must be one of {list(MASKINGS)}; got {masking!r}"
            raise InputError(msg)
        if learning is not None and not isinstance(learning, BaselineLearning):
            msg = f"learning must be a BaselineLearning or None; got {type(learning).__name__}"
            raise InputError(msg)
        if masking == "attention" and baseline is not None:
            msg = "baseline must be None with masking='attention' (absent tokens are removed)"
            raise InputError(msg)
        self.masking = masking
        self._players_arg, self._baseline_arg = players, baseline
        self.learning = learning if learning is not None else BaselineLearning()
        self.learning_losses: list[float] = []
        self.learning_evaluations = 0
        super().__init__(model, prompt, output=output, target=target, position=position,
                         subtract_empty=subtract_empty, batch_size=batch_size, progress=progress)
        if masking == "learned":
            self._learn_baseline()
            self._refresh_offset()

    def _setup(self) -> list[str]:
        model = self.model
        ids = self.prompt.input_ids[0].tolist()
        length = len(ids)
        tokenizer = model.tokenizer
        special = set(getattr(tokenizer, "all_special_ids", None) or [])
        default = [[c] for c in range(length) if ids[c] not in special]
        self.columns = position_players(self._players_arg, length, default)
        if not self.columns:
            msg = "players must name at least one position; every token of the prompt is special"
            raise InputError(msg)
        if self.masking == "attention":
            scored = self._scorer.column
            for index, columns in enumerate(self.columns):
                if scored in columns:
                    msg = (f"players[{index}] holds the scored position {scored}; with masking="
                           f"'attention' the scored token cannot be removed (use masking='baseline'"
                           f" or another position)")
                    raise InputError(msg)
        # Column -> its player, or -1 for columns that are always present.
        owner = torch.full((self.tokens.shape[1],), -1, dtype=torch.int64)
        for index, columns in enumerate(self.columns):
            owner[columns] = index
        self._owner = owner.to(model.device)
        self._fixed = (self._owner < 0)[None]
        self.baseline = None if self.masking == "attention" else self._initial_baseline()
        self._site, self._input_shift = Site("embed"), None
        if self.baseline is not None and "projector" in model.table.places:
            # Image features replace the image tokens' embeddings after ``embed``: write the
            # language model's input instead, so that image tokens can be masked too.
            self._site = Site("resid_pre", layer=0)
            self._input_shift = self._added_to_inputs()
        return [self._label(columns, ids) for columns in self.columns]

    def _added_to_inputs(self) -> torch.Tensor:
        """``[positions, d_model]``: what the language model adds to its input embeddings
        before its first layer (learned position embeddings; zero with rotary ones), so that a
        baseline embedding written at ``resid_pre.0`` is masked as it would be at the input."""
        model, site = self.model, Site("resid_pre", layer=0)
        seen: dict[str, torch.Tensor] = {}

        def keep(_module, _args, kwargs):
            seen["embeds"] = kwargs.get("inputs_embeds")

        handle = model._language_model().register_forward_pre_hook(keep, with_kwargs=True)
        try:
            with torch.no_grad():
                state = model.cache(self.tokens, [site])[site]
        finally:
            handle.remove()
        embeds = seen.get("embeds")
        if embeds is None or embeds.shape != state.shape:
            msg = (f"masking={self.masking!r} on this {model.family} model needs its language "
                   f"model's input embeddings as wide as its residual stream; got "
                   f"{None if embeds is None else tuple(embeds.shape)} and {tuple(state.shape)}; "
                   f"use masking='attention' or a ComponentGame at resid_pre")
            raise UnsupportedModelError(msg)
        return (state - embeds)[0]

    def _label(self, columns: list[int], ids: list[int]) -> str:
        tokenizer = self.model.tokenizer
        where = ",".join(str(c) for c in columns)
        if tokenizer is None:
            return where
        text = " ".join(tokenizer.decode([ids[c]]).strip() for c in columns)
        return f"{where}:{text}"

    def _embeddings(self) -> torch.Tensor:
        return self.model._module.get_input_embeddings().weight

    def _initial_baseline(self) -> torch.Tensor:
        """``[positions, d_model]`` baseline embeddings from the ``baseline`` argument."""
        weight = self._embeddings().detach()
        given = self._baseline_arg
        length, width = self.prompt.shape[1], weight.shape[1]
        if given is None:
            vector = weight.mean(0)
        elif isinstance(given, torch.Tensor) and given.is_floating_point():
            if given.shape not in ((width,), (length, width)):
                msg = (f"baseline must have shape [{width}] or [{length}, {width}] (d_model, or "
                       f"one row per prompt position); got {list(given.shape)}")
                raise ShapeError(msg)
            vector = given.detach().to(weight.device, weight.dtype)
        else:
            vector = weight[token_id(self.model, given, "baseline")]
        rows = vector.expand(length, width)
        total = self.tokens.shape[1]
        if total > length:  # the continuation of "logprob" is never masked
            rows = torch.cat([rows, weight[self.tokens.input_ids[0, length:]]])
        return rows.clone()

    def _present(self, coalitions: torch.Tensor) -> torch.Tensor:
        """``[rows, positions]`` bool: which columns each coalition keeps."""
        return coalitions[:, self._owner.clamp(min=0)] | self._fixed

    def _logits(self, coalitions: torch.Tensor, baseline: torch.Tensor | None = None
                ) -> torch.Tensor:
        rows = coalitions.shape[0]
        present = self._present(coalitions.to(self.model.device))
        tokens = self.tokens.repeat(rows)  # other inputs (an image) ride along
        if self.masking == "attention":
            return self._forward(Tokens(tokens.input_ids, present.long(), tokens.extras), [])
        rows = self.baseline if baseline is None else baseline
        edit = _BaselineEdit(self._site, present[..., None],
                             rows if self._input_shift is None else rows + self._input_shift)
        return self._forward(tokens, [edit])

    # -- learned baselines ----------------------------------------------------------------

    def _learn_baseline(self) -> None:
        """Adam on the baseline, kept in its box, minimising ``sum_{S != empty} |I(S)|``."""
        settings = self.learning
        n = self.n_players
        if n > settings.max_players:
            msg = (f"masking='learned' evaluates all 2**n coalitions twice per step; n_players must "
                   f"be at most learning.max_players={settings.max_players}, got {n}")
            raise InputError(msg)
        weight = self._embeddings().detach()
        start = self.baseline.detach().to(torch.float32)
        half_width = settings.radius * weight.float().std(0)  # [d_model]
        # Only masked positions have a baseline that matters; the continuation's rows stay.
        movable = torch.zeros(start.shape[0], 1, device=start.device)
        movable[: self.prompt.shape[1]] = 1.0
        offset = torch.zeros_like(start, requires_grad=True)  # in units of the half-width
        optimiser = torch.optim.Adam([offset], lr=settings.lr)
        bits = 1 << torch.arange(n, dtype=torch.int64)
        coalitions = ((torch.arange(1 << n, dtype=torch.int64)[:, None] & bits) != 0)
        chunk = max(1, self.batch_size // max(1, self.model.dims.n_layers))

        def baseline_of(delta: torch.Tensor) -> torch.Tensor:
            return (start + movable * half_width * delta).to(weight.dtype)

        for step in range(settings.steps + 1):
            with torch.no_grad():
                values = self._values_with(coalitions, baseline_of(offset), self.batch_size)
            dividends = _ops.moebius_(values.clone(), kind="moebius")
            self.learning_losses.append(float(dividends[1:].abs().sum()))
            if step == settings.steps:
                break
            # d/dv sum_{S != empty} |m(S)| = M^T sign(m): the transposed Moebius transform.
            signs = torch.sign(dividends)
            signs[0] = 0.0
            weights = _ops.moebius_(signs, kind="moebius_adjoint").to(self.model.device)
            optimiser.zero_grad()
            grad = torch.zeros_like(offset)
            for begin in range(0, 1 << n, chunk):
                block = coalitions[begin:begin + chunk]
                with torch.enable_grad():
                    out = self._scorer(self._logits(block.to(self.model.device),
                                                    baseline_of(offset)))
                    surrogate = (out.double() * weights[begin:begin + chunk]).sum()
                    grad += torch.autograd.grad(surrogate, offset)[0]
                self.learning_evaluations += block.shape[0]
            offset.grad = grad
            optimiser.step()
            with torch.no_grad():
                offset.clamp_(-1.0, 1.0)
        self.baseline = baseline_of(offset).detach()

    def _values_with(self, coalitions: torch.Tensor, baseline: torch.Tensor, step: int
                     ) -> torch.Tensor:
        """``[rows]`` float64 raw values on the CPU under ``baseline`` (learning only)."""
        out = torch.empty(coalitions.shape[0], dtype=torch.float64)
        for begin in range(0, coalitions.shape[0], step):
            block = coalitions[begin:begin + step].to(self.model.device)
            values = self._scorer(self._logits(block, baseline))
            out[begin:begin + block.shape[0]] = values.double().cpu()
            self.learning_evaluations += block.shape[0]
        return out


# -- component games ---------------------------------------------------------------------------


class _Group:
    """One (component, layer) tensor that some players write: its geometry and ablation source."""

    def __init__(self, component: str, layer: int, extent: tuple[int, int]):
        self.component, self.layer, self.extent = component, layer, extent
        self.site = Site(component, layer=None if layer < 0 else layer)
        self.source: torch.Tensor | None = None  # [1, a, f]


class ComponentGame(ModelGame):
    """A game whose players are model components: attention heads, neurons, or other sites.

    A coalition runs the prompt with its players as they are and every other player ablated:
    set to zero, to its mean over ``reference`` prompts, or to its value on a ``reference``
    prompt (resampling). Each player is a :class:`~mechinterp.sites.Site` (a head, a neuron,
    an MLP output at some positions...), and players must not overlap. All the coalitions of a
    forward are written with one kernel call per (component, layer).

    Args:
        model: a model from :func:`mechinterp.load`.
        prompt: one prompt: text, token ids, or one row of :class:`~mechinterp.model.Tokens`.
        players: a list of sites or a selector such as ``select("head").layers().heads()``.
            Positions count in the row the game runs (the prompt, with the continuation of
            ``"logprob"`` appended); a tower's sites (``vision.*``) and ``projector`` count
            their own tokens (image patches, or one projector row per image token).
        ablation: ``"zero"``, ``"mean"`` or ``"resample"``.
        reference: for ``"mean"``, prompts whose activations are averaged (per position when
            they are unpadded and as long as the game's row, else over every real token); for
            ``"resample"``, one prompt as long as the game's row.
        output: ``"log-odds"``, ``"logit-diff"``, ``"logprob"`` or a callable; see the module.
        target: what the output scores (see :class:`ModelGame`).
        position: the prompt position whose logits are scored (default: the last one).
        subtract_empty: report ``v(S) - v(empty)``.
        batch_size: coalitions per forward (default: sized to the device's memory).
        progress: show a progress bar when a call takes more than one forward.

    Attributes:
        sites: the players' sites.

    Examples:
        >>> import mechinterp
        >>> from mechinterp import select
        >>> from mechinterp.interactions.model_games import ComponentGame
        >>> model = mechinterp.load("induction-2l")
        >>> game = ComponentGame(model, "kete vetu fuba mabi kete vetu",
        ...                      select("head").layers().heads(), progress=False)
        >>> game.n_players, game.players[:2]
        (8, ('head.0[head=0]', 'head.0[head=1]'))
        >>> values = game.table()  # 256 head ablations, zeroed in one kernel call per layer
        >>> values.shape, game.evaluations
        (torch.Size([256]), 256)
    """

    def __init__(self, model: InterpModel, prompt: Inputs, players: Sites, *,
                 ablation: str = "zero", reference: Inputs | None = None,
                 output: Output = "log-odds", target: object = None, position: int = -1,
                 subtract_empty: bool = False, batch_size: int | None = None,
                 progress: bool = True) -> None:
        if ablation not in ABLATIONS:
            msg = f"ablation must be one of {list(ABLATIONS)}; got {ablation!r}"
            raise InputError(msg)
        if ablation == "zero" and reference is not None:
            msg = "reference must be None with ablation='zero'"
            raise InputError(msg)
        if ablation != "zero" and reference is None:
            msg = f"ablation={ablation!r} needs reference= prompts to take values from; got None"
            raise InputError(msg)
        self.ablation = ablation
        self._players_arg, self._reference_arg = players, reference
        self._own_counts: dict[str, int] = {}  # tokens of each tower (or the projector) it uses
        super().__init__(model, prompt, output=output, target=target, position=position,
                         subtract_empty=subtract_empty, batch_size=batch_size, progress=progress)

    def _setup(self) -> list[str]:
        model = self.model
        seq_len = self.tokens.shape[1]
        try:
            sites = model.sites(self._players_arg, n_positions=seq_len)
        except TypeError:
            msg = (f"players must be a list of Site objects or a selector; got "
                   f"{type(self._players_arg).__name__}")
            raise InputError(msg) from None
        if not sites:
            msg = "players must name at least one site; got none"
            raise InputError(msg)
        self.sites = sites
        prompt_spans = RowSpans.from_mask(self.tokens.attention_mask.cpu())
        groups: dict[tuple[str, int], int] = {}
        self._groups: list[_Group] = []
        rects: list[list[tuple[int, int, int, int, int]]] = []
        for site in sites:
            if site.component == "logits":
                msg = f"players: 'logits' is the output and cannot be ablated; got {site}"
                raise SiteError(msg)
            dims = model.table.dims_for(site.component)  # a tower's components have its sizes
            key = (site.component, -1 if site.layer is None else site.layer % dims.n_layers)
            if key not in groups:
                resolve(site, model.table, model.base)  # the component and layer, once per group
                groups[key] = len(self._groups)
                self._groups.append(_Group(*key, self._extent(site.component)))
            else:
                check_indices(site, model.table)
            group = self._groups[groups[key]]
            heads = dims.n_kv_heads if base_component(site.component) in ("k", "v") else dims.n_heads
            # Towers and the projector count positions over their own tokens, never padded.
            spans = prompt_spans if token_axis(site.component) is None else \
                RowSpans.from_mask(torch.ones(1, group.extent[0], dtype=torch.bool))
            found = site_rects(site, spans, 1, group.extent, heads)[0]
            rects.append([(groups[key], *rect) for rect in found])
        self._check_disjoint(rects)
        counts = np.array([len(r) for r in rects], dtype=np.int64)
        self._rect_count = counts
        self._rect_start = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        flat = np.array([rect for player in rects for rect in player], dtype=np.int64)
        self._rect_group, self._rect_box = flat[:, 0], flat[:, 1:]
        self._sources()
        return [str(site) for site in sites]

    def _extent(self, component: str) -> tuple[int, int]:
        """``(a, f)`` of a component's tensor seen as ``[rows, a, f]``."""
        axis = token_axis(component)
        if axis is None:
            return component_extent(self.model.dims, component, self.tokens.shape[1])
        if axis not in self._own_counts:
            self._own_counts[axis] = own_token_count(self.model, self.tokens, axis)
        return component_extent(self.model.table.dims_for(component), base_component(component),
                                self._own_counts[axis])

    def _check_disjoint(self, rects: list[list[tuple[int, int, int, int, int]]]) -> None:
        """Players must not write the same element: the kernel refuses overlapping boxes."""
        cover: dict[int, np.ndarray] = {}
        for index, player in enumerate(rects):
            for group, a0, a1, f0, f1 in player:
                grid = cover.setdefault(group, np.full(self._groups[group].extent, -1, np.int64))
                taken = grid[a0:a1, f0:f1]
                clash = taken[taken >= 0]
                if clash.size and (clash != index).any():
                    other = int(clash[clash != index][0])
                    msg = (f"players must not overlap; {self.sites[index]} and {self.sites[other]} "
                           f"ablate the same activations")
                    raise InputError(msg)
                taken[...] = index

    def _sources(self) -> None:
        """Each group's ablation values ``[1, a, f]`` on the model's device."""
        model = self.model
        dtype = next(model._module.parameters()).dtype
        if self.ablation == "zero":
            for group in self._groups:
                group.source = torch.zeros(1, *group.extent, dtype=dtype, device=model.device)
            return
        reference = model._as_tokens(self._reference_arg)
        seq_len = self.tokens.shape[1]
        aligned = reference.shape[1] == seq_len and bool(reference.attention_mask.all())
        if self.ablation == "resample" and (reference.shape[0] != 1 or not aligned):
            msg = (f"reference for ablation='resample' must be one unpadded prompt of {seq_len} "
                   f"tokens (the game's row); got shape {reference.shape}")
            raise ShapeError(msg)
        with torch.no_grad():
            cache = model.cache(reference, [group.site for group in self._groups])
        mask = reference.attention_mask.to(model.device, dtype)
        for group in self._groups:
            values = as_rows(cache[group.site])  # [reference rows, a, f]
            if token_axis(group.component) is not None:
                # A tower's or the projector's tokens are the image's, whatever the prompt.
                if values.shape[1:] != group.extent:
                    msg = (f"reference for {group.site} must hold as many of its tokens as the "
                           f"prompt's ({group.extent[0]}); got {values.shape[1]}")
                    raise ShapeError(msg)
                source = values.mean(0, keepdim=True)
            elif aligned:
                source = values.mean(0, keepdim=True)
            elif group.component == "pattern":
                msg = (f"reference for mean-ablating attention patterns must be unpadded prompts "
                       f"of {seq_len} tokens; got shape {reference.shape}")
                raise ShapeError(msg)
            else:
                # Every real token of every row, the same value at every position.
                total = (values * mask[..., None]).sum((0, 1)) / mask.sum()
                source = total.expand(1, group.extent[0], -1)
            group.source = source.to(dtype).contiguous()

    def _boxes(self, coalitions: torch.Tensor) -> dict[int, _ops.StagedBoxes]:
        """Boxes per group writing every absent player of every row, staged in one upload."""
        absent = ~coalitions.cpu().numpy()
        rows, players = np.nonzero(absent)
        counts = self._rect_count[players]
        total = int(counts.sum())
        if total == 0:
            return {}
        within = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
        rect = np.repeat(self._rect_start[players], counts) + within
        group = self._rect_group[rect]
        boxes = np.empty((total, 6), dtype=np.int64)
        boxes[:, 0] = np.repeat(rows, counts)
        boxes[:, 1] = 0  # every row takes the one ablation source
        boxes[:, 2:] = self._rect_box[rect]
        order = np.argsort(group, kind="stable")
        found, sizes = np.unique(group[order], return_counts=True)
        staged = _ops.stage_boxes(torch.from_numpy(boxes[order]), 1.0, self.model.device)
        return dict(zip(found.tolist(), staged.split(sizes.tolist()), strict=True))

    def _logits(self, coalitions: torch.Tensor) -> torch.Tensor:
        rows = coalitions.shape[0]
        edits = [BoxPatch(self._groups[g].site, self._groups[g].source, boxes)
                 for g, boxes in self._boxes(coalitions).items()]
        return self._forward(self.tokens.repeat(rows), edits)
