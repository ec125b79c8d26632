"""Volume rendering of any :class:`~recon3d.field.Field`: N objects x V cameras at once, differentiable.

Three small steps, kept apart: where to sample along a ray (:func:`box_intersection`, :func:`stratified_depths`,
:func:`importance_depths`), what is there (``field.query``), and how to composite (:func:`composite`).
Rays are processed in chunks of ``chunk_rays`` rays per object, so memory stays bounded at any resolution
(about N x chunk_rays x samples points at a time). With gradients on, each chunk is recomputed in the backward
pass instead of keeping its graph (``RenderSettings.recompute``), so training memory is bounded too: only the
chunk's rays and its outputs are kept. Everything runs on the field's device. Gradients flow from the images to
the field through the colours and densities; the sample positions are not differentiated (the importance
samples are drawn from detached weights). Jitter comes from one ``torch.Generator`` per object, drawn chunk by
chunk before the chunk is shaded (so a recomputed chunk sees the same samples), and object k renders the same
alone or in a batch.

How density and colour are treated between samples
    Ours: each sample stands for the interval up to the next sample (the last one up to the ray's exit from the
    box); the density and colour of the sample hold over that interval, alpha = 1 - exp(-density * delta), and
    the weights are alpha times the transmittance of the samples before it. Coarse samples are one per equal bin
    between the box entry and exit (the bin midpoint, or a uniform position in it with a generator); the fine
    samples are placed deterministically (evenly spaced quantiles) on the piecewise-constant distribution of the
    coarse weights, and coarse and fine samples are composited together, sorted by depth.
    OpenLRM's ray marcher (inherited from EG3D; read in its public code): coarse depths are an evenly spaced
    linspace from the box entry to the exit, each jittered forward by up to one spacing at random; raw density
    and colour are averaged between neighbouring samples and the density activation (softplus(raw - 1)) is
    applied to the averaged raw value, so S samples give S - 1 intervals and nothing beyond the last sample;
    alpha = 1 - exp(-density * delta); the transmittance product adds 1e-10 as ours does. Its importance
    samples are random (inverse-CDF at uniform draws) from the coarse weights smoothed by a max-pool then an
    average pool of width 2 plus 0.01; coarse and fine samples are composited together, sorted by depth.
    48 + 48 (small, base) or 64 + 64 (large) samples per ray; white or random backgrounds in training.
    So the two differ in (1) the value over an interval: ours holds the sample's activated density and
    colour after it, OpenLRM activates the mean of the raw values at both ends (the same in the limit of
    dense samples); (2) the last interval: ours extends to the box exit, so a surface right at the exit still
    counts; (3) fine samples: ours are deterministic, so a render repeats exactly without a generator.
    An LRM checkpoint is rendered with the samples per ray it was trained with (``rendering_samples_per_ray``
    split in half: see the image pipeline).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .cameras import camera_rays, intrinsics_from_fov, orbit_camera
from .cancel import NEVER, CancelToken
from .field import Field, as_field
from .noise import rand_tensor

# A constant colour (3,), a colour per ray (N, R, 3) (render_views also takes one per image, (N, V, 3)),
# or a function of unit ray directions (N, R, 3) -> colours (N, R, 3) (SDS's background network).
Background = tuple[float, float, float] | torch.Tensor | Callable[[torch.Tensor], torch.Tensor]


@dataclass
class RenderSettings:
    coarse_samples: int = 48
    fine_samples: int = 48
    chunk_rays: int = 4096  # rays of each object per chunk
    background: Background = (1.0, 1.0, 1.0)
    box_radius: float = 1.0  # rays are clipped to the box [-r, r]^3
    recompute: bool = True  # with gradients on, redo each chunk in backward rather than keep its graph


def box_intersection(origins: torch.Tensor, dirs: torch.Tensor, radius: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Entry and exit distances (...,) of rays (..., 3) with the box [-radius, radius]^3, and a hit mask (...,)."""
    safe = torch.where(dirs.abs() < 1e-9, torch.full_like(dirs, 1e-9), dirs)
    t0 = (-radius - origins) / safe
    t1 = (radius - origins) / safe
    near = torch.minimum(t0, t1).amax(-1).clamp(min=0.0)
    far = torch.maximum(t0, t1).amin(-1)
    return near, far, far > near


def stratified_depths(near: torch.Tensor, far: torch.Tensor, n: int,
                      generators: Sequence[torch.Generator] | None = None) -> torch.Tensor:
    """(N, R, n) depths for rays (N, R), one per equal bin between near and far: bin midpoints, or a uniform
    position in each bin drawn from ``generators[k]`` for object k (one generator per object)."""
    edges = torch.linspace(0.0, 1.0, n + 1, device=near.device)
    lower, width = edges[:-1], edges[1:] - edges[:-1]
    if generators is None:
        u = torch.full((*near.shape, n), 0.5, device=near.device)
    else:
        u = rand_tensor((*near.shape, n), list(generators), near.device)  # (N, R, n): row k from generators[k]
    frac = lower + width * u
    return near[..., None] + (far - near)[..., None] * frac


def importance_depths(depths: torch.Tensor, weights: torch.Tensor, n: int) -> torch.Tensor:
    """(..., n) extra depths placed deterministically on the piecewise-constant pdf of ``weights`` (..., S).
    The result carries no gradient: where to sample is not learned through."""
    depths, weights = depths.detach(), weights.detach()
    mids = 0.5 * (depths[..., 1:] + depths[..., :-1])  # (..., S-1) bin edges between samples
    w = weights[..., 1:-1] + 1e-5  # (..., S-2) one weight per inner bin
    cdf = torch.cumsum(w / w.sum(-1, keepdim=True), -1)
    cdf = torch.cat([torch.zeros_like(cdf[..., :1]), cdf], -1).contiguous()  # (..., S-1)
    u = torch.linspace(0.5 / n, 1 - 0.5 / n, n, device=depths.device).expand(*depths.shape[:-1], n).contiguous()
    idx = torch.searchsorted(cdf, u, right=True).clamp(1, cdf.shape[-1] - 1)
    cdf_lo, cdf_hi = cdf.gather(-1, idx - 1), cdf.gather(-1, idx)
    bin_lo, bin_hi = mids.gather(-1, idx - 1), mids.gather(-1, idx)
    t = (u - cdf_lo) / (cdf_hi - cdf_lo).clamp(min=1e-9)
    return bin_lo + t * (bin_hi - bin_lo)


def composite(density: torch.Tensor, rgb: torch.Tensor, depths: torch.Tensor, far: torch.Tensor) -> dict[str, torch.Tensor]:
    """Alpha-composite samples front to back. density (..., S), rgb (..., S, 3), depths (..., S) sorted, far (...,).

    Returns rgb (..., 3) without background, opacity (..., 1), expected depth (..., 1), and the weights (..., S).
    """
    deltas = torch.cat([depths[..., 1:] - depths[..., :-1], (far[..., None] - depths[..., -1:]).clamp(min=0.0)], -1)
    alpha = 1.0 - torch.exp(-density * deltas)
    transmittance = torch.cumprod(torch.cat([torch.ones_like(alpha[..., :1]), 1.0 - alpha + 1e-10], -1), -1)[..., :-1]
    weights = alpha * transmittance
    opacity = weights.sum(-1, keepdim=True)
    return {
        "rgb": (weights[..., None] * rgb).sum(-2),
        "opacity": opacity,
        "depth": (weights * depths).sum(-1, keepdim=True) / opacity.clamp(min=1e-6),
        "weights": weights,
    }


def query_along(field: Field, origins: torch.Tensor, dirs: torch.Tensor, depths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What is at ``depths`` (N, R, S) along rays (N, R, 3): density (N, R, S) and rgb (N, R, S, 3), float32."""
    points = origins[..., None, :] + dirs[..., None, :] * depths[..., None]  # (N, R, S, 3)
    n, r, s = depths.shape
    density, rgb = field.query(points.reshape(n, r * s, 3))
    return density.reshape(n, r, s), rgb.reshape(n, r, s, 3)


def background_colour(background: Background, dirs: torch.Tensor) -> torch.Tensor:
    """The background behind rays (N, R, 3): a colour per ray, broadcastable to (N, R, 3)."""
    if callable(background):
        return background(dirs)
    return torch.as_tensor(background, dtype=dirs.dtype, device=dirs.device)


def _render_chunk(field: Field, origins: torch.Tensor, dirs: torch.Tensor, settings: RenderSettings,
                  generators: Sequence[torch.Generator] | None) -> dict[str, torch.Tensor]:
    """One chunk of rays (N, R, 3): where to sample, then what is there and how it composites (no background).
    The random coarse depths are drawn here, outside the part that may be recomputed in backward."""
    near, far, hit = box_intersection(origins, dirs, settings.box_radius)  # (N, R) each
    far = torch.where(hit, far, near + 1e-3)
    depths = stratified_depths(near, far, settings.coarse_samples, generators)  # (N, R, S)
    if settings.recompute and torch.is_grad_enabled():
        from torch.utils.checkpoint import checkpoint

        return checkpoint(_shade_chunk, field, origins, dirs, depths, far, hit, settings.fine_samples,
                          use_reentrant=False, preserve_rng_state=False)  # _shade_chunk draws nothing
    return _shade_chunk(field, origins, dirs, depths, far, hit, settings.fine_samples)


def _shade_chunk(field: Field, origins: torch.Tensor, dirs: torch.Tensor, depths: torch.Tensor, far: torch.Tensor,
                 hit: torch.Tensor, fine_samples: int) -> dict[str, torch.Tensor]:
    """Query the coarse depths (N, R, S), add deterministic importance samples, composite. Deterministic, so
    recomputing it in backward gives the same graph."""
    density, rgb = query_along(field, origins, dirs, depths)
    if fine_samples > 0:
        weights = composite(density, rgb, depths, far)["weights"]
        extra = importance_depths(depths, weights, fine_samples)
        depths, order = torch.sort(torch.cat([depths, extra], -1), -1)
        extra_density, extra_rgb = query_along(field, origins, dirs, extra)
        density = torch.cat([density, extra_density], -1).gather(-1, order)
        rgb = torch.cat([rgb, extra_rgb], -2).gather(-2, order[..., None].expand(*order.shape, 3))
    return composite(density * hit[..., None], rgb, depths, far)


def render_rays(field: Field, origins: torch.Tensor, dirs: torch.Tensor, settings: RenderSettings | None = None,
                generators: Sequence[torch.Generator] | None = None) -> dict[str, torch.Tensor]:
    """Render rays (N, R, 3) of N objects (row k through object k): rgb (N, R, 3), opacity and depth (N, R, 1).

    Rays missing the box get the background. Chunked over rays; differentiable; ``generators`` (one per object)
    jitter the coarse samples, without them they sit at bin midpoints.
    """
    settings, field = settings or RenderSettings(), as_field(field)
    origins, dirs = origins.to(field.device, torch.float32), dirs.to(field.device, torch.float32)
    background = settings.background
    if isinstance(background, torch.Tensor) and background.dim() == 3:  # a colour per ray (N, R, 3)
        background = background.to(field.device, torch.float32)
    out = {"rgb": [], "opacity": [], "depth": []}
    for start in range(0, origins.shape[1], settings.chunk_rays):
        rays = slice(start, start + settings.chunk_rays)
        result = _render_chunk(field, origins[:, rays], dirs[:, rays], settings, generators)
        chunk_background = background[:, rays] if isinstance(background, torch.Tensor) and background.dim() == 3 \
            else background_colour(background, dirs[:, rays])
        out["rgb"].append(result["rgb"] + (1.0 - result["opacity"]) * chunk_background)
        out["opacity"].append(result["opacity"])
        out["depth"].append(result["depth"])
    return {k: torch.cat(v, 1) for k, v in out.items()}


def render_views(field: Field, c2w: torch.Tensor, intrinsics: torch.Tensor, height: int, width: int | None = None,
                 settings: RenderSettings | None = None,
                 generators: Sequence[torch.Generator] | None = None) -> dict[str, torch.Tensor]:
    """Render N objects from V cameras each: c2w (N, V, 4, 4), intrinsics (N, V, 4) or broadcastable (4,) ->
    rgb (N, V, H, W, 3), opacity and depth (N, V, H, W, 1), on the field's device, differentiable.

    ``settings.background`` may also be a colour per image (N, V, 3).
    """
    settings, field = settings or RenderSettings(), as_field(field)
    width = width or height
    n, v = c2w.shape[:2]
    origins, dirs = camera_rays(c2w.to(field.device), intrinsics.to(field.device), height, width)  # (N, V, H, W, 3)
    background = settings.background
    if isinstance(background, torch.Tensor) and background.dim() == 3:  # a colour per image -> per ray
        background = background.to(field.device, torch.float32)[:, :, None, None].expand(n, v, height, width, 3)
        settings = RenderSettings(**{**vars(settings), "background": background.reshape(n, -1, 3)})
    out = render_rays(field, origins.reshape(n, -1, 3), dirs.reshape(n, -1, 3), settings, generators)
    return {k: t.reshape(n, v, height, width, -1) for k, t in out.items()}


def render_view(field: Field, c2w: torch.Tensor, intrinsics: torch.Tensor, size: int,
                settings: RenderSettings | None = None) -> dict[str, torch.Tensor]:
    """One square image of a one-object field: rgb (size, size, 3), opacity and depth (size, size, 1), on the
    field's device."""
    out = render_views(field, c2w[None, None], intrinsics, size, size, settings)
    return {k: t[0, 0] for k, t in out.items()}


@torch.no_grad()
def render_orbit(field: Field, azimuths_deg: Sequence[float], elevation_deg: float, distance: float, fov_deg: float,
                 size: int, settings: RenderSettings | None = None, cancel: CancelToken = NEVER) -> torch.Tensor:
    """Every object of ``field`` seen from cameras on one orbit around the origin (looking at it, z up), one
    azimuth at a time (``cancel`` is checked between them): rgb (N, A, size, size, 3) in [0, 1] on the CPU.
    The turntable, the samples' comparison image and the SDS previews are all such orbits."""
    field = as_field(field)
    intrinsics = intrinsics_from_fov(fov_deg, field.device)  # (4,)
    views = []
    for azimuth in azimuths_deg:
        cancel.check()
        c2w = orbit_camera(float(azimuth), elevation_deg, distance, field.device)  # (4, 4)
        c2w = c2w.expand(field.num_objects, 1, 4, 4)
        views.append(render_views(field, c2w, intrinsics, size, size, settings)["rgb"].clamp(0, 1).cpu())
    return torch.cat(views, 1)  # (N, A, S, S, 3)
