import math

import pytest
import torch

from recon3d import cameras


def test_source_camera_is_the_published_default():
    expected = torch.tensor([1, 0, 0, 0, 0, 0, -1, -2, 0, 1, 0, 0, 0.75, 0.75, 0.5, 0.5], dtype=torch.float32)
    assert torch.allclose(cameras.lrm_source_camera(2.0), expected, atol=1e-6)
    assert cameras.lrm_source_camera(1.5)[7] == -1.5


def test_orbit_camera_looks_at_origin_with_z_up():
    for az, el in [(0, 0), (90, 0), (37, 25), (200, -40)]:
        c2w = cameras.orbit_camera(az, el, 2.5)
        rot, eye = c2w[:3, :3], c2w[:3, 3]
        assert torch.allclose(rot.T @ rot, torch.eye(3), atol=1e-5)
        assert math.isclose(torch.det(rot).item(), 1.0, abs_tol=1e-5)
        forward = -rot[:, 2]  # OpenGL: the camera looks along its -z axis
        assert torch.allclose(forward, -eye / eye.norm(), atol=1e-5)
        assert rot[2, 1] == pytest.approx(math.cos(math.radians(el)), abs=1e-5)  # up tilts with elevation
    # azimuth 90 moves the camera to +x (counter-clockwise seen from above, starting at -y)
    assert torch.allclose(cameras.orbit_position(90, 0, 2), torch.tensor([2.0, 0.0, 0.0]), atol=1e-6)


def test_rays_of_source_camera():
    c2w = cameras.orbit_camera(0, 0, 2.0)
    intr = torch.tensor([0.75, 0.75, 0.5, 0.5])
    origins, dirs = cameras.camera_rays(c2w, intr, 8, 8)
    assert origins.shape == dirs.shape == (8, 8, 3)
    assert torch.allclose(dirs.norm(dim=-1), torch.ones(8, 8))
    centre = dirs[3:5, 3:5].mean((0, 1))
    assert centre[1] > 0.99  # looks along +y
    assert dirs[0, 4, 2] > 0 and dirs[7, 4, 2] < 0  # top row points up (+z)
    assert dirs[4, 7, 0] > 0 and dirs[4, 0, 0] < 0  # right column points to +x
    # the outermost pixel centre sits at u = 15/16, i.e. tan = (7/16) / 0.75 from the axis
    assert math.isclose(dirs[4, 7, 0].item() / dirs[4, 7, 1].item(), (7 / 16) / 0.75, rel_tol=1e-4)


def test_fov_and_intrinsics_roundtrip():
    assert math.isclose(cameras.fov_from_focal(0.75), 67.38, abs_tol=0.01)
    assert math.isclose(cameras.intrinsics_from_fov(50.0)[0].item(), 0.5 / math.tan(math.radians(25)), rel_tol=1e-6)


def test_plucker_moment_is_the_same_along_a_ray():
    o, d = torch.tensor([[0.3, -2.0, 0.1]]), torch.nn.functional.normalize(torch.tensor([[0.1, 1.0, -0.2]]), dim=-1)
    a = cameras.plucker_embedding(o, d)
    b = cameras.plucker_embedding(o + 0.7 * d, d)
    assert a.shape == (1, 6) and torch.allclose(a, b, atol=1e-6)
    assert torch.allclose(a[:, 3:], d)


def test_world_to_gltf_puts_front_to_plus_z_and_up_to_plus_y():
    points = torch.tensor([[0.0, -1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    out = cameras.world_to_gltf(points)
    assert torch.equal(out, torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))
    basis = cameras.world_to_gltf(torch.eye(3))
    assert math.isclose(torch.det(basis).item(), 1.0)  # a rotation: winding is preserved
