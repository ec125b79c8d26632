"""Score distillation: the recipe's schedules, the loop's controls, the tiny random MVDream end to end, and
convergence to a known object when the prior is an analytic denoiser."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import glb_summary

from recon3d.cameras import orbit_camera
from recon3d.field import PointField
from recon3d.models.mvdream import SD_SCHEDULER_CONFIG, camera_condition
from recon3d.pipelines.progress import run_to_end
from recon3d.pipelines.sds import (PRESETS, SDSControl, SDSOptions, optimise, resolution_at, timestep_range)
from recon3d.pipelines.text_to_3d import TextTo3D, distill_to_mesh
from recon3d.render import RenderSettings, render_views

TINY = SDSOptions(steps=4, low_resolution=32, high_resolution=32, field_resolution=32, field_channels=8,
                  coarse_samples=24, fine_samples=8, preview_size=32, preview_seconds=0.0, mesh_resolution=64)


def read_extras(path):
    from pygltflib import GLTF2

    return GLTF2().load(str(path)).asset.extras


def test_published_schedules():
    o = SDSOptions(steps=1000)
    assert timestep_range(o, 0) == pytest.approx((0.98, 0.98))
    assert timestep_range(o, 400) == pytest.approx((0.50, 0.74))  # halfway through the annealing
    assert timestep_range(o, 800) == pytest.approx((0.02, 0.50)) == timestep_range(o, 999)
    assert resolution_at(o, 499) == (64, 2) and resolution_at(o, 500) == (256, 1)
    fast = PRESETS["fast"]  # the compressed schedule keeps the fractions
    assert 1500 <= fast.steps <= 2500 and timestep_range(fast, int(0.8 * fast.steps)) == pytest.approx((0.02, 0.5))
    assert PRESETS["quality"].steps == 10000 and PRESETS["quality"].guidance_scale == 50.0


@pytest.mark.parametrize("steps", [0, -5, 20001])
def test_steps_out_of_range_are_refused(steps):
    with pytest.raises(ValueError, match="steps must be between 1 and 20000"):
        SDSOptions(steps=steps)


def test_camera_condition_is_the_unit_pose_row_major():
    c2w = orbit_camera(0.0, 0.0, 3.0)  # the front camera, on -y
    code = camera_condition(c2w)
    assert code.shape == (16,)
    assert torch.allclose(code.view(4, 4)[:3, 3], torch.tensor([0.0, -1.0, 0.0]), atol=1e-6)
    assert torch.allclose(code.view(4, 4)[:3, :3], c2w[:3, :3])


@pytest.fixture(scope="module")
def tiny_pipe():
    return TextTo3D.random(seed=0)


def test_tiny_random_mvdream_runs_sds_and_writes_a_glb(tiny_pipe, tmp_path):
    events = list(tiny_pipe.generate("a red chair", preset="fast", steps=3, seed=7, options=TINY))
    steps = [e for e in events if e.stage == "sds"]
    assert [e.metrics["step"] for e in steps] == [1, 2, 3]
    assert all(np.isfinite(e.metrics["loss"]) and e.metrics["eta"] >= 0 for e in steps)
    assert steps[0].preview.shape == (4, 32, 32, 3)
    result = events[-1].result
    path = result.save_glb(tmp_path / "chair.glb")
    positions, _, colours, indices = glb_summary(path)
    assert len(positions) > 0 and len(indices) > 0 and colours.shape == (len(positions), 4)
    extras = read_extras(path)
    assert extras["prompt"] == "a red chair" and extras["seed"] == 7 and extras["steps"] == 3
    assert extras["preset"] == "custom" and extras["random_weights"] is True and extras["method"] == "MVDream SDS"


def test_same_seed_same_run_different_seed_differs(tiny_pipe):
    def losses(seed):
        return run_to_end(tiny_pipe.generate("a cup", options=replace(TINY, steps=2), seed=seed)).losses

    assert losses(1) == losses(1)
    assert losses(1) != losses(2)


def test_prompt_checks(tiny_pipe):
    with pytest.raises(ValueError, match="type a prompt"):
        next(tiny_pipe.generate("   ", options=TINY))
    long_prompt = "a very " + "very " * 100 + "tall tower"
    events = tiny_pipe.generate(long_prompt, options=replace(TINY, steps=1))
    first = next(events)
    assert first.stage == "prompt" and "longer than 75 tokens" in first.message
    assert run_to_end(events).extras["prompt_truncated"] is True


def test_stop_keeps_the_state_and_export_on_demand(tiny_pipe):
    control = SDSControl()
    events = tiny_pipe.generate("a lamp", options=replace(TINY, steps=50), control=control)
    stages = []
    for event in events:
        stages.append(event.stage)
        if event.stage == "sds" and event.metrics["step"] == 1:
            control.export.set()
        if event.stage == "mesh":
            assert event.result.extras["steps_done"] == 1 and len(event.result.mesh.faces) > 0
        if event.stage == "sds" and event.metrics["step"] == 2:
            control.stop.set()
    assert stages == ["sds", "mesh", "sds", "done"]
    assert event.result.extras["stopped"] == "stop" and event.result.extras["steps_done"] == 2


class NaNAfter:
    """A prior that predicts NaN noise from its ``bad``-th call on."""

    encoder_size = 32

    def __init__(self, bad):
        from diffusers import DDIMScheduler

        self.calls, self.bad = 0, bad
        self.alphas_cumprod = DDIMScheduler(**SD_SCHEDULER_CONFIG).alphas_cumprod

    def encode(self, images, generator):
        return images * 2 - 1

    def predict_noise(self, noisy, t, c2w, intrinsics):
        self.calls += 1
        eps = torch.full_like(noisy, float("nan") if self.calls >= self.bad else 0.1)
        return eps, eps


def test_nan_loss_stops_and_keeps_the_last_good_state():
    def run(prior, stop_after=None):
        control = SDSControl()
        for event in optimise(prior, replace(TINY, steps=10), torch.Generator().manual_seed(0), "cpu", control):
            if event.metrics and event.metrics.get("step") == stop_after:
                control.stop.set()
        return event

    last = run(NaNAfter(bad=3))
    state = last.result
    assert state.step == 2 and "NaN at step 3" in last.metrics["stopped"]
    two_good_steps = run(NaNAfter(bad=100), stop_after=2).result
    for kept, good in zip(state.field.parameters(), two_good_steps.field.parameters()):
        assert torch.equal(kept, good)  # the NaN step changed nothing


# ---- convergence: the same loop with an analytic denoiser ------------------------------------------------------

def coloured_sphere(points):
    """A sphere of radius 0.5, red above z = 0 and blue below."""
    distance = points.norm(dim=-1, keepdim=True)
    density = 50.0 * torch.sigmoid((0.5 - distance) * 40)
    up = (points[:, 2:3] > 0).float()
    return density, torch.cat([up, 0.2 * torch.ones_like(up), 1 - up], -1)


class TargetPrior:
    """An ideal denoiser for one known object: its x0 estimate is the render of the target from the very cameras
    the loop drew (the "latents" are the images at half size), so SDS should turn the field into the target."""

    encoder_size = 64

    def __init__(self, target, options):
        from diffusers import DDIMScheduler

        self.target, self.settings = target, RenderSettings(options.coarse_samples, options.fine_samples)
        self.alphas_cumprod = DDIMScheduler(**SD_SCHEDULER_CONFIG).alphas_cumprod

    def encode(self, images, generator):
        return F.avg_pool2d(images, 2) * 2 - 1

    def predict_noise(self, noisy, t, c2w, intrinsics):
        size = self.encoder_size
        rgb = render_views(self.target, c2w[None], intrinsics[None], size, size, self.settings)["rgb"][0]
        x0 = self.encode(rgb.permute(0, 3, 1, 2), None)
        abar = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        eps = (noisy - abar.sqrt() * x0) / (1 - abar).sqrt()
        return eps, eps


def test_sds_with_an_analytic_denoiser_converges_to_the_target(tmp_path):
    options = replace(TINY, steps=120, coarse_samples=32, fine_samples=16, learn_background=False,
                      random_background_probability=0.0, preview_seconds=1e9, mesh_resolution=64)
    prior = TargetPrior(PointField(coloured_sphere, sample_spacing=1 / 32), options)
    result = run_to_end(distill_to_mesh(prior, options, torch.Generator().manual_seed(0), "cpu", {"prompt": "sphere"}))
    assert result.losses[-1] < 0.1 * result.losses[0]
    mesh = result.mesh
    radius = np.linalg.norm(mesh.vertices, axis=1)
    assert abs(np.median(radius) - 0.5) < 0.06 and np.percentile(np.abs(radius - 0.5), 90) < 0.12  # on the sphere
    lattice = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, 40)] * 3, indexing="ij"), -1).reshape(1, -1, 3)
    inside_target = lattice[0].norm(dim=-1) < 0.5
    with torch.no_grad():
        inside_mesh = result.radiance_field.query(lattice)[0][0, :, 0] > result.extras["iso_level"]  # the exported surface
    iou = float((inside_mesh & inside_target).sum() / (inside_mesh | inside_target).sum())
    assert iou > 0.7, iou
    top, bottom = mesh.colors[mesh.vertices[:, 2] > 0.2], mesh.colors[mesh.vertices[:, 2] < -0.2]
    assert (top[:, 0] > top[:, 2]).mean() > 0.9 and (bottom[:, 2] > bottom[:, 0]).mean() > 0.9
    path = result.save_glb(tmp_path / "sphere.glb")
    assert json.loads(json.dumps(read_extras(path)))["prompt"] == "sphere"
