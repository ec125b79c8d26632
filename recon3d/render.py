"""Volume rendering of any :class:`~recon3d.field.Field`.

Three small steps, kept apart: where to sample along a ray (:func:`box_intersection`, :func:`stratified_depths`,
:func:`importance_depths`), what is there (``field.query``), and how to composite (:func:`composite`).
Rays are processed in chunks so memory stays bounded at any resolution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .cameras import camera_rays
from .field import Field


@dataclass
class RenderSettings:
    coarse_samples: int = 48
    fine_samples: int = 48
    chunk_rays: int = 4096
    background: tuple[float, float, float] = (1.0, 1.0, 1.0)
    box_radius: float = 1.0  # rays are clipped to the box [-r, r]^3


def box_intersection(origins: torch.Tensor, dirs: torch.Tensor, radius: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Entry and exit distances (R,) of rays with the box [-radius, radius]^3, and a hit mask (R,)."""
    safe = torch.where(dirs.abs() < 1e-9, torch.full_like(dirs, 1e-9), dirs)
    t0 = (-radius - origins) / safe
    t1 = (radius - origins) / safe
    near = torch.minimum(t0, t1).amax(-1).clamp(min=0.0)
    far = torch.maximum(t0, t1).amin(-1)
    return near, far, far > near


def stratified_depths(near: torch.Tensor, far: torch.Tensor, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(R, n) depths, one per equal bin between near and far: bin midpoints, or jittered with a generator."""
    edges = torch.linspace(0.0, 1.0, n + 1, device=near.device)
    lower, width = edges[:-1], edges[1:] - edges[:-1]
    if generator is None:
        u = torch.full((near.shape[0], n), 0.5, device=near.device)
    else:
        u = torch.rand((near.shape[0], n), generator=generator, device=generator.device).to(near.device)
    frac = lower + width * u  # (R, n)
    return near[:, None] + (far - near)[:, None] * frac


def importance_depths(depths: torch.Tensor, weights: torch.Tensor, n: int) -> torch.Tensor:
    """(R, n) extra depths drawn deterministically from the piecewise-constant pdf of ``weights`` (R, S)."""
    mids = 0.5 * (depths[:, 1:] + depths[:, :-1])  # (R, S-1) bin edges between samples
    w = weights[:, 1:-1] + 1e-5  # (R, S-2) one weight per inner bin
    cdf = torch.cumsum(w / w.sum(-1, keepdim=True), -1)
    cdf = torch.cat([torch.zeros_like(cdf[:, :1]), cdf], -1)  # (R, S-1)
    u = torch.linspace(0.5 / n, 1 - 0.5 / n, n, device=depths.device).expand(depths.shape[0], n).contiguous()
    idx = torch.searchsorted(cdf, u, right=True).clamp(1, cdf.shape[-1] - 1)
    cdf_lo, cdf_hi = cdf.gather(-1, idx - 1), cdf.gather(-1, idx)
    bin_lo, bin_hi = mids.gather(-1, idx - 1), mids.gather(-1, idx)
    t = (u - cdf_lo) / (cdf_hi - cdf_lo).clamp(min=1e-9)
    return bin_lo + t * (bin_hi - bin_lo)


def composite(density: torch.Tensor, rgb: torch.Tensor, depths: torch.Tensor, far: torch.Tensor) -> dict[str, torch.Tensor]:
    """Alpha-composite samples front to back. density (R, S), rgb (R, S, 3), depths (R, S) sorted, far (R,).

    Returns rgb (R, 3) without background, opacity (R, 1), expected depth (R, 1), and the weights (R, S).
    """
    deltas = torch.cat([depths[:, 1:] - depths[:, :-1], (far[:, None] - depths[:, -1:]).clamp(min=0.0)], -1)
    alpha = 1.0 - torch.exp(-density * deltas)
    transmittance = torch.cumprod(torch.cat([torch.ones_like(alpha[:, :1]), 1.0 - alpha + 1e-10], -1), -1)[:, :-1]
    weights = alpha * transmittance
    opacity = weights.sum(-1, keepdim=True)
    return {
        "rgb": (weights[..., None] * rgb).sum(1),
        "opacity": opacity,
        "depth": (weights * depths).sum(-1, keepdim=True) / opacity.clamp(min=1e-6),
        "weights": weights,
    }


def _query_along(field: Field, origins: torch.Tensor, dirs: torch.Tensor, depths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    points = origins[:, None] + dirs[:, None] * depths[..., None]  # (R, S, 3)
    density, rgb = field.query(points.reshape(-1, 3))
    r, s = depths.shape
    return density.reshape(r, s).to(depths.dtype), rgb.reshape(r, s, 3).to(depths.dtype)


def render_rays(field: Field, origins: torch.Tensor, dirs: torch.Tensor, settings: RenderSettings | None = None,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Render rays (R, 3) through ``field``; rays missing the box get the background. Chunked over rays."""
    settings = settings or RenderSettings()
    out = {"rgb": [], "opacity": [], "depth": []}
    bg = torch.tensor(settings.background, dtype=origins.dtype, device=origins.device)
    for start in range(0, origins.shape[0], settings.chunk_rays):
        o, d = origins[start:start + settings.chunk_rays], dirs[start:start + settings.chunk_rays]
        near, far, hit = box_intersection(o, d, settings.box_radius)
        far = torch.where(hit, far, near + 1e-3)
        depths = stratified_depths(near, far, settings.coarse_samples, generator)
        density, rgb = _query_along(field, o, d, depths)
        if settings.fine_samples > 0:
            weights = composite(density, rgb, depths, far)["weights"]
            extra = importance_depths(depths, weights, settings.fine_samples)
            depths, order = torch.sort(torch.cat([depths, extra], -1), -1)
            extra_density, extra_rgb = _query_along(field, o, d, extra)
            density = torch.cat([density, extra_density], -1).gather(-1, order)
            rgb = torch.cat([rgb, extra_rgb], 1).gather(1, order[..., None].expand(-1, -1, 3))
        result = composite(density * hit[:, None], rgb, depths, far)
        out["rgb"].append(result["rgb"] + (1.0 - result["opacity"]) * bg)
        out["opacity"].append(result["opacity"])
        out["depth"].append(result["depth"])
    return {k: torch.cat(v, 0) for k, v in out.items()}


@torch.no_grad()
def render_view(field: Field, c2w: torch.Tensor, intrinsics: torch.Tensor, size: int,
                settings: RenderSettings | None = None, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Render a square image of ``size`` pixels: rgb (size, size, 3), opacity and depth (size, size, 1)."""
    origins, dirs = camera_rays(c2w, intrinsics, size, size)
    origins, dirs = origins.reshape(-1, 3).to(device), dirs.reshape(-1, 3).to(device)
    out = render_rays(field, origins, dirs, settings)
    return {k: v.reshape(size, size, -1).cpu() for k, v in out.items()}
