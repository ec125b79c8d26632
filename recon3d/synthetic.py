"""Procedural coloured objects: a multi-view training set that needs no download.

Each object is one or two parts (box, sphere, cylinder, cone, torus) with a colour on its front half (world -y,
the side a source photo shows) and another on its back half, so a model must learn to guess the unseen side.
Parts are signed distance functions; density rises smoothly across the surface, so the objects render and mesh
like any field. :func:`write_dataset` renders them with recon3d's own renderer into the folder format of
:mod:`recon3d.datasets`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .noise import rand_tensor, randint, seeded

KINDS = ("box", "sphere", "cylinder", "cone", "torus")
DENSITY_PEAK = 60.0  # density inside; half of it at the surface, the iso-level for meshing
SURFACE_WIDTH = 0.01  # density rises from 12% to 88% of the peak within +-2 widths of the surface


@dataclass
class Part:
    kind: str
    centre: torch.Tensor  # (3,)
    size: torch.Tensor  # (3,): half extents (box), radius (sphere), radius/half height (cylinder, cone), radii (torus)
    rotation: torch.Tensor  # (3, 3) world from part
    front: torch.Tensor  # (3,) sRGB on the -y half of the object
    back: torch.Tensor  # (3,) sRGB on the +y half

    def sdf(self, points: torch.Tensor) -> torch.Tensor:
        """Signed distance (P,) of world points (P, 3): negative inside."""
        p = (points - self.centre) @ self.rotation  # (P, 3) in the part's frame
        a, b, c = self.size.tolist()
        if self.kind == "sphere":
            return p.norm(dim=-1) - a
        if self.kind == "box":
            q = p.abs() - self.size
            return q.clamp(min=0).norm(dim=-1) + q.amax(-1).clamp(max=0)
        radial = p[:, :2].norm(dim=-1)
        if self.kind == "cylinder":
            d = torch.stack([radial - a, p[:, 2].abs() - b], -1)
            return d.clamp(min=0).norm(dim=-1) + d.amax(-1).clamp(max=0)
        if self.kind == "cone":  # apex up, base radius a, half height b: a cylinder narrowing linearly (bound)
            t = ((p[:, 2] + b) / (2 * b)).clamp(0, 1)
            d = torch.stack([(radial - a * (1 - t)) * (2 * b) / math.hypot(a, 2 * b), p[:, 2].abs() - b], -1)
            return d.clamp(min=0).norm(dim=-1) + d.amax(-1).clamp(max=0)
        if self.kind == "torus":  # ring radius a, tube radius b, in the part's xy plane
            return torch.stack([radial - a, p[:, 2]], -1).norm(dim=-1) - b
        raise ValueError(f"unknown part kind {self.kind!r}")


class ProceduralObject:
    """The union of parts as a field of one object: ``query(points (P, 3)) -> density (P, 1), rgb (P, 3)``."""

    iso_level = DENSITY_PEAK / 2
    sample_spacing = 2.0 / 128

    def __init__(self, parts: list[Part]):
        self.parts = parts

    def query(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        distances = torch.stack([part.sdf(points) for part in self.parts], -1)  # (P, parts)
        sdf, nearest = distances.min(-1)
        density = DENSITY_PEAK * torch.sigmoid(-sdf / SURFACE_WIDTH)
        front = torch.stack([part.front for part in self.parts])[nearest]  # (P, 3)
        back = torch.stack([part.back for part in self.parts])[nearest]
        on_front = (points[:, 1:2] < 0).to(front.dtype)
        return density[:, None], on_front * front + (1 - on_front) * back


def _uniform(generator: torch.Generator, low: float, high: float, n: int = 1) -> torch.Tensor:
    return low + (high - low) * rand_tensor((n,), generator)


def _rotation_about_z(angle: float) -> torch.Tensor:
    c, s = math.cos(angle), math.sin(angle)
    return torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def random_part(generator: torch.Generator, kind: str | None = None, scale: float = 1.0) -> Part:
    kind = kind or KINDS[randint(0, len(KINDS), generator)]
    size = {"box": _uniform(generator, 0.2, 0.5, 3), "sphere": _uniform(generator, 0.3, 0.55, 3),
            "cylinder": torch.cat([_uniform(generator, 0.2, 0.45), _uniform(generator, 0.25, 0.55), torch.zeros(1)]),
            "cone": torch.cat([_uniform(generator, 0.25, 0.5), _uniform(generator, 0.25, 0.55), torch.zeros(1)]),
            "torus": torch.cat([_uniform(generator, 0.3, 0.45), _uniform(generator, 0.08, 0.15), torch.zeros(1)])}[kind]
    front, back = rand_tensor((3,), generator), rand_tensor((3,), generator)
    rotation = _rotation_about_z(float(_uniform(generator, 0.0, 2 * math.pi)))
    return Part(kind, torch.zeros(3), size * scale, rotation, front, back)


def random_object(generator: torch.Generator) -> ProceduralObject:
    """One part (60%) or two parts side by side or stacked (40%), inside the box [-0.8, 0.8]^3."""
    if float(rand_tensor((1,), generator)) < 0.6:
        return ProceduralObject([random_part(generator)])
    first, second = random_part(generator, scale=0.7), random_part(generator, scale=0.55)
    axis = randint(0, 3, generator)  # side by side along x or y, or stacked along z
    offset = torch.zeros(3)
    offset[axis] = 0.3
    first.centre, second.centre = -offset, offset
    return ProceduralObject([first, second])


@dataclass
class ViewLayout:
    """Where a dataset's cameras are: ``ring`` views evenly spaced at elevation 0 (DMV3D's input circle, start
    azimuth random per object) plus ``extra`` views at random azimuths and elevations (held-out views)."""

    ring: int = 8
    extra: int = 4
    extra_elevation_deg: tuple[float, float] = (15.0, 45.0)
    distance: float = 2.0
    fov_deg: float = 50.0

    def input_groups(self, views: int = 4) -> list[list[int]]:
        """Ring views evenly spaced around the object, ``views`` at a time: DMV3D's input layout."""
        if self.ring % views:
            return []
        step = self.ring // views
        return [[start + k * step for k in range(views)] for start in range(step)]

    def cameras(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """c2w (V, 4, 4) and normalised intrinsics (V, 4)."""
        from . import cameras

        start = float(_uniform(generator, 0.0, 360.0))
        azimuths = [start + 360.0 * k / self.ring for k in range(self.ring)]
        elevations = [0.0] * self.ring
        azimuths += _uniform(generator, 0.0, 360.0, self.extra).tolist()
        elevations += _uniform(generator, *self.extra_elevation_deg, self.extra).tolist()
        c2w = torch.stack([cameras.orbit_camera(a, e, self.distance) for a, e in zip(azimuths, elevations)])
        return c2w, cameras.intrinsics_from_fov(self.fov_deg).expand(len(azimuths), 4)


def render_object(obj: ProceduralObject, c2w: torch.Tensor, intrinsics: torch.Tensor, size: int,
                  samples: int = 64) -> torch.Tensor:
    """RGBA renders (V, size, size, 4) in [0, 1]: colour without background, alpha = opacity."""
    from .render import RenderSettings, render_view

    settings = RenderSettings(coarse_samples=samples // 2, fine_samples=samples - samples // 2,
                              background=(0.0, 0.0, 0.0))
    views = []
    with torch.no_grad():
        for pose, k in zip(c2w, intrinsics):
            out = render_view(obj, pose, k, size, settings)
            views.append(torch.cat([out["rgb"], out["opacity"]], -1))
    return torch.stack(views).clamp(0, 1)


def write_dataset(folder: str | Path, count: int, size: int = 64, seed: int = 0,
                  layout: ViewLayout | None = None, progress=None) -> Path:
    """Render ``count`` random objects into ``folder`` in the :mod:`recon3d.datasets` format."""
    from .datasets import FORMAT, write_object

    layout = layout or ViewLayout()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dataset.json").write_text(json.dumps({"format": FORMAT, "objects": count, "image_size": size,
                                                     "input_groups": layout.input_groups()}))
    for index in range(count):
        generator = seeded(seed * 1_000_003 + index)  # object k is the same in any run
        obj = random_object(generator)
        c2w, intrinsics = layout.cameras(generator)
        write_object(folder / f"obj-{index:05d}", render_object(obj, c2w, intrinsics, size), c2w, intrinsics)
        if progress is not None:
            progress(index + 1, count)
    return folder
