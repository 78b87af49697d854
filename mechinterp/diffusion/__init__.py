"""Diffusion U-Nets: the loaded model, the denoising loop with interventions at chosen steps,
cross-attention maps and block x timestep patching."""

from mechinterp.diffusion.denoise import Generation
from mechinterp.diffusion.model import DiffusionModel, UNetRun

__all__ = ["DiffusionModel", "Generation", "UNetRun"]
