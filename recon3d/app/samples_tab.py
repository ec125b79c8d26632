"""The Stochastic samples tab: several plausible objects for one photo, one per seed, side by side, from
Zero123++ -> InstantMesh (public weights) or recon3d's DMV3D."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from ..checkpoints import INSTANTMESH_LICENCE, ZERO123PLUS_LICENCE
from ..images import FOREGROUND_RATIO
from ..options import limit_of
from ..pipelines.events import Finished
from ..pipelines.multiview_sample import MultiViewOptions
from ..pipelines.sample_3d import COUNT, DEFAULT_COUNT, MAX_SEEDS, SampleOptions, seeds_to_add
from ..service import (RANDOM_DMV3D_CHOICES, RANDOM_INSTANTMESH, ModelService, PreviewFile, SampleShown,
                       ShownSample, file_digest, sample_job, seconds_table)
from ..sessions import Sessions
from . import export_panel
from .common import (GPU_QUEUE, UPLOAD_FIRST, checked, examples, image_input, is_example, refuse, result_json,
                     ui_only, viewer, visitor_id, visitor_job)

RANDOM_NOTE = "\n\n**Random weights: these samples are meaningless.**"
CANCELLED = "**Cancelled.** Samples that were finished stay below; the others were not made."


def intro(service: ModelService) -> str:
    dmv3d_is_random = service.dmv3d_choices()[0][1] in RANDOM_DMV3D_CHOICES
    return ("A photo does not fix the back of an object, so each seed gives another plausible one.\n\n"
            "- **Zero123++ v1.2 -> InstantMesh** (public weights): Zero123++ (Shi et al. 2023) imagines six views of "
            "the photo for each seed (shown under each sample) and InstantMesh's NeRF reconstructor (Xu et al. 2024) "
            f"turns them into a 3D model. Licences: Zero123++ weights {ZERO123PLUS_LICENCE}; InstantMesh "
            f"{INSTANTMESH_LICENCE}.\n"
            "- **DMV3D** (Xu et al., ICLR 2024): every denoising step is itself a 3D model. No public DMV3D weights "
            "exist: " + ("**no DMV3D checkpoint is installed, so it runs random weights** (meaningless shapes)."
                         if dmv3d_is_random else
                         "the model offered was **trained on procedural shapes only** (boxes, spheres, cylinders, "
                         "cones, tori) by recon3d, from 32-pixel images, so expect such shapes."))


def options_class(checkpoint: str) -> type[SampleOptions] | type[MultiViewOptions]:
    return ModelService.sample_options(checkpoint)


def form_options(service: ModelService, checkpoint, count, seeds_text, steps, remove_background, foreground_ratio,
                 shown: list[ShownSample], adding: bool) -> SampleOptions | MultiViewOptions:
    """The form's values as the chosen model's sampler options for new samples next to ``shown``, checked by the
    library (the mesh resolution is the server device's default)."""
    def make() -> SampleOptions | MultiViewOptions:
        options = options_class(checkpoint)(seeds=[0], steps=steps, remove_background=bool(remove_background),
                                            foreground_ratio=foreground_ratio).resolved(service.device)
        options.seeds = seeds_to_add(count, seeds_text, [sample.seed for sample in shown], adding)
        return options.validate()

    return checked(make)


def model_defaults(checkpoint: str) -> tuple[dict, dict]:
    """The steps and foreground ratio fields for the chosen model: its own defaults and ranges."""
    options = options_class(checkpoint)
    steps = limit_of(options, "steps")
    return (gr.update(value=options.steps, label=f"Denoising steps ({steps.text})"),
            gr.update(value=options.foreground_ratio))


def samples_to_keep(shown: list[ShownSample], checkpoint: str, image_path: str) -> tuple[list[ShownSample], str]:
    """The samples "More samples" adds to: those whose files still exist (outputs expire), and a note when some
    expired. Samples of another checkpoint or image cannot share a comparison: refused with a message."""
    kept = [sample for sample in shown if Path(sample.glb).is_file()]
    note = f" ({len(shown) - len(kept)} earlier samples had expired)" if len(kept) < len(shown) else ""
    if kept and (kept[0].checkpoint != checkpoint or kept[0].image != file_digest(image_path)):
        raise refuse("More samples adds to samples of the same image and checkpoint: press Generate to start over.")
    return kept, note


class SampleSlots:
    """The page's places for samples, side by side, each appearing when its sample is done: a seed line, a 3D
    viewer, the sample's generated views and its GLB. A slot's parts wait with ``visible="hidden"`` (in the page,
    not shown): a gr.Model3D that starts with ``visible=False`` never gets its canvas in Gradio 6.31, one kept
    "hidden" does (checked in a real browser; a hidden Column does not hide its children). The slots are filled
    by a page-only event from the samples state, so the API's result stays the samples, not the page's layout."""

    def __init__(self, count: int, per_row: int = 4):
        self.captions, self.viewers, self.files, self.views = [], [], [], []
        self.on_page = gr.State([])  # the GLBs the slots show now
        for first in range(0, count, per_row):
            with gr.Row(equal_height=True):
                for index in range(first, min(first + per_row, count)):
                    with gr.Column(min_width=200):
                        self.captions.append(gr.Markdown(elem_id=f"sample-caption-{index}", visible="hidden"))
                        self.viewers.append(viewer(f"Sample {index + 1}", 240, f"sample-{index}", visible="hidden"))
                        self.views.append(gr.Image(visible="hidden", label="Its generated views", type="filepath",
                                                   interactive=False, height=240, elem_id=f"sample-views-{index}"))
                        self.files.append(gr.File(label="GLB", elem_id=f"sample-file-{index}", visible="hidden"))

    @property
    def components(self) -> list:
        return [*self.captions, *self.viewers, *self.files, *self.views]

    def show(self, index: int, sample: ShownSample) -> dict:
        text = f"**Seed {sample.seed}**" + (" · random weights" if sample.random_weights else "")
        text += f"  \n_{sample.note}_" if sample.note else ""
        views = (gr.update(value=str(sample.views), visible=True) if sample.views
                 else gr.update(value=None, visible="hidden"))
        return {self.captions[index]: gr.update(value=text, visible=True),
                self.viewers[index]: gr.update(value=str(sample.glb), visible=True),
                self.files[index]: gr.update(value=str(sample.glb), visible=True), self.views[index]: views}

    def hide(self, index: int) -> dict:
        return {part[index]: gr.update(value=None if part is not self.captions else "", visible="hidden")
                for part in (self.captions, self.viewers, self.files, self.views)}

    def fill(self, samples: list[ShownSample] | None, on_page: list[str] | None) -> dict:
        """Show ``samples`` in order and hide the slots after them; slots that already show their sample are left
        as they are (a viewer that is sent its file again reloads it). ``on_page``: the GLBs shown now."""
        samples, on_page = list(samples or []), list(on_page or [])
        wanted = [str(sample.glb) for sample in samples]
        updates: dict = {}
        for index in range(len(self.viewers)):
            now = on_page[index] if index < len(on_page) else None
            if index < len(samples) and wanted[index] != now:
                updates |= self.show(index, samples[index])
            elif index >= len(samples) and now is not None:
                updates |= self.hide(index)
        return updates | {self.on_page: wanted}

    def wire(self, state: gr.State) -> None:
        """Fill the slots whenever the samples ``state`` changes (a page-only event)."""
        ui_only(state.change, lambda samples, on_page: self.fill(samples, on_page), inputs=[state, self.on_page],
                outputs=[self.on_page, *self.components])


def make_handler(service: ModelService, sessions: Sessions, outputs: dict, adding: bool):
    """Generate (``adding=False``: start over) or More samples (add to those shown). Streams the x0 preview at
    every step and each sample as it finishes (into the samples state, which fills the page's slots); the last
    update adds the comparison image and the result."""
    status, preview, comparison, all_files, all_views, result, state = (outputs[k] for k in (
        "status", "preview", "comparison", "files", "views", "result", "state"))

    async def sample_3d(image_path, checkpoint, count, seeds_text, steps, remove_background, foreground_ratio,
                        shown=None, request: gr.Request = None, progress=gr.Progress()):
        """Several plausible 3D objects from one image, one per seed. Streams the status, the denoising preview,
        the GLBs and the generated views so far; ends with the comparison image and the result (checkpoint,
        seeds, steps, seconds per stage, notes)."""
        if not image_path:
            raise refuse(UPLOAD_FIRST)
        shown, expired = samples_to_keep(list(shown or []), checkpoint, image_path) if adding else ([], "")
        options = form_options(service, checkpoint, count, seeds_text, steps, remove_background, foreground_ratio,
                               shown, adding)
        session = visitor_id(request)
        if not is_example(image_path):
            sessions.adopt(session, image_path)
        label = RANDOM_NOTE if checkpoint in (*RANDOM_DMV3D_CHOICES, RANDOM_INSTANTMESH) else ""
        samples, outcome, last_preview = list(shown), None, None
        files = lambda: [str(sample.glb) for sample in samples] or None  # noqa: E731
        views = lambda: [str(sample.views) for sample in samples if sample.views] or None  # noqa: E731
        yield {status: f"Sampling seeds {', '.join(map(str, options.seeds))}{expired}" + label, state: samples,
               all_files: files(), all_views: views(), comparison: None, result: None}  # nothing stale
        with sessions.job(session) as cancel:
            job = sample_job(service, sessions, session, checkpoint, image_path, options, shown, cancel)
            async for event in visitor_job(job, cancel, "sample_3d"):
                progress(event.fraction, desc=event.message)
                update = {status: event.message + expired + label}
                if isinstance(event, PreviewFile):
                    update[preview] = last_preview = str(event.path)
                elif isinstance(event, SampleShown):
                    samples.append(event.sample)
                    update |= {state: list(samples), all_files: files(), all_views: views()}
                elif isinstance(event, Finished):
                    outcome = event.result
                yield update
        seeds = ", ".join(str(sample.seed) for sample in samples)
        yield {status: f"{len(samples)} samples (seeds {seeds}): the same seed and settings give the same "
                       f"object again{expired}." + label,
               comparison: str(outcome.comparison), all_files: files(), all_views: views(), preview: last_preview,
               result: samples_summary(checkpoint, options, samples, outcome.seconds)}

    return sample_3d


def samples_summary(checkpoint: str, options, samples: list[ShownSample], seconds: dict[str, float]) -> dict:
    """The result of a samples job for API callers (the GLBs and views are sent beside it, in seed order)."""
    return {"checkpoint": checkpoint, "seeds": [sample.seed for sample in samples], "steps": options.steps,
            "notes": {str(sample.seed): sample.note for sample in samples if sample.note},
            "seconds": seconds_table(seconds), "random_weights": any(sample.random_weights for sample in samples)}


def build(service: ModelService, sessions: Sessions) -> None:
    """The tab's widgets and events (inside a ``gr.Tab``)."""
    gr.Markdown(intro(service))
    choices = service.sample_choices()
    first = options_class(choices[0][1])
    with gr.Row():
        with gr.Column(scale=1):
            image = image_input("samples-image")
            checkpoint = gr.Dropdown(choices, value=choices[0][1], label="Model", elem_id="samples-model")
            count = gr.Slider(int(COUNT.low), int(COUNT.high), value=DEFAULT_COUNT, step=1,
                              label=f"Number of samples ({COUNT.text})", elem_id="samples-count")
            seeds = gr.Textbox(label="Seeds (optional)", placeholder="e.g. 1, 7, 42; empty: new random seeds",
                               info="A list overrides the number of samples; a seed gives the same sample again.",
                               elem_id="samples-seeds")
            steps = gr.Number(first.steps, step=1, label=f"Denoising steps ({limit_of(first, 'steps').text})",
                              elem_id="samples-steps")
            remove_background = gr.Checkbox(first.remove_background,
                                            label="Remove background (when the image has no transparency)")
            foreground_ratio = gr.Number(first.foreground_ratio, step=0.05,
                                         label=f"Foreground ratio ({FOREGROUND_RATIO.text})")
            with gr.Row():
                generate = gr.Button("Generate", variant="primary", elem_id="samples-generate")
                more = gr.Button("More samples", elem_id="samples-more")
                cancel = gr.Button("Cancel", variant="stop", elem_id="samples-cancel")
            examples(image)
        with gr.Column(scale=2):
            status = gr.Markdown(label="Status", elem_id="samples-status")
            with gr.Row():
                preview = gr.Image(label="Denoising: each sample as it is now (rows: samples, columns: views)",
                                   interactive=False, type="filepath", height=200, elem_id="samples-preview")
                comparison = gr.Image(label="Comparison: every sample from the same angles", interactive=False,
                                      type="filepath", height=200, elem_id="samples-comparison")
            files = gr.File(label="GLBs", file_count="multiple", elem_id="samples-files")
            views = gr.File(label="Generated views", file_count="multiple", visible=False)  # each slot shows its own
    export_panel.build(service, sessions, "samples")
    slots = SampleSlots(MAX_SEEDS)  # each a 3D viewer: browsers cap WebGL contexts
    state = gr.State([])
    slots.wire(state)
    outputs = {"status": status, "preview": preview, "comparison": comparison, "files": files, "views": views,
               "result": result_json(), "state": state}
    inputs = [image, checkpoint, count, seeds, steps, remove_background, foreground_ratio, state]
    events = []
    for button, adding, api_name in ((generate, False, "sample_3d"), (more, True, "more_samples")):
        events.append(button.click(make_handler(service, sessions, outputs, adding), inputs=inputs,
                                   outputs=list(outputs.values()), show_progress_on=[comparison], api_name=api_name,
                                   concurrency_id=GPU_QUEUE, concurrency_limit=None))  # the line: recon3d.sharing
    ui_only(cancel.click, lambda: CANCELLED, outputs=[status], cancels=events)
    ui_only(checkpoint.change, model_defaults, inputs=[checkpoint], outputs=[steps, foreground_ratio])
