import numpy as np
import pytest
import torch
import trimesh

from recon3d.mesh import (EmptyMeshError, MeshSettings, auto_level, coarse_to_fine_grid, dense_grid, extract_mesh,
                          marching_cubes, remove_small_parts)

from recon3d.field import GridField, PointField, TriplaneField, sample_triplane
from recon3d.models.lrm import PlaneDecoder

from conftest import SphereField, glb_summary


class BoxField:
    """Axis-aligned box [lo, hi]: density 3 + 20 * (distance inside), so the surface is the box itself."""

    iso_level = 3.0

    def __init__(self, lo, hi):
        self.lo, self.hi = torch.tensor(lo), torch.tensor(hi)

    def query(self, p):
        inside = torch.minimum(p - self.lo, self.hi - p).amin(-1, keepdim=True)
        return 3.0 + 20.0 * inside, torch.full((len(p), 3), 0.5)


def test_sphere_mesh_is_watertight_outward_and_has_the_right_volume():
    centre = (0.1, -0.2, 0.05)
    mesh, _ = extract_mesh(SphereField(centre, 0.6), MeshSettings(resolution=96))
    tm = trimesh.Trimesh(mesh.vertices, mesh.faces, process=False)
    assert tm.is_watertight
    assert tm.volume == pytest.approx(4 / 3 * np.pi * 0.6 ** 3, rel=0.01)  # positive: faces wound outward
    outward = ((tm.triangles_center - np.array(centre)) * tm.face_normals).sum(1)
    assert (outward > 0).all()
    radii = np.linalg.norm(mesh.vertices - np.array(centre), axis=1)
    assert np.abs(radii - 0.6).max() < 2 / 95


def test_vertex_colours_come_from_the_field():
    mesh, _ = extract_mesh(SphereField(radius=0.5), MeshSettings(resolution=64))
    top, bottom = mesh.vertices[:, 2] > 0.05, mesh.vertices[:, 2] < -0.05
    assert np.allclose(mesh.colors[top], [1, 0, 0]) and np.allclose(mesh.colors[bottom], [0, 0, 1])


def test_off_centre_box_bounds():
    lo, hi = (-0.7, 0.1, -0.2), (0.3, 0.8, 0.6)
    mesh, _ = extract_mesh(BoxField(lo, hi), MeshSettings(resolution=128))
    voxel = 2 / 127
    assert np.allclose(mesh.vertices.min(0), lo, atol=voxel) and np.allclose(mesh.vertices.max(0), hi, atol=voxel)
    assert trimesh.Trimesh(mesh.vertices, mesh.faces, process=False).is_watertight


def test_coarse_to_fine_gives_the_dense_mesh_with_far_fewer_queries():
    field, resolution = SphereField((0.1, -0.2, 0.05), 0.6), 256
    dense, sparse = dense_grid(field, resolution), coarse_to_fine_grid(field, resolution, level=3.0)
    v_dense, f_dense = marching_cubes(dense, 3.0)
    v_sparse, f_sparse = marching_cubes(sparse, 3.0)
    assert np.array_equal(f_dense, f_sparse)
    assert np.allclose(v_dense, v_sparse, atol=1e-4)  # same points; only float noise of batched evaluation
    assert dense.queries == resolution ** 3
    assert sparse.queries * 4 < dense.queries


class Rod:
    """A rod along z thinner than the coarse lattice spacing, placed between coarse samples, on a ball."""

    iso_level = 3.0

    def __init__(self, radius, centre):
        self.radius, self.centre = radius, torch.tensor(centre)

    def query(self, p):
        rod = 3 + 50 * (self.radius - (p[:, :2] - self.centre).norm(dim=-1, keepdim=True))
        rod = torch.where(p[:, 2:3].abs() < 0.6, rod, torch.zeros_like(rod))
        ball = 3 + 10 * (0.3071 - (p - torch.tensor([-0.5013, 0.0027, 0.0041])).norm(dim=-1, keepdim=True))
        return torch.maximum(rod, ball).clamp(min=0), torch.ones(len(p), 3)


@pytest.mark.parametrize("resolution", [64, 97, pytest.param(256, marks=pytest.mark.slow),
                                        pytest.param(384, marks=pytest.mark.slow)])
def test_coarse_to_fine_keeps_parts_thinner_than_its_lattice(resolution):
    voxel = 2 / (resolution - 1)
    for radius in (0.61 * voxel, 1.53 * voxel):  # odd sizes: no grid point exactly on the level
        field = Rod(radius, (0.3017 + 1.37 * voxel, 0.2029 + 1.41 * voxel))  # between coarse samples
        v_dense, f_dense = marching_cubes(dense_grid(field, resolution), 3.0)
        v_sparse, f_sparse = marching_cubes(coarse_to_fine_grid(field, resolution, 3.0), 3.0)
        assert np.array_equal(f_dense, f_sparse), f"radius {radius / voxel:.1f} voxels at {resolution}^3"
        assert np.allclose(v_dense, v_sparse, atol=1e-4)


def test_glb_is_valid_y_up_front_to_plus_z_with_outward_normals(tmp_path):
    mesh, _ = extract_mesh(SphereField((0.0, -0.3, 0.2), 0.4), MeshSettings(resolution=64))
    path = mesh.save_glb(tmp_path / "sphere.glb")
    positions, normals, colours, indices = glb_summary(path)
    assert len(positions) == len(mesh.vertices) and len(indices) == len(mesh.faces)
    # world (x, y, z) -> glTF (x, z, -y): the sphere centre (0, -0.3, 0.2) lands at (0, 0.2, 0.3)
    assert np.allclose((positions.min(0) + positions.max(0)) / 2, [0.0, 0.2, 0.3], atol=0.02)
    # the red top (world +z) is glTF +y; colours are stored linear, red stays (1, 0, 0)
    top = positions[:, 1] > 0.25
    assert np.allclose(colours[top, :3], [1, 0, 0], atol=1e-4)
    outward = ((positions - [0.0, 0.2, 0.3]) * normals).sum(1)
    assert (outward > 0).all()
    tri = positions[indices]
    face_n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    assert ((tri.mean(1) - [0.0, 0.2, 0.3]) * face_n).sum(1).min() > 0  # counter-clockwise from outside


def test_empty_and_out_of_range_requests_are_refused():
    with pytest.raises(EmptyMeshError, match="no surface"):
        extract_mesh(SphereField(radius=0.5), MeshSettings(resolution=64, level=1000.0))
    for bad in (32, 1024):
        with pytest.raises(ValueError, match="between 64 and 512"):
            extract_mesh(SphereField(), MeshSettings(resolution=bad))


def test_auto_level_and_floater_removal():
    class TwoBalls:
        iso_level = 3.0

        def query(self, p):
            big = 3 + 10 * (0.5 - (p - torch.tensor([-0.3, 0, 0])).norm(dim=-1, keepdim=True))
            small = 3 + 10 * (0.15 - (p - torch.tensor([0.7, 0, 0])).norm(dim=-1, keepdim=True))
            return torch.maximum(big, small), torch.ones(len(p), 3)

    grid = dense_grid(TwoBalls(), 64)
    level = auto_level(grid, inside_fraction=0.1)
    assert (grid.values >= level).float().mean().item() == pytest.approx(0.1, abs=0.01)
    vertices, faces = marching_cubes(grid, 3.0)
    kept_vertices, kept_faces, removed = remove_small_parts(vertices, faces, min_fraction=0.5)
    assert removed == 1 and kept_vertices[:, 0].max() < 0.25  # only the big ball is left
    assert kept_faces.max() == len(kept_vertices) - 1
    assert trimesh.Trimesh(kept_vertices, kept_faces, process=False).is_watertight
    mesh, g = extract_mesh(TwoBalls(), MeshSettings(resolution=64, min_part_fraction=0.01))
    assert mesh.vertices[:, 0].max() > 0.8 and g.stats["parts_removed"] == 0


def test_coarse_to_fine_falls_back_to_dense_on_noise():
    class Noise:
        def query(self, p):
            return (torch.sin(p * 97.0).prod(-1, keepdim=True) + 1.0) * 3.0, torch.ones(len(p), 3)

    grid = coarse_to_fine_grid(Noise(), 256, level=3.0)
    assert grid.exact is None  # every value is a field query
    assert grid.queries == 256 ** 3 + 86 ** 3  # the dense grid plus the coarse lattice that decided it
    assert torch.allclose(grid.values, dense_grid(Noise(), 256).values)


def test_mid_grey_is_stored_linear_in_color_0(tmp_path):
    """glTF's COLOR_0 is linear: sRGB 0.5 must arrive as 0.214, not 0.5 (a missing conversion looks washed out)."""

    class GreySphere(SphereField):
        def query(self, points):
            density, _ = super().query(points)
            return density, torch.full((len(points), 3), 0.5)

    mesh, _ = extract_mesh(GreySphere(radius=0.5), MeshSettings(resolution=64))
    _, _, colours, _ = glb_summary(mesh.save_glb(tmp_path / "grey.glb"))
    assert np.allclose(colours[:, :3], 0.2140, atol=2e-4) and np.allclose(colours[:, 3], 1.0)


def smooth_sphere_field(dtype, size=64, channels=4):
    """A triplane model whose planes hold (u^2 + v^2) / 2, so the three features sum to |p|^2, and whose decoder
    (the LRM's, 8 wide, weights exact in every dtype) gives density softplus(10 (0.375 - |p|^2)): a smooth sphere
    of radius 0.28 at level 3, the whole model in ``dtype``."""
    centres = (torch.arange(size) + 0.5) / size * 2 - 1
    u, v = centres.expand(size, size), centres[:, None].expand(size, size)
    plane = torch.zeros(channels, size, size)
    plane[0], plane[1] = (u ** 2 + v ** 2) / 2, u * 0.5 + 0.5
    decoder = PlaneDecoder(3 * channels, hidden=8)
    with torch.no_grad():
        for layer in decoder.net[::2]:
            layer.weight.zero_()
            layer.bias.zero_()
        decoder.net[0].weight[0, ::channels] = -1.0  # 0.375 - |p|^2
        decoder.net[0].bias[0] = 0.375
        decoder.net[2].weight[0, 0] = decoder.net[4].weight[0, 0] = 1.0
        decoder.net[6].weight[0, 0], decoder.net[6].bias[0] = 10.0, 1.0  # raw - 1 = 10 (0.375 - |p|^2)
        decoder.net[0].weight[1, 1] = decoder.net[2].weight[1, 1] = decoder.net[4].weight[1, 1] = 1.0
        decoder.net[6].weight[1:, 1] = 4.0  # some colour
    decoder = decoder.to(dtype)
    planes = plane.expand(1, 3, channels, size, size).to(dtype)
    return TriplaneField(planes, lambda p, points: decoder(sample_triplane(p, points)), iso_level=3.0)


@pytest.fixture(scope="module")
def float32_sphere_mesh():
    return extract_mesh(smooth_sphere_field(torch.float32), MeshSettings(resolution=256))[0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_mesh_matches_float32(dtype, float32_sphere_mesh):
    from scipy.spatial import cKDTree

    mesh, grid = extract_mesh(smooth_sphere_field(dtype), MeshSettings(resolution=256))
    assert np.isfinite(grid.values.numpy()).all() and np.isfinite(mesh.colors).all()
    reference = float32_sphere_mesh.vertices
    there, back = cKDTree(reference).query(mesh.vertices)[0], cKDTree(mesh.vertices).query(reference)[0]
    voxel = 2 / 255
    assert (there.mean() + back.mean()) / 2 < 0.15 * voxel
    assert abs(len(mesh.faces) - len(float32_sphere_mesh.faces)) < 0.02 * len(float32_sphere_mesh.faces)


def test_grid_field_sphere_meshes_watertight_at_its_own_level():
    r = 65
    axis = torch.linspace(-1, 1, r)
    points = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1)  # (R, R, R, 3), (x, y, z) order
    centre = torch.tensor([0.2, -0.1, 0.05])
    density = (5.0 + 20.0 * (0.5 - (points - centre).norm(dim=-1))).clamp(min=0)  # level 5 at radius 0.5
    rgb = (points * 0.5 + 0.5).movedim(-1, 0)
    field = GridField(density[None, None].expand(2, 1, r, r, r), rgb[None].expand(2, 3, r, r, r), iso_level=5.0)
    with pytest.raises(ValueError, match="select"):
        extract_mesh(field, MeshSettings(resolution=96))
    mesh, grid = extract_mesh(field.select(1), MeshSettings(resolution=96))
    assert grid.stats["level"] == 5.0
    tm = trimesh.Trimesh(mesh.vertices, mesh.faces, process=False)
    assert tm.is_watertight and tm.volume == pytest.approx(4 / 3 * np.pi * 0.5 ** 3, rel=0.02)
    radii = np.linalg.norm(mesh.vertices - centre.numpy(), axis=1)
    assert np.abs(radii - 0.5).max() < 2 / 64  # within a voxel of the field's grid
    assert np.allclose(mesh.colors, mesh.vertices * 0.5 + 0.5, atol=1e-4)  # colours interpolated at the vertices


def test_the_coarse_lattice_and_the_level_come_from_the_field():
    def lattice_cells(spacing):
        field = PointField(SphereField().query, sample_spacing=spacing, iso_level=3.0)
        return coarse_to_fine_grid(field, 128, 3.0).stats["cells"]

    assert lattice_cells(2 / 16) == 19 ** 3  # stride 7 voxels of 2/127: at most 2/16 apart
    assert lattice_cells(2 / 32) == 43 ** 3  # stride 3
    _, grid = extract_mesh(PointField(SphereField().query, iso_level=2.0), MeshSettings(resolution=64))
    assert grid.stats["level"] == 2.0
    _, grid = extract_mesh(PointField(SphereField().query), MeshSettings(resolution=64))  # uncalibrated: auto
    assert grid.stats["level"] == pytest.approx(auto_level(dense_grid(SphereField(), 16)), rel=1e-6)
