import torch

from recon3d.field import TriplaneField, sample_triplane


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


def test_triplane_field_unbatches_and_checks_shape():
    planes = ramp_planes()
    field = TriplaneField(planes, lambda p, pts: (sample_triplane(p, pts)[..., :1].abs(), sample_triplane(p, pts)[..., :3]))
    density, rgb = field.query(torch.tensor([[0.25, 0.0, 0.0]]))
    assert density.shape == (1, 1) and rgb.shape == (1, 3)
    assert torch.allclose(density, torch.tensor([[0.25]]), atol=1e-5)
    try:
        TriplaneField(planes[0], field.decode)
    except ValueError as exc:
        assert "(1, 3, C, H, W)" in str(exc)
    else:
        raise AssertionError("a 4-D planes tensor was accepted")
