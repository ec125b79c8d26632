"""Benchmark DMV3D: seconds per sample and per batch of 4 seeds for each config, peak memory, and the quality of the
shipped demo model on held-out synthetic objects next to a trivial baseline.

Run from the repository root::

    PYTHONPATH=. python bench/dmv3d.py --heldout DATA --train DATA     # speed of every config + demo quality
    PYTHONPATH=. python bench/dmv3d.py --skip-quality                  # speed only
    PYTHONPATH=. python bench/dmv3d.py --device cuda --dtype bfloat16  # on a GPU

Speed: ``Sample3D.run`` from one image (the duck example, background already removed) with 1 seed and with 4 seeds
denoised together, split into denoising and meshing (128^3 on CPU, 256^3 on a GPU). The shipped demo model is
timed with its weights; tiny and paper configs with random weights (a random field is slower to mesh than an
object, so their mesh column is pessimistic). The paper config is too slow for all its steps on a CPU: there it
runs ``--paper-steps`` steps and the table gives seconds per step and the extrapolation to ``--steps``, marked
as such. Each setting runs in its own process, so its peak memory is its own.

Quality: every held-out object of a ``recon3d-multiview-v1`` folder written by ``recon3d.synthetic`` (objects the
model never saw) is sampled from its first view with one seed; the last step's planes are rendered at all its
other views (other ring views and elevated views) and compared with the truth: PSNR on white, and the IoU of the
silhouettes (opacity > 0.5 against alpha > 0.5). The baseline is the mean training shape in the input's colour:
the occupancy of ``--baseline-objects`` training objects (regenerated from the training set's seed) averaged
over 8 turns about the vertical axis (the conditioning view's azimuth is uniform), kept where at least half of
them are solid, coloured with the mean foreground colour of the input view.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from lrm import REPO, MemoryMeter, _mib, format_table, machine_info, write_report  # bench/lrm.py: same reports

DUCK = REPO / "examples" / "duck.png"
CPU_RESOLUTION, GPU_RESOLUTION = 128, 256
TARGET_GPU_SECONDS_4_PAPER = 30.0  # issue: 4 samples of the paper-scale config in under 30 s on a GPU


# ----------------------------------------------------------------------------- speed

def make_sampler(config: str, device: torch.device, dtype: torch.dtype, demo_checkpoint: Path):
    from recon3d.models.dmv3d import CONFIGS
    from recon3d.pipelines.sample_3d import Sample3D

    if config == "demo" and (demo_checkpoint / "config.json").is_file():
        return Sample3D.from_pretrained(demo_checkpoint, device=device, dtype=dtype, offline=True), "trained"
    return Sample3D.random(CONFIGS[config], device=device, dtype=dtype), "random"


def time_run(sampler, seeds: list[int], steps: int, resolution: int) -> dict:
    """Seconds to denoise and to mesh ``seeds`` from the duck, synchronised."""
    from recon3d.pipelines.events import Preview
    from recon3d.pipelines.progress import synchronize
    from recon3d.pipelines.sample_3d import SampleOptions

    options = SampleOptions(seeds=seeds, steps=steps, remove_background=False, mesh_resolution=resolution,
                            batch_size=len(seeds))
    synchronize(sampler.device)
    start = time.perf_counter()
    denoised = None
    for event in sampler.run(str(DUCK), options):
        if isinstance(event, Preview):  # one per denoising step
            synchronize(sampler.device)
            denoised = time.perf_counter()
    synchronize(sampler.device)
    end = time.perf_counter()
    return {"denoise_seconds": denoised - start, "mesh_seconds": end - denoised, "seconds": end - start}


def speed_worker(setting: dict) -> dict:
    """In a child process: warm up with one step, then the measured run with its peak memory."""
    if setting.get("threads"):
        torch.set_num_threads(setting["threads"])
    device = torch.device(setting["device"])
    sampler, weights = make_sampler(setting["config"], device, getattr(torch, setting["dtype"]),
                                    Path(setting["demo_checkpoint"]))
    seeds = list(range(setting["seeds"]))
    time_run(sampler, seeds, 1, 64)
    with MemoryMeter(device) as meter:
        timing = time_run(sampler, seeds, setting["steps"], setting["resolution"])
    per_step = timing["denoise_seconds"] / setting["steps"]
    full = per_step * setting["target_steps"] + timing["mesh_seconds"]
    return dict(setting, **timing, weights=weights, seconds_per_step=per_step, memory=meter.result,
                seconds_at_target_steps=full, extrapolated=setting["steps"] != setting["target_steps"])


def run_in_process(setting: dict) -> dict:
    command = [sys.executable, __file__, "--worker", json.dumps(setting)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        return dict(setting, status="failed", error=(done.stderr.strip().splitlines() or ["?"])[-1])
    return dict(json.loads(done.stdout.strip().splitlines()[-1]), status="ok")


def speed_table(records: list[dict]) -> str:
    headers = ["config", "weights", "seeds", "steps run", "s/step", "denoise s", "mesh s", "total s", "peak MiB"]
    rows = []
    for r in records:
        if r["status"] != "ok":
            rows.append([r["config"], "", r["seeds"], r["steps"], r["status"], r.get("error", "")[:40], "", "", ""])
            continue
        memory = r["memory"]
        peak = memory["peak_mib"] if memory["peak_mib"] is not None else memory["process_peak_mib"]
        total = f"{r['seconds_at_target_steps']:.1f}" + (f" (est. at {r['target_steps']} steps)" if r["extrapolated"]
                                                           else "")
        rows.append([r["config"], r["weights"], r["seeds"], r["steps"], round(r["seconds_per_step"], 3),
                     round(r["denoise_seconds"], 2), round(r["mesh_seconds"], 2), total, _mib(peak)])
    return format_table(headers, rows)


# ----------------------------------------------------------------------------- quality

def baseline_field(train_seed: int, objects: int, colour: torch.Tensor, resolution: int = 48):
    """The mean training shape (see the module docstring) as a GridField in the given colour (3,)."""
    from recon3d.field import GridField
    from recon3d.synthetic import random_object

    axis = torch.linspace(-1, 1, resolution)
    points = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)  # (R^3, 3) x, y, z
    occupancy = torch.zeros(points.shape[0])
    turns = 8
    for index in range(objects):
        obj = random_object(torch.Generator().manual_seed(train_seed * 1_000_003 + index))
        for turn in range(turns):
            angle = 2 * math.pi * turn / turns
            c, s = math.cos(angle), math.sin(angle)
            rotation = torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
            density, _ = obj.query(points @ rotation)
            occupancy += (density[:, 0] > obj.iso_level).float()
    occupancy /= objects * turns
    solid = (occupancy >= 0.5).float().reshape(1, 1, resolution, resolution, resolution)
    rgb = colour.reshape(1, 3, 1, 1, 1).expand(1, 3, resolution, resolution, resolution)
    return GridField(solid * 200.0, rgb.contiguous())


def psnr(prediction: torch.Tensor, truth: torch.Tensor) -> float:
    mse = float(((prediction - truth) ** 2).mean())
    return 10 * math.log10(1.0 / max(mse, 1e-10))


def iou(prediction: torch.Tensor, truth: torch.Tensor) -> float:
    union = float((prediction | truth).sum())
    return float((prediction & truth).sum()) / union if union else 1.0


def scores(rgb: torch.Tensor, opacity: torch.Tensor, truth_rgb: torch.Tensor, truth_alpha: torch.Tensor) -> dict:
    """Per-view PSNR and silhouette IoU; rgb (V, H, W, 3), opacity (V, H, W, 1), truths alike."""
    return {"psnr": [psnr(rgb[v], truth_rgb[v]) for v in range(len(rgb))],
            "iou": [iou(opacity[v, ..., 0] > 0.5, truth_alpha[v, ..., 0] > 0.5) for v in range(len(rgb))]}


def evaluate(heldout: Path, train_seed: int, baseline_objects: int, checkpoint: Path, steps: int,
             limit: int | None) -> dict:
    """Demo model against the baseline on every held-out object (see the module docstring)."""
    from recon3d.datasets import MultiViewDataset
    from recon3d.models.dmv3d import align_to_first_view
    from recon3d.pipelines.sample_3d import Sample3D
    from recon3d.render import render_views

    sampler = Sample3D.from_pretrained(checkpoint, offline=True)
    model, cfg = sampler.model, sampler.model.config
    dataset = MultiViewDataset(heldout)
    count = min(len(dataset), limit or len(dataset))
    mean_shape = None
    results = {"model": {"psnr": [], "iou": []}, "baseline": {"psnr": [], "iou": []}}
    started = time.perf_counter()
    for index in range(count):
        item = dataset[index]
        images, alpha = item["images"], item["alpha"]  # (V, 3, H, W) on white, (V, 1, H, W)
        c2w, intrinsics = item["c2w"], item["intrinsics"]
        c2w = align_to_first_view(c2w[None], cfg.camera_distance)[0]
        size = images.shape[-1]
        condition = torch.nn.functional.interpolate(images[:1], size=(cfg.image_size,) * 2, mode="bilinear",
                                                    antialias=True)[0] * 2 - 1
        with torch.no_grad():
            *_, (_, planes, _) = sampler.denoise(condition, [index], steps)
            novel_c2w, novel_k = c2w[None, 1:], intrinsics[None, 1:]
            ours = render_views(model.field(planes), novel_c2w, novel_k, size, size, cfg.render_settings())
            foreground = alpha[0, 0] > 0.5
            colour = images[0][:, foreground].mean(-1) if foreground.any() else torch.full((3,), 0.5)
            if mean_shape is None:
                mean_shape = baseline_field(train_seed, baseline_objects, torch.zeros(3))
            mean_shape.rgb = colour.reshape(1, 3, 1, 1, 1).expand_as(mean_shape.rgb).contiguous()
            base = render_views(mean_shape, novel_c2w, novel_k, size, size, cfg.render_settings())
        truth_rgb = images[1:].permute(0, 2, 3, 1)  # (V-1, H, W, 3)
        truth_alpha = alpha[1:].permute(0, 2, 3, 1)
        for name, out in (("model", ours), ("baseline", base)):
            s = scores(out["rgb"][0].clamp(0, 1), out["opacity"][0], truth_rgb, truth_alpha)
            results[name]["psnr"].append(statistics.mean(s["psnr"]))
            results[name]["iou"].append(statistics.mean(s["iou"]))
    summary = {name: {"psnr_db": statistics.mean(r["psnr"]), "iou": statistics.mean(r["iou"])}
               for name, r in results.items()}
    return {"objects": count, "novel_views_per_object": int(len(dataset[0]["c2w"]) - 1), "steps": steps,
            "seeds": "one per object (its index)", "checkpoint": str(checkpoint),
            "seconds": time.perf_counter() - started, "summary": summary, "per_object": results}


def quality_table(quality: dict) -> str:
    rows = [[name, round(s["psnr_db"], 2), round(s["iou"], 3)] for name, s in quality["summary"].items()]
    return format_table(["", "novel-view PSNR (dB)", "silhouette IoU"], rows)


# ----------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="tiny,demo,paper")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--steps", type=int, default=30, help="denoising steps of a sample")
    parser.add_argument("--paper-steps", type=int, default=None,
                        help="steps actually run for the paper config (default: all on a GPU, 1 on a CPU)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--demo-checkpoint", default=str(REPO / "assets" / "checkpoints" / "dmv3d-demo"))
    parser.add_argument("--heldout", default=None, help="held-out recon3d-multiview-v1 folder (quality)")
    parser.add_argument("--train-seed", type=int, default=1, help="seed the training set was written with")
    parser.add_argument("--baseline-objects", type=int, default=300)
    parser.add_argument("--limit", type=int, default=None, help="evaluate at most this many held-out objects")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--json", default=None, help="default: bench/results/dmv3d-<device>.json")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(speed_worker(json.loads(args.worker))))
        return None
    device = torch.device(args.device)
    info = machine_info()
    print(f"Machine: {info['cpu']} ({info['cpu_count']} CPUs), torch {info['torch']}, "
          f"GPU {info['gpu']['name'] if info['gpu'] else 'none'}; sampling on {device.type}", flush=True)
    report = {"machine": info, "args": vars(args), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if not args.skip_speed:
        records = []
        resolution = GPU_RESOLUTION if device.type == "cuda" else CPU_RESOLUTION
        for config in [c.strip() for c in args.configs.split(",") if c.strip()]:
            steps = args.steps
            if config == "paper":
                steps = args.paper_steps or (args.steps if device.type == "cuda" else 1)
            for seeds in (1, 4):
                setting = {"config": config, "seeds": seeds, "steps": steps, "target_steps": args.steps,
                           "device": args.device, "dtype": args.dtype, "resolution": resolution,
                           "threads": args.threads, "demo_checkpoint": args.demo_checkpoint}
                records.append(run_in_process(setting))
                r = records[-1]
                print(f"  {config} x {seeds}: {r.get('seconds_at_target_steps', r['status'])}", flush=True)
        print(f"\nDMV3D sampling from one image, {args.dtype} on {device.type}, {args.steps} steps, mesh "
              f"{resolution}^3 (peak MiB: CUDA max allocated, or CPU peak RSS of the process)")
        print(speed_table(records))
        report["runs"] = records
        paper4 = [r for r in records if r["status"] == "ok" and r["config"] == "paper" and r["seeds"] == 4]
        if paper4 and device.type == "cuda":
            report["target"] = {"gpu_seconds_4_paper_samples": TARGET_GPU_SECONDS_4_PAPER,
                                "measured": paper4[0]["seconds_at_target_steps"],
                                "met": paper4[0]["seconds_at_target_steps"] < TARGET_GPU_SECONDS_4_PAPER}
    if not args.skip_quality:
        if not args.heldout:
            raise SystemExit("quality needs --heldout (a held-out folder written by recon3d.synthetic)")
        quality = evaluate(Path(args.heldout), args.train_seed, args.baseline_objects, Path(args.demo_checkpoint),
                           args.steps, args.limit)
        print(f"\nDemo model on {quality['objects']} held-out objects ({quality['novel_views_per_object']} novel "
              f"views each, {args.steps} steps, one seed each) against the mean training shape in the input's colour")
        print(quality_table(quality))
        report["quality"] = quality
    write_report(Path(args.json) if args.json else REPO / "bench" / "results" / f"dmv3d-{device.type}.json", report)
    return report


if __name__ == "__main__":
    main()
