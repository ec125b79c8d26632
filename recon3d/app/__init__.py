"""The web app (Gradio): the only part of recon3d that imports gradio. One module per tab maps the library's
events to widgets; :func:`build_app` composes the page, :func:`main` serves it (``python app.py``).

    python app.py [--port 7860] [--random-weights] [--device cuda] [--dtype float16] [--output-ttl 3600]
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
    parser.add_argument("--max-queue", type=int, default=16, help="requests waiting at most")
    parser.add_argument("--output-ttl", type=float, default=OUTPUT_TTL_S, metavar="SECONDS",
                        help="remove a visitor's files this long after their last job (default: 3600)")
    return parser.parse_args(argv)


def serve(args: argparse.Namespace, outputs: Path = OUTPUTS_DIR) -> tuple[gr.Blocks, Sessions]:
    """The queued page for ``args``; visitors' files go under ``outputs`` (emptied first) and expire after
    ``--output-ttl`` (a janitor checks twice per TTL, at least every minute)."""
    device, dtype = choose_device(args.device, args.dtype)
    service = ModelService(ServiceSettings(random_weights=args.random_weights, device=device, dtype=dtype,
                                           dmv3d=args.dmv3d, mvdream=args.mvdream))
    sessions = Sessions(outputs, ttl_s=args.output_ttl)
    sessions.clear()  # files of an earlier run that no session knows any more
    sessions.start_janitor(every_s=min(60.0, args.output_ttl / 2))
    demo = build_app(service, sessions)
    demo.queue(max_size=args.max_queue, default_concurrency_limit=1)
    return demo, sessions


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
    demo, sessions = serve(args)
    ModelService.warm_up()
    demo.launch(server_name=args.host, server_port=args.port, show_error=True)


__all__ = ["build_app", "main", "parse_args", "serve"]
