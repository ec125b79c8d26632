"""Radiance fields: "what is at a point". The renderer and the mesh exporter only see this interface.

A field holds N objects and maps world points (N, P, 3) in the box [-1, 1]^3 (row k asks object k) to an
activated density (N, P, 1) >= 0 and an sRGB colour (N, P, 3) in [0, 1], both float32 whatever the field's own
dtype. ``query`` is differentiable: gradients reach whatever parameterises the field (planes, voxel grids,
decoder weights); inference entry points (pipelines, mesh export) switch gradients off, fields never do.
A field also states how finely it must be sampled (``sample_spacing``, world units) and the density of its
surface (``iso_level``; None when uncalibrated), so the mesher assumes neither. Triplane models (LRM, DMV3D),
the optimised neural triplane of score distillation (:class:`NeuralTriplaneField`), dense voxel grids
(:class:`GridField`) and analytic test objects (:class:`PointField`) all end in one.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .noise import randn_tensor

# (planes (N, 3, C, H, W), points (N, P, 3)) -> (density (N, P, 1), rgb (N, P, 3))
PlaneDecoder = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
# points (P, 3) -> (density (P, 1), rgb (P, 3)): one analytic object
PointFunction = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

DEFAULT_SAMPLE_SPACING = 2.0 / 64  # fields that do not say: one texel of a 64x64 triplane


class Field:
    """N objects seen as ``query(points (N, P, 3)) -> (density (N, P, 1), rgb (N, P, 3))``, float32."""

    num_objects: int = 1
    sample_spacing: float = DEFAULT_SAMPLE_SPACING  # the largest step that still sees every detail
    iso_level: float | None = None  # density of the surface; None: uncalibrated (the mesher picks one)

    @property
    def device(self) -> torch.device:
        """Where the field computes; callers build their points there."""
        return torch.device("cpu")

    def query(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def select(self, index: int) -> "Field":
        """Object ``index`` alone, as a field of one object (meshes are made one object at a time)."""
        _check_index(index, self.num_objects)
        return self


def _check_index(index: int, count: int) -> None:
    if not 0 <= index < count:
        raise IndexError(f"object index {index} out of range for a field of {count} objects")


class PointField(Field):
    """One analytic object from a function of points (P, 3); every query row asks the same object."""

    def __init__(self, function: PointFunction, sample_spacing: float = DEFAULT_SAMPLE_SPACING,
                 iso_level: float | None = None):
        self.function, self.sample_spacing, self.iso_level = function, sample_spacing, iso_level

    def query(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        density, rgb = self.function(points.reshape(-1, 3))  # (N*P, 1), (N*P, 3)
        lead = points.shape[:-1]
        return density.reshape(*lead, 1).float(), rgb.reshape(*lead, 3).float()


def as_field(field: Field | object) -> Field:
    """A :class:`Field` as is; any other object with ``query(points (P, 3))`` (analytic objects, older code) as a
    :class:`PointField`, keeping the ``sample_spacing`` and ``iso_level`` it states."""
    if isinstance(field, Field):
        return field
    return PointField(field.query, getattr(field, "sample_spacing", DEFAULT_SAMPLE_SPACING),
                      getattr(field, "iso_level", None))


# The three planes and the two point coordinates each is sampled at (first indexes width, second height).
TRIPLANE_AXES = ((0, 1), (0, 2), (2, 1))  # (x, y), (x, z), (z, y)


def sample_triplane(planes: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Bilinear features of points from three axis-aligned planes, concatenated in plane order.

    planes (N, 3, C, H, W) of any dtype, points (N, P, 3) in [-1, 1] -> float32 features (N, P, 3 * C). Outside
    the box the planes read as zero (zeros padding), as in training.

    Coordinates and ``grid_sample`` run in float32 whatever the planes' dtype: a half-precision coordinate moves a
    point by up to a quarter texel, and on CPU the half-precision ``grid_sample`` kernel reads garbage (NaN) from
    planes in channels-last layout, which is how the LRM's transposed convolution returns them.
    All three planes go through one ``grid_sample`` call: on CPU (2 threads, 64x64 planes, 262144 points) it
    takes 112 ms against 242 ms for one call per plane at C=32, 272 vs 631 ms at C=80, with identical results.
    """
    n, _, c, h, w = planes.shape
    p = points.shape[1]
    axes = torch.tensor(TRIPLANE_AXES, device=points.device)
    coords = points.float()[..., axes]  # (N, P, 3, 2)
    coords = coords.permute(0, 2, 1, 3).reshape(n * 3, 1, p, 2)  # one row of points per plane
    sampled = F.grid_sample(planes.float().reshape(n * 3, c, h, w), coords, mode="bilinear",
                            padding_mode="zeros", align_corners=False)  # (N*3, C, 1, P)
    return sampled.reshape(n, 3, c, p).permute(0, 3, 1, 2).reshape(n, p, 3 * c)


class TriplaneField(Field):
    """N objects' planes (N, 3, C, H, W) plus the model's decoder, seen as a :class:`Field`.

    ``decode(planes, points)`` samples and decodes (e.g. ``LRM.query_points``). One texel is the finest detail,
    so the field asks to be sampled every 2 / H world units.
    """

    def __init__(self, planes: torch.Tensor, decode: PlaneDecoder, iso_level: float | None = None):
        if planes.dim() != 5 or planes.shape[1] != 3:
            raise ValueError(f"expected planes of shape (N, 3, C, H, W), got {tuple(planes.shape)}")
        self.planes, self.decode, self.iso_level = planes, decode, iso_level

    @property
    def num_objects(self) -> int:
        return self.planes.shape[0]

    @property
    def sample_spacing(self) -> float:
        return 2.0 / max(self.planes.shape[-2:])

    @property
    def device(self) -> torch.device:
        return self.planes.device

    def query(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        density, rgb = self.decode(self.planes, points.to(self.device, torch.float32))
        return density.float(), rgb.float()

    def select(self, index: int) -> "TriplaneField":
        _check_index(index, self.num_objects)
        return TriplaneField(self.planes[index:index + 1], self.decode, self.iso_level)


class GridField(Field):
    """N objects as dense voxel grids, trilinearly interpolated: density (N, 1, R, R, R) >= 0 and rgb
    (N, 3, R, R, R) in [0, 1], index order (x, y, z), grid point i at -1 + 2 i / (R - 1) (the mesher's lattice).

    The grids are used as given, so an optimiser (SDS) can hold raw parameters and pass activated grids
    (e.g. softplus, sigmoid) each step; gradients flow to them. Outside the box the density is zero.
    """

    def __init__(self, density: torch.Tensor, rgb: torch.Tensor, iso_level: float | None = None):
        if density.dim() != 5 or density.shape[1] != 1 or rgb.shape != (density.shape[0], 3, *density.shape[2:]):
            raise ValueError(f"expected density (N, 1, X, Y, Z) and rgb (N, 3, X, Y, Z), got "
                             f"{tuple(density.shape)} and {tuple(rgb.shape)}")
        self.density, self.rgb, self.iso_level = density, rgb, iso_level

    @property
    def num_objects(self) -> int:
        return self.density.shape[0]

    @property
    def sample_spacing(self) -> float:
        return 2.0 / (max(self.density.shape[2:]) - 1)

    @property
    def device(self) -> torch.device:
        return self.density.device

    def query(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, p = points.shape[:2]
        # grid_sample's last coordinate indexes the first spatial axis: (x, y, z) -> (z, y, x)
        coords = points.to(self.device, torch.float32).flip(-1).reshape(n, 1, 1, p, 3)
        density, rgb = (F.grid_sample(grid.float(), coords, mode="bilinear", padding_mode="zeros",
                                      align_corners=True).reshape(n, -1, p).transpose(1, 2)  # (N, P, 1 or 3)
                        for grid in (self.density, self.rgb))
        return density, rgb

    def select(self, index: int) -> "GridField":
        _check_index(index, self.num_objects)
        return GridField(self.density[index:index + 1], self.rgb[index:index + 1], self.iso_level)


class NeuralTriplaneField(torch.nn.Module, Field):
    """One object to optimise (score distillation): learnable planes read with :func:`sample_triplane`, a small
    MLP to raw density and colour, a density "blob" bias near the centre and a softplus density, sigmoid colour.
    Pure PyTorch (``grid_sample``), differentiable, float32.

    Why a triplane: it holds 3 C R^2 numbers instead of a dense grid's C R^3, so at the same memory it resolves
    far finer detail, its bilinear reads are one ``grid_sample`` call, and the shared MLP smooths what SDS's noisy
    gradients write into neighbouring texels (measured against a dense grid: bench/sds_field.py).

    Levels: with ``levels`` L > 1 the field holds L triplanes of C channels each, from ``resolution / 2^(L-1)``
    up to ``resolution`` (each twice the one before), and the MLP reads their features side by side, as a hash
    grid's levels are read (the reference's field: 16 levels up to 4096). Coarse levels give every point a smooth
    shape that SDS's early, noisy gradients can move as a whole; fine levels add the detail that a single coarse
    plane cannot hold and that a single fine plane learns only slowly (each texel sees few gradients).

    The blob, ``blob_density * (1 - |x| / blob_radius)`` added to the raw density (MVDream's "magic3d" blob: +10
    at the centre, 0 at |x| = 0.5, negative beyond), starts every run from a soft ball at the centre with empty
    space around it, so early renders have something to shade and floaters far out are discouraged. The surface is
    exported at density 25, the reference's iso-surface threshold (a 0.04-unit slab at that density is 63 %
    opaque), so haze stays haze; the start blob has no surface there yet, and the exporter then falls back to
    an automatic level and says so.
    """

    def __init__(self, generator: torch.Generator, resolution: int = 128, channels: int = 16, hidden: int = 64,
                 blob_density: float = 10.0, blob_radius: float = 0.5, iso_level: float | None = 25.0,
                 levels: int = 1):
        torch.nn.Module.__init__(self)
        if levels < 1 or resolution >> (levels - 1) < 2:
            raise ValueError(f"{levels} levels up to {resolution} leave a coarsest plane under 2 texels")
        sizes = [resolution >> (levels - 1 - level) for level in range(levels)]  # coarse to fine
        self.levels = torch.nn.ParameterList(
            torch.nn.Parameter(0.1 * randn_tensor((1, 3, channels, size, size), generator)) for size in sizes)
        inputs = 3 * channels * levels
        self.hidden = torch.nn.Parameter(randn_tensor((inputs, hidden), generator) / inputs ** 0.5)
        self.hidden_bias = torch.nn.Parameter(torch.zeros(hidden))
        self.out = torch.nn.Parameter(randn_tensor((hidden, 4), generator) / hidden ** 0.5)
        self.out_bias = torch.nn.Parameter(torch.zeros(4))
        self.blob_density, self.blob_radius, self.iso_level = blob_density, blob_radius, iso_level

    @property
    def planes(self) -> torch.nn.Parameter:
        """The finest level's planes (1, 3, C, R, R)."""
        return self.levels[-1]

    def grid_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.levels)

    def decoder_parameters(self) -> list[torch.nn.Parameter]:
        return [self.hidden, self.hidden_bias, self.out, self.out_bias]

    @property
    def sample_spacing(self) -> float:
        return 2.0 / self.planes.shape[-1]

    @property
    def device(self) -> torch.device:
        return self.planes.device

    def query(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        points = points.to(self.device, torch.float32)
        features = torch.cat([sample_triplane(planes, points) for planes in self.levels], -1)  # (1, P, 3CL)
        raw = F.silu(features @ self.hidden + self.hidden_bias) @ self.out + self.out_bias  # (1, P, 4)
        blob = self.blob_density * (1 - points.norm(dim=-1, keepdim=True) / self.blob_radius)
        return F.softplus(raw[..., :1] + blob), torch.sigmoid(raw[..., 1:])
