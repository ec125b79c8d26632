"""Image to 3D with LRM: image -> planes -> mesh (and optional turntable), with per-stage timings.

Steps: 1 prepare the image, 2 encode it, 3 transformer -> planes, 4 density grid, 5 marching cubes + colours.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

import torch
from PIL import Image

from .. import cameras
from ..cancel import NEVER, CancelToken
from ..field import TriplaneField
from ..images import (FOREGROUND_RATIO, BackgroundRemover, ImageInput, PreparedImage, image_to_tensor, prepare_image,
                      views_grid)
from ..mesh import RESOLUTION, Mesh, MeshSettings, default_resolution, extract_mesh
from ..models.lrm import DENSITY_LEVEL, LRM, LRMConfig, random_lrm
from ..options import Limit, Options, limited
from ..render import RenderSettings, render_orbit
from .events import Event, Finished, Stage, run_to_end
from .progress import check_before_each, timed



@dataclass
class ImageTo3DOptions(Options):
    """How one image becomes a mesh; ``resolved(device)`` checks every value (a value out of range is refused,
    not clamped) and fills the device's defaults."""

    foreground_ratio: float = limited(0.8, FOREGROUND_RATIO)
    mesh_resolution: int | None = limited(None, RESOLUTION)  # None: the device's default (128 on a CPU, 256 on a GPU)
    remove_background: bool = True
    camera_distance: float = limited(cameras.LRM_SOURCE_DISTANCE, Limit("camera distance", 1.0, 4.0))
    density_threshold: float | None = DENSITY_LEVEL  # None: pick a level from the grid (for random weights)
    # drop parts smaller than this fraction of the largest (0: keep all, 1: the largest only)
    remove_floaters: float = limited(0.0, Limit("remove floaters", 0.0, 1.0))

    def device_defaults(self, device: torch.device | str) -> dict:
        return {"mesh_resolution": default_resolution(device)}


@dataclass
class ImageTo3DResult:
    prepared: PreparedImage
    planes: torch.Tensor  # (1, 3, C, 64, 64)
    mesh: Mesh
    field: TriplaneField
    timings: dict[str, float]
    stats: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    render_settings: RenderSettings = field(default_factory=RenderSettings)  # the checkpoint's samples per ray
    render_size: int = 192  # the checkpoint's training render size
    metadata: dict = field(default_factory=dict)  # how it was made (method, checkpoint, options): goes into the GLB

    @property
    def processed_image(self) -> Image.Image:
        return self.prepared.image

    def save_glb(self, path: str | Path) -> Path:
        """Write the mesh as GLB with how it was made in its extras; the seconds it took are added to ``timings``
        as ``glb_write``."""
        start = time.perf_counter()
        path = self.mesh.save_glb(path, extras=self.metadata)
        self.timings["glb_write"] = time.perf_counter() - start
        return path

    def render_turntable(self, frames: int = 24, size: int | None = None, elevation_deg: float = 23.6,
                         distance: float = 2.0, fov_deg: float | None = None,
                         settings: RenderSettings | None = None, cancel: CancelToken = NEVER) -> list[Image.Image]:
        """Frames around the object (radius 2, elevation 23.6 deg and the source camera's 67.4 deg field of view,
        as in LRM's demo); frame 0 faces the source view. ``cancel`` is checked before every frame."""
        fov_deg = fov_deg or cameras.fov_from_focal(cameras.LRM_SOURCE_FX)
        azimuths = [360.0 * frame / frames for frame in range(frames)]
        rgb = render_orbit(self.field, azimuths, elevation_deg, distance, fov_deg, size or self.render_size,
                           settings or self.render_settings, cancel)  # (1, F, S, S, 3)
        return [views_grid(frame[None, None].permute(0, 1, 4, 2, 3)) for frame in rgb[0]]

    def save_turntable(self, path: str | Path, frames: int = 24, size: int | None = None,
                       cancel: CancelToken = NEVER) -> Path:
        """An animated GIF (or WebP, by suffix) of :meth:`render_turntable`."""
        images = self.render_turntable(frames, size, cancel=cancel)
        images[0].save(path, save_all=True, append_images=images[1:], duration=80, loop=0)
        return Path(path)


class ImageTo3D:
    """``ImageTo3D.from_pretrained("zxhezexin/openlrm-mix-base-1.1")(image)`` -> :class:`ImageTo3DResult`."""

    def __init__(self, model: LRM, random_weights: bool = False, offline: bool = False, source: str = "unknown"):
        self.model, self.source = model, source
        self.random_weights = random_weights
        self.background_remover = BackgroundRemover(offline=offline)

    @classmethod
    def from_pretrained(cls, repo_or_folder: str | Path, device: torch.device | str | None = None,
                        dtype: torch.dtype | None = None, revision: str | None = None,
                        offline: bool | None = None) -> "ImageTo3D":
        model = LRM.from_pretrained(repo_or_folder, revision=revision, offline=offline, device=device, dtype=dtype)
        return cls(model, offline=bool(offline), source=str(repo_or_folder) + (f"@{revision}" if revision else ""))

    @classmethod
    def random(cls, config: LRMConfig, seed: int = 0, device: torch.device | str | None = None,
               dtype: torch.dtype | None = None, offline: bool = True) -> "ImageTo3D":
        """Random weights: the whole path runs, the shapes are real, the output means nothing."""
        model = random_lrm(config, seed).to(device=device or "cpu", dtype=dtype or torch.float32)
        return cls(model, random_weights=True, offline=offline, source="random weights")

    def metadata(self, options: ImageTo3DOptions) -> dict:
        """Everything that decides the mesh, as the GLB records it."""
        from .. import __version__

        return {"method": "LRM", "checkpoint": self.source, "foreground_ratio": options.foreground_ratio,
                "remove_background": options.remove_background, "mesh_resolution": options.mesh_resolution,
                "density_threshold": options.density_threshold, "remove_floaters": options.remove_floaters,
                "dtype": str(self.dtype).removeprefix("torch."), "recon3d_version": __version__,
                "random_weights": self.random_weights}

    @property
    def device(self) -> torch.device:
        return self.model.pos_embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.pos_embed.dtype

    def __call__(self, image: ImageInput, **options) -> ImageTo3DResult:
        return run_to_end(self.run(image, ImageTo3DOptions(**options)))

    def field_from(self, planes: torch.Tensor) -> TriplaneField:
        """The field of a result's planes (1, 3, C, 64, 64), e.g. kept on the CPU (exports: a new face budget, a
        baked texture)."""
        return self.model.field(planes.to(self.device, self.dtype))

    @torch.no_grad()
    def run(self, image: ImageInput, options: ImageTo3DOptions | None = None,
            cancel: CancelToken = NEVER) -> Iterator[Event]:
        """The job as :class:`~recon3d.pipelines.events.Stage` events, then :class:`Finished` with the
        :class:`ImageTo3DResult`. The options are resolved for this pipeline's device. ``cancel`` is checked
        between stages, before every encoder and transformer layer and between chunks of grid queries; a
        cancelled job raises :class:`~recon3d.cancel.Cancelled`."""
        options = (options or ImageTo3DOptions()).resolved(self.device)
        if self.random_weights:  # no calibrated density: mesh the largest part at an automatic level
            options = replace(options, density_threshold=None, remove_floaters=1.0)
        timings: dict[str, float] = {}
        device, source_size = self.device, self.model.config.sizes[0]
        yield Stage(name="preprocess", fraction=0.0, message="Preparing the image")
        with timed(timings, "preprocess", device):
            remover = self.background_remover if options.remove_background else None
            prepared = prepare_image(image, source_size, options.foreground_ratio, remover)
            cancel.check()
            pixels = image_to_tensor(prepared.image).to(device, self.dtype)  # (1, 3, S, S)
            camera = cameras.lrm_source_camera(options.camera_distance)[None].to(device, self.dtype)  # (1, 16)
        if prepared.background_seconds:  # its own stage: it can dominate the CPU path
            timings["remove_background"] = prepared.background_seconds
            timings["preprocess"] -= prepared.background_seconds
        yield Stage(name="encoder", fraction=0.1, message="Encoding the image")
        with timed(timings, "encoder", device), check_before_each(self.model.encoder.model.blocks, cancel):
            tokens = self.model.encode_image(pixels)
        yield Stage(name="transformer", fraction=0.25, message="Predicting the triplane")
        with timed(timings, "transformer", device), check_before_each(self.model.transformer.layers, cancel):
            planes = self.model.planes_from_tokens(tokens, camera)
        cancel.check()
        yield Stage(name="mesh", fraction=0.45, message=f"Extracting the mesh at {options.mesh_resolution}^3")
        field_ = self.model.field(planes)
        mesh_settings = MeshSettings(resolution=options.mesh_resolution, level=options.density_threshold,
                                     min_part_fraction=options.remove_floaters)
        mesh, grid = extract_mesh(field_, mesh_settings, timings, cancel)
        stats = {"vertices": len(mesh.vertices), "faces": len(mesh.faces), "field_queries": grid.queries,
                 "dense_queries": options.mesh_resolution ** 3, **grid.stats}
        samples = self.model.config.rendering_samples_per_ray
        result = ImageTo3DResult(prepared, planes, mesh, field_, timings, stats, list(prepared.notes),
                                 RenderSettings(coarse_samples=samples // 2, fine_samples=samples - samples // 2),
                                 self.model.config.sizes[1], self.metadata(options))
        yield Finished(fraction=1.0, message=f"{len(mesh.faces):,} triangles", result=result)
