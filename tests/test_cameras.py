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


def test_batched_cameras_equal_one_at_a_time():
    az, el = torch.tensor([[0.0, 90.0, 200.0], [37.0, -40.0, 123.0]]), torch.tensor([[0.0, 10.0, 25.0], [5.0, -30.0, 60.0]])
    c2w = cameras.orbit_camera(az, el, 2.5)
    assert c2w.shape == (2, 3, 4, 4)
    for i in range(2):
        for j in range(3):
            assert torch.allclose(c2w[i, j], cameras.orbit_camera(az[i, j].item(), el[i, j].item(), 2.5), atol=1e-6)
    assert torch.equal(c2w[..., 3, :], torch.tensor([0.0, 0.0, 0.0, 1.0]).expand(2, 3, 4))
    top = cameras.orbit_camera(0.0, 90.0, 2.0)  # looking straight down the up axis: still a rotation
    assert math.isclose(torch.det(top[:3, :3]).item(), 1.0, abs_tol=1e-5)
    intrinsics = cameras.intrinsics_from_fov(torch.tensor([[40.0, 50.0, 60.0], [30.0, 45.0, 67.38]]))
    origins, dirs = cameras.camera_rays(c2w, intrinsics, 6, 5)
    assert origins.shape == dirs.shape == (2, 3, 6, 5, 3)
    single = cameras.camera_rays(c2w[1, 2], intrinsics[1, 2], 6, 5)
    assert torch.allclose(dirs[1, 2], single[1], atol=1e-6) and torch.allclose(origins[1, 2], single[0])
    shared = cameras.camera_rays(c2w, cameras.intrinsics_from_fov(40.0), 6, 5)[1]  # intrinsics broadcast
    assert torch.allclose(shared[0, 0], dirs[0, 0], atol=1e-6)


def test_cameras_are_built_on_the_requested_device_without_host_copies():
    device = torch.device("meta")  # shapes only: any host round trip (.tolist(), .item()) would raise
    c2w = cameras.orbit_cameras(4, 20.0, 2.0, device=device)
    intrinsics = cameras.intrinsics_from_fov(torch.full((1, 4), 50.0, device=device))
    assert c2w.device == device and c2w.shape == (4, 4, 4)
    planes = cameras.plucker_images(c2w[None], intrinsics, 8, 6)
    assert planes.device == device and planes.shape == (1, 4, 6, 8, 6)


def test_plucker_images_hold_each_pixels_ray():
    c2w = cameras.orbit_cameras(2, 15.0, 2.0)[None]  # (1, 2, 4, 4)
    intrinsics = cameras.intrinsics_from_fov(45.0)
    images = cameras.plucker_images(c2w, intrinsics, 4, 4)
    origins, dirs = cameras.camera_rays(c2w, intrinsics, 4, 4)
    assert images.shape == (1, 2, 6, 4, 4)
    assert torch.allclose(images[0, 1, :, 2, 3], cameras.plucker_embedding(origins[0, 1, 2, 3], dirs[0, 1, 2, 3]))


def test_sampled_cameras_are_seeded_groups_a_quarter_turn_apart():
    def sample(seed):
        return cameras.sample_orbit_cameras(3, 4, torch.Generator().manual_seed(seed), elevation_range_deg=(10, 20),
                                            fov_range_deg=(40, 50), distance_range=(1.8, 2.2))

    a, b, c = sample(0), sample(0), sample(1)
    assert a.c2w.shape == (3, 4, 4, 4) and a.intrinsics.shape == (3, 4, 4)
    assert torch.equal(a.c2w, b.c2w) and not torch.allclose(a.c2w, c.c2w)
    steps = (a.azimuth_deg.diff(dim=1) % 360.0)
    assert torch.allclose(steps, torch.full_like(steps, 90.0), atol=1e-4)
    assert a.azimuth_deg[:, 0].unique().numel() == 3  # each group starts somewhere else
    for values, (low, high) in ((a.elevation_deg, (10, 20)), (a.fov_deg, (40, 50)), (a.distance, (1.8, 2.2))):
        assert (values >= low).all() and (values <= high).all()
        assert torch.equal(values, values[:, :1].expand_as(values))  # shared within a group
    eye = a.c2w[..., :3, 3]
    assert torch.allclose(eye.norm(dim=-1), a.distance, atol=1e-5)
    assert torch.allclose(torch.rad2deg(torch.asin(eye[..., 2] / a.distance)), a.elevation_deg, atol=1e-3)
    assert torch.allclose(a.c2w[1, 2], cameras.orbit_camera(a.azimuth_deg[1, 2].item(), a.elevation_deg[1, 2].item(),
                                                            a.distance[1, 2].item()), atol=1e-5)
    assert torch.allclose(a.intrinsics, cameras.intrinsics_from_fov(a.fov_deg), atol=1e-6)
