"""Benchmark MVDream score distillation (SDS): seconds per step in each resolution phase, peak memory, and what
that makes of the presets' run time and of the preview interval.

Run from the repository root::

    PYTHONPATH=. python bench/sds.py                                         # CPU, float32: 1 timed step a phase
    PYTHONPATH=. python bench/sds.py --device cuda --dtypes float16 bfloat16  # on a GPU: 10 timed steps a phase
    PYTHONPATH=. python bench/sds.py --tiny --steps 1                        # tiny configs: a smoke test

What runs: :func:`recon3d.pipelines.sds.sds_step` with MVDream's real networks at random weights (the speed of a
network does not depend on its weights): the published multi-view UNet (``MultiViewUNetConfig()``, SD 2.1-base,
868M parameters) and SD's VAE (``SD_VAE_CONFIG``), with a tiny random text encoder (it runs once per prompt, not
per step). One step renders a camera batch of the field, resizes it to the encoder's 256 px, encodes it with the
gradient through the VAE encoder, runs the UNet on the text and the plain condition (a batch of 2B) and
back-propagates into the field. The ``fast`` preset renders its first half of the steps at 64 px in 2 groups of
4 views (B = 8) and the rest at 256 px in 1 group (B = 4); both phases encode 256 px images, so the 64 px phase
runs the networks on twice the batch.

Each (dtype, phase) runs in its own process: build the parts, one warm-up step (not reported), then ``--steps``
timed steps, synchronised. Peak memory is that process's during the timed steps: ``torch.cuda.max_memory_allocated``
on a GPU, the peak resident set size on a CPU (the weights included). Hooks split a step into the UNet forward
(both conditions), the VAE encoder's forward, the forward render (``render_views``, wrapped in the child process)
and the rest (mostly the backward pass through the VAE encoder and the renderer; AdamW). The 64 px process also
times ``preview_views`` (four 128 px views, ``--preview-repeats`` times, after one untimed call on a GPU).

Derived: the projected time of the ``fast`` and ``quality`` presets (steps of each phase times its seconds per
step, plus the preview renders that :func:`~recon3d.pipelines.sds.optimise` makes, simulated with its rule: a
preview when ``options.preview_seconds`` have passed since the last one; prompt encoding, model loading and the
final mesh export are not included), and the preview interval in each phase (wall seconds between previews).

Target (the issue): on an H100 the ``fast`` preset in under 5 minutes, with a preview at least every 5 s. For
scale, the reference implementation (MVDream's threestudio configuration, 10,000 steps) takes 40-90 minutes on a
V100. Results go to a table and to ``bench/results/sds-<device>.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from lrm import REPO, MemoryMeter, _mib, format_table, machine_info, write_report  # bench/lrm.py: same reports

DTYPES = ("float32", "float16", "bfloat16")
PROMPT = "a chair"
TARGET_GPU_SECONDS_FAST = 300.0  # issue: the fast preset in under 5 minutes on an H100
TARGET_PREVIEW_SECONDS = 5.0  # issue: a preview at least every 5 s
REFERENCE_V100_MINUTES = (40, 90)  # MVDream's threestudio run, 10,000 steps, on a V100


# ----------------------------------------------------------------------------- one phase, in a child process

def build(setting: dict, device: torch.device, dtype: torch.dtype):
    from recon3d.models.mvdream import SD_VAE_CONFIG, MultiViewUNetConfig, random_parts
    from recon3d.pipelines.text_to_3d import MVDreamPrior, TextTo3D

    if setting["tiny"]:
        parts = random_parts(seed=0)
    else:
        parts = random_parts(seed=0, unet_config=MultiViewUNetConfig(), vae_config=SD_VAE_CONFIG)
    pipe = TextTo3D(parts.to(device, dtype), random_weights=True)
    prior = MVDreamPrior(pipe.parts, pipe.encode_prompt(PROMPT))
    return pipe, prior


class StageClock:
    """Seconds inside the forward of each hooked module (synchronised), summed until read."""

    def __init__(self, device: torch.device, modules: dict[str, torch.nn.Module]):
        from recon3d.pipelines.progress import synchronize

        self.sync, self.device = synchronize, device
        self.seconds = {name: 0.0 for name in modules}
        self.handles = []
        for name, module in modules.items():
            self.handles.append(module.register_forward_pre_hook(self._start(name)))
            self.handles.append(module.register_forward_hook(self._stop(name)))
        self.started: dict[str, float] = {}

    def wrap(self, name: str, function):
        """``function`` timed under ``name`` (a plain function: rendering)."""
        self.seconds[name] = 0.0

        def timed(*args, **kwargs):
            self.sync(self.device)
            start = time.perf_counter()
            out = function(*args, **kwargs)
            self.sync(self.device)
            self.seconds[name] += time.perf_counter() - start
            return out
        return timed

    def _start(self, name):
        def hook(module, args):
            self.sync(self.device)
            self.started[name] = time.perf_counter()
        return hook

    def _stop(self, name):
        def hook(module, args, output):
            self.sync(self.device)
            self.seconds[name] += time.perf_counter() - self.started.pop(name)
        return hook

    def take(self) -> dict[str, float]:
        seconds, self.seconds = self.seconds, {name: 0.0 for name in self.seconds}
        return seconds


def phase_worker(setting: dict) -> dict:
    """Warm-up step, timed steps with peak memory, and (64 px phase) the preview render."""
    import recon3d.pipelines.sds as sds_module
    from recon3d.pipelines.progress import synchronize
    from recon3d.pipelines.sds import PRESETS, make_optimiser, new_state, preview_views, sds_step

    if setting.get("threads"):
        torch.set_num_threads(setting["threads"])
    device, dtype = torch.device(setting["device"]), getattr(torch, setting["dtype"])
    started = time.perf_counter()
    pipe, prior = build(setting, device, dtype)
    build_seconds = time.perf_counter() - started
    options = dataclasses.replace(PRESETS[setting["preset"]])
    if setting.get("device_budget"):  # the recipe as recon3d runs it on this device (sds.for_device)
        from recon3d.pipelines.sds import for_device

        options = for_device(options, device)
    generator = torch.Generator().manual_seed(0)
    state = new_state(options, generator, device)
    optimiser = make_optimiser(state, options)
    state.step = setting["first_step"]
    clock = StageClock(device, {"unet": pipe.parts.unet, "vae_encoder": pipe.parts.vae.encoder})
    sds_module.render_views = clock.wrap("render", sds_module.render_views)  # this process only
    non_finite = []

    def step() -> dict:
        synchronize(device)
        start = time.perf_counter()
        info = sds_step(prior, state, optimiser, options, generator)
        if not info["finite"]:  # the step did all its work but the update: timed, and noted
            info["loss"] = None
            non_finite.append(state.step)
        synchronize(device)
        seconds = time.perf_counter() - start
        stages = clock.take()
        if info["resolution"] != setting["render_size"]:
            raise RuntimeError(f"expected a {setting['render_size']} px step, sds_step rendered {info['resolution']}")
        return dict(info, seconds=seconds, **{f"{name}_seconds": s for name, s in stages.items()},
                    other_seconds=seconds - sum(stages.values()))

    warmup = [step() for _ in range(setting["warmup"])]
    with MemoryMeter(device) as meter:
        steps = [step() for _ in range(setting["steps"])]
    record = dict(setting, build_seconds=build_seconds, warmup_seconds=[s["seconds"] for s in warmup],
                  step_records=steps, memory=meter.result, non_finite=non_finite,
                  seconds_per_step=statistics.mean(s["seconds"] for s in steps),
                  median_seconds_per_step=statistics.median(s["seconds"] for s in steps),
                  unet_seconds=statistics.mean(s["unet_seconds"] for s in steps),
                  vae_encoder_seconds=statistics.mean(s["vae_encoder_seconds"] for s in steps),
                  render_seconds=statistics.mean(s["render_seconds"] for s in steps),
                  other_seconds=statistics.mean(s["other_seconds"] for s in steps),
                  parameters={"unet": sum(p.numel() for p in pipe.parts.unet.parameters()),
                              "vae": sum(p.numel() for p in pipe.parts.vae.parameters()),
                              "field": sum(p.numel() for p in state.field.parameters())},
                  batch=setting["groups"] * options.views)
    if setting["preview"]:
        if device.type == "cuda":
            preview_views(state, options)
        times = []
        for _ in range(setting["preview_repeats"]):
            synchronize(device)
            start = time.perf_counter()
            views = preview_views(state, options)
            synchronize(device)
            times.append(time.perf_counter() - start)
        record.update(preview_seconds=statistics.mean(times), preview_times=times,
                      preview_shape=list(views.shape))
    return record


def run_in_process(setting: dict) -> dict:
    command = [sys.executable, __file__, "--worker", json.dumps(setting)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or ["?"]
        status = "OOM" if any("OutOfMemoryError" in line or "MemoryError" in line for line in lines[-3:]) else "failed"
        if done.returncode < 0:  # killed: on a CPU usually the kernel's OOM killer
            status, lines = "killed", lines + [f"killed by signal {-done.returncode}"]
        return dict(setting, status=status, error=lines[-1], stderr_tail=lines[-15:])
    return dict(json.loads(done.stdout.strip().splitlines()[-1]), status="ok")


# ----------------------------------------------------------------------------- projections

def phase_steps(options) -> dict[int, int]:
    """Steps of each render size in the preset (from :func:`resolution_at`)."""
    from recon3d.pipelines.sds import resolution_at

    counts: dict[int, int] = {}
    for step in range(options.steps):
        size = resolution_at(options, step)[0]
        counts[size] = counts.get(size, 0) + 1
    return counts


def simulate(options, seconds_per_step: dict[int, float], preview_seconds: float) -> dict:
    """:func:`optimise`'s clock for a preset: steps at their measured seconds; a preview (``preview_seconds``
    of rendering, part of the step it follows) whenever :func:`~recon3d.pipelines.sds.preview_due` says so.
    Returns total seconds, previews, and per render size the mean and largest wall interval between the ends of
    consecutive previews."""
    from recon3d.pipelines.sds import preview_due, resolution_at

    elapsed, last_preview, previews = 0.0, -math.inf, 0
    wall, last_wall = 0.0, 0.0  # wall clock including the preview renders
    intervals: dict[int, list[float]] = {}
    for step in range(options.steps):
        size = resolution_at(options, step)[0]
        elapsed += seconds_per_step[size]
        wall += seconds_per_step[size]
        if preview_due(options, step + 1, elapsed - last_preview):
            last_preview = elapsed
            elapsed += preview_seconds
            wall += preview_seconds
            previews += 1
            if previews > 1:
                intervals.setdefault(size, []).append(wall - last_wall)
            last_wall = wall
    by_size = {size: {"mean": statistics.mean(v), "max": max(v)} for size, v in intervals.items()}
    return {"seconds": wall, "previews": previews, "preview_render_seconds": previews * preview_seconds,
            "preview_interval_seconds": by_size}


def project(records: list[dict], dtype: str, budget_device: str | None = None) -> dict | None:
    """Each preset's run time from the measured seconds per step (``budget_device``: the presets as recon3d
    runs them on that device, when the steps were measured with that budget)."""
    from recon3d.pipelines.sds import PRESETS, for_device

    presets = {name: for_device(o, budget_device) if budget_device else o for name, o in PRESETS.items()}
    ok = {r["render_size"]: r for r in records if r["dtype"] == dtype and r["status"] == "ok"}
    low = next((r for r in ok.values() if r.get("preview_seconds") is not None), None)
    if len(ok) < 2 or low is None:
        return None
    per_step = {size: r["seconds_per_step"] for size, r in ok.items()}
    result = {"seconds_per_step": per_step, "preview_seconds": low["preview_seconds"],
              "preview_every_steps": presets["fast"].preview_every,
              "preview_min_seconds": presets["fast"].preview_seconds, "presets": {}}
    for name, options in presets.items():
        counts = phase_steps(options)
        sim = simulate(options, per_step, low["preview_seconds"])
        result["presets"][name] = {"steps": options.steps, "steps_per_size": counts,
                                   "steps_seconds": sum(counts[s] * per_step[s] for s in counts), **sim}
    return result


# ----------------------------------------------------------------------------- tables

def phase_table(records: list[dict]) -> str:
    headers = ["dtype", "render px", "B", "steps", "s/step", "UNet s", "VAE enc s", "render s", "other s", "peak MiB",
               "+MiB", "preview s"]
    rows = []
    for r in records:
        key = [r["dtype"], r["render_size"], r["groups"] * r["views"], r["steps"]]
        if r["status"] != "ok":
            rows.append(key + [r["status"], (r.get("error") or "")[:60]] + [None] * 6)
            continue
        memory = r["memory"]
        peak = memory["peak_mib"] if memory["peak_mib"] is not None else memory["process_peak_mib"]
        rows.append(key + [r["seconds_per_step"], r["unet_seconds"], r["vae_encoder_seconds"], r["render_seconds"],
                           r["other_seconds"],
                           _mib(peak), _mib(memory["increase_mib"]), r.get("preview_seconds")])
    return format_table(headers, rows)


def projection_table(projections: dict) -> str:
    headers = ["dtype", "preset", "steps", "steps s", "previews", "preview s", "total s", "total min",
               "preview every s (64 px)", "(256 px)"]
    rows = []
    for dtype, p in projections.items():
        if p is None:
            rows.append([dtype, "-", None, "not projected (a phase or the preview failed)"] + [None] * 6)
            continue
        for name, q in p["presets"].items():
            interval = q["preview_interval_seconds"]
            cells = [f"{interval[s]['mean']:.2f} (max {interval[s]['max']:.2f})" if s in interval else "-"
                     for s in sorted(q["steps_per_size"])]
            rows.append([dtype, name, q["steps"], q["steps_seconds"], q["previews"], q["preview_render_seconds"],
                         q["seconds"], q["seconds"] / 60, *cells])
    return format_table(headers, rows)


# ----------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtypes", "--dtype", nargs="+", default=None,
                        help="one or more of float32, float16, bfloat16 (default: float32 on CPU, float16 and "
                             "bfloat16 on a GPU)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per phase (default: 1 on CPU, 10 on a GPU)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per phase first")
    parser.add_argument("--phases", default="low,high", help="comma-separated: low (64 px), high (256 px)")
    parser.add_argument("--preset", default="fast", help="the preset whose options the steps run with")
    parser.add_argument("--preview-repeats", type=int, default=None, help="timed preview renders (default: 1 on "
                        "CPU, 5 on a GPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--tiny", action="store_true", help="tiny UNet and VAE: a smoke test of the script")
    parser.add_argument("--json", default=None, help="default: bench/results/sds-<device>.json")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    names = [n for item in (args.dtypes or (["float16", "bfloat16"] if cuda else ["float32"]))
             for n in item.split(",") if n]
    unknown = [n for n in names if n not in DTYPES]
    if unknown:
        parser.error(f"unknown dtype(s) {unknown}: expected {', '.join(DTYPES)}")
    args.dtypes = names
    args.steps = args.steps or (10 if cuda else 1)
    args.preview_repeats = args.preview_repeats or (5 if cuda else 1)
    args.phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    if set(args.phases) - {"low", "high"} or args.steps < 1:
        parser.error("--phases takes low and/or high; --steps at least 1")
    return args


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(phase_worker(json.loads(args.worker))))
        return None
    from recon3d.pipelines.sds import PRESETS

    options = PRESETS[args.preset]
    info = machine_info()
    print(f"Machine: {info['cpu']} ({info['cpu_count']} CPUs), torch {info['torch']}, "
          f"GPU {info['gpu']['name'] if info['gpu'] else 'none'}; SDS on {args.device}", flush=True)
    phases = {"low": (0, options.low_resolution, options.low_resolution_groups),
              "high": (math.ceil(options.high_resolution_from * options.steps), options.high_resolution,
                       options.high_resolution_groups)}
    records = []
    for dtype in args.dtypes:
        for phase in args.phases:
            first_step, size, groups = phases[phase]
            setting = {"device": args.device, "dtype": dtype, "phase": phase, "preset": args.preset,
                       "first_step": first_step, "render_size": size, "groups": groups, "views": options.views,
                       "steps": args.steps, "warmup": args.warmup, "preview": phase == "low",
                       "preview_repeats": args.preview_repeats, "threads": args.threads, "tiny": args.tiny}
            started = time.perf_counter()
            records.append(run_in_process(setting))
            r = records[-1]
            brief = f"{r['seconds_per_step']:.2f} s/step" if r["status"] == "ok" else f"{r['status']}: {r['error']}"
            print(f"  {dtype} {size} px x {groups * options.views} views: {brief} "
                  f"({time.perf_counter() - started:.0f} s in all)", flush=True)
    projections = {dtype: project(records, dtype) for dtype in args.dtypes}
    networks = "tiny UNet and VAE (smoke test)" if args.tiny else "MVDream UNet (SD 2.1-base) + SD VAE"
    print(f"\nOne SDS step ({networks}, random weights) per render phase of the '{args.preset}' preset, on "
          f"{args.device}; mean of {args.steps} step(s) after {args.warmup} warm-up\n(B: views rendered, encoded at "
          f"{256} px, UNet batch 2B; peak MiB: CUDA max allocated, or CPU peak RSS of the process, weights included; "
          f"+MiB: over the start of the timed steps; preview: four {options.preview_size} px views)")
    print(phase_table(records))
    print(f"\nProjected run time (steps x s/step + preview renders, every {options.preview_every} steps, at most one "
          f"per {options.preview_seconds:g} s; without model loading and the mesh export)")
    print(projection_table(projections))
    report = {"machine": info, "args": vars(args), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "networks": networks, "runs": records, "projections": projections}
    if args.device == "cuda" and not args.tiny:
        fast = {d: p["presets"]["fast"] for d, p in projections.items() if p}
        report["target"] = {
            "fast_seconds": TARGET_GPU_SECONDS_FAST, "preview_seconds": TARGET_PREVIEW_SECONDS,
            "reference_v100_minutes": REFERENCE_V100_MINUTES, "gpu": info["gpu"]["name"] if info["gpu"] else None,
            "measured": {d: {"fast_seconds": f["seconds"],
                             "max_preview_interval": max(v["max"] for v in f["preview_interval_seconds"].values()),
                             "met": f["seconds"] < TARGET_GPU_SECONDS_FAST and max(
                                 v["max"] for v in f["preview_interval_seconds"].values()) <= TARGET_PREVIEW_SECONDS}
                         for d, f in fast.items()}}
        print(f"\nTarget: fast preset under {TARGET_GPU_SECONDS_FAST / 60:g} min on an H100 with a preview at least "
              f"every {TARGET_PREVIEW_SECONDS:g} s (reference: {REFERENCE_V100_MINUTES[0]}-"
              f"{REFERENCE_V100_MINUTES[1]} min on a V100)")
        for d, m in report["target"]["measured"].items():
            print(f"  {d}: {m['fast_seconds'] / 60:.1f} min, previews at most {m['max_preview_interval']:.1f} s apart "
                  f"-> {'met' if m['met'] else 'MISSED'}")
    suffix = "-tiny" if args.tiny else ""
    write_report(Path(args.json) if args.json else REPO / "bench" / "results" / f"sds-{args.device}{suffix}.json",
                 report)
    return report


if __name__ == "__main__":
    main()
