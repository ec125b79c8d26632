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
"""

from __future__ import annotations

import math

import torch

LRM_SOURCE_DISTANCE = 2.0
LRM_SOURCE_FX = 0.75  # normalised focal length of the LRM source camera (fov 67.4 deg)


def look_at(eye: torch.Tensor, target: torch.Tensor, up: torch.Tensor | None = None) -> torch.Tensor:
    """Camera-to-world (4, 4) for a camera at ``eye`` looking at ``target`` (OpenGL axes)."""
    eye, target = torch.as_tensor(eye, dtype=torch.float32), torch.as_tensor(target, dtype=torch.float32)
    up = torch.tensor([0.0, 0.0, 1.0]) if up is None else torch.as_tensor(up, dtype=torch.float32)
    back = eye - target  # camera +z points away from the target
    back = back / back.norm()
    right = torch.linalg.cross(up, back)
    if right.norm() < 1e-6:  # looking straight along `up`: pick any perpendicular right axis
        right = torch.linalg.cross(torch.tensor([0.0, 1.0, 0.0]), back)
    right = right / right.norm()
    true_up = torch.linalg.cross(back, right)
    c2w = torch.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, true_up, back, eye
    return c2w


def orbit_position(azimuth_deg: float, elevation_deg: float, distance: float) -> torch.Tensor:
    """World position (3,) on a sphere around the origin; azimuth 0, elevation 0 is (0, -distance, 0)."""
    az, el = math.radians(azimuth_deg), math.radians(elevation_deg)
    return torch.tensor([
        distance * math.sin(az) * math.cos(el),
        -distance * math.cos(az) * math.cos(el),
        distance * math.sin(el),
    ])


def orbit_camera(azimuth_deg: float, elevation_deg: float, distance: float) -> torch.Tensor:
    """Camera-to-world (4, 4) of a camera on an orbit looking at the origin, world z up."""
    return look_at(orbit_position(azimuth_deg, elevation_deg, distance), torch.zeros(3))


def orbit_cameras(n: int, elevation_deg: float, distance: float, start_azimuth_deg: float = 0.0) -> torch.Tensor:
    """``n`` cameras evenly spaced in azimuth: (n, 4, 4). Frame 0 is at ``start_azimuth_deg``."""
    return torch.stack([orbit_camera(start_azimuth_deg + 360.0 * k / n, elevation_deg, distance) for k in range(n)])


def intrinsics_from_fov(fov_deg: float) -> torch.Tensor:
    """Normalised intrinsics (4,) = (fx, fy, cx, cy) of a square image with the given field of view."""
    f = 0.5 / math.tan(math.radians(fov_deg) / 2)
    return torch.tensor([f, f, 0.5, 0.5])


def fov_from_focal(fx: float) -> float:
    """Field of view in degrees of a normalised focal length."""
    return math.degrees(2 * math.atan(0.5 / fx))


def lrm_camera_vector(c2w: torch.Tensor, intrinsics: torch.Tensor) -> torch.Tensor:
    """LRM's 16-number camera: the 3x4 camera-to-world row-major, then fx, fy, cx, cy (normalised)."""
    return torch.cat([c2w[..., :3, :4].reshape(*c2w.shape[:-2], 12), intrinsics.expand(*c2w.shape[:-2], 4)], -1)


def lrm_source_camera(distance: float = LRM_SOURCE_DISTANCE) -> torch.Tensor:
    """The canonical LRM source camera (16,): at (0, -distance, 0) looking along +y, fx = fy = 0.75."""
    c2w = orbit_camera(0.0, 0.0, distance)
    return lrm_camera_vector(c2w, torch.tensor([LRM_SOURCE_FX, LRM_SOURCE_FX, 0.5, 0.5]))


def camera_rays(c2w: torch.Tensor, intrinsics: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ray origins and unit directions through pixel centres, each (height, width, 3), in world coordinates."""
    fx, fy, cx, cy = intrinsics.tolist()
    rows = (torch.arange(height, dtype=torch.float32) + 0.5) / height
    cols = (torch.arange(width, dtype=torch.float32) + 0.5) / width
    v, u = torch.meshgrid(rows, cols, indexing="ij")  # (H, W) each
    dirs_cam = torch.stack([(u - cx) / fx, -(v - cy) / fy, -torch.ones_like(u)], -1)  # OpenGL: y up, look -z
    c2w = c2w.to(torch.float32)
    dirs = dirs_cam @ c2w[:3, :3].T
    dirs = dirs / dirs.norm(dim=-1, keepdim=True)
    origins = c2w[:3, 3].expand_as(dirs)
    return origins, dirs


def plucker_embedding(origins: torch.Tensor, dirs: torch.Tensor) -> torch.Tensor:
    """Plucker ray coordinates (..., 6) = (o x d, d) for unit directions: the per-pixel camera code of DMV3D."""
    return torch.cat([torch.linalg.cross(origins, dirs, dim=-1), dirs], -1)


def world_to_gltf(points: torch.Tensor) -> torch.Tensor:
    """(..., 3) world (z up, front -y) -> glTF (y up, front +z): (x, y, z) -> (x, z, -y)."""
    x, y, z = points.unbind(-1)
    return torch.stack([x, z, -y], -1)
