"""What every triplane model (LRM, DMV3D) shares: planes (N, 3, C, H, W) read at points and decoded by the
model's own plane decoder, and the same planes seen as a :class:`~recon3d.field.TriplaneField`."""

from __future__ import annotations

import torch

from ..field import TriplaneField, sample_triplane


class TriplaneModel:
    """Mixin for an ``nn.Module`` that names its ``plane_decoder`` (features (..., 3C) -> float32 density
    (..., 1), rgb (..., 3)) and the density of its surface (``iso_level``)."""

    plane_decoder: torch.nn.Module
    iso_level: float

    def query_points(self, planes: torch.Tensor, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """planes (N, 3, C, H, W), points (N, P, 3) in [-1, 1]^3 -> float32 density (N, P, 1), rgb (N, P, 3).

        The lookup runs in float32 (see :func:`~recon3d.field.sample_triplane`); the decoder casts the features
        to its dtype."""
        return self.plane_decoder(sample_triplane(planes, points))

    def field(self, planes: torch.Tensor) -> TriplaneField:
        """Planes (N, 3, C, H, W) as a field for rendering and meshing, with the model's surface level."""
        return TriplaneField(planes, self.query_points, iso_level=self.iso_level)
