"""What a long-running front end (the app) needs around the pipelines: which checkpoints to offer, whether the
Hub is reachable (decided once, at start), a small cache of loaded pipelines, and each kind of visitor job,
which runs a pipeline and writes its files into the visitor's private folder (:class:`~recon3d.sessions.Sessions`).
Jobs yield the pipelines' typed events, with the files they wrote as events of their own (:class:`PreviewFile`,
:class:`SampleShown`, :class:`MeshFile`). No UI code and no page text here: the app turns events into widgets.
"""

from __future__ import annotations

import copy
import hashlib
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from PIL import Image

from .cancel import Cancelled
from .checkpoints import (DEMO_DMV3D_ID, DEMO_DMV3D_LABEL, INSTANTMESH_ID, INSTANTMESH_IMAGE_LABEL, INSTANTMESH_LABEL,
                          MVDREAM_CHECKPOINTS, OPENLRM_CHECKPOINTS, demo_dmv3d)
from .hub import CheckpointError, hub_reachable, split_hub_file
from .models.zero123plus import INSTANTMESH_UNET, ZERO123PLUS_REPO
from .models.zero123plus import LAYOUT as ZERO123PLUS_LAYOUT
from .images import views_grid
from .models.dmv3d import DEMO_CONFIG as DMV3D_DEMO_CONFIG
from .models.lrm import PUBLISHED_CONFIGS, TINY_LRM_CONFIG
from .pipelines.events import Event, Exported, Finished, Preview, Queued, SampleReady, Stage
from .pipelines.image_to_3d import ImageTo3D, ImageTo3DOptions, ImageTo3DResult
from .pipelines.multiview_sample import INSTANT_NERF_LARGE, MultiViewOptions, MultiViewSample3D, ViewsImageTo3D
from .pipelines.sample_3d import Sample3D, SampleOptions
from .pipelines.sds import SDSControl
from .pipelines.text_to_3d import QuickLookOptions, TextTo3D, TextTo3DOptions, TextTo3DResult
from .sessions import safe_stem
from .sharing import DeviceLease, Ticket
from .export import ExportOptions, colour_export, companions, plan_export, write_export
from .field import Field
from .mesh import Mesh

RANDOM_CHOICES = {
    "random-tiny (random weights)": TINY_LRM_CONFIG,
    "random-small (random weights, OpenLRM small shapes)": PUBLISHED_CONFIGS["small"],
}
RANDOM_DMV3D_CHOICES = {"random DMV3D (random weights, demo shapes)": DMV3D_DEMO_CONFIG}
RANDOM_MVDREAM = "random MVDream (tiny, random weights)"
RANDOM_INSTANTMESH = "random Zero123++ -> InstantMesh (tiny, random weights)"
INSTANTMESH_CHOICES = (INSTANTMESH_ID, RANDOM_INSTANTMESH)


@dataclass
class ServiceSettings:
    random_weights: bool = False
    device: torch.device = torch.device("cpu")  # the front end picks (see recon3d.devices)
    dtype: torch.dtype = torch.float32
    offline: bool | None = None  # None: probe the Hub once at start
    max_loaded: int = 1  # pipelines kept in memory at once
    dmv3d: str | None = None  # a DMV3D checkpoint (repo id or folder) offered before the shipped demo model
    mvdream: str | None = None  # an MVDream checkpoint (repo id or folder, either layout) offered first
    # the operator's limits of a public server (None: no limit)
    max_waiting: int | None = 16  # short jobs waiting for the device at most
    max_long_waiting: int | None = 4  # Text to 3D runs waiting at most (one runs at a time)
    long_runs_per_visitor: int | None = 1  # Text to 3D runs one visitor may have going or waiting
    max_text_steps: int | None = None  # the most steps one Text to 3D run may take


class ModelService:
    """Loads pipelines on first use and keeps the most recent ``max_loaded`` of them."""

    def __init__(self, settings: ServiceSettings):
        self.settings = settings
        self.device, self.dtype = torch.device(settings.device), settings.dtype
        if settings.random_weights:
            self.offline = True
        else:
            self.offline = settings.offline if settings.offline is not None else not hub_reachable()
        self._loaded: OrderedDict[str, ImageTo3D | Sample3D | MultiViewSample3D | TextTo3D] = OrderedDict()
        self._lock = threading.Lock()
        # the device, shared fairly: short jobs hold it whole, a Text to 3D run one step at a time
        self.lease = DeviceLease(settings.max_waiting, settings.max_long_waiting, settings.long_runs_per_visitor)

    @staticmethod
    def warm_up() -> threading.Thread:
        """Import the background remover in the background: its first import compiles numba code (about a
        minute on a fresh install), which the first visitor should not wait for."""
        def work() -> None:
            try:
                import rembg  # noqa: F401
            except ImportError:
                pass

        thread = threading.Thread(target=work, name="recon3d-warm-up", daemon=True)
        thread.start()
        return thread

    def lrm_choices(self) -> list[tuple[str, str]]:
        """(label, value) pairs for the Image to 3D dropdown: the OpenLRM checkpoints, then InstantMesh reading
        Zero123++'s views of the photo (one seed)."""
        if self.settings.random_weights:
            return [(name, name) for name in RANDOM_CHOICES] + [(RANDOM_INSTANTMESH, RANDOM_INSTANTMESH)]
        return [(c.label, c.repo_id) for c in OPENLRM_CHECKPOINTS] + [(INSTANTMESH_IMAGE_LABEL, INSTANTMESH_ID)]

    def dmv3d_choices(self) -> list[tuple[str, str]]:
        """(label, value) pairs for the Stochastic samples dropdown: the configured checkpoint, the shipped demo
        model (trained on procedural shapes only), and random weights when the app runs with them."""
        choices = [(f"{self.settings.dmv3d} (configured)", self.settings.dmv3d)] if self.settings.dmv3d else []
        if (demo_dmv3d() / "config.json").is_file():
            choices.append((DEMO_DMV3D_LABEL, DEMO_DMV3D_ID))
        if self.settings.random_weights or not choices:
            choices += [(name, name) for name in RANDOM_DMV3D_CHOICES]
        return choices

    def sample_choices(self) -> list[tuple[str, str]]:
        """(label, value) pairs for the Stochastic samples dropdown: Zero123++ -> InstantMesh (first whenever its
        weights are in the local cache, or random ones are served) and the DMV3D choices."""
        if self.settings.random_weights:
            return [(RANDOM_INSTANTMESH, RANDOM_INSTANTMESH), *self.dmv3d_choices()]
        instantmesh = [(INSTANTMESH_LABEL, INSTANTMESH_ID)]
        return instantmesh + self.dmv3d_choices() if instantmesh_cached() else self.dmv3d_choices() + instantmesh

    @staticmethod
    def sample_options(name: str) -> type[SampleOptions] | type[MultiViewOptions]:
        """The options class of a Stochastic samples dropdown value (its steps, defaults and ranges)."""
        return MultiViewOptions if name in INSTANTMESH_CHOICES else SampleOptions

    def mvdream_choices(self) -> list[tuple[str, str]]:
        """(label, value) pairs for the Text to 3D dropdown."""
        if self.settings.random_weights:
            return [(RANDOM_MVDREAM, RANDOM_MVDREAM)]
        configured = [(f"{self.settings.mvdream} (configured)", self.settings.mvdream)] if self.settings.mvdream else []
        return configured + [(f"{c.label} ({c.licence})", c.repo_id) for c in MVDREAM_CHECKPOINTS]

    def image_to_3d(self, name: str) -> ImageTo3D | ViewsImageTo3D:
        """The pipeline for an Image to 3D dropdown value; raises CheckpointError with a user message."""
        if name in INSTANTMESH_CHOICES:
            return ViewsImageTo3D(self.sample_3d(name))  # the same loaded sampler as the Stochastic samples tab
        return self._get(name, self._load_lrm)

    def sample_3d(self, name: str) -> Sample3D | MultiViewSample3D:
        """The sampler for a Stochastic samples dropdown value; raises CheckpointError with a user message."""
        return self._get(name, self._load_instantmesh if name in INSTANTMESH_CHOICES else self._load_dmv3d)

    def text_to_3d(self, name: str) -> TextTo3D:
        """MVDream for a dropdown value; raises CheckpointError with a user message."""
        return self._get(name, self._load_mvdream)

    def text_steps(self, options: TextTo3DOptions) -> int:
        """The steps ``options`` run on this server's device, or a one-line refusal above the operator's limit."""
        steps, limit = options.recipe(self.device).steps, self.settings.max_text_steps
        if limit is not None and steps > limit:
            needs = f"the {options.preset} schedule needs" if options.label != "custom" else "you asked for"
            raise ValueError(f"this server runs at most {limit:,} steps per Text to 3D run ({needs} {steps:,}): "
                             f"choose custom with {limit:,} or fewer")
        return steps

    def _get(self, name: str, load):
        with self._lock:
            if name in self._loaded:
                self._loaded.move_to_end(name)
                return self._loaded[name]
            while len(self._loaded) >= self.settings.max_loaded:  # free memory before loading the next one
                self._loaded.popitem(last=False)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
            self._loaded[name] = load(name)
            return self._loaded[name]

    def _load_lrm(self, name: str) -> ImageTo3D:
        if self.settings.random_weights:
            if name not in RANDOM_CHOICES:
                raise CheckpointError(f"{name}: this app runs with --random-weights; choose one of the random models")
            return ImageTo3D.random(RANDOM_CHOICES[name], device=self.device, dtype=self.dtype)
        if name not in {value for _, value in self.lrm_choices()}:  # never a path a visitor typed
            raise CheckpointError(f"{name}: unknown checkpoint")
        return ImageTo3D.from_pretrained(name, device=self.device, dtype=self.dtype, offline=self.offline)

    def _load_dmv3d(self, name: str) -> Sample3D:
        if name not in {value for _, value in self.dmv3d_choices()}:  # never a path a visitor typed
            raise CheckpointError(f"{name}: unknown DMV3D checkpoint")
        if name in RANDOM_DMV3D_CHOICES:
            return Sample3D.random(RANDOM_DMV3D_CHOICES[name], device=self.device, dtype=self.dtype)
        location = demo_dmv3d() if name == DEMO_DMV3D_ID else name
        # offline is the network's state: it also decides whether the background remover may fetch its model
        return Sample3D.from_pretrained(location, device=self.device, dtype=self.dtype, offline=self.offline, name=name)

    def _load_instantmesh(self, name: str) -> MultiViewSample3D:
        if name not in {value for _, value in self.sample_choices() + self.lrm_choices()}:
            raise CheckpointError(f"{name}: unknown sampler")
        if name == RANDOM_INSTANTMESH:
            return MultiViewSample3D.random(device=self.device, dtype=self.dtype)
        return MultiViewSample3D.from_pretrained(ZERO123PLUS_REPO, INSTANTMESH_UNET, INSTANT_NERF_LARGE,
                                                 device=self.device, dtype=self.dtype, offline=self.offline)

    def _load_mvdream(self, name: str) -> TextTo3D:
        if name not in {value for _, value in self.mvdream_choices()}:  # never a path a visitor typed
            raise CheckpointError(f"{name}: unknown MVDream checkpoint")
        if name == RANDOM_MVDREAM:
            return TextTo3D.random(device=self.device, dtype=self.dtype)
        return TextTo3D.from_pretrained(name, device=self.device, dtype=self.dtype, offline=self.offline)


def instantmesh_cached(cache_dir: str | Path | None = None) -> bool:
    """Whether Zero123++ and InstantMesh's UNet and NeRF are in the local Hub cache (then they are the default)."""
    from huggingface_hub import try_to_load_from_cache

    def cached(repo: str, names: tuple[str, ...]) -> bool:  # any of a file's alternative names (formats)
        return any(isinstance(try_to_load_from_cache(repo, name, cache_dir=cache_dir), str) for name in names)

    zero123plus = [names for names in ZERO123PLUS_LAYOUT if not names[0].startswith("unet/diffusion_pytorch_model")]
    instantmesh = [split_hub_file(file) for file in (INSTANTMESH_UNET, INSTANT_NERF_LARGE)]
    return (all(cached(ZERO123PLUS_REPO, names) for names in zero123plus)  # every file the app loads; the UNet is
            and all(cached(repo, (name,)) for repo, name in instantmesh))  # InstantMesh's


@dataclass(kw_only=True)
class PreviewFile(Event):
    """A job's preview image, written as a PNG for the page."""

    path: Path
    step: int
    steps: int


@dataclass
class ShownSample:
    """What the page keeps of a finished sample: enough to show it, compare it, download it, and to tell
    whether "More samples" would add to it (same checkpoint, same image)."""

    seed: int
    planes: torch.Tensor  # (1, 3, C, H, W) on the CPU: for the comparison image
    glb: Path
    checkpoint: str
    image: str  # digest of the input file
    random_weights: bool
    note: str | None = None
    views: Path | None = None  # the generated views as one image (Zero123++: 3 rows x 2 columns)


@dataclass(kw_only=True)
class SampleShown(Event):
    """One finished sample, its GLB written."""

    sample: ShownSample


@dataclass(kw_only=True)
class MeshFile(Event):
    """A Text to 3D mesh written as a GLB: an export requested mid-run (``final`` False) or the end state."""

    path: Path
    result: TextTo3DResult
    final: bool


@dataclass
class ImageOutputs:
    """What an Image to 3D job leaves: the result, the processed input (written at 320 px or more for the page) and
    the GLB."""

    result: ImageTo3DResult
    processed: Path
    glb: Path
    random_weights: bool

    def summary(self) -> dict:
        """The job's result for API callers (the files are sent beside it): how it was made and what it took."""
        result = self.result
        return {"checkpoint": result.metadata.get("checkpoint"), "seconds": seconds_table(result.timings),
                "triangles": result.stats.get("faces"), "vertices": result.stats.get("vertices"),
                "notes": list(result.notes), "random_weights": self.random_weights}


def seconds_table(timings: dict[str, float]) -> dict[str, float]:
    """Stage -> seconds (ms precision) with their total."""
    table = {stage: round(seconds, 3) for stage, seconds in timings.items()}
    return table | {"total": round(sum(timings.values()), 3)}


@dataclass
class SamplesOutputs:
    """What a Stochastic samples job leaves beside its samples: the comparison image and the seconds per stage."""

    comparison: Path
    seconds: dict[str, float]


def waiting_turn(ticket: Ticket, cancel) -> Iterator[Queued]:
    """A queued job's place in line, as events, until its turn comes."""
    for place in ticket.places(cancel):
        yield Queued(fraction=0.0, message=f"Waiting for the device: {place.text()}", position=place.position,
                     wait_s=place.wait_s)


def in_line(service: ModelService, kind: str, session: str, job: Iterator[Event], cancel,
            work: float = 1.0) -> Iterator[Event]:
    """A short job: its place in the short jobs' line (refused when the line is full), then ``job`` holding the
    device; its time per unit of ``work`` is kept under ``kind`` for the line's estimates."""
    with service.lease.short_job(kind, session, work) as ticket:
        yield from waiting_turn(ticket, cancel)
        yield from job


def image_job(service: ModelService, sessions, session: str, checkpoint: str, image_path: str,
              options: ImageTo3DOptions, cancel) -> Iterator[Event]:
    """One visitor's Image to 3D job, meant for a worker thread: load the checkpoint, run the pipeline (an LRM, or
    Zero123++ views read by InstantMesh), write the GLB and the processed input into the visitor's folder; ends
    with :class:`Finished` of :class:`ImageOutputs`."""
    work = _image_job(service, sessions, session, checkpoint, image_path, options, cancel)
    yield from in_line(service, f"Image to 3D: {checkpoint}", session, work, cancel,
                       work=(options.mesh_resolution / 128) ** 3)  # meshing grows with the grid


def _image_job(service: ModelService, sessions, session: str, checkpoint: str, image_path: str,
               options: ImageTo3DOptions, cancel) -> Iterator[Event]:
    yield Stage(name="load", fraction=0.0, message="Loading the checkpoint")
    pipe = service.image_to_3d(checkpoint)
    for event in pipe.run(image_path, options, cancel):
        if not isinstance(event, Finished):
            yield event
            continue
        result: ImageTo3DResult = event.result
        yield Stage(name="write", fraction=0.97, message="Writing the GLB")
        glb = result.save_glb(sessions.output_path(session, Path(image_path).stem, ".glb"))
        kept = ExportSource(safe_stem(Path(image_path).stem), result.mesh, result.metadata, "image", checkpoint,
                            result.planes.detach().cpu())
        sessions.keep(session, "image", [kept])
        processed = sessions.output_path(session, "input", ".png")
        shown_size(result.processed_image).save(processed)
        yield Finished(fraction=1.0, message=event.message,
                       result=ImageOutputs(result, processed, glb, pipe.random_weights))


SHOWN_SIZE = 320  # the processed input is written at least this large, so that the page shows it readably


def shown_size(image: Image.Image, size: int = SHOWN_SIZE) -> Image.Image:
    """``image`` scaled up to at least ``size`` pixels a side (a small model input would be a thumbnail)."""
    if min(image.size) >= size:
        return image
    scale = size / min(image.size)
    return image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.LANCZOS)


@dataclass
class ExportSource:
    """What exporting a result again needs, kept on the CPU for its visitor: the mesh, what the GLB records, and
    the field: rebuilt from the kept ``planes`` by the checkpoint's pipeline, or kept whole (an SDS field)."""

    name: str  # the files' stem
    mesh: Mesh
    extras: dict
    tab: str  # "image", "samples" or "text": which pipeline rebuilds the field
    checkpoint: str | None = None
    planes: torch.Tensor | None = None  # (1, 3, C, H, W) on the CPU
    field: Field | None = None  # kept whole (text)

    def field_on(self, service: "ModelService") -> Field:
        if self.field is not None:
            return self.field
        pipe = service.image_to_3d(self.checkpoint) if self.tab == "image" else service.sample_3d(self.checkpoint)
        return pipe.field_from(self.planes)


def export_job(service: ModelService, sessions, session: str, tab: str, options: ExportOptions,
               cancel) -> Iterator[Event]:
    """Export the results the visitor has in ``tab`` again (a face budget, a texture, other formats) without
    re-running the model: :class:`Finished` with the files, an OBJ with its MTL and PNG as one ZIP. Only the field
    queries wait in the short jobs' line and hold the device; decimation, unwrapping and writing run beside it."""
    sources: list[ExportSource] | None = sessions.kept(session, tab)
    if not sources:
        raise ValueError("nothing to export yet: make a model in this tab first (results are kept while you stay)")
    options.validate()
    files = []
    for index, source in enumerate(sources):
        yield Stage(name="prepare", fraction=index / len(sources),
                    message=f"{source.name}: face budget and UV charts (on the CPU)")
        plan = plan_export(source.mesh, options, cancel)
        coloured = {}
        yield from in_line(service, "Export", session, export_colours(service, source, plan, options, coloured, cancel),
                           cancel, work=len(plan.mesh.faces) / 50_000 + (options.texture or 0) ** 2 / 1024 ** 2)
        folder = sessions.output_path(session, source.name, "")  # a private folder: OBJ's files stay together
        folder.mkdir(parents=True)
        exported = write_export(*coloured["mesh"], options, folder / source.name, source.extras, plan.timings, cancel)
        files += [zip_obj(path) if name == "obj" else path for name, path in exported.paths.items()]
    yield Finished(fraction=1.0, message=f"{len(files)} files", result=files)


def export_colours(service: ModelService, source: ExportSource, plan, options: ExportOptions, out: dict,
                   cancel) -> Iterator[Event]:
    """The device's part of an export (the field's colours at vertices and texels), its result into ``out``."""
    yield Stage(name="colour", fraction=0.5, message=f"{source.name}: asking the field for colours")
    out["mesh"] = colour_export(plan, source.field_on(service), options, cancel)


def zip_obj(obj: Path) -> Path:
    """The OBJ with its MTL and PNG (when textured) as one ZIP beside them, relative paths kept."""
    import zipfile

    archive = obj.with_suffix(".obj.zip")
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as bundle:
        for path in (obj, *companions(obj)):
            if path.is_file():
                bundle.write(path, path.name)
    return archive


def file_digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


PREVIEWS_KEPT = 2  # the page may still be fetching the previous preview; older ones are deleted


class PreviewFiles:
    """A job's preview images on disk: each gets a fresh name (the page fetches it by URL) and all but the
    latest ``PREVIEWS_KEPT`` are deleted, so a long job leaves two files, not thousands."""

    def __init__(self, sessions, session: str, stem: str, size: int | None = None):
        self.sessions, self.session, self.stem, self.size, self.paths = sessions, session, stem, size, []

    def save(self, preview: Preview) -> PreviewFile:
        """Write the preview's views as one PNG (rows: objects, columns: views); the event for the page."""
        self.paths.append(self.sessions.output_path(self.session, self.stem, ".png"))
        views_grid(preview.views, size=self.size).save(self.paths[-1])
        for old in self.paths[:-PREVIEWS_KEPT]:
            old.unlink(missing_ok=True)
        del self.paths[:-PREVIEWS_KEPT]
        return PreviewFile(fraction=preview.fraction, message=preview.message, path=self.paths[-1],
                           step=preview.step, steps=preview.steps)


def sample_job(service: ModelService, sessions, session: str, checkpoint: str, image_path: str,
               options: SampleOptions | MultiViewOptions, shown: list[ShownSample], cancel) -> Iterator[Event]:
    """One visitor's Stochastic samples job, meant for a worker thread: a :class:`PreviewFile` of the current x0
    views at every step, a :class:`SampleShown` per finished seed, and :class:`Finished` with
    :class:`SamplesOutputs`: a comparison image of ``shown`` and the new samples together (which must come from the
    same checkpoint) and the seconds per stage. It waits for its turn in the short jobs' line first."""
    work = _sample_job(service, sessions, session, checkpoint, image_path, options, shown, cancel)
    yield from in_line(service, f"Stochastic samples: {checkpoint}", session, work, cancel,
                       work=len(options.seeds) * options.steps)


def _sample_job(service: ModelService, sessions, session: str, checkpoint: str, image_path: str,
                options: SampleOptions | MultiViewOptions, shown: list[ShownSample], cancel) -> Iterator[Event]:
    timings, start = {}, time.perf_counter()
    yield Stage(name="load", fraction=0.0, message="Loading the checkpoint")
    pipe = service.sample_3d(checkpoint)
    timings["load"], start = time.perf_counter() - start, time.perf_counter()
    samples, previews, digest = list(shown), PreviewFiles(sessions, session, "preview", size=96), file_digest(image_path)
    kept = list(sessions.kept(session, "samples") or []) if shown else []  # More samples adds to them
    sessions.keep(session, "samples", list(kept))  # Generate starts over: the page shows none of the old ones
    for event in pipe.run(image_path, options, cancel):
        if isinstance(event, Preview):
            yield previews.save(event)
        elif isinstance(event, SampleReady):
            sample = event.sample
            glb = sample.save_glb(sessions.output_path(session, f"seed-{sample.seed}", ".glb"))
            notes = sample.metadata.get("notes")
            views = None
            if isinstance(pipe, MultiViewSample3D):
                views = sessions.output_path(session, f"seed-{sample.seed}-views", ".png")
                pipe.views_image(sample).save(views)
            samples.append(ShownSample(sample.seed, sample.planes, glb, checkpoint, digest, pipe.random_weights,
                                       "; ".join(notes) if notes else None, views))
            kept.append(ExportSource(f"seed-{sample.seed}", sample.mesh, sample.metadata, "samples", checkpoint,
                                     sample.planes.detach().cpu()))
            sessions.keep(session, "samples", list(kept))
            yield SampleShown(fraction=event.fraction, message=event.message, sample=samples[-1])
        elif not isinstance(event, Finished):
            yield event
    timings["sampling_and_meshing"], start = time.perf_counter() - start, time.perf_counter()
    yield Stage(name="compare", fraction=1.0, message="Rendering the comparison")
    grid = sessions.output_path(session, "comparison", ".png")
    pipe.comparison(samples, cancel=cancel).save(grid)
    timings["comparison"] = time.perf_counter() - start
    yield Finished(fraction=1.0, message=f"{len(samples)} samples", result=SamplesOutputs(grid, timings))


def text_job(service: ModelService, sessions, session: str, checkpoint: str, prompt: str,
             options: TextTo3DOptions, control: SDSControl, cancel) -> Iterator[Event]:
    """One visitor's Text to 3D job, meant for a worker thread. Passes the SDS events on, previews as
    :class:`PreviewFile`; each mesh (an export request, then the end) is written as a GLB and comes as a
    :class:`MeshFile`; :class:`Finished` carries the last one. The run shares the device with short jobs
    (``service.lease``): it waits for its turn in the long runs' line (one at a time, the operator's limits
    refuse it at once), then gives the device up between steps whenever a short job waits."""
    with service.lease.long_run("Text to 3D", session, service.text_steps(options)) as ticket:
        for event in waiting_turn(ticket, cancel):
            if control.stop.is_set():  # Stop & keep while it waits: there is nothing to keep, it leaves the line
                raise Cancelled("stopped while waiting in line")
            yield event
        control.started.set()
        yield from _text_job(service, sessions, session, checkpoint, prompt, options, control, ticket, cancel)


def _text_job(service: ModelService, sessions, session: str, checkpoint: str, prompt: str,
              options: TextTo3DOptions, control: SDSControl, ticket: Ticket, cancel) -> Iterator[Event]:
    yield Stage(name="load", fraction=0.0, message="Loading MVDream")
    with ticket.hold(cancel, "load"):  # loading uses the device as a step does (timed apart)
        pipe = service.text_to_3d(checkpoint)
    control.lease = ticket
    previews = PreviewFiles(sessions, session, "text-preview")
    for event in pipe.generate(prompt, options, control=control, cancel=cancel, source=checkpoint):
        if isinstance(event, Preview):
            yield previews.save(event)
        elif isinstance(event, (Exported, Finished)):
            stem = f"text-{options.seed}-step-{event.result.extras['steps_done']}"
            glb = event.result.save_glb(sessions.output_path(session, stem, ".glb"))
            field = copy.deepcopy(event.result.radiance_field).cpu().requires_grad_(False)  # this state, kept
            sessions.keep(session, "text", [ExportSource(stem, event.result.mesh, event.result.extras, "text",
                                                         field=field)])
            mesh = MeshFile(fraction=event.fraction, message=event.message, path=glb, result=event.result,
                            final=isinstance(event, Finished))
            yield mesh
            if mesh.final:
                yield Finished(fraction=1.0, message=event.message, result=mesh)
        else:
            yield event


def quick_look_job(service: ModelService, sessions, session: str, checkpoint: str, prompt: str,
                   options: QuickLookOptions, cancel) -> Iterator[Event]:
    """Four views of what the prior imagines for the prompt (plain DDIM); :class:`Finished` with a PNG path."""
    work = _quick_look_job(service, sessions, session, checkpoint, prompt, options, cancel)
    yield from in_line(service, f"Quick look: {checkpoint}", session, work, cancel, work=options.steps or 50)


def _quick_look_job(service: ModelService, sessions, session: str, checkpoint: str, prompt: str,
                    options: QuickLookOptions, cancel) -> Iterator[Event]:
    yield Stage(name="load", fraction=0.0, message="Loading MVDream")
    pipe = service.text_to_3d(checkpoint)
    for event in pipe.sample_views(prompt, options, cancel=cancel):
        if not isinstance(event, Finished):
            yield event
            continue
        path = sessions.output_path(session, "quick-look", ".png")
        views_grid(event.result).save(path)
        yield Finished(fraction=1.0, message="four views sampled", result=path)
