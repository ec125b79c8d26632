"""Stochastic 3D samples with DMV3D: one image in, several plausible 3D objects out, one per seed.

Steps: 1 prepare the image (as Image to 3D), 2 x0-parameterised DDIM over the views, where every step's x0 is a
rendered 3D model and the conditioning view stays clean, 3 mesh each sample's last-step planes.
Each seed has its own ``torch.Generator`` for its initial noise; DDIM runs with eta = 0 and the renderer samples
at bin midpoints, so nothing else is random: a seed gives the same object alone or inside a batch of seeds.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Iterator

import torch
from PIL import Image

from ..cancel import NEVER, CancelToken
from ..images import (FOREGROUND_RATIO, BackgroundRemover, ImageInput, image_to_tensor, labelled_grid, prepare_image,
                      views_grid)
from ..mesh import FLOATER_FRACTION, RESOLUTION, Mesh, MeshSettings, default_resolution, extract_mesh_or_fallback
from ..models.dmv3d import DMV3D, DMV3DConfig, canonical_views, new_dmv3d
from ..noise import SEED, randn_tensor, seeded
from ..options import DENOISING_STEPS, Limit, Options, limited
from ..field import Field
from ..render import RenderSettings, render_orbit
from .events import Event, Finished, Note, Preview, SampleReady, Stage, run_to_end
from .progress import StepClock, check_before_each

MAX_SEEDS = 8  # samples of one job, and of one comparison
COUNT = Limit("the number of samples", 1, MAX_SEEDS, whole=True)
DEFAULT_COUNT = 4  # new random seeds when none are listed
COMPARISON_ANGLES = (0.0, 90.0, 180.0, 270.0)
COMPARISON_SIZE = 160  # pixels per object and angle in the comparison image


def parse_seeds(text: str) -> list[int]:
    """"1, 7, 42" -> [1, 7, 42]; refuses anything else with a message for people."""
    parts = [part.strip() for part in str(text).replace(";", ",").split(",") if part.strip()]
    if not parts:
        raise ValueError("give at least one seed, e.g. 1, 7, 42")
    seeds = []
    for part in parts:
        try:
            seed = int(part)
        except ValueError:
            raise ValueError(f"seeds must be whole numbers separated by commas; {part!r} is not one") from None
        if not SEED.low <= seed <= SEED.high:
            raise ValueError(f"seed {seed} is out of range ({SEED.text})")
        seeds.append(seed)
    return check_seeds(seeds)


def check_seeds(seeds: list[int]) -> list[int]:
    if not seeds:
        raise ValueError("give at least one seed")
    if len(seeds) > MAX_SEEDS:
        raise ValueError(f"at most {MAX_SEEDS} samples at once, got {len(seeds)}")
    if len(set(seeds)) != len(seeds):
        raise ValueError("each seed may appear once (the same seed gives the same sample)")
    return [SEED.check(seed) for seed in seeds]


def new_seeds(count: int, taken: set[int]) -> list[int]:
    """``count`` fresh random seeds, none of them in ``taken`` (shown with their samples, so each repeats)."""
    seeds: list[int] = []
    while len(seeds) < count:
        seed = secrets.randbelow(int(SEED.high) + 1)
        if seed not in taken and seed not in seeds:
            seeds.append(seed)
    return seeds


def seeds_to_add(count: object, seeds_text: str | None, shown: list[int], adding: bool) -> list[int]:
    """The seeds of a request: the listed ones if ``seeds_text`` lists any, else ``count`` new random ones.
    ``adding`` (More samples): listed seeds already in ``shown`` are skipped, and once every listed seed is shown,
    new random ones are drawn; at most :data:`MAX_SEEDS` samples are compared at once."""
    seeds: list[int] = []
    if str(seeds_text or "").strip():
        seeds = [seed for seed in parse_seeds(str(seeds_text)) if seed not in shown]
    if not seeds and (adding or not str(seeds_text or "").strip()):
        seeds = new_seeds(COUNT.check(count), set(shown))
    if len(shown) + len(seeds) > MAX_SEEDS:
        raise ValueError(f"at most {MAX_SEEDS} samples are shown at once ({len(shown)} shown): press Generate to "
                         f"start over")
    return seeds


@dataclass
class SampleOptions(Options):
    """One sampling job; ``resolved(device)`` checks every value and fills the device's defaults."""

    MAX_SEEDS: ClassVar[int] = MAX_SEEDS
    seeds: list[int] = field(default_factory=lambda: [0])
    steps: int = limited(30, DENOISING_STEPS)
    foreground_ratio: float = limited(0.8, FOREGROUND_RATIO)
    remove_background: bool = True
    mesh_resolution: int | None = limited(None, RESOLUTION)  # None: the device's default (128 on a CPU, 256 on a GPU)
    batch_size: int = limited(4, Limit("batch size", 1, 64, whole=True))  # any split gives the same samples

    def validate(self) -> "SampleOptions":
        self.seeds = check_seeds(list(self.seeds))
        return super().validate()

    def device_defaults(self, device: torch.device | str) -> dict:
        return {"mesh_resolution": default_resolution(device)}


@dataclass
class Sample:
    """One finished sample: its seed, last-step planes, x0 views and mesh."""

    seed: int
    planes: torch.Tensor  # (1, 3, C, H, W)
    views: torch.Tensor  # (V, 3, H, W) in [0, 1]: the last step's x0
    mesh: Mesh
    metadata: dict  # how it was made (method, checkpoint, seed, steps, version): goes into the GLB
    stats: dict = field(default_factory=dict)  # the mesh's numbers (faces, vertices, field queries), when kept

    def save_glb(self, path: str | Path) -> Path:
        return self.mesh.save_glb(path, extras=self.metadata)


class Sample3D:
    """``Sample3D.from_pretrained(folder_or_repo).run(image, SampleOptions(seeds=[1, 7]))``: events with a
    :class:`~recon3d.pipelines.events.Preview` of every step's x0 views, a :class:`SampleReady` for each finished
    seed and, last, :class:`Finished` with every :class:`Sample`."""

    def __init__(self, model: DMV3D, source: str, random_weights: bool = False, offline: bool = False):
        self.model, self.source, self.random_weights = model, source, random_weights
        self.background_remover = BackgroundRemover(offline=offline)  # offline: the network, not the checkpoint

    @classmethod
    def from_pretrained(cls, repo_or_folder: str | Path, device=None, dtype=None, revision: str | None = None,
                        offline: bool | None = None, name: str | None = None) -> "Sample3D":
        """``name``: how GLBs record the checkpoint (default: the repo id or folder as given, with @revision)."""
        model = DMV3D.from_pretrained(repo_or_folder, revision=revision, offline=offline, device=device, dtype=dtype)
        source = name or str(repo_or_folder) + (f"@{revision}" if revision else "")
        return cls(model, source, offline=bool(offline))

    @classmethod
    def random(cls, config: DMV3DConfig, seed: int = 0, device=None, dtype=None) -> "Sample3D":
        model = new_dmv3d(config, seed).to(device=device or "cpu", dtype=dtype or torch.float32).eval()
        return cls(model, "random weights", random_weights=True, offline=True)

    @property
    def device(self) -> torch.device:
        return self.model.plane_tokens.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.plane_tokens.dtype

    def __call__(self, image: ImageInput, **options) -> list[Sample]:
        return run_to_end(self.run(image, SampleOptions(**options)))

    @torch.no_grad()
    def run(self, image: ImageInput, options: SampleOptions | None = None,
            cancel: CancelToken = NEVER) -> Iterator[Event]:
        options = (options or SampleOptions()).resolved(self.device)
        cfg = self.model.config
        yield Stage(name="preprocess", fraction=0.0, message="Preparing the image")
        remover = self.background_remover if options.remove_background else None
        prepared = prepare_image(image, cfg.image_size, options.foreground_ratio, remover)
        for note in prepared.notes:
            yield Note(fraction=0.0, message=note)
        condition = image_to_tensor(prepared.image)[0].to(self.device, torch.float32) * 2 - 1  # (3, H, W)
        batches = [options.seeds[i:i + options.batch_size] for i in range(0, len(options.seeds), options.batch_size)]
        total, done, samples = len(options.seeds), 0, []
        for batch in batches:
            cancel.check()
            planes, views, clock = None, None, StepClock(options.steps)
            for step, planes, views in self.denoise(condition, batch, options.steps, cancel):
                fraction = (done + 0.8 * len(batch) * (step + 1) / options.steps) / total
                message = (f"Step {step + 1}/{options.steps} (seeds {seed_list(batch)}), "
                           f"{StepClock.text(clock.tick())} of denoising")
                yield Preview(fraction=fraction, message=message, views=((views + 1) / 2).clamp(0, 1).cpu(),
                              step=step + 1, steps=options.steps)
            for index, seed in enumerate(batch):
                cancel.check()
                yield Stage(name="mesh", fraction=(done + 0.8 * len(batch) + 0.2 * index) / total,
                            message=f"Meshing seed {seed} at {options.mesh_resolution}^3")
                mesh, note = self._mesh(planes[index:index + 1], options, cancel)
                notes = list(prepared.notes) + ([note] if note else [])
                metadata = self.metadata(seed, options) | ({"notes": notes} if notes else {})
                sample = Sample(seed, planes[index:index + 1].float().cpu(), ((views[index] + 1) / 2).clamp(0, 1).cpu(),
                                mesh, metadata)
                fraction = (done + 0.8 * len(batch) + 0.2 * (index + 1)) / total  # never backwards
                samples.append(sample)
                yield SampleReady(fraction=fraction, message=f"Seed {seed} done", sample=sample)
            done += len(batch)
        yield Finished(fraction=1.0, message=f"{len(samples)} samples", result=samples)

    @torch.no_grad()
    def denoise(self, condition: torch.Tensor, seeds: list[int], steps: int,
                cancel: CancelToken = NEVER) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """x0-parameterised DDIM for one batch of seeds, conditioned on a clean view (3, H, W) in [-1, 1].
        Yields (step, planes (B, 3, C, h, w), x0 views (B, V, 3, H, W) in [-1, 1]) after every step."""
        cfg, device = self.model.config, self.device
        scheduler = cfg.noise_scheduler()
        scheduler.set_timesteps(steps, device=device)
        c2w, intrinsics = canonical_views(cfg.views, cfg.camera_distance, cfg.fov_deg, device)
        b = len(seeds)
        c2w, intrinsics = c2w.expand(b, -1, -1, -1), intrinsics.expand(b, -1, -1)  # (B, V, 4, 4), (B, V, 4)
        shape = (cfg.views - 1, 3, cfg.image_size, cfg.image_size)
        # (B, V-1, 3, H, W): one CPU generator per seed, so a seed is the same alone, in a batch, on any device
        noisy = randn_tensor((b, *shape), [seeded(seed) for seed in seeds], device)
        clean = condition[None, None].expand(b, 1, -1, -1, -1)
        layers = [*self.model.encoder, *self.model.transformer.layers]
        for step, t in enumerate(scheduler.timesteps):
            cancel.check()
            views = torch.cat([clean, noisy], 1)  # (B, V, 3, H, W): view 0 stays clean
            with check_before_each(layers, cancel):
                planes = self.model(views.to(self.dtype), c2w, intrinsics, t.expand(b).to(device))
            x0 = self.model.render(planes, c2w, intrinsics)  # (B, V, 3, H, W) float32
            x0 = torch.cat([clean, x0[:, 1:]], 1)
            noisy = scheduler.step(x0[:, 1:], t, noisy, eta=0.0).prev_sample
            yield step, planes, x0

    def _mesh(self, planes: torch.Tensor, options: SampleOptions, cancel: CancelToken) -> tuple[Mesh, str | None]:
        """The sample's mesh at the model's iso-level (an automatic one for random weights, or when a sample has
        no surface there), and a note when the level had to change."""
        level = None if self.random_weights else self.model.iso_level
        settings = MeshSettings(resolution=options.mesh_resolution, level=level,
                                min_part_fraction=1.0 if self.random_weights else FLOATER_FRACTION)
        mesh, _, note = extract_mesh_or_fallback(self.model.field(planes), settings, cancel=cancel)
        return mesh, note

    def field_from(self, planes: torch.Tensor) -> Field:
        """The field of a sample's planes (1, 3, C, H, W), e.g. kept on the CPU (exports: a new face budget, a
        baked texture)."""
        return self.model.field(planes.to(self.device, self.dtype))

    def comparison(self, samples: list[Sample], size: int = COMPARISON_SIZE,
                   cancel: CancelToken = NEVER) -> Image.Image:
        """The samples side by side from the same four angles (:func:`comparison_grid`)."""
        cfg = self.model.config
        planes = torch.cat([s.planes for s in samples]).to(self.device, self.dtype)
        return comparison_grid(self.model.field(planes), cfg.camera_distance, cfg.fov_deg, cfg.render_settings(),
                               [s.seed for s in samples], size, cancel=cancel)

    def metadata(self, seed: int, options: SampleOptions) -> dict:
        """Everything that decides the sample, so the same settings make it again."""
        from .. import __version__

        return {"method": "DMV3D", "checkpoint": self.source, "seed": seed, "steps": options.steps,
                "foreground_ratio": options.foreground_ratio, "remove_background": options.remove_background,
                "mesh_resolution": options.mesh_resolution, "dtype": str(self.dtype).removeprefix("torch."),
                "recon3d_version": __version__, "random_weights": self.random_weights}


def seed_list(seeds: list[int]) -> str:
    """"1, 7, 42": seeds for a message."""
    return ", ".join(str(s) for s in seeds)


def comparison_grid(field: Field, distance: float, fov_deg: float, settings: RenderSettings, seeds: list[int],
                    size: int = COMPARISON_SIZE, elevation_deg: float = 20.0, angles_deg=COMPARISON_ANGLES,
                    cancel: CancelToken = NEVER) -> Image.Image:
    """Every object of ``field`` (one per sample) rendered from the same angles: one row per sample, labelled with
    its seed, one column per angle, labelled (0 deg: the photo's side), on white, so samples compare at a glance."""
    rgb = render_orbit(field, angles_deg, elevation_deg, distance, fov_deg, size, settings, cancel)  # (N, A, S, S, 3)
    return labelled_grid(views_grid(rgb.permute(0, 1, 4, 2, 3)), [f"seed {seed}" for seed in seeds],
                         [f"{angle:g}\u00b0" + (" (front)" if angle == 0 else "") for angle in angles_deg])


__all__ = ["MAX_SEEDS", "Sample", "Sample3D", "SampleOptions", "comparison_grid", "parse_seeds", "seeds_to_add"]
