"""The web app (Gradio): the only part of recon3d that imports gradio. One module per tab maps the library's
events to widgets; :func:`build_app` composes the page, :func:`main` serves it (``python app.py``).

    python app.py [--port 7860] [--random-weights] [--device cuda] [--dtype float16] [--output-ttl 3600]
                  [--max-queue 16] [--max-long-queue 4] [--long-runs-per-visitor 1] [--max-text-steps N]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import gradio as gr
from gradio.utils import get_upload_folder

from ..devices import choose_device
from ..service import ModelService, ServiceSettings
from ..sessions import Sessions
from . import image_tab, samples_tab, text_tab
from .common import visitor_id

OUTPUTS_DIR = Path(get_upload_folder()) / "recon3d-outputs"  # inside Gradio's cache: served in place, not copied
OUTPUT_TTL_S = 3600.0  # files of callers without a browser session (gradio_client, REST) live this long
RANDOM_BANNER = ("### ⚠️ Random weights\nThis server runs **random-weight models** (`--random-weights`): the whole "
                 "path runs and the files are real, but the shapes mean nothing. Use it to test the app offline.")
OFFLINE_BANNER = ("**The Hugging Face Hub is unreachable**: only checkpoints already in the local cache can be used. "
                  "Download them elsewhere (`hf download REPO`) or run with `--random-weights`.")

PAGE_CSS = """
/* a phone (390 px): the three tabs fit in one row instead of two hiding behind "..." (Gradio measures the
   same buttons to decide what overflows) */
@media (max-width: 560px) {
  .tab-container button { padding: 0 6px !important; font-size: 13px !important; }
}
/* a long dropdown label ends in an ellipsis before the arrow instead of running under it */
.secondary-wrap input { text-overflow: ellipsis; overflow: hidden; margin-right: 22px; min-width: 0; }
.upload-note p { color: var(--error-text-color, #b91c1c); margin: 0; }
"""


def build_app(service: ModelService, sessions: Sessions) -> gr.Blocks:
    """The page: a header, one tab per method; leaving the page cancels the visitor's jobs and deletes their files."""
    with gr.Blocks(title="recon3d", delete_cache=(1800, 3600)) as demo:
        gr.Markdown("# recon3d\nA photo in, a 3D model out: spin it, then download the GLB.")
        if service.settings.random_weights:
            gr.Markdown(RANDOM_BANNER, elem_id="random-weights-banner")
        elif service.offline:
            gr.Markdown(OFFLINE_BANNER)
        with gr.Tab("Image to 3D"):
            image_tab.build(service, sessions)
        with gr.Tab("Stochastic samples"):
            samples_tab.build(service, sessions)
        with gr.Tab("Text to 3D"):
            text_tab.build(service, sessions, text_tab.TextControls())

        def end_session(request: gr.Request) -> None:
            """The visitor left: cancel their running job and delete their files."""
            sessions.end(visitor_id(request))

        demo.unload(end_session)
    return demo


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
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
    limits = parser.add_argument_group("limits of a public server (jobs over them are refused in one line)")
    limits.add_argument("--max-queue", type=positive, default=ServiceSettings.max_waiting, metavar="N",
                        help="short jobs (Image to 3D, samples, quick look) waiting at most (default: %(default)s)")
    limits.add_argument("--max-long-queue", type=positive, default=ServiceSettings.max_long_waiting, metavar="N",
                        help="Text to 3D runs waiting at most; one runs at a time (default: %(default)s)")
    limits.add_argument("--long-runs-per-visitor", type=positive, default=ServiceSettings.long_runs_per_visitor,
                        metavar="N", help="Text to 3D runs one visitor may have going or waiting (default: %(default)s)")
    limits.add_argument("--max-text-steps", type=positive, default=ServiceSettings.max_text_steps, metavar="N",
                        help="the most steps one Text to 3D run may take (default: the library's limit)")
    parser.add_argument("--output-ttl", type=float, default=OUTPUT_TTL_S, metavar="SECONDS",
                        help="remove a visitor's files this long after their last job (default: 3600)")
    return parser.parse_args(argv)


def requests_in_flight(args: argparse.Namespace) -> int:
    """Gradio's bound on requests in its queue: room for both lines full, the jobs running and their page-only
    events (a full line refuses in recon3d's own words before Gradio's bound is reached)."""
    return 4 * (args.max_queue + args.max_long_queue)


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def serve(args: argparse.Namespace, outputs: Path = OUTPUTS_DIR) -> tuple[gr.Blocks, Sessions, ModelService]:
    """The queued page for ``args``; visitors' files go under ``outputs`` (emptied first) and expire after
    ``--output-ttl`` (a janitor checks twice per TTL, at least every minute)."""
    device, dtype = choose_device(args.device, args.dtype)
    service = ModelService(ServiceSettings(random_weights=args.random_weights, device=device, dtype=dtype,
                                           dmv3d=args.dmv3d, mvdream=args.mvdream, max_waiting=args.max_queue,
                                           max_long_waiting=args.max_long_queue,
                                           long_runs_per_visitor=args.long_runs_per_visitor,
                                           max_text_steps=args.max_text_steps))
    sessions = Sessions(outputs, ttl_s=args.output_ttl)
    sessions.clear()  # files of an earlier run that no session knows any more
    sessions.start_janitor(every_s=min(60.0, args.output_ttl / 2))
    demo = build_app(service, sessions)
    # jobs wait in the library's lines (recon3d.sharing: in order, with their place and an estimate); Gradio's
    # queue only bounds the requests in flight
    demo.queue(max_size=requests_in_flight(args), default_concurrency_limit=1)
    return demo, sessions, service


def configure_logging() -> None:
    """recon3d's own lines (one per refused input, a traceback and a report id per bug) at INFO on stderr; other
    libraries stay at WARNING (Gradio's and httpx's request lines would bury them)."""
    import logging

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("recon3d")
    if not logger.handlers:
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    configure_logging()
    demo, sessions, _ = serve(args)
    ModelService.warm_up()
    demo.launch(server_name=args.host, server_port=args.port, show_error=True, css=PAGE_CSS)


__all__ = ["build_app", "main", "parse_args", "serve"]
