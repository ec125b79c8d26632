"""bench/gpu.py, the one GPU acceptance command, runs end to end on a CPU with tiny configurations."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT


@pytest.mark.slow
def test_the_gpu_acceptance_command_runs_every_path_on_a_cpu(tmp_path):
    out = tmp_path / "gpu-cpu-quick.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--device", "cpu", "--quick", "--json",
                           str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [r["dtype"] for r in report["lrm"]] == ["float32", "float16", "bfloat16"]
    assert all(r["status"] == "ok" and r["seconds"]["total"] > 0 for r in report["lrm"])
    assert all(r["surface_voxels"]["p95"] < 1.0 for r in report["lrm"][1:])  # half precision: the same surface
    assert [r["mode"] for r in report["render"]] == ["forward", "forward+backward"]
    assert all(r["status"] == "ok" and r["rays_per_second"] > 0 for r in report["render"])
    assert report["dmv3d"]["status"] == "ok" and report["dmv3d"]["seconds_at_target_steps"] > 0
    assert report["seed_in_batch"]["relative_difference"] < 1e-2
    runs = report["sds"]["runs"]
    assert {(r["dtype"], r["phase"]) for r in runs} == {("bfloat16", "low"), ("bfloat16", "high")}
    assert all(r["status"] == "ok" and r["seconds_per_step"] > 0 and r["non_finite"] == [] for r in runs)
    fast = report["sds"]["projections"]["bfloat16"]["presets"]["fast"]
    assert fast["steps"] == 2000 and fast["seconds"] > 0 and fast["previews"] >= 2000 // 10
    multiview = report["zero123plus_instantmesh"]["records"][0]
    assert multiview["seeds"] == 4 and multiview["step_s"] > 0 and multiview["reconstruct_s"] > 0
    assert multiview["loop_step_s"] > 0 and multiview["mesh_s"] > 0 and multiview["job_projection_s"] > 0
    export = report["export"]
    assert export["faces"] <= 5000 and export["texture"] == 256 and export["seconds"]["bake"] > 0
    checks = [row["check"] for row in report["verdicts"]]
    assert any(c.startswith("SDS bfloat16 fast preset") for c in checks)
    assert "Zero123++ -> InstantMesh 4 seeds x 75 steps + meshes, projected seconds" in checks
    assert "Export 5,000 faces + 256^2 texture, seconds (bake on the device)" in checks
    assert {row["verdict"] for row in report["verdicts"]} == {"not judged (quick or CPU run)", "figure only"}
    assert "verdict" in done.stdout and "SDS bfloat16 non-finite steps seen" in done.stdout


def gpu_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "bench" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_verdicts_of_a_full_gpu_run_judge_each_target_and_flag_failures():
    gpu = gpu_module()
    lrm = [{"dtype": "float32", "size": "base", "resolution": 256, "status": "ok", "seconds": {"total": 0.8}},
           {"dtype": "float16", "size": "base", "resolution": 256, "status": "ok", "seconds": {"total": 1.4},
            "surface_voxels": {"p95": 0.3}},
           {"dtype": "bfloat16", "size": "base", "resolution": 256, "status": "OOM", "error": "out of memory"}]
    interval = {256: {"mean": 2.0, "max": 6.0}, 64: {"mean": 1.0, "max": 2.0}}
    report = {"quick": False, "device": "cuda", "lrm": lrm,
              "render": [{"status": "ok", "batch": 4, "views": 4, "size": 256, "mode": "forward", "rays_per_second": 1e7}],
              "dmv3d": {"status": "ok", "config": "paper", "seeds": 4, "dtype": "bfloat16", "seconds_at_target_steps": 12.0},
              "seed_in_batch": {"status": "failed", "error": "RuntimeError: boom"},
              "sds": {"runs": [{"dtype": "float16", "status": "ok", "non_finite": [3]},
                               {"dtype": "float16", "status": "ok", "non_finite": [7, 9]}],
                      "projections": {"float16": {"presets": {"fast": {"seconds": 250.0,
                                                                        "preview_interval_seconds": interval}}}}},
              "zero123plus_instantmesh": {"records": [{"seeds": 4, "job_projection_s": 41.0, "loop_step_s": 0.4}],
                                          "loop_effect": {"without": {"consistency_psnr_db": [20.0, 22.0],
                                                                      "input_view_psnr_db": [15.0, 15.0]},
                                                          "with": {"consistency_psnr_db": [24.0, 26.0],
                                                                   "input_view_psnr_db": [14.0, 15.0]}}}}
    verdict = {row["check"]: row["verdict"] for row in gpu.verdicts(report)}
    assert verdict["LRM base 256^3 float32 image -> GLB seconds"] == "met"
    assert verdict["LRM base 256^3 float16 image -> GLB seconds"] == "MISSED"
    assert verdict["LRM float16 surface vs float32 (p95 voxels)"] == "met"
    assert verdict["LRM base 256^3 bfloat16 image -> GLB seconds"] == "FAILED"
    assert verdict["DMV3D paper 4 seeds bfloat16 seconds (30 steps)"] == "met"
    assert verdict["DMV3D seed alone vs in a batch (relative)"] == "FAILED"
    assert verdict["SDS float16 fast preset projected seconds"] == "met"
    assert verdict["SDS float16 largest preview interval (s)"] == "MISSED"  # 6 s > 5 s
    rows = {row["check"]: row for row in gpu.verdicts(report)}
    assert rows["SDS float16 non-finite steps seen"]["measured"] == 3  # both phases counted
    assert verdict["SDS float16 non-finite steps seen"] == "MISSED"
    assert verdict["Zero123++ -> InstantMesh 4 seeds x 75 steps + meshes, projected seconds"] == "MISSED"  # 41 s > 30
    assert rows["Zero123++ -> InstantMesh views vs their reconstruction, PSNR dB (without / with loop)"]["measured"] \
        == "21.00 / 25.00"
    assert rows["Zero123++ -> InstantMesh photo vs the reconstruction from its side, PSNR dB (without / with loop)"][
        "measured"] == "15.00 / 14.50"
