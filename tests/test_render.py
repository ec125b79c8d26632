import math

import torch

from recon3d import cameras
from recon3d.render import RenderSettings, box_intersection, composite, importance_depths, render_view


class Ball:
    """Opaque ball of radius 0.5: red above z=0, green where x>0 (below), blue otherwise."""

    def query(self, p):
        inside = (p.norm(dim=-1, keepdim=True) < 0.5).float()
        up, right = (p[:, 2:3] > 0).float(), (p[:, 0:1] > 0).float()
        rgb = torch.cat([up, (1 - up) * right, (1 - up) * (1 - right)], -1)
        return inside * 200.0, rgb


def test_box_intersection():
    o = torch.tensor([[0.0, -3.0, 0.0], [0.0, -3.0, 5.0]])
    d = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    near, far, hit = box_intersection(o, d)
    assert torch.allclose(near[0], torch.tensor(2.0)) and torch.allclose(far[0], torch.tensor(4.0))
    assert hit.tolist() == [True, False]


def test_composite_of_an_opaque_sample():
    depths = torch.tensor([[1.0, 2.0, 3.0]])
    density = torch.tensor([[0.0, 1e4, 0.0]])
    rgb = torch.tensor([[[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]])
    out = composite(density, rgb, depths, torch.tensor([4.0]))
    assert torch.allclose(out["rgb"], torch.tensor([[0.0, 1.0, 0.0]]), atol=1e-4)
    assert torch.allclose(out["opacity"], torch.ones(1, 1), atol=1e-4)
    assert torch.allclose(out["depth"], torch.tensor([[2.0]]), atol=1e-4)


def test_importance_samples_concentrate_where_the_weight_is():
    depths = torch.linspace(0, 1, 33)[None]
    weights = torch.zeros(1, 33)
    weights[0, 20] = 1.0
    extra = importance_depths(depths, weights, 16)
    assert extra.shape == (1, 16)
    assert ((extra - depths[0, 20]).abs() < 1.5 / 32).float().mean() > 0.9


def test_front_view_of_a_ball_is_upright_and_at_the_right_depth():
    c2w = cameras.orbit_camera(0, 0, 2.0)
    out = render_view(Ball(), c2w, cameras.intrinsics_from_fov(40), 48)
    rgb, depth, opacity = out["rgb"], out["depth"], out["opacity"]
    assert rgb.shape == (48, 48, 3) and depth.shape == (48, 48, 1)
    assert torch.allclose(rgb[0, 0], torch.ones(3), atol=1e-3)  # corner: white background
    assert opacity[0, 0].item() < 1e-3 and opacity[24, 24].item() > 0.99
    assert rgb[14, 24, 0] > 0.9  # upper half red (world +z is image up)
    assert rgb[34, 34, 1] > 0.9 and rgb[34, 14, 2] > 0.9  # lower right green (+x), lower left blue
    assert math.isclose(depth[24, 24].item(), 1.5, abs_tol=0.03)


def test_chunking_does_not_change_the_image():
    c2w = cameras.orbit_camera(30, 20, 2.2)
    intr = cameras.intrinsics_from_fov(45)
    a = render_view(Ball(), c2w, intr, 24, RenderSettings(chunk_rays=50))["rgb"]
    b = render_view(Ball(), c2w, intr, 24, RenderSettings(chunk_rays=100000))["rgb"]
    assert torch.allclose(a, b, atol=1e-5)
