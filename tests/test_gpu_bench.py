"""bench/gpu.py, the one GPU acceptance command, runs end to end on a CPU with tiny configurations."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow


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
    checks = [row["check"] for row in report["verdicts"]]
    assert any(c.startswith("SDS bfloat16 fast preset") for c in checks) and "Zero123++ with InstantMesh" in checks
    assert {row["verdict"] for row in report["verdicts"]} == {"not judged (quick or CPU run)", "not measured", "figure only"}
    assert "verdict" in done.stdout and "SDS bfloat16 non-finite steps seen" in done.stdout
