"""Flow-matching sampling: x_t = (1 - t) * x0 + t * eps, v = eps - x0, t = 1 is pure noise.

Free functions over a `velocity(x, t) -> v` callable so the same code samples the one-step generator, its
two-step variant and the many-step teacher with classifier-free guidance.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def shift(t: torch.Tensor | float, s: float) -> torch.Tensor | float:
    """Timestep shift s*t / (1 + (s-1)*t): s > 1 spends more of the schedule near pure noise."""
    if s <= 0:
        raise ValueError(f"shift must be positive; got {s}")
    return s * t / (1 + (s - 1) * t)


def get_noise(seeds: Sequence[int], shape: tuple[int, ...], device: torch.device | str = "cpu") -> torch.Tensor:
    """Gaussian noise (B, *shape), one CPU generator per seed so a sample does not depend on its batch or device."""
    samples = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(samples).to(device)


def add_noise(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t for a per-sample t of shape (B,)."""
    t = t.view(-1, *([1] * (x0.dim() - 1)))
    return (1 - t) * x0 + t * eps


def one_step(velocity: Velocity, z: torch.Tensor) -> torch.Tensor:
    """The APT generator: x0 = z - v(z, t=1)."""
    t = torch.ones(z.shape[0], device=z.device)
    return z - velocity(z, t)


def renoise(velocity: Velocity, z: torch.Tensor, sigmas: Sequence[float], eps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Few-step sampling along a sigma list (1.0 first, decreasing): predict x0 from the noisiest sample, re-noise
    it to the next sigma with fresh noise (eps[k] for sigmas[k + 1]) and predict again; the last x0 is returned.
    (1.0,) is `one_step`; distilled few-step checkpoints ship their own list."""
    if not sigmas or sigmas[0] != 1.0 or any(a <= b for a, b in itertools.pairwise(sigmas)) or sigmas[-1] <= 0:
        raise ValueError(f"sigmas must start at 1.0 and decrease, staying above 0; got {list(sigmas)}")
    if len(eps) != len(sigmas) - 1:
        raise ValueError(f"need one noise tensor per re-noising ({len(sigmas) - 1}); got {len(eps)}")
    x0 = one_step(velocity, z)
    for sigma, noise in zip(sigmas[1:], eps):
        t = torch.full((z.shape[0],), sigma, device=z.device)
        x_t = add_noise(x0, noise, t)
        x0 = x_t - sigma * velocity(x_t, t)
    return x0


def two_step(velocity: Velocity, z: torch.Tensor, eps: torch.Tensor, t_mid: float = 0.5) -> torch.Tensor:
    """Zero-shot two steps: one step, re-noise the estimate to `t_mid` with fresh noise `eps`, and step again."""
    if not 0.0 < t_mid < 1.0:
        raise ValueError(f"t_mid must lie in (0, 1); got {t_mid}")
    return renoise(velocity, z, (1.0, t_mid), [eps])


def timesteps(num_steps: int, shift_factor: float = 1.0) -> torch.Tensor:
    """Decreasing schedule 1 -> 0 with `num_steps` intervals, shifted: (num_steps + 1,)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1; got {num_steps}")
    return shift(torch.linspace(1.0, 0.0, num_steps + 1), shift_factor)


def guided(cond: Velocity, uncond: Velocity, scale: float) -> Velocity:
    """Classifier-free guidance: v_u + scale * (v_c - v_u)."""

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        v_u = uncond(x, t)
        return v_u + scale * (cond(x, t) - v_u)

    return velocity


def euler(velocity: Velocity, z: torch.Tensor, num_steps: int, shift_factor: float = 1.0) -> torch.Tensor:
    """Euler integration of dx/dt = v from t = 1 (z) to t = 0 on the shifted schedule."""
    ts = timesteps(num_steps, shift_factor).tolist()
    x = z
    for t_cur, t_next in itertools.pairwise(ts):
        t = torch.full((z.shape[0],), t_cur, device=z.device)
        x = x + (t_next - t_cur) * velocity(x, t)
    return x
