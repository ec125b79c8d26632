import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, glb_summary


def run_cli(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "recon3d", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_many_images_one_call_refused_ones_reported_others_written(tiny_checkpoint, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not really a png")
    out = tmp_path / "out"
    proc = run_cli("image", ROOT / "examples" / "duck.png", bad, ROOT / "examples" / "mug.png", "-o", out,
                   "--model", tiny_checkpoint, "--resolution", 64, "--threshold", "auto", "--turntable",
                   "--turntable-frames", 3, "--turntable-size", 48, cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "broken.png: refused: broken.png: not an image file" in proc.stderr
    for name in ("duck", "mug"):
        glb_summary(out / f"{name}.glb")
        assert (out / f"{name}_input.png").exists() and (out / f"{name}_turntable.gif").exists()
    summaries = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [s["glb"].endswith(".glb") for s in summaries] == [True, True]
    assert "encoder" in summaries[0]["timings_s"]


@pytest.mark.slow
def test_all_good_inputs_exit_zero(tiny_checkpoint, tmp_path):
    proc = run_cli("image", ROOT / "examples" / "pawn.png", "-o", tmp_path, "--model", tiny_checkpoint,
                   "--resolution", 64, "--threshold", "auto", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "pawn.glb").stat().st_size > 1000


@pytest.mark.slow
def test_unavailable_checkpoint_is_one_clear_line_and_exit_2(tmp_path):
    proc = run_cli("image", ROOT / "examples" / "duck.png", "--model", "zxhezexin/openlrm-obj-small-1.1", "--offline",
                   cwd=tmp_path)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("recon3d: error:")]
    assert len(errors) == 1 and "not in the local cache" in errors[0] and "hf download" in errors[0]


@pytest.mark.slow
def test_bad_resolution_is_refused_before_loading(tmp_path):
    proc = run_cli("image", ROOT / "examples" / "duck.png", "--resolution", 9999, "--random-weights", cwd=tmp_path)
    assert proc.returncode == 2 and "between 64 and 512" in proc.stderr


def test_out_of_memory_on_one_input_is_reported_and_the_exit_code_is_1(monkeypatch, tmp_path, capsys):
    import torch

    from recon3d import __main__ as cli

    class Pipe:
        def run(self, path, options):
            yield from ()
            raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(cli, "load_pipeline", lambda args: Pipe())
    code = cli.main(["image", str(ROOT / "examples" / "duck.png"), "-o", str(tmp_path)])
    assert code == 1
    assert "duck.png: refused: Out of memory: try a lower resolution" in capsys.readouterr().err


def test_output_names_keep_inner_dots_and_number_duplicates():
    from pathlib import Path

    from recon3d.__main__ import output_names

    paths = [Path("a/chair.front.png"), Path("a/chair.back.png"), Path("a/x.png"), Path("b/x.png"), Path("noext")]
    assert output_names(paths) == ["chair.front", "chair.back", "x", "x-2", "noext"]


@pytest.mark.slow
def test_bad_turntable_frames_and_devices_are_one_line_errors(tmp_path):
    proc = run_cli("image", ROOT / "examples" / "duck.png", "--random-weights", "--turntable-frames", 0, cwd=tmp_path)
    assert proc.returncode == 2 and "must be at least 1" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("image", ROOT / "examples" / "duck.png", "--random-weights", "--device", "bogus", cwd=tmp_path)
    assert proc.returncode == 2 and "recon3d: error:" in proc.stderr and "Traceback" not in proc.stderr


def test_device_policy_lives_at_the_edge():
    import torch

    from recon3d.devices import choose_device

    assert choose_device("cpu") == (torch.device("cpu"), torch.float32)
    assert choose_device("cpu", "bf16") == (torch.device("cpu"), torch.bfloat16)
    expected = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    assert choose_device()[0] == expected


@pytest.mark.slow
def test_ctrl_c_stops_with_one_line_and_no_traceback(tiny_checkpoint, tmp_path):
    import signal
    import threading
    import time

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "recon3d", "image", str(ROOT / "examples" / "duck.png"),
                             "-o", str(tmp_path), "--model", str(tiny_checkpoint), "--resolution", "512",
                             "--threshold", "auto"],  # minutes on a CPU
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stderr = []
    reader = threading.Thread(target=lambda: stderr.extend(iter(lambda: proc.stderr.read(1), "")), daemon=True)
    reader.start()
    deadline = time.time() + 120
    while time.time() < deadline and "Extracting the mesh" not in "".join(stderr) and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, "".join(stderr)
    proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
    proc.wait(timeout=60)
    reader.join(timeout=10)
    text = "".join(stderr)
    assert proc.returncode == 130, text
    assert f"recon3d: interrupted; the finished outputs are in {tmp_path}" in text and "Traceback" not in text


@pytest.mark.slow
def test_text_writes_previews_and_a_glb_recording_how_it_was_made(tmp_path):
    import pygltflib

    proc = run_cli("text", "a small red cup", "--steps", 2, "--seed", 4, "--random-weights", "--quick-look",
                   "-o", tmp_path, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    glb = tmp_path / "a-small-red-cup-seed4.glb"
    glb_summary(glb)
    extras = pygltflib.GLTF2().load(str(glb)).asset.extras
    assert (extras["prompt"], extras["seed"], extras["steps"], extras["preset"]) == ("a small red cup", 4, 2, "custom")
    assert sorted(p.name for p in tmp_path.glob("*.png"))[-1] == "a-small-red-cup-seed4-quick-look.png"
    assert (tmp_path / "a-small-red-cup-seed4-preview-00001.png").is_file()
    assert json.loads(proc.stdout.splitlines()[-1])["steps_done"] == 2


@pytest.mark.slow
def test_text_ctrl_c_exports_the_state_reached(tmp_path):
    import signal
    import time

    import pygltflib

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "recon3d", "text", "a lamp", "--steps", "500", "--random-weights",
                             "-o", str(tmp_path)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while time.time() < deadline and not list(tmp_path.glob("*preview-00001.png")):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 130, err
    assert "stopping after this step" in err and "Traceback" not in err
    extras = pygltflib.GLTF2().load(str(tmp_path / "a-lamp-seed0.glb")).asset.extras
    assert extras["stopped"] == "stop" and 1 <= extras["steps_done"] < 500


@pytest.mark.slow
def test_text_refuses_an_empty_prompt_and_an_unreachable_model_in_one_line(tmp_path):
    proc = run_cli("text", "  ", "--random-weights", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("recon3d: error: Type a prompt")
    proc = run_cli("text", "a cup", "--model", "ashawkey/mvdream-sd2.1-diffusers", "--offline", cwd=tmp_path)
    assert proc.returncode == 2
    assert "recon3d: error: ashawkey/mvdream-sd2.1-diffusers is not in the local cache and offline mode is on" in proc.stderr


@pytest.mark.parametrize("argv, code, message", [
    (["image", "x.png", "--resolution", "9999", "--random-weights"], 2,
     "recon3d: error: Mesh resolution must be between 64 and 512, got 9999"),
    (["image", "x.png", "--foreground-ratio", "0.1", "--random-weights"], 2,
     "recon3d: error: Foreground ratio must be between 0.5 and 1, got 0.1"),
    (["sample", "x.png", "--steps", "0", "--random-weights"], 2, "recon3d: error: Steps must be between 1 and 200, got 0"),
    (["sample", "x.png", "--seeds", "3,3", "--random-weights"], 2, "recon3d: error: Each seed may appear once"),
    (["text", "a cup", "--preset", "quality", "--steps", "5", "--random-weights"], 2,
     "recon3d: error: The quality preset runs 10,000 steps; choose custom to set your own"),
    (["text", "a cup", "--guidance", "500", "--random-weights"], 2,
     "recon3d: error: Guidance scale must be between 0 and 200, got 500"),
    (["text", " ", "--random-weights"], 2, "recon3d: error: Type a prompt"),
    (["image", "x.png", "--random-weights", "--device", "bogus"], 2, "recon3d: error: Unknown device 'bogus'"),
    (["image", "x.png", "--random-weights", "--formats", "glb,fbx"], 2,
     "recon3d: error: Unknown export format fbx: choose from glb, obj, ply, stl"),
    (["sample", "x.png", "--random-weights", "--texture", "10"], 2,
     "recon3d: error: Texture size must be between 64 and 8192, got 10"),
    (["text", "a cup", "--random-weights", "--faces", "many"], 2, "recon3d: error: Face budget must be a number"),
])
def test_cli_refuses_options_with_the_librarys_sentence_before_loading(argv, code, message, capsys):
    from recon3d import __main__ as cli

    assert cli.main(argv) == code
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cli_text_steps_alone_mean_custom_and_the_recipe_is_the_librarys(monkeypatch, tmp_path, capsys):
    from recon3d import __main__ as cli

    seen = []

    class Pipe:
        parts = type("Parts", (), {"notes": []})()

        def generate(self, prompt, options, control=None, source=None):
            seen.append(options)
            return iter(())

    monkeypatch.setattr(cli, "load_text_pipeline", lambda args: Pipe())
    assert cli.main(["text", "a cup", "--steps", "7", "--seed", "3", "-o", str(tmp_path)]) == 0
    assert (seen[0].preset, seen[0].steps, seen[0].seed, seen[0].label) == ("custom", 7, 3, "custom")
    assert seen[0].guidance_scale == 50.0  # the library's default, not restated by the CLI
    assert seen[0].negative_prompt.startswith("ugly, bad anatomy")  # the reference's negative prompt by default
    assert cli.main(["text", "a cup", "-o", str(tmp_path), "--negative", ""]) == 0 and seen[1].label == "fast"
    assert seen[1].negative_prompt == ""  # cleared on request


@pytest.mark.slow
def test_sample_instantmesh_from_local_files_writes_glbs_views_and_refuses_bad_steps(tmp_path, capsys):
    """The issue's command on tiny checkpoints in the published layouts: a Zero123++ folder, InstantMesh's UNet
    state dict, an InstantNeRF .ckpt with its yaml."""
    from PIL import Image

    from recon3d import __main__ as cli
    from recon3d.models.instant_nerf import TINY_INSTANT_NERF_CONFIG, random_instant_nerf
    from recon3d.models.zero123plus import random_zero123plus_parts
    from recon3d.testing import write_instant_nerf_checkpoint, write_unet_state_dict, write_zero123plus_layout

    parts = random_zero123plus_parts(seed=1)
    diffusion = write_zero123plus_layout(parts, tmp_path / "zero123plus")
    unet = write_unet_state_dict(parts.unet, tmp_path / "instantmesh" / "diffusion_pytorch_model.bin")
    nerf = write_instant_nerf_checkpoint(random_instant_nerf(TINY_INSTANT_NERF_CONFIG), tmp_path / "nerf.ckpt")
    yaml = tmp_path / "instant-nerf-tiny.yaml"
    yaml.write_text("model_config:\n  params:\n" + "".join(f"    {k}: {v}\n" for k, v in TINY_INSTANT_NERF_CONFIG.to_dict().items()))
    photo = tmp_path / "photo.png"
    image = Image.new("RGBA", (80, 80), (0, 0, 0, 0))
    image.paste((40, 90, 220, 255), (20, 10, 60, 70))
    image.save(photo)
    out = tmp_path / "out"
    common = ["sample", str(photo), "--method", "instantmesh", "--diffusion", str(diffusion), "--unet", str(unet),
              "--reconstructor", str(nerf), "--reconstructor-config", str(yaml), "-o", str(out)]
    assert cli.main([*common, "--steps", "2", "--reconstruct-at", "5"]) == 2
    assert "reconstruction steps must be between 1 and the 2 steps" in capsys.readouterr().err.lower()
    assert cli.main([*common, "--seeds", "1,7", "--steps", "1", "--guidance", "3", "--resolution", "64"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [line["seed"] for line in lines] == [1, 7]
    for seed in (1, 7):
        glb_summary(out / f"seed-{seed}.glb")
        assert Image.open(out / f"seed-{seed}-views.png").size == (640, 960)  # 3 rows x 2 columns of 320 px
    import pygltflib

    extras = pygltflib.GLTF2().load(str(out / "seed-7.glb")).asset.extras
    assert extras["unet"] == str(unet) and extras["reconstructor"] == str(nerf) and extras["guidance"] == 3.0
    assert extras["checkpoint"] == str(diffusion) and extras["random_weights"] is False


@pytest.mark.slow
def test_every_command_exports_the_asked_formats_with_a_face_budget_and_a_texture(tmp_path, capsys):
    """image, sample and text with --formats/--faces/--texture: OBJ + MTL + PNG, PLY, STL and a textured GLB beside
    each other, listed in the command's JSON line (random weights: the path, not the shapes)."""
    import pygltflib

    from recon3d import __main__ as cli

    export = ["--formats", "glb,obj,ply,stl", "--faces", "500", "--texture", "128", "--random-weights"]
    runs = {"image": ["image", ROOT / "examples" / "duck.png", "--resolution", "64", "--threshold", "auto"],
            "sample": ["sample", ROOT / "examples" / "duck.png", "--seeds", "3", "--steps", "2", "--resolution", "64"],
            "text": ["text", "a red cup", "--steps", "2", "--seed", "1"]}
    for name, argv in runs.items():
        out = tmp_path / name
        assert cli.main([*map(str, argv), "-o", str(out), *export]) == 0, capsys.readouterr().err
        line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        for ext in ("glb", "obj", "ply", "stl"):
            assert line[ext].endswith(f".{ext}") and os.path.getsize(line[ext]) > 0, (name, line)
        stem = line["obj"][:-len(".obj")]
        assert os.path.exists(stem + ".mtl") and os.path.exists(stem + ".png"), name
        gltf = pygltflib.GLTF2().load(line["glb"])
        assert gltf.meshes[0].primitives[0].attributes.TEXCOORD_0 is not None and len(gltf.images) == 1, name
        assert gltf.asset.extras["export"]["texture"] == 128 and gltf.asset.extras["export"]["faces"] <= 500, name


@pytest.mark.slow
def test_two_processes_share_the_images_and_write_the_files_of_one(tmp_path):
    """``accelerate launch --num_processes 2 -m recon3d image ...`` on the CPU: each process takes its share, the
    files are byte for byte those of a single-process run, and one refused input makes the job's exit code 1."""
    images = [ROOT / "examples" / name for name in ("duck.png", "mug.png", "pawn.png")]
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    flags = ["--random-weights", "--resolution", "64", "--formats", "glb,stl"]
    single = run_cli("image", *images, "-o", tmp_path / "one", *flags, cwd=tmp_path)
    assert single.returncode == 0, single.stderr
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "recon3d", "image"]
    shared = subprocess.run([*launch, *map(str, [*images, bad]), "-o", str(tmp_path / "two"), *flags], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=600)
    assert shared.returncode == 1, shared.stderr[-3000:]  # bad.png was refused by one process: the job says so
    assert "bad.png: not an image file" in shared.stderr
    assert {"[0] duck.png", "[0] mug.png", "[1] pawn.png", "[1] bad.png"} <= set(
        part.split(":")[0] for part in shared.stderr.replace("\r", "\n").split("\n") if part.startswith("["))
    written = sorted(path.name for path in (tmp_path / "one").iterdir())
    assert written == sorted(path.name for path in (tmp_path / "two").iterdir()) and len(written) == 9
    for name in written:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
