"""What a long-running front end (the app) needs around the pipelines: which checkpoints to offer, whether the
Hub is reachable (decided once, at start), and a small cache of loaded pipelines. No UI code here.
"""

from __future__ import annotations

import gc
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from .checkpoints import OPENLRM_CHECKPOINTS
from .hub import CheckpointError, hub_reachable
from .models.lrm import PUBLISHED_CONFIGS, TINY_CONFIG
from .pipelines.image_to_3d import ImageTo3D
from .pipelines.progress import Progress

CPU_DEFAULT_RESOLUTION = 128  # on a CPU, 256^3 takes minutes
GPU_DEFAULT_RESOLUTION = 256

RANDOM_CHOICES = {
    "random-tiny (random weights)": TINY_CONFIG,
    "random-small (random weights, OpenLRM small shapes)": PUBLISHED_CONFIGS["small"],
}


@dataclass
class ServiceSettings:
    random_weights: bool = False
    device: torch.device = torch.device("cpu")  # the front end picks (see recon3d.devices)
    dtype: torch.dtype = torch.float32
    offline: bool | None = None  # None: probe the Hub once at start
    max_loaded: int = 1  # pipelines kept in memory at once


class ModelService:
    """Loads pipelines on first use and keeps the most recent ``max_loaded`` of them."""

    def __init__(self, settings: ServiceSettings):
        self.settings = settings
        self.device, self.dtype = torch.device(settings.device), settings.dtype
        if settings.random_weights:
            self.offline = True
        else:
            self.offline = settings.offline if settings.offline is not None else not hub_reachable()
        self._loaded: OrderedDict[str, ImageTo3D] = OrderedDict()
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

    def image_to_3d(self, name: str) -> ImageTo3D:
        """The pipeline for a dropdown value or a checkpoint folder; raises CheckpointError with a user message."""
        with self._lock:
            if name in self._loaded:
                self._loaded.move_to_end(name)
                return self._loaded[name]
            while len(self._loaded) >= self.settings.max_loaded:  # free memory before loading the next one
                self._loaded.popitem(last=False)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
            self._loaded[name] = self._load(name)
            return self._loaded[name]

    def _load(self, name: str) -> ImageTo3D:
        if self.settings.random_weights:
            if name not in RANDOM_CHOICES:
                raise CheckpointError(f"{name}: this app runs with --random-weights; choose one of the random models")
            return ImageTo3D.random(RANDOM_CHOICES[name], device=self.device, dtype=self.dtype)
        known = {c.repo_id for c in OPENLRM_CHECKPOINTS}
        if name not in known and not Path(name).is_dir():
            raise CheckpointError(f"{name}: unknown checkpoint")
        return ImageTo3D.from_pretrained(name, device=self.device, dtype=self.dtype, offline=self.offline)


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
