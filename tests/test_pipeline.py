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
    assert result.timings["glb_write"] > 0  # writing the file is a stage of its own
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
    from recon3d.pipelines.events import Finished, Stage

    assert [e.name for e in events[:3]] == ["preprocess", "encoder", "transformer"]  # typed: a Stage has a name
    assert all(isinstance(e, Stage) for e in events[:-1])
    assert isinstance(events[-1], Finished) and len(events[-1].result.mesh.faces) > 0


def pipe_options(**kw):
    from recon3d.pipelines.image_to_3d import ImageTo3DOptions

    return ImageTo3DOptions(density_threshold=None, **kw)


class FrontRedBackBlue:
    """A ball whose front half (world -y: the side the source camera sees) is red and back half blue."""

    def query(self, points):
        density = (3 + 20 * (0.5 - points.norm(dim=-1, keepdim=True))).clamp(min=0)
        front = (points[:, 1:2] < 0).float()
        return density, torch.cat([front, torch.zeros_like(front), 1 - front], -1)


def test_turntable_frame_zero_is_the_source_view(pipe):
    result = pipe(DUCK, mesh_resolution=64, density_threshold=None)
    result.field = FrontRedBackBlue()  # frames of a field whose sides are known
    frames = [np.asarray(f, dtype=float) for f in result.render_turntable(frames=4, size=32)]
    centre = [frame[12:20, 12:20].reshape(-1, 3).mean(0) for frame in frames]
    assert centre[0][0] > 200 and centre[0][2] < 30, f"frame 0 does not face the front: {centre[0]}"
    assert centre[2][2] > 200 and centre[2][0] < 30, f"frame 2 (180 deg) does not show the back: {centre[2]}"


def test_turntable_frames_differ_and_use_the_checkpoints_sampling(pipe, tmp_path):
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
    from recon3d.models.lrm import TINY_LRM_CONFIG

    pipe = ImageTo3D.random(TINY_LRM_CONFIG, seed=0)
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


class CancelAfter:
    """A token that cancels itself at its n-th check: the job stops wherever that check is."""

    def __init__(self, checks):
        from recon3d.cancel import CancelToken

        self.token, self.left, self.checks = CancelToken(), checks, 0

    def check(self):
        self.checks += 1
        self.left -= 1
        if self.left == 0:
            self.token.cancel()
        self.token.check()


@pytest.mark.parametrize("stage", ["encoder", "transformer", "mesh"])
def test_a_cancelled_job_stops_at_its_next_check(pipe, stage):
    from recon3d.cancel import Cancelled

    encoder, transformer = len(pipe.model.encoder.model.blocks), len(pipe.model.transformer.layers)
    # checks: 1 after preprocessing, one before each encoder block, each transformer layer, 1 after it, then
    # one per chunk of grid queries
    checks = {"encoder": 2, "transformer": 2 + encoder, "mesh": 3 + encoder + transformer}[stage]
    token, stages = CancelAfter(checks), []
    with pytest.raises(Cancelled):
        for event in pipe.run(DUCK, pipe_options(mesh_resolution=128), token):
            stages.append(event.name)  # only Stage events come before the end
    assert stages[-1] == stage
    assert token.checks == checks  # nothing ran past the check that saw the cancellation


def test_a_cancelled_turntable_stops_between_frames(pipe):
    from recon3d.cancel import Cancelled

    result = pipe(DUCK, mesh_resolution=64, density_threshold=None)
    token = CancelAfter(3)
    with pytest.raises(Cancelled):
        result.render_turntable(frames=24, size=16, cancel=token)
    assert token.checks == 3


def test_image_to_3d_builds_no_autograd_graph():
    """Both Image to 3D pipelines run under no_grad: the planes and the field they leave hold no graph (a graph
    kept alive by a result would hold the encoder's activations in memory)."""
    from recon3d import run_to_end
    from recon3d.pipelines.image_to_3d import ImageTo3DOptions
    from recon3d.service import RANDOM_INSTANTMESH, ModelService, ServiceSettings

    from recon3d.pipelines.multiview_sample import ViewsImageTo3D

    service = ModelService(ServiceSettings(random_weights=True))
    pipes = [service.image_to_3d("random-tiny (random weights)"),
             ViewsImageTo3D(service.sample_3d(RANDOM_INSTANTMESH), steps=1)]
    for pipe in pipes:
        result = run_to_end(pipe.run(ROOT / "examples" / "duck.png",
                                     ImageTo3DOptions(mesh_resolution=64, remove_background=False)))
        assert result.planes.grad_fn is None and not result.planes.requires_grad, type(pipe).__name__
