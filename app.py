"""recon3d web app (Gradio). UI only: tabs, inputs and wiring; the work is done by recon3d's pipelines.

    python app.py [--port 7860] [--random-weights] [--device cuda] [--dtype float16] [--output-ttl 3600]
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import secrets
import threading
import time
from pathlib import Path

import gradio as gr
from gradio.utils import get_upload_folder

from recon3d.cancel import Cancelled
from recon3d.checkpoints import DEFAULT_LRM, OPENLRM_LICENCE
from recon3d.devices import choose_device
from recon3d.hub import CheckpointError
from recon3d.images import FOREGROUND_RATIO_RANGE, ImageError
from recon3d.mesh import MAX_RESOLUTION, MIN_RESOLUTION, EmptyMeshError
from recon3d.pipelines.image_to_3d import ImageTo3DOptions
from recon3d.pipelines.sample_3d import MAX_SEEDS, MAX_STEPS, SampleOptions, parse_seeds
from recon3d.pipelines.sds import MAX_STEPS as MAX_SDS_STEPS
from recon3d.pipelines.sds import MIN_STEPS as MIN_SDS_STEPS
from recon3d.pipelines.sds import PRESETS, SDSControl
from recon3d.service import (RANDOM_DMV3D_CHOICES, ModelService, ServiceSettings, ShownSample, cpu_cost_note,
                             default_resolution, file_digest, free_device_memory, image_job, is_out_of_memory,
                             load_cpu_costs, quick_look_job, sample_job, text_job, text_options)
from recon3d.sessions import Sessions, iterate_in_thread

log = logging.getLogger("recon3d.app")
HERE = Path(__file__).parent
EXAMPLES = sorted(str(p) for p in (HERE / "examples").glob("*.png"))
CPU_BENCHMARK = HERE / "bench" / "results" / "lrm-cpu.json"  # what a job costs on a CPU, shown on the page
OUTPUTS_DIR = Path(get_upload_folder()) / "recon3d-outputs"  # inside Gradio's cache: served in place, not copied
OUTPUT_TTL_S = 3600.0  # files of callers without a browser session (gradio_client, REST) live this long
FLOATER_FRACTION = 0.05  # "remove floaters" drops parts under 5% of the largest one
GPU_QUEUE = "gpu"  # every event that uses the model shares this concurrency group
RANDOM_BANNER = ("### ⚠️ Random weights\nThis server runs **random-weight models** (`--random-weights`): the whole "
                 "path runs and the files are real, but the shapes mean nothing. Use it to test the app offline.")
USER_ERRORS = (CheckpointError, ImageError, EmptyMeshError, ValueError)
MAX_SHOWN = MAX_SEEDS  # sample slots on the page (each a 3D viewer: browsers cap WebGL contexts)


class UploadedImage(gr.Image):
    """gr.Image whose upload reaches the handler undecoded, as a file path: recon3d.images checks it (format,
    header size, truncation) and refuses it with its own one-line message, where gr.Image would decode it with
    PIL first and answer a bad file with a multi-line error that names server paths. Inline base64 images (API
    only: the page uploads files) are refused: they would bypass the per-visitor file handling."""

    is_template = True  # the browser side is gr.Image's

    def preprocess(self, payload):
        if payload is None:
            return None
        if payload.path is None or (payload.url or "").startswith("data:"):
            raise gr.Error("Send the image as a file upload (gradio_client: handle_file), not as inline data.")
        return str(payload.path)


def is_example(path: str) -> bool:
    """Whether ``path`` is one of the examples (Gradio's cached copies keep their name): shared by all visitors,
    so never deleted with one of them."""
    same_name = [Path(example) for example in EXAMPLES if Path(example).name == Path(path).name]
    return any(example.read_bytes() == Path(path).read_bytes() for example in same_name)


def visitor_id(request: gr.Request | None) -> str:
    return request.session_hash if request is not None and request.session_hash else "anonymous"


def timings_table(result) -> str:
    rows = "\n".join(f"| {stage.replace('_', ' ')} | {seconds:.3f} |" for stage, seconds in result.timings.items())
    total = sum(result.timings.values())
    stats = result.stats
    return (f"| stage | seconds |\n|---|---|\n{rows}\n| **total** | **{total:.3f}** |\n\n"
            f"{stats['faces']:,} triangles, {stats['vertices']:,} vertices; the field was queried at "
            f"{stats['field_queries']:,} points (a dense grid: {stats['dense_queries']:,})")


def whole_number(value, name: str) -> int:
    """A form number that must be a finite whole number; anything else is refused with a message."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise gr.Error(f"{name} must be a number.") from None
    if not math.isfinite(number) or not number.is_integer():
        raise gr.Error(f"{name} must be a whole number, got {value}.")
    return int(number)


def image_options(remove_background, foreground_ratio, mesh_resolution, remove_floaters) -> ImageTo3DOptions:
    """The form's values as pipeline options; a value out of range is refused with a message, never clamped."""
    try:
        ratio, resolution = float(foreground_ratio), float(mesh_resolution)
    except (TypeError, ValueError):
        raise gr.Error("Foreground ratio and mesh resolution must be numbers.") from None
    if not (math.isfinite(ratio) and math.isfinite(resolution)):
        raise gr.Error("Foreground ratio and mesh resolution must be finite numbers.")
    if not resolution.is_integer():
        raise gr.Error(f"Mesh resolution must be a whole number, got {resolution:g}.")
    options = ImageTo3DOptions(foreground_ratio=ratio, mesh_resolution=int(resolution),
                               remove_background=bool(remove_background),
                               remove_floaters=FLOATER_FRACTION if remove_floaters else 0.0)
    try:
        return options.validate()
    except ValueError as exc:
        raise gr.Error(f"{str(exc)[:1].upper()}{str(exc)[1:]}.") from None


async def visitor_job(job, cancel, name: str):
    """A visitor's job run in a worker thread, its progress events passed on; whatever goes wrong reaches the
    visitor as one line (the traceback goes to the log), and the app keeps serving."""
    try:
        async for event in iterate_in_thread(job, cancel):
            yield event
    except USER_ERRORS as exc:
        log.info("%s refused: %s", name, exc)
        raise gr.Error(str(exc).splitlines()[0]) from None
    except Cancelled:
        raise gr.Error("The job was cancelled.") from None
    except Exception as exc:
        if is_out_of_memory(exc):
            free_device_memory()
            raise gr.Error("Out of memory: try a lower resolution, fewer samples, a smaller checkpoint or a server in "
                           "half precision (--dtype float16).") from None
        log.exception("%s failed", name)
        raise gr.Error(f"Unexpected error ({type(exc).__name__}); the server log has the details.") from None


def make_image_to_3d_handler(service: ModelService, sessions: Sessions):
    async def image_to_3d(image_path, checkpoint, remove_background, foreground_ratio, mesh_resolution,
                          remove_floaters=True, request: gr.Request = None, progress=gr.Progress()):
        """Reconstruct a textured mesh from one image. Returns the processed input, the GLB (viewer and file)
        and a table of stage timings."""
        if not image_path:
            raise gr.Error("Upload an image first (PNG, JPEG or WebP).")
        options = image_options(remove_background, foreground_ratio, mesh_resolution, remove_floaters)
        session, outputs = visitor_id(request), None
        if not is_example(image_path):  # the visitor's own upload leaves with them
            sessions.adopt(session, image_path)
        with sessions.job(session) as cancel:
            job = image_job(service, sessions, session, checkpoint, image_path, options, cancel)
            async for event in visitor_job(job, cancel, "image_to_3d"):
                progress(event.fraction, desc=event.message)
                outputs = event.result or outputs
        pipe, result, processed, glb = outputs
        notes = "".join(f"\n\n> {note}" for note in result.notes)
        label = "\n\n**Random weights: this mesh is meaningless.**" if pipe.random_weights else ""
        return str(processed), str(glb), str(glb), timings_table(result) + notes + label

    return image_to_3d


def resolution_help(service: ModelService) -> str:
    text = f"{MIN_RESOLUTION}..{MAX_RESOLUTION}, points per axis of the density grid."
    return f"{text} {cpu_cost_note(load_cpu_costs(CPU_BENCHMARK))}" if service.device.type == "cpu" else text


def build_image_tab(service: ModelService, sessions: Sessions) -> None:
    choices = service.lrm_choices()
    default = DEFAULT_LRM if any(v == DEFAULT_LRM for _, v in choices) else choices[0][1]
    low, high = FOREGROUND_RATIO_RANGE
    with gr.Row():
        with gr.Column():
            image = UploadedImage(label="Input image", type="filepath", image_mode=None,
                                  sources=["upload", "clipboard"], elem_id="input-image")
            checkpoint = gr.Dropdown(choices, value=default, label="Checkpoint")
            remove_background = gr.Checkbox(True, label="Remove background (when the image has no transparency)")
            foreground_ratio = gr.Number(0.8, step=0.05, label=f"Foreground ratio ({low:g}..{high:g})",
                                         info="The object's longer side as a fraction of the square input.",
                                         elem_id="foreground-ratio")
            mesh_resolution = gr.Number(default_resolution(service.device), step=32,
                                        label=f"Mesh resolution ({MIN_RESOLUTION}..{MAX_RESOLUTION})",
                                        info=resolution_help(service), elem_id="mesh-resolution")
            remove_floaters = gr.Checkbox(True, label="Remove floaters (small detached parts)")
            with gr.Row():
                generate = gr.Button("Generate", variant="primary", elem_id="generate")
                cancel = gr.Button("Cancel", variant="stop", elem_id="cancel")
            gr.Examples(EXAMPLES, inputs=[image], label="Examples (click one)")
        with gr.Column():
            processed = gr.Image(label="Processed input", interactive=False, height=200, type="filepath")
            viewer = gr.Model3D(label="3D model", clear_color=(0.85, 0.85, 0.85, 1.0), height=420, elem_id="viewer")
            download = gr.File(label="Download GLB", elem_id="download")
            timings = gr.Markdown(elem_id="timings")
    job = generate.click(make_image_to_3d_handler(service, sessions),
                         inputs=[image, checkpoint, remove_background, foreground_ratio, mesh_resolution,
                                 remove_floaters],
                         outputs=[processed, viewer, download, timings], show_progress_on=[viewer],
                         api_name="image_to_3d", concurrency_id=GPU_QUEUE, concurrency_limit=1)
    cancel.click(fn=None, cancels=[job], api_name=False)


def new_seeds(count: int, taken: set[int]) -> list[int]:
    """``count`` fresh random seeds, none of them in ``taken``; shown with their samples, so each is repeatable."""
    seeds: list[int] = []
    while len(seeds) < count:
        seed = secrets.randbelow(2 ** 31)
        if seed not in taken and seed not in seeds:
            seeds.append(seed)
    return seeds


def finite_number(value, name: str) -> float:
    """A form number that must be finite (an emptied box arrives as None)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise gr.Error(f"{name} must be a number.") from None
    if not math.isfinite(number):
        raise gr.Error(f"{name} must be a finite number, got {value}.")
    return number


def choose_seeds(count, seeds_text, taken: set[int], adding: bool) -> list[int]:
    """The seed list if one is given, else ``count`` new random seeds. When adding to the samples shown, listed
    seeds already shown are skipped, and once all of them are shown, new random seeds are drawn."""
    if str(seeds_text or "").strip():
        fresh = [seed for seed in parse_seeds(seeds_text) if seed not in taken]
        if fresh or not adding:
            return fresh
    count = whole_number(count, "The number of samples")
    if not 1 <= count <= MAX_SEEDS:
        raise ValueError(f"the number of samples must be between 1 and {MAX_SEEDS}, got {count}")
    return new_seeds(count, taken)


def sample_options(service: ModelService, count, seeds_text, steps, remove_background, foreground_ratio,
                   shown: list[ShownSample], adding: bool) -> SampleOptions:
    """The form's values as sampler options for new samples next to ``shown``. Out-of-range values are refused
    with a message."""
    ratio = finite_number(foreground_ratio, "Foreground ratio")
    steps = whole_number(steps, "Steps")
    try:
        seeds = choose_seeds(count, seeds_text, {sample.seed for sample in shown}, adding)
        if len(shown) + len(seeds) > MAX_SHOWN:
            raise ValueError(f"at most {MAX_SHOWN} samples are shown at once ({len(shown)} shown): press Generate "
                             f"to start over")
        options = SampleOptions(seeds=seeds, steps=steps, remove_background=bool(remove_background),
                                foreground_ratio=ratio, mesh_resolution=default_resolution(service.device))
        return options.validate()
    except ValueError as exc:
        raise gr.Error(f"{str(exc)[:1].upper()}{str(exc)[1:]}.") from None


def samples_to_keep(shown: list[ShownSample], checkpoint: str, image_path: str) -> tuple[list[ShownSample], str]:
    """The samples "More samples" adds to: those whose files still exist (outputs expire), and a note when some
    expired. Samples of another checkpoint or image cannot share a comparison: refused with a message."""
    kept = [sample for sample in shown if Path(sample.glb).is_file()]
    note = f" ({len(shown) - len(kept)} earlier samples had expired)" if len(kept) < len(shown) else ""
    if kept and (kept[0].checkpoint != checkpoint or kept[0].image != file_digest(image_path)):
        raise gr.Error("More samples adds to samples of the same image and checkpoint: press Generate to start over.")
    return kept, note


class SampleSlots:
    """The page's places for samples, side by side: each a seed line, a 3D viewer and a GLB download.
    The viewers stay mounted (empty until their sample arrives): a gr.Model3D that starts hidden never gets its
    canvas in Gradio 6.31, so only the captions and files are shown and hidden."""

    def __init__(self, count: int, per_row: int = 4):
        self.captions, self.viewers, self.files = [], [], []
        for first in range(0, count, per_row):
            with gr.Row(equal_height=True):
                for index in range(first, min(first + per_row, count)):
                    with gr.Column(min_width=200):
                        self.captions.append(gr.Markdown(visible=False, elem_id=f"sample-caption-{index}"))
                        self.viewers.append(gr.Model3D(label=f"Sample {index + 1}", height=240,
                                                       clear_color=(0.85, 0.85, 0.85, 1.0),
                                                       elem_id=f"sample-{index}"))
                        self.files.append(gr.File(visible=False, label="GLB", elem_id=f"sample-file-{index}"))

    @property
    def components(self) -> list:
        return [*self.captions, *self.viewers, *self.files]

    def show(self, index: int, sample: ShownSample) -> dict:
        """Slot ``index`` shows ``sample`` (the other slots are left as they are: no viewer reloads)."""
        text = f"**Seed {sample.seed}**" + (" · random weights" if sample.random_weights else "")
        text += f"  \n_{sample.note}_" if sample.note else ""
        return {self.captions[index]: gr.update(value=text, visible=True), self.viewers[index]: str(sample.glb),
                self.files[index]: gr.update(value=str(sample.glb), visible=True)}

    def clear(self, start: int = 0) -> dict:
        """Empty the slots from ``start`` on."""
        updates = {}
        for caption, viewer, file in list(zip(self.captions, self.viewers, self.files))[start:]:
            updates |= {caption: gr.update(value="", visible=False), viewer: None,
                        file: gr.update(value=None, visible=False)}
        return updates


def make_samples_handler(service: ModelService, sessions: Sessions, slots: SampleSlots, outputs: dict,
                         adding: bool):
    """Generate (``adding=False``: start over) or More samples (add to those shown). Streams the x0 preview at
    every step and each sample as it finishes; the last update adds the comparison image."""
    status, preview, comparison, all_files, state = (outputs[k] for k in
                                                     ("status", "preview", "comparison", "files", "state"))

    async def sample_3d(image_path, checkpoint, count, seeds_text, steps, remove_background, foreground_ratio,
                        shown=None, request: gr.Request = None, progress=gr.Progress()):
        """Several plausible 3D objects from one image, one per seed: each a GLB, with a comparison image."""
        if not image_path:
            raise gr.Error("Upload an image first (PNG, JPEG or WebP).")
        shown, expired = samples_to_keep(list(shown or []), checkpoint, image_path) if adding else ([], "")
        options = sample_options(service, count, seeds_text, steps, remove_background, foreground_ratio, shown,
                                 adding)
        session = visitor_id(request)
        if not is_example(image_path):
            sessions.adopt(session, image_path)
        label = RANDOM_SAMPLES_NOTE if checkpoint in RANDOM_DMV3D_CHOICES else ""
        samples, grid, last_preview = list(shown), None, None
        files = lambda: [str(sample.glb) for sample in samples]  # noqa: E731
        yield {status: f"Sampling seeds {', '.join(map(str, options.seeds))}{expired}" + label, state: samples,
               all_files: files() or None, **slots.clear(len(samples))}
        with sessions.job(session) as cancel:
            job = sample_job(service, sessions, session, checkpoint, image_path, options, shown, cancel)
            async for event in visitor_job(job, cancel, "sample_3d"):
                progress(event.fraction, desc=event.message)
                update = {status: event.message + expired + label}
                if event.preview is not None:
                    update[preview] = last_preview = str(event.preview)
                if isinstance(event.result, ShownSample):
                    samples.append(event.result)
                    update |= slots.show(len(samples) - 1, event.result) | {state: samples, all_files: files()}
                elif event.result is not None:
                    grid = event.result
                yield update
        seeds = ", ".join(str(sample.seed) for sample in samples)
        yield {status: f"{len(samples)} samples (seeds {seeds}): the same seed and settings give the same "
                       f"object again{expired}." + label,
               comparison: str(grid), all_files: files(), state: samples, preview: last_preview}

    return sample_3d


RANDOM_SAMPLES_NOTE = "\n\n**Random weights: these samples are meaningless.**"


def build_samples_tab(service: ModelService, sessions: Sessions) -> None:
    choices = service.dmv3d_choices()
    low, high = FOREGROUND_RATIO_RANGE
    with gr.Row():
        with gr.Column(scale=1):
            image = UploadedImage(label="Input image", type="filepath", image_mode=None,
                                  sources=["upload", "clipboard"], elem_id="samples-image")
            checkpoint = gr.Dropdown(choices, value=choices[0][1], label="DMV3D checkpoint")
            count = gr.Slider(1, MAX_SEEDS, value=4, step=1, label=f"Number of samples (1..{MAX_SEEDS})",
                              elem_id="samples-count")
            seeds = gr.Textbox(label="Seeds (optional)", placeholder="e.g. 1, 7, 42; empty: new random seeds",
                               info="A list overrides the number of samples; a seed gives the same sample again.",
                               elem_id="samples-seeds")
            steps = gr.Number(30, step=1, label=f"Denoising steps (1..{MAX_STEPS})", elem_id="samples-steps")
            remove_background = gr.Checkbox(True, label="Remove background (when the image has no transparency)")
            foreground_ratio = gr.Number(0.8, step=0.05, label=f"Foreground ratio ({low:g}..{high:g})")
            with gr.Row():
                generate = gr.Button("Generate", variant="primary", elem_id="samples-generate")
                more = gr.Button("More samples", elem_id="samples-more")
                cancel = gr.Button("Cancel", variant="stop", elem_id="samples-cancel")
            gr.Examples(EXAMPLES, inputs=[image], label="Examples (click one)")
        with gr.Column(scale=2):
            status = gr.Markdown(elem_id="samples-status")
            with gr.Row():
                preview = gr.Image(label="Denoising: current x0 views (rows: samples, columns: views)",
                                   interactive=False, type="filepath", height=200, elem_id="samples-preview")
                comparison = gr.Image(label="Comparison: every sample from the same angles", interactive=False,
                                      type="filepath", height=200, elem_id="samples-comparison")
            files = gr.File(label="All GLBs", file_count="multiple", elem_id="samples-files")
    slots = SampleSlots(MAX_SHOWN)
    state = gr.State([])
    outputs = {"status": status, "preview": preview, "comparison": comparison, "files": files, "state": state}
    inputs = [image, checkpoint, count, seeds, steps, remove_background, foreground_ratio, state]
    events = []
    for button, keep, api_name in ((generate, False, "sample_3d"), (more, True, "more_samples")):
        events.append(button.click(make_samples_handler(service, sessions, slots, outputs, keep), inputs=inputs,
                                   outputs=[*outputs.values(), *slots.components], show_progress_on=[comparison],
                                   api_name=api_name, concurrency_id=GPU_QUEUE, concurrency_limit=1))
    cancel.click(fn=None, cancels=events, api_name=False)


TEXT_EXAMPLES = ["a wooden rocking chair", "a ceramic teapot with a bamboo handle", "a red fire hydrant",
                 "a cute corgi wearing a knitted hat"]
MAX_PROMPT_CHARS = 1000  # longer than any prompt the tokenizer takes; beyond 77 tokens the prompt is cut (said)
MAX_SEED = 2 ** 31 - 1
UI_INTERVAL_S = 0.5  # the page gets a status update at most this often (previews and meshes at once)
RANDOM_TEXT_NOTE = "\n\n**Random weights: this object is meaningless.**"


class TextControls:
    """The Stop / Export-now switches of each visitor's running Text to 3D job."""

    def __init__(self):
        self._controls: dict[str, SDSControl] = {}
        self._lock = threading.Lock()

    def start(self, session: str) -> SDSControl:
        with self._lock:
            self._controls[session] = SDSControl()
            return self._controls[session]

    def get(self, session: str) -> SDSControl | None:
        with self._lock:
            return self._controls.get(session)

    def finish(self, session: str, control: SDSControl) -> None:
        with self._lock:
            if self._controls.get(session) is control:
                del self._controls[session]


def text_inputs(prompt, preset, steps, seed, guidance_scale) -> tuple[str, str, int | None, int, float]:
    """The form's values checked: (prompt, preset, custom steps or None, seed, guidance)."""
    prompt = " ".join(str(prompt or "").split())
    if not prompt:
        raise gr.Error("Type a prompt: a short description of one object, e.g. 'a wooden rocking chair'.")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise gr.Error(f"The prompt is {len(prompt)} characters long; keep it under {MAX_PROMPT_CHARS}.")
    custom_steps = None
    if preset == "custom":
        custom_steps = whole_number(steps, "Steps")
        if not MIN_SDS_STEPS <= custom_steps <= MAX_SDS_STEPS:
            raise gr.Error(f"Steps must be between {MIN_SDS_STEPS} and {MAX_SDS_STEPS}, got {custom_steps}.")
    elif preset not in PRESETS:
        raise gr.Error(f"Choose a preset: {', '.join(PRESETS)} or custom.")
    seed = whole_number(seed, "Seed")
    if not 0 <= seed <= MAX_SEED:
        raise gr.Error(f"The seed must be between 0 and {MAX_SEED}.")
    guidance = finite_number(guidance_scale, "Guidance scale")
    return prompt, preset if preset != "custom" else "fast", custom_steps, seed, guidance


def loss_table(losses: list[tuple[int, float]], points: int = 400):
    """The loss curve for gr.LinePlot, thinned to at most ``points`` rows; log10, as SDS losses fall by orders of
    magnitude while t anneals."""
    import pandas as pd

    stride = max(1, len(losses) // points)
    rows = losses[::stride]
    if losses and rows[-1] != losses[-1]:
        rows.append(losses[-1])  # always end at the latest step
    return pd.DataFrame({"step": pd.Series([step for step, _ in rows], dtype="int64"),
                         "log10 loss": pd.Series([math.log10(max(loss, 1e-12)) for _, loss in rows], dtype="float64")})


def text_status(event, note: str) -> str:
    metrics = event.metrics or {}
    if "t_range" not in metrics:
        return event.message + note
    low, high = metrics["t_range"]
    return (f"Step {metrics['step']:,}/{metrics['steps']:,} · loss {metrics['loss']:.4g} · t in [{low:.2f}, {high:.2f}] "
            f"· {metrics['resolution']} px · elapsed {metrics['elapsed']:.0f} s · ETA {metrics['eta']:.0f} s" + note)


def make_text_handler(service: ModelService, sessions: Sessions, controls: TextControls, outputs: dict):
    status, preview, plot, viewer, download = (outputs[k] for k in ("status", "preview", "plot", "viewer", "download"))

    async def text_to_3d(prompt, negative_prompt, preset, steps, seed, guidance_scale, checkpoint,
                         request: gr.Request = None, progress=gr.Progress()):
        """Optimise a 3D object from text by score distillation with MVDream. Streams the status, a preview of
        four views, the loss curve and each GLB (exports on request, then the final one)."""
        prompt, preset, custom_steps, seed, guidance = text_inputs(prompt, preset, steps, seed, guidance_scale)
        try:
            options = text_options(service.device, preset, custom_steps, guidance)
        except ValueError as exc:
            raise gr.Error(f"{str(exc)[:1].upper()}{str(exc)[1:]}.") from None
        session = visitor_id(request)
        note = RANDOM_TEXT_NOTE if service.settings.random_weights else ""
        losses, last_sent, warning = [], 0.0, ""
        control = controls.start(session)
        try:
            with sessions.job(session) as cancel:
                job = text_job(service, sessions, session, checkpoint, prompt, str(negative_prompt or ""), preset,
                               custom_steps, options, seed, control, cancel)
                async for event in visitor_job(job, cancel, "text_to_3d"):
                    metrics = event.metrics or {}
                    if "loss" in metrics:
                        losses.append((metrics["step"], metrics["loss"]))
                    if event.stage == "prompt":
                        warning = f"\n\n_{event.message[:1].upper()}{event.message[1:]}._"
                    progress(event.fraction, desc=event.message)
                    now = time.monotonic()
                    if event.preview is None and event.result is None and now - last_sent < UI_INTERVAL_S:
                        continue
                    last_sent, update = now, {status: text_status(event, warning + note), plot: loss_table(losses)}
                    if event.preview is not None:
                        update[preview] = str(event.preview)
                    if event.result is not None:
                        update |= {viewer: str(event.result), download: str(event.result)}
                    if event.stage == "done":
                        stopped = metrics.get("stopped", "done")
                        ending = {"done": "Done", "stop": "Stopped"}.get(stopped, f"Stopped: {stopped}")
                        update[status] = (f"{ending} at step {metrics.get('step', 0):,}/{metrics.get('steps', 0):,} "
                                          f"after {metrics.get('elapsed', 0):.0f} s; the GLB below is that state."
                                          + warning + note)
                    yield update
        finally:
            controls.finish(session, control)
        # Gradio 6.31: a gr.Model3D whose file arrives in a generator's last update never gets its canvas, so the
        # mesh is never the last thing sent
        yield {status: update[status]}

    return text_to_3d


def make_text_switch(controls: TextControls, switch: str):
    def press(request: gr.Request = None) -> str:
        control = controls.get(visitor_id(request))
        if control is None:
            return "No text-to-3D job is running."
        getattr(control, switch).set()
        return ("Stopping after this step; the state reached will be exported." if switch == "stop"
                else "Exporting the current state after this step.")

    return press


def make_quick_look_handler(service: ModelService, sessions: Sessions):
    async def quick_look(prompt, negative_prompt, seed, checkpoint, request: gr.Request = None,
                         progress=gr.Progress()):
        """Four views of what MVDream imagines for the prompt (plain multi-view DDIM sampling, no 3D)."""
        prompt, _, _, seed, _ = text_inputs(prompt, "fast", None, seed, 0.0)
        session, image = visitor_id(request), None
        with sessions.job(session) as cancel:
            job = quick_look_job(service, sessions, session, checkpoint, prompt, str(negative_prompt or ""), seed, cancel)
            async for event in visitor_job(job, cancel, "quick_look"):
                progress(event.fraction, desc=event.message)
                image = event.result or image
        return str(image)

    return quick_look


def build_text_tab(service: ModelService, sessions: Sessions, controls: TextControls) -> None:
    choices = service.mvdream_choices()
    default_guidance = PRESETS["fast"].guidance_scale
    if service.device.type == "cpu" and not service.settings.random_weights:
        gr.Markdown("**This server has no GPU**: with the real MVDream a step takes one to two minutes here "
                    "(bench/results/sds-cpu.json), so even the fast schedule takes days. Use a custom step count "
                    "to try it, or run recon3d on a GPU.", elem_id="text-cpu-note")
    with gr.Row():
        with gr.Column(scale=1):
            prompt = gr.Textbox(label="Prompt", placeholder="one object, e.g. a wooden rocking chair", lines=2,
                                elem_id="text-prompt")
            negative_prompt = gr.Textbox(label="Negative prompt (optional)", elem_id="text-negative")
            checkpoint = gr.Dropdown(choices, value=choices[0][1], label="MVDream checkpoint")
            preset = gr.Radio(["fast", "quality", "custom"], value="fast", label="Schedule",
                              info=f"fast: {PRESETS['fast'].steps:,} steps (the published schedule compressed); "
                                   f"quality: {PRESETS['quality'].steps:,} steps as published; custom: the steps below.",
                              elem_id="text-preset")
            steps = gr.Number(PRESETS["fast"].steps, step=100, label=f"Steps for custom ({MIN_SDS_STEPS}..{MAX_SDS_STEPS})",
                              elem_id="text-steps")
            with gr.Row():
                seed = gr.Number(0, step=1, label=f"Seed (0..{MAX_SEED})", elem_id="text-seed")
                guidance = gr.Number(default_guidance, step=1, label="Guidance scale (0..200)", elem_id="text-guidance")
            with gr.Row():
                look = gr.Button("Quick look (4 views)", elem_id="text-quick-look")
                generate = gr.Button("Generate 3D", variant="primary", elem_id="text-generate")
            with gr.Row():
                export = gr.Button("Export now", elem_id="text-export")
                stop = gr.Button("Stop & keep", variant="stop", elem_id="text-stop")
            gr.Examples([[example] for example in TEXT_EXAMPLES], inputs=[prompt], label="Example prompts",
                        cache_examples=False)
        with gr.Column(scale=2):
            status = gr.Markdown(elem_id="text-status")
            quick = gr.Image(label="Quick look: what the prior imagines (no 3D yet)", interactive=False,
                             type="filepath", height=180, elem_id="text-quick")
            preview = gr.Image(label="Optimisation: four views of the current 3D object", interactive=False,
                               type="filepath", height=180, elem_id="text-preview")
            plot = gr.LinePlot(loss_table([]), x="step", y="log10 loss", label="Loss (log10)", height=180,
                               elem_id="text-loss")  # typed from the start, so both axes are numeric
            viewer = gr.Model3D(label="3D model", clear_color=(0.85, 0.85, 0.85, 1.0), height=360, elem_id="text-viewer")
            download = gr.File(label="Download GLB", elem_id="text-download")
    outputs = {"status": status, "preview": preview, "plot": plot, "viewer": viewer, "download": download}
    generate.click(make_text_handler(service, sessions, controls, outputs),
                   inputs=[prompt, negative_prompt, preset, steps, seed, guidance, checkpoint],
                   outputs=list(outputs.values()), show_progress_on=[preview], api_name="text_to_3d",
                   concurrency_id=GPU_QUEUE, concurrency_limit=1)
    look.click(make_quick_look_handler(service, sessions), inputs=[prompt, negative_prompt, seed, checkpoint],
               outputs=[quick], api_name="quick_look", concurrency_id=GPU_QUEUE, concurrency_limit=1)
    # The switches answer at once, beside the running job (their own concurrency group, no limit)
    stop.click(make_text_switch(controls, "stop"), outputs=[status], api_name="stop_text_to_3d",
               concurrency_id="switches", concurrency_limit=None)
    export.click(make_text_switch(controls, "export"), outputs=[status], api_name="export_text_to_3d",
                 concurrency_id="switches", concurrency_limit=None)


def build_app(service: ModelService, sessions: Sessions) -> gr.Blocks:
    with gr.Blocks(title="recon3d", delete_cache=(1800, 3600)) as demo:
        gr.Markdown("# recon3d\nA photo in, a 3D model out: spin it, then download the GLB.")
        if service.settings.random_weights:
            gr.Markdown(RANDOM_BANNER, elem_id="random-weights-banner")
        elif service.offline:
            gr.Markdown("**The Hugging Face Hub is unreachable**: only checkpoints already in the local cache can "
                        "be used. Download them elsewhere (`hf download REPO`) or run with `--random-weights`.")
        with gr.Tab("Image to 3D"):
            gr.Markdown(f"LRM (Hong et al., ICLR 2024) with the OpenLRM v1.1 weights, licensed **{OPENLRM_LICENCE}**. "
                        f"Your files are private to this browser tab and deleted when you close it "
                        f"(API calls: after {sessions.ttl_s / 60:g} minutes).")
            build_image_tab(service, sessions)
        with gr.Tab("Stochastic samples"):
            default_is_random = service.dmv3d_choices()[0][1] in RANDOM_DMV3D_CHOICES
            gr.Markdown("DMV3D (Xu et al., ICLR 2024): a photo does not fix the back of an object, so each seed gives "
                        "another plausible one. Every denoising step is itself a 3D model (the preview shows its "
                        "views). No public DMV3D weights exist: "
                        + ("**no DMV3D checkpoint is installed, so this tab runs random weights** (meaningless "
                           "shapes)." if default_is_random else
                           "the default model was **trained on procedural shapes only** (boxes, spheres, cylinders, "
                           "cones, tori) by recon3d, from 32-pixel images, so expect such shapes."))
            build_samples_tab(service, sessions)
        with gr.Tab("Text to 3D"):
            gr.Markdown("MVDream (Shi et al., ICLR 2024) score distillation: a 3D field is optimised until four views "
                        "of it, 90 degrees apart, look like what the multi-view diffusion prior expects for your "
                        "prompt. The preview refreshes every few seconds; **Export now** writes a GLB of the "
                        "current state, **Stop & keep** ends the run and exports it. The job keeps running while "
                        "this tab is in the background and is cancelled when you close it. Weights: "
                        "CreativeML OpenRAIL-M.")
            build_text_tab(service, sessions, TextControls())

        def end_session(request: gr.Request) -> None:
            """The visitor left: cancel their running job and delete their files."""
            sessions.end(visitor_id(request))

        demo.unload(end_session)
    return demo


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="recon3d web app")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--random-weights", action="store_true",
                        default=os.environ.get("RECON3D_RANDOM_WEIGHTS", "") not in ("", "0", "false"))
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--dmv3d", default=None, metavar="REPO_OR_FOLDER",
                        help="a DMV3D checkpoint for the Stochastic samples tab (default: the shipped demo model)")
    parser.add_argument("--mvdream", default=None, metavar="REPO_OR_FOLDER",
                        help="an MVDream checkpoint for the Text to 3D tab (diffusers layout or the original .pt)")
    parser.add_argument("--max-queue", type=int, default=16, help="requests waiting at most")
    parser.add_argument("--output-ttl", type=float, default=OUTPUT_TTL_S, metavar="SECONDS",
                        help="remove a visitor's files this long after their last job (default: 3600)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    device, dtype = choose_device(args.device, args.dtype)
    service = ModelService(ServiceSettings(random_weights=args.random_weights, device=device, dtype=dtype,
                                           dmv3d=args.dmv3d, mvdream=args.mvdream))
    service.warm_up()
    sessions = Sessions(OUTPUTS_DIR, ttl_s=args.output_ttl)
    sessions.clear()  # files of an earlier run that no session knows any more
    sessions.start_janitor(every_s=min(60.0, args.output_ttl / 2))
    demo = build_app(service, sessions)
    demo.queue(max_size=args.max_queue, default_concurrency_limit=1)
    demo.launch(server_name=args.host, server_port=args.port, show_error=True)


if __name__ == "__main__":
    main()
