"""What a long-running front end (the app) needs around the pipelines: which checkpoints to offer, whether the
Hub is reachable (decided once, at start), and a small cache of loaded pipelines. No UI code here.
"""

from __future__ import annotations

import gc
import hashlib
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from .checkpoints import DEMO_DMV3D, DEMO_DMV3D_ID, DEMO_DMV3D_LABEL, MVDREAM_CHECKPOINTS, OPENLRM_CHECKPOINTS
from .hub import CheckpointError, hub_reachable
from .models.dmv3d import DEMO_CONFIG as DMV3D_DEMO_CONFIG
from .models.lrm import PUBLISHED_CONFIGS, TINY_CONFIG
from .pipelines.image_to_3d import ImageTo3D
from .pipelines.progress import Progress
from .images import views_grid
from .pipelines.sample_3d import Sample, Sample3D, SampleOptions, StepPreview, comparison_grid
from .pipelines.sds import SDSControl, SDSOptions, for_device
from .pipelines.text_to_3d import TextTo3D, TextTo3DResult, options_for, views_strip

CPU_DEFAULT_RESOLUTION = 128  # on a CPU, 256^3 takes minutes
GPU_DEFAULT_RESOLUTION = 256

RANDOM_CHOICES = {
    "random-tiny (random weights)": TINY_CONFIG,
    "random-small (random weights, OpenLRM small shapes)": PUBLISHED_CONFIGS["small"],
}
RANDOM_DMV3D_CHOICES = {"random DMV3D (random weights, demo shapes)": DMV3D_DEMO_CONFIG}
RANDOM_MVDREAM = "random MVDream (tiny, random weights)"
QUICK_LOOK_STEPS, QUICK_LOOK_STEPS_CPU = 50, 20  # DDIM steps of the quick look (MVDream samples with 50)


@dataclass
class ServiceSettings:
    random_weights: bool = False
    device: torch.device = torch.device("cpu")  # the front end picks (see recon3d.devices)
    dtype: torch.dtype = torch.float32
    offline: bool | None = None  # None: probe the Hub once at start
    max_loaded: int = 1  # pipelines kept in memory at once
    dmv3d: str | None = None  # a DMV3D checkpoint (repo id or folder) offered before the shipped demo model
    mvdream: str | None = None  # an MVDream checkpoint (repo id or folder, either layout) offered first


class ModelService:
    """Loads pipelines on first use and keeps the most recent ``max_loaded`` of them."""

    def __init__(self, settings: ServiceSettings):
        self.settings = settings
        self.device, self.dtype = torch.device(settings.device), settings.dtype
        if settings.random_weights:
            self.offline = True
        else:
            self.offline = settings.offline if settings.offline is not None else not hub_reachable()
        self._loaded: OrderedDict[str, ImageTo3D | Sample3D] = OrderedDict()
        self._lock = threading.Lock()

    def warm_up(self) -> threading.Thread:
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
        """(label, value) pairs for a dropdown."""
        if self.settings.random_weights:
            return [(name, name) for name in RANDOM_CHOICES]
        return [(c.label, c.repo_id) for c in OPENLRM_CHECKPOINTS]

    def dmv3d_choices(self) -> list[tuple[str, str]]:
        """(label, value) pairs for the Stochastic samples dropdown: the configured checkpoint, the shipped demo
        model (trained on procedural shapes only), and random weights when the app runs with them."""
        choices = [(f"{self.settings.dmv3d} (configured)", self.settings.dmv3d)] if self.settings.dmv3d else []
        if (DEMO_DMV3D / "config.json").is_file():
            choices.append((DEMO_DMV3D_LABEL, DEMO_DMV3D_ID))
        if self.settings.random_weights or not choices:
            choices += [(name, name) for name in RANDOM_DMV3D_CHOICES]
        return choices

    def mvdream_choices(self) -> list[tuple[str, str]]:
        """(label, value) pairs for the Text to 3D dropdown."""
        if self.settings.random_weights:
            return [(RANDOM_MVDREAM, RANDOM_MVDREAM)]
        configured = [(f"{self.settings.mvdream} (configured)", self.settings.mvdream)] if self.settings.mvdream else []
        return configured + [(f"{c.label} ({c.licence})", c.repo_id) for c in MVDREAM_CHECKPOINTS]

    def image_to_3d(self, name: str) -> ImageTo3D:
        """The pipeline for a dropdown value; raises CheckpointError with a user message."""
        return self._get(name, self._load_lrm)

    def sample_3d(self, name: str) -> Sample3D:
        """The DMV3D sampler for a dropdown value; raises CheckpointError with a user message."""
        return self._get(name, self._load_dmv3d)

    def text_to_3d(self, name: str) -> TextTo3D:
        """MVDream for a dropdown value; raises CheckpointError with a user message."""
        return self._get(name, self._load_mvdream)

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
        location = DEMO_DMV3D if name == DEMO_DMV3D_ID else name
        # offline is the network's state: it also decides whether the background remover may fetch its model
        return Sample3D.from_pretrained(location, device=self.device, dtype=self.dtype, offline=self.offline, name=name)


    def _load_mvdream(self, name: str) -> TextTo3D:
        if name not in {value for _, value in self.mvdream_choices()}:  # never a path a visitor typed
            raise CheckpointError(f"{name}: unknown MVDream checkpoint")
        if name == RANDOM_MVDREAM:
            return TextTo3D.random(device=self.device, dtype=self.dtype)
        return TextTo3D.from_pretrained(name, device=self.device, dtype=self.dtype, offline=self.offline)


def default_resolution(device: torch.device) -> int:
    return CPU_DEFAULT_RESOLUTION if torch.device(device).type == "cpu" else GPU_DEFAULT_RESOLUTION


def load_cpu_costs(bench_json: str | Path) -> dict[str, dict[int, float]]:
    """Image -> GLB seconds on a CPU per checkpoint size and mesh resolution, as bench/lrm.py recorded them
    ({} when the file is missing or holds no CPU run)."""
    try:
        runs = json.loads(Path(bench_json).read_text())["runs"]
    except (OSError, ValueError, KeyError):
        return {}
    costs: dict[str, dict[int, float]] = {}
    for run in runs:
        if run.get("status") == "ok" and run.get("device") == "cpu" and run.get("dtype") == "float32":
            costs.setdefault(run["size"], {})[int(run["resolution"])] = float(run["seconds"]["total"])
    return costs


def cpu_cost_note(costs: dict[str, dict[int, float]]) -> str:
    """One sentence for people: what a job costs on a CPU server at each resolution."""
    if not costs:
        return "On a CPU a job takes minutes at 256 and above."
    parts = [f"{size}: " + ", ".join(f"{seconds:.0f} s at {resolution}" for resolution, seconds in sorted(c.items()))
             for size, c in costs.items()]
    return ("On this CPU server a job takes about " + "; ".join(parts) + " (bench/lrm.py on 2 cores with "
            "random weights, whose noisy field makes meshing slower than for a real object).")


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, (torch.OutOfMemoryError, MemoryError))


def free_device_memory() -> None:
    """After an out-of-memory error: give cached GPU blocks back so the next job can start."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def image_job(service: ModelService, sessions, session: str, checkpoint: str, image_path: str, options,
              cancel) -> Iterator[Progress]:
    """One visitor's Image to 3D job, meant for a worker thread: load the checkpoint, run the pipeline, write the
    GLB and the processed input into the visitor's folder. Progress events; the last carries
    (pipeline, result, processed-image path, GLB path)."""
    yield Progress("load", 0.0, "Loading the checkpoint")
    pipe = service.image_to_3d(checkpoint)
    for event in pipe.run(image_path, options, cancel):
        if event.result is None:
            yield event
            continue
        result = event.result
        yield Progress("write", 0.97, "Writing the GLB")
        glb = result.save_glb(sessions.output_path(session, Path(image_path).stem, ".glb"))
        processed = sessions.output_path(session, "input", ".png")
        result.processed_image.save(processed)
        yield Progress("done", 1.0, event.message, result=(pipe, result, processed, glb))


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


def file_digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


PREVIEWS_KEPT = 2  # the page may still be fetching the previous preview; older ones are deleted


class PreviewFiles:
    """A job's preview images on disk: each gets a fresh name (the page fetches it by URL) and all but the
    latest ``PREVIEWS_KEPT`` are deleted, so a long job leaves two files, not thousands."""

    def __init__(self, sessions, session: str, stem: str):
        self.sessions, self.session, self.stem, self.paths = sessions, session, stem, []

    def save(self, image) -> Path:
        """Write a PIL image; return its path."""
        self.paths.append(self.sessions.output_path(self.session, self.stem, ".png"))
        image.save(self.paths[-1])
        for old in self.paths[:-PREVIEWS_KEPT]:
            old.unlink(missing_ok=True)
        del self.paths[:-PREVIEWS_KEPT]
        return self.paths[-1]


def sample_job(service: ModelService, sessions, session: str, checkpoint: str, image_path: str,
               options: SampleOptions, shown: list[ShownSample], cancel) -> Iterator[Progress]:
    """One visitor's Stochastic samples job, meant for a worker thread. Progress events whose ``preview`` is the
    path of a PNG of the current x0 views and whose ``result`` is a :class:`ShownSample` per finished seed; the
    last event's result is the path of a comparison image of ``shown`` and the new samples together (which must
    come from the same checkpoint)."""
    yield Progress("load", 0.0, "Loading the checkpoint")
    pipe = service.sample_3d(checkpoint)
    samples, previews, digest = list(shown), PreviewFiles(sessions, session, "preview"), file_digest(image_path)
    for event in pipe.run(image_path, options, cancel):
        if isinstance(event.preview, StepPreview):
            path = previews.save(views_grid(event.preview.views, size=96))
            yield Progress(event.stage, event.fraction, event.message, preview=path)
        elif isinstance(event.result, Sample):
            sample = event.result
            glb = sample.save_glb(sessions.output_path(session, f"seed-{sample.seed}", ".glb"))
            notes = sample.metadata.get("notes")
            samples.append(ShownSample(sample.seed, sample.planes, glb, checkpoint, digest, pipe.random_weights,
                                       "; ".join(notes) if notes else None))
            yield Progress(event.stage, event.fraction, event.message, result=samples[-1])
        else:
            yield event
    cancel.check()
    grid = sessions.output_path(session, "comparison", ".png")
    comparison_grid([s.planes for s in samples], pipe.model).save(grid)
    yield Progress("done", 1.0, f"{len(samples)} samples", result=grid)


def text_options(device: torch.device, preset: str, steps: int | None, guidance_scale: float | None) -> SDSOptions:
    """The recipe of a preset as this server runs it (see :func:`~recon3d.pipelines.sds.for_device`)."""
    return for_device(options_for(preset, steps, guidance_scale), device)


def text_job(service: ModelService, sessions, session: str, checkpoint: str, prompt: str, negative_prompt: str,
             preset: str, custom_steps: int | None, options: SDSOptions, seed: int, control: SDSControl,
             cancel) -> Iterator[Progress]:
    """One visitor's Text to 3D job, meant for a worker thread. Passes the SDS events on with ``preview`` as the
    path of a PNG of the four views; each mesh (an export request, then the end) is written as a GLB whose path
    comes as ``result``. ``custom_steps``: the visitor's own step count (None: the preset's)."""
    yield Progress("load", 0.0, "Loading MVDream")
    pipe = service.text_to_3d(checkpoint)
    previews = PreviewFiles(sessions, session, "text-preview")
    for event in pipe.generate(prompt, negative_prompt, preset, custom_steps, seed, options.guidance_scale,
                               options=options, control=control, cancel=cancel, source=checkpoint):
        preview = previews.save(views_strip(event.preview)) if event.preview is not None else None
        if isinstance(event.result, TextTo3DResult):
            stem = f"text-{seed}-step-{event.result.extras['steps_done']}"
            glb = event.result.save_glb(sessions.output_path(session, stem, ".glb"))
            yield Progress(event.stage, event.fraction, event.message, result=glb, metrics=event.metrics)
        else:
            yield Progress(event.stage, event.fraction, event.message, preview=preview, metrics=event.metrics)


def quick_look_job(service: ModelService, sessions, session: str, checkpoint: str, prompt: str, negative_prompt: str,
                   seed: int, cancel) -> Iterator[Progress]:
    """Four views of what the prior imagines for the prompt (plain DDIM); the last event's result is a PNG path."""
    yield Progress("load", 0.0, "Loading MVDream")
    pipe = service.text_to_3d(checkpoint)
    steps = QUICK_LOOK_STEPS if service.device.type != "cpu" else QUICK_LOOK_STEPS_CPU
    for event in pipe.sample_views(prompt, negative_prompt, steps=steps, generator=torch.Generator().manual_seed(seed),
                                   cancel=cancel):
        if event.result is None:
            yield event
            continue
        path = sessions.output_path(session, "quick-look", ".png")
        views_strip(event.result).save(path)
        yield Progress("done", 1.0, "four views sampled", result=path)
