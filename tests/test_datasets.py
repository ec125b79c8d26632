"""The procedural training set and the multi-view dataset folder format."""

import json
import math

import pytest
import torch

from recon3d.cameras import orbit_camera
from recon3d.datasets import DatasetError, MultiViewDataset, write_object
from recon3d.synthetic import KINDS, Part, ProceduralObject, ViewLayout, random_object, render_object, write_dataset


def part(kind, size, front=(1.0, 0.0, 0.0), back=(0.0, 0.0, 1.0)):
    return Part(kind, torch.zeros(3), torch.tensor(size), torch.eye(3), torch.tensor(front), torch.tensor(back))


@pytest.mark.parametrize("kind, size, inside, surface, outside", [
    ("sphere", (0.5, 0, 0), (0.0, 0.0, 0.0), (0.5, 0.0, 0.0), (0.0, 0.0, 0.7)),
    ("box", (0.3, 0.2, 0.1), (0.1, 0.1, 0.05), (0.3, 0.0, 0.0), (0.0, 0.0, 0.3)),
    ("cylinder", (0.3, 0.4, 0), (0.2, 0.0, 0.3), (0.0, 0.3, 0.0), (0.0, 0.0, 0.5)),
    ("cone", (0.4, 0.4, 0), (0.0, 0.0, -0.3), (0.4, 0.0, -0.4), (0.3, 0.0, 0.3)),
    ("torus", (0.4, 0.1, 0), (0.4, 0.0, 0.0), (0.5, 0.0, 0.0), (0.0, 0.0, 0.0)),
])
def test_part_distances_have_the_right_sign_and_zero_on_the_surface(kind, size, inside, surface, outside):
    distances = part(kind, size).sdf(torch.tensor([inside, surface, outside]))
    assert distances[0] < 0 and distances[2] > 0
    assert abs(distances[1]) < 1e-5


def test_front_and_back_halves_have_their_own_colours():
    obj = ProceduralObject([part("sphere", (0.5, 0, 0))])
    density, rgb = obj.query(torch.tensor([[0.0, -0.3, 0.0], [0.0, 0.3, 0.0], [0.0, 0.0, 0.9]]))
    assert torch.allclose(rgb[0], torch.tensor([1.0, 0.0, 0.0])) and torch.allclose(rgb[1], torch.tensor([0.0, 0.0, 1.0]))
    assert density[0] > obj.iso_level > density[2] >= 0
    assert obj.query(torch.tensor([[0.5, 0.0, 0.0]]))[0].item() == pytest.approx(obj.iso_level)


def test_random_objects_repeat_per_seed_and_vary_between_seeds():
    def describe(seed):
        obj = random_object(torch.Generator().manual_seed(seed))
        return [(p.kind, p.size.tolist(), p.centre.tolist(), p.front.tolist()) for p in obj.parts]

    assert describe(3) == describe(3)
    seen = [describe(seed) for seed in range(40)]
    assert len({str(s) for s in seen}) == 40
    assert {p[0] for s in seen for p in s} == set(KINDS)  # every kind appears
    assert {len(s) for s in seen} == {1, 2}  # single parts and compounds


def test_layout_puts_the_ring_on_the_equator_at_distance_two():
    c2w, intrinsics = ViewLayout(ring=8, extra=3).cameras(torch.Generator().manual_seed(0))
    positions = c2w[:, :3, 3]
    assert c2w.shape == (11, 4, 4) and intrinsics.shape == (11, 4)
    assert torch.allclose(positions.norm(dim=-1), torch.full((11,), 2.0), atol=1e-5)
    assert torch.allclose(positions[:8, 2], torch.zeros(8), atol=1e-5) and (positions[8:, 2] > 0.4).all()
    azimuths = torch.atan2(positions[:8, 0], -positions[:8, 1])
    steps = torch.remainder(azimuths.diff(), 2 * math.pi)
    assert torch.allclose(steps, torch.full((7,), math.pi / 4), atol=1e-4)  # 45 deg apart
    assert intrinsics[0, 0].item() == pytest.approx(0.5 / math.tan(math.radians(25)))  # 50 deg field of view


def test_renders_show_the_front_colour_from_the_front(tmp_path):
    obj = ProceduralObject([part("sphere", (0.6, 0, 0))])
    c2w, intrinsics = ViewLayout(ring=4, extra=0).cameras(torch.Generator().manual_seed(1))
    c2w[0] = orbit_camera(0.0, 0.0, 2.0)  # the front camera, at (0, -2, 0)
    rgba = render_object(obj, c2w[:1], intrinsics[:1], 32, samples=32)
    centre = rgba[0, 12:20, 12:20].reshape(-1, 4).mean(0)
    assert centre[0] > 0.95 and centre[2] < 0.05 and centre[3] > 0.99  # red front, opaque
    assert rgba[0, 0, 0, 3] < 0.01  # the corner misses the sphere: transparent


def test_written_dataset_loads_with_its_cameras(tmp_path):
    layout = ViewLayout(ring=4, extra=1)
    write_dataset(tmp_path / "set", count=2, size=16, seed=5, layout=layout)
    dataset = MultiViewDataset(tmp_path / "set")
    item = dataset[1]
    assert len(dataset) == 2 and dataset.views_per_object == 5 and item["name"] == "obj-00001"
    assert item["images"].shape == (5, 3, 16, 16) and 0 <= item["images"].min() and item["images"].max() <= 1
    assert item["c2w"].shape == (5, 4, 4) and torch.allclose(item["c2w"][:, 3], torch.tensor([0.0, 0, 0, 1]))
    assert torch.allclose(item["c2w"][:, :3, 3].norm(dim=-1), torch.full((5,), 2.0), atol=1e-5)
    again = MultiViewDataset(write_dataset(tmp_path / "again", count=2, size=16, seed=5, layout=layout))
    assert torch.equal(again[1]["images"], item["images"])  # object k depends on the seed and k only
    assert (item["images"] < 0.99).any()  # something was drawn on the white background
    alpha = item["alpha"]
    assert alpha.shape == (5, 1, 16, 16) and (alpha > 0.5).any() and (alpha < 0.5).any()
    assert torch.allclose(item["images"][alpha.expand(-1, 3, -1, -1) == 0], torch.tensor(1.0))  # white outside


def test_bad_dataset_folders_are_refused_with_the_file_named(tmp_path):
    with pytest.raises(DatasetError, match="no such dataset folder"):
        MultiViewDataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no object folders"):
        MultiViewDataset(tmp_path / "empty")
    rgba = torch.zeros(2, 8, 8, 4)
    poses, k = torch.eye(4).expand(2, 4, 4), torch.tensor([1.0, 1.0, 0.5, 0.5]).expand(2, 4)
    write_object(tmp_path / "bad" / "a", rgba, poses, k)
    (tmp_path / "bad" / "a" / "001.png").unlink()
    with pytest.raises(DatasetError, match="a/cameras.json: .*missing image 001.png"):
        MultiViewDataset(tmp_path / "bad")
    write_object(tmp_path / "mixed" / "a", rgba, poses, k)
    write_object(tmp_path / "mixed" / "b", rgba[:1], poses[:1], k[:1])
    with pytest.raises(DatasetError, match="different numbers of views"):
        MultiViewDataset(tmp_path / "mixed")
    meta = tmp_path / "mixed" / "b" / "cameras.json"
    meta.write_text(json.dumps({"views": [{"image": "000.png", "c2w": [[1, 0], [0, 1]], "intrinsics": [1, 1, 0.5, 0.5]}]}))
    with pytest.raises(DatasetError, match="c2w must be 4x4"):
        MultiViewDataset(tmp_path / "mixed")
