"""recon3d as an installed package: a wheel of this clone, installed elsewhere, runs the CLI from any folder with
the shipped demo model as package data."""

import json
import os
import subprocess
import sys
import zipfile

import pytest
from conftest import ROOT, glb_summary

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The wheel built from the clone (as `pip install .` builds it), installed without its dependencies (this
    environment has them) into a folder of its own; (wheel, site folder)."""
    wheels, site = tmp_path_factory.mktemp("wheels"), tmp_path_factory.mktemp("site")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    built = subprocess.run([*pip, "wheel", "--no-deps", "-w", str(wheels), str(ROOT)], capture_output=True,
                           text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    wheel = next(wheels.glob("recon3d-*.whl"))
    done = subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return wheel, site


def test_the_wheel_holds_the_demo_model_and_the_console_script(installed):
    wheel, _ = installed
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(archive.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    for name in ("config.json", "model.safetensors", "README.md"):
        shipped = ROOT / "assets" / "checkpoints" / "dmv3d-demo" / name
        packaged = f"recon3d/assets/checkpoints/dmv3d-demo/{name}"
        assert packaged in names and archive_bytes(wheel, packaged) == shipped.read_bytes()
    assert "recon3d = recon3d.__main__:main_exit" in entry_points
    assert not any(n.startswith(("tests/", "bench/", "examples/")) for n in names)


def archive_bytes(wheel, name):
    with zipfile.ZipFile(wheel) as archive:
        return archive.read(name)


def test_recon3d_sample_runs_from_another_folder_on_the_packaged_demo_model(installed, tmp_path):
    _, site = installed
    env = {**os.environ, "PYTHONPATH": str(site)}  # the installed copy, not the clone
    work = tmp_path / "elsewhere"
    work.mkdir()
    photo = work / "photo.png"
    photo.write_bytes((ROOT / "examples" / "duck.png").read_bytes())
    script = site / "bin" / "recon3d"
    helped = subprocess.run([str(script), "--help"], cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0 and "usage: recon3d" in helped.stdout and "sample" in helped.stdout
    where = subprocess.run([sys.executable, "-c", "import recon3d.checkpoints as c; print(c.demo_dmv3d())"],
                           cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert where.stdout.strip().startswith(str(site)), where.stdout + where.stderr  # package data, not the clone
    ran = subprocess.run([str(script), "sample", "photo.png", "--seeds", "1", "--steps", "2", "--resolution", "64",
                          "--no-remove-background"], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr[-3000:]
    record = json.loads(ran.stdout.strip().splitlines()[-1])
    positions, _, _, indices = glb_summary(work / record["glb"])
    assert record["seed"] == 1 and len(indices) > 0 and (work / "outputs" / "seed-1.glb").is_file()
