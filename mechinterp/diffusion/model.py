"""The loaded diffusion model: a U-Net wrapped by nnsight, with its text encoder, tokenizer and
scheduler; one U-Net forward that reads and writes sites, and positions in a layer's feature map.

The denoising loop with edits at chosen steps is :meth:`DiffusionModel.generate`
(``mechinterp.diffusion.denoise``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from nnsight import NNsight
from torch import nn

from mechinterp.engine import Plan, record_execution_order, resolve, run_plan
from mechinterp.errors import InputError, ShapeError, SiteError
from mechinterp.interventions import Intervention, checked_edits
from mechinterp.model import ActivationCache, Sites, expand_sites
from mechinterp.models import SiteTable, site_table
from mechinterp.models.unet import is_unet
from mechinterp.sites import Site

if TYPE_CHECKING:
    from mechinterp.diffusion.denoise import Edits, Generation


@dataclass(frozen=True)
class UNetRun:
    """One U-Net forward: its prediction (noise, for epsilon models) and the sites read."""

    prediction: torch.Tensor
    cache: ActivationCache


class DiffusionModel(NNsight):
    """A diffusers ``UNet2DConditionModel`` wrapped by nnsight, with what generation needs.

    Create it with :func:`mechinterp.load` (``"toy-unet"`` or a pipeline folder) or directly.
    Sites use the U-Net vocabulary of :mod:`mechinterp.models.unet`; inside
    ``model.trace(...)`` everything nnsight offers works on the U-Net as usual.

    Args:
        unet: the U-Net.
        text_encoder: maps token ids to the encoder hidden states the U-Net attends to (its
            ``last_hidden_state``); needed to generate from prompts.
        tokenizer: the text encoder's tokenizer.
        scheduler: a diffusers scheduler; each generation works on a fresh copy.
        vae: decodes latents to images, for latent-space models; without one the U-Net works
            on pixels in [-1, 1].
        tokenize: prompts -> token ids ``[batch, tokens]`` for models whose captions have a
            format of their own (default: the tokenizer, padded to its maximum length as
            diffusers pipelines do).
        name: display name.
    """

    def __init__(self, unet: nn.Module, *, text_encoder: nn.Module | None = None,
                 tokenizer: object | None = None, scheduler: object | None = None,
                 vae: nn.Module | None = None,
                 tokenize: Callable[[list[str]], torch.Tensor] | None = None,
                 name: str | None = None):
        if not is_unet(unet):
            msg = f"unet must be a diffusers UNet2DConditionModel; got {type(unet).__name__}"
            raise InputError(msg)
        super().__init__(unet)
        self.table: SiteTable = site_table(unet)
        # Underscored: nnsight wraps every public module attribute of an Envoy in an Envoy of
        # its own, and these are plain networks the U-Net's trace does not reach.
        self._text_encoder = text_encoder
        self._vae = vae
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self._tokenize = tokenize
        self.name = name or type(unet).__name__
        self._order_index: dict[str, int] | None = None
        self._grids: dict[str, tuple[int, int]] | None = None
        self._modules: dict[str, nn.Module] = {}
        self._resolved: dict = {}
        unet.eval()
        if text_encoder is not None:
            text_encoder.eval()

    # -- description -------------------------------------------------------------------------

    @property
    def text_encoder(self) -> nn.Module | None:
        """The text encoder (a plain module, outside nnsight)."""
        return self._text_encoder

    @property
    def vae(self) -> nn.Module | None:
        """The VAE of a latent model (a plain module, outside nnsight), or None."""
        return self._vae

    @property
    def dims(self):
        """Sizes of the first transformer layer, with ``n_layers`` the number of them."""
        return self.table.dims

    @property
    def family(self) -> str:
        return self.table.family

    @property
    def config(self):
        return self._module.config

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """``(channels, height, width)`` of the samples the U-Net was configured for."""
        size = self.config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return int(self.config.in_channels), int(height), int(width)

    def __repr__(self) -> str:
        n = {c: self.table.dims_for(c).n_layers for c in ("resid_post", "resnet", "block")}
        return (f"DiffusionModel({self.name}, transformer layers={n['resid_post']}, "
                f"resnets={n['resnet']}, blocks={n['block']}, sample={self.sample_shape})")

    def sites(self, selection: Sites, *, n_positions: int | None = None) -> list[Site]:
        """Expand a selector (or pass through sites) with this U-Net's sizes."""
        return expand_sites(self.table, selection, n_positions=n_positions)

    def layer_names(self, component: str) -> list[str]:
        """The module path of each layer of ``component`` (``"down_blocks.1.attentions.0..."``),
        so that layer numbers can be read back as places in the U-Net."""
        units = self.table.units.get(component)
        if units is None:
            self.table.place(component)  # raises for components the U-Net lacks
            msg = f"component {component!r} has no layers (it exists once per U-Net)"
            raise SiteError(msg)
        return list(units.paths)

    # -- spatial positions -------------------------------------------------------------------

    def grid(self, component: str, layer: int | None = None,
             sample_size: tuple[int, int] | None = None) -> tuple[int, int]:
        """``(height, width)`` of the feature map of ``component`` at ``layer`` for samples of
        ``sample_size`` (default: the configured one); positions index it row-major."""
        _, height, width = self.sample_shape
        if self._grids is None:
            self._record_probe()
        resolved = resolve(Site(component, layer=layer), self.table, "")
        units = self.table.units.get(component)
        # Every place of a unit (its attention, its MLP) shares the unit's grid.
        path = resolved.path if units is None else units.paths[resolved.layer]
        grid = self._grids.get(path)
        if grid is None:
            msg = f"component {component!r} has no spatial grid"
            raise SiteError(msg)
        if sample_size is None:
            return grid
        return (grid[0] * sample_size[0] // height, grid[1] * sample_size[1] // width)

    def spatial_positions(self, component: str, layer: int | None, box: tuple[int, int, int, int],
                          *, sample_size: tuple[int, int] | None = None) -> tuple[int, ...]:
        """Positions of ``component``'s feature map at ``layer`` that cover ``box``.

        Args:
            box: ``(top, left, bottom, right)`` in sample pixels, bottom and right exclusive:
                the region of the sample (or image, for pixel-space models) to select.
            sample_size: ``(height, width)`` of the samples (default: the configured size).

        Examples:
            >>> import mechinterp
            >>> model = mechinterp.load("toy-unet")
            >>> model.grid("resid_post", 0), model.spatial_positions("resid_post", 0, (0, 0, 4, 4))
            ((8, 8), (0, 1, 8, 9))
        """
        _, height, width = self.sample_shape if sample_size is None else (0, *sample_size)
        if len(box) != 4 or not all(isinstance(v, int) for v in box):
            msg = f"box must be (top, left, bottom, right) as ints; got {box!r}"
            raise InputError(msg)
        top, left, bottom, right = box
        if not (0 <= top < bottom <= height and 0 <= left < right <= width):
            msg = (f"box must lie within the {height} x {width} sample with top < bottom and "
                   f"left < right; got {box!r}")
            raise InputError(msg)
        rows, cols = self.grid(component, layer, (height, width))
        # A feature-map cell covers height / rows sample pixels; take every cell the box touches.
        first_row, last_row = top * rows // height, -(-bottom * rows // height)
        first_col, last_col = left * cols // width, -(-right * cols // width)
        return tuple(r * cols + c for r in range(first_row, last_row)
                     for c in range(first_col, last_col))

    def _record_probe(self) -> None:
        """Execution order and each unit's feature-map grid, from one forward at batch 1."""
        channels, height, width = self.sample_shape
        device, dtype = self.device, self.dtype
        inputs = {"sample": torch.zeros(1, channels, height, width, device=device, dtype=dtype),
                  "timestep": torch.tensor(0, device=device),
                  "encoder_hidden_states": torch.zeros(1, 1, self._context_width(), device=device,
                                                       dtype=dtype)}
        # Feature maps are read off module outputs; a transformer layer's tokens are its
        # Transformer2DModel's input feature map, flattened.
        maps = {"conv_in"} | {path for component in ("resnet", "block")
                              for path in self.table.units[component].paths}
        layers = {path: path.rsplit(".transformer_blocks.", 1)[0]
                  for path in self.table.units["resid_post"].paths}
        shapes: dict[str, tuple[int, int]] = {}

        def note(path: str, x: torch.Tensor) -> None:
            shapes[path] = (int(x.shape[2]), int(x.shape[3]))

        handles = [self._module.get_submodule(path).register_forward_hook(
            lambda _m, _a, out, path=path: note(path, out[0] if isinstance(out, tuple) else out))
            for path in maps]
        handles += [self._module.get_submodule(parent).register_forward_pre_hook(
            lambda _m, args, parent=parent: note(parent, args[0]))
            for parent in set(layers.values())]
        try:
            order = record_execution_order(self._module, inputs)
        finally:
            for handle in handles:
                handle.remove()
        self._order_index = {path: i for i, path in enumerate(order)}
        self._grids = {**{path: shapes[path] for path in maps},
                       **{path: shapes[parent] for path, parent in layers.items()}}

    def _context_width(self) -> int:
        width = self.config.cross_attention_dim
        return int(width[0] if isinstance(width, (list, tuple)) else width)

    # -- text --------------------------------------------------------------------------------

    def token_ids(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """Token ids ``[batch, tokens]`` of ``prompts`` as the text encoder sees them (padded to
        the tokenizer's maximum length, as diffusers pipelines do)."""
        if self.tokenizer is None and self._tokenize is None:
            msg = ("this model was loaded without a tokenizer; pass encoder hidden states "
                   "[batch, tokens, width] instead of prompts")
            raise InputError(msg)
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts or not all(isinstance(p, str) for p in prompts):
            msg = f"prompts must be a string or a non-empty list of strings; got {prompts!r}"
            raise InputError(msg)
        if self._tokenize is not None:
            try:
                return self._tokenize(list(prompts))
            except ValueError as error:  # the model's own caption check
                raise InputError(str(error)) from None
        return self.tokenizer(list(prompts), padding="max_length", truncation=True,
                              max_length=self.tokenizer.model_max_length,
                              return_tensors="pt")["input_ids"]

    def encode(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """Encoder hidden states ``[batch, tokens, width]`` of ``prompts``."""
        if self.text_encoder is None:
            msg = ("this model was loaded without a text encoder; pass encoder hidden states "
                   "[batch, tokens, width] instead of prompts")
            raise InputError(msg)
        ids = self.token_ids(prompts)
        device = next(self.text_encoder.parameters()).device
        with torch.no_grad():
            states = self.text_encoder(ids.to(device))[0]
        return states.to(self.device, self.dtype)

    # -- generation --------------------------------------------------------------------------

    def generate(self, prompts: str | Sequence[str] | torch.Tensor, *, steps: int = 50,
                 seed: int = 0, noise: torch.Tensor | None = None,
                 guidance_scale: float | None = None,
                 negative_prompt: str | torch.Tensor = "", edits: Edits = (), cache: Sites = (),
                 cache_steps: Iterable[int] | None = None, edit_rows: str = "both",
                 trajectory: bool = False, progress: bool = False,
                 callback: Callable[[int, ActivationCache], None] | None = None) -> Generation:
        """Generate one sample per prompt, with interventions at chosen denoising steps.

        Args:
            prompts: prompts, or encoder hidden states ``[batch, tokens, width]``.
            steps: denoising steps of the scheduler.
            seed: seeds the starting noise (drawn on the CPU, so the same on any device) and
                any noise the scheduler draws.
            noise: the starting noise ``[batch, channels, height, width]`` instead of ``seed``.
            guidance_scale: classifier-free guidance weight; None runs the conditional model
                alone.
            negative_prompt: the unconditional prompt of guidance (or its states).
            edits: interventions at every step (a sequence), or at chosen steps (a mapping from
                step index, 0 being the noisiest, negative counting from the end, to a sequence).
                Their rows are prompt rows.
            cache: sites to read at each of ``cache_steps`` (default: every step).
            edit_rows: with guidance, which half of the U-Net's batch the edits reach:
                ``"both"``, ``"cond"`` or ``"uncond"``.
            trajectory: keep the sample entering each step.
            progress: show a progress bar over the steps.
            callback: receives ``(step, cache)`` after each of ``cache_steps`` instead of the
                result keeping the reads (for reads too large to keep, such as every
                cross-attention pattern of every step).

        Examples:
            >>> import mechinterp
            >>> from mechinterp import Site, Zero
            >>> from mechinterp.zoo.train_toy_unet import classify_colour
            >>> model = mechinterp.load("toy-unet")
            >>> classify_colour(model.generate(["red circle", "blue square"], steps=10).images)
            ['red', 'blue']
            >>> # Without cross-attention at any step, the colour word cannot reach the image.
            >>> muted = {step: [Zero(Site("cross_attn", layer=layer)) for layer in range(4)]
            ...          for step in range(10)}
            >>> out = model.generate(["red circle"], steps=10, edits=muted,
            ...                      cache=[Site("block", layer=2)], cache_steps=[0, -1])
            >>> sorted(out.cache), tuple(out.cache[9][Site("block", layer=2)].shape)
            ([0, 9], (1, 64, 64))
        """
        from mechinterp.diffusion.denoise import generate

        return generate(self, prompts, steps=steps, seed=seed, noise=noise,
                        guidance_scale=guidance_scale, negative_prompt=negative_prompt,
                        edits=edits, cache=cache, cache_steps=cache_steps, edit_rows=edit_rows,
                        trajectory=trajectory, progress=progress, callback=callback)

    # -- one forward -------------------------------------------------------------------------

    def run(self, sample: torch.Tensor, timestep: torch.Tensor | float,
            encoder_hidden_states: torch.Tensor, *, edits: Sequence[Intervention] = (),
            cache: Sites = (), grad: bool = False) -> UNetRun:
        """One U-Net forward with ``edits`` applied and ``cache`` sites read.

        Args:
            sample: ``[batch, channels, height, width]`` noisy sample (scaled as the scheduler's
                ``scale_model_input`` leaves it).
            timestep: the diffusion timestep, a number or one per row.
            encoder_hidden_states: ``[batch, tokens, width]`` text states (:meth:`encode`).
            edits: interventions at U-Net sites, applied in order at each site.
            cache: sites to read; each read sees the value after the edits at its site.
            grad: keep the autograd graph.

        Examples:
            >>> import torch, mechinterp
            >>> from mechinterp import Site, Zero
            >>> model = mechinterp.load("toy-unet")
            >>> states = model.encode(["red circle"])
            >>> out = model.run(torch.randn(1, 3, 16, 16), 500, states,
            ...                 edits=[Zero(Site("cross_attn", layer=0))],
            ...                 cache=[Site("cross_pattern", layer=0)])
            >>> tuple(out.prediction.shape), tuple(out.cache[Site("cross_pattern", layer=0)].shape)
            ((1, 3, 16, 16), (1, 4, 64, 4))
        """
        inputs = self._inputs(sample, timestep, encoder_hidden_states)
        reads = self.sites(cache)
        plan = self._plan(reads, edits)
        with torch.set_grad_enabled(grad):
            output, values = self._forward(inputs, plan)
        return UNetRun(output.sample, ActivationCache(values, reads))

    def _plan(self, reads: Sequence[Site], edits: Sequence[Intervention]) -> Plan:
        return Plan(self.table, "", None, reads, checked_edits(edits), self._resolved)

    def _forward(self, inputs: dict[str, torch.Tensor], plan: Plan):
        if self._order_index is None:
            self._record_probe()
        return run_plan(self._module, plan, inputs, self._order_index, self._modules)

    def _inputs(self, sample: torch.Tensor, timestep: torch.Tensor | float,
                states: torch.Tensor) -> dict[str, torch.Tensor]:
        channels = self.sample_shape[0]
        if not isinstance(sample, torch.Tensor) or sample.dim() != 4 \
                or sample.shape[1] != channels or not sample.is_floating_point():
            got = (f"{sample.dtype} of shape {tuple(sample.shape)}"
                   if isinstance(sample, torch.Tensor) else type(sample).__name__)
            msg = f"sample must be a float tensor [batch, {channels}, height, width]; got {got}"
            raise ShapeError(msg)
        width = self._context_width()
        if not isinstance(states, torch.Tensor) or states.dim() != 3 or states.shape[2] != width \
                or states.shape[0] != sample.shape[0]:
            got = tuple(states.shape) if isinstance(states, torch.Tensor) else type(states).__name__
            msg = (f"encoder_hidden_states must be [batch, tokens, {width}] with the sample's "
                   f"batch {sample.shape[0]}; got {got}")
            raise ShapeError(msg)
        device, dtype = self.device, self.dtype
        if not isinstance(timestep, torch.Tensor):
            timestep = torch.tensor(timestep)
        return {"sample": sample.to(device, dtype), "timestep": timestep.to(device),
                "encoder_hidden_states": states.to(device, dtype)}

    @property
    def device(self) -> torch.device:
        return next(self._module.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The U-Net's dtype, which its inputs are cast to."""
        return next(self._module.parameters()).dtype
