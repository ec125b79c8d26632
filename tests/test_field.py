from dataclasses import replace

import pytest
import torch

from recon3d.cameras import lrm_source_camera
from recon3d.field import GridField, PointField, TriplaneField, as_field, sample_triplane
from recon3d.models.lrm import DENSITY_LEVEL, TINY_LRM_CONFIG, random_lrm


def ramp_planes(size=8):
    """Planes whose channel 0 holds the width coordinate and channel 1 the height coordinate of pixel centres."""
    centres = (torch.arange(size) + 0.5) / size * 2 - 1
    width = centres.expand(size, size)  # varies along columns
    height = centres[:, None].expand(size, size)  # varies along rows
    plane = torch.stack([width, height])  # (2, H, W)
    return plane.expand(1, 3, 2, size, size).clone()


def test_plane_axes_are_xy_xz_zy():
    points = torch.tensor([[[0.1, -0.3, 0.5], [-0.6, 0.2, -0.4]]])  # inside the pixel-centre range
    feats = sample_triplane(ramp_planes(), points)  # (1, 2, 6)
    x, y, z = points[0].unbind(-1)
    expected = torch.stack([x, y, x, z, z, y], -1)
    assert feats.shape == (1, 2, 6)
    assert torch.allclose(feats[0], expected, atol=1e-5)


def test_outside_the_box_reads_zero():
    feats = sample_triplane(ramp_planes() + 1.0, torch.tensor([[[3.0, 3.0, 3.0]]]))
    assert torch.equal(feats, torch.zeros(1, 1, 6))


def first_channels(planes, points):
    features = sample_triplane(planes, points)
    return features[..., :1].abs(), features[..., :3]


def test_triplane_field_answers_for_each_object_and_checks_shape():
    planes = torch.cat([ramp_planes(), -ramp_planes()])  # two objects
    field = TriplaneField(planes, first_channels)
    points = torch.tensor([[[0.25, 0.0, 0.0]], [[0.0, 0.5, 0.0]]])  # (N=2, P=1, 3)
    density, rgb = field.query(points)
    assert density.shape == (2, 1, 1) and rgb.shape == (2, 1, 3)
    assert torch.allclose(density[:, 0, 0], torch.tensor([0.25, 0.0]), atol=1e-5)
    assert torch.allclose(rgb[1, 0], torch.tensor([0.0, -0.5, 0.0]), atol=1e-5)  # object 1: negated ramps
    one = field.select(1)
    assert one.num_objects == 1 and torch.equal(one.query(points[1:])[1], rgb[1:])
    with pytest.raises(IndexError):
        field.select(2)
    with pytest.raises(ValueError, match=r"\(N, 3, C, H, W\)"):
        TriplaneField(planes[0], first_channels)


def test_fields_state_their_sample_spacing_and_level():
    assert TriplaneField(ramp_planes(64), first_channels).sample_spacing == 2 / 64
    assert GridField(torch.zeros(1, 1, 33, 33, 33), torch.zeros(1, 3, 33, 33, 33)).sample_spacing == 2 / 32
    assert random_lrm(TINY_LRM_CONFIG).field(ramp_planes()).iso_level == DENSITY_LEVEL == 3.0
    legacy = type("Legacy", (), {"query": lambda self, p: (p[:, :1], p), "iso_level": 2.0})()
    wrapped = as_field(legacy)
    assert isinstance(wrapped, PointField) and wrapped.iso_level == 2.0 and wrapped.sample_spacing == 2 / 64
    assert wrapped.query(torch.ones(1, 5, 3))[0].shape == (1, 5, 1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_planes_are_sampled_in_float32(dtype):
    """The LRM's planes come channels-last; CPU half-precision grid_sample reads garbage from those."""
    generator = torch.Generator().manual_seed(0)
    planes = torch.randn(3, 32, 64, 64, generator=generator).to(dtype)
    planes = planes.contiguous(memory_format=torch.channels_last).reshape(1, 3, 32, 64, 64)
    points = torch.rand(1, 4096, 3, generator=generator) * 2 - 1
    features = sample_triplane(planes, points)
    assert features.dtype == torch.float32 and not features.isnan().any()
    # the same plane values, sampled at the same float32 points: half coordinates would move them
    assert torch.equal(features, sample_triplane(planes.float().contiguous(), points))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_lrm_field_is_finite_and_close(dtype):
    """The whole half-precision path on planes as the model makes them: channels-last, 64x64, 32 channels
    (the published small layout's planes, where CPU half-precision grid_sample reads garbage)."""
    model = random_lrm(replace(TINY_LRM_CONFIG, triplane_low_res=32, triplane_dim=32), seed=2).to(dtype)
    images = torch.rand(2, 3, 56, 56, generator=torch.Generator().manual_seed(1)).to(dtype)
    planes = model.forward_planes(images, lrm_source_camera()[None].expand(2, 16).to(dtype))
    points = torch.rand(2, 4096, 3, generator=torch.Generator().manual_seed(2)) * 2 - 1
    half = model.field(planes).query(points)
    full = model.float().field(planes.float()).query(points)  # the same planes, decoded in float32
    for a, b in zip(full, half):
        assert b.dtype == torch.float32 and torch.isfinite(b).all()
        assert (a - b).abs().max() < 0.05


def test_gradients_reach_planes_and_decoder_weights():
    model = random_lrm(TINY_LRM_CONFIG, seed=1)
    planes = torch.randn(2, 3, 8, 16, 16, generator=torch.Generator().manual_seed(0), requires_grad=True)
    density, rgb = model.field(planes).query(torch.rand(2, 256, 3, generator=torch.Generator().manual_seed(1)) * 2 - 1)
    (density.sum() + rgb.sum()).backward()
    for grad in (planes.grad, model.synthesizer.decoder.net[0].weight.grad):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert planes.grad[1].abs().sum() > 0  # each object gets its own gradient


def test_grid_field_interpolates_its_voxels_and_passes_gradients():
    r = 9
    axis = torch.linspace(-1, 1, r)
    x, y, z = torch.meshgrid(axis, axis, axis, indexing="ij")
    density = (2 + x + 2 * y + 3 * z)[None, None].clone().requires_grad_(True)  # linear: trilinear is exact
    rgb = torch.stack([x, y, z])[None].expand(2, 3, r, r, r) * 0.5 + 0.5
    field = GridField(density.expand(2, 1, r, r, r), rgb)
    points = torch.tensor([[[0.3, -0.2, 0.55], [-0.9, 0.1, 0.0]]]).expand(2, 2, 3)
    d, c = field.query(points)
    assert torch.allclose(d[0, :, 0], 2 + points[0] @ torch.tensor([1.0, 2.0, 3.0]), atol=1e-5)
    assert torch.allclose(c[1], points[1] * 0.5 + 0.5, atol=1e-5)  # (x, y, z) index order
    assert field.query(torch.full((2, 1, 3), 1.5))[0].abs().max() == 0  # outside the box
    d.sum().backward()
    assert torch.isfinite(density.grad).all() and density.grad.abs().sum() > 0
    assert field.select(1).num_objects == 1
