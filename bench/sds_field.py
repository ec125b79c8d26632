"""Which pure-PyTorch field to optimise with score distillation: the learnable triplane + MLP
(:class:`recon3d.field.NeuralTriplaneField`) or a dense voxel grid (:class:`DenseGridField`, below).

Run from the repository root::

    PYTHONPATH=. python bench/sds_field.py --threads 1 --seeds 0,1  # what made bench/results/sds-field-cpu.json
    PYTHONPATH=. python bench/sds_field.py --quick                  # 20 steps, a smoke test (writes *-quick.json)

On a shared 2-core machine use ``--threads 1``: with another process busy, torch's 2 OpenMP threads fight for the
cores and a step took 10x longer (2.9 s against 0.39 s for the small triplane step) than with one thread.

What it measures. The real loop (:func:`recon3d.pipelines.sds.optimise`, hence ``sds_step``, ``make_optimiser``,
the camera sampling and the timestep annealing) is driven by an analytic prior (:class:`TargetPrior`) whose noise
prediction is exactly the one that denoises to the render of a known target from the same cameras: a sphere of
radius 0.5 (density ``50 sigmoid((0.5 - |x|) 40)``), red above z = 0 and blue below, on white. So the loop is
plain SDS toward a known answer and the question is only how well, and how fast, each field gets there.

For every field it reports
  * parameters (and MiB of float32 parameters; AdamW keeps two more copies);
  * seconds per SDS step on this machine (median over the steps), in all and without the analytic prior's own
    render of the target (which a real diffusion prior replaces with a network call), and the process CPU
    seconds per step (all threads). The fields' runs are interleaved step by step, so load from other processes
    on a shared machine falls on all of them alike;
  * IoU at the export level (field density > 5, the fields' ``iso_level``) against the sphere on a 40^3 lattice,
    at step 0 (the density blob alone) and after each ``--eval-at`` step;
  * the export mesh (``recon3d.mesh.extract_mesh`` at the field's level 5, 64^3): the radius of its vertices
    (mean, spread: the target's is exactly 0.5), the fraction of its vertices above z > 0.1 that are reddish
    (r > g + 0.2 and r > b + 0.2) and of those below z < -0.1 that are bluish.
Then the seconds per step at a realistic setting (64 px renders, 2 groups of 4 views, 64 + 32 samples per ray)
for a 128^2 x 16 triplane against dense grids of the same memory and of the same resolution (``--large-steps``
timed steps after one warm-up step, interleaved), and the fields' own cost: one query of 393,216 points
(what one 64 px step of 8 views x 48 samples asks per chunk pass), forward and backward.

The small runs use ``SDSOptions(low/high_resolution=32, field_resolution=32, field_channels=8, 32 + 16 samples,
learn_background=False, random_background_probability=0)``. The dense grid is tried at equal parameters (19^3,
with the pipeline's grid learning rate 0.01 and with 0.1, the usual rate for raw voxel grids, e.g. DVGO) and at
equal resolution (32^3, 5x the parameters, lr 0.1; at lr 0.01 it did no better: IoU 0.70 at 200 steps).
Results go to a table and ``bench/results/sds-field-cpu.json``.

Capacity (``--capacity``): which field the recipe should use on a GPU. The same loop, with one group of 4 views
at ``--size`` px, white background and the pipeline's learning rates, is driven toward a target with detail: a
ball of radius 0.35 painted with 16 red and yellow stripes, a blue ring (radius 0.6, tube 0.05) and a green pole
(radius 0.04 from z = 0.3 to 0.8), density ``50 sigmoid(-100 sdf)``; the prior renders the target with 64 + 32
samples for every candidate. Reported per candidate: parameters, seconds per step, and at each ``--eval-at`` step
the held-out PSNR (8 views at 96 px, 128 + 64 samples, cameras the loop never used), the IoU of the field's
solid (density > 25, the export level) against the target's on a 96^3 lattice, and the recall of the thin parts
(ring and pole). Candidates: one 128^2 x 16 plane (the old recipe), one 256^2 x 16 plane, 4 levels of 8 channels
from 64^2 to 512^2 (64 + 32 samples and 128 + 64 samples). ``--only`` picks some::

    PYTHONPATH=. python bench/sds_field.py --capacity --size 48 --steps 200 --eval-at 50,100,150,200 \
        --only "128^2x16 / 64+32 (current),256^2x16 / 64+32,4 levels 64-512 x8 / 64+32"   # the CPU run recorded
    PYTHONPATH=. python bench/sds_field.py --capacity --device cuda --size 256 --steps 1000   # on a GPU

Results go to ``bench/results/sds-capacity-<device>.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lrm import format_table, machine_info, write_report  # noqa: E402  (bench/lrm.py: same reports)

from recon3d.field import Field, NeuralTriplaneField, PointField  # noqa: E402
from recon3d.noise import derived  # noqa: E402
from recon3d.mesh import EmptyMeshError, MeshSettings, extract_mesh  # noqa: E402
from recon3d.pipelines.events import Finished, StepReport  # noqa: E402
from recon3d.pipelines.sds import BackgroundNetwork, SDSOptions, SDSState, optimise  # noqa: E402
from recon3d.cameras import intrinsics_from_fov, orbit_camera  # noqa: E402
from recon3d.render import RenderSettings, render_views  # noqa: E402

RED, BLUE = (0.9, 0.1, 0.1), (0.1, 0.1, 0.9)
TARGET_RADIUS = 0.5
ISO_LEVEL = 5.0


# ----------------------------------------------------------------------------- the dense alternative

class DenseGridField(torch.nn.Module, Field):
    """One object to optimise as a dense voxel grid (1, 4, R, R, R): raw density and raw colour, index order
    (x, y, z), grid point i at -1 + 2 i / (R - 1), read trilinearly with one 3D ``grid_sample``
    (align_corners=True). As :class:`~recon3d.field.NeuralTriplaneField`: the density blob
    ``blob_density * exp(-|x|^2 / (2 blob_radius^2))`` is added to the raw density, then softplus; colour is a
    sigmoid; exported at density 5. No decoder: every parameter is a voxel (``decoder_parameters()`` is empty)."""

    def __init__(self, generator: torch.Generator, resolution: int = 64, blob_density: float = 10.0,
                 blob_radius: float = 0.5, iso_level: float | None = ISO_LEVEL, init_std: float = 0.01):
        torch.nn.Module.__init__(self)
        self.grid = torch.nn.Parameter(init_std * torch.randn((1, 4, resolution, resolution, resolution),
                                                              generator=generator))
        self.blob_density, self.blob_radius, self.iso_level = blob_density, blob_radius, iso_level

    def grid_parameters(self) -> list[torch.nn.Parameter]:
        return [self.grid]

    def decoder_parameters(self) -> list[torch.nn.Parameter]:
        return []

    @property
    def sample_spacing(self) -> float:
        return 2.0 / (self.grid.shape[-1] - 1)

    @property
    def device(self) -> torch.device:
        return self.grid.device

    def query(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        points = points.to(self.device, torch.float32)
        n, p = points.shape[:2]
        # grid_sample's last coordinate indexes the last spatial axis: (x, y, z) -> (z, y, x); one object for all rows
        coords = points.flip(-1).reshape(1, 1, 1, n * p, 3)
        raw = F.grid_sample(self.grid, coords, mode="bilinear", padding_mode="zeros", align_corners=True)
        raw = raw.reshape(4, n, p).permute(1, 2, 0)  # (N, P, 4)
        blob = self.blob_density * torch.exp(-points.square().sum(-1, keepdim=True) / (2 * self.blob_radius ** 2))
        return F.softplus(raw[..., :1] + blob), torch.sigmoid(raw[..., 1:])


# ----------------------------------------------------------------------------- the analytic target and prior

def sphere(points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    radius = points.norm(dim=-1, keepdim=True)
    density = 50 * torch.sigmoid((TARGET_RADIUS - radius) * 40)
    rgb = torch.where(points[:, 2:3] > 0, torch.tensor(RED), torch.tensor(BLUE))
    return density, rgb


class TargetPrior:
    """A "diffusion prior" whose noise prediction denoises exactly to the target rendered from the same cameras
    (latents: the render average-pooled to half size, in [-1, 1]); times its own target renders."""

    def __init__(self, target: Field, options: SDSOptions, encoder_size: int = 64):
        from diffusers import DDIMScheduler

        from recon3d.models.mvdream import SD_SCHEDULER_CONFIG

        self.target, self.encoder_size = target, encoder_size
        self.alphas_cumprod = DDIMScheduler(**SD_SCHEDULER_CONFIG).alphas_cumprod
        self.settings = RenderSettings(options.coarse_samples, options.fine_samples)
        self.seconds = 0.0

    def encode(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return F.avg_pool2d(images, 2) * 2 - 1

    def predict_noise(self, noisy, t, c2w, K):
        start = time.perf_counter()
        size = self.encoder_size
        rgb = render_views(self.target, c2w[None], K[None], size, size, self.settings)["rgb"][0]
        x0 = self.encode(rgb.permute(0, 3, 1, 2), None)
        abar = self.alphas_cumprod.to(noisy.device)[t].view(-1, 1, 1, 1)
        eps = (noisy - abar.sqrt() * x0) / (1 - abar).sqrt()
        self.seconds += time.perf_counter() - start
        return eps, eps


# ----------------------------------------------------------------------------- metrics

@torch.no_grad()
def iou(field: Field, size: int = 40) -> float:
    axis = torch.linspace(-1, 1, size)
    points = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(1, -1, 3)
    inside = field.query(points)[0][0, :, 0] > ISO_LEVEL
    truth = points[0].norm(dim=-1) < TARGET_RADIUS
    return float((inside & truth).sum() / (inside | truth).sum().clamp(min=1))


@torch.no_grad()
def mesh_scores(field: Field) -> dict:
    """The export mesh (level 5, 64^3): fractions of its vertices with the right colour (reddish above z > 0.1,
    bluish below z < -0.1) and the radius of its vertices (mean and spread; the target's is 0.5)."""
    try:
        mesh, _ = extract_mesh(field, MeshSettings(resolution=64))
    except EmptyMeshError:
        return {"red_top": None, "blue_bottom": None, "vertices": 0, "radius_mean": None, "radius_std": None,
                "radius_abs_error": None}
    v, c = torch.from_numpy(mesh.vertices), torch.from_numpy(mesh.colors)
    r, g, b = c.unbind(-1)
    reddish, bluish = (r > g + 0.2) & (r > b + 0.2), (b > g + 0.2) & (b > r + 0.2)
    top, bottom = v[:, 2] > 0.1, v[:, 2] < -0.1
    frac = lambda ok, sel: float(ok[sel].float().mean()) if sel.any() else None  # noqa: E731
    radius = v.norm(dim=-1)
    return {"red_top": frac(reddish, top), "blue_bottom": frac(bluish, bottom), "vertices": len(v),
            "radius_mean": float(radius.mean()), "radius_std": float(radius.std()),
            "radius_abs_error": float((radius - TARGET_RADIUS).abs().mean())}


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------- runs

def make_field(spec: dict, generator: torch.Generator) -> torch.nn.Module:
    if spec["kind"] == "triplane":
        return NeuralTriplaneField(generator, spec["resolution"], spec["channels"], levels=spec.get("levels", 1),
                                   iso_level=spec.get("iso_level", ISO_LEVEL))
    return DenseGridField(generator, spec["resolution"])


def small_options(steps: int, grid_lr: float) -> SDSOptions:
    return SDSOptions(steps=steps, low_resolution=32, high_resolution=32, field_resolution=32, field_channels=8,
                      field_levels=1, coarse_samples=32, fine_samples=16, learn_background=False,
                      random_background_probability=0.0, preview_seconds=1e9, preview_size=32, grid_lr=grid_lr)


class Run:
    """One field's SDS run, advanced a step at a time so that several runs can be interleaved: the machine's
    load (other processes on a shared CPU) then falls on every field alike, and wall-clock times compare."""

    def __init__(self, spec: dict, options: SDSOptions, seed: int, target: Field | None = None,
                 prior_size: int = 64, device: str = "cpu"):
        generator = torch.Generator().manual_seed(seed)
        self.spec, self.field = spec, make_field(spec, generator).to(device)
        self.prior = TargetPrior(target or PointField(sphere), options, prior_size)
        # on a GPU the ray jitter is drawn there, as the pipeline does (on the CPU the step's generator draws it,
        # which keeps the CPU results of the sphere runs as they were recorded)
        jitter = derived(generator, device) if device != "cpu" else None
        state = SDSState(self.field, BackgroundNetwork(generator).to(device), render_generator=jitter)
        self.progress = optimise(self.prior, options, generator, device, state=state)
        self.wall, self.cpu, self.prior_wall, self.metrics = [], [], [], None

    def step(self) -> dict | None:
        """One SDS step (None when the run has ended); its wall and process CPU seconds are recorded."""
        wall, cpu, prior = time.perf_counter(), time.process_time(), self.prior.seconds
        event = next(self.progress)
        while not isinstance(event, (StepReport, Finished)):  # (previews, exports: not steps)
            event = next(self.progress)
        if self.field.device.type == "cuda":
            torch.cuda.synchronize()
        if isinstance(event, Finished):
            return None
        self.wall.append(time.perf_counter() - wall)
        self.cpu.append(time.process_time() - cpu)
        self.prior_wall.append(self.prior.seconds - prior)
        self.metrics = dataclasses.asdict(event)
        return self.metrics

    def timing(self, skip: int = 0) -> dict:
        wall, cpu, prior = self.wall[skip:], self.cpu[skip:], self.prior_wall[skip:]
        return {"steps_timed": len(wall), "seconds_per_step": statistics.median(wall),
                "mean_seconds_per_step": statistics.fmean(wall), "cpu_seconds_per_step": statistics.median(cpu),
                "prior_seconds_per_step": statistics.median(prior),
                "field_seconds_per_step": statistics.median(w - p for w, p in zip(wall, prior))}


def describe(field: torch.nn.Module) -> dict:
    count = parameter_count(field)
    return {"parameters": count, "parameter_mib": count * 4 / 2 ** 20}


def run_interleaved(runs: list[Run], steps: int, eval_at: list[int], seed: int,
                    evaluate: Callable[[Field], dict], show: Callable[[dict], str]) -> list[dict]:
    """``steps`` SDS steps of every run, interleaved step by step; ``evaluate(field)`` at step 0 and at each
    ``eval_at`` step (``show`` prints it); then each run's timing."""
    records = [{**run.spec, "seed": seed, **describe(run.field), "evals": [{"step": 0, **evaluate(run.field)}]}
               for run in runs]
    for step in range(1, steps + 1):
        for run, record in zip(runs, records):
            metrics = run.step()
            if step in eval_at:
                record["evals"].append({"step": step, **evaluate(run.field), "loss": metrics["loss"]})
                print(f"    {run.spec['name']:>26} step {step}: {show(record['evals'][-1])}  "
                      f"{statistics.median(run.wall):.3f} s/step", flush=True)
    for run, record in zip(runs, records):
        assert run.step() is None  # the "done" progress
        record.update(run.timing())
    return records


def run_quality(specs: list[dict], steps: int, eval_at: list[int], seed: int) -> list[dict]:
    """``steps`` SDS steps toward the sphere for every spec, interleaved step by step; IoU and colour at step 0
    and at each ``eval_at`` step."""
    runs = [Run(spec, small_options(steps, spec["grid_lr"]), seed) for spec in specs]
    return run_interleaved(runs, steps, eval_at, seed, lambda field: {"iou": iou(field), **mesh_scores(field)},
                           lambda e: f"IoU {e['iou']:.3f}  radius {_fmt(e['radius_mean'])}+-{_fmt(e['radius_std'])}  "
                                     f"red top {_fmt(e['red_top'])}  blue bottom {_fmt(e['blue_bottom'])}")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def run_timing(specs: list[dict], timed_steps: int, seed: int) -> list[dict]:
    """Seconds per SDS step at 64 px, 2 groups of 4 views, 64 + 32 samples, fields interleaved step by step;
    the first step of each is a warm-up and not timed."""
    runs = []
    for spec in specs:
        options = SDSOptions(steps=timed_steps + 2, low_resolution=64, high_resolution=64, coarse_samples=64,
                             fine_samples=32, learn_background=False, random_background_probability=0.0,
                             preview_seconds=1e9, preview_size=32, grid_lr=spec["grid_lr"])
        runs.append(Run(spec, options, seed))
    for _ in range(timed_steps + 1):  # the last step (with its preview render) is never run
        for run in runs:
            run.step()
    return [{**run.spec, **describe(run.field), "render_size": 64, "views": 8, "samples": "64+32",
             **run.timing(skip=1)} for run in runs]


def query_timing(specs: list[dict], points: int = 393216, repeats: int = 3) -> list[dict]:
    """Seconds for one ``query`` of ``points`` random points and its backward (sum of outputs), best of
    ``repeats``: the field's own share of a render, without the renderer."""
    generator = torch.Generator().manual_seed(0)
    xyz = torch.rand(1, points, 3, generator=generator) * 2 - 1
    records = []
    for spec in specs:
        field, best = make_field(spec, generator), (math.inf, math.inf)
        for _ in range(repeats):
            start = time.perf_counter()
            density, rgb = field.query(xyz)
            middle = time.perf_counter()
            (density.sum() + rgb.sum()).backward()
            best = min(best, (middle - start, time.perf_counter() - middle), key=sum)
        records.append({**spec, **describe(field), "points": points, "forward_seconds": best[0],
                        "backward_seconds": best[1]})
    return records


SMALL_SPECS = [
    {"name": "triplane 32^2x8", "kind": "triplane", "resolution": 32, "channels": 8, "grid_lr": 0.01},
    {"name": "dense 19^3 lr.01", "kind": "dense", "resolution": 19, "channels": 4, "grid_lr": 0.01},
    {"name": "dense 19^3 lr.1", "kind": "dense", "resolution": 19, "channels": 4, "grid_lr": 0.1},
    {"name": "dense 32^3 lr.1", "kind": "dense", "resolution": 32, "channels": 4, "grid_lr": 0.1},
]
LARGE_SPECS = [
    {"name": "triplane 128^2x16", "kind": "triplane", "resolution": 128, "channels": 16, "grid_lr": 0.01},
    {"name": "dense 58^3 (same memory)", "kind": "dense", "resolution": 58, "channels": 4, "grid_lr": 0.1},
    {"name": "dense 128^3 (same resolution)", "kind": "dense", "resolution": 128, "channels": 4, "grid_lr": 0.1},
]


# ----------------------------------------------------------------------------- capacity: a target with detail

BODY_RADIUS = 0.35  # a striped ball ...
STRIPES = 16  # ... of 16 red and yellow stripes around z (about 0.14 units wide at the equator)
RING = (0.6, 0.05)  # a blue ring around it in the z = 0 plane: (radius, tube radius)
POLE = (0.04, 0.3, 0.8)  # a green pole on top: (radius, z from, z to)
YELLOW, GREEN = (0.9, 0.8, 0.1), (0.1, 0.7, 0.2)
CAPACITY_ISO = 25.0  # the pipeline's export level


def detailed_parts(points: torch.Tensor) -> torch.Tensor:
    """Signed distances (P, 3) of points (P, 3) to the ball, the ring and the pole."""
    body = points.norm(dim=-1) - BODY_RADIUS
    ring = torch.stack([points[:, :2].norm(dim=-1) - RING[0], points[:, 2]], -1).norm(dim=-1) - RING[1]
    radial = points[:, :2].norm(dim=-1) - POLE[0]
    along = (points[:, 2] - (POLE[1] + POLE[2]) / 2).abs() - (POLE[2] - POLE[1]) / 2
    outside = torch.stack([radial, along], -1)
    pole = outside.clamp(min=0).norm(dim=-1) + outside.amax(-1).clamp(max=0)
    return torch.stack([body, ring, pole], -1)


def detailed(points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The detailed target: thin parts (a 0.1-thick ring, a 0.08-thick pole) and a texture (stripes)."""
    parts = detailed_parts(points)
    distance, nearest = parts.min(-1)
    density = 50 * torch.sigmoid(-distance * 100)[:, None]
    stripe = torch.sin(STRIPES / 2 * torch.atan2(points[:, 1], points[:, 0])) > 0
    red, yellow, blue, green = (points.new_tensor(colour) for colour in (RED, YELLOW, BLUE, GREEN))
    body = torch.where(stripe[:, None], red, yellow)
    rgb = torch.where((nearest == 0)[:, None], body, torch.where((nearest == 1)[:, None], blue, green))
    return density, rgb


HELD_OUT_SIZE = 96
HELD_OUT_SETTINGS = RenderSettings(128, 64)  # held-out views (the target's and each candidate's) this finely
PRIOR_SETTINGS = RenderSettings(64, 32)  # the prior renders the target the same way for every candidate


def held_out_views(field: Field, size: int = HELD_OUT_SIZE) -> torch.Tensor:
    """8 views that SDS never draws exactly (azimuths 22.5 + 45 k, elevations 20 and -5), 40 deg, on white."""
    azimuths = 22.5 + 45.0 * torch.arange(8.0)
    elevations = torch.tensor([20.0, -5.0] * 4)
    c2w = orbit_camera(azimuths, elevations, 0.9 / math.tan(math.radians(20)))[None]  # (1, 8, 4, 4)
    return render_views(field, c2w, intrinsics_from_fov(40.0), size, size, HELD_OUT_SETTINGS)["rgb"][0].cpu()


@torch.no_grad()
def capacity_scores(field: Field, truth: torch.Tensor, size: int = 96) -> dict:
    """PSNR of the held-out views against the target's (``truth``), IoU at the export level on a ``size``^3
    lattice, and the recall of the thin parts (ring and pole): the fraction of their lattice points inside."""
    psnr = -10 * math.log10(float((held_out_views(field) - truth).square().mean()))
    axis = torch.linspace(-1, 1, size)
    points = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    inside = torch.cat([field.query(chunk[None].to(field.device))[0][0, :, 0].cpu()
                        for chunk in points.split(2 ** 18)]) > CAPACITY_ISO
    parts = detailed_parts(points) < 0
    truth_inside, thin = parts.any(-1), parts[:, 1:].any(-1)
    return {"psnr": psnr, "iou": float((inside & truth_inside).sum() / (inside | truth_inside).sum().clamp(min=1)),
            "thin_recall": float(inside[thin].float().mean())}


CAPACITY_SPECS = [
    {"name": "128^2x16 / 64+32 (current)", "kind": "triplane", "resolution": 128, "channels": 16, "samples": (64, 32)},
    {"name": "256^2x16 / 64+32", "kind": "triplane", "resolution": 256, "channels": 16, "samples": (64, 32)},
    {"name": "4 levels 64-512 x8 / 64+32", "kind": "triplane", "resolution": 512, "channels": 8, "levels": 4,
     "samples": (64, 32)},
    {"name": "4 levels 64-512 x8 / 128+64", "kind": "triplane", "resolution": 512, "channels": 8, "levels": 4,
     "samples": (128, 64)},
]


def capacity_options(spec: dict, steps: int, size: int) -> SDSOptions:
    """One group of 4 views at ``size`` px all along, white background, the pipeline's learning rates."""
    coarse, fine = spec["samples"]
    return SDSOptions(steps=steps, low_resolution=size, high_resolution=size, low_resolution_groups=1,
                      high_resolution_groups=1, coarse_samples=coarse, fine_samples=fine, learn_background=False,
                      random_background_probability=0.0, preview_seconds=1e9, preview_size=32)


def run_capacity(specs: list[dict], steps: int, eval_at: list[int], seed: int, size: int, device: str) -> list[dict]:
    """Every candidate field through the same SDS loop toward the detailed target, interleaved step by step."""
    target = PointField(detailed, sample_spacing=2.0 / 256)
    truth = held_out_views(target)
    runs = []
    for spec in specs:
        spec = {**spec, "iso_level": CAPACITY_ISO, "grid_lr": SDSOptions.grid_lr}
        run = Run(spec, capacity_options(spec, steps, size), seed, target, prior_size=size, device=device)
        run.prior.settings = PRIOR_SETTINGS
        runs.append(run)
    return run_interleaved(runs, steps, eval_at, seed, lambda field: capacity_scores(field, truth),
                           lambda e: f"PSNR {e['psnr']:.2f} dB  IoU {e['iou']:.3f}  thin recall {e['thin_recall']:.3f}")


def capacity_report(args: argparse.Namespace, info: dict) -> dict:
    eval_at = sorted({int(s) for s in args.eval_at.split(",") if int(s) <= args.steps} | {args.steps})
    specs = CAPACITY_SPECS if not args.only else [s for s in CAPACITY_SPECS if s["name"] in args.only.split(",")]
    print(f"  capacity: {args.steps} steps toward the detailed target at {args.size} px on {args.device}", flush=True)
    runs = []
    for seed in (int(s) for s in args.seeds.split(",")):
        runs += run_capacity(specs, args.steps, eval_at, seed, args.size, args.device)
    headers = ["field", "seed", "params", "s/step", "w/o prior"] + \
              [f"{metric}@{s}" for s in [0, *eval_at] for metric in ("PSNR", "IoU", "thin")]
    rows = [[r["name"], r["seed"], r["parameters"], r["seconds_per_step"], r["field_seconds_per_step"]] +
            [e[key] for e in r["evals"] for key in ("psnr", "iou", "thin_recall")] for r in runs]
    print(f"\nSDS toward the detailed target (ball with 16 stripes, 0.1-thick ring, 0.08-thick pole), {args.size} px, "
          f"1 group x 4 views; held-out PSNR (dB, 8 views at {HELD_OUT_SIZE} px), IoU and thin-part recall at "
          f"density {CAPACITY_ISO:g}")
    print(format_table(headers, rows))
    return {"machine": info, "args": vars(args), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "target": {"body_radius": BODY_RADIUS, "stripes": STRIPES, "ring": RING, "pole": POLE,
                       "density": "50*sigmoid(-sdf*100)"},
            "options": capacity_options(specs[0], args.steps, args.size).to_dict(), "runs": runs}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--eval-at", default="50,100,200", help="steps at which to measure IoU and colour")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds for the small runs")
    parser.add_argument("--large-steps", type=int, default=3, help="timed steps at the 64 px setting (0: skip)")
    parser.add_argument("--only", default=None, help="comma-separated small-run names to keep (default: all)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="20 steps, one large timed step: a smoke test")
    parser.add_argument("--capacity", action="store_true",
                        help="compare the candidate fields for a GPU toward the detailed target instead")
    parser.add_argument("--size", type=int, default=64, help="--capacity: render size in pixels")
    parser.add_argument("--device", default="cpu", help="--capacity: where to run (cpu, cuda)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.eval_at, args.large_steps = 20, "10,20", 1
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_grad_enabled(True)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info()
    print(f"Machine: {info['cpu']} ({info['cpu_count']} CPUs, {info['torch_threads']} threads), torch {info['torch']}",
          flush=True)
    quick = "-quick" if args.quick else ""
    if args.capacity:
        report = capacity_report(args, info)
        device = torch.device(args.device).type
        write_report(Path(args.json) if args.json else REPO / "bench" / "results" / f"sds-capacity-{device}{quick}.json",
                     report)
        return report
    eval_at = sorted({int(s) for s in args.eval_at.split(",") if int(s) <= args.steps} | {args.steps})
    specs = SMALL_SPECS if not args.only else [s for s in SMALL_SPECS if s["name"] in args.only.split(",")]
    runs = []
    for seed in (int(s) for s in args.seeds.split(",")):
        print(f"  {', '.join(s['name'] for s in specs)}: {args.steps} steps each, seed {seed}", flush=True)
        runs += run_quality(specs, args.steps, eval_at, seed)
    timings = []
    if args.large_steps > 0:
        print(f"  timing {', '.join(s['name'] for s in LARGE_SPECS)} at 64 px", flush=True)
        timings = run_timing(LARGE_SPECS, args.large_steps, 0)
    queries = query_timing(LARGE_SPECS)

    headers = ["field", "seed", "params", "s/step", "w/o prior", "CPU s/step"] + \
              [f"IoU@{s}" for s in [0, *eval_at]] + ["radius", "+-", "red top", "blue bottom"]
    rows = []
    for run in runs:
        by_step = {e["step"]: e for e in run["evals"]}
        last = by_step[eval_at[-1]]
        rows.append([run["name"], run["seed"], run["parameters"], run["seconds_per_step"],
                     run["field_seconds_per_step"], run["cpu_seconds_per_step"]] + [by_step[s]["iou"] for s in [0, *eval_at]] +
                    [last["radius_mean"], last["radius_std"], last["red_top"], last["blue_bottom"]])
    print(f"\nSDS toward a red/blue sphere, 32 px, 2 groups x 4 views, 32 + 16 samples; median s/step; "
          f"colour at step {eval_at[-1]}")
    print(format_table(headers, rows))
    if timings:
        print("\nSeconds per SDS step (median) at 64 px, 2 groups x 4 views, 64 + 32 samples")
        print(format_table(["field", "params", "MiB", "s/step", "w/o prior", "CPU s/step"],
                           [[t["name"], t["parameters"], t["parameter_mib"], t["seconds_per_step"],
                             t["field_seconds_per_step"], t["cpu_seconds_per_step"]] for t in timings]))
    print(f"\nOne field query of {queries[0]['points']:,} random points, forward and backward (best of 3)")
    print(format_table(["field", "params", "forward s", "backward s"],
                       [[q["name"], q["parameters"], q["forward_seconds"], q["backward_seconds"]] for q in queries]))
    report = {"machine": info, "args": vars(args), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "target": {"radius": TARGET_RADIUS, "density": "50*sigmoid((0.5-|x|)*40)", "top": RED, "bottom": BLUE},
              "small_options": small_options(args.steps, 0.01).to_dict(), "runs": runs, "timings": timings,
              "query_timings": queries}
    path = Path(args.json) if args.json else REPO / "bench" / "results" / f"sds-field-cpu{quick}.json"
    write_report(path, report)
    return report


if __name__ == "__main__":
    main()
