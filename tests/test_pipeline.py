import numpy as np
import pytest
import torch
from PIL import Image

from recon3d import ImageTo3D
from recon3d.images import ImageError

from conftest import ROOT, glb_summary

DUCK = ROOT / "examples" / "duck.png"


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint):
    return ImageTo3D.from_pretrained(tiny_checkpoint)


def test_image_to_glb_through_the_public_api(pipe, tmp_path):
    result = pipe(DUCK, mesh_resolution=64, density_threshold=None)  # tiny random weights: automatic level
    assert result.processed_image.size == (56, 56)
    assert result.planes.shape == (1, 3, 8, 16, 16)
    assert set(result.timings) == {"preprocess", "encoder", "transformer", "grid_queries", "marching_cubes", "vertex_colors"}
    assert all(t >= 0 for t in result.timings.values())
    assert result.stats["faces"] == len(result.mesh.faces) > 0
    positions, _, colours, indices = glb_summary(result.save_glb(tmp_path / "duck.glb"))
    assert len(positions) == len(result.mesh.vertices) and len(indices) == len(result.mesh.faces)
    assert np.abs(positions).max() <= 1.0 + 1e-5


def test_same_input_gives_the_same_mesh(pipe):
    a = pipe(DUCK, mesh_resolution=64, density_threshold=None)
    b = pipe(Image.open(DUCK), mesh_resolution=64, density_threshold=None)
    assert np.array_equal(a.mesh.faces, b.mesh.faces) and np.allclose(a.mesh.vertices, b.mesh.vertices)


def test_progress_events_end_with_the_result(pipe):
    events = list(pipe.run(DUCK, pipe_options(mesh_resolution=64)))
    fractions = [e.fraction for e in events]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert [e.stage for e in events][:3] == ["preprocess", "encoder", "transformer"]
    assert events[-1].result is not None and all(e.result is None for e in events[:-1])


def pipe_options(**kw):
    from recon3d.pipelines.image_to_3d import ImageTo3DOptions

    return ImageTo3DOptions(density_threshold=None, **kw)


def test_turntable_frames_differ_and_frame_zero_is_the_source_view(pipe, tmp_path):
    result = pipe(DUCK, mesh_resolution=64, density_threshold=None)
    frames = result.render_turntable(frames=4, size=32)
    assert len(frames) == 4 and frames[0].size == (32, 32)
    arrays = [np.asarray(f, dtype=float) for f in frames]
    assert np.abs(arrays[0] - arrays[1]).mean() > 0.5
    gif = result.save_turntable(tmp_path / "t.gif", frames=3, size=32)
    assert Image.open(gif).n_frames == 3
    # the checkpoint's own sampling (32 samples per ray, split coarse/fine) and render size (48)
    assert (result.render_settings.coarse_samples, result.render_settings.fine_samples) == (16, 16)
    assert result.render_size == 48


def test_random_pipeline_is_labelled_and_meshes_its_largest_part(tmp_path):
    from recon3d.models.lrm import TINY_CONFIG

    pipe = ImageTo3D.random(TINY_CONFIG, seed=0)
    assert pipe.random_weights
    result = pipe(DUCK, mesh_resolution=64)  # no threshold given: random pipelines choose one
    assert result.stats["level"] > 0 and len(result.mesh.faces) > 0
    import trimesh

    parts = trimesh.Trimesh(result.mesh.vertices, result.mesh.faces).split(only_watertight=False)
    assert len(parts) == 1


def test_bad_options_and_inputs_are_refused(pipe, tmp_path):
    with pytest.raises(ValueError, match="between 64 and 512"):
        pipe(DUCK, mesh_resolution=2048)
    with pytest.raises(ValueError, match="foreground ratio"):
        pipe(DUCK, foreground_ratio=0.05)
    bad = tmp_path / "x.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    with pytest.raises(ImageError):
        pipe(bad, mesh_resolution=64)


def test_default_threshold_on_an_uncalibrated_model_explains_itself(pipe):
    from recon3d.mesh import EmptyMeshError

    with pytest.raises(EmptyMeshError, match="no surface at density 3"):
        pipe(DUCK, mesh_resolution=64)
