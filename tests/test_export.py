"""Exports: the face budget keeps the shape, the baked texture holds the field's colours (in linear space, where
a flipped V or a colour-space slip would not), and OBJ/MTL/PNG, PLY and STL load back in trimesh."""

import io

import numpy as np
import pytest
import torch
from conftest import glb_summary

from recon3d.export import ExportOptions, colour_export, decimate, export_mesh, plan_export, rasterise_uv
from recon3d.field import Field
from recon3d.mesh import MeshSettings, extract_mesh, srgb_to_linear

RADIUS = 0.6


class ColouredBall(Field):
    """A ball whose colour varies smoothly over its surface (each channel follows one axis)."""

    iso_level = 5.0

    def query(self, points):
        density = (5.0 + 20.0 * (RADIUS - points.norm(dim=-1, keepdim=True))).clamp(min=0)
        rgb = (0.5 + 0.6 * points).clamp(0, 1)
        return density, rgb


@pytest.fixture(scope="module")
def ball_mesh():
    mesh, _ = extract_mesh(ColouredBall(), MeshSettings(resolution=96))
    return mesh


def gltf_to_world(points):
    """glTF (y up, front +z) -> world (z up, front -y): the inverse of cameras.world_to_gltf."""
    x, y, z = points.T
    return np.stack([x, -z, y], 1)


def read_textured_glb(path):
    """(positions in the world frame, uvs, faces (F, 3), texture (S, S, 3) float sRGB, the glTF) of a GLB."""
    import pygltflib
    from PIL import Image

    gltf = pygltflib.GLTF2().load(str(path))
    blob = gltf.binary_blob()
    primitive = gltf.meshes[0].primitives[0]

    def read(index, dtype, width):
        accessor = gltf.accessors[index]
        view = gltf.bufferViews[accessor.bufferView]
        data = np.frombuffer(blob, dtype, accessor.count * width, view.byteOffset + (accessor.byteOffset or 0))
        return data.reshape(accessor.count, width)

    view = gltf.bufferViews[gltf.images[0].bufferView]
    image = Image.open(io.BytesIO(blob[view.byteOffset:view.byteOffset + view.byteLength]))
    texture = np.asarray(image.convert("RGB"), np.float64) / 255
    return (gltf_to_world(read(primitive.attributes.POSITION, np.float32, 3)),
            read(primitive.attributes.TEXCOORD_0, np.float32, 2), read(primitive.indices, np.uint32, 1).reshape(-1, 3),
            texture, gltf)


def sample_bilinear(texture, uv):
    """``texture`` (S, S, 3) read at ``uv`` (N, 2) in glTF's convention (v from the top), texel centres at +0.5."""
    size = texture.shape[0]
    x, y = uv[:, 0] * size - 0.5, uv[:, 1] * size - 0.5
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    at = lambda yy, xx: texture[np.clip(yy, 0, size - 1), np.clip(xx, 0, size - 1)]  # noqa: E731
    return ((1 - fy) * ((1 - fx) * at(y0, x0) + fx * at(y0, x0 + 1))
            + fy * ((1 - fx) * at(y0 + 1, x0) + fx * at(y0 + 1, x0 + 1)))


def test_the_baked_texture_holds_the_fields_colours_in_linear_space(ball_mesh, tmp_path):
    field = ColouredBall()
    exported = export_mesh(field, ball_mesh, ExportOptions(formats=("glb",), faces=3000, texture=512), tmp_path / "ball",
                           extras={"method": "test"})
    positions, uvs, faces, texture, gltf = read_textured_glb(exported.paths["glb"])
    import pygltflib.validator

    pygltflib.validator.validate(gltf)
    material = gltf.materials[0].pbrMetallicRoughness
    assert material.metallicFactor == 0.0 and material.baseColorTexture.index == 0 and gltf.images[0].mimeType == "image/png"
    assert gltf.asset.extras["method"] == "test" and gltf.asset.extras["export"]["texture"] == 512
    assert len(faces) <= 3000
    centroids = positions[faces].mean(1)  # (F, 3) world
    centroid_uvs = uvs[faces].mean(1)
    wanted = srgb_to_linear(field.query(torch.from_numpy(centroids).float())[1].numpy())  # linear
    baked = srgb_to_linear(sample_bilinear(texture, centroid_uvs))
    error = np.abs(baked - wanted).mean(1)
    assert np.median(error) < 0.01 and np.percentile(error, 95) < 0.04, (np.median(error), np.percentile(error, 95))
    flipped = srgb_to_linear(sample_bilinear(texture, np.stack([centroid_uvs[:, 0], 1 - centroid_uvs[:, 1]], 1)))
    assert np.median(np.abs(flipped - wanted).mean(1)) > 0.05  # a V flip would fail the check above
    slipped = sample_bilinear(texture, centroid_uvs)  # sRGB values taken as linear: a colour-space slip
    assert np.median(np.abs(slipped - wanted).mean(1)) > 0.05
    assert exported.timings["bake"] > 0 and exported.timings["unwrap"] > 0


def test_the_face_budget_is_met_and_the_surface_stays_close(ball_mesh):
    field = ColouredBall()
    options = ExportOptions(faces=2000)
    small, _ = colour_export(plan_export(ball_mesh, options), field, options)
    assert len(ball_mesh.faces) > 10000 and 1900 <= len(small.faces) <= 2000
    full_error = np.abs(np.linalg.norm(ball_mesh.vertices, axis=1) - RADIUS).max()
    error = np.abs(np.linalg.norm(small.vertices, axis=1) - RADIUS).max()
    assert error < 0.01 and full_error < 0.01  # the decimated surface within 1 % of the box of the sphere
    wanted = field.query(torch.from_numpy(small.vertices))[1].numpy()
    assert np.abs(small.colors - wanted).max() < 1e-5  # the new vertices' colours come from the field
    assert decimate(small, 5000) is small  # under the budget: as it is


def test_obj_mtl_png_ply_and_stl_load_back_in_trimesh(ball_mesh, tmp_path):
    import trimesh

    field = ColouredBall()
    exported = export_mesh(field, ball_mesh, ExportOptions(formats=("obj", "ply", "stl", "glb"), faces=2000,
                                                           texture=256), tmp_path / "ball")
    assert set(exported.paths) == {"obj", "ply", "stl", "glb"}
    mtl = (tmp_path / "ball.mtl").read_text()
    assert "map_Kd ball.png" in mtl and "mtllib ball.mtl" in (tmp_path / "ball.obj").read_text()
    obj = trimesh.load(tmp_path / "ball.obj", process=False)
    assert obj.visual.kind == "texture" and obj.visual.material.image.size == (256, 256)
    assert len(obj.faces) <= 2000 and np.allclose(obj.bounds[1], [RADIUS] * 3, atol=0.02)
    obj_colors = srgb_to_linear(np.asarray(obj.visual.to_color().vertex_colors)[:, :3] / 255.0)  # via its texture
    wanted = srgb_to_linear(field.query(torch.from_numpy(gltf_to_world(np.asarray(obj.vertices, np.float32))))[1].numpy())
    assert np.median(np.abs(obj_colors - wanted).mean(1)) < 0.02  # OBJ's flipped-V convention honoured
    ply = trimesh.load(tmp_path / "ball.ply", process=False)
    ply_colors = np.asarray(ply.visual.vertex_colors)[:, :3] / 255.0
    wanted = field.query(torch.from_numpy(gltf_to_world(np.asarray(ply.vertices, np.float32))))[1].numpy()
    assert len(ply.faces) <= 2000 and np.abs(ply_colors - wanted).max() < 1 / 255 + 1e-3
    stl = trimesh.load(tmp_path / "ball.stl", process=False)
    assert np.allclose(stl.bounds, [[-30] * 3, [30] * 3], atol=1.0)  # millimetres: the [-1, 1] box is 100 mm
    positions, uvs, faces, texture, _ = read_textured_glb(tmp_path / "ball.glb")  # the same mesh as the OBJ
    assert len(faces) == len(obj.faces) and texture.shape == (256, 256, 3)
    imported = trimesh.load(tmp_path / "ball.glb", force="mesh", process=False)  # a glTF importer sees the texture
    assert imported.visual.kind == "texture" and imported.visual.material.baseColorTexture.size == (256, 256)


def test_vertex_colour_exports_without_a_texture(ball_mesh, tmp_path):
    exported = export_mesh(ColouredBall(), ball_mesh, ExportOptions(formats=("glb", "obj")), tmp_path / "plain")
    positions, normals, colours, indices = glb_summary(exported.paths["glb"])
    assert len(indices) == len(ball_mesh.faces) and exported.faces == len(ball_mesh.faces)
    first = (tmp_path / "plain.obj").read_text().splitlines()[1].split()
    assert first[0] == "v" and len(first) == 7  # x y z r g b


def test_export_options_are_checked_in_one_line():
    with pytest.raises(ValueError, match="^unknown export format fbx: choose from glb, obj, ply, stl$"):
        ExportOptions(formats=("glb", "fbx")).validate()
    with pytest.raises(ValueError, match="texture size must be between 64 and 8192, got 10"):
        ExportOptions(texture=10).validate()
    with pytest.raises(ValueError, match="face budget must be a whole number"):
        ExportOptions(faces=1.5).validate()
    assert ExportOptions(formats=ExportOptions.parse_formats(" GLB, .obj,glb")).validate().formats == ("glb", "obj")


def test_uv_rasterisation_covers_each_texel_once_with_barycentrics_that_sum_to_one():
    uvs = np.array([[0, 0], [1, 0], [1, 1], [0, 1]], np.float32)
    faces = np.array([[0, 1, 2], [0, 2, 3]])
    owner, weights = rasterise_uv(uvs, faces, 16)
    assert (owner >= 0).all() and set(owner.unique().tolist()) == {0, 1}
    assert torch.allclose(weights.sum(-1), torch.ones(16, 16), atol=1e-6)
    # texel (row 0, column 15) lies in the lower-right triangle (0, 1, 2): above the diagonal v = u
    assert owner[0, 15] == 0 and owner[15, 0] == 1
    point = (weights[3, 9, :, None] * torch.from_numpy(uvs[faces[owner[3, 9]]])).sum(0)
    assert torch.allclose(point, torch.tensor([9.5, 3.5]) / 16, atol=1e-6)  # the texel centre, back from its weights


def test_uv_rasterisation_is_the_same_in_small_chunks_and_bands():
    """A budget far below one triangle's box (bands of rows, one triangle per chunk) gives the same owners and
    weights as the default chunks, and every texel's weights give back its own sample point."""
    k = 7  # a 7 x 7 grid of quads, two triangles each, over the whole texture (an atlas without gaps)
    grid = np.stack(np.meshgrid(np.arange(k + 1), np.arange(k + 1), indexing="xy"), -1).reshape(-1, 2) / k
    quads = [(r * (k + 1) + c, r * (k + 1) + c + 1, (r + 1) * (k + 1) + c + 1, (r + 1) * (k + 1) + c)
             for r in range(k) for c in range(k)]
    faces = np.array([tri for a, b, c, d in quads for tri in ((a, b, c), (a, c, d))])
    uvs = grid.astype(np.float32)
    big_owner, big_weights = rasterise_uv(uvs, faces, 64)
    small_owner, small_weights = rasterise_uv(uvs, faces, 64, budget=16)
    assert (big_owner >= 0).all() and (small_owner >= 0).all()  # the grid covers every texel
    same = big_owner == small_owner
    assert torch.allclose(big_weights[same], small_weights[same], atol=1e-6)
    on_an_edge = (big_weights.amin(-1) < 1e-6) & (small_weights.amin(-1) < 1e-6)
    assert (same | on_an_edge).all()  # only a texel centre on a shared edge may go to either triangle
    rows, cols = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    for owner, weights in ((big_owner, big_weights), (small_owner, small_weights)):
        corners = torch.from_numpy(uvs)[torch.from_numpy(faces)][owner]  # (64, 64, 3, 2)
        points = (weights[..., None] * corners).sum(-2) * 64  # each texel's point, back from its weights
        assert torch.allclose(points, torch.stack([cols, rows], -1).float() + 0.5, atol=1e-4)


def test_stl_is_z_up_in_millimetres_and_obj_companions_have_no_spaces(tmp_path):
    import trimesh

    from recon3d.export import TexturedMesh, write_obj, write_stl
    from recon3d.mesh import Mesh

    tall = trimesh.creation.box(extents=(0.2, 0.4, 0.8))  # world frame: 0.8 along z (up)
    mesh = Mesh(tall.vertices.astype(np.float32), tall.faces.astype(np.int64), np.full((8, 3), 0.5, np.float32))
    stl = trimesh.load(write_stl(mesh, tmp_path / "tall.stl"), process=False)
    assert np.allclose(stl.extents, [10, 20, 40], atol=1e-3)  # z up, front -y, 50 mm per unit
    textured = TexturedMesh(mesh.vertices, mesh.vertex_normals(), mesh.faces, np.zeros((8, 2), np.float32),
                            np.full((4, 4, 3), 128, np.uint8), 1.0)
    obj = write_obj(textured, tmp_path / "my duck.obj")
    assert "mtllib my_duck.mtl" in obj.read_text() and "map_Kd my_duck.png" in (tmp_path / "my_duck.mtl").read_text()
    assert trimesh.load(obj, process=False).visual.kind == "texture"
