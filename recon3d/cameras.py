"""The one camera convention of recon3d.

World frame
    Right-handed, **z up**. The object lives in the box [-1, 1]^3. Its *front* is the side seen by the canonical
    source camera, which sits on the -y axis looking along +y. This is the frame of the LRM family (OpenLRM,
    DMV3D), so their planes need no conversion.

Camera frame
    OpenGL axes: x right, y up, the camera looks along its -z axis. A camera pose is a camera-to-world matrix
    ``c2w`` (4, 4) whose columns are the camera axes and position in world coordinates.

Intrinsics
    Normalised by image size: ``(fx, fy, cx, cy)`` with fx = focal / width, cx = principal point / width.
    Pixel (row i, column j) has its centre at u = (j + 0.5) / W, v = (i + 0.5) / H; row 0 is the top.

Export frame
    glTF is y up with +z toward the viewer: (x, y, z)_world -> (x, z, -y)_gltf, a proper rotation, so the front
    (world -y) faces +z and face winding is unchanged.

Azimuth 0 is the front (source) view; azimuth grows counter-clockwise seen from above (+z).

Batches
    Every function takes leading batch dimensions: poses (..., 4, 4), intrinsics (..., 4) (broadcast against the
    poses), rays (..., H, W, 3), e.g. (N, V) for N objects seen by V cameras each. Tensors are built on the device
    of their inputs (or ``device=``) without host round trips, so cameras cost nothing on a GPU.

Plucker coordinates
    A ray through origin o with unit direction d is (o x d, d) (6 numbers, independent of where o sits on the
    ray); per-pixel images of them, (N, V, 6, H, W), are DMV3D's camera code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .noise import rand_tensor

LRM_SOURCE_DISTANCE = 2.0
LRM_SOURCE_FX = 0.75  # normalised focal length of the LRM source camera (fov 67.4 deg)

Angle = float | torch.Tensor  # a number or a tensor of any shape


def _as_tensor(value: Angle | list[float], device: torch.device | str | None = None) -> torch.Tensor:
    """A float32 tensor on ``device`` (a tensor stays where it is when no device is asked)."""
    return torch.as_tensor(value, dtype=torch.float32, device=device)


def look_at(eye: torch.Tensor, target: torch.Tensor, up: torch.Tensor | None = None) -> torch.Tensor:
    """Camera-to-world (..., 4, 4) for cameras at ``eye`` (..., 3) looking at ``target`` (OpenGL axes)."""
    eye = _as_tensor(eye)
    target, up = _as_tensor(target, eye.device), _as_tensor([0.0, 0.0, 1.0] if up is None else up, eye.device)
    eye, target = torch.broadcast_tensors(eye, target)
    back = torch.nn.functional.normalize(eye - target, dim=-1)  # camera +z points away from the target
    right = torch.linalg.cross(up.expand_as(back), back, dim=-1)
    # looking straight along `up`: any perpendicular right axis will do
    fallback = torch.linalg.cross(torch.tensor([0.0, 1.0, 0.0], device=eye.device).expand_as(back), back, dim=-1)
    right = torch.where(right.norm(dim=-1, keepdim=True) < 1e-6, fallback, right)
    right = torch.nn.functional.normalize(right, dim=-1)
    true_up = torch.linalg.cross(back, right, dim=-1)
    rotation = torch.stack([right, true_up, back, eye], -1)  # (..., 3, 4): columns are axes and position
    bottom = torch.tensor([0.0, 0.0, 0.0, 1.0], device=eye.device).expand(*rotation.shape[:-2], 1, 4)
    return torch.cat([rotation, bottom], -2)


def orbit_position(azimuth_deg: Angle, elevation_deg: Angle, distance: Angle,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """World positions (..., 3) on spheres around the origin; azimuth 0, elevation 0 is (0, -distance, 0).
    The three arguments broadcast against each other."""
    az, el, r = (_as_tensor(v, device) for v in (azimuth_deg, elevation_deg, distance))
    az, el = torch.deg2rad(az), torch.deg2rad(el)
    return torch.stack(torch.broadcast_tensors(r * torch.sin(az) * torch.cos(el), -r * torch.cos(az) * torch.cos(el),
                                               r * torch.sin(el)), -1)


def orbit_camera(azimuth_deg: Angle, elevation_deg: Angle, distance: Angle,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """Camera-to-world (..., 4, 4) of cameras on orbits looking at the origin, world z up."""
    eye = orbit_position(azimuth_deg, elevation_deg, distance, device)
    return look_at(eye, torch.zeros(3, device=eye.device))


def orbit_cameras(n: int, elevation_deg: float, distance: float, start_azimuth_deg: float = 0.0,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """``n`` cameras evenly spaced in azimuth: (n, 4, 4). Frame 0 is at ``start_azimuth_deg``."""
    azimuths = start_azimuth_deg + 360.0 / n * torch.arange(n, device=device, dtype=torch.float32)
    return orbit_camera(azimuths, elevation_deg, distance, device)


def intrinsics_from_fov(fov_deg: Angle, device: torch.device | str | None = None) -> torch.Tensor:
    """Normalised intrinsics (..., 4) = (fx, fy, cx, cy) of square images with the given fields of view."""
    f = 0.5 / torch.tan(torch.deg2rad(_as_tensor(fov_deg, device)) / 2)
    half = torch.full_like(f, 0.5)
    return torch.stack([f, f, half, half], -1)


def fov_from_focal(fx: float) -> float:
    """Field of view in degrees of a normalised focal length."""
    return math.degrees(2 * math.atan(0.5 / fx))


def lrm_camera_vector(c2w: torch.Tensor, intrinsics: torch.Tensor) -> torch.Tensor:
    """LRM's 16-number camera: the 3x4 camera-to-world row-major, then fx, fy, cx, cy (normalised)."""
    return torch.cat([c2w[..., :3, :4].reshape(*c2w.shape[:-2], 12), intrinsics.expand(*c2w.shape[:-2], 4)], -1)


def lrm_source_camera(distance: float = LRM_SOURCE_DISTANCE, device: torch.device | str | None = None) -> torch.Tensor:
    """The canonical LRM source camera (16,): at (0, -distance, 0) looking along +y, fx = fy = 0.75."""
    c2w = orbit_camera(0.0, 0.0, distance, device)
    return lrm_camera_vector(c2w, torch.tensor([LRM_SOURCE_FX, LRM_SOURCE_FX, 0.5, 0.5], device=c2w.device))


def camera_rays(c2w: torch.Tensor, intrinsics: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ray origins and unit directions through pixel centres, each (..., height, width, 3), in world coordinates.

    c2w (..., 4, 4) and intrinsics (..., 4) broadcast against each other; everything stays on c2w's device."""
    c2w = c2w.to(torch.float32)
    intrinsics = intrinsics.to(c2w.device, torch.float32)
    lead = torch.broadcast_shapes(c2w.shape[:-2], intrinsics.shape[:-1])
    c2w, intrinsics = c2w.expand(*lead, 4, 4), intrinsics.expand(*lead, 4)
    fx, fy, cx, cy = (v[..., None, None] for v in intrinsics.unbind(-1))  # (..., 1, 1) each
    rows = (torch.arange(height, dtype=torch.float32, device=c2w.device) + 0.5) / height
    cols = (torch.arange(width, dtype=torch.float32, device=c2w.device) + 0.5) / width
    v, u = torch.meshgrid(rows, cols, indexing="ij")  # (H, W) each
    x, y = (u - cx) / fx, -(v - cy) / fy  # (..., H, W); OpenGL: y up, look along -z
    dirs_cam = torch.stack([x, y, -torch.ones_like(x)], -1)  # (..., H, W, 3)
    dirs = torch.einsum("...ij,...hwj->...hwi", c2w[..., :3, :3], dirs_cam)
    dirs = dirs / dirs.norm(dim=-1, keepdim=True)
    origins = c2w[..., None, None, :3, 3].expand_as(dirs)
    return origins, dirs


def plucker_embedding(origins: torch.Tensor, dirs: torch.Tensor) -> torch.Tensor:
    """Plucker ray coordinates (..., 6) = (o x d, d) for unit directions: the per-pixel camera code of DMV3D."""
    return torch.cat([torch.linalg.cross(origins, dirs, dim=-1), dirs], -1)


def plucker_images(c2w: torch.Tensor, intrinsics: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Per-pixel Plucker coordinates as images: c2w (..., 4, 4) -> (..., 6, height, width), e.g. (N, V, 6, H, W)."""
    return plucker_embedding(*camera_rays(c2w, intrinsics, height, width)).movedim(-1, -3)


@dataclass
class SampledCameras:
    """Random camera groups from :func:`sample_orbit_cameras`; every field has leading shape (N, V)."""

    c2w: torch.Tensor  # (N, V, 4, 4)
    intrinsics: torch.Tensor  # (N, V, 4)
    azimuth_deg: torch.Tensor  # (N, V)
    elevation_deg: torch.Tensor  # (N, V)
    fov_deg: torch.Tensor  # (N, V)
    distance: torch.Tensor  # (N, V)


def sample_orbit_cameras(groups: int, views: int, generator: torch.Generator,
                         elevation_range_deg: tuple[float, float] = (0.0, 30.0),
                         fov_range_deg: tuple[float, float] = (40.0, 70.0),
                         distance_range: tuple[float, float] = (2.0, 2.5),
                         azimuth_step_deg: float = 90.0,
                         device: torch.device | str | None = None,
                         distance_per_fov: bool = False, elevation_on_sphere: bool = False) -> SampledCameras:
    """``groups`` random groups of ``views`` cameras looking at the origin, for score distillation (MVDream).

    Within a group the views are ``azimuth_step_deg`` apart from a uniformly random start azimuth and share one
    elevation, field of view and distance, each uniform in its range. Every draw comes from ``generator`` (on its
    own device), so a seed gives the same cameras anywhere; the result is moved to ``device`` (default: the
    generator's). ``distance_per_fov``: the drawn distance is divided by tan(fov / 2) (MVDream's recipe), so an
    object of radius 1 fills about the same share of the image whatever the field of view.
    ``elevation_on_sphere``: the elevation is drawn uniformly on the sphere's band (asin of a uniform sine, as
    threestudio does for half of its batches) instead of uniformly in degrees: 0..30 deg then gives 0..19.5 deg,
    weighted toward the equator.
    """
    device = generator.device if device is None else device
    u = rand_tensor((groups, 4), generator, device)  # (N, 4), drawn on the generator's device

    def uniform(column: int, low_high: tuple[float, float]) -> torch.Tensor:
        low, high = low_high
        return (low + (high - low) * u[:, column:column + 1]).expand(groups, views)  # (N, V)

    steps = torch.arange(views, device=device, dtype=torch.float32) * azimuth_step_deg  # (V,)
    azimuth = (u[:, :1] * 360.0 + steps) % 360.0  # (N, V)
    elevation, fov = uniform(1, elevation_range_deg), uniform(2, fov_range_deg)
    if elevation_on_sphere:  # threestudio's "elevation_range_percent": the range mapped to [0, 1] of the sphere
        low, high = ((e + 90.0) / 180.0 for e in elevation_range_deg)
        elevation = torch.rad2deg(torch.asin(2 * uniform(1, (low, high)) - 1))
    distance = uniform(3, distance_range)
    if distance_per_fov:
        distance = distance / torch.tan(torch.deg2rad(fov) / 2)
    return SampledCameras(orbit_camera(azimuth, elevation, distance), intrinsics_from_fov(fov),
                          azimuth, elevation, fov, distance)


def world_to_gltf(points: torch.Tensor) -> torch.Tensor:
    """(..., 3) world (z up, front -y) -> glTF (y up, front +z): (x, y, z) -> (x, z, -y)."""
    x, y, z = points.unbind(-1)
    return torch.stack([x, z, -y], -1)
