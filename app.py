"""recon3d web app (Gradio). UI only: tabs, inputs and wiring; the work is done by recon3d's pipelines.

    python app.py [--port 7860] [--random-weights] [--device cuda] [--dtype float16]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import gradio as gr
import torch

from recon3d.checkpoints import DEFAULT_LRM, OPENLRM_LICENCE
from recon3d.devices import choose_device
from recon3d.hub import CheckpointError
from recon3d.images import ImageError
from recon3d.mesh import MAX_RESOLUTION, MIN_RESOLUTION, EmptyMeshError
from recon3d.pipelines.image_to_3d import ImageTo3DOptions
from recon3d.service import ModelService, ServiceSettings

try:  # ZeroGPU on Hugging Face Spaces; off Spaces the decorator returns the function unchanged
    import spaces

    gpu_task = spaces.GPU(duration=60)
except ImportError:
    def gpu_task(fn):
        return fn

HERE = Path(__file__).parent
EXAMPLES = sorted(str(p) for p in (HERE / "examples").glob("*.png"))
SESSIONS_DIR = Path(tempfile.gettempdir()) / "recon3d-sessions"
FLOATER_FRACTION = 0.05  # "remove floaters" drops parts under 5% of the largest one
GPU_QUEUE = "gpu"  # every event that uses the model shares this concurrency group
RANDOM_BANNER = ("### ⚠️ Random weights\nThis server runs **random-weight models** (`--random-weights`): the whole "
                 "path runs and the files are real, but the shapes mean nothing. Use it to test the app offline.")


def session_dir(request: gr.Request | None) -> Path:
    folder = SESSIONS_DIR / (request.session_hash if request and request.session_hash else "anonymous")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def remove_session_dir(request: gr.Request) -> None:
    shutil.rmtree(SESSIONS_DIR / request.session_hash, ignore_errors=True)


def timings_table(result) -> str:
    rows = "\n".join(f"| {stage.replace('_', ' ')} | {seconds:.3f} |" for stage, seconds in result.timings.items())
    total = sum(result.timings.values())
    stats = result.stats
    return (f"| stage | seconds |\n|---|---|\n{rows}\n| **total** | **{total:.3f}** |\n\n"
            f"{stats['faces']:,} triangles, {stats['vertices']:,} vertices; the field was queried at "
            f"{stats['field_queries']:,} points (a dense grid: {stats['dense_queries']:,})")


def make_image_to_3d_handler(service: ModelService):
    @gpu_task
    def image_to_3d(image_path, checkpoint, remove_background, foreground_ratio, mesh_resolution,
                    remove_floaters=True, request: gr.Request = None, progress=gr.Progress()):
        """Reconstruct a textured mesh from one image. Returns the processed input, the GLB (viewer and file)
        and a table of stage timings."""
        if not image_path:
            raise gr.Error("Upload an image first (PNG, JPEG or WebP).")
        options = ImageTo3DOptions(foreground_ratio=float(foreground_ratio), mesh_resolution=int(mesh_resolution),
                                   remove_background=bool(remove_background),
                                   remove_floaters=FLOATER_FRACTION if remove_floaters else 0.0)
        try:
            pipe = service.image_to_3d(checkpoint)
            result = None
            for event in pipe.run(image_path, options):
                progress(event.fraction, desc=event.message)
                result = event.result or result
        except (CheckpointError, ImageError, EmptyMeshError, ValueError) as exc:
            raise gr.Error(str(exc)) from None
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            raise gr.Error("Out of GPU memory: try a lower mesh resolution or a smaller checkpoint.") from None
        glb = result.save_glb(session_dir(request) / f"{Path(image_path).stem}-{int(time.time() * 1000)}.glb")
        notes = "".join(f"\n\n> {note}" for note in result.notes)
        label = "\n\n**Random weights: this mesh is meaningless.**" if pipe.random_weights else ""
        return result.processed_image, str(glb), str(glb), timings_table(result) + notes + label

    return image_to_3d


def build_image_tab(service: ModelService) -> None:
    choices = service.lrm_choices()
    default = DEFAULT_LRM if any(v == DEFAULT_LRM for _, v in choices) else choices[0][1]
    with gr.Row():
        with gr.Column():
            image = gr.Image(label="Input image", type="filepath", image_mode=None, sources=["upload", "clipboard"],
                             elem_id="input-image")
            checkpoint = gr.Dropdown(choices, value=default, label="Checkpoint")
            remove_background = gr.Checkbox(True, label="Remove background (when the image has no transparency)")
            foreground_ratio = gr.Slider(0.5, 1.0, value=0.8, step=0.05, label="Foreground ratio")
            mesh_resolution = gr.Slider(MIN_RESOLUTION, MAX_RESOLUTION, value=256, step=32, label="Mesh resolution")
            remove_floaters = gr.Checkbox(True, label="Remove floaters (small detached parts)")
            generate = gr.Button("Generate", variant="primary", elem_id="generate")
            gr.Examples(EXAMPLES, inputs=[image], label="Examples (click one)")
        with gr.Column():
            processed = gr.Image(label="Processed input", interactive=False, height=200)
            viewer = gr.Model3D(label="3D model", clear_color=(0.85, 0.85, 0.85, 1.0), height=420, elem_id="viewer")
            download = gr.File(label="Download GLB", elem_id="download")
            timings = gr.Markdown(elem_id="timings")
    generate.click(make_image_to_3d_handler(service),
                   inputs=[image, checkpoint, remove_background, foreground_ratio, mesh_resolution, remove_floaters],
                   outputs=[processed, viewer, download, timings],
                   api_name="image_to_3d", concurrency_id=GPU_QUEUE, concurrency_limit=1)


def build_app(service: ModelService) -> gr.Blocks:
    with gr.Blocks(title="recon3d", delete_cache=(1800, 3600)) as demo:
        gr.Markdown("# recon3d\nA photo in, a 3D model out: spin it, then download the GLB.")
        if service.settings.random_weights:
            gr.Markdown(RANDOM_BANNER, elem_id="random-weights-banner")
        elif service.offline:
            gr.Markdown("**The Hugging Face Hub is unreachable**: only checkpoints already in the local cache can "
                        "be used. Download them elsewhere (`hf download REPO`) or run with `--random-weights`.")
        with gr.Tab("Image to 3D"):
            gr.Markdown(f"LRM (Hong et al., ICLR 2024) with the OpenLRM v1.1 weights, licensed **{OPENLRM_LICENCE}**.")
            build_image_tab(service)
        demo.unload(remove_session_dir)
    return demo


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="recon3d web app")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--random-weights", action="store_true",
                        default=os.environ.get("RECON3D_RANDOM_WEIGHTS", "") not in ("", "0", "false"))
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--max-queue", type=int, default=16, help="requests waiting at most")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    device, dtype = choose_device(args.device, args.dtype)
    service = ModelService(ServiceSettings(random_weights=args.random_weights, device=device, dtype=dtype))
    service.warm_up()
    demo = build_app(service)
    demo.queue(max_size=args.max_queue, default_concurrency_limit=1)
    demo.launch(server_name=args.host, server_port=args.port, allowed_paths=[str(SESSIONS_DIR)],
                show_error=True)


if __name__ == "__main__":
    main()
