"""Benchmark the batched renderer: B objects x V views, forward and forward + backward, rays per second and memory.

Run from the repository root::

    PYTHONPATH=. python bench/render.py                                   # B=1 x V=2 at 64, 128, 256 px on CPU
    PYTHONPATH=. python bench/render.py --batch 4 --views 4 --device cuda  # DMV3D-sized batches on a GPU
    PYTHONPATH=. python bench/render.py --quick                           # 32 px: a smoke test

The field is a triplane of the published small LRM layout (32 channels, 64x64 planes, the 3C -> 64 -> 64 -> 64 -> 4
decoder) with random weights, rendered with the small checkpoint's 48 + 48 samples per ray from cameras of
:func:`~recon3d.cameras.sample_orbit_cameras`; the backward pass takes the gradient of the mean colour with
respect to the planes and the decoder. Each setting runs in its own process after a warm-up at 32 px, so the
peak memory is that setting's: CUDA ``max_memory_allocated``, or on CPU the peak resident set size of the process
(+MiB: over the resident size before rendering). Results go to a table and ``bench/results/render-<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from lrm import REPO, MemoryMeter, _mib, format_table, machine_info, write_report  # bench/lrm.py: same reports

MODES = ("forward", "forward+backward")
SMALL_LAYOUT = {"channels": 32, "plane_size": 64, "coarse_samples": 48, "fine_samples": 48}


def make_field(batch: int, device: torch.device, dtype: torch.dtype, requires_grad: bool):
    """B random objects in the small LRM layout as a TriplaneField, and the parameters a backward pass reaches."""
    from recon3d.field import TriplaneField, sample_triplane
    from recon3d.models.lrm import PlaneDecoder

    generator = torch.Generator().manual_seed(0)
    c, size = SMALL_LAYOUT["channels"], SMALL_LAYOUT["plane_size"]
    planes = torch.randn(batch, 3, c, size, size, generator=generator).to(device, dtype).requires_grad_(requires_grad)
    decoder = PlaneDecoder(3 * c)
    with torch.no_grad():
        for param in decoder.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) / max(1, param.shape[-1]) ** 0.5)
    decoder = decoder.to(device, dtype).requires_grad_(requires_grad)
    field = TriplaneField(planes, lambda p, points: decoder(sample_triplane(p, points)), iso_level=3.0)
    return field, [planes, *decoder.parameters()]


def render_once(setting: dict, size: int) -> float:
    """One render (and backward) of the setting at ``size`` px; seconds, synchronised."""
    from recon3d.cameras import sample_orbit_cameras
    from recon3d.pipelines.progress import synchronize
    from recon3d.render import RenderSettings, render_views

    device, backward = torch.device(setting["device"]), setting["mode"] == "forward+backward"
    field, params = make_field(setting["batch"], device, getattr(torch, setting["dtype"]), backward)
    cams = sample_orbit_cameras(setting["batch"], setting["views"], torch.Generator().manual_seed(1), device=device)
    settings = RenderSettings(coarse_samples=SMALL_LAYOUT["coarse_samples"], fine_samples=SMALL_LAYOUT["fine_samples"],
                              chunk_rays=setting["chunk_rays"])
    generators = [torch.Generator(device=device).manual_seed(k) for k in range(setting["batch"])]
    synchronize(device)
    start = time.perf_counter()
    with torch.set_grad_enabled(backward):
        out = render_views(field, cams.c2w, cams.intrinsics, size, size, settings, generators)
        if backward:
            out["rgb"].mean().backward()
    synchronize(device)
    seconds = time.perf_counter() - start
    if backward and not all(p.grad is not None and torch.isfinite(p.grad).all() for p in params):
        raise RuntimeError("the backward pass left a parameter without a finite gradient")
    return seconds


def worker(setting: dict) -> dict:
    """Runs in a child process: warm-up at 32 px, then the measured render with its peak memory."""
    if setting.get("threads"):
        torch.set_num_threads(setting["threads"])
    render_once(setting, 32)
    with MemoryMeter(torch.device(setting["device"])) as meter:
        seconds = render_once(setting, setting["size"])
    rays = setting["batch"] * setting["views"] * setting["size"] ** 2
    return dict(setting, seconds=seconds, rays=rays, rays_per_second=rays / seconds, memory=meter.result)


def run_setting(setting: dict) -> dict:
    """A setting in a fresh process, so its peak memory is its own."""
    command = [sys.executable, __file__, "--worker", json.dumps(setting)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        return dict(setting, status="failed", error=done.stderr.strip().splitlines()[-1:] or ["?"])
    return dict(json.loads(done.stdout.strip().splitlines()[-1]), status="ok")


def table(records: list[dict]) -> str:
    headers = ["B x V", "px", "mode", "rays", "seconds", "rays/s", "peak MiB", "+MiB"]
    rows = []
    for r in records:
        key = [f"{r['batch']} x {r['views']}", r["size"], r["mode"]]
        if r["status"] != "ok":
            rows.append(key + [r["status"]] + [None] * 4)
            continue
        memory = r["memory"]
        peak = memory["peak_mib"] if memory["peak_mib"] is not None else memory["process_peak_mib"]
        rows.append(key + [r["rays"], r["seconds"], round(r["rays_per_second"]), _mib(peak),
                           _mib(memory["increase_mib"])])
    return format_table(headers, rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1, help="objects B")
    parser.add_argument("--views", type=int, default=2, help="views V per object")
    parser.add_argument("--sizes", default="64,128,256", help="comma-separated image sizes in pixels")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--chunk-rays", type=int, default=None, help="rays per object per chunk (default: 8192 "
                        "on a GPU, 1024 on CPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", default=None, help="default: bench/results/render-<device>.json")
    parser.add_argument("--quick", action="store_true", help="32 px only: a smoke test")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return None
    device = torch.device(args.device)
    sizes = [32] if args.quick else [int(s) for s in args.sizes.split(",") if s.strip()]
    chunk = args.chunk_rays or (8192 if device.type == "cuda" else 1024)
    info = machine_info()
    print(f"Machine: {info['cpu']} ({info['cpu_count']} CPUs), torch {info['torch']}, "
          f"GPU {info['gpu']['name'] if info['gpu'] else 'none'}; rendering on {device.type}", flush=True)
    records = []
    for size in sizes:
        for mode in MODES:
            setting = {"batch": args.batch, "views": args.views, "size": size, "mode": mode, "device": args.device,
                       "dtype": args.dtype, "chunk_rays": chunk, "threads": args.threads, **SMALL_LAYOUT}
            records.append(run_setting(setting))
            print(f"  {size} px {mode}: {records[-1].get('seconds', records[-1]['status'])}", flush=True)
    print(f"\nRendering {args.batch} objects x {args.views} views, small LRM layout, 48 + 48 samples per ray, "
          f"{args.dtype}, {chunk} rays per object per chunk\n(peak MiB: CUDA max allocated, or CPU peak RSS of the "
          f"process; +MiB: over the start of the render)")
    print(table(records))
    report = {"machine": info, "args": vars(args), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "runs": records}
    suffix = "-quick" if args.quick else ""
    write_report(Path(args.json) if args.json else REPO / "bench" / "results" / f"render-{device.type}{suffix}.json",
                 report)
    return report


if __name__ == "__main__":
    main()
