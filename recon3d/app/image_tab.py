"""The Image to 3D tab (LRM, or InstantMesh on Zero123++'s views): one photo in, the processed input, a viewer, the
GLB and the time each stage took."""

from __future__ import annotations

import json
from pathlib import Path

import gradio as gr

from ..checkpoints import DEFAULT_LRM, OPENLRM_LICENCE, ZERO123PLUS_LICENCE
from ..images import FOREGROUND_RATIO
from ..mesh import RESOLUTION, default_resolution
from ..mesh import FLOATER_FRACTION
from ..pipelines.image_to_3d import ImageTo3DOptions
from ..pipelines.multiview_sample import MultiViewOptions
from ..service import INSTANTMESH_CHOICES, ImageOutputs, ModelService, image_job
from ..sessions import Sessions
from . import export_panel
from .common import (ASSETS, GPU_QUEUE, UPLOAD_FIRST, checked, examples, image_input, is_example, job_result, refuse,
                     result_json, ui_only, viewer, visitor_id)

CPU_BENCHMARK = ASSETS / "bench" / "results" / "lrm-cpu.json"  # what a job costs on a CPU, shown on the page
RANDOM_NOTE = "\n\n**Random weights: this mesh is meaningless.**"
CANCELLED = "**Cancelled.** The job was stopped; nothing was kept from it."


def intro(sessions: Sessions) -> str:
    return (f"LRM (Hong et al., ICLR 2024) with the OpenLRM v1.1 weights, licensed **{OPENLRM_LICENCE}**; or "
            f"InstantMesh's reconstructor reading six views that Zero123++ v1.2 imagines from the photo (one seed; "
            f"Zero123++ weights {ZERO123PLUS_LICENCE}). Your files are private to this browser tab and deleted when "
            f"you close it (API calls: after {sessions.ttl_s / 60:g} minutes).")


def timings_table(outputs: ImageOutputs) -> str:
    result = outputs.result
    rows = "\n".join(f"| {stage.replace('_', ' ')} | {seconds:.3f} |" for stage, seconds in result.timings.items())
    total = sum(result.timings.values())
    stats = result.stats
    notes = "".join(f"\n\n> {note}" for note in result.notes)
    return (f"| stage | seconds |\n|---|---|\n{rows}\n| **total** | **{total:.3f}** |\n\n"
            f"{stats['faces']:,} triangles, {stats['vertices']:,} vertices; the field was queried at "
            f"{stats['field_queries']:,} points (a dense grid: {stats['dense_queries']:,})"
            + notes + (RANDOM_NOTE if outputs.random_weights else ""))


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
    parts = [f"{size} checkpoints " + ", ".join(f"{seconds:.0f} s at {resolution}"
                                                              for resolution, seconds in sorted(c.items()))
             for size, c in costs.items()]
    return ("On this CPU server an OpenLRM job takes about: " + "; ".join(parts) + " (bench/lrm.py on 2 cores "
            "with random weights, whose noisy field makes meshing slower than for a real object).")


def resolution_help(service: ModelService) -> str:
    text = f"{RESOLUTION.text}, points per axis of the density grid."
    return f"{text} {cpu_cost_note(load_cpu_costs(CPU_BENCHMARK))}" if service.device.type == "cpu" else text


def form_options(remove_background, foreground_ratio, mesh_resolution, remove_floaters) -> ImageTo3DOptions:
    """The form's values as the pipeline's options, checked by the library (refused, never clamped)."""
    return checked(lambda: ImageTo3DOptions(
        foreground_ratio=foreground_ratio, mesh_resolution=mesh_resolution, remove_background=bool(remove_background),
        remove_floaters=FLOATER_FRACTION if remove_floaters else 0.0).validate())


def make_handler(service: ModelService, sessions: Sessions):
    async def image_to_3d(image_path, checkpoint, remove_background, foreground_ratio, mesh_resolution,
                          remove_floaters=True, request: gr.Request = None, progress=gr.Progress()):
        """Reconstruct a textured mesh from one image. Returns the GLB, the processed input and the result
        (checkpoint, seconds per stage, triangles, vertices, notes); the page's viewer and table follow."""
        if not image_path:
            raise refuse(UPLOAD_FIRST)
        options = form_options(remove_background, foreground_ratio, mesh_resolution, remove_floaters)
        session = visitor_id(request)
        if not is_example(image_path):  # the visitor's own upload leaves with them
            sessions.adopt(session, image_path)
        with sessions.job(session) as cancel:
            job = image_job(service, sessions, session, checkpoint, image_path, options, cancel)
            outputs: ImageOutputs = await job_result(job, cancel, "image_to_3d", progress)
        # the state keeps what the page shows (not the result: that would keep the model's field in memory)
        return str(outputs.glb), str(outputs.processed), outputs.summary(), (str(outputs.glb), timings_table(outputs))

    return image_to_3d


def show_result(shown: tuple[str, str] | None) -> tuple:
    """The page's viewer and timings table, (GLB, table) of a finished job (a page-only event)."""
    return (gr.update(), gr.update()) if shown is None else shown


def build(service: ModelService, sessions: Sessions) -> None:
    """The tab's widgets and events (inside a ``gr.Tab``)."""
    gr.Markdown(intro(sessions))
    choices = service.lrm_choices()
    default = DEFAULT_LRM if any(v == DEFAULT_LRM for _, v in choices) else choices[0][1]
    with gr.Row():
        with gr.Column():
            image = image_input("input-image")
            checkpoint = gr.Dropdown(choices, value=default, label="Checkpoint")
            remove_background = gr.Checkbox(ImageTo3DOptions.remove_background,
                                            label="Remove background (when the image has no transparency)")
            foreground_ratio = gr.Number(ImageTo3DOptions.foreground_ratio, step=0.05,
                                         label=f"Foreground ratio ({FOREGROUND_RATIO.text})",
                                         info="The object's longer side as a fraction of the square input.",
                                         elem_id="foreground-ratio")
            mesh_resolution = gr.Number(default_resolution(service.device), step=32,
                                        label=f"Mesh resolution ({RESOLUTION.text})", info=resolution_help(service),
                                        elem_id="mesh-resolution")
            remove_floaters = gr.Checkbox(True, label=f"Remove floaters (detached parts under {FLOATER_FRACTION:.0%} of "
                                                      f"the largest)")
            with gr.Row():
                generate = gr.Button("Generate", variant="primary", elem_id="generate")
                cancel = gr.Button("Cancel", variant="stop", elem_id="cancel")
            examples(image)
        with gr.Column():
            model = viewer("3D model", 420, "viewer")
            download = gr.File(label="GLB", elem_id="download")
            timings = gr.Markdown(elem_id="timings")
            processed = gr.Image(label="Processed input", interactive=False, height=320, type="filepath",
                                 elem_id="processed")
    result, shown = result_json(), gr.State(None)
    job = generate.click(make_handler(service, sessions),
                         inputs=[image, checkpoint, remove_background, foreground_ratio, mesh_resolution,
                                 remove_floaters],
                         outputs=[download, processed, result, shown], show_progress_on=[model],
                         api_name="image_to_3d", concurrency_id=GPU_QUEUE, concurrency_limit=None)  # its line: sharing
    ui_only(shown.change, show_result, inputs=[shown], outputs=[model, timings])
    export_panel.build(service, sessions, "image")
    ui_only(cancel.click, lambda: CANCELLED, outputs=[timings], cancels=[job])  # says so: no silent reset
    ui_only(checkpoint.change, foreground_default, inputs=[checkpoint], outputs=[foreground_ratio])


def foreground_default(checkpoint: str) -> dict:
    """The chosen model's own foreground ratio (LRM 0.8, InstantMesh on Zero123++'s views 0.85)."""
    options = MultiViewOptions if checkpoint in INSTANTMESH_CHOICES else ImageTo3DOptions
    return gr.update(value=options.foreground_ratio)
