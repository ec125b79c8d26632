"""DMV3D: the model, its checkpoint format, the seeded sampler and the trainer, on tiny random models."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from recon3d.hub import CheckpointError
from recon3d.models.dmv3d import (CONFIGS, DEMO_CONFIG, DMV3D, TINY_DMV3D_CONFIG, DMV3DConfig, align_to_first_view,
                                  canonical_views, new_dmv3d)
from recon3d.pipelines.events import Finished, Preview, SampleReady, Stage
from recon3d.pipelines.sample_3d import Sample3D, SampleOptions, parse_seeds
from recon3d.testing import place_in_hub_cache

from conftest import ROOT, glb_summary

DUCK = ROOT / "examples" / "duck.png"


def opened(seed=0):
    """A tiny DMV3D with its adaLN-Zero gates opened at random, so that every input reaches the planes."""
    model = new_dmv3d(TINY_DMV3D_CONFIG, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in model.transformer.layers:
            for linear in (layer.norm1.mlp[1], layer.norm2.mlp[1], layer.norm3.mlp[1], layer.gates[1]):
                linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator) * 0.1)
                linear.bias.fill_(0.5)
    return model.eval()


def inputs(n=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    c2w, intrinsics = canonical_views(4)
    views = torch.rand((n, 4, 3, 16, 16), generator=generator) * 2 - 1
    return views, c2w.expand(n, -1, -1, -1).clone(), intrinsics.expand(n, -1, -1), torch.tensor([10, 700][:n])


def test_shapes_and_the_x0_renders():
    model = opened()
    views, c2w, intrinsics, t = inputs()
    planes = model(views, c2w, intrinsics, t)
    assert planes.shape == (2, 3, 8, 8, 8)  # (N, 3, C, 2l, 2l)
    x0 = model.render(planes, c2w, intrinsics)
    assert x0.shape == (2, 4, 3, 16, 16) and x0.min() >= -1.0 and x0.max() <= 1.0
    planes_again, renders = model(views, c2w, intrinsics, t, None, c2w[:, :2], intrinsics[:, :2], None, 8)
    assert torch.equal(planes_again, planes) and renders.shape == (2, 2, 3, 8, 8)


def test_adaln_zero_starts_as_identity_and_every_input_matters_once_open():
    fresh = new_dmv3d(TINY_DMV3D_CONFIG, 0).eval()
    views, c2w, intrinsics, t = inputs()
    other_views = torch.rand_like(views) * 2 - 1
    assert torch.allclose(fresh(views, c2w, intrinsics, t), fresh(other_views, c2w, intrinsics, t))  # gates closed
    model = opened()
    base = model(views, c2w, intrinsics, t)
    changed_view = views.clone()
    changed_view[:, 2] = -changed_view[:, 2]
    moved = c2w.clone()
    moved[:, 1, :3, 3] *= 1.2  # one camera moves: only its Plucker rays change
    for name, output in {"view 2": model(changed_view, c2w, intrinsics, t),
                         "camera 1": model(views, moved, intrinsics, t),
                         "time": model(views, c2w, intrinsics, t.flip(0))}.items():
        assert (output - base).abs().max() > 1e-4, f"{name} does not reach the planes"


def test_text_embeddings_are_cross_attended_when_configured():
    model = opened()
    views, c2w, intrinsics, t = inputs()
    text = torch.randn(2, 5, TINY_DMV3D_CONFIG.text_embed_dim)
    with_text = model(views, c2w, intrinsics, t, text)
    assert (with_text - model(views, c2w, intrinsics, t, text * -1)).abs().max() > 1e-4
    image_only = new_dmv3d(DMV3DConfig(**{**TINY_DMV3D_CONFIG.to_dict(), "text_embed_dim": None}))
    with pytest.raises(ValueError, match="no text conditioning"):
        image_only(views, c2w, intrinsics, t, text)


def test_canonical_views_start_at_lrms_source_camera_and_align_moves_any_view_there():
    c2w, intrinsics = canonical_views(4)
    assert torch.allclose(c2w[0, :3, 3], torch.tensor([0.0, -2.0, 0.0]), atol=1e-6)
    assert torch.allclose(-c2w[0, :3, 2], torch.tensor([0.0, 1.0, 0.0]), atol=1e-6)  # looks along +y
    assert torch.allclose(c2w[1, :3, 3], torch.tensor([2.0, 0.0, 0.0]), atol=1e-5)  # 90 deg counter-clockwise
    assert intrinsics[0, 0].item() == pytest.approx(0.5 / np.tan(np.radians(25)))
    from recon3d.cameras import orbit_camera

    cams = torch.stack([orbit_camera(a, 0.0, 2.0) for a in (130.0, 220.0, 310.0, 40.0)])
    aligned = align_to_first_view(cams)
    assert torch.allclose(aligned[0], c2w[0], atol=1e-5)
    relative = lambda x: torch.linalg.inv(x[0]) @ x[1:]  # noqa: E731
    assert torch.allclose(relative(aligned), relative(cams), atol=1e-5)  # the rig moves rigidly


def test_checkpoint_round_trip_from_a_folder_and_a_hub_repo(tmp_path, monkeypatch):
    model = opened(3)
    folder = model.save_pretrained(tmp_path / "dmv3d")
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "dmv3d" and DMV3DConfig.from_dict(config) == TINY_DMV3D_CONFIG
    loaded = DMV3D.from_pretrained(folder)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    # the Hub cache layout: a repo id resolves offline through the same code path as the LRM
    from huggingface_hub import constants

    place_in_hub_cache(folder, "recon3d-test/tiny-dmv3d", tmp_path / "hub", "a" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    from_hub = DMV3D.from_pretrained("recon3d-test/tiny-dmv3d", offline=True)
    assert torch.equal(from_hub.plane_tokens, model.plane_tokens)


def test_wrong_checkpoints_are_refused_with_a_report(tmp_path, tiny_checkpoint):
    with pytest.raises(CheckpointError, match="not a DMV3D checkpoint"):
        DMV3D.from_pretrained(tiny_checkpoint)  # an LRM
    folder = new_dmv3d(TINY_DMV3D_CONFIG).save_pretrained(tmp_path / "a")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "triplane_dim": 9}))
    with pytest.raises(CheckpointError, match="wrong shape.*upsampler"):
        DMV3D.from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({**config, "layers": 3}))
    with pytest.raises(CheckpointError, match="keys this DMV3D does not know: layers"):
        DMV3D.from_pretrained(folder)


def test_published_scale_and_demo_configs_build_without_weights():
    with torch.device("meta"):
        paper, demo = DMV3D(CONFIGS["paper"]), DMV3D(DEMO_CONFIG)
    assert sum(p.numel() for p in paper.parameters()) > 500e6  # width 1024, 24 layers, as the issue lists
    assert sum(p.numel() for p in demo.parameters()) * 4 < 10e6  # the shipped demo fits 10 MB in float32


@pytest.fixture(scope="module")
def sampler():
    return Sample3D(opened(5), "tiny test model", random_weights=True)


def run_samples(pipe, seeds, steps=3, batch_size=4):
    events = list(pipe.run(DUCK, SampleOptions(seeds=seeds, steps=steps, mesh_resolution=64, batch_size=batch_size,
                                               remove_background=False)))
    return events, [e.sample for e in events if isinstance(e, SampleReady)]


def test_a_seed_repeats_alone_or_in_a_batch_and_seeds_differ(sampler):
    _, alone = run_samples(sampler, [7])
    _, again = run_samples(sampler, [7])
    _, batch = run_samples(sampler, [3, 7, 11])
    _, split = run_samples(sampler, [3, 7, 11], batch_size=1)
    assert torch.equal(alone[0].planes, again[0].planes)
    assert np.array_equal(alone[0].mesh.faces, again[0].mesh.faces)
    assert [s.seed for s in batch] == [3, 7, 11] and [s.seed for s in split] == [3, 7, 11]
    assert (batch[1].planes - alone[0].planes).abs().max() <= 1e-5
    assert all((a.planes - b.planes).abs().max() <= 1e-5 for a, b in zip(batch, split))
    assert (batch[0].planes - batch[2].planes).abs().max() > 1e-3  # different seeds, different objects


def test_sampler_streams_previews_keeps_the_condition_clean_and_exports_each_sample(sampler, tmp_path):
    events, samples = run_samples(sampler, [1, 2], steps=4)
    previews = [e for e in events if isinstance(e, Preview)]
    assert [p.step for p in previews] == [1, 2, 3, 4] and previews[0].views.shape == (2, 4, 3, 16, 16)
    condition = previews[0].views[:, 0]
    assert all(torch.allclose(p.views[:, 0], condition) for p in previews)  # view 0 is the clean input
    assert (condition < 0.99).any()  # ... and it shows the duck, not a blank
    assert [type(e) for e in events][-5:] == [Stage, SampleReady, Stage, SampleReady, Finished]
    assert [e.message for e in events if isinstance(e, Stage)][-2:] == ["Meshing seed 1 at 64^3", "Meshing seed 2 at 64^3"]
    assert events[-1].fraction == 1.0 and "of denoising" in previews[0].message
    assert events[-1].result == samples
    fractions = [e.fraction for e in events]
    assert fractions == sorted(fractions)  # the progress bar never goes back
    path = samples[1].save_glb(tmp_path / "seed-2.glb")
    positions, _, _, indices = glb_summary(path)
    assert len(indices) == len(samples[1].mesh.faces) > 0
    import pygltflib

    extras = pygltflib.GLTF2().load(str(path)).asset.extras
    assert extras["method"] == "DMV3D" and extras["seed"] == 2 and extras["steps"] == 4
    assert (extras["foreground_ratio"], extras["mesh_resolution"], extras["dtype"]) == (0.8, 64, "float32")
    assert extras["checkpoint"] == "tiny test model" and extras["recon3d_version"]
    grid = sampler.comparison(samples, size=24)
    from recon3d.images import LABEL_ROW

    assert grid.size[1] == 2 * 24 + LABEL_ROW and grid.size[0] > 4 * 24  # labelled rows and columns
    margin = grid.size[0] - 4 * 24
    assert grid.crop((0, 0, margin, 24)).convert("L").getextrema()[0] < 128  # "seed 1" drawn beside its row
    assert grid.crop((margin, 2 * 24, margin + 24, 2 * 24 + LABEL_ROW)).convert("L").getextrema()[0] < 128  # "0°"


def test_seed_lists_and_options_are_checked():
    assert parse_seeds("1, 7,42") == [1, 7, 42] and parse_seeds("5;6") == [5, 6]
    for text, message in (("", "at least one seed"), ("1, x", "'x' is not one"), ("-3", "out of range"),
                          ("1, 1", "appear once"), (",".join(str(i) for i in range(9)), "at most 8")):
        with pytest.raises(ValueError, match=message):
            parse_seeds(text)
    for bad, message in (({"steps": 0}, "steps must be between 1 and 200"), ({"steps": 500}, "between 1 and 200"),
                         ({"mesh_resolution": 16}, "between 64 and 512"), ({"seeds": []}, "at least one seed")):
        with pytest.raises(ValueError, match=message):
            SampleOptions(**bad).validate()


def make_dataset(folder, count=8, size=16, seed=3):
    from recon3d.synthetic import write_dataset

    return write_dataset(folder, count, size=size, seed=seed)


def test_training_a_tiny_model_makes_the_loss_fall_clearly(tmp_path):
    from recon3d.pipelines.train_dmv3d import TrainOptions, train

    options = TrainOptions(data=str(make_dataset(tmp_path / "data")), output=str(tmp_path / "ckpt"), config="tiny",
                           steps=30, batch_size=4, learning_rate=3e-3, warmup_steps=5, log_every=5,
                           checkpoint_every=30, render_size=8, cpu=True)
    events = list(train(options))
    losses = [json.loads(line)["loss"] for line in (tmp_path / "ckpt" / "loss.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and all(np.isfinite(losses))
    assert losses[-1] < 0.7 * losses[0], losses
    assert events[-1].result == tmp_path / "ckpt"
    DMV3D.from_pretrained(tmp_path / "ckpt")  # the checkpoint loads as any other


@pytest.mark.slow
def test_two_processes_train_with_accelerate_and_resume(tmp_path):
    data, out = make_dataset(tmp_path / "data"), tmp_path / "ckpt"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    # accelerate's own --cpu flag starts a single process; --multi_gpu starts the processes, which find no GPU
    # and (with the trainer's --cpu) train on the CPU over gloo
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "recon3d",
              "train-dmv3d", "--data", str(data), "--config", "tiny", "-o", str(out), "--batch-size", "2",
              "--log-every", "1", "--checkpoint-every", "2", "--render-size", "8", "--cpu"]
    first = subprocess.run(launch + ["--steps", "2"], env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "on 2 process(es)" in first.stderr
    second = subprocess.run(launch + ["--steps", "4", "--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "from step 2" in second.stderr
    steps = [json.loads(line)["step"] for line in (out / "loss.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # one log, written by the main process only, continued after resuming
    assert len(Sample3D.from_pretrained(out)(DUCK, seeds=[1], steps=2, mesh_resolution=64,
                                             remove_background=False)) == 1


@pytest.mark.slow
def test_cli_sample_writes_one_glb_per_seed_and_refuses_bad_seeds(tmp_path):
    checkpoint = opened(2).save_pretrained(tmp_path / "model")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = lambda *args: subprocess.run([sys.executable, "-m", "recon3d", "sample", str(DUCK), "--model",  # noqa: E731
                                        str(checkpoint), "-o", str(tmp_path / "out"), "--steps", "2",
                                        "--resolution", "64", *args], env=env, capture_output=True, text=True,
                                       timeout=300)
    ok = run("--seeds", "1,7", "--comparison")
    assert ok.returncode == 0, ok.stderr[-2000:]
    for seed in (1, 7):
        glb_summary(tmp_path / "out" / f"seed-{seed}.glb")
    assert (tmp_path / "out" / "comparison.png").exists()
    bad = run("--seeds", "1,,x")
    assert bad.returncode == 2 and "recon3d: error: Seeds must be whole numbers" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_views_grid_puts_samples_in_rows_and_views_in_columns():
    from recon3d.images import views_grid

    views = torch.ones(2, 3, 3, 4, 4)  # 2 samples x 3 views, white
    views[1, 2] = torch.tensor([1.0, 0.0, 0.0])[:, None, None]  # sample 1, view 2: red
    grid = np.asarray(views_grid(views, size=8))
    assert grid.shape == (2 * 8, 3 * 8, 3)
    assert (grid[8:, 16:] == [255, 0, 0]).all() and (grid[:8] == 255).all() and (grid[8:, :16] == 255).all()


@pytest.mark.slow
def test_the_shipped_demo_model_beats_the_mean_shape_baseline_on_unseen_objects(tmp_path):
    """A small version of bench/dmv3d.py's quality run: objects of another seed than the training set's."""
    import importlib.util

    from recon3d.checkpoints import demo_dmv3d
    from recon3d.synthetic import write_dataset

    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("bench_dmv3d", ROOT / "bench" / "dmv3d.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    heldout = write_dataset(tmp_path / "heldout", 6, size=32, seed=999)
    quality = bench.evaluate(heldout, train_seed=1, baseline_objects=30, checkpoint=demo_dmv3d(), steps=10, limit=6)
    model, baseline = quality["summary"]["model"], quality["summary"]["baseline"]
    assert quality["objects"] == 6 and quality["novel_views_per_object"] == 11
    assert model["psnr_db"] > baseline["psnr_db"] + 1.0, quality["summary"]
    assert model["iou"] > baseline["iou"] + 0.05, quality["summary"]
