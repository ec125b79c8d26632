"""Stochastic 3D samples on public weights: Zero123++ v1.2 imagines six views of the photo, one sample per seed,
and InstantMesh's NeRF reconstructor turns each sample's views into a triplane, a mesh and a GLB.

Steps: 1 prepare the image (background removed, recentred to 0.85 of the frame, on white for InstantMesh's UNet or
grey for the original), 2 Euler-ancestral sampling with classifier-free guidance over the tiled views, 3 decode,
reconstruct and mesh each seed.

**Reconstruction in the loop** (DMV3D's idea on this public pair, off by default): at each step listed in
``reconstruct_at``, the step's clean estimate x0 is decoded to six views, reconstructed by the InstantNeRF,
rendered from Zero123++'s six cameras, encoded, and put back as x0 (blended with ``reconstruct_weight``); the
sampler then continues from that 3D-consistent estimate.

Every random draw (the condition latents, the initial noise, each step's condition noise and the ancestral noise)
comes from the seed's own ``torch.Generator``, so a seed gives the same sample alone or among other seeds. The
ancestral noise is drawn by diffusers' scheduler from those generators (row k from generator k, as
:mod:`recon3d.noise` draws).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Iterator

import torch
import torch.nn.functional as F
from PIL import Image

from ..cameras import intrinsics_from_fov
from ..cancel import NEVER, CancelToken
from ..field import Field
from ..images import (FOREGROUND_RATIO, BackgroundRemover, ImageInput, PreparedImage, image_to_tensor, prepare_image,
                      views_grid)
from ..mesh import FLOATER_FRACTION, RESOLUTION, Mesh, MeshSettings, default_resolution, extract_mesh_or_fallback
from ..models.instant_nerf import (TINY_INSTANT_NERF_CONFIG, VIEW_SIZE, ZERO123PLUS_DISTANCE, ZERO123PLUS_FOV,
                                   InstantNeRF, instant_nerf_cameras, random_instant_nerf, zero123plus_poses)
from ..models.zero123plus import (TINY_VIEW_SIZE, ZERO123PLUS_REPO, Zero123PlusParts, load_zero123plus,
                                  random_zero123plus_parts, split_views, tile_views)
from ..noise import randn_tensor, seeded
from ..options import DENOISING_STEPS, Limit, Options, limited
from ..render import render_views
from .events import Event, Finished, Note, Preview, SampleReady, Stage, run_to_end
from .progress import StepClock, check_before_each
from .sample_3d import COMPARISON_SIZE, MAX_SEEDS, Sample, check_seeds, comparison_grid, seed_list

if TYPE_CHECKING:
    from .image_to_3d import ImageTo3DOptions

INSTANT_NERF_LARGE = "TencentARC/InstantMesh/instant_nerf_large.ckpt"
METHOD = "Zero123++ v1.2 -> InstantMesh NeRF"
GUIDANCE = Limit("guidance", 1.0, 20.0)
RECONSTRUCTION_STEP = Limit("a reconstruction step", 1, DENOISING_STEPS.high, whole=True)
WEIGHT = Limit("reconstruction weight", 0.0, 1.0)
CONDITION_SIZE = 512  # the input is prepared at the VAE processor's size (its CLIP view is resized to 224 from it)


@dataclass
class MultiViewOptions(Options):
    """One sampling job; ``resolved(device)`` checks every value and fills the device's defaults.

    ``steps`` 75 is InstantMesh's setting (the Zero123++ pipeline's default 28 is a faster choice); ``guidance``
    4 is the reference's. ``reconstruct_at``: 1-based steps after whose prediction the reconstruction replaces x0.
    """

    MAX_SEEDS: ClassVar[int] = MAX_SEEDS
    seeds: list[int] = field(default_factory=lambda: [0])
    steps: int = limited(75, DENOISING_STEPS)
    guidance: float = limited(4.0, GUIDANCE)
    reconstruct_at: tuple[int, ...] = ()
    reconstruct_weight: float = limited(1.0, WEIGHT)
    foreground_ratio: float = limited(0.85, FOREGROUND_RATIO)
    remove_background: bool = True
    mesh_resolution: int | None = limited(None, RESOLUTION)  # None: the device's default (128 on a CPU, 256 on a GPU)
    # a preview decodes every seed's 640 x 960 views (on an H100 a fraction of a second, on a CPU half a minute)
    preview_every: int | None = limited(None, Limit("preview interval", 1, 200, whole=True))  # None: 5 GPU, 10 CPU
    previews: bool = True  # False: none decoded (a job that shows none, e.g. Image to 3D)
    batch_size: int = limited(4, Limit("batch size", 1, 64, whole=True))  # any split gives the same samples

    def validate(self) -> "MultiViewOptions":
        self.seeds = check_seeds(list(self.seeds))
        super().validate()
        steps = sorted({RECONSTRUCTION_STEP.check(step) for step in self.reconstruct_at})
        if any(step > self.steps for step in steps):
            raise ValueError(f"reconstruction steps must be between 1 and the {self.steps} steps, got "
                             f"{max(steps)}")
        self.reconstruct_at = tuple(steps)
        return self

    def device_defaults(self, device: torch.device | str) -> dict:
        on_cpu = torch.device(device).type == "cpu"  # a CPU step takes half a minute and a preview's decode as long
        return {"mesh_resolution": default_resolution(device), "preview_every": 10 if on_cpu else 5}


@dataclass
class StepState:
    """What one denoising step produced, for previews and for tests of the loop."""

    step: int  # 1-based
    x0: torch.Tensor  # (B, 4, h, w) the clean estimate the scheduler stepped with (after any reconstruction)
    reconstructed: torch.Tensor | None = None  # (B, 4, h, w): the reconstruction's encoded renders at this step
    planes: torch.Tensor | None = None  # (B, 3, C, H, W): the reconstruction at this step


class MultiViewSample3D:
    """``MultiViewSample3D.from_pretrained().run(image, MultiViewOptions(seeds=[1, 7]))``: events with a
    :class:`~recon3d.pipelines.events.Preview` of the current x0 views every few steps, a :class:`SampleReady` for
    each finished seed (its six views, planes, mesh) and, last, :class:`Finished` with every :class:`Sample`."""

    def __init__(self, prior: Zero123PlusParts, reconstructor: InstantNeRF, reconstructor_source: str,
                 view_size: int = VIEW_SIZE, random_weights: bool = False, offline: bool = False):
        self.prior, self.reconstructor, self.reconstructor_source = prior, reconstructor, reconstructor_source
        self.view_size, self.random_weights = view_size, random_weights
        self.background_remover = BackgroundRemover(offline=offline)

    @classmethod
    def from_pretrained(cls, diffusion: str | Path = ZERO123PLUS_REPO, unet: str | Path | None = None,
                        reconstructor: str | Path | InstantNeRF | None = None,
                        reconstructor_config: str | Path | dict | None = None, revision: str | None = None,
                        offline: bool | None = None, device: torch.device | str | None = None,
                        dtype: torch.dtype | None = None, view_size: int = VIEW_SIZE) -> "MultiViewSample3D":
        """``diffusion``: Zero123++ (repo id or folder in its layout); ``unet``: a replacement UNet state dict
        (e.g. :data:`~recon3d.models.zero123plus.INSTANTMESH_UNET`; None keeps the folder's own);
        ``reconstructor``: an InstantMesh NeRF checkpoint (file or ``owner/repo/file``; None: the published large
        one) or an :class:`InstantNeRF`; ``reconstructor_config``: its yaml when the file name does not say."""
        device, dtype = torch.device(device or "cpu"), dtype or torch.float32
        prior = load_zero123plus(diffusion, unet, revision, offline).to(device, dtype)
        if isinstance(reconstructor, InstantNeRF):
            nerf, nerf_source = reconstructor.to(device=device, dtype=dtype), "given InstantNeRF"
        else:
            nerf_source = str(reconstructor or INSTANT_NERF_LARGE)
            nerf = InstantNeRF.from_pretrained(nerf_source, reconstructor_config, offline=offline, device=device,
                                               dtype=dtype)
        return cls(prior, nerf, nerf_source, view_size, offline=bool(offline))

    @classmethod
    def random(cls, seed: int = 0, device: torch.device | str | None = None,
               dtype: torch.dtype | None = None) -> "MultiViewSample3D":
        """Tiny random Zero123++ and InstantNeRF (tests, the --random-weights demo): 32 px views."""
        device, dtype = torch.device(device or "cpu"), dtype or torch.float32
        prior = random_zero123plus_parts(seed).to(device, dtype)
        nerf = random_instant_nerf(TINY_INSTANT_NERF_CONFIG, seed).to(device=device, dtype=dtype)
        return cls(prior, nerf, f"random weights (seed {seed})", TINY_VIEW_SIZE, random_weights=True, offline=True)

    @property
    def device(self) -> torch.device:
        return self.prior.device

    @property
    def dtype(self) -> torch.dtype:
        return self.prior.dtype

    # ---- the reference's two building blocks, for side-by-side comparison

    def prompt_embeds(self, image: Image.Image) -> torch.Tensor:
        """PIL RGB -> (1, 77, D): empty-prompt embeddings + ramping coefficients x CLIP image embeddings."""
        return self.prior.prompt_embeds(image)

    def predict_v(self, sample: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor,
                  cond: torch.Tensor) -> torch.Tensor:
        """One unguided branch: the UNet's v for ``sample`` at ``t`` after the reference pass on ``cond``."""
        return self.prior.predict_v(sample, t, embeds, cond)

    # ---- the job

    def __call__(self, image: ImageInput, **options) -> list[Sample]:
        return run_to_end(self.run(image, MultiViewOptions(**options)))

    @torch.no_grad()
    def run(self, image: ImageInput, options: MultiViewOptions | None = None,
            cancel: CancelToken = NEVER) -> Iterator[Event]:
        options = (options or MultiViewOptions()).resolved(self.device)
        yield Stage(name="preprocess", fraction=0.0, message="Preparing the image")
        prepared = self.prepare(image, options)
        for note in prepared.notes:
            yield Note(fraction=0.0, message=note)
        yield from self.sample_prepared(prepared, options, cancel)

    def prepare(self, image: ImageInput, options: MultiViewOptions) -> PreparedImage:
        """The input as Zero123++ reads it: background removed (when asked and needed), recentred, at the VAE
        processor's 512 px (so its latent is not made from an upscaled image)."""
        remover = self.background_remover if options.remove_background else None
        return prepare_image(image, CONDITION_SIZE, options.foreground_ratio, remover)

    @torch.no_grad()
    def sample_prepared(self, prepared: PreparedImage, options: MultiViewOptions,
                        cancel: CancelToken = NEVER) -> Iterator[Event]:
        """The job after :meth:`prepare`: previews, a :class:`SampleReady` per seed, :class:`Finished`."""
        options = options.resolved(self.device)
        condition = on_background(prepared, self.prior.background)
        batches = [options.seeds[i:i + options.batch_size] for i in range(0, len(options.seeds), options.batch_size)]
        total, done, samples = len(options.seeds), 0, []
        for batch in batches:
            cancel.check()
            latents, clock = None, StepClock(options.steps)
            for state, latents in self.denoise(condition, batch, options, cancel):
                left = clock.tick()
                if not options.previews or (state.step % options.preview_every and state.step != options.steps):
                    continue
                views = split_views(self.prior.decode(state.x0))  # (B, 6, 3, s, s)
                fraction = (done + 0.8 * len(batch) * state.step / options.steps) / total
                message = (f"Step {state.step}/{options.steps} (seeds {seed_list(batch)}), "
                           f"{StepClock.text(left)} of denoising")
                yield Preview(fraction=fraction, message=message, views=views.cpu(), step=state.step,
                              steps=options.steps)
            yield Stage(name="reconstruct", fraction=(done + 0.8 * len(batch)) / total,
                        message=f"Reconstructing seeds {seed_list(batch)}")
            views = split_views(self.prior.decode(latents))  # (B, 6, 3, s, s) in [0, 1]
            planes = self.reconstruct(views, cancel)
            for index, seed in enumerate(batch):
                cancel.check()
                yield Stage(name="mesh", fraction=(done + 0.8 * len(batch) + 0.2 * index) / total,
                            message=f"Meshing seed {seed} at {options.mesh_resolution}^3")
                mesh, stats, note = self._mesh(planes[index:index + 1], options, cancel)
                notes = list(prepared.notes) + ([note] if note else [])
                metadata = self.metadata(seed, options) | ({"notes": notes} if notes else {})
                sample = Sample(seed, planes[index:index + 1].float().cpu(), views[index].cpu(), mesh, metadata, stats)
                samples.append(sample)
                yield SampleReady(fraction=(done + 0.8 * len(batch) + 0.2 * (index + 1)) / total,
                                  message=f"Seed {seed} done", sample=sample)
            done += len(batch)
        yield Finished(fraction=1.0, message=f"{len(samples)} samples", result=samples)

    @torch.no_grad()
    def denoise(self, condition: Image.Image, seeds: list[int], options: MultiViewOptions,
                cancel: CancelToken = NEVER) -> Iterator[tuple[StepState, torch.Tensor]]:
        """Guided Euler-ancestral sampling for one batch of seeds, conditioned on ``condition`` (PIL RGB on the
        UNet's background). Yields (the step's state, the latents after the step (B, 4, 3s/8, 2s/8))."""
        prior, device, b = self.prior, self.device, len(seeds)
        generators = [seeded(seed) for seed in seeds]
        positive, negative = prior.condition_latents(condition, generators)  # (B, 4, hc, wc) each
        cond = torch.cat([negative, positive])  # (2B, ...): negative branch first, as the reference
        embeds = torch.cat([prior.empty_prompt_embeds().expand(b, -1, -1),
                            prior.prompt_embeds(condition).expand(b, -1, -1)])  # (2B, 77, D): negative first
        scheduler = prior.scheduler()
        scheduler.set_timesteps(options.steps, device=device)
        size = self.view_size // 8
        latents = randn_tensor((b, 4, 3 * size, 2 * size), generators, device) * scheduler.init_noise_sigma
        for index, t in enumerate(scheduler.timesteps):
            cancel.check()
            model_input = scheduler.scale_model_input(torch.cat([latents, latents]), t)
            sigma = scheduler.sigmas[scheduler.step_index].to(device)
            noise = randn_tensor((b, 2, *cond.shape[1:]), generators, device)  # each seed: negative, positive
            noisy_cond = (cond + sigma * torch.cat([noise[:, 0], noise[:, 1]])) / (sigma ** 2 + 1) ** 0.5
            with check_before_each(prior.unet.down_blocks, cancel):
                v = self.predict_v(model_input, t.expand(2 * b).to(device), embeds, noisy_cond).float()
            v_negative, v_positive = v.chunk(2)
            v = v_negative + options.guidance * (v_positive - v_negative)
            x0 = v * (-sigma / (sigma ** 2 + 1) ** 0.5) + latents / (sigma ** 2 + 1)  # the v-prediction's clean latent
            state = StepState(index + 1, x0)
            if index + 1 in options.reconstruct_at:
                state = self._reconstruct_into(state, options.reconstruct_weight, cancel)
                v = (state.x0 - latents / (sigma ** 2 + 1)) / (-sigma / (sigma ** 2 + 1) ** 0.5)
            latents = scheduler.step(v, t, latents, generator=generators).prev_sample
            yield state, latents

    def _reconstruct_into(self, state: StepState, weight: float, cancel: CancelToken) -> StepState:
        """x0 -> six views -> InstantNeRF -> renders from the same cameras -> latents, blended into x0."""
        views = split_views(self.prior.decode(state.x0))
        planes = self.reconstruct(views, cancel)
        renders = self.render(planes, cancel)  # (B, 6, 3, s, s)
        reconstructed = self.prior.encode(tile_views(renders))
        x0 = weight * reconstructed + (1 - weight) * state.x0
        return StepState(state.step, x0, reconstructed, planes)

    def reconstruct(self, views: torch.Tensor, cancel: CancelToken = NEVER) -> torch.Tensor:
        """Six views (B, 6, 3, s, s) in [0, 1] -> planes (B, 3, C, H, W), read at Zero123++'s cameras."""
        nerf = self.reconstructor
        if views.shape[-1] != self.view_size:
            views = F.interpolate(views.flatten(0, 1), size=self.view_size, mode="bicubic", antialias=True)
            views = views.unflatten(0, (-1, 6))
        cameras = instant_nerf_cameras(zero123plus_poses(self.device)).expand(views.shape[0], 6, 16)
        layers = [*nerf.encoder.model.encoder.layer, *nerf.transformer.layers]
        with check_before_each(layers, cancel):
            return nerf.forward_planes(views.clamp(0, 1).to(self.dtype), cameras.to(self.dtype))

    def render(self, planes: torch.Tensor, cancel: CancelToken = NEVER) -> torch.Tensor:
        """Planes (B, ...) rendered from Zero123++'s six cameras on the UNet's background (white for InstantMesh's,
        grey for the original: what the sampler's views show): (B, 6, 3, s, s) in [0, 1]."""
        grey = self.prior.background
        settings = replace(self.reconstructor.config.render_settings(), background=(grey, grey, grey))
        poses = zero123plus_poses(self.device).expand(planes.shape[0], 6, 4, 4)
        cancel.check()
        rgb = render_views(self.reconstructor.field(planes), poses, intrinsics_from_fov(ZERO123PLUS_FOV, self.device),
                           self.view_size, self.view_size, settings)["rgb"]  # (B, 6, s, s, 3)
        return rgb.permute(0, 1, 4, 2, 3).clamp(0, 1)

    def _mesh(self, planes: torch.Tensor, options: MultiViewOptions,
              cancel: CancelToken) -> tuple[Mesh, dict, str | None]:
        """The mesh at InstantMesh's level 10 (an automatic one for random weights, or when a sample has no
        surface there), its numbers, and a note when the level had to change."""
        level = None if self.random_weights else self.reconstructor.iso_level
        settings = MeshSettings(resolution=options.mesh_resolution, level=level,
                                min_part_fraction=1.0 if self.random_weights else FLOATER_FRACTION)
        mesh, grid, note = extract_mesh_or_fallback(self.reconstructor.field(planes), settings, cancel=cancel)
        stats = {"vertices": len(mesh.vertices), "faces": len(mesh.faces), "field_queries": grid.queries,
                 "dense_queries": options.mesh_resolution ** 3}
        return mesh, stats, note

    @staticmethod
    def views_image(sample: Sample) -> Image.Image:
        """A sample's six views as Zero123++ tiles them: 3 rows x 2 columns."""
        return views_grid(tile_views(sample.views[None])[:, None])

    def field_from(self, planes: torch.Tensor) -> Field:
        """The field of a sample's planes (1, 3, C, H, W), e.g. kept on the CPU (exports: a new face budget, a
        baked texture)."""
        return self.reconstructor.field(planes.to(self.device, self.dtype))

    def comparison(self, samples: list[Sample], size: int = COMPARISON_SIZE,
                   cancel: CancelToken = NEVER) -> Image.Image:
        """The samples side by side from the same four angles, seen as Zero123++'s cameras see them."""
        planes = torch.cat([s.planes for s in samples]).to(self.device, self.dtype)
        return comparison_grid(self.reconstructor.field(planes), ZERO123PLUS_DISTANCE, ZERO123PLUS_FOV,
                               self.reconstructor.config.render_settings(), [s.seed for s in samples], size,
                               cancel=cancel)

    def metadata(self, seed: int, options: MultiViewOptions) -> dict:
        """Everything that decides the sample, so the same settings make it again."""
        from .. import __version__

        return {"method": METHOD, "checkpoint": self.prior.source, "unet": self.prior.unet_source,
                "reconstructor": self.reconstructor_source, "seed": seed, "steps": options.steps,
                "guidance": options.guidance, "reconstruct_at": list(options.reconstruct_at),
                "reconstruct_weight": options.reconstruct_weight, "foreground_ratio": options.foreground_ratio,
                "remove_background": options.remove_background, "mesh_resolution": options.mesh_resolution,
                "dtype": str(self.dtype).removeprefix("torch."), "recon3d_version": __version__,
                "random_weights": self.random_weights}


def on_background(prepared: PreparedImage, grey: float) -> Image.Image:
    """The prepared image (object on white) with ``grey`` behind the object instead."""
    if grey == 1.0:
        return prepared.image
    rgb = image_to_tensor(prepared.image)[0]  # (3, H, W) = object * a + (1 - a)
    alpha = image_to_tensor(prepared.mask.convert("RGB"))[0, :1]
    out = rgb - (1 - alpha) * (1 - grey)
    return Image.fromarray((out.permute(1, 2, 0).clamp(0, 1) * 255 + 0.5).byte().numpy(), "RGB")


class ViewsImageTo3D:
    """Image to 3D through Zero123++'s views: one seed (InstantMesh's 42) of a :class:`MultiViewSample3D`, run as
    an Image to 3D job (``run(image, ImageTo3DOptions)`` -> events, :class:`Finished` with an
    :class:`~recon3d.pipelines.image_to_3d.ImageTo3DResult`). The foreground ratio, background removal and mesh
    resolution apply; the LRM's camera distance, density threshold and floater fraction do not (the sampler
    meshes at InstantMesh's level 10 and drops parts under its own fraction). No previews are decoded: the job
    shows none."""

    SEED = 42

    def __init__(self, sampler: MultiViewSample3D, steps: int = MultiViewOptions.steps):
        self.sampler, self.steps = sampler, steps

    @property
    def random_weights(self) -> bool:
        return self.sampler.random_weights

    @property
    def device(self) -> torch.device:
        return self.sampler.device

    def field_from(self, planes: torch.Tensor) -> Field:
        """The field of a result's planes (exports: a new face budget, a baked texture)."""
        return self.sampler.field_from(planes)

    @torch.no_grad()
    def run(self, image: ImageInput, options: ImageTo3DOptions | None = None,
            cancel: CancelToken = NEVER) -> Iterator[Event]:
        import time

        from .image_to_3d import ImageTo3DOptions, ImageTo3DResult

        options = (options or ImageTo3DOptions()).resolved(self.device)
        views = MultiViewOptions(seeds=[self.SEED], steps=self.steps, foreground_ratio=options.foreground_ratio,
                                 remove_background=options.remove_background, previews=False,
                                 mesh_resolution=options.mesh_resolution).resolved(self.device)
        timings, start = {}, time.perf_counter()
        yield Stage(name="preprocess", fraction=0.0, message="Preparing the image")
        prepared = self.sampler.prepare(image, views)
        timings["preprocess"] = time.perf_counter() - start
        sample, start = None, time.perf_counter()
        for event in self.sampler.sample_prepared(prepared, views, cancel):
            if isinstance(event, SampleReady):
                sample = event.sample
                timings["views, reconstruction and mesh"] = time.perf_counter() - start
            elif not isinstance(event, Finished):
                yield event
        field_ = self.field_from(sample.planes)
        metadata = sample.metadata | {"method": f"{METHOD} (Image to 3D, one seed)"}
        settings = self.sampler.reconstructor.config.render_settings()
        result = ImageTo3DResult(prepared, sample.planes, sample.mesh, field_, timings, sample.stats,
                                 list(sample.metadata.get("notes", [])), settings, VIEW_SIZE, metadata)
        yield Finished(fraction=1.0, message=f"{len(sample.mesh.faces):,} triangles", result=result)


__all__ = ["INSTANT_NERF_LARGE", "MultiViewOptions", "MultiViewSample3D", "StepState", "ViewsImageTo3D"]
