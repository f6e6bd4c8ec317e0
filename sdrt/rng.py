"""Seeds and noise as the AUTOMATIC1111 web UI makes them.

Three sources: ``cpu`` (a torch CPU generator per seed), ``gpu`` (a torch generator on the
pipeline's device; on a CPU device it is the same as ``cpu``) and ``nv`` (Philox 4x32-10 with
Box-Muller, the web UI's imitation of NVIDIA's cuRAND, in numpy, so GPU-identical noise can
be made on a CPU).
"""
from __future__ import annotations

import math
import numbers
import random
import warnings
from typing import Sequence

import numpy as np
import torch

SOURCES = ("cpu", "gpu", "nv")
MAX_SEED = 2 ** 32 - 1

_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)
_TWO_POW32_INV = np.float32(2.3283064e-10)
_TWO_POW32_INV_2PI = np.float32(2.3283064e-10 * 6.2831855)


def _hi_lo(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(high, low) 32-bit halves of a uint64 array."""
    return (x >> np.uint64(32)).astype(np.uint32), (x & np.uint64(0xFFFFFFFF)).astype(np.uint32)


def _philox4x32(counter: np.ndarray, key: np.ndarray, rounds: int = 10) -> np.ndarray:
    """Philox 4x32 (Salmon et al. 2011) over columns of ``counter`` (4, N) with ``key`` (2, N)."""
    c, k = counter.copy(), key.copy()
    for r in range(rounds):
        if r:
            k[0] += np.uint32(_PHILOX_W[0])
            k[1] += np.uint32(_PHILOX_W[1])
        hi0, lo0 = _hi_lo(c[0].astype(np.uint64) * np.uint64(_PHILOX_M[0]))
        hi2, lo2 = _hi_lo(c[2].astype(np.uint64) * np.uint64(_PHILOX_M[1]))
        c = np.stack([hi2 ^ c[1] ^ k[0], lo2, hi0 ^ c[3] ^ k[1], lo0])
    return c


def philox_randn(seed: int, shape, offset: int = 0) -> np.ndarray:
    """Standard normal float32 noise of ``shape`` from Philox 4x32-10 + Box-Muller, as the web
    UI's "NV" generator makes it: counter (offset, 0, index, 0), key = the 64-bit seed."""
    n = int(np.prod(shape, dtype=np.int64))
    counter = np.zeros((4, n), dtype=np.uint32)
    counter[0] = offset
    counter[2] = np.arange(n, dtype=np.uint32)
    seed64 = np.uint64(seed)
    key = np.empty((2, n), dtype=np.uint32)
    key[0] = np.uint32(seed64 & np.uint64(0xFFFFFFFF))
    key[1] = np.uint32(seed64 >> np.uint64(32))
    g = _philox4x32(counter, key)
    # uint32 times a float32 constant promotes to float64 in numpy, as in the web UI's code
    u = g[0].astype(np.float64) * np.float64(_TWO_POW32_INV) + np.float64(_TWO_POW32_INV / 2)
    v = g[1].astype(np.float64) * np.float64(_TWO_POW32_INV_2PI) + np.float64(_TWO_POW32_INV_2PI / 2)
    return (np.sqrt(-2.0 * np.log(u)) * np.sin(v)).astype(np.float32).reshape(tuple(shape))


class PhiloxGenerator:
    """A stateful "NV" generator: each call advances the Philox counter's offset by one."""

    def __init__(self, seed: int):
        self.seed, self.offset = int(seed), 0

    def randn(self, shape) -> torch.Tensor:
        out = philox_randn(self.seed, shape, self.offset)
        self.offset += 1
        return torch.from_numpy(out)


def check_seed(value, name: str = "seed") -> int:
    """``value`` as a seed in 0..2^32-1; -1 picks a random one."""
    integral = isinstance(value, numbers.Integral) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not integral:
        raise ValueError(f"{name} must be an integer in 0..{MAX_SEED} or -1, got {value!r}")
    seed = int(value)
    if seed == -1:
        return random.randrange(0, MAX_SEED + 1)
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"{name} must be in 0..{MAX_SEED} or -1, got {seed}")
    return seed


def slerp(val: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between two noise tensors, as the web UI mixes subseeds."""
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:
        return low * val + high * (1 - val)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return ((torch.sin((1.0 - val) * omega) / so).unsqueeze(1) * low
            + (torch.sin(val * omega) / so).unsqueeze(1) * high)


class ImageRNG:
    """One generator per image seed. The first ``next()`` is the initial latent noise
    (B, C, h, w); later calls are the samplers' noise, drawn from the same generators.

    shape: the latent (C, h, w). seed_resize_from: (width, height) in pixels of the size the
    seed was first used at; its noise is placed in the centre ("resize seed from").
    """

    def __init__(self, shape, seeds: Sequence[int], subseeds: Sequence[int] | None = None,
                 subseed_strength: float = 0.0, seed_resize_from=None, source: str = "cpu",
                 eta_noise_seed_delta: int = 0, device="cpu", latent_factor: int = 8):
        if source not in SOURCES:
            raise ValueError(f"rng source {source!r} is unknown; valid sources: {', '.join(SOURCES)}")
        self.shape = tuple(int(s) for s in shape)
        self.seeds = [int(s) for s in seeds]
        self.subseeds = None if subseeds is None else [int(s) for s in subseeds]
        self.subseed_strength = float(subseed_strength)
        self.source, self.device = source, torch.device(device)
        self.eta_noise_seed_delta = int(eta_noise_seed_delta or 0)
        self.noise_shape = self.shape
        if seed_resize_from:
            w, h = seed_resize_from
            if w > 0 and h > 0:
                self.noise_shape = (self.shape[0], int(h) // latent_factor, int(w) // latent_factor)
        self.generators = [self._generator(s) for s in self.seeds]
        self.is_first = True

    def _gen_device(self) -> torch.device:
        return self.device if self.source == "gpu" else torch.device("cpu")

    def _generator(self, seed: int):
        if self.source == "nv":
            return PhiloxGenerator(seed)
        return torch.Generator(self._gen_device()).manual_seed(seed)

    def _randn(self, shape, generator) -> torch.Tensor:
        if isinstance(generator, PhiloxGenerator):
            return generator.randn(shape)
        return torch.randn(shape, generator=generator, device=self._gen_device())

    def _first(self) -> torch.Tensor:
        xs = []
        for i, (seed, gen) in enumerate(zip(self.seeds, self.generators)):
            subnoise = None
            if self.subseeds is not None and self.subseed_strength != 0:
                subseed = self.subseeds[i] if i < len(self.subseeds) else 0
                subnoise = self._randn(self.noise_shape, self._generator(subseed))
            if self.noise_shape != self.shape:
                noise = self._randn(self.noise_shape, self._generator(seed))
            else:
                noise = self._randn(self.shape, gen)
            if subnoise is not None:
                noise = slerp(self.subseed_strength, noise, subnoise)
            if self.noise_shape != self.shape:
                noise = self._place_centre(self._randn(self.shape, gen), noise)
            xs.append(noise)
        if self.eta_noise_seed_delta:
            self.generators = [self._generator(s + self.eta_noise_seed_delta) for s in self.seeds]
        return torch.stack(xs).to(self.device)

    def _place_centre(self, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        dx = (self.shape[2] - self.noise_shape[2]) // 2
        dy = (self.shape[1] - self.noise_shape[1]) // 2
        w = self.noise_shape[2] if dx >= 0 else self.noise_shape[2] + 2 * dx
        h = self.noise_shape[1] if dy >= 0 else self.noise_shape[1] + 2 * dy
        tx, ty = max(dx, 0), max(dy, 0)
        sx, sy = max(-dx, 0), max(-dy, 0)
        x[:, ty:ty + h, tx:tx + w] = noise[:, sy:sy + h, sx:sx + w]
        return x

    def next(self) -> torch.Tensor:
        if self.is_first:
            self.is_first = False
            return self._first()
        return torch.stack([self._randn(self.shape, g) for g in self.generators]).to(self.device)


class BrownianNoise:
    """Noise of the SDE samplers (DPM++ SDE, DPM++ 2M SDE): one Brownian tree per image seed
    over [sigma_min, sigma_max], as the web UI seeds k-diffusion's ``BrownianTreeNoiseSampler``;
    ``noise(s, s_next)`` is the normalised increment W(s_next) - W(s)."""

    def __init__(self, x: torch.Tensor, sigma_min: float, sigma_max: float, seeds: Sequence[int]):
        import torchsde  # only the SDE samplers need it

        # times are Python floats (float64), so a query at sigma_max is never "past the end"
        self.trees = [torchsde.BrownianTree(float(sigma_min), torch.zeros_like(x[0]), float(sigma_max),
                                            entropy=int(s)) for s in seeds]

    def __call__(self, sigma: float, sigma_next: float) -> torch.Tensor:
        t0, t1 = sorted((float(sigma), float(sigma_next)))
        sign = 1.0 if sigma < sigma_next else -1.0
        with warnings.catch_warnings():
            # torchsde rounds the tree's ends to its tolerance and then warns that a query at
            # sigma_max lies past them; the query is still answered (k-diffusion warns the same)
            warnings.filterwarnings("ignore", message="Should have t", category=UserWarning)
            w = torch.stack([tree(t0, t1) for tree in self.trees])
        return w * (sign / math.sqrt(t1 - t0))
