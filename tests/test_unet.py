"""Diffusion U-Nets: the UNet2DConditionModel site table, the denoising loop with per-step edits,
cross-attention maps and site x timestep patching.

Two models: a tiny random U-Net whose transformer layers differ in head count (so per-layer
sizes matter), and the shipped ``toy-unet``, whose known mechanism (the colour word steers the
colour through cross-attention) the tests check through sites.
"""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import mechinterp
from mechinterp import Set, Site, SiteError, Zero, select
from mechinterp.diffusion import DiffusionModel
from mechinterp.diffusion.daam import AttentionMaps, cross_attention_maps
from mechinterp.diffusion.sweep import TimestepPatchResult, timestep_patch
from mechinterp.errors import InputError, ShapeError
from mechinterp.sites import UNET_COMPONENTS
from mechinterp.zoo import zoo_path
from mechinterp.zoo.train_toy_unet import (
    ColourShift,
    classify_colour,
    encode_captions,
    generate,
    load_toy_unet,
)

pytestmark = pytest.mark.usefixtures("one_thread")

WIDTH = 12  # the tiny U-Net's cross-attention width
PATTERNS = ("pattern", "cross_pattern")


def tiny_unet(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
        layers_per_block=1, cross_attention_dim=WIDTH, attention_head_dim=(2, 4),
        norm_num_groups=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    return unet.double().eval()


@pytest.fixture(scope="module")
def tiny() -> DiffusionModel:
    return DiffusionModel(tiny_unet(), scheduler=diffusers.DDIMScheduler(), name="tiny")


@pytest.fixture(scope="module")
def toy() -> DiffusionModel:
    return mechinterp.load("toy-unet")


def inputs(batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 3, 8, 8, generator=g, dtype=torch.float64), torch.tensor(321),
            torch.randn(batch, 5, WIDTH, generator=g, dtype=torch.float64))


def every_site(model: DiffusionModel, patterns: bool = False) -> list[Site]:
    components = [c for c in model.table.places if (c in PATTERNS) == patterns]
    return model.sites(select(*[c for c in components if c != "embed"])) + (
        [] if patterns else [Site("embed")])


# -- the site table -------------------------------------------------------------------------


def test_units_follow_the_forward_and_have_their_own_sizes(tiny: DiffusionModel) -> None:
    assert tiny.layer_names("resid_post") == [
        "down_blocks.0.attentions.0.transformer_blocks.0",
        "mid_block.attentions.0.transformer_blocks.0",
        "up_blocks.1.attentions.0.transformer_blocks.0",
        "up_blocks.1.attentions.1.transformer_blocks.0"]
    assert tiny.layer_names("block") == ["down_blocks.0", "down_blocks.1", "mid_block",
                                         "up_blocks.0", "up_blocks.1"]
    assert len(tiny.layer_names("resnet")) == 1 + 1 + 2 + 2 + 2  # up blocks have one more
    heads = [tiny.table.dims_for("head", layer).n_heads for layer in range(4)]
    modules = [tiny._module.get_submodule(p).attn1.heads for p in tiny.layer_names("head")]
    assert heads == modules and len(set(heads)) == 2  # the layers differ in head count
    with pytest.raises(SiteError, match="head for head.0"):
        tiny.run(*inputs(), cache=[Site("head", layer=0, head=heads[0])])


def test_every_site_reads_with_its_layers_shape(tiny: DiffusionModel) -> None:
    sample, t, states = inputs()
    sites = every_site(tiny) + every_site(tiny, patterns=True)
    cache = tiny.run(sample, t, states, cache=sites).cache
    for site in sites:
        layer = site.layer
        d = tiny.table.dims_for(site.component, layer) if layer is not None else None
        rows, cols = tiny.grid(site.component, layer)
        pixels, text = rows * cols, states.shape[1]
        expected = {
            "head": (2, pixels, d and d.n_heads, d and d.d_head),
            "q": (2, pixels, d and d.n_heads, d and d.d_head),
            "k": (2, pixels, d and d.n_heads, d and d.d_head),
            "v": (2, pixels, d and d.n_heads, d and d.d_head),
            "cross_head": (2, pixels, d and d.n_heads, d and d.d_head),
            "cross_q": (2, pixels, d and d.n_heads, d and d.d_head),
            "cross_k": (2, text, d and d.n_heads, d and d.d_head),
            "cross_v": (2, text, d and d.n_heads, d and d.d_head),
            "pattern": (2, d and d.n_heads, pixels, pixels),
            "cross_pattern": (2, d and d.n_heads, pixels, text),
            "neuron": (2, pixels, d and d.d_mlp),
        }.get(site.component, (2, pixels, d.d_model if d else 8))
        assert tuple(cache[site].shape) == expected, site


def test_reading_leaves_the_forward_bit_identical_and_self_writes_are_exact(
        tiny: DiffusionModel) -> None:
    sample, t, states = inputs()
    plain = tiny.run(sample, t, states).prediction
    assert torch.equal(plain, tiny._module(sample, t, encoder_hidden_states=states).sample)
    sites = every_site(tiny)
    cache = tiny.run(sample, t, states, cache=sites)
    assert torch.equal(cache.prediction, plain)
    for site in sites:
        written = tiny.run(sample, t, states, edits=[Set(site, cache.cache[site])]).prediction
        assert torch.equal(written, plain), site


def test_patterns_are_the_softmax_of_the_read_queries_and_keys(tiny: DiffusionModel) -> None:
    sample, t, states = inputs()
    patterns = every_site(tiny, patterns=True)
    qk = tiny.sites(select("q", "k", "cross_q", "cross_k"))
    read = tiny.run(sample, t, states, cache=patterns + qk)
    for site in patterns:
        prefix = "cross_" if site.component == "cross_pattern" else ""
        q = read.cache[Site(f"{prefix}q", layer=site.layer)].transpose(1, 2)
        k = read.cache[Site(f"{prefix}k", layer=site.layer)].transpose(1, 2)
        expected = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
        torch.testing.assert_close(read.cache[site], expected, rtol=0, atol=1e-12)
    # Writing a pattern's own value changes nothing in a forward that exposes the patterns.
    for site in patterns:
        again = tiny.run(sample, t, states, edits=[Set(site, read.cache[site])], cache=patterns)
        assert torch.equal(again.prediction, read.prediction), site


def test_edits_match_plain_torch_hooks(tiny: DiffusionModel) -> None:
    sample, t, states = inputs()
    unet = tiny._module
    layer1 = tiny._module.get_submodule(tiny.layer_names("head")[1])

    def hooked(module: torch.nn.Module, hook, *, pre: bool = False) -> torch.Tensor:
        handle = (module.register_forward_pre_hook(hook) if pre
                  else module.register_forward_hook(hook))
        try:
            return unet(sample, t, encoder_hidden_states=states).sample
        finally:
            handle.remove()

    # One head of the self-attention: its slice of the output projection's input.
    d = tiny.table.dims_for("head", 1)

    def zero_head(_m, args):
        x = args[0].clone()
        x[..., 1 * d.d_head:2 * d.d_head] = 0
        return (x,)

    got = tiny.run(sample, t, states, edits=[Zero(Site("head", layer=1, head=1))]).prediction
    assert torch.equal(got, hooked(layer1.attn1.to_out[0], zero_head, pre=True))

    # One spatial location of a ResNet's feature map (row 1, column 2 of a 4 x 4 map).
    resnet = unet.get_submodule(tiny.layer_names("resnet")[2])
    _, cols = tiny.grid("resnet", 2)

    def zero_pixel(_m, _a, out):
        out = out.clone()
        out[:, :, 1, 2] = 0
        return out

    got = tiny.run(sample, t, states, edits=[Zero(Site("resnet", layer=2, pos=1 * cols + 2))])
    assert torch.equal(got.prediction, hooked(resnet, zero_pixel))

    # One text token's cross-attention keys.
    def zero_token(_m, _a, out):
        out = out.clone()
        out[:, 3] = 0
        return out

    got = tiny.run(sample, t, states, edits=[Zero(Site("cross_k", layer=1, pos=3))])
    assert torch.equal(got.prediction, hooked(layer1.attn2.to_k, zero_token))


def test_a_down_blocks_write_reaches_its_skip_connection(tiny: DiffusionModel) -> None:
    sample, t, states = inputs()

    def zero_both(_m, _a, out):
        hidden, skips = out
        new = torch.zeros_like(hidden)
        return new, tuple(new if s is hidden else s for s in skips)

    handle = tiny._module.down_blocks[0].register_forward_hook(zero_both)
    try:
        expected = tiny._module(sample, t, encoder_hidden_states=states).sample
    finally:
        handle.remove()
    got = tiny.run(sample, t, states, edits=[Zero(Site("block", layer=0))]).prediction
    assert torch.equal(got, expected)


def test_spatial_positions_cover_the_box(tiny: DiffusionModel, toy: DiffusionModel) -> None:
    assert toy.grid("resid_post", 0) == (8, 8) and toy.grid("embed") == (16, 16)
    # A 4 x 4 pixel corner of the 16 x 16 image is 2 x 2 cells of an 8 x 8 map.
    assert toy.spatial_positions("cross_attn", 0, (0, 0, 4, 4)) == (0, 1, 8, 9)
    assert toy.spatial_positions("resnet", 0, (15, 15, 16, 16)) == (255,)
    # A pixel box touching a cell's edge takes the whole cell.
    assert toy.spatial_positions("block", 4, (1, 1, 2, 2)) == (17,)
    assert toy.grid("resid_post", 0, sample_size=(32, 32)) == (16, 16)
    with pytest.raises(InputError, match="box must lie within"):
        toy.spatial_positions("resnet", 0, (0, 0, 17, 4))
    with pytest.raises(SiteError, match="no spatial grid|needs a layer"):
        tiny.grid("resnet")


def test_bad_input_names_what_was_expected(tiny: DiffusionModel) -> None:
    sample, t, states = inputs()
    with pytest.raises(ShapeError, match="sample must be a float tensor"):
        tiny.run(sample[:, :2], t, states)
    with pytest.raises(ShapeError, match=f"encoder_hidden_states must be \\[batch, tokens, {WIDTH}\\]"):
        tiny.run(sample, t, states[..., :5])
    with pytest.raises(SiteError, match="not available in this unet model"):
        tiny.run(sample, t, states, cache=[Site("resid_mid", layer=0)])
    with pytest.raises(SiteError, match="layer for resnet.9"):
        tiny.run(sample, t, states, cache=[Site("resnet", layer=9)])
    with pytest.raises(InputError, match="loaded without a text encoder"):
        tiny.encode(["a prompt"])
    with pytest.raises(InputError, match="loaded without a tokenizer"):
        tiny.token_ids(["a prompt"])
    with pytest.raises(InputError, match="UNet2DConditionModel"):
        DiffusionModel(torch.nn.Linear(2, 2))
    language = mechinterp.load("induction-2l")
    with pytest.raises(SiteError):
        language.cache("fuba bu", [Site("resnet", layer=0)])
    assert not UNET_COMPONENTS & set(language.table.places)


# -- the denoising loop ---------------------------------------------------------------------


CAPTIONS = ["red circle", "blue square", "green triangle", "yellow cross"]
SOURCES = ["cyan square", "magenta cross", "white circle", "red triangle"]


def test_generation_equals_the_toys_own_sampler(toy: DiffusionModel) -> None:
    unet, text_encoder, tokenizer, scheduler = load_toy_unet(zoo_path("toy-unet"))
    with torch.no_grad():
        states = encode_captions(tokenizer, text_encoder, CAPTIONS)
        uncond = encode_captions(tokenizer, text_encoder, [""])
    for guidance in (None, 2.0):
        expected = generate(unet, scheduler, states, steps=6,
                            generator=torch.Generator().manual_seed(3), guidance_scale=guidance,
                            uncond_hidden_states=None if guidance is None else uncond)
        got = toy.generate(CAPTIONS, steps=6, seed=3, guidance_scale=guidance)
        assert torch.equal(got.images, expected), guidance


def test_an_edit_at_one_step_changes_only_what_follows(toy: DiffusionModel) -> None:
    site = Site("cross_attn", layer=1)
    plain = toy.generate(CAPTIONS, steps=6, trajectory=True, cache=[site])
    edited = toy.generate(CAPTIONS, steps=6, trajectory=True, cache=[site],
                          edits={3: [Zero(site)]})
    for i in range(4):  # the samples entering steps 0..3 are untouched
        assert torch.equal(plain.trajectory[i], edited.trajectory[i]), i
    assert not torch.equal(plain.trajectory[4], edited.trajectory[4])
    assert torch.equal(edited.cache[3][site], torch.zeros_like(edited.cache[3][site]))
    assert not torch.equal(edited.cache[4][site], torch.zeros_like(edited.cache[4][site]))
    # Negative step indices count from the end.
    again = toy.generate(CAPTIONS, steps=6, edits={-3: [Zero(site)]})
    assert torch.equal(again.sample, edited.sample)


def test_guided_edits_reach_the_chosen_half(toy: DiffusionModel) -> None:
    site = Site("cross_attn", layer=0)
    for rows, zeroed in (("cond", {4}), ("uncond", {0}), ("both", {0, 4})):
        out = toy.generate(CAPTIONS, steps=2, guidance_scale=2.0, edits={0: [Zero(site, rows=[0])]},
                           edit_rows=rows, cache=[site], cache_steps=[0])
        value = out.cache[0][site]
        assert value.shape[0] == 8  # unconditional rows first
        assert {r for r in range(8) if (value[r] == 0).all()} == zeroed, rows
    with pytest.raises(InputError, match="needs classifier-free guidance"):
        toy.generate(CAPTIONS, steps=2, edit_rows="cond")
    with pytest.raises(InputError, match="step indices in \\[-2, 2\\)"):
        toy.generate(CAPTIONS, steps=2, edits={2: [Zero(site)]})
    with pytest.raises(InputError, match="sequence of interventions"):
        toy.generate(CAPTIONS, steps=2, edits=Zero(site))
    with pytest.raises(InputError, match="captions must be"):
        toy.generate(["purple blob"], steps=2)


def test_the_colour_word_steers_the_colour_through_cross_attention(toy: DiffusionModel) -> None:
    n = toy.table.dims_for("cross_k").n_layers
    plain = classify_colour(toy.generate(CAPTIONS, steps=10).images)
    assert plain == [c.split()[0] for c in CAPTIONS]
    # The source captions' keys and values at the colour word (position 1), in every layer and
    # at every step, recolour the image; at the shape word (position 2) they do not.
    source = toy.generate(SOURCES, steps=10, cache=toy.sites(select("cross_k", "cross_v")))

    def patched(position: int) -> list[str]:
        edits = {step: [Set(site.at(pos=position), cache[site][:, position])
                        for site in cache] for step, cache in source.cache.items()}
        return classify_colour(toy.generate(CAPTIONS, steps=10, edits=edits).images)

    assert patched(1) == [c.split()[0] for c in SOURCES]
    assert patched(2) == plain
    muted = {step: [Zero(Site("cross_attn", layer=layer)) for layer in range(n)]
             for step in range(10)}
    blind = classify_colour(toy.generate(CAPTIONS * 2, steps=10, edits=muted, seed=5).images)
    assert sum(a == b for a, b in zip(blind, [c.split()[0] for c in CAPTIONS * 2])) <= 4


# -- cross-attention maps -------------------------------------------------------------------


def test_cross_attention_maps_average_the_patterns(toy: DiffusionModel, tmp_path) -> None:
    maps = cross_attention_maps(toy, CAPTIONS[:2], steps=3, layers=[0, 3], at_steps=[1, 2])
    # By hand: heads averaged, each layer's 8 x 8 map upsampled to 16 x 16, then averaged.
    sites = [Site("cross_pattern", layer=0), Site("cross_pattern", layer=3)]
    run = toy.generate(CAPTIONS[:2], steps=3, cache=sites)
    expected = sum(
        torch.nn.functional.interpolate(
            run.cache[step][site].mean(1).transpose(1, 2).unflatten(2, (8, 8)), size=(16, 16),
            mode="bilinear", align_corners=False)
        for step in (1, 2) for site in sites) / 4
    # float32 averages in another order: equal to rounding.
    torch.testing.assert_close(maps.maps, expected, rtol=0, atol=2e-5)
    assert maps.tokens == [["<bos>", "red", "circle", "<eos>"], ["<bos>", "blue", "square", "<eos>"]]
    assert maps.layers == (0, 3) and maps.steps == (1, 2)
    torch.testing.assert_close(maps.token_map(1, "blue"), maps.maps[1, 1])
    maps.save(tmp_path / "maps.safetensors")
    loaded = AttentionMaps.load(tmp_path / "maps.safetensors")
    assert torch.equal(loaded.maps, maps.maps) and loaded.tokens == maps.tokens
    assert len(maps.to_frame()) == 2 * 4 * 16 * 16
    assert len(maps.plot(0).axes) == 5
    with pytest.raises(InputError, match="layers must be transformer layers"):
        cross_attention_maps(toy, CAPTIONS[:1], steps=2, layers=[4])


def test_the_colour_word_attends_to_the_shape(toy: DiffusionModel) -> None:
    maps = cross_attention_maps(toy, CAPTIONS, steps=10)
    shape = (maps.images.max(1).values > 0.5).float()  # the drawn shape on black
    colour = maps.maps[:, 1]
    inside = (colour * shape).sum((1, 2)) / shape.sum((1, 2))
    outside = (colour * (1 - shape)).sum((1, 2)) / (1 - shape).sum((1, 2))
    assert (inside > 1.5 * outside).all(), (inside, outside)


# -- site x timestep patching ---------------------------------------------------------------


@pytest.mark.parametrize(("scheduler", "window"), [("ddim", "step"), ("dpm-multistep", "step"),
                                                  ("ddim", "onward")])
def test_the_sweep_equals_a_per_cell_loop(toy: DiffusionModel, scheduler: str, window: str) -> None:
    model = toy
    if scheduler == "dpm-multistep":
        model = DiffusionModel(toy._module, text_encoder=toy.text_encoder, tokenizer=toy.tokenizer,
                               scheduler=diffusers.DPMSolverMultistepScheduler.from_config(
                                   toy.scheduler.config), tokenize=toy._tokenize)
    clean, corrupt = CAPTIONS[:2], SOURCES[:2]
    metric = ColourShift([c.split()[0] for c in clean], [c.split()[0] for c in corrupt])
    sites = [Site("block", layer=1), Site("cross_attn", layer=2)]
    result = timestep_patch(model, clean, corrupt, metric=metric, sites=sites, steps=5,
                            at_steps=[1, 3], max_rows=2, window=window, progress=False)
    assert result.values.shape == (2, 2, 2) and result.window == window
    source = model.generate(clean, steps=5, cache=sites)
    for j, site in enumerate(sites):
        for k, step in enumerate((1, 3)):
            restored = [step] if window == "step" else range(step, 5)
            edits = {i: [Set(site, source.cache[i][site])] for i in restored}
            images = model.generate(corrupt, steps=5, edits=edits).images
            torch.testing.assert_close(result.values[:, j, k], metric(images), rtol=0, atol=0)
    torch.testing.assert_close(result.clean, metric(source.images), rtol=0, atol=0)
    torch.testing.assert_close(result.corrupt, metric(model.generate(corrupt, steps=5).images),
                               rtol=0, atol=0)


def test_the_guided_sweep_restores_both_halves(toy: DiffusionModel) -> None:
    clean, corrupt = CAPTIONS[:2], SOURCES[:2]
    metric = ColourShift([c.split()[0] for c in clean], [c.split()[0] for c in corrupt])
    site = Site("cross_attn", layer=0)
    result = timestep_patch(toy, clean, corrupt, metric=metric, sites=[site], steps=3,
                            at_steps=[1], guidance_scale=2.0, progress=False)
    source = toy.generate(clean, steps=3, cache=[site], cache_steps=[1], guidance_scale=2.0)
    value = source.cache[1][site]  # [uncond rows; cond rows]
    edits = {1: [Set(site, value[:2], rows=[0, 1]), Set(site, value[2:], rows=[2, 3])]}
    # The per-cell loop, written against the U-Net's own rows (edit_rows="both" would copy
    # each edit into both halves).
    from mechinterp.diffusion.denoise import Denoiser, _noise

    states = torch.cat([toy.encode([""]).expand(2, -1, -1), toy.encode(corrupt)])
    loop = Denoiser(toy, states, 3, seed=0, guidance_scale=2.0)
    sample = loop.start(_noise(toy, None, 2, 0))
    for i in range(3):
        sample, _ = loop.step(i, sample, toy._plan([], edits.get(i, [])))
    expected = metric((sample / 2 + 0.5).clamp(0, 1))
    torch.testing.assert_close(result.values[:, 0, 0], expected, rtol=0, atol=0)


def test_restoring_the_last_block_onward_restores_the_colour(toy: DiffusionModel,
                                                                   tmp_path) -> None:
    clean, corrupt = CAPTIONS, SOURCES
    metric = ColourShift([c.split()[0] for c in clean], [c.split()[0] for c in corrupt])
    result = timestep_patch(toy, clean, corrupt, metric=metric, steps=4, progress=False,
                            sites=toy.sites(select("cross_attn", "block")), window="onward")
    assert result.clean.mean() > 0.1 > -0.1 > result.corrupt.mean()
    grid = result.normalized()
    assert grid.shape == (4 + 5, 4)
    # The last up block's output is (nearly) the U-Net's prediction: restoring it from the
    # first step on restores the clean colour; one cross-attention layer alone does less.
    assert grid[-1, 0] > 0.9
    assert (grid[:4, 0] < grid[-1, 0]).all()
    result.save(tmp_path / "sweep.safetensors")
    loaded = TimestepPatchResult.load(tmp_path / "sweep.safetensors")
    assert loaded.sites == result.sites and torch.equal(loaded.values, result.values)
    assert loaded.timesteps == result.timesteps and loaded.metric == "colour shift"
    assert set(result.to_frame().columns) >= {"site", "step", "timestep", "value", "normalized"}
    result.plot()


def test_sweep_bad_input(toy: DiffusionModel) -> None:
    metric = ColourShift(["red"], ["blue"])
    with pytest.raises(ShapeError, match="as many rows"):
        timestep_patch(toy, CAPTIONS[:2], SOURCES[:1], metric=metric, steps=2, progress=False)
    with pytest.raises(InputError, match="max_rows must be an int of at least the batch"):
        timestep_patch(toy, CAPTIONS[:2], SOURCES[:2], metric=metric, steps=2, max_rows=1,
                       progress=False)
    with pytest.raises(ShapeError, match="one score per generation"):
        timestep_patch(toy, CAPTIONS[:1], SOURCES[:1], metric=lambda x: x.mean(), steps=2,
                       progress=False)


# -- loading --------------------------------------------------------------------------------


def test_pipeline_folders_and_unets_load_as_diffusion_models(tmp_path) -> None:
    unet = tiny_unet().float()
    unet.save_pretrained(tmp_path / "unet")
    diffusers.DDIMScheduler().save_pretrained(tmp_path / "scheduler")
    model = mechinterp.load(tmp_path)
    assert isinstance(model, DiffusionModel) and model.name == tmp_path.name
    assert isinstance(model.scheduler, diffusers.DDIMScheduler)
    sample = torch.randn(1, 3, 8, 8)
    states = torch.randn(1, 5, WIDTH)
    for name, weight in unet.state_dict().items():
        assert torch.equal(model._module.state_dict()[name], weight), name
    expected = model._module(sample, 10, encoder_hidden_states=states).sample
    torch.testing.assert_close(model.run(sample, 10, states).prediction, expected, rtol=0, atol=0)
    wrapped = mechinterp.load(unet, dtype=torch.float64)
    assert isinstance(wrapped, DiffusionModel) and next(wrapped._module.parameters()).dtype == torch.float64
    assert repr(mechinterp.load("toy-unet")).startswith("DiffusionModel(toy-unet")


@pytest.mark.cuda
def test_cuda_agrees_with_the_cpu() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    # float64, so that neither TF32 convolutions nor reduction order hide a wrong row or step
    # (the scheduler's coefficients stay float32 on both devices: agreement to ~1e-6).
    toy = mechinterp.load("toy-unet", dtype=torch.float64)
    gpu = mechinterp.load("toy-unet", device="cuda", dtype=torch.float64)
    sites = [Site("block", layer=2), Site("cross_pattern", layer=1), Site("resnet", layer=0, pos=5)]
    edits = {2: [Zero(Site("cross_head", layer=0, head=1))]}
    cpu_run = toy.generate(CAPTIONS, steps=4, cache=sites, edits=edits, guidance_scale=2.0)
    gpu_run = gpu.generate(CAPTIONS, steps=4, cache=sites, edits=edits, guidance_scale=2.0)
    torch.testing.assert_close(gpu_run.sample.cpu(), cpu_run.sample, rtol=0, atol=5e-5)
    for step in range(4):
        for site in sites:
            torch.testing.assert_close(gpu_run.cache[step][site].cpu(), cpu_run.cache[step][site],
                                       rtol=0, atol=5e-5)
    metric = ColourShift([c.split()[0] for c in CAPTIONS], [c.split()[0] for c in SOURCES])
    on_gpu = timestep_patch(gpu, CAPTIONS, SOURCES, metric=metric, steps=4, progress=False)
    on_cpu = timestep_patch(toy, CAPTIONS, SOURCES, metric=metric, steps=4, progress=False)
    # A pixel at a palette boundary may change its label: at most two of 256 pixels.
    torch.testing.assert_close(on_gpu.values, on_cpu.values, rtol=0, atol=2 / 256)
    assert on_cpu.clean.mean() > on_cpu.corrupt.mean()


# -- SAEs at U-Net sites --------------------------------------------------------------------


def test_sae_feature_edits_at_unet_sites(toy: DiffusionModel) -> None:
    from mechinterp.sae import SAEEdit
    from mechinterp.sae.training import train_sae

    site = Site("block", layer=2)  # the mid block's [batch, 64 pixels, 64 channels] output
    run = toy.generate(CAPTIONS, steps=4, cache=[site])
    rows = torch.cat([cache[site].flatten(0, 1) for cache in run.cache.values()])
    sae, _ = train_sae(rows, d_sae=128, k=8, steps=60, batch_size=256, progress=False,
                       hook_name=str(site))
    # An SAE that edits nothing leaves every step bit-identical (the error term is kept).
    untouched = toy.generate(CAPTIONS, steps=4, edits=[SAEEdit(site, sae)])
    assert torch.equal(untouched.sample, run.sample)
    # Ablating a feature writes x - f(x) W_dec[f] into the (non-contiguous) spatial view.
    sample, t, states = torch.randn(4, 3, 16, 16), torch.tensor(700), toy.encode(CAPTIONS)
    x = toy.run(sample, t, states, cache=[site]).cache[site]
    feature = int(sae.encode(x.flatten(0, 1)).count_nonzero(0).argmax())
    acts = sae.encode(x)[..., feature]
    expected = x - acts[..., None] * sae.W_dec[feature]
    by_sae = toy.run(sample, t, states, edits=[SAEEdit(site, sae, ablate=[feature])])
    by_set = toy.run(sample, t, states, edits=[Set(site, expected)])
    torch.testing.assert_close(by_sae.prediction, by_set.prediction, rtol=0, atol=1e-5)
    assert not torch.equal(by_sae.prediction, toy.run(sample, t, states).prediction)
