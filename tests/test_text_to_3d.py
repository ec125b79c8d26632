"""Score distillation: the recipe's schedules, the loop's controls, the tiny random MVDream end to end, and
convergence to a known object when the prior is an analytic denoiser."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import glb_summary

from recon3d.cameras import orbit_camera
from recon3d.field import PointField
from recon3d.models.mvdream import SD_SCHEDULER_CONFIG, camera_condition
from recon3d.pipelines.events import Exported, Finished, Note, Preview, StepReport, run_to_end
from recon3d.pipelines.sds import (PRESETS, SDSControl, SDSOptions, new_state, optimise, resolution_at, timestep_range,
                                   x0_reconstruction_loss)
from recon3d.pipelines.text_to_3d import TextTo3D, TextTo3DOptions, distill_to_mesh
from recon3d.render import RenderSettings, render_views

TINY = SDSOptions(steps=4, low_resolution=32, high_resolution=32, field_resolution=32, field_channels=8,
                  field_levels=1, coarse_samples=24, fine_samples=8, preview_size=32, preview_seconds=0.0, mesh_resolution=64)


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


def test_camera_condition_is_mvdreams_unit_pose_row_major():
    # MVDream's camera at elevation 15, azimuth 90, worked out by hand from its definition (a y-up look-at with
    # OpenGL axes at (cos e sin a, sin e, cos e cos a), then world y-up -> z-up: (x, y, z) -> (x, -z, y))
    c, s = math.cos(math.radians(15)), math.sin(math.radians(15))
    expected = torch.tensor([[0.0, -s, c, c],
                             [1.0, 0.0, 0.0, 0.0],
                             [0.0, c, s, s],
                             [0.0, 0.0, 0.0, 1.0]])
    code = camera_condition(orbit_camera(90.0, 15.0, 3.7))  # any distance: the position is normalised
    assert code.shape == (16,)
    assert torch.allclose(code, expected.flatten(), atol=1e-6)


@pytest.fixture(scope="module")
def tiny_pipe():
    return TextTo3D.random(seed=0)


def test_tiny_random_mvdream_runs_sds_and_writes_a_glb(tiny_pipe, tmp_path):
    options = TextTo3DOptions(preset="custom", steps=3, seed=7, base=TINY)
    events = list(tiny_pipe.generate("a red chair", options))
    steps = [e for e in events if isinstance(e, StepReport)]
    assert [e.step for e in steps] == [1, 2, 3]
    assert all(np.isfinite(e.loss) and e.eta >= 0 for e in steps)
    previews = [e for e in events if isinstance(e, Preview)]
    assert previews[0].views.shape == (1, 4, 3, 32, 32) and previews[0].step == 1
    assert isinstance(events[-1], Finished)
    result = events[-1].result
    path = result.save_glb(tmp_path / "chair.glb")
    positions, _, colours, indices = glb_summary(path)
    assert len(positions) > 0 and len(indices) > 0 and colours.shape == (len(positions), 4)
    extras = read_extras(path)
    assert extras["prompt"] == "a red chair" and extras["seed"] == 7 and extras["steps"] == 3
    assert extras["preset"] == "custom" and extras["random_weights"] is True and extras["method"] == "MVDream SDS"
    assert extras["guidance_scale"] == 50.0 and extras["negative_prompt"].startswith("ugly, bad anatomy")


def test_same_seed_same_run_different_seed_differs(tiny_pipe):
    def losses(seed):
        return run_to_end(tiny_pipe.generate("a cup", TextTo3DOptions(seed=seed, base=replace(TINY, steps=1)))).losses

    assert losses(1) == losses(1)
    assert losses(1) != losses(2)


def test_prompt_checks(tiny_pipe):
    with pytest.raises(ValueError, match="type a prompt"):
        next(tiny_pipe.generate("   ", TextTo3DOptions(base=TINY)))
    with pytest.raises(ValueError, match="keep it under 1000"):
        next(tiny_pipe.generate("x" * 1001, TextTo3DOptions(base=TINY)))
    long_prompt = "a very " + "very " * 100 + "tall tower"
    events = tiny_pipe.generate(long_prompt, TextTo3DOptions(base=replace(TINY, steps=1)))
    first = next(events)
    assert isinstance(first, Note) and "longer than 75 tokens" in first.message
    assert run_to_end(events).extras["prompt_truncated"] is True


def test_stop_keeps_the_state_and_export_on_demand(tiny_pipe):
    control = SDSControl()
    events = tiny_pipe.generate("a lamp", TextTo3DOptions(base=replace(TINY, steps=50)), control=control)
    kinds = []
    for event in events:
        kinds.append(type(event).__name__)
        if isinstance(event, StepReport) and event.step == 1:
            control.export.set()
        if isinstance(event, Exported):
            assert event.result.extras["steps_done"] == 1 and len(event.result.mesh.faces) > 0
        if isinstance(event, StepReport) and event.step == 2:
            control.stop.set()
    kinds = [kind for kind in kinds if kind != "Preview"]
    assert kinds == ["StepReport", "Exported", "StepReport", "Finished"]
    assert event.result.extras["stopped"] == "stop" and event.result.extras["steps_done"] == 2


class NaNAt:
    """A prior that predicts NaN noise on the calls in ``bad`` (1-based; every call from ``from_call`` on)."""

    encoder_size = 32

    def __init__(self, bad=(), from_call=None):
        from diffusers import DDIMScheduler

        self.calls, self.bad, self.from_call = 0, set(bad), from_call
        self.alphas_cumprod = DDIMScheduler(**SD_SCHEDULER_CONFIG).alphas_cumprod

    def encode(self, images, generator):
        return images * 2 - 1

    def predict_noise(self, noisy, t, c2w, intrinsics):
        self.calls += 1
        broken = self.calls in self.bad or (self.from_call is not None and self.calls >= self.from_call)
        eps = torch.full_like(noisy, float("nan") if broken else 0.1)
        return eps, eps


def run_sds(prior, options, stop_after=None):
    """The events of one SDS run and its outcome; Stop pressed after step ``stop_after``."""
    control, events = SDSControl(), []
    for event in optimise(prior, options, torch.Generator().manual_seed(0), "cpu", control):
        events.append(event)
        if isinstance(event, StepReport) and event.step == stop_after:
            control.stop.set()
    return events, events[-1].result


def parameters(state):
    return [p.detach().clone() for p in [*state.field.parameters(), *state.background.parameters()]]


def test_a_non_finite_step_is_skipped_counted_and_the_run_goes_on():
    events, outcome = run_sds(NaNAt(bad={3}), replace(TINY, steps=6))
    reports = [e for e in events if isinstance(e, StepReport)]
    assert outcome.stopped == "done" and outcome.state.step == 6 and outcome.state.skipped == 1
    assert [r.skipped for r in reports] == [0, 0, 1, 1, 1, 1] and math.isnan(reports[2].loss)
    assert "skipped: non-finite" in reports[2].message and len(outcome.state.losses) == 5
    before, _ = run_sds(NaNAt(), replace(TINY, steps=6), stop_after=2)  # the same run, stopped after step 2
    after_skip, _ = run_sds(NaNAt(bad={3}), replace(TINY, steps=6), stop_after=3)
    for kept, good in zip(parameters(after_skip[-1].result.state), parameters(before[-1].result.state)):
        assert torch.equal(kept, good)  # the skipped step changed nothing


def test_a_run_of_non_finite_steps_stops_and_keeps_the_last_good_state():
    options = replace(TINY, steps=10, max_skipped_in_a_row=3)
    _, outcome = run_sds(NaNAt(from_call=3), options)
    assert outcome.state.step == 5 and outcome.state.skipped == 3  # 2 good steps, then 3 skipped in a row
    assert outcome.stopped == ("3 steps in a row had a non-finite loss or gradient (the prior's weights or precision "
                               "are broken); kept the state of step 2")
    _, two_good = run_sds(NaNAt(), options, stop_after=2)
    for kept, good in zip(parameters(outcome.state), parameters(two_good.state)):
        assert torch.equal(kept, good)
    from recon3d.pipelines.text_to_3d import export_state

    extras = export_state(outcome.state, options, {}, None).extras
    assert (extras["steps_done"], extras["non_finite_steps"]) == (2, 3)  # the GLB is the state of step 2


@pytest.mark.slow
def test_bfloat16_mvdream_runs_every_step_with_the_reference_negative_prompt(tmp_path):
    """The UNet in bfloat16, the VAE (differentiated through) in float32: every step of a tiny run completes."""
    from recon3d.pipelines.text_to_3d import REFERENCE_NEGATIVE_PROMPT

    pipe = TextTo3D.random(seed=0, dtype=torch.bfloat16)
    assert next(pipe.unet.parameters()).dtype == torch.bfloat16 and next(pipe.vae.parameters()).dtype == torch.float32
    events = list(pipe.generate("a red chair", TextTo3DOptions(base=replace(TINY, steps=3))))
    result = events[-1].result
    extras = read_extras(result.save_glb(tmp_path / "bf16.glb"))
    assert extras["negative_prompt"] == REFERENCE_NEGATIVE_PROMPT and extras["dtype"] == "bfloat16"
    assert extras["steps_done"] == 3 and extras["non_finite_steps"] == 0 and "stopped" in extras
    assert [e.step for e in events if isinstance(e, StepReport)] == [1, 2, 3]
    assert all(np.isfinite(result.losses)) and len(result.losses) == 3


# ---- convergence: the same loop with an analytic denoiser ------------------------------------------------------

TARGET_CENTRE, TARGET_RADIUS = torch.tensor([0.3, 0.0, 0.0]), 0.4  # off the blob's centre: SDS must move it


def coloured_sphere(points):
    """A sphere of radius 0.4 centred at x = 0.3, red above z = 0 and blue below."""
    distance = (points - TARGET_CENTRE).norm(dim=-1, keepdim=True)
    density = 50.0 * torch.sigmoid((TARGET_RADIUS - distance) * 40)
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


@pytest.mark.slow
def test_sds_with_an_analytic_denoiser_converges_to_the_target(tmp_path):
    options = replace(TINY, steps=200, coarse_samples=32, fine_samples=16, learn_background=False,
                      random_background_probability=0.0, preview_seconds=1e9, mesh_resolution=64)
    prior = TargetPrior(PointField(coloured_sphere, sample_spacing=1 / 32), options)
    lattice = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, 40)] * 3, indexing="ij"), -1).reshape(1, -1, 3)
    inside_target = (lattice[0] - TARGET_CENTRE).norm(dim=-1) < TARGET_RADIUS

    def iou(field, level):
        with torch.no_grad():
            inside = field.query(lattice)[0][0, :, 0] > level
        return float((inside & inside_target).sum() / (inside | inside_target).sum())

    generator = torch.Generator().manual_seed(0)
    start = iou(new_state(options, torch.Generator().manual_seed(0), "cpu").field, 5.0)
    result = run_to_end(distill_to_mesh(prior, options, generator, "cpu", {"prompt": "sphere"}))
    assert result.losses[-1] < 0.1 * result.losses[0]
    assert start < 0.3 and iou(result.radiance_field, result.extras["iso_level"]) > 0.65  # the exported surface
    mesh = result.mesh
    off_surface = np.abs(np.linalg.norm(mesh.vertices - TARGET_CENTRE.numpy(), axis=1) - TARGET_RADIUS)
    assert np.median(off_surface) < 0.06 and np.percentile(off_surface, 90) < 0.15  # on the target's sphere
    top, bottom = mesh.colors[mesh.vertices[:, 2] > 0.15], mesh.colors[mesh.vertices[:, 2] < -0.15]
    assert (top[:, 0] > top[:, 2]).mean() > 0.9 and (bottom[:, 2] > bottom[:, 0]).mean() > 0.9
    path = result.save_glb(tmp_path / "sphere.glb")
    assert read_extras(path)["prompt"] == "sphere"


# ---- the guidance arithmetic, by hand --------------------------------------------------------------------------

class FixedNoise:
    """A prior whose noise predictions with and without text are fixed, different tensors."""

    encoder_size = 8

    def __init__(self, eps_text, eps_plain):
        from diffusers import DDIMScheduler

        self.eps_text, self.eps_plain = eps_text, eps_plain
        self.alphas_cumprod = DDIMScheduler(**SD_SCHEDULER_CONFIG).alphas_cumprod

    def predict_noise(self, noisy, t, c2w, intrinsics):
        return self.eps_text, self.eps_plain


def test_x0_loss_with_guidance_and_per_group_rescale_matches_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(8, 4, 4, 4, generator=g)  # two groups of 4 views
    eps_text, eps_plain = torch.randn(8, 4, 4, 4, generator=g), torch.randn(8, 4, 4, 4, generator=g) * 3
    prior, options = FixedNoise(eps_text, eps_plain), SDSOptions(guidance_scale=7.0, cfg_rescale=0.5)
    draw = torch.Generator().manual_seed(5)
    loss, t = x0_reconstruction_loss(prior, latents, (0.5, 0.5), None, None, options, draw)
    assert t == 500
    replay = torch.Generator().manual_seed(5)
    torch.randint(500, 501, (1,), generator=replay)
    noise = torch.randn(latents.shape, generator=replay)
    abar = prior.alphas_cumprod[500]
    noisy = abar.sqrt() * latents + (1 - abar).sqrt() * noise
    eps = eps_plain + 7.0 * (eps_text - eps_plain)
    x0_cfg = (noisy - (1 - abar).sqrt() * eps) / abar.sqrt()
    x0_text = (noisy - (1 - abar).sqrt() * eps_text) / abar.sqrt()
    expected_x0 = []
    for group in range(2):
        views = slice(4 * group, 4 * group + 4)
        ratio = x0_text[views].std() / x0_cfg[views].std()  # one factor per group of views
        expected_x0.append(0.5 * x0_cfg[views] * ratio + 0.5 * x0_cfg[views])
    expected = 0.5 * (latents - torch.cat(expected_x0)).square().sum() / 8
    assert torch.allclose(loss, expected, rtol=1e-5)


def test_mvdream_prior_returns_the_text_prediction_first(tiny_pipe):
    from recon3d.pipelines.text_to_3d import MVDreamPrior

    prompt = tiny_pipe.encode_prompt("a red chair", "")
    prior = MVDreamPrior(tiny_pipe.parts, prompt)
    g = torch.Generator().manual_seed(0)
    noisy, c2w = torch.randn(4, 4, 8, 8, generator=g), orbit_camera(torch.arange(4.0) * 90, 15.0, 2.0)
    eps_text, eps_plain = prior.predict_noise(noisy, torch.full((4,), 400), c2w, None)
    with torch.no_grad():
        alone = tiny_pipe.unet(noisy, torch.full((4,), 400), encoder_hidden_states=prompt.text.expand(4, -1, -1),
                               class_labels=camera_condition(c2w)).sample
    assert torch.allclose(eps_text, alone, atol=1e-5) and not torch.allclose(eps_plain, alone, atol=1e-3)


def test_eta_counts_each_resolution_phase_at_its_own_speed():
    from recon3d.pipelines.sds import remaining_seconds

    options = SDSOptions(steps=10)  # steps 0-4 at 64 px, 5-9 at 256 px
    assert remaining_seconds(options, 2, {64: [1.0, 1.0]}, 64) == 8.0  # the 256 px speed is not known yet
    assert remaining_seconds(options, 6, {64: [1.0] * 5, 256: [3.0]}, 256) == 12.0  # not the mean over all steps
    assert remaining_seconds(options, 3, {64: [2.0] * 3, 256: [5.0]}, 64) == 2 * 2.0 + 5 * 5.0


def test_options_resolve_the_preset_or_custom_steps_and_the_device_budget_in_one_place():
    quality, custom = TextTo3DOptions(preset="quality"), TextTo3DOptions(preset="custom", steps=300, guidance_scale=20)
    assert (quality.label, custom.label, TextTo3DOptions().label) == ("quality", "custom", "fast")
    on_cpu, on_gpu = quality.recipe("cpu"), quality.recipe(torch.device("cuda"))  # (a device name; nothing runs)
    assert on_gpu == PRESETS["quality"] and on_cpu.steps == 10000
    assert (on_cpu.high_resolution, on_cpu.coarse_samples, on_cpu.fine_samples, on_cpu.mesh_resolution) == (128, 32, 16, 128)
    assert custom.recipe("cpu").steps == 300 and custom.recipe("cpu").guidance_scale == 20
    assert custom.recipe("cpu").t_end == PRESETS["fast"].t_end  # custom steps: the fast schedule, rescaled
    with pytest.raises(ValueError, match="the quality preset runs 10,000 steps; choose custom"):
        TextTo3DOptions(preset="quality", steps=3).validate()
    with pytest.raises(ValueError, match="the custom preset needs a step count"):
        TextTo3DOptions(preset="custom").validate()
    with pytest.raises(ValueError, match="unknown preset 'slow'"):
        TextTo3DOptions(preset="slow").validate()
    for field, value, message in (("seed", -1, "seed must be between 0 and 2147483647, got -1"),
                                  ("guidance_scale", None, "guidance scale must be a number"),
                                  ("guidance_scale", 500, "guidance scale must be between 0 and 200"),
                                  ("steps", 2.5, "steps must be a whole number")):
        with pytest.raises(ValueError, match=message):
            TextTo3DOptions(preset="custom", **{"steps": 10, field: value}).validate()


def test_a_library_caller_gets_the_recipe_of_the_device(tiny_pipe, monkeypatch):
    """generate() resolves the options on the pipeline's device itself: a CPU caller gets the CPU budget."""
    import recon3d.pipelines.text_to_3d as module

    seen = []
    monkeypatch.setattr(module, "distill_to_mesh", lambda prior, recipe, *args: seen.append(recipe) or iter(()))
    list(tiny_pipe.generate("a cup", TextTo3DOptions(preset="quality")))
    assert seen == [TextTo3DOptions(preset="quality").recipe("cpu")] and seen[0].high_resolution == 128


def test_service_job_records_the_preset_or_custom_and_keeps_two_previews(tmp_path):
    from recon3d.cancel import NEVER
    from recon3d.service import RANDOM_MVDREAM, ModelService, ServiceSettings, text_job
    from recon3d.sessions import Sessions

    service, sessions = ModelService(ServiceSettings(random_weights=True)), Sessions(tmp_path)
    for preset, steps in (("fast", None), ("custom", 3)):
        options = TextTo3DOptions(preset=preset, steps=steps, seed=1, negative_prompt="  blurry,  dull ",
                                  base=replace(TINY, steps=3) if steps is None else TINY)
        glb = run_to_end(text_job(service, sessions, "visitor", RANDOM_MVDREAM, "a vase", options, SDSControl(), NEVER))
        extras = read_extras(glb.path)
        assert (extras["preset"], extras["steps"], extras["steps_done"]) == ("custom", 3, 3)  # a base recipe is custom
        assert extras["negative_prompt"] == "blurry, dull" and extras["seed"] == 1
    assert len(list(tmp_path.rglob("text-preview*.png"))) == 4  # 3 previews per job, each job keeps its latest two


def test_the_reference_defaults():
    """MVDream-threestudio's negative prompt, the sampling script's quick look, 4-view groups, level-25 meshes."""
    from recon3d.field import NeuralTriplaneField
    from recon3d.pipelines.text_to_3d import REFERENCE_NEGATIVE_PROMPT, QuickLookOptions, export_state

    assert TextTo3DOptions().negative_prompt == REFERENCE_NEGATIVE_PROMPT
    assert REFERENCE_NEGATIVE_PROMPT.startswith("ugly, bad anatomy, blurry") and REFERENCE_NEGATIVE_PROMPT.endswith(
        "dehydrated, bad proportions")
    assert TextTo3DOptions(negative_prompt="").validate().negative_prompt == ""  # clearable
    look = QuickLookOptions()
    assert (look.guidance_scale, look.azimuth_start_deg, look.elevation_deg, look.negative_prompt) == (10.0, 90.0, 15.0, "")
    with pytest.raises(ValueError, match="views must be 4: MVDream denoises groups of 4 views"):
        SDSOptions(views=3)
    for bad in ({"preview_every": 0}, {"max_skipped_in_a_row": 0}):
        with pytest.raises(ValueError, match="must be at least 1"):
            SDSOptions(**bad)
    assert NeuralTriplaneField(torch.Generator().manual_seed(0), 32, 8).iso_level == 25.0
    state = new_state(TINY, torch.Generator().manual_seed(0), "cpu")
    result = export_state(state, TINY, {}, None)  # the start blob peaks near 10: no surface at 25 yet
    assert result.extras["iso_level"] == 5.0 and len(result.mesh.faces) > 0
    assert result.extras["iso_level_note"] == "no surface at density 25: meshed at density 5"


def test_timesteps_include_the_upper_end_and_half_the_elevations_are_uniform_on_the_sphere():
    from recon3d.cameras import sample_orbit_cameras

    prior = FixedNoise(torch.zeros(4, 4, 2, 2), torch.zeros(4, 4, 2, 2))
    generator, seen = torch.Generator().manual_seed(0), set()
    c2w, intrinsics = orbit_camera(torch.arange(4.0) * 90, 10.0, 2.0), torch.zeros(4, 4)
    for _ in range(60):
        _, t = x0_reconstruction_loss(prior, torch.zeros(4, 4, 2, 2), (0.5, 0.502), c2w, intrinsics, SDSOptions(),
                                      generator)
        seen.add(t)
    assert seen == {500, 501, 502}  # [min, max], the reference's inclusive range
    top = {x0_reconstruction_loss(prior, torch.zeros(4, 4, 2, 2), (0.998, 1.0), c2w, intrinsics, SDSOptions(),
                                  generator)[1] for _ in range(30)}
    assert top == {998, 999}  # a range ending at 1.0 ends at the last timestep
    g = torch.Generator().manual_seed(1)
    sphere = sample_orbit_cameras(2000, 4, g, (0.0, 30.0), elevation_on_sphere=True).elevation_deg[:, 0]
    degrees = sample_orbit_cameras(2000, 4, g, (0.0, 30.0)).elevation_deg[:, 0]
    assert 0.0 <= sphere.min() and sphere.max() <= math.degrees(math.asin(1 / 3)) + 1e-4 < 19.5  # 0..19.47 deg
    assert sphere.max() > 19.0 and degrees.max() > 29.0
    assert (sphere < 10).float().mean() > 0.5 > (degrees < 10).float().mean()  # weighted toward the equator


def test_previews_come_every_n_steps_at_most_every_few_seconds():
    from recon3d.pipelines.sds import for_device, preview_due

    options = SDSOptions(steps=100, preview_every=10, preview_seconds=3.0)
    due = [step for step in range(1, 101) if preview_due(options, step, since_last=5.0)]
    assert due == [1, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
    assert not preview_due(options, 20, since_last=1.0) and preview_due(options, 100, since_last=0.0)
    assert for_device(options, "cpu").preview_every == 1 and for_device(options, "cuda").preview_every == 10


def test_the_field_has_levels_on_a_gpu_and_one_plane_within_the_cpu_budget():
    from recon3d.field import NeuralTriplaneField
    from recon3d.pipelines.sds import CPU_FIELD, field_size, for_device

    recipe = SDSOptions()
    assert (recipe.field_resolution, recipe.field_channels, recipe.field_levels) == (512, 8, 4)
    assert for_device(recipe, "cuda") == recipe
    cpu = for_device(recipe, "cpu")
    assert {k: getattr(cpu, k) for k in CPU_FIELD} == CPU_FIELD
    assert {k: getattr(for_device(TINY, "cpu"), k) for k in CPU_FIELD} == \
        {"field_resolution": 32, "field_channels": 8, "field_levels": 1}  # already smaller: kept
    assert field_size(recipe) == 3 * 8 * (64 ** 2 + 128 ** 2 + 256 ** 2 + 512 ** 2)

    levels = NeuralTriplaneField(torch.Generator().manual_seed(0), 32, 4, levels=3)
    assert [tuple(p.shape) for p in levels.grid_parameters()] == [(1, 3, 4, 8, 8), (1, 3, 4, 16, 16), (1, 3, 4, 32, 32)]
    assert levels.planes.shape == (1, 3, 4, 32, 32) and levels.hidden.shape[0] == 3 * 4 * 3
    density, rgb = levels.query(torch.rand(1, 64, 3) * 2 - 1)
    (density.sum() + rgb.sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in levels.grid_parameters())  # every level learns
    one = NeuralTriplaneField(torch.Generator().manual_seed(0), 32, 4, levels=1)
    generator = torch.Generator().manual_seed(0)  # the single-plane field's draws before levels existed
    old_planes = 0.1 * torch.randn((1, 3, 4, 32, 32), generator=generator)
    old_hidden = torch.randn((12, 64), generator=generator) / 12 ** 0.5
    assert torch.equal(one.planes, old_planes) and torch.equal(one.hidden, old_hidden)
    with pytest.raises(ValueError, match="leave a coarsest plane under 2 texels"):
        NeuralTriplaneField(torch.Generator().manual_seed(0), 8, 4, levels=4)
