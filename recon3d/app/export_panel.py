"""Every tab's Export panel: the result made again as other files (a face budget, a baked texture, OBJ/PLY/STL)
from what the server kept of it (planes or field, and the mesh), without re-running the model."""

from __future__ import annotations

import gradio as gr

from ..export import FACES, FORMATS, TEXTURE, ExportOptions
from ..service import ModelService, export_job
from ..sessions import Sessions
from .common import GPU_QUEUE, checked, job_result, ui_only, visitor_id

TEXTURE_CHOICES = [("off: vertex colours", 0), ("512", 512), ("1024", 1024), ("2048", 2048)]
CANCELLED = "**Cancelled.** No files were made."


def export_options(faces, texture, formats) -> ExportOptions:
    """The panel's values as the library's export options (refused in one line, never clamped)."""
    texture = None if texture in (None, "", 0, "0") else texture
    return checked(lambda: ExportOptions(formats=tuple(formats or ()), faces=None if faces in (None, "") else faces,
                                         texture=texture).validate())


def make_handler(service: ModelService, sessions: Sessions, tab: str):
    async def export(faces, texture, formats, request: gr.Request = None, progress=gr.Progress()):
        """Export this tab's results again: at most ``faces`` triangles (empty: as meshed), a baked texture of
        ``texture``^2 texels (0: vertex colours), in ``formats`` (glb, obj, ply, stl; an OBJ comes as a ZIP with
        its MTL and PNG). Returns the files and a message."""
        options = export_options(faces, texture, formats)
        session = visitor_id(request)
        with sessions.job(session) as cancel:
            job = export_job(service, sessions, session, tab, options, cancel)
            files = await job_result(job, cancel, f"export_{tab}", progress)
        shape = f"at most {options.faces:,} faces" if options.faces else "faces as meshed"
        colour = f"a {options.texture}x{options.texture} texture" if options.texture else "vertex colours"
        return [str(path) for path in files], f"{len(files)} files: {shape}, {colour}."

    return export


def build(service: ModelService, sessions: Sessions, tab: str) -> None:
    """The panel (inside a tab, under its results); its endpoint is ``/export_<tab>``."""
    with gr.Accordion("Export: face budget, texture, OBJ / PLY / STL", open=False, elem_id=f"export-{tab}"):
        with gr.Row():
            faces = gr.Number(None, precision=0, label=f"Face budget ({FACES.text}; empty: as meshed)",
                              elem_id=f"export-{tab}-faces")
            texture = gr.Dropdown(TEXTURE_CHOICES, value=0, allow_custom_value=True, elem_id=f"export-{tab}-texture",
                                  label=f"Baked texture (texels a side, {TEXTURE.text})")
            formats = gr.CheckboxGroup(list(FORMATS), value=["glb"], label="Formats (OBJ: a ZIP with its MTL and PNG)",
                                       elem_id=f"export-{tab}-formats")
        with gr.Row():
            go = gr.Button("Export", elem_id=f"export-{tab}-go")
            stop = gr.Button("Cancel export", variant="stop", elem_id=f"export-{tab}-cancel")
        message = gr.Markdown(label="Message", elem_id=f"export-{tab}-message")
        files = gr.File(label="Exported files", file_count="multiple", elem_id=f"export-{tab}-files")
    job = go.click(make_handler(service, sessions, tab), inputs=[faces, texture, formats], outputs=[files, message],
                   api_name=f"export_{tab}", concurrency_id=GPU_QUEUE, concurrency_limit=None)  # the short jobs' line
    ui_only(stop.click, lambda: CANCELLED, outputs=[message], cancels=[job])
