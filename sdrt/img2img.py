"""img2img as the web UI does it (``modules/processing.py``, ``sd_samplers_common.py``,
``sd_samplers_kdiffusion.py``), where sdrt follows it rather than diffusers:

- **Steps.** With denoising strength ``s`` and ``steps`` N, the schedule is planned for N steps
  and the run starts at index ``N - t_enc - 1`` with ``t_enc = int(min(s, 0.999) * N)``: it
  runs ``t_enc + 1`` steps (20 steps at 0.75: 16). With the ``img2img_fix_steps`` option the
  schedule is planned for ``int(N / min(s, 0.999))`` steps and exactly N run. diffusers runs
  ``int(N * s)`` steps from index ``N - int(N * s)`` (15 at 0.75): the web UI at strength s runs
  what diffusers runs at ``(t_enc + 1) / N``.
- **Start.** ``x = init_latent + noise * initial_noise_multiplier * sigma_0``, the noise being the
  image's first draw from its seed (subseeds, ``seed_resize_from`` and the noise source as in
  txt2img); the samplers' later noise follows as in txt2img. In the k-diffusion parameterisation
  the timestep samplers (DDIM, UniPC) start from the same point.
- **Prompt editing** counts steps against N (the requested steps), not the steps that run: at 20
  steps and strength 0.75, ``[a:b:0.5]`` switches at the 11th of the 16 steps run.
- **Encoding.** The init image, resized (``sdrt.images.resize_image``) and scaled to [-1, 1],
  is encoded by the VAE and a latent is *sampled* from the posterior (mean + std * noise), then
  scaled by the VAE's scaling factor; in resize mode 3 the latent is resized bilinearly to the
  output size. The web UI samples with torch's global generator, so no web UI run repeats
  exactly; sdrt draws that noise from the image's seed plus ``ENCODE_SEED_OFFSET`` with the
  same noise source, so an sdrt img2img repeats for a seed and never shares a draw with the
  image's own noise or another image's.
"""
from __future__ import annotations

import numpy as np
import torch

ENCODE_SEED_OFFSET = 0x5EED_0E5C     # the encoder's sampling stream (see the module docstring)


def img2img_steps(steps: int, strength: float, fix_steps: bool) -> tuple[int, int]:
    """(steps to plan the schedule for, t_enc): the web UI's ``setup_img2img_steps``."""
    s = min(strength, 0.999)
    if fix_steps:
        if strength <= 0:
            raise ValueError("denoising_strength 0 with img2img_fix_steps would plan no steps; give a strength > 0")
        return int(steps / s), steps - 1
    return steps, int(s * steps)


def img2img_sigmas(full: np.ndarray, t_enc: int) -> np.ndarray:
    """The part of a planned schedule (``steps + 1`` sigmas) that img2img runs: ``t_enc + 1`` steps."""
    steps = len(full) - 1
    return np.asarray(full[steps - t_enc - 1:], dtype=np.float64)


def sample_latents(moments: torch.Tensor, eps: torch.Tensor, scaling_factor: float) -> torch.Tensor:
    """A latent from the VAE posterior's moments (B, 2C, h, w): (mean + std * eps) * scaling, with
    the log-variance clamped to [-30, 20] as diffusers' and the original LDM code clamp it."""
    mean, logvar = moments.float().chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    return (mean + std * eps.to(mean.device, mean.dtype)) * scaling_factor
