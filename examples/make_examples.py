"""Make the example inputs: simple shaded objects built from signed distance functions, rendered with
recon3d's own volume renderer to RGBA PNGs (alpha = opacity). Run: ``python examples/make_examples.py``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from recon3d import cameras
from recon3d.render import RenderSettings, render_view

HERE = Path(__file__).parent
LIGHT = torch.tensor([-0.4, -0.7, 0.6]) / torch.tensor([-0.4, -0.7, 0.6]).norm()


def sphere(p, c, r):
    return (p - torch.tensor(c)).norm(dim=-1) - r


def box(p, c, half):
    q = (p - torch.tensor(c)).abs() - torch.tensor(half)
    return q.clamp(min=0).norm(dim=-1) + q.amax(-1).clamp(max=0)


def cylinder_z(p, c, r, half_h):
    q = p - torch.tensor(c)
    d = torch.stack([q[:, :2].norm(dim=-1) - r, q[:, 2].abs() - half_h], -1)
    return d.clamp(min=0).norm(dim=-1) + d.amax(-1).clamp(max=0)


def cone_z(p, base_z, r, height):
    q_r, q_z = p[:, :2].norm(dim=-1), p[:, 2] - base_z
    slope = r / height
    side = (q_r - (height - q_z) * slope) / (1 + slope ** 2) ** 0.5
    return torch.maximum(side, torch.maximum(-q_z, q_z - height))


def torus_y(p, c, major, minor):  # ring in the x-z plane
    q = p - torch.tensor(c)
    return torch.stack([q[:, [0, 2]].norm(dim=-1) - major, q[:, 1]], -1).norm(dim=-1) - minor


class ShadedSDF:
    """A union of coloured parts as a field: sharp density inside, Lambert-shaded colour."""

    def __init__(self, parts):
        self.parts = parts  # list of (sdf(p) -> (P,), rgb)

    def sdf_and_albedo(self, p):
        dists = torch.stack([f(p) for f, _ in self.parts], -1)  # (P, K)
        d, idx = dists.min(-1)
        colours = torch.tensor([c for _, c in self.parts], dtype=torch.float32)
        return d, colours[idx]

    def query(self, p):
        d, albedo = self.sdf_and_albedo(p)
        eps = 2e-3
        grad = torch.stack([(self.sdf_and_albedo(p + e)[0] - d) / eps for e in torch.eye(3) * eps], -1)
        normal = grad / grad.norm(dim=-1, keepdim=True).clamp(min=1e-6)
        shade = 0.45 + 0.55 * (normal @ LIGHT).clamp(min=0)
        density = 400.0 * torch.sigmoid(-d * 150.0)
        return density[:, None], (albedo * shade[:, None]).clamp(0, 1)


def objects():
    red, white, yellow, orange = (0.85, 0.12, 0.1), (0.95, 0.95, 0.93), (0.98, 0.85, 0.15), (0.95, 0.5, 0.1)
    brown, green, blue, black = (0.5, 0.3, 0.15), (0.2, 0.65, 0.25), (0.15, 0.35, 0.85), (0.08, 0.08, 0.08)
    return {
        "snowman": [(lambda p: sphere(p, (0, 0, -0.45), 0.4), white), (lambda p: sphere(p, (0, 0, 0.15), 0.3), white),
                    (lambda p: sphere(p, (0, 0, 0.58), 0.21), white), (lambda p: sphere(p, (0, -0.22, 0.6), 0.05), orange),
                    (lambda p: sphere(p, (-0.08, -0.18, 0.66), 0.03), black), (lambda p: sphere(p, (0.08, -0.18, 0.66), 0.03), black)],
        "mushroom": [(lambda p: torch.maximum(sphere(p, (0, 0, 0.05), 0.6), -(p[:, 2] - 0.05)), red),
                     (lambda p: cylinder_z(p, (0, 0, -0.35), 0.18, 0.4), white),
                     (lambda p: sphere(p, (0.25, -0.35, 0.4), 0.09), white)],
        "duck": [(lambda p: sphere(p * torch.tensor([0.8, 1.0, 1.25]), (0, 0.05, -0.35), 0.45), yellow),
                 (lambda p: sphere(p, (0, -0.2, 0.25), 0.3), yellow),
                 (lambda p: box(p, (0, -0.52, 0.22), (0.12, 0.1, 0.04)), orange),
                 (lambda p: sphere(p, (-0.13, -0.42, 0.35), 0.04), black), (lambda p: sphere(p, (0.13, -0.42, 0.35), 0.04), black)],
        "table": [(lambda p: box(p, (0, 0, 0.25), (0.75, 0.5, 0.06)), brown)]
                 + [(lambda p, x=x, y=y: box(p, (x, y, -0.3), (0.06, 0.06, 0.5)), brown) for x in (-0.6, 0.6) for y in (-0.35, 0.35)],
        "tree": [(lambda p: cone_z(p, -0.3, 0.55, 1.1), green), (lambda p: cylinder_z(p, (0, 0, -0.55), 0.12, 0.28), brown),
                 (lambda p: sphere(p, (0, 0, 0.82), 0.08), yellow)],
        "blocks": [(lambda p: box(p, (-0.35, 0, -0.5), (0.3, 0.3, 0.3)), red), (lambda p: box(p, (0.35, 0.05, -0.5), (0.3, 0.3, 0.3)), blue),
                   (lambda p: box(p, (0, 0, 0.1), (0.3, 0.3, 0.3)), yellow)],
        "mug": [(lambda p: torch.maximum(cylinder_z(p, (0, 0, 0), 0.45, 0.5), -cylinder_z(p, (0, 0, 0.1), 0.38, 0.5)), blue),
                (lambda p: torus_y(p, (0.5, 0, 0), 0.25, 0.06), blue)],
        "pawn": [(lambda p: sphere(p, (0, 0, 0.55), 0.22), white), (lambda p: cylinder_z(p, (0, 0, 0.25), 0.26, 0.04), white),
                 (lambda p: cone_z(p, -0.6, 0.32, 1.1), white), (lambda p: cylinder_z(p, (0, 0, -0.65), 0.42, 0.08), white)],
    }


def render_example(parts, size: int = 320) -> Image.Image:
    c2w = cameras.orbit_camera(-20.0, 12.0, 3.2)
    settings = RenderSettings(coarse_samples=128, fine_samples=64, background=(0.0, 0.0, 0.0))
    out = render_view(ShadedSDF(parts), c2w, cameras.intrinsics_from_fov(40.0), size, settings)
    opacity = out["opacity"].clamp(0, 1)
    rgb = (out["rgb"] / opacity.clamp(min=1e-4)).clamp(0, 1)  # un-premultiply
    rgba = torch.cat([rgb, opacity], -1).numpy()
    return Image.fromarray((rgba * 255 + 0.5).astype(np.uint8), "RGBA")


if __name__ == "__main__":
    for name, parts in objects().items():
        render_example(parts).save(HERE / f"{name}.png", optimize=True)
        print("wrote", HERE / f"{name}.png")
