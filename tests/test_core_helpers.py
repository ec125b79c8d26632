"""The small shared pieces every method uses: option limits, the noise helper, the one-line error, the mesh
fallback and the orbit renderer."""

import math

import numpy as np
import pytest
import torch

from recon3d.options import Limit


def test_limits_convert_form_values_and_refuse_in_one_sentence():
    steps, ratio = Limit("steps", 1, 200, whole=True), Limit("foreground ratio", 0.5, 1.0)
    assert steps.check("7") == 7 and isinstance(steps.check(2.0), int) and ratio.check("0.75") == 0.75
    assert Limit("seed", 0, 2 ** 63 - 1, whole=True).check(2 ** 63 - 1) == 2 ** 63 - 1  # exact beyond 53 bits
    for limit, value, message in ((steps, None, "steps must be a number"), (steps, "x", "steps must be a number"),
                                  (steps, True, "steps must be a number, got True"),
                                  (steps, float("nan"), "steps must be a finite number, got nan"),
                                  (steps, "2.5", "steps must be a whole number, got 2.5"),
                                  (steps, 201, "steps must be between 1 and 200, got 201"),
                                  (ratio, 0.2, "foreground ratio must be between 0.5 and 1, got 0.2")):
        with pytest.raises(ValueError, match=f"^{message}$"):
            limit.check(value)
    assert (steps.text, ratio.text) == ("1..200", "0.5..1")


def test_options_fill_device_defaults_and_keep_what_was_given():
    from recon3d.pipelines.image_to_3d import ImageTo3DOptions
    from recon3d.pipelines.text_to_3d import QuickLookOptions

    assert ImageTo3DOptions().resolved("cpu").mesh_resolution == 128
    assert ImageTo3DOptions().resolved(torch.device("cuda")).mesh_resolution == 256
    assert ImageTo3DOptions(mesh_resolution="96").resolved("cpu").mesh_resolution == 96  # given: kept, converted
    assert QuickLookOptions().resolved("cpu").steps == 20 and QuickLookOptions().resolved("cuda").steps == 50
    with pytest.raises(ValueError, match="mesh resolution must be between 64 and 512, got 600"):
        ImageTo3DOptions(mesh_resolution=600).resolved("cpu")


def test_noise_rows_come_from_their_own_generator_on_its_device():
    from recon3d.noise import rand_tensor, randn_tensor, seeded

    batch = randn_tensor((3, 2, 5), [seeded(7), seeded(1), seeded(9)])
    alone = randn_tensor((1, 2, 5), [seeded(1)])
    assert torch.equal(batch[1], alone[0])  # a seed gives the same numbers alone or in a batch
    assert torch.equal(batch[0], torch.randn((2, 5), generator=torch.Generator().manual_seed(7)))
    assert not torch.equal(batch[0], batch[2])
    one = rand_tensor((4,), seeded(3), dtype=torch.float64)
    assert one.dtype == torch.float64 and ((0 <= one) & (one < 1)).all()
    with pytest.raises(ValueError, match="one generator per object: got 2 for a batch of 3"):
        randn_tensor((3, 4), [seeded(0), seeded(1)])


def test_errors_become_one_sentence_and_bugs_stay_bugs():
    from recon3d.cancel import Cancelled
    from recon3d.errors import user_message
    from recon3d.images import ImageError

    assert user_message(ValueError("steps must be between 1 and 200\nmore")) == "Steps must be between 1 and 200"
    assert user_message(ImageError("cut.png: the file is truncated")) == "cut.png: the file is truncated"  # a name
    assert user_message(ValueError("")) == "The input was refused (ValueError)"
    assert user_message(Cancelled()) == "The job was cancelled"
    assert user_message(torch.OutOfMemoryError("CUDA out of memory")).startswith("Out of memory: try a lower")
    assert user_message(KeyError("bug")) is None and user_message(RuntimeError("shape mismatch")) is None


class Ball:
    """A soft ball of radius 0.8: density 8 at the centre falling to 0 at the rim, red."""

    iso_level = 20.0  # never reached: the mesher must fall back

    def query(self, points):
        density = (8 * (1 - points.norm(dim=-1, keepdim=True) / 0.8)).clamp(min=0)
        return density, torch.tensor([1.0, 0.0, 0.0]).expand(len(points), 3)


def test_a_field_without_surface_at_its_level_is_meshed_at_an_automatic_one_with_a_note():
    from recon3d.mesh import EmptyMeshError, MeshSettings, extract_mesh, extract_mesh_or_fallback

    with pytest.raises(EmptyMeshError):
        extract_mesh(Ball(), MeshSettings(resolution=64))
    mesh, grid, note = extract_mesh_or_fallback(Ball(), MeshSettings(resolution=64))
    radius = np.linalg.norm(mesh.vertices, axis=1)
    assert note.startswith("no surface at density 20: meshed at an automatic level") and 0 < grid.stats["level"] < 8
    assert 0.0 < radius.min() and radius.max() < 0.8  # inside the ball, where the automatic level lies
    assert radius.std() < 0.02  # a sphere: one level everywhere
    mesh, grid, note = extract_mesh_or_fallback(Ball(), MeshSettings(resolution=64), fallback_levels=(30.0, 4.0))
    assert note == "no surface at density 20: meshed at density 4" and grid.stats["level"] == 4.0
    radius = np.linalg.norm(mesh.vertices, axis=1)
    assert abs(radius.mean() - 0.4) < 0.02  # density 4 lies at half the radius
    ball = Ball()
    ball.iso_level = 4.0  # reachable: no fallback, no note
    assert extract_mesh_or_fallback(ball, MeshSettings(resolution=64))[2] is None


def test_an_orbit_sees_each_object_from_each_azimuth():
    from recon3d.cancel import CancelToken, Cancelled
    from recon3d.field import PointField
    from recon3d.render import RenderSettings, render_orbit

    def front_red_back_blue(points):  # a ball whose -y half (azimuth 0's view) is red, +y half blue
        density = 50.0 * (points.norm(dim=-1, keepdim=True) < 0.5).float()
        front = (points[:, 1:2] < 0).float()
        return density, torch.cat([front, torch.zeros_like(front), 1 - front], -1)

    field = PointField(front_red_back_blue)
    rgb = render_orbit(field, [0.0, 180.0], 0.0, 2.0, 40.0, 16, RenderSettings(16, 16))  # (1, 2, 16, 16, 3)
    assert rgb.shape == (1, 2, 16, 16, 3) and rgb.device.type == "cpu"
    centre = rgb[0, :, 6:10, 6:10].mean(dim=(1, 2))  # (2, 3)
    assert centre[0, 0] > 0.8 and centre[0, 2] < 0.2  # azimuth 0: the red front
    assert centre[1, 2] > 0.8 and centre[1, 0] < 0.2  # azimuth 180: the blue back
    assert math.isclose(float(rgb[0, 0, 0, 0].mean()), 1.0, abs_tol=1e-3)  # white around it
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        render_orbit(field, [0.0], 0.0, 2.0, 40.0, 8, cancel=token)
