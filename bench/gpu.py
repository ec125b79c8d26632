"""The one GPU acceptance command: every GPU path of recon3d measured in one run, each against its target.

    python bench/gpu.py                          # on the GPU (about 8 minutes on one H100 with the real configs)
    python bench/gpu.py --device cpu --quick     # the same code with tiny configs: about 3 minutes on 2 CPU cores

Random weights in the published configurations (speed and numerics do not depend on the values):
- LRM (OpenLRM base) image -> GLB at 256^3 in float32, float16 and bfloat16: seconds per stage, and how far the
  half-precision surface lies from the float32 one (nearest-vertex distance, in voxels);
- the renderer: 4 objects x 4 views at 256 px, forward and forward+backward (rays per second, peak memory);
- DMV3D in the paper's configuration, 4 seeds in bfloat16 (seconds, projected to 30 steps), and one seed alone
  against the same seed inside the batch (the planes' largest difference);
- MVDream SDS in float16 and bfloat16: seconds per step in each render phase, the fast preset's projected total,
  the interval between previews, and the non-finite steps seen;
- Zero123++ v1.2 -> InstantMesh at the published sizes: 4 seeds, seconds per diffusion step, decode,
  reconstruction, loop step and mesh, the projected 75-step job against its target (bench/multiview.py); with the
  real weights in the Hub cache (GPU), the reconstruction loop's effect on 3D consistency;
- the exporter (bench/export.py): a 256^3 mesh decimated to 50k faces with a 1024^2 texture baked on the device,
  seconds per stage.
It prints one table with each target's verdict and writes bench/results/gpu-<device>.json (``--json`` elsewhere).
The renderer, DMV3D speed and SDS phases run in child processes (bench/render.py, dmv3d.py, sds.py workers), so
each peak memory is its own.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dmv3d as dmv3d_bench  # noqa: E402  (bench/dmv3d.py)
import export as export_bench  # noqa: E402  (bench/export.py)
import lrm as lrm_bench  # noqa: E402  (bench/lrm.py: reports, memory meter, LRM runs)
import multiview as multiview_bench  # noqa: E402  (bench/multiview.py)
import render as render_bench  # noqa: E402
import sds as sds_bench  # noqa: E402

from recon3d import ImageTo3DOptions, SampleOptions, run_to_end  # noqa: E402
from recon3d.pipelines.progress import synchronize  # noqa: E402
from recon3d.pipelines.sds import PRESETS, for_device  # noqa: E402

DUCK = str(lrm_bench.REPO / "examples" / "duck.png")
FIGURE = "figure only"  # measured and recorded, no target
TARGETS = {
    "lrm_seconds": lrm_bench.TARGET_GPU_SECONDS,  # image -> GLB, base, 256^3, on a GPU
    "surface_voxels": 1.0,  # half precision's surface within one voxel of float32's (95th percentile)
    "dmv3d_4_seeds_seconds": dmv3d_bench.TARGET_GPU_SECONDS_4_PAPER,
    "seed_relative_difference": 1e-2,  # a seed alone vs in a batch: the same object
    "sds_fast_seconds": sds_bench.TARGET_GPU_SECONDS_FAST,
    "preview_seconds": sds_bench.TARGET_PREVIEW_SECONDS,
    "multiview_job_seconds": multiview_bench.TARGET_GPU_SECONDS,
}


def plan(device: str, quick: bool) -> dict:
    """What runs: the real configurations, or (``quick``) tiny ones that take the same code paths."""
    cuda = device != "cpu"
    return {
        "lrm": {"size": "tiny" if quick else "base", "resolution": 64 if quick else 256,
                "dtypes": ["float32", "float16", "bfloat16"]},
        "render": {"batch": 1 if quick else 4, "views": 2 if quick else 4, "size": 64 if quick else 256},
        "dmv3d": {"config": "tiny" if quick else "paper", "seeds": 2 if quick else 4, "steps": 2 if quick else 5,
                  "target_steps": 30, "dtype": "bfloat16", "resolution": 64 if quick else 256},  # the app's GPU mesh
        "sds": {"tiny": quick, "steps": 1 if quick else 5,
                "dtypes": ["bfloat16"] if quick or not cuda else ["float16", "bfloat16"]},
        "export": {"resolution": 96 if quick else 256, "faces": 5000 if quick else 50_000,
                   "texture": 256 if quick else 1024},
        "multiview": {"quick": quick, "seeds": "4", "steps": 1 if quick else 3, "dtype": "bfloat16" if cuda else "float32",
                      "mesh_resolution": 64 if quick else 256, "real": cuda},
    }


# ---- LRM in three precisions ------------------------------------------------------------------------------------

def surface_distance(vertices: "np.ndarray", reference: "np.ndarray", resolution: int) -> dict:
    """How far the two surfaces lie apart, both ways (each vertex to the other mesh's nearest vertex, so a
    missing part counts too), in voxels: mean, p95, max."""
    import numpy as np
    from scipy.spatial import cKDTree

    distance = np.concatenate([cKDTree(reference).query(vertices)[0], cKDTree(vertices).query(reference)[0]])
    distance = distance / (2.0 / (resolution - 1))
    return {"mean": float(distance.mean()), "p95": float(np.percentile(distance, 95)), "max": float(distance.max())}


def lrm_precisions(device: torch.device, spec: dict) -> list[dict]:
    """Image -> GLB in each dtype on the same random model; the half-precision meshes at float32's level."""
    import tempfile

    cfg, _ = lrm_bench.load_config(spec["size"])
    records, reference, level, folder = [], None, None, Path(tempfile.mkdtemp(prefix="recon3d-gpu-bench-"))
    for dtype in spec["dtypes"]:
        record = {"dtype": dtype, "size": spec["size"], "resolution": spec["resolution"]}
        try:
            pipe = lrm_bench.make_pipe(cfg, device, lrm_bench.DTYPES[dtype])
            options = ImageTo3DOptions(mesh_resolution=spec["resolution"], remove_background=False,
                                       density_threshold=level)
            run_to_end(pipe.run(DUCK, ImageTo3DOptions(mesh_resolution=64, remove_background=False,
                                                       density_threshold=None)))  # warm-up
            synchronize(device)
            start = time.perf_counter()
            result = run_to_end(pipe.run(DUCK, options))
            result.save_glb(folder / f"{dtype}.glb")  # image -> GLB: the write is part of the job
            synchronize(device)
            record.update(status="ok", seconds=dict(result.timings, total=time.perf_counter() - start),
                          faces=len(result.mesh.faces), level=float(result.stats["level"]))
            if reference is None:  # float32 first: the reference surface and its level
                reference, level = result.mesh.vertices, record["level"]
            else:
                record["surface_voxels"] = surface_distance(result.mesh.vertices, reference, spec["resolution"])
        except lrm_bench.OOM_ERRORS + (lrm_bench.EmptyMeshError,) as error:
            record.update(status=lrm_bench._status(error), error=str(error))
        except Exception as error:  # recorded, so the other parts still run and the report is written
            record.update(status="failed", error=f"{type(error).__name__}: {error}")
        records.append(record)
        lrm_bench._free(device)
        print(f"  LRM {spec['size']} {dtype} {spec['resolution']}^3: {brief(record)}", flush=True)
    return records


# ---- DMV3D: a seed alone and in a batch -------------------------------------------------------------------------

def seed_in_batch(device: torch.device, spec: dict) -> dict:
    """Seed 1 sampled alone and as the second of 4 seeds: the planes' largest difference (absolute, relative)."""
    from recon3d.models.dmv3d import CONFIGS
    from recon3d.pipelines.sample_3d import Sample3D

    sampler = Sample3D.random(CONFIGS[spec["config"]], device=device, dtype=getattr(torch, spec["dtype"]))
    common = dict(steps=2, remove_background=False, mesh_resolution=64)
    alone = run_to_end(sampler.run(DUCK, SampleOptions(seeds=[1], **common)))[0]
    batch = run_to_end(sampler.run(DUCK, SampleOptions(seeds=[0, 1, 2, 3], batch_size=4, **common)))[1]
    difference = float((alone.planes - batch.planes).abs().max())
    scale = float(alone.planes.abs().max())
    del sampler
    lrm_bench._free(device)
    return {"config": spec["config"], "dtype": spec["dtype"], "status": "ok", "max_abs_difference": difference,
            "relative_difference": difference / max(scale, 1e-12)}


def guarded(part, *args) -> dict:
    """``part(*args)``, or a record of its failure: one broken part must not cost the report of the others."""
    try:
        return part(*args)
    except Exception as error:
        print(f"  failed: {type(error).__name__}: {error}", flush=True)
        return {"status": "failed", "error": f"{type(error).__name__}: {error}"}


# ---- the whole run ----------------------------------------------------------------------------------------------

def run(device: str, quick: bool, threads: int | None) -> dict:
    steps, torch_device = plan(device, quick), torch.device(device)
    report = {"device": device, "quick": quick, "plan": steps}
    started = time.perf_counter()
    print("LRM image -> GLB in three precisions", flush=True)
    report["lrm"] = lrm_precisions(torch_device, steps["lrm"])
    print("Renderer", flush=True)
    report["render"] = [render_bench.run_setting(
        {"device": device, "dtype": "float32", "mode": mode, "chunk_rays": 8192, "threads": threads,
         **steps["render"]}) for mode in ("forward", "forward+backward")]
    for record in report["render"]:
        print(f"  {record['mode']}: {brief(record)}", flush=True)
    print("DMV3D sampling", flush=True)
    spec = steps["dmv3d"]
    report["dmv3d"] = dmv3d_bench.run_in_process(
        {"config": spec["config"], "device": device, "dtype": spec["dtype"], "seeds": spec["seeds"],
         "steps": spec["steps"], "target_steps": spec["target_steps"], "resolution": spec["resolution"],
         "demo_checkpoint": str(lrm_bench.REPO / "assets" / "checkpoints" / "dmv3d-demo"), "threads": threads})
    print(f"  {spec['seeds']} seeds: {brief(report['dmv3d'])}", flush=True)
    report["seed_in_batch"] = guarded(seed_in_batch, torch_device, spec)
    print("MVDream SDS", flush=True)
    report["sds"] = guarded(sds_phases, device, steps["sds"], threads)
    print("Zero123++ -> InstantMesh", flush=True)
    spec = steps["multiview"]
    report["zero123plus_instantmesh"] = guarded(
        multiview_bench.run_in_process, device, spec["dtype"], spec["quick"], spec["seeds"], spec["steps"],
        spec["mesh_resolution"], spec["real"])
    print("Export: face budget, unwrap, bake, files", flush=True)
    spec = steps["export"]
    report["export"] = guarded(export_bench.run, spec["resolution"], spec["faces"], spec["texture"], torch_device)
    report["seconds"] = time.perf_counter() - started
    report["verdicts"] = verdicts(report)
    return report


def sds_phases(device: str, spec: dict, threads: int | None) -> dict:
    """bench/sds.py's phases (64 px and 256 px; on a CPU the recipe's CPU budget) in each dtype, then the fast
    preset's projection."""
    options, records = for_device(PRESETS["fast"], device), []
    first_high = int(options.high_resolution_from * options.steps)
    for dtype in spec["dtypes"]:
        for phase, first, size, groups in (("low", 0, options.low_resolution, options.low_resolution_groups),
                                           ("high", first_high, options.high_resolution,
                                            options.high_resolution_groups)):
            records.append(sds_bench.run_in_process(
                {"device": device, "dtype": dtype, "phase": phase, "preset": "fast", "first_step": first,
                 "render_size": size, "groups": groups, "views": options.views, "steps": spec["steps"],
                 "warmup": 1, "preview": phase == "low", "preview_repeats": 1 if spec["tiny"] else 3,
                 "threads": threads, "tiny": spec["tiny"], "device_budget": True}))
            print(f"  {dtype} {size} px: {brief(records[-1])}", flush=True)
    return {"runs": records, "projections": {d: sds_bench.project(records, d, device) for d in spec["dtypes"]}}


def brief(record: dict) -> str:
    if record.get("status") != "ok":
        return f"{record.get('status')}: {record.get('error', '')}"
    for key in ("seconds_per_step", "rays_per_second"):
        if key in record:
            return f"{record[key]:.3g} {'s/step' if key == 'seconds_per_step' else 'rays/s'}"
    if "seconds_at_target_steps" in record:
        return f"{record['seconds_at_target_steps']:.2f} s at {record['target_steps']} steps"
    return f"{record['seconds']['total']:.2f} s"


# ---- verdicts and the table -------------------------------------------------------------------------------------

def verdicts(report: dict) -> list[dict]:
    """One row per target: what was measured and whether it is met (None: not measured in this run)."""
    full = not report["quick"] and report["device"] != "cpu"
    rows = []

    def row(check: str, measured, target: str, met: bool | None, failed: bool = False) -> None:
        if failed:
            verdict = "FAILED"
        elif target == FIGURE:
            verdict = FIGURE
        elif met is not None and not full:
            verdict = "not judged (quick or CPU run)"
        else:
            verdict = {None: "not measured", True: "met", False: "MISSED"}[met]
        rows.append({"check": check, "measured": measured, "target": target, "verdict": verdict})

    for record in report["lrm"]:
        ok = record["status"] == "ok"
        seconds = record["seconds"]["total"] if ok else record["status"]
        row(f"LRM {record['size']} {record['resolution']}^3 {record['dtype']} image -> GLB seconds", seconds,
            f"< {TARGETS['lrm_seconds']:g} s", seconds < TARGETS["lrm_seconds"] if ok else None, failed=not ok)
        if "surface_voxels" in record:
            p95 = record["surface_voxels"]["p95"]
            row(f"LRM {record['dtype']} surface vs float32 (p95 voxels)", p95, f"<= {TARGETS['surface_voxels']:g}",
                p95 <= TARGETS["surface_voxels"])
    for record in report["render"]:
        row(f"renderer {record.get('batch')}x{record.get('views')} {record.get('size')} px {record.get('mode')} rays/s",
            record.get("rays_per_second", record.get("status")), FIGURE, None, failed=record.get("status") != "ok")
    dmv3d = report["dmv3d"]
    seconds = dmv3d.get("seconds_at_target_steps", dmv3d.get("status"))
    ok = dmv3d.get("status") == "ok"
    row(f"DMV3D {dmv3d['config']} {dmv3d['seeds']} seeds {dmv3d['dtype']} seconds (30 steps)", seconds,
        f"< {TARGETS['dmv3d_4_seeds_seconds']:g} s", seconds < TARGETS["dmv3d_4_seeds_seconds"] if ok else None,
        failed=not ok)
    seeds = report["seed_in_batch"]
    relative = seeds.get("relative_difference", seeds["status"])
    row("DMV3D seed alone vs in a batch (relative)", relative, f"<= {TARGETS['seed_relative_difference']:g}",
        relative <= TARGETS["seed_relative_difference"] if seeds["status"] == "ok" else None,
        failed=seeds["status"] != "ok")
    sds = report["sds"]
    if sds.get("status") == "failed":
        row("SDS", sds["error"], "", None, failed=True)
    for dtype, projection in sds.get("projections", {}).items():
        if projection is None:
            row(f"SDS {dtype} fast preset", "a phase failed", "", None, failed=True)
            continue
        fast = projection["presets"]["fast"]
        interval = max(v["max"] for v in fast["preview_interval_seconds"].values())
        row(f"SDS {dtype} fast preset projected seconds", fast["seconds"],
            f"< {TARGETS['sds_fast_seconds']:g} s", fast["seconds"] < TARGETS["sds_fast_seconds"])
        row(f"SDS {dtype} largest preview interval (s)", interval, f"<= {TARGETS['preview_seconds']:g} s",
            interval <= TARGETS["preview_seconds"])
    non_finite: dict[str, int] = {}
    for r in sds.get("runs", []):  # both phases of each dtype
        if r.get("status") == "ok":
            non_finite[r["dtype"]] = non_finite.get(r["dtype"], 0) + len(r.get("non_finite", []))
    for dtype, count in non_finite.items():
        row(f"SDS {dtype} non-finite steps seen", count, "0", count == 0)
    multiview = report["zero123plus_instantmesh"]
    if multiview.get("status") == "failed":
        row("Zero123++ -> InstantMesh", multiview["error"], "", None, failed=True)
    else:
        record = multiview["records"][-1]
        row(f"Zero123++ -> InstantMesh {record['seeds']} seeds x 75 steps + meshes, projected seconds",
            record["job_projection_s"], f"< {TARGETS['multiview_job_seconds']:g} s",
            record["job_projection_s"] < TARGETS["multiview_job_seconds"])
        row("Zero123++ -> InstantMesh loop step (decode, reconstruct, render, encode) seconds",
            record["loop_step_s"], FIGURE, None)
        effect = multiview.get("loop_effect")
        if effect and "skipped" not in effect:
            for key, what in (("consistency_psnr_db", "views vs their reconstruction"),
                              ("input_view_psnr_db", "photo vs the reconstruction from its side")):
                means = {k: sum(v[key]) / len(v[key]) for k, v in effect.items()}
                row(f"Zero123++ -> InstantMesh {what}, PSNR dB (without / with loop)",
                    f"{means['without']:.2f} / {means['with']:.2f}", FIGURE, None)
    export = report.get("export", {})
    if export.get("status") == "failed":
        row("Export", export["error"], "", None, failed=True)
    elif export:
        row(f"Export {export['faces']:,} faces + {export['texture']}^2 texture, seconds (bake on the device)",
            export["export_total_s"], FIGURE, None)
    return rows


def table(rows: list[dict]) -> str:
    def shown(value) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    return lrm_bench.format_table(["check", "measured", "target", "verdict"],
                                  [[r["check"], shown(r["measured"]), r["target"], r["verdict"]] for r in rows])


def device_name(device: str) -> str:
    if device == "cpu":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(torch.device(device)).lower()).strip("-")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny configurations: checks the command end to end")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads in the child processes")
    parser.add_argument("--json", default=None, help="default: bench/results/gpu-<device>[-quick].json")
    args = parser.parse_args(argv)
    if args.device != "cpu" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch sees no CUDA device here")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    info = lrm_bench.machine_info()
    print(f"Machine: {info['cpu']} ({info['cpu_count']} CPUs), torch {info['torch']}, "
          f"GPU {info['gpu']['name'] if info['gpu'] else 'none'}; {'quick, ' if args.quick else ''}on {args.device}",
          flush=True)
    report = run(args.device, args.quick, args.threads)
    report.update(machine=info, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    print(f"\nrecon3d GPU acceptance ({'tiny configurations, ' if args.quick else ''}{args.device}, "
          f"{report['seconds']:.0f} s)")
    print(table(report["verdicts"]))
    suffix = "-quick" if args.quick else ""
    path = Path(args.json) if args.json else lrm_bench.REPO / "bench" / "results" / f"gpu-{device_name(args.device)}{suffix}.json"
    lrm_bench.write_report(path, report)
    print(f"\n{path}")
    return report


if __name__ == "__main__":
    main()
