"""Score distillation (SDS) of a multi-view diffusion prior into a field, following MVDream's published recipe.

The loop knows nothing of MVDream: a :class:`MultiViewPrior` turns renders into latents and predicts noise for
groups of views. MVDream's prior lives in :mod:`recon3d.pipelines.text_to_3d`; the tests drive the same loop with
an analytic prior whose denoised estimate is the render of a known object, and check that the exported mesh
becomes that object.

One step: draw camera groups (4 views 90 deg apart; shared random elevation, field of view and a distance that
keeps the object's size in the image), render the field (64 px, 2 groups, for the first half of the steps, then
256 px, 1 group) over a learnt background (replaced by a random solid colour half the time), resize to the
encoder's 256 px, encode with the gradient through the encoder, noise at one t (uniform in a range annealed from
[0.98, 0.98] to [0.02, 0.50] of the schedule over the first 80 % of the steps), predict the noise with and without
the text, and pull the latents toward the classifier-free x0 estimate (CFG rescale 0.5):
loss = 0.5 * sum((latents - x0)^2) / batch, which is SDS weighted by sqrt((1 - abar) / abar).
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Iterator, Protocol

import torch
import torch.nn.functional as F

from ..cameras import sample_orbit_cameras
from ..cancel import NEVER, CancelToken
from ..field import NeuralTriplaneField
from ..noise import derived, rand_tensor, randint, randn_tensor
from ..options import Limit, check_limits, limited
from ..render import RenderSettings, render_orbit, render_views
from ..sharing import DeviceLease, Ticket
from .events import Event, Exported, Finished, Preview, StepReport

STEPS = Limit("steps", 1, 20000, whole=True)
GUIDANCE = Limit("guidance scale", 0.0, 200.0)


class MultiViewPrior(Protocol):
    """What SDS needs of a multi-view diffusion model."""

    alphas_cumprod: torch.Tensor  # (T,) float32, on any device
    encoder_size: int  # renders are resized to this before encoding

    def encode(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Images (B, 3, S, S) in [0, 1] -> float32 latents (B, ...), differentiable."""

    def predict_noise(self, noisy: torch.Tensor, t: torch.Tensor, c2w: torch.Tensor,
                      intrinsics: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Noisy latents (B, ...), timesteps (B,), cameras (B, 4, 4) and (B, 4), groups of views adjacent ->
        float32 noise predictions with and without the text condition."""


@dataclass
class SDSOptions:
    """The recipe (defaults: MVDream's published text-to-3D configuration, 10,000 steps)."""

    steps: int = limited(10000, STEPS)
    guidance_scale: float = limited(50.0, GUIDANCE)
    cfg_rescale: float = 0.5
    t_start: tuple[float, float] = (0.98, 0.98)  # (min, max) fraction of the schedule at step 0
    t_end: tuple[float, float] = (0.02, 0.50)  # ... reached at anneal_fraction of the steps
    anneal_fraction: float = 0.8
    views: int = 4  # MVDream denoises groups of exactly 4 views (checked, as the reference does)
    low_resolution: int = 64
    low_resolution_groups: int = 2
    high_resolution: int = 256
    high_resolution_groups: int = 1
    high_resolution_from: float = 0.5  # fraction of the steps rendered at low resolution
    elevation_range_deg: tuple[float, float] = (0.0, 30.0)
    sphere_elevation_probability: float = 0.5  # batches whose elevation is uniform on the sphere, not in degrees
    fov_range_deg: tuple[float, float] = (15.0, 60.0)
    distance_range: tuple[float, float] = (0.8, 1.0)  # times 1 / tan(fov / 2), for an object of radius 1
    grid_lr: float = 0.01
    network_lr: float = 0.001
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-15
    weight_decay: float = 0.01  # (AdamW's default, which the published run keeps)
    learn_background: bool = True  # False: white behind the object (the analytic test prior renders on white)
    random_background_probability: float = 0.5
    # the field: 4 triplanes of 8 channels, 64^2 to 512^2 (the CPU budget: one 128^2 x 16 plane). Chosen with
    # bench/sds_field.py --capacity (bench/results/sds-capacity-cpu.json): toward a detailed target it gained 1.9 dB
    # of held-out PSNR over the single 128^2 plane at 200 steps, at 1.8x the seconds per step on a CPU, where the
    # field is most of a step; on a GPU the UNet is, so quality per step decides there (GPU figures: not yet)
    field_resolution: int = 512  # the finest plane's
    field_channels: int = 8  # per level
    field_levels: int = 4  # planes from field_resolution / 2^(levels - 1) up to field_resolution
    coarse_samples: int = 64
    fine_samples: int = 32
    chunk_rays: int = 16384
    preview_every: int = 10  # a preview every this many steps (and after the first and the last step) ...
    preview_seconds: float = 3.0  # ... but at most one in this many seconds
    # a run stops after this many non-finite steps in a row: isolated ones (a rare half-precision overflow) are
    # skipped, but 20 running means the prior itself is broken, and going on would only burn the GPU
    max_skipped_in_a_row: int = 20
    preview_size: int = 128
    mesh_resolution: int = 192

    def __post_init__(self) -> None:
        check_limits(self)
        if self.max_skipped_in_a_row < 1 or self.preview_every < 1:
            raise ValueError("max_skipped_in_a_row and preview_every must be at least 1")
        if self.views != 4:
            raise ValueError(f"views must be 4: MVDream denoises groups of 4 views (got {self.views})")

    def to_dict(self) -> dict:
        return asdict(self)


PRESET_DESCRIPTIONS = {  # for people: the app's and the CLI's help
    "fast": "2,000 steps: the published schedule shortened (annealing and the switch to 256 px at the same fractions)",
    "quality": "10,000 steps, as published",
    "custom": "your step count, on the fast schedule's fractions",
}
PRESETS = {
    # MVDream's schedule compressed into 2,000 steps: the annealing and the switch to 256 px keep their fractions
    "fast": SDSOptions(steps=2000),
    "quality": SDSOptions(steps=10000),
}


CPU_FIELD = {"field_resolution": 128, "field_channels": 16, "field_levels": 1}  # one plane: the CPU budget's field


def field_size(options: SDSOptions | dict) -> int:
    """Learnable plane values of a recipe's field: 3 C sum over levels of R_k^2."""
    get = options.get if isinstance(options, dict) else lambda name: getattr(options, name)
    resolution, levels = get("field_resolution"), get("field_levels")
    return 3 * get("field_channels") * sum((resolution >> (levels - 1 - k)) ** 2 for k in range(levels))


def for_device(options: SDSOptions, device: torch.device | str) -> SDSOptions:
    """The recipe as run on ``device`` (the device budget). On a CPU, where rendering and its backward pass take
    most of a 256 px step (bench/sds.py), the second phase renders at most 128 px (still resized to the encoder's
    256), rays take at most 32 + 16 samples, previews and meshes are at most 64 px and 128^3, and a field larger
    than one 128^2 x 16 triplane becomes that one (the multi-level field costs 1.8x per step there:
    bench/sds_field.py --capacity); the schedule, losses and cameras are unchanged. Budgets only lower values, so
    a recipe already smaller is kept."""
    if torch.device(device).type != "cpu":
        return options
    field = CPU_FIELD if field_size(options) > field_size(CPU_FIELD) else {}
    return replace(options, high_resolution=min(options.high_resolution, 128),
                   coarse_samples=min(options.coarse_samples, 32), fine_samples=min(options.fine_samples, 16),
                   preview_size=min(options.preview_size, 64), mesh_resolution=min(options.mesh_resolution, 128),
                   preview_every=1, **field)  # a CPU step takes minutes: show every one


def timestep_range(options: SDSOptions, step: int) -> tuple[float, float]:
    """(min, max) of t as fractions of the schedule at ``step``, annealed linearly, then held."""
    progress = min(step / max(options.anneal_fraction * options.steps, 1), 1.0)
    return tuple(start + (end - start) * progress for start, end in zip(options.t_start, options.t_end))


def resolution_at(options: SDSOptions, step: int) -> tuple[int, int]:
    """(render size, camera groups) at ``step``."""
    if step < options.high_resolution_from * options.steps:
        return options.low_resolution, options.low_resolution_groups
    return options.high_resolution, options.high_resolution_groups


class BackgroundNetwork(torch.nn.Module):
    """A colour for every view direction (a small MLP on the unit direction), learnt with the field."""

    def __init__(self, generator: torch.Generator, hidden: int = 32):
        super().__init__()
        self.hidden = torch.nn.Parameter(randn_tensor((3, hidden), generator) / 3 ** 0.5)
        self.hidden_bias = torch.nn.Parameter(torch.zeros(hidden))
        self.out = torch.nn.Parameter(randn_tensor((hidden, 3), generator) / hidden ** 0.5)
        self.out_bias = torch.nn.Parameter(torch.zeros(3))

    def forward(self, dirs: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(F.silu(dirs.float() @ self.hidden + self.hidden_bias) @ self.out + self.out_bias)


@dataclass
class SDSState:
    """What the optimisation has built so far."""

    field: NeuralTriplaneField
    background: BackgroundNetwork
    step: int = 0  # steps completed (skipped ones included: the schedule moves on)
    losses: list[float] = field(default_factory=list)  # of the steps that updated the field
    skipped: int = 0  # steps whose loss or gradient was not finite: no update
    skipped_in_a_row: int = 0
    render_generator: torch.Generator | None = None  # ray jitter, on the field's device (None: the step's generator)


def group_std(x: torch.Tensor, views: int) -> torch.Tensor:
    """The standard deviation of each group of ``views`` consecutive samples of x (B, ...), as (B, 1, ..., 1)."""
    std = x.reshape(x.shape[0] // views, -1).std(dim=1)  # (B / views,)
    return std.repeat_interleave(views).view(-1, *[1] * (x.dim() - 1))


def x0_reconstruction_loss(prior: MultiViewPrior, latents: torch.Tensor, t_fraction: tuple[float, float],
                           c2w: torch.Tensor, intrinsics: torch.Tensor, options: SDSOptions,
                           generator: torch.Generator) -> tuple[torch.Tensor, int]:
    """MVDream's SDS loss for latents (B, ...) of renders from cameras (B, 4, 4), (B, 4), and the t it drew."""
    steps = prior.alphas_cumprod.shape[0]
    low, high = int(t_fraction[0] * steps), int(t_fraction[1] * steps)
    high = min(high, steps - 1)  # (a range ending at 1.0 ends at the last timestep)
    t = randint(min(low, high), high + 1, generator)  # one t for the whole batch, in [low, high] as the reference
    noise = randn_tensor(latents.shape, generator, latents.device)
    abar = prior.alphas_cumprod[t].to(latents.device, torch.float32)
    with torch.no_grad():
        noisy = abar.sqrt() * latents + (1 - abar).sqrt() * noise
        eps_text, eps_plain = prior.predict_noise(noisy, torch.full((latents.shape[0],), t, device=latents.device),
                                                  c2w, intrinsics)
        eps = eps_plain + options.guidance_scale * (eps_text - eps_plain)
        x0 = (noisy - (1 - abar).sqrt() * eps) / abar.sqrt()  # (B, ...)
        if options.cfg_rescale > 0:  # match the spread of the text-only estimate, per group of views
            x0_text = (noisy - (1 - abar).sqrt() * eps_text) / abar.sqrt()
            ratio = group_std(x0_text, options.views) / group_std(x0, options.views).clamp(min=1e-8)
            x0 = options.cfg_rescale * x0 * ratio + (1 - options.cfg_rescale) * x0
    return 0.5 * (latents - x0).square().sum() / latents.shape[0], t


def render_batch(state: SDSState, options: SDSOptions, step: int, generator: torch.Generator) -> dict:
    """Renders (B, 3, S, S) of the field from fresh random camera groups, with their cameras."""
    size, groups = resolution_at(options, step)
    on_sphere = float(rand_tensor((), generator)) < options.sphere_elevation_probability
    cameras = sample_orbit_cameras(groups, options.views, generator, options.elevation_range_deg,
                                   options.fov_range_deg, options.distance_range, 360.0 / options.views,
                                   device=state.field.device, distance_per_fov=True, elevation_on_sphere=on_sphere)
    c2w, intrinsics = cameras.c2w.reshape(1, -1, 4, 4), cameras.intrinsics.reshape(1, -1, 4)  # one object, B views
    background = state.background if options.learn_background else (1.0, 1.0, 1.0)
    if float(rand_tensor((), generator)) < options.random_background_probability:
        background = rand_tensor((3,), generator, state.field.device)
    settings = RenderSettings(options.coarse_samples, options.fine_samples, options.chunk_rays, background)
    jitter = state.render_generator or generator
    rgb = render_views(state.field, c2w, intrinsics, size, size, settings, [jitter])["rgb"][0]  # (B, S, S, 3)
    return {"images": rgb.permute(0, 3, 1, 2), "c2w": c2w[0], "intrinsics": intrinsics[0]}


def new_state(options: SDSOptions, generator: torch.Generator, device: torch.device | str) -> SDSState:
    field_ = NeuralTriplaneField(generator, options.field_resolution, options.field_channels,
                                 levels=options.field_levels).to(device)
    # the millions of ray-jitter draws per step come from a generator on the device (seeded from ``generator``),
    # so a GPU does not wait for the CPU; cameras, t and noise stay on ``generator``
    return SDSState(field_, BackgroundNetwork(generator).to(device), render_generator=derived(generator, device))


def make_optimiser(state: SDSState, options: SDSOptions) -> torch.optim.Optimizer:
    groups = [{"params": state.field.grid_parameters(), "lr": options.grid_lr},
              {"params": state.field.decoder_parameters() + list(state.background.parameters()),
               "lr": options.network_lr}]
    return torch.optim.AdamW(groups, betas=options.betas, eps=options.eps, weight_decay=options.weight_decay)


PREVIEW_FOV_DEG = 40.0


def preview_views(state: SDSState, options: SDSOptions) -> torch.Tensor:
    """Four fixed views (azimuth 0, 90, 180, 270 deg, elevation 15 deg) on white: (1, 4, 3, S, S) in [0, 1]."""
    settings = RenderSettings(options.coarse_samples, options.fine_samples, options.chunk_rays)
    distance = 0.9 / math.tan(math.radians(PREVIEW_FOV_DEG / 2))
    rgb = render_orbit(state.field, (0.0, 90.0, 180.0, 270.0), 15.0, distance, PREVIEW_FOV_DEG, options.preview_size,
                       settings)  # (1, 4, S, S, 3)
    return rgb.permute(0, 1, 4, 2, 3)


def sds_step(prior: MultiViewPrior, state: SDSState, optimiser: torch.optim.Optimizer, options: SDSOptions,
             generator: torch.Generator, cancel: CancelToken = NEVER) -> dict:
    """One optimisation step. A step whose loss or gradient is not finite (a half-precision overflow in the prior)
    changes nothing but the step count and is counted in ``state.skipped``; its info says ``finite: False``.
    ``cancel`` is also checked between the stages of the step (a CPU step takes minutes)."""
    step = state.step
    batch = render_batch(state, options, step, generator)
    cancel.check()
    images = F.interpolate(batch["images"], size=(prior.encoder_size,) * 2, mode="bilinear", align_corners=False)
    latents = prior.encode(images, generator)
    cancel.check()
    t_range = timestep_range(options, step)
    loss, t = x0_reconstruction_loss(prior, latents, t_range, batch["c2w"], batch["intrinsics"], options, generator)
    cancel.check()
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    grads = [p.grad for group in optimiser.param_groups for p in group["params"] if p.grad is not None]
    finite = bool(torch.isfinite(loss)) and all(bool(torch.isfinite(g).all()) for g in grads)
    state.step += 1
    info = {"t": t, "t_range": t_range, "resolution": batch["images"].shape[-1], "finite": finite}
    if not finite:  # skip the update: the field, background and optimiser moments stay as they were
        optimiser.zero_grad(set_to_none=True)
        state.skipped, state.skipped_in_a_row = state.skipped + 1, state.skipped_in_a_row + 1
        return {**info, "loss": float("nan")}
    optimiser.step()
    state.skipped_in_a_row = 0
    state.losses.append(loss.item())
    return {**info, "loss": state.losses[-1]}


def remaining_seconds(options: SDSOptions, step: int, step_seconds: dict[int, list[float]], current: int) -> float:
    """Time left: the steps left in each resolution phase times that phase's mean step time so far (the current
    phase's while a phase has not started: a 256 px step costs more than a 64 px one, so the first half's
    estimate is a lower bound)."""
    mean = {size: sum(times) / len(times) for size, times in step_seconds.items()}
    switch = math.ceil(options.high_resolution_from * options.steps)  # the first step at high resolution
    low_left = max(0, switch - step)
    high_left = options.steps - step - low_left
    return (low_left * mean.get(options.low_resolution, mean[current])
            + high_left * mean.get(options.high_resolution, mean[current]))


@dataclass
class SDSControl:
    """Requests from outside a running optimisation, checked between steps: ``stop`` ends it and keeps what it
    has; ``export`` asks for a mesh of the current state (then clears itself); ``lease`` is the device it shares
    (each step waits while short jobs wait for it: a :class:`~recon3d.sharing.DeviceLease`, or a long run's
    :class:`~recon3d.sharing.Ticket` in its line; by default a lease of its own, never contended); ``started`` is
    set by the line once the run's turn has come."""

    stop: threading.Event = field(default_factory=threading.Event)
    export: threading.Event = field(default_factory=threading.Event)
    lease: DeviceLease | Ticket = field(default_factory=DeviceLease)
    started: threading.Event = field(default_factory=threading.Event)


def preview_due(options: SDSOptions, step: int, since_last: float) -> bool:
    """Whether a preview comes after ``step`` (steps done): after the first and the last step, and every
    ``preview_every`` steps unless one came less than ``preview_seconds`` ago."""
    if step in (1, options.steps):
        return True
    return step % options.preview_every == 0 and since_last >= options.preview_seconds


@dataclass
class SDSOutcome:
    """How a run ended: the state reached, why it ended ("done", "stop", or what went wrong) and how long it ran."""

    state: SDSState
    stopped: str
    elapsed: float


def optimise(prior: MultiViewPrior, options: SDSOptions, generator: torch.Generator, device: torch.device | str,
             control: SDSControl | None = None, cancel: CancelToken = NEVER,
             state: SDSState | None = None) -> Iterator[Event]:
    """Run SDS, yielding a :class:`StepReport` after every step, a :class:`Preview` of four views when
    :func:`preview_due`, an :class:`Exported` event with the :class:`SDSState`
    whenever ``control.export`` is set (for the caller to mesh), and last :class:`Finished` with an
    :class:`SDSOutcome`. ``cancel`` aborts (raising :class:`~recon3d.cancel.Cancelled`)."""
    control = control or SDSControl()
    state = state or new_state(options, generator, device)
    optimiser = make_optimiser(state, options)
    start, last_preview, stopped, paused = time.perf_counter(), -math.inf, "done", 0.0
    step_seconds: dict[int, list[float]] = {}  # render size -> seconds of each step so far (pauses excluded)
    while state.step < options.steps:
        cancel.check()
        if control.stop.is_set():
            stopped = "stop"
            break
        if control.export.is_set():
            control.export.clear()
            yield Exported(fraction=state.step / options.steps, message=f"exporting at step {state.step}",
                           result=state)
        with control.lease.step(cancel) as waited:  # other visitors' short jobs first
            paused += waited
            step_start = time.perf_counter()
            info = sds_step(prior, state, optimiser, options, generator, cancel)
            if state.skipped_in_a_row >= options.max_skipped_in_a_row:
                good = state.step - state.skipped_in_a_row
                stopped = (f"{state.skipped_in_a_row} steps in a row had a non-finite loss or gradient (the "
                           f"prior's weights or precision are broken); kept the state of step {good}")
                break
            finite = info.pop("finite")
            step_seconds.setdefault(info["resolution"], []).append(time.perf_counter() - step_start)
            elapsed = time.perf_counter() - start
            eta = remaining_seconds(options, state.step, step_seconds, info["resolution"])
            eta *= elapsed / max(elapsed - paused, 1e-9)  # pauses so far are expected to go on at the same rate
            fraction, preview = state.step / options.steps, None
            if preview_due(options, state.step, elapsed - last_preview):
                last_preview = elapsed  # (rendered before the step is reported: its time belongs to this step)
                preview = Preview(fraction=fraction, message=f"views at step {state.step}",
                                  views=preview_views(state, options), step=state.step, steps=options.steps)
        skipped = f"  (skipped: non-finite; {state.skipped} so far)" if not finite else ""
        shared = f"  (paused {paused:.1f} s for other jobs)" if paused >= 0.05 else ""
        yield StepReport(fraction=fraction, message=f"step {state.step}/{options.steps}  loss {info['loss']:.4g}  "
                                                    f"t {info['t']}  {info['resolution']} px  ETA {eta:.0f} s"
                                                    f"{skipped}{shared}",
                         step=state.step, steps=options.steps, elapsed=elapsed, eta=eta, skipped=state.skipped,
                         paused=paused, **info)
        if preview is not None:
            yield preview
    elapsed = time.perf_counter() - start
    yield Finished(fraction=1.0, message=f"stopped at step {state.step}/{options.steps} ({stopped})",
                   result=SDSOutcome(state, stopped, elapsed))
