"""The one way library code draws the random numbers of a computation (in the manner of diffusers'
``randn_tensor``): noise, cameras, timesteps, random weights. (New seeds offered to a visitor come from
``secrets``: they are shown and recorded, so every computation stays repeatable from its seed.)

Every draw takes an explicit ``torch.Generator`` (never the global RNG), or a list of generators, one per object:
row k of the result is drawn from ``generators[k]`` alone, so an object's numbers do not depend on which other
objects share its batch. Numbers are drawn on the generator's own device and then moved to ``device``: a CPU
generator gives the same numbers whatever device computes with them (a seed means the same object on a CPU and a
GPU, up to floating-point differences in the arithmetic); a generator on the GPU is faster for millions of draws
(SDS's ray jitter), and its numbers are then only reproducible on that kind of device.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .options import Limit

SEED = Limit("seed", 0, 2 ** 31 - 1, whole=True)  # every method's seeds: what a visitor can type and read back
Generators = torch.Generator | Sequence[torch.Generator]


def seeded(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A fresh generator for ``seed`` (on the CPU unless told otherwise)."""
    return torch.Generator(torch.device(device)).manual_seed(int(seed))


def _draw(sample: Callable, shape: Sequence[int], generator: Generators, device, dtype) -> torch.Tensor:
    if isinstance(generator, torch.Generator):
        out = sample(tuple(shape), generator=generator, device=generator.device)
    else:
        if len(generator) != shape[0]:
            raise ValueError(f"one generator per object: got {len(generator)} for a batch of {shape[0]}")
        out = torch.stack([sample(tuple(shape[1:]), generator=g, device=g.device).to(generator[0].device)
                           for g in generator])
    return out.to(device=device if device is not None else out.device, dtype=dtype)


def randn_tensor(shape: Sequence[int], generator: Generators, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal numbers of ``shape``; with a list of generators, row k from ``generator[k]``."""
    return _draw(torch.randn, shape, generator, device, dtype)


def rand_tensor(shape: Sequence[int], generator: Generators, device: torch.device | str | None = None,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Uniform numbers in [0, 1) of ``shape``; with a list of generators, row k from ``generator[k]``."""
    return _draw(torch.rand, shape, generator, device, dtype)


def randint(low: int, high: int, generator: torch.Generator) -> int:
    """One whole number in [low, high)."""
    return int(randint_tensor(low, high, (1,), generator))


def randint_tensor(low: int, high: int, shape: Sequence[int], generator: torch.Generator) -> torch.Tensor:
    """Whole numbers in [low, high) of ``shape``, on the generator's device."""
    return torch.randint(low, high, tuple(shape), generator=generator, device=generator.device)


def randperm(n: int, generator: torch.Generator) -> torch.Tensor:
    """A random order of 0..n-1, on the generator's device."""
    return torch.randperm(n, generator=generator, device=generator.device)


def derived(generator: torch.Generator, device: torch.device | str = "cpu") -> torch.Generator:
    """A new generator (on ``device``) seeded from ``generator``: an independent stream for one purpose."""
    return seeded(randint(0, 2 ** 62, generator), device)


__all__ = ["SEED", "derived", "rand_tensor", "randint", "randint_tensor", "randn_tensor", "randperm", "seeded"]
