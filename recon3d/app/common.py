"""What every tab shares: the upload widget (checked as it arrives, its refusal under it), who the visitor is, the
concurrency groups, page-only events, a job run in a worker thread with its failures turned into one line, form
numbers checked by the library's limits, an endpoint's named result, and the 3D viewer."""

from __future__ import annotations

import logging
import secrets
from pathlib import Path
from typing import AsyncIterator, Callable, Iterator, TypeVar

import gradio as gr

from ..errors import user_message
from ..images import ImageError, load_image
from ..pipelines.events import Event, Finished
from ..sessions import iterate_in_thread

log = logging.getLogger("recon3d.app")
ASSETS = Path(__file__).resolve().parents[2]  # the repository (examples/, bench/results/) when run from a clone
# (an installed recon3d has neither: its page then offers no example images and quotes no measured CPU cost)
EXAMPLES = sorted(str(p) for p in (ASSETS / "examples").glob("*.png"))
# Gradio's concurrency groups; jobs enter at once (no Gradio limit) and wait in recon3d.sharing's lines, which
# run one job on the device at a time, in order, and tell each its place
GPU_QUEUE = "gpu"  # the short jobs that use the device
LONG_RUNS = "long"  # Text to 3D runs: their own line; they share the device step by step
SWITCHES = "switches"  # buttons that answer at once, beside a running job (no limit)
VIEWER_BACKGROUND = (0.85, 0.85, 0.85, 1.0)
UPLOAD_FIRST = "Upload an image first (PNG, JPEG or WebP)."
T = TypeVar("T")


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
            raise refuse("Send the image as a file upload (gradio_client: handle_file), not as inline data.")
        return str(payload.path)


def examples(image: gr.Image) -> None:
    """The example images under ``image`` (when the repository's examples are at hand)."""
    if EXAMPLES:
        gr.Examples(EXAMPLES, inputs=[image], label="Examples (click one)")


def image_input(elem_id: str) -> UploadedImage:
    """The input image, with a line under it where a refused upload says why (the input is then emptied)."""
    image = UploadedImage(label="Input image", type="filepath", image_mode=None, sources=["upload", "clipboard"],
                          elem_id=elem_id)
    note = gr.Markdown(elem_id=f"{elem_id}-note", elem_classes=["upload-note"])
    ui_only(image.upload, check_upload, inputs=[image], outputs=[image, note])
    ui_only(image.clear, lambda: "", outputs=[note])
    return image


def check_upload(path: str | None) -> tuple:
    """An upload checked as it arrives (format, size, truncation: recon3d.images): a refused file empties the
    input and leaves its one-line reason under it; a good one clears the line."""
    if not path:
        return gr.update(), ""
    try:
        load_image(path)
    except ImageError as exc:
        message = user_message(exc)
        log.info("refused upload: %s", message)
        return None, f"⚠️ {message}"
    return gr.update(), ""


def viewer(label: str, height: int, elem_id: str, visible: bool | str = True) -> gr.Model3D:
    """A 3D viewer; ``visible="hidden"`` keeps one in the page unseen (``False`` would leave it without a canvas
    once shown, in Gradio 6.31)."""
    return gr.Model3D(label=label, clear_color=VIEWER_BACKGROUND, height=height, elem_id=elem_id, visible=visible)


def is_example(path: str) -> bool:
    """Whether ``path`` is one of the examples (Gradio's cached copies keep their name): shared by all visitors,
    so never deleted with one of them."""
    same_name = [Path(example) for example in EXAMPLES if Path(example).name == Path(path).name]
    return any(example.read_bytes() == Path(path).read_bytes() for example in same_name)


def visitor_id(request: gr.Request | None) -> str:
    return request.session_hash if request is not None and request.session_hash else "anonymous"


def ui_only(listener, fn: Callable, inputs=None, outputs=None, **kwargs):
    """A page-only event (the API neither shows nor serves it) that answers at once, beside running jobs: it
    fills widgets from a job's result, or switches a field. ``listener`` is e.g. ``button.click``."""
    return listener(fn, inputs=inputs, outputs=outputs, api_visibility="private", concurrency_id=SWITCHES,
                    concurrency_limit=None, show_progress="hidden", **kwargs)


def result_json(label: str = "Result") -> gr.JSON:
    """An endpoint's named result (files are separate outputs): for API callers, not shown on the page."""
    return gr.JSON(label=label, visible=False)


def refuse(message: str) -> gr.Error:
    """The page's one-line refusal of a bad input or setting (``raise refuse(...)``): one log line with the reason
    and no traceback, which the log keeps for bugs."""
    log.info("refused: %s", message)
    return gr.Error(message, print_exception=False)


def checked(make: Callable[[], T]) -> T:
    """``make()``, with a ValueError of the library's checks (ranges, seeds, presets) shown as the UI's one-line
    error: the page states no rule of its own."""
    try:
        return make()
    except ValueError as exc:
        raise refuse(user_message(exc)) from None


async def visitor_job(job: Iterator[Event], cancel, name: str) -> AsyncIterator[Event]:
    """A visitor's job run in a worker thread, its events passed on; whatever goes wrong reaches the visitor as
    one line (an unexpected error's traceback goes to the log), and the app keeps serving."""
    try:
        async for event in iterate_in_thread(job, cancel):
            yield event
    except Exception as exc:
        message = user_message(exc)
        if message is not None:
            raise refuse(message) from None
        report = secrets.token_hex(3)  # the visitor quotes it; the log's traceback carries it
        log.exception("%s failed (report %s)", name, report)
        raise gr.Error(f"Unexpected error ({type(exc).__name__}, report {report}); the server log has the "
                       f"details.", print_exception=False) from None


async def job_result(job: Iterator[Event], cancel, name: str, progress: Callable) -> object:
    """Run a visitor's job to its end, its progress shown on ``progress`` (gr.Progress); its result."""
    result = None
    async for event in visitor_job(job, cancel, name):
        progress(event.fraction, desc=event.message)
        if isinstance(event, Finished):
            result = event.result
    return result
