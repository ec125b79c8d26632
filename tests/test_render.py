import math

import torch

import pytest

from recon3d import cameras
from recon3d.field import GridField
from recon3d.models.lrm import TINY_LRM_CONFIG, random_lrm
from recon3d.render import (RenderSettings, box_intersection, composite, importance_depths, render_view,
                            render_views)


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


@pytest.fixture(scope="module")
def lrm_field():
    """Three objects of a tiny random LRM, planes scaled up so the objects are visible."""
    model = random_lrm(TINY_LRM_CONFIG, seed=4)
    planes = torch.randn(3, 3, 8, 16, 16, generator=torch.Generator().manual_seed(5)) * 3
    return model, planes


def views(n=3, v=2):
    c2w = cameras.orbit_camera(torch.tensor([[0.0, 90.0], [45.0, 180.0], [270.0, 10.0]])[:n, :v], 20.0, 2.0)
    return c2w, cameras.intrinsics_from_fov(50.0)


def seeded(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


SETTINGS = RenderSettings(coarse_samples=8, fine_samples=8, chunk_rays=50)


def test_each_object_renders_the_same_alone_or_in_a_batch(lrm_field):
    model, planes = lrm_field
    field, (c2w, intrinsics) = model.field(planes), views()
    batch = render_views(field, c2w, intrinsics, 12, 10, SETTINGS, seeded([7, 8, 9]))
    assert batch["rgb"].shape == (3, 2, 12, 10, 3) and batch["opacity"].shape == (3, 2, 12, 10, 1)
    assert batch["depth"].shape == (3, 2, 12, 10, 1)
    for k, seed in enumerate([7, 8, 9]):
        alone = render_views(field.select(k), c2w[k:k + 1], intrinsics, 12, 10, SETTINGS, seeded([seed]))
        for key in ("rgb", "opacity", "depth"):
            assert (alone[key][0] - batch[key][k]).abs().max() <= 1e-6
    assert (batch["opacity"] > 0.05).any()  # the objects are there


def test_a_seeded_render_repeats_exactly_and_seeds_matter(lrm_field):
    model, planes = lrm_field
    field, (c2w, intrinsics) = model.field(planes[:2]), views(2)
    a = render_views(field, c2w, intrinsics, 8, 8, SETTINGS, seeded([1, 2]))["rgb"]
    b = render_views(field, c2w, intrinsics, 8, 8, SETTINGS, seeded([1, 2]))["rgb"]
    c = render_views(field, c2w, intrinsics, 8, 8, SETTINGS, seeded([3, 2]))["rgb"]
    assert torch.equal(a, b)
    assert not torch.equal(a[0], c[0]) and torch.equal(a[1], c[1])  # object 1 keeps its own generator


def test_gradients_reach_planes_decoder_and_grid_parameters(lrm_field):
    model, planes = lrm_field
    planes = planes[:2].clone().requires_grad_(True)
    c2w, intrinsics = views(2)
    out = render_views(model.field(planes), c2w, intrinsics, 8, 8, SETTINGS, seeded([1, 2]))
    (out["rgb"].mean() + out["opacity"].mean()).backward()
    decoder_grad = model.synthesizer.decoder.net[0].weight.grad
    for grad in (planes.grad, decoder_grad):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    raw = torch.zeros(1, 1, 9, 9, 9, requires_grad=True)
    grid = GridField(torch.nn.functional.softplus(raw + 2.0), torch.full((1, 3, 9, 9, 9), 0.5))
    render_views(grid, c2w[:1], intrinsics, 6, 6, SETTINGS)["rgb"].sum().backward()
    assert torch.isfinite(raw.grad).all() and raw.grad.abs().sum() > 0


def test_importance_samples_carry_no_gradient():
    depths = torch.linspace(0, 1, 9)[None].requires_grad_(True)
    weights = torch.rand(1, 9, requires_grad=True)
    assert not importance_depths(depths, weights, 4).requires_grad


@pytest.mark.parametrize("kind", ["constant", "per image", "function of direction"])
def test_backgrounds(kind):
    c2w, intrinsics = cameras.orbit_camera(torch.tensor([[0.0, 90.0]]), 0.0, 2.0), cameras.intrinsics_from_fov(40.0)
    colours = torch.tensor([[[0.1, 0.2, 0.3], [0.9, 0.8, 0.7]]])
    background = {"constant": (0.1, 0.2, 0.3), "per image": colours,
                  "function of direction": lambda dirs: dirs * 0.5 + 0.5}[kind]
    settings = RenderSettings(coarse_samples=8, fine_samples=8, chunk_rays=100, background=background)
    out = render_views(Ball(), c2w, intrinsics, 16, 16, settings)
    corner = out["rgb"][0, :, 0, 0]  # a ray that misses the ball: all background
    if kind == "function of direction":
        dirs = cameras.camera_rays(c2w, intrinsics, 16, 16)[1][0, :, 0, 0]
        assert torch.allclose(corner, dirs * 0.5 + 0.5, atol=1e-5)
    else:
        assert torch.allclose(corner, colours[0] if kind == "per image" else colours[0, :1].expand(2, 3), atol=1e-5)
    assert (out["opacity"][0, :, 8, 8] > 0.99).all()  # the ball covers the centre: no background there
    assert torch.allclose(out["rgb"][0, :, 8, 8].sum(-1), torch.ones(2), atol=1e-3)


def saved_bytes_and_grad(model, planes, settings):
    """Bytes autograd keeps for backward while rendering, and the planes' gradient."""
    planes = planes.clone().requires_grad_(True)
    c2w, intrinsics = views(2)
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = render_views(model.field(planes), c2w, intrinsics, 16, 16, settings, seeded([1, 2]))
    out["rgb"].square().mean().backward()
    return sum(saved), planes.grad


def test_recomputed_chunks_give_the_same_gradient_and_keep_far_less_for_backward(lrm_field):
    model, planes = lrm_field
    kept, grad_kept = saved_bytes_and_grad(model, planes[:2], RenderSettings(8, 8, 64, recompute=False))
    redone, grad_redone = saved_bytes_and_grad(model, planes[:2], RenderSettings(8, 8, 64, recompute=True))
    assert torch.allclose(grad_kept, grad_redone, atol=1e-7, rtol=1e-5) and grad_kept.abs().sum() > 0
    assert redone * 5 < kept  # only each chunk's inputs and outputs, not its per-sample graph


def test_readme_core_example_runs_and_its_gradient_reaches_the_grid():
    import re

    from conftest import ROOT

    readme = (ROOT / "README.md").read_text()
    code = next(block for block in re.findall(r"```python\n(.*?)```", readme, re.S) if "GridField(" in block)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["out"]["rgb"].shape == (1, 4, 64, 64, 3)
    grad = namespace["density"].grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
