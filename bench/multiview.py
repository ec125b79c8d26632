"""Benchmark Zero123++ v1.2 -> InstantMesh (``recon3d.MultiViewSample3D``): seconds per diffusion step, per
decode, per reconstruction, per loop step (decode, reconstruct, render the six views, encode) and per mesh, and
peak memory, with the published sizes and random weights; on a GPU with the real weights in the Hub cache, the
loop's effect on 3D consistency.

Run from the repository root::

    PYTHONPATH=. python bench/multiview.py                                  # CPU, published sizes (minutes)
    PYTHONPATH=. python bench/multiview.py --device cuda --dtype bfloat16   # a GPU: also the 30 s target verdict
    PYTHONPATH=. python bench/multiview.py --device cuda --real             # + the loop's effect (real weights)
    PYTHONPATH=. python bench/multiview.py --quick                          # tiny random models: a smoke test

What it runs: the duck example (no background removal) through ``denoise`` for ``--seeds`` seeds together, timing
``--steps`` steps after one warm-up step (on a CPU the published UNet takes tens of seconds a step: 1 step there),
then the decode of the six views, the InstantNeRF reconstruction, one loop step, and one mesh per seed
(``--mesh-resolution``). The projection of a job is ``75 x step + decode + reconstruction + seeds x mesh``,
plus one decode per preview (the app's default interval), compared on a GPU with the target: 4 seeds x 75 steps
with their reconstructions and meshes in under 30 s on an H100. With ``--real`` (weights cached), two 4-seed runs,
without and with the loop at steps 25 and 50, report two PSNRs per seed: between the final six views and the
reconstruction's renders of them (3D consistency; the loop pushes toward it by construction, so a gain there is
expected and not enough), and between the input photo and the reconstruction rendered from the input's side
(azimuth 0, elevation 0, InstantMesh's radius 4 and 30 deg field of view: Zero123++ does not fix the photo's
elevation, so this is approximate; the loop does not optimise it, so it tells whether the loop costs fidelity).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lrm import REPO, MemoryMeter, format_table, machine_info, write_report  # noqa: E402  (bench/lrm.py)

from recon3d.cancel import NEVER  # noqa: E402
from recon3d.devices import DTYPE_NAMES  # noqa: E402
from recon3d.cameras import intrinsics_from_fov, orbit_camera  # noqa: E402
from recon3d.images import image_to_tensor, prepare_image  # noqa: E402
from recon3d.mesh import MeshSettings, extract_mesh_or_fallback  # noqa: E402
from recon3d.models.instant_nerf import (PUBLISHED_CONFIGS, TINY_INSTANT_NERF_CONFIG, VIEW_SIZE,  # noqa: E402
                                         ZERO123PLUS_DISTANCE, ZERO123PLUS_FOV, random_instant_nerf)
from recon3d.models.zero123plus import TINY_VIEW_SIZE, random_zero123plus_parts, split_views  # noqa: E402
from recon3d.pipelines.multiview_sample import (MultiViewOptions, MultiViewSample3D, StepState,  # noqa: E402
                                                on_background)
from recon3d.render import render_views  # noqa: E402
from recon3d.pipelines.progress import synchronize  # noqa: E402

TARGET_GPU_SECONDS = 30.0  # 4 seeds x 75 steps, reconstructions and meshes, on an H100
JOB_STEPS = 75


def random_pipeline(published: bool, device: torch.device, dtype: torch.dtype) -> MultiViewSample3D:
    prior = random_zero123plus_parts(0, published=published).to(device, dtype)
    nerf = random_instant_nerf(PUBLISHED_CONFIGS["large"] if published else TINY_INSTANT_NERF_CONFIG)
    return MultiViewSample3D(prior, nerf.to(device=device, dtype=dtype), "random weights",
                             320 if published else TINY_VIEW_SIZE, random_weights=True, offline=True)


def timed(device: torch.device, work) -> tuple[float, object]:
    synchronize(device)
    start = time.perf_counter()
    out = work()
    synchronize(device)
    return time.perf_counter() - start, out


@torch.no_grad()
def speed(pipe: MultiViewSample3D, seeds: int, steps: int, mesh_resolution: int) -> dict:
    """Seconds of each part for ``seeds`` seeds together (steps after one warm-up step), and peak memory."""
    device = pipe.device
    condition = prepare_image(REPO / "examples" / "duck.png", 320, 0.85, None).image
    options = MultiViewOptions(seeds=list(range(seeds)), steps=JOB_STEPS).resolved(device)
    with MemoryMeter(device) as memory:
        denoise = pipe.denoise(condition, options.seeds, options)
        warm_up, (state, latents) = timed(device, lambda: next(denoise))
        step_seconds = [timed(device, lambda: next(denoise))[0] for _ in range(steps)]
        decode, views = timed(device, lambda: split_views(pipe.prior.decode(latents)))
        reconstruct, planes = timed(device, lambda: pipe.reconstruct(views))
        loop, _ = timed(device, lambda: pipe._reconstruct_into(StepState(2, state.x0), 1.0, NEVER))
        settings = MeshSettings(resolution=mesh_resolution, level=None, min_part_fraction=1.0)
        mesh, _ = timed(device, lambda: extract_mesh_or_fallback(pipe.reconstructor.field(planes[:1]), settings))
    step = statistics.median(step_seconds)
    previews = math.ceil(JOB_STEPS / options.preview_every)  # each decodes every seed's views
    return {"seeds": seeds, "steps_timed": steps, "warm_up_s": warm_up, "step_s": step, "decode_s": decode,
            "reconstruct_s": reconstruct, "loop_step_s": loop, "mesh_s": mesh, "mesh_resolution": mesh_resolution,
            "previews": previews, "preview_every": options.preview_every,
            "job_projection_s": JOB_STEPS * step + (previews + 1) * decode + reconstruct + seeds * mesh,
            "memory": memory.result}


def psnr(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Per object (first dimension), in dB."""
    return [float(-10 * torch.log10(m)) for m in ((a.float() - b.float()) ** 2).flatten(1).mean(1)]


@torch.no_grad()
def loop_effect(pipe: MultiViewSample3D, seeds: int = 4, at: tuple[int, ...] = (25, 50),
                steps: int = JOB_STEPS) -> dict:
    """Without and with the loop: the final views against their reconstruction's renders (consistency), and the
    input photo against the reconstruction seen from the photo's side (fidelity)."""
    prepared = pipe.prepare(REPO / "examples" / "duck.png", MultiViewOptions())
    condition = on_background(prepared, pipe.prior.background)
    photo = image_to_tensor(condition.resize((VIEW_SIZE, VIEW_SIZE)))[0]  # (3, s, s)
    front = orbit_camera(0.0, 0.0, ZERO123PLUS_DISTANCE)[None, None].to(pipe.device)  # (1, 1, 4, 4)
    out = {}
    for name, loop in (("without", ()), ("with", at)):
        options = MultiViewOptions(seeds=list(range(seeds)), steps=steps, reconstruct_at=loop).resolved(pipe.device)
        latents = [lat for _, lat in pipe.denoise(condition, options.seeds, options)][-1]
        views = split_views(pipe.prior.decode(latents))
        planes = pipe.reconstruct(views)
        seen = render_views(pipe.reconstructor.field(planes), front.expand(seeds, 1, 4, 4),
                            intrinsics_from_fov(ZERO123PLUS_FOV, pipe.device), VIEW_SIZE, VIEW_SIZE,
                            replace(pipe.reconstructor.config.render_settings(),
                                    background=(pipe.prior.background,) * 3))["rgb"][:, 0]  # (B, s, s, 3)
        out[name] = {"reconstruct_at": list(loop), "consistency_psnr_db": psnr(views, pipe.render(planes)),
                     "input_view_psnr_db": psnr(seen.permute(0, 3, 1, 2).cpu(), photo.expand(seeds, -1, -1, -1))}
    return out


def run_in_process(device: str = "cpu", dtype_name: str = "float32", quick: bool = False, seeds: str = "1,4",
                   steps: int | None = None, mesh_resolution: int | None = None, real: bool = False) -> dict:
    """Every measurement of this benchmark as a dict (also used by bench/gpu.py)."""
    device_ = torch.device(device)
    dtype = DTYPE_NAMES[dtype_name]
    on_cpu = device_.type == "cpu"
    steps = steps or (1 if on_cpu and not quick else 3)
    mesh_resolution = mesh_resolution or (64 if quick else 128 if on_cpu else 256)
    build, pipe = timed(device_, lambda: random_pipeline(not quick, device_, dtype))
    records = [speed(pipe, int(count), steps, mesh_resolution) for count in seeds.split(",")]
    report = {"published_sizes": not quick, "device": str(device_), "dtype": dtype_name, "build_s": build,
              "records": records}
    four = next((r for r in records if r["seeds"] == 4), None)
    if four and device_.type == "cuda":
        report["target"] = {"seconds": TARGET_GPU_SECONDS, "projected_s": four["job_projection_s"],
                            "met": four["job_projection_s"] < TARGET_GPU_SECONDS}
    if real:
        try:
            real_pipe = MultiViewSample3D.from_pretrained(device=device_, dtype=dtype, offline=True,
                                                          unet="TencentARC/InstantMesh/diffusion_pytorch_model.bin")
            report["loop_effect"] = loop_effect(real_pipe)
        except Exception as exc:  # weights not cached: say so, measure the rest
            report["loop_effect"] = {"skipped": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"}
    return report


def print_report(report: dict) -> None:
    headers = ["seeds", "step s", "decode s", "reconstruct s", "loop step s", "mesh s", "75-step job s", "peak MiB"]
    rows = [[r["seeds"], r["step_s"], r["decode_s"], r["reconstruct_s"], r["loop_step_s"], r["mesh_s"],
             r["job_projection_s"], r["memory"].get("peak_mib")] for r in report["records"]]
    sizes = "published sizes" if report["published_sizes"] else "tiny"
    print(f"\nZero123++ -> InstantMesh, random weights ({sizes}), {report['device']} {report['dtype']}; "
          f"mesh {report['records'][0]['mesh_resolution']}^3")
    print(format_table(headers, rows))
    if "target" in report:
        t = report["target"]
        print(f"target: 4 seeds x 75 steps + reconstructions + meshes < {t['seconds']:g} s: projected "
              f"{t['projected_s']:.1f} s -> {'MET' if t['met'] else 'NOT MET'}")
    if "loop_effect" in report:
        print(f"loop effect (PSNR views vs renders of their reconstruction): {report['loop_effect']}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPE_NAMES), help="default: float32 on CPU, "
                                                                                    "bfloat16 on GPU")
    parser.add_argument("--seeds", default="1,4", help="seed counts to time, comma-separated")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 1 on CPU, 3 on GPU)")
    parser.add_argument("--mesh-resolution", type=int, default=None)
    parser.add_argument("--real", action="store_true", help="also the loop's effect with the cached real weights")
    parser.add_argument("--quick", action="store_true", help="tiny random models: a smoke test")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    report = {"machine": machine_info(), "args": vars(args), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              **run_in_process(args.device, dtype, args.quick, args.seeds, args.steps, args.mesh_resolution, args.real)}
    print_report(report)
    device = torch.device(args.device).type
    name = f"multiview-{device}{'-quick' if args.quick else ''}.json"
    path = Path(args.json) if args.json else REPO / "bench" / "results" / name
    write_report(path, report)
    return report


if __name__ == "__main__":
    main()
