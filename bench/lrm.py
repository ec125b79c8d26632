"""Benchmark image -> GLB with LRM: seconds per stage, peak memory and field-query counts.

Run from the repository root::

    PYTHONPATH=. python bench/lrm.py --quick                          # tiny model at 64^3: a smoke test in seconds
    PYTHONPATH=. python bench/lrm.py                                  # small/base/large at 256^3 and 384^3
    PYTHONPATH=. python bench/lrm.py --sizes base --resolutions 256 --devices cuda --dtypes float16 --repeats 3

The models are the published OpenLRM configs with random weights: the speed of the network does not depend on
the weights, but a random field is noisy, so its surface (and the cost of the mesh stages) is larger than a real
object's. The second table therefore also counts coarse-to-fine vs dense field queries on the smooth example
objects of ``examples/make_examples.py``. Each device/dtype/size gets one warm-up run at 64^3 that is not
reported. Results go to a table on stdout and to ``bench/results/lrm-<device kind>.json``.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import tempfile
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # a clone's recon3d, installed or not (every bench script imports this one)

from recon3d import ImageTo3D, ImageTo3DOptions, run_to_end  # noqa: E402
from recon3d.mesh import RESOLUTION, EmptyMeshError, coarse_to_fine_grid  # noqa: E402
from recon3d.models.lrm import PUBLISHED_CONFIGS, TINY_LRM_CONFIG, LRMConfig  # noqa: E402
STAGES = ("preprocess", "remove_background", "encoder", "transformer", "grid_queries", "marching_cubes", "vertex_colors", "glb_write")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
OOM_ERRORS = (torch.OutOfMemoryError, MemoryError)
TARGET_GPU_SECONDS = 1.0  # image -> GLB, base, 256^3, on a GPU
TARGET_QUERY_RATIO = 5.0  # dense / coarse-to-fine queries at 256^3
EXAMPLE_LEVEL = 200.0  # ShadedSDF density is 400 * sigmoid(-150 d): 200 is the zero set of the SDF
WARMUP_RESOLUTION = int(RESOLUTION.low)


# ----------------------------------------------------------------------------- configs and machine

def load_config(size: str) -> tuple[LRMConfig, str]:
    """The published config of ``size`` (small, base, large) or the tiny test config, and its name."""
    if size == "tiny":
        return TINY_LRM_CONFIG, "recon3d.models.lrm.TINY_LRM_CONFIG"
    if size not in PUBLISHED_CONFIGS:
        raise SystemExit(f"unknown size {size!r}: expected one of tiny, {', '.join(PUBLISHED_CONFIGS)}")
    return PUBLISHED_CONFIGS[size], f"recon3d.models.lrm.PUBLISHED_CONFIGS[{size!r}]"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info() -> dict:
    info = {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "git_commit": git_commit(), "gpu": None}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": props.name, "memory_gib": round(props.total_memory / 2 ** 30, 1),
                       "cuda_version": torch.version.cuda, "count": torch.cuda.device_count()}
    return info


# ----------------------------------------------------------------------------- memory

def _proc_status_kib() -> dict[str, int]:
    values = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(("VmHWM:", "VmRSS:")):
                key, value = line.split(":", 1)
                values[key] = int(value.split()[0])
    except OSError:
        pass
    return values


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _is_cuda(device: torch.device) -> bool:
    return device.type == "cuda"


class MemoryMeter:
    """Peak memory of one run: CUDA allocator peak on GPUs, resident set size on CPU."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self) -> "MemoryMeter":
        gc.collect()
        if _is_cuda(self.device):
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
        else:
            self.reset = _reset_peak_rss()
            self.before = _proc_status_kib().get("VmRSS", 0) * 1024
        return self

    def __exit__(self, *exc) -> None:
        mib = 2 ** 20
        if _is_cuda(self.device):
            peak = torch.cuda.max_memory_allocated(self.device)
            self.result = {"kind": "cuda_max_memory_allocated", "before_mib": self.before / mib,
                           "peak_mib": peak / mib, "increase_mib": (peak - self.before) / mib,
                           "reserved_peak_mib": torch.cuda.max_memory_reserved(self.device) / mib}
            return
        hwm = _proc_status_kib().get("VmHWM", 0) * 1024
        ru_maxrss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        self.result = {"kind": "process_rss", "before_mib": self.before / mib, "process_peak_mib": ru_maxrss_mib,
                       "peak_mib": hwm / mib if self.reset else None,
                       "increase_mib": (hwm - self.before) / mib if self.reset else None}


# ----------------------------------------------------------------------------- one LRM run

def make_pipe(cfg: LRMConfig, device: torch.device, dtype: torch.dtype) -> ImageTo3D:
    pipe = ImageTo3D.random(cfg, seed=0, device=device, dtype=dtype)
    pipe.random_weights = False  # the normal export path, not the random-weights shortcut (largest part only)
    return pipe


def run_once(pipe: ImageTo3D, image: str, resolution: int, workdir: Path, remove_background: bool = False) -> dict:
    """One image -> GLB: stage seconds, memory and query counts. With ``remove_background`` the app's default
    path: rembg runs as its own stage (when its model is installed; otherwise the run notes why not)."""
    options = ImageTo3DOptions(mesh_resolution=resolution, remove_background=remove_background,
                               density_threshold=None)
    with MemoryMeter(pipe.device) as meter:
        start, result = time.perf_counter(), None
        result = run_to_end(pipe.run(image, options))
        glb_start = time.perf_counter()
        glb = result.save_glb(workdir / f"bench-{resolution}.glb")
        end = time.perf_counter()
    seconds = {stage: result.timings.get(stage) for stage in STAGES[:-1]}
    seconds["glb_write"] = end - glb_start
    seconds["total"] = end - start
    stats = dict(result.stats, glb_bytes=glb.stat().st_size)
    return {"seconds": seconds, "memory": meter.result, "stats": stats, "notes": result.notes}


def summarize(runs: list[dict]) -> dict:
    """Median seconds over the repeats, the largest peak memory, the first run's counts."""
    seconds = {key: None if runs[0]["seconds"][key] is None else statistics.median(run["seconds"][key] for run in runs)
               for key in runs[0]["seconds"]}
    memory = dict(runs[0]["memory"])
    for key in ("peak_mib", "increase_mib", "process_peak_mib", "reserved_peak_mib"):
        if memory.get(key) is not None:
            memory[key] = max(run["memory"][key] for run in runs)
    stats = runs[0]["stats"]
    queries = {"coarse_to_fine": stats["field_queries"], "dense": stats["dense_queries"],
               "ratio": stats["dense_queries"] / max(1, stats["field_queries"])}
    return {"seconds": seconds, "memory": memory, "queries": queries}


def _free(device: torch.device) -> None:
    gc.collect()
    if _is_cuda(device):
        torch.cuda.empty_cache()


def bench_setting(size: str, device: torch.device, dtype_name: str, args: argparse.Namespace) -> list[dict]:
    """All resolutions of one size on one device and dtype; OOM and empty meshes are recorded, not raised."""
    cfg, source = load_config(size)
    base = {"size": size, "config_source": source, "device": device.type, "dtype": dtype_name,
            "remove_background": args.remove_background}
    records, pipe = [], None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            pipe = make_pipe(cfg, device, DTYPES[dtype_name])
            run_once(pipe, args.image, WARMUP_RESOLUTION, Path(tmp))  # warm-up, not reported
        except OOM_ERRORS + (EmptyMeshError,) as error:  # the model or the warm-up did not fit: skip the size
            return [dict(base, resolution=r, status=_status(error), error=str(error)) for r in args.resolutions]
        for resolution in args.resolutions:
            record = dict(base, resolution=resolution)
            try:
                runs = [run_once(pipe, args.image, resolution, Path(tmp), args.remove_background)
                        for _ in range(args.repeats)]
                record.update(status="ok", runs=runs, **summarize(runs))
            except OOM_ERRORS + (EmptyMeshError,) as error:
                record.update(status=_status(error), error=str(error))
            _free(device)
            records.append(record)
            print(f"  {size} {device.type} {dtype_name} {resolution}^3: {_record_brief(record)}", flush=True)
    del pipe
    _free(device)
    return records


def _status(error: BaseException) -> str:
    return "OOM" if isinstance(error, OOM_ERRORS) else "no surface"


def _record_brief(record: dict) -> str:
    if record["status"] != "ok":
        return record["status"]
    return f"{record['seconds']['total']:.2f} s"


# ----------------------------------------------------------------------------- example objects

def _load_examples():
    """examples/make_examples.py as a module (the examples folder is not a package)."""
    spec = importlib.util.spec_from_file_location("make_examples", REPO / "examples" / "make_examples.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _DensityOnly:
    """A ShadedSDF's density without its shading (which costs three more SDF evaluations per point)."""

    def __init__(self, sdf_field):
        self.sdf_field = sdf_field

    def query(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        distance, _ = self.sdf_field.sdf_and_albedo(points)
        density = 400.0 * torch.sigmoid(-distance * 150.0)
        return density[:, None], torch.zeros(len(points), 3)


def example_queries(resolutions: list[int]) -> list[dict]:
    """Coarse-to-fine vs dense query counts on the smooth example objects (dense is resolution^3)."""
    examples = _load_examples()
    records = []
    for name, parts in examples.objects().items():
        field = _DensityOnly(examples.ShadedSDF(parts))
        for resolution in resolutions:
            start = time.perf_counter()
            grid = coarse_to_fine_grid(field, resolution, EXAMPLE_LEVEL)
            records.append({"object": name, "resolution": resolution, "coarse_to_fine": grid.queries,
                            "dense": resolution ** 3, "ratio": resolution ** 3 / grid.queries,
                            "seconds": time.perf_counter() - start, **grid.stats})
    return records


# ----------------------------------------------------------------------------- output

def format_table(headers: list[str], rows: list[list]) -> str:
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [max(len(h), *(len(row[i]) for row in cells)) if cells else len(h) for i, h in enumerate(headers)]

    def line(values: list[str]) -> str:
        return "  ".join(value.rjust(width) for value, width in zip(values, widths))

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(row) for row in cells])


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if value < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def stage_table(records: list[dict]) -> str:
    headers = ["size", "device", "dtype", "res", *STAGES, "total", "peak MiB", "+MiB"]
    rows = []
    for r in records:
        key = [r["size"], r["device"], r["dtype"], r["resolution"]]
        if r["status"] != "ok":
            rows.append(key + [r["status"]] + [None] * (len(headers) - 5))
            continue
        memory = r["memory"]
        peak = memory["peak_mib"] if memory["peak_mib"] is not None else memory["process_peak_mib"]
        rows.append(key + [r["seconds"][s] for s in (*STAGES, "total")] + [_mib(peak), _mib(memory["increase_mib"])])
    return format_table(headers, rows)


def _mib(value: float | None) -> int | None:
    return None if value is None else round(value)


def query_table(records: list[dict]) -> str:
    headers = ["size", "device", "dtype", "res", "coarse-to-fine", "dense", "dense/c2f"]
    rows = [[r["size"], r["device"], r["dtype"], r["resolution"], r["queries"]["coarse_to_fine"],
             r["queries"]["dense"], r["queries"]["ratio"]]
            for r in records if r["status"] == "ok"]
    return format_table(headers, rows)


def example_table(records: list[dict]) -> str:
    headers = ["object", "res", "coarse-to-fine", "dense", "dense/c2f", "active cells", "seconds"]
    rows = [[r["object"], r["resolution"], r["coarse_to_fine"], r["dense"], r["ratio"],
             f"{r['active_cells']:,}/{r['cells']:,}" if "active_cells" in r else "dense grid", r["seconds"]]
            for r in records]
    return format_table(headers, rows)


def check_targets(records: list[dict], examples: list[dict]) -> dict:
    """Whether the measured numbers meet the issue's targets (None: not measured here)."""
    gpu = [r for r in records if r["device"] != "cpu" and r["size"] == "base" and r["resolution"] == 256]
    gpu_seconds = {r["dtype"]: r["seconds"]["total"] if r["status"] == "ok" else r["status"] for r in gpu}
    ratios = [r["ratio"] for r in examples if r["resolution"] == 256]
    return {
        "gpu_base_256_seconds": gpu_seconds or None,
        "gpu_base_256_under_1s": {d: isinstance(s, float) and s < TARGET_GPU_SECONDS for d, s in gpu_seconds.items()}
        or None,
        "examples_256_min_ratio": min(ratios) if ratios else None,
        "examples_256_median_ratio": statistics.median(ratios) if ratios else None,
        "examples_256_at_least_5x": min(ratios) >= TARGET_QUERY_RATIO if ratios else None,
    }


def print_report(records: list[dict], examples: list[dict], targets: dict) -> None:
    path = ("background removal on (the app's default path for photos without transparency)"
            if args_remove_background(records) else "background removal off (as for images with transparency)")
    print(f"\nImage -> GLB, seconds per stage (median of repeats) and peak memory; {path}"
          "\n(peak MiB: CUDA max allocated, or CPU peak RSS of the process during the run; +MiB: over the start)")
    print(stage_table(records))
    print("\nField queries on the random-weight LRM field (noisy: a pessimistic case)"
          "\n(coarse-to-fine includes the lattice that picks the automatic level)")
    print(query_table(records))
    print(f"\nCoarse-to-fine vs dense on the example objects (level {EXAMPLE_LEVEL:g} = the SDF surface)")
    print(example_table(examples))
    print(f"\nTargets: on a GPU image -> GLB for base at 256^3 under {TARGET_GPU_SECONDS:g} s; "
          f"coarse-to-fine >= {TARGET_QUERY_RATIO:g}x fewer queries at 256^3 on a typical object")
    print(f"  GPU base 256^3: {_target_text(targets['gpu_base_256_seconds'], targets['gpu_base_256_under_1s'])}")
    print(f"  example objects at 256^3: min ratio {_cell(targets['examples_256_min_ratio'])}, median "
          f"{_cell(targets['examples_256_median_ratio'])} -> {_verdict(targets['examples_256_at_least_5x'])}")


def args_remove_background(records: list[dict]) -> bool:
    return any(r.get("remove_background") for r in records)


def _target_text(seconds: dict | None, met: dict | None) -> str:
    if not seconds:
        return "not measured (no GPU run of base at 256)"
    return ", ".join(f"{d} {_cell(s)} s -> {_verdict(met[d])}" for d, s in seconds.items())


def _verdict(met: bool | None) -> str:
    return "not measured" if met is None else ("met" if met else "MISSED")


# ----------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="small,base,large", help="comma-separated: small, base, large, tiny")
    parser.add_argument("--resolutions", default="256,384", help="comma-separated mesh resolutions")
    parser.add_argument("--devices", default="cpu,cuda" if cuda else "cpu", help="comma-separated torch devices")
    parser.add_argument("--dtypes", default=None,
                        help="comma-separated: float32, bfloat16, float16 (default: float32 on CPU, all three on GPU)")
    parser.add_argument("--repeats", type=int, default=1, help="measured runs per setting (after one warm-up)")
    parser.add_argument("--image", default=str(REPO / "examples" / "duck.png"))
    parser.add_argument("--json", default=None, help="default: bench/results/lrm-<device kind>.json")
    parser.add_argument("--quick", action="store_true", help="tiny config at 64^3 only: a smoke test")
    parser.add_argument("--remove-background", action="store_true",
                        help="the app's default path: background removal (rembg u2net) runs and is timed as a stage")
    args = parser.parse_args(argv)
    args.sizes, args.devices = _split(args.sizes), _split(args.devices)
    args.resolutions = [int(r) for r in _split(args.resolutions)]
    if args.quick:
        args.sizes, args.resolutions = ["tiny"], [WARMUP_RESOLUTION]
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def dtypes_for(device: torch.device, requested: str | None) -> list[str]:
    names = _split(requested) if requested else (["float32"] if device.type == "cpu" else list(DTYPES))
    unknown = [n for n in names if n not in DTYPES]
    if unknown:
        raise SystemExit(f"unknown dtype(s) {unknown}: expected {', '.join(DTYPES)}")
    return names


def json_path(args: argparse.Namespace, devices: list[torch.device]) -> Path:
    if args.json:
        return Path(args.json)
    kind = next((d.type for d in devices if d.type != "cpu"), "cpu")
    return REPO / "bench" / "results" / f"lrm-{kind}{'-quick' if args.quick else ''}.json"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    devices = [torch.device(d) for d in args.devices]
    info = machine_info()
    print(f"Machine: {info['cpu']} ({info['cpu_count']} CPUs), torch {info['torch']}, "
          f"GPU {info['gpu']['name'] if info['gpu'] else 'none'}", flush=True)
    records = []
    for device in devices:
        for dtype_name in dtypes_for(device, args.dtypes):
            for size in args.sizes:
                records += bench_setting(size, device, dtype_name, args)
    print("  counting coarse-to-fine queries on the example objects...", flush=True)
    examples = example_queries(args.resolutions)
    targets = check_targets(records, examples)
    print_report(records, examples, targets)
    report = {"machine": info, "args": vars(args), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "warmup_resolution": WARMUP_RESOLUTION, "targets": targets, "runs": records, "examples": examples}
    write_report(json_path(args, devices), report)
    return report


def write_report(path: Path, report: dict) -> None:
    """The JSON report, in a folder made when missing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
