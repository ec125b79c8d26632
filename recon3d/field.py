"""Radiance fields: "what is at a point". The renderer and the mesh exporter only see this interface.

A field maps world points (P, 3) in the box [-1, 1]^3 to an activated density (P, 1) >= 0 and an sRGB colour
(P, 3) in [0, 1]. Triplane models (LRM, DMV3D) and grid fields (SDS) all end in one.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch
import torch.nn.functional as F

# (planes (N, 3, C, H, W), points (N, P, 3)) -> (density (N, P, 1), rgb (N, P, 3))
PlaneDecoder = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class Field(Protocol):
    """Anything with ``query(points (P, 3)) -> (density (P, 1), rgb (P, 3))``. A field may also have a
    ``device`` attribute: grid work then runs there (default CPU)."""

    def query(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


# The three planes and the two point coordinates each is sampled at (first indexes width, second height).
TRIPLANE_AXES = ((0, 1), (0, 2), (2, 1))  # (x, y), (x, z), (z, y)


def sample_triplane(planes: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Bilinear features of points from three axis-aligned planes, concatenated in plane order.

    planes (N, 3, C, H, W), points (N, P, 3) in [-1, 1] -> features (N, P, 3 * C). Outside the box the
    planes read as zero (zeros padding), as in training.
    """
    n, _, c, _, _ = planes.shape
    feats = []
    for plane_index, (a, b) in enumerate(TRIPLANE_AXES):
        coords = points[..., [a, b]].unsqueeze(1).to(planes.dtype)  # (N, 1, P, 2)
        sampled = F.grid_sample(planes[:, plane_index], coords, mode="bilinear",
                                padding_mode="zeros", align_corners=False)  # (N, C, 1, P)
        feats.append(sampled.squeeze(2).transpose(1, 2))  # (N, P, C)
    return torch.cat(feats, -1)


class TriplaneField:
    """One object's planes (1, 3, C, H, W) plus the model's decoder, seen as a :class:`Field`."""

    def __init__(self, planes: torch.Tensor, decode: PlaneDecoder):
        if planes.dim() != 5 or planes.shape[0] != 1 or planes.shape[1] != 3:
            raise ValueError(f"expected planes of shape (1, 3, C, H, W), got {tuple(planes.shape)}")
        self.planes = planes
        self.decode = decode

    @property
    def device(self) -> torch.device:
        return self.planes.device

    @torch.no_grad()
    def query(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pts = points.to(self.planes.device, self.planes.dtype).unsqueeze(0)  # (1, P, 3)
        density, rgb = self.decode(self.planes, pts)
        return density[0].float(), rgb[0].float()
