"""Stochastic 3D samples with DMV3D: one image in, several plausible 3D objects out, one per seed.

Steps: 1 prepare the image (as Image to 3D), 2 x0-parameterised DDIM over the views, where every step's x0 is a
rendered 3D model and the conditioning view stays clean, 3 mesh each sample's last-step planes.
Each seed has its own ``torch.Generator`` for its initial noise; DDIM runs with eta = 0 and the renderer samples
at bin midpoints, so nothing else is random: a seed gives the same object alone or inside a batch of seeds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from PIL import Image

from ..cancel import NEVER, CancelToken
from ..images import BackgroundRemover, ImageInput, check_foreground_ratio, image_to_tensor, prepare_image
from ..mesh import EmptyMeshError, Mesh, MeshSettings, check_resolution, extract_mesh
from ..models.dmv3d import DMV3D, DMV3DConfig, canonical_views, new_dmv3d
from .progress import Progress, check_before_each, run_to_end

MAX_SEEDS = 8
MAX_STEPS = 200
SEED_LIMIT = 2 ** 63 - 1


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
        if not 0 <= seed <= SEED_LIMIT:
            raise ValueError(f"seed {seed} is out of range (0..{SEED_LIMIT})")
        seeds.append(seed)
    return check_seeds(seeds)


def check_seeds(seeds: list[int]) -> list[int]:
    if not seeds:
        raise ValueError("give at least one seed")
    if len(seeds) > MAX_SEEDS:
        raise ValueError(f"at most {MAX_SEEDS} samples at once, got {len(seeds)}")
    if len(set(seeds)) != len(seeds):
        raise ValueError("each seed may appear once (the same seed gives the same sample)")
    return list(seeds)


@dataclass
class SampleOptions:
    seeds: list[int] = field(default_factory=lambda: [0])
    steps: int = 30
    foreground_ratio: float = 0.8
    remove_background: bool = True
    mesh_resolution: int = 128
    batch_size: int = 4  # seeds denoised together; any split gives the same samples

    def validate(self) -> "SampleOptions":
        check_seeds(self.seeds)
        if not 1 <= self.steps <= MAX_STEPS:
            raise ValueError(f"steps must be between 1 and {MAX_STEPS}, got {self.steps}")
        check_foreground_ratio(self.foreground_ratio)
        check_resolution(self.mesh_resolution)
        if self.batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {self.batch_size}")
        return self


@dataclass
class Sample:
    """One finished sample: its seed, last-step planes, x0 views and mesh."""

    seed: int
    planes: torch.Tensor  # (1, 3, C, H, W)
    views: torch.Tensor  # (V, 3, H, W) in [0, 1]: the last step's x0
    mesh: Mesh
    metadata: dict  # how it was made (method, checkpoint, seed, steps, version): goes into the GLB

    def save_glb(self, path: str | Path) -> Path:
        return self.mesh.save_glb(path, extras=self.metadata)


@dataclass
class StepPreview:
    """The x0 views of every sample in the batch at one step: (B, V, 3, H, W) in [0, 1]."""

    seeds: list[int]
    step: int
    steps: int
    views: torch.Tensor


class Sample3D:
    """``Sample3D.from_pretrained(folder_or_repo).run(image, SampleOptions(seeds=[1, 7]))``: progress events
    carrying a :class:`StepPreview` each step and a :class:`Sample` for each finished seed."""

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
        return [e.result for e in self.run(image, SampleOptions(**options)) if isinstance(e.result, Sample)]

    @torch.no_grad()
    def run(self, image: ImageInput, options: SampleOptions | None = None,
            cancel: CancelToken = NEVER) -> Iterator[Progress]:
        options = (options or SampleOptions()).validate()
        cfg = self.model.config
        yield Progress("preprocess", 0.0, "Preparing the image")
        remover = self.background_remover if options.remove_background else None
        prepared = prepare_image(image, cfg.image_size, options.foreground_ratio, remover)
        for note in prepared.notes:
            yield Progress("preprocess", 0.0, note)
        condition = image_to_tensor(prepared.image)[0].to(self.device, torch.float32) * 2 - 1  # (3, H, W)
        batches = [options.seeds[i:i + options.batch_size] for i in range(0, len(options.seeds), options.batch_size)]
        total, done = len(options.seeds), 0
        for batch in batches:
            cancel.check()
            planes, views = None, None
            for step, planes, views in self.denoise(condition, batch, options.steps, cancel):
                fraction = (done + 0.8 * len(batch) * (step + 1) / options.steps) / total
                yield Progress("denoise", fraction, f"Step {step + 1}/{options.steps} (seeds {_seed_list(batch)})",
                               preview=StepPreview(batch, step, options.steps, (views + 1) / 2))
            for index, seed in enumerate(batch):
                cancel.check()
                mesh, note = self._mesh(planes[index:index + 1], options, cancel)
                notes = list(prepared.notes) + ([note] if note else [])
                metadata = self.metadata(seed, options) | ({"notes": notes} if notes else {})
                sample = Sample(seed, planes[index:index + 1].float().cpu(), ((views[index] + 1) / 2).clamp(0, 1).cpu(),
                                mesh, metadata)
                fraction = (done + 0.8 * len(batch) + 0.2 * (index + 1)) / total  # never backwards
                yield Progress("sample", fraction, f"Seed {seed} done", result=sample)
            done += len(batch)

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
        noisy = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed)) for seed in seeds])
        noisy = noisy.to(device)  # (B, V-1, 3, H, W): drawn on the CPU, so a seed is the same on any device
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
        field, level = self.model.field(planes), None if self.random_weights else self.model.config.iso_level
        settings = MeshSettings(resolution=options.mesh_resolution, level=level,
                                min_part_fraction=1.0 if self.random_weights else 0.05)
        try:
            return extract_mesh(field, settings, cancel=cancel)[0], None
        except EmptyMeshError:
            if level is None:
                raise
            settings.level = None
            note = f"no surface at density {level:g}: meshed at an automatic level"
            return extract_mesh(field, settings, cancel=cancel)[0], note

    def metadata(self, seed: int, options: SampleOptions) -> dict:
        """Everything that decides the sample, so the same settings make it again."""
        from .. import __version__

        return {"method": "DMV3D", "checkpoint": self.source, "seed": seed, "steps": options.steps,
                "foreground_ratio": options.foreground_ratio, "remove_background": options.remove_background,
                "mesh_resolution": options.mesh_resolution, "dtype": str(self.dtype).removeprefix("torch."),
                "recon3d_version": __version__, "random_weights": self.random_weights}


def _seed_list(seeds: list[int]) -> str:
    return ", ".join(str(s) for s in seeds)


def comparison_grid(planes: list[torch.Tensor], model: DMV3D, angles_deg=(0.0, 90.0, 180.0, 270.0),
                    size: int = 96, elevation_deg: float = 20.0) -> Image.Image:
    """Samples' planes (each (1, 3, C, H, W)) rendered from the same angles: one row per sample, one column per
    angle, on white, so samples compare at a glance."""
    from .. import cameras
    from ..render import render_views

    with torch.no_grad():
        angles = torch.tensor(angles_deg)
        c2w = cameras.orbit_camera(angles, torch.full_like(angles, elevation_deg),
                                   torch.full_like(angles, model.config.camera_distance))
        intrinsics = cameras.intrinsics_from_fov(model.config.fov_deg).expand(len(angles_deg), 4)
        stacked = torch.cat(list(planes)).to(model.plane_tokens.device, model.plane_tokens.dtype)
        n = len(planes)
        rgb = render_views(model.field(stacked), c2w.expand(n, -1, -1, -1), intrinsics.expand(n, -1, -1), size,
                           size, model.config.render_settings())["rgb"]  # (N, A, S, S, 3)
    grid = rgb.clamp(0, 1).permute(0, 2, 1, 3, 4).reshape(n * size, len(angles_deg) * size, 3)
    return Image.fromarray((grid.cpu().numpy() * 255 + 0.5).astype("uint8"))


__all__ = ["Sample", "Sample3D", "SampleOptions", "StepPreview", "comparison_grid", "parse_seeds",
           "run_to_end"]
