"""The Text to 3D tab (MVDream SDS): a quick look at what the prior imagines, then score distillation into a mesh
with a live status, previews, the loss curve, Export now and Stop & keep."""

from __future__ import annotations

import math
import threading
import time

import gradio as gr

from ..options import limit_of
from ..pipelines.events import Finished, Note, StepReport
from ..pipelines.progress import StepClock
from ..pipelines.sds import PRESET_DESCRIPTIONS, PRESETS, SDSControl
from ..pipelines.text_to_3d import CUSTOM, QuickLookOptions, TextTo3DOptions, TextTo3DResult, check_prompt
from ..service import MeshFile, ModelService, PreviewFile, quick_look_job, text_job
from ..sessions import Sessions
from . import export_panel
from .common import (GPU_QUEUE, LONG_RUNS, SWITCHES, checked, job_result, result_json, ui_only, viewer, visitor_id,
                     visitor_job)

def intro(service: ModelService) -> str:
    """What the tab does and how often this server shows progress (from the recipe it runs on its device)."""
    recipe = TextTo3DOptions().recipe(service.device)
    every = "every step" if recipe.preview_every == 1 else f"every {recipe.preview_every} steps"
    cadence = f"after {every} (at most one per {recipe.preview_seconds:g} s)"
    return ("MVDream (Shi et al., ICLR 2024) score distillation: a 3D field is optimised until four views of it, 90 "
            "degrees apart, look like what the multi-view diffusion prior expects for your prompt. On this server "
            f"the preview refreshes {cadence}. **Export now** writes a GLB of the current state (the optimisation "
            "pauses while it meshes), **Stop & keep** ends the run and exports it. The job keeps running while "
            "this tab is in the background and is cancelled when you close it. Weights: CreativeML OpenRAIL-M.")
CPU_NOTE = ("**This server has no GPU**: with the real MVDream a step takes one to two minutes here "
            "(bench/results/sds-cpu.json), so even the fast schedule takes days. Use a custom step count to try it, "
            "or run recon3d on a GPU.")
EXAMPLES = ["a wooden rocking chair", "a ceramic teapot with a bamboo handle", "a red fire hydrant",
            "a cute corgi wearing a knitted hat"]
UI_INTERVAL_S = 0.5  # the page gets a status update at most this often (previews and meshes at once)
RANDOM_NOTE = "\n\n**Random weights: this object is meaningless.**"
STEPS, SEED, GUIDANCE = (limit_of(TextTo3DOptions, name) for name in ("steps", "seed", "guidance_scale"))


class TextControls:
    """The Stop / Export-now switches of each visitor's Text to 3D jobs (the oldest is the one they act on: a
    later one of the same visitor waits behind it, or is refused by the server's per-visitor limit)."""

    def __init__(self):
        self._controls: dict[str, list[SDSControl]] = {}
        self._lock = threading.Lock()

    def start(self, session: str) -> SDSControl:
        with self._lock:
            control = SDSControl()
            self._controls.setdefault(session, []).append(control)
            return control

    def get(self, session: str) -> SDSControl | None:
        with self._lock:
            return next(iter(self._controls.get(session, [])), None)

    def finish(self, session: str, control: SDSControl) -> None:
        with self._lock:
            mine = self._controls.get(session, [])
            if control in mine:
                mine.remove(control)
            if not mine:
                self._controls.pop(session, None)


def form_options(preset, steps, seed, guidance_scale, negative_prompt) -> TextTo3DOptions:
    """The form's values as the pipeline's options, checked by the library; the Steps box counts with "custom"."""
    return checked(lambda: TextTo3DOptions(preset=preset, steps=steps if preset == CUSTOM else None, seed=seed,
                                           guidance_scale=guidance_scale,
                                           negative_prompt=str(negative_prompt or "")).validate())


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


def steps_limit(service: ModelService) -> str:
    """The Steps box's range: the library's, within the operator's limit of this server."""
    limit = service.settings.max_text_steps
    if limit is None or limit >= STEPS.high:
        return STEPS.text
    return f"{STEPS.low:g}..{limit} on this server"


def steps_field(preset: str, service: ModelService) -> dict:
    """What the Steps box shows for a schedule: a named preset's own count, read-only (the page runs exactly
    that; above the server's limit it says so), or, for custom, an editable count."""
    if preset == CUSTOM:
        return {"interactive": True, "info": "custom: the number of steps to run"}
    steps, limit = PRESETS[preset].steps, service.settings.max_text_steps
    over = f" (over this server's limit of {limit:,}: choose custom)" if limit is not None and steps > limit else ""
    return {"value": steps, "interactive": False,
            "info": f"the {preset} schedule runs {steps:,} steps{over}; choose custom to set your own"}


QUICK_LOOK_STARTED = "Quick look: sampling four views of what the prior imagines for the prompt..."
QUICK_LOOK_DONE = "Quick look ready: four views of what the prior imagines for the prompt (no 3D yet)."
PAUSE_SHOWN_S = 0.05  # a run's pauses for other jobs are shown from this long (shorter ones are lock handovers)


def loss_trend(losses: list[tuple[int, float]], window: int = 20) -> str:
    """"falling", "flat" or "rising": the slope of log10 loss over the last ``window`` steps (SDS losses are
    noisy: one step says nothing), "starting" before there are 5."""
    recent = [math.log10(max(loss, 1e-12)) for _, loss in losses[-window:]]
    if len(recent) < 5:
        return "starting"
    mean_x, mean_y = (len(recent) - 1) / 2, sum(recent) / len(recent)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in enumerate(recent)) / sum(
        (x - mean_x) ** 2 for x in range(len(recent)))
    return "falling" if slope < -0.005 else "rising" if slope > 0.005 else "flat"


def step_status(report: StepReport, losses: list[tuple[int, float]]) -> str:
    """The step line in plain words, the technical values on a small second line."""
    low, high = report.t_range
    skipped = f" · {report.skipped:,} skipped (non-finite)" if report.skipped else ""
    shared = f" · paused {report.paused:.1f} s for other visitors' jobs" if report.paused >= PAUSE_SHOWN_S else ""
    noise = f"{low:.2f}" if f"{low:.2f}" == f"{high:.2f}" else f"{low:.2f}-{high:.2f}"
    return (f"Step {report.step:,}/{report.steps:,} · noise level {noise} · loss "
            f"{loss_trend(losses)} · {report.resolution} px · elapsed {report.elapsed:.0f} s · "
            f"{StepClock.text(report.eta)}{skipped}{shared}\n\n"
            f"<sub>details: timesteps drawn from [{low:.2f}, {high:.2f}] of the schedule, loss {report.loss:.4g}</sub>")


def end_status(result: TextTo3DResult) -> str:
    extras, stopped = result.extras, result.extras.get("stopped", "done")
    ending = {"done": "Done", "stop": "Stopped"}.get(stopped, f"Stopped: {stopped}")
    skipped = extras.get("non_finite_steps", 0)
    skipped = f" {skipped:,} steps were skipped (non-finite loss)." if skipped else ""
    return (f"{ending} at step {extras['steps_done']:,}/{extras['steps']:,} after {result.elapsed or 0:.0f} s; "
            f"the GLB below is that state.{skipped}")


def text_summary(result: TextTo3DResult, options: TextTo3DOptions, checkpoint: str, random_weights: bool) -> dict:
    """The result of a Text to 3D run for API callers (the GLB is sent beside it)."""
    extras = result.extras
    return {"checkpoint": checkpoint, "preset": options.label, "seed": options.seed,
            "steps_done": extras.get("steps_done"), "steps": extras.get("steps"),
            "ended": extras.get("stopped", "done"), "seconds": round(result.elapsed or 0.0, 3),
            "non_finite_steps": extras.get("non_finite_steps", 0), "random_weights": random_weights}


def make_handler(service: ModelService, sessions: Sessions, controls: TextControls, outputs: dict):
    status, preview, plot, download, result, mesh = (outputs[k] for k in ("status", "preview", "plot", "download",
                                                                          "result", "mesh"))

    async def text_to_3d(prompt, negative_prompt, preset, steps, seed, guidance_scale, checkpoint,
                         request: gr.Request = None, progress=gr.Progress()):
        """Optimise a 3D object from text by score distillation with MVDream. Streams the status, a preview of
        four views, the loss curve and each GLB (exports on request); ends with the final GLB and the result
        (checkpoint, preset, seed, steps done, how it ended, seconds)."""
        prompt = checked(lambda: check_prompt(prompt))
        options = form_options(preset, steps, seed, guidance_scale, negative_prompt)
        checked(lambda: service.text_steps(options))  # the operator's limit, before queueing
        session = visitor_id(request)
        note = RANDOM_NOTE if service.settings.random_weights else ""
        losses, last_sent, warning, line, glb, summary = [], 0.0, "", "Loading MVDream", None, None
        control = controls.start(session)
        try:
            with sessions.job(session) as cancel:
                job = text_job(service, sessions, session, checkpoint, prompt, options, control, cancel)
                async for event in visitor_job(job, cancel, "text_to_3d"):
                    progress(event.fraction, desc=event.message)
                    update = {}
                    if isinstance(event, StepReport):
                        if math.isfinite(event.loss):
                            losses.append((event.step, event.loss))
                        line = step_status(event, losses)
                    elif isinstance(event, Note):
                        warning = f"\n\n_{event.message[:1].upper()}{event.message[1:]}._"
                    elif isinstance(event, PreviewFile):
                        update[preview] = str(event.path)
                    elif isinstance(event, MeshFile):
                        glb = str(event.path)
                        update |= {mesh: glb, download: glb}  # the state fills the viewer (a page-only event)
                        if event.final:
                            line = end_status(event.result)
                            summary = text_summary(event.result, options, checkpoint, service.settings.random_weights)
                    elif isinstance(event, Finished):
                        continue
                    else:
                        line = event.message
                    now = time.monotonic()
                    if not update and now - last_sent < UI_INTERVAL_S:
                        continue
                    last_sent = now
                    yield {status: line + warning + note, plot: loss_table(losses), **update}
        finally:
            controls.finish(session, control)
        yield {status: line + warning + note, result: summary, **({download: glb} if glb else {})}

    return text_to_3d


def make_switch(controls: TextControls, switch: str):
    def press(request: gr.Request = None) -> str:
        control = controls.get(visitor_id(request))
        if control is None:
            return "No text-to-3D job is running."
        if not control.started.is_set():  # still waiting in line: nothing to export or keep yet
            if switch == "export":
                return "Your run is still waiting in line: nothing to export yet."
            control.stop.set()
            return "Your run had not started: it leaves the line."
        getattr(control, switch).set()
        return ("Stopping after this step; the state reached will be exported." if switch == "stop"
                else "Exporting the current state after this step.")

    return press


def show_mesh(glb: str | None) -> tuple:
    """The viewer shows the run's latest GLB, and the Export/Stop note it answers is cleared (a page-only event on
    the mesh state)."""
    return (gr.update(), gr.update()) if glb is None else (glb, "")


def make_quick_look_handler(service: ModelService, sessions: Sessions):
    async def quick_look(prompt, seed, checkpoint, request: gr.Request = None, progress=gr.Progress()):
        """Four views of what MVDream imagines for the prompt (plain multi-view DDIM sampling, no 3D), with its
        sampling script's settings (no negative prompt)."""
        prompt = checked(lambda: check_prompt(prompt))
        options = checked(lambda: QuickLookOptions(seed=seed).resolved(service.device))
        session = visitor_id(request)
        with sessions.job(session) as cancel:
            job = quick_look_job(service, sessions, session, checkpoint, prompt, options, cancel)
            return str(await job_result(job, cancel, "quick_look", progress))

    return quick_look


def build(service: ModelService, sessions: Sessions, controls: TextControls) -> None:
    """The tab's widgets and events (inside a ``gr.Tab``)."""
    gr.Markdown(intro(service))
    choices = service.mvdream_choices()
    if service.device.type == "cpu" and not service.settings.random_weights:
        gr.Markdown(CPU_NOTE, elem_id="text-cpu-note")
    with gr.Row():
        with gr.Column(scale=1):
            prompt = gr.Textbox(label="Prompt", placeholder="one object, e.g. a wooden rocking chair", lines=2,
                                elem_id="text-prompt")
            negative_prompt = gr.Textbox(TextTo3DOptions.negative_prompt, lines=2, elem_id="text-negative",
                                         label="Negative prompt (MVDream's reference one: edit it or clear it)")
            checkpoint = gr.Dropdown(choices, value=choices[0][1], label="MVDream checkpoint")
            preset = gr.Radio(list(TextTo3DOptions.PRESET_CHOICES), value=TextTo3DOptions.preset, label="Schedule",
                              info="; ".join(f"{name}: {text}" for name, text in PRESET_DESCRIPTIONS.items()) + ".",
                              elem_id="text-preset")
            steps = gr.Number(step=100, label=f"Steps for custom ({steps_limit(service)})", elem_id="text-steps",
                              **steps_field(TextTo3DOptions.preset, service))
            with gr.Row():
                seed = gr.Number(TextTo3DOptions.seed, step=1, label=f"Seed ({SEED.text})", elem_id="text-seed")
                guidance = gr.Number(TextTo3DOptions.guidance_scale, step=1, label=f"Guidance scale ({GUIDANCE.text})",
                                     elem_id="text-guidance")
            with gr.Row():
                look = gr.Button("Quick look (4 views)", elem_id="text-quick-look")
                generate = gr.Button("Generate 3D", variant="primary", elem_id="text-generate")
            with gr.Row():
                export = gr.Button("Export now", elem_id="text-export")
                stop = gr.Button("Stop & keep", variant="stop", elem_id="text-stop")
            switch_note = gr.Markdown(label="Message", elem_id="text-switch-note")
            gr.Examples([[example] for example in EXAMPLES], inputs=[prompt], label="Example prompts",
                        cache_examples=False)
        with gr.Column(scale=2):
            status = gr.Markdown(label="Status", elem_id="text-status")
            look_status = gr.Markdown(elem_id="text-quick-status")
            quick = gr.Image(label="Quick look: what the prior imagines (no 3D yet)", interactive=False,
                             type="filepath", height=180, elem_id="text-quick")
            preview = gr.Image(label="Optimisation: four views of the current 3D object", interactive=False,
                               type="filepath", height=180, elem_id="text-preview")
            plot = gr.LinePlot(loss_table([]), x="step", y="log10 loss", label="Loss (log10)", height=180,
                               elem_id="text-loss")  # typed from the start, so both axes are numeric
            model = viewer("3D model", 360, "text-viewer")
            download = gr.File(label="GLB", elem_id="text-download")
    export_panel.build(service, sessions, "text")
    mesh = gr.State(None)
    outputs = {"status": status, "preview": preview, "plot": plot, "download": download, "result": result_json(),
               "mesh": mesh}
    generate.click(make_handler(service, sessions, controls, outputs),
                   inputs=[prompt, negative_prompt, preset, steps, seed, guidance, checkpoint],
                   outputs=list(outputs.values()), show_progress_on=[preview], api_name="text_to_3d",
                   concurrency_id=LONG_RUNS, concurrency_limit=None)  # its own line, beside short jobs: sharing
    ui_only(mesh.change, show_mesh, inputs=[mesh], outputs=[model, switch_note])
    looking = look.click(make_quick_look_handler(service, sessions), inputs=[prompt, seed, checkpoint],
                         outputs=[quick], api_name="quick_look", concurrency_id=GPU_QUEUE, concurrency_limit=None)
    ui_only(look.click, lambda: QUICK_LOOK_STARTED, outputs=[look_status])
    ui_only(looking.success, lambda: QUICK_LOOK_DONE, outputs=[look_status])
    ui_only(preset.change, lambda name: gr.update(**steps_field(name, service)), inputs=[preset], outputs=[steps])
    # The switches answer at once, beside the running job, under the buttons (the step line stays in view)
    for button, switch in ((stop, "stop"), (export, "export")):
        button.click(make_switch(controls, switch), outputs=[switch_note], api_name=f"{switch}_text_to_3d",
                     concurrency_id=SWITCHES, concurrency_limit=None, show_progress="hidden")
