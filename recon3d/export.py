"""Exports people can take elsewhere: a face budget, a UV texture baked from the field, and GLB, OBJ, PLY and STL.

Every method ends in a :class:`~recon3d.field.Field` and a :class:`~recon3d.mesh.Mesh` made from it; an export
starts from both and never re-runs the model:

1. **faces**: the mesh is decimated to at most N triangles (``fast-simplification``, quadric edge collapse), and
   the field gives the colours at the new vertices;
2. **texture**: ``xatlas`` unwraps the mesh into charts, each texel centre is placed on its triangle by
   rasterising the triangles in UV space (plain PyTorch), the field is asked for the colour at that 3D point
   (``samples`` x ``samples`` points per texel, averaged), and the colours are dilated across chart borders so that
   filtering and mipmaps show no dark seams. The PNG holds the field's colours as they are: sRGB-encoded, glTF's
   rule for ``baseColorTexture`` (the vertex colours of COLOR_0 are linear);
3. **formats**: GLB (vertex colours, or the texture on a material of metallic 0), OBJ + MTL + PNG (``map_Kd``,
   relative paths), PLY with vertex colours, STL (geometry only).

Frames: GLB, OBJ and PLY are y up with the object's front facing +z (glTF's convention, which Blender's and most
importers' defaults read upright). STL follows what slicers expect: z up, the front facing -y, in millimetres with
the object's [-1, 1] box as 100 mm.
"""

from __future__ import annotations

import io
import re
import time
from dataclasses import dataclass, field as dataclass_field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .cameras import world_to_gltf
from .cancel import NEVER, CancelToken
from .field import Field
from .mesh import GlbBuilder, Mesh, vertex_colors
from .options import Limit, Options, limited

FORMATS = ("glb", "obj", "ply", "stl")
FACES = Limit("face budget", 100, 10_000_000, whole=True)
TEXTURE = Limit("texture size", 64, 8192, whole=True)
SAMPLES = Limit("samples per texel side", 1, 4, whole=True)
STL_MM_PER_UNIT = 50.0  # the [-1, 1] box prints as 100 mm
DILATION_TEXELS = 16  # colours spread this far beyond a chart's border (mipmaps of a 4096 texture stay clean to 1/16)
QUERY_CHUNK = 262144  # field queries per call


@dataclass
class ExportOptions(Options):
    """What to write: ``formats`` of FORMATS; at most ``faces`` triangles (None: as meshed); a ``texture`` of
    SIZE^2 texels (None: vertex colours), each the mean of ``samples`` x ``samples`` field colours."""

    FORMATS: ClassVar[tuple[str, ...]] = FORMATS
    formats: tuple[str, ...] = ("glb",)
    faces: int | None = limited(None, FACES)
    texture: int | None = limited(None, TEXTURE)
    samples: int = limited(1, SAMPLES)

    def validate(self) -> "ExportOptions":
        super().validate()
        formats = tuple(dict.fromkeys(str(name).strip().lower().lstrip(".") for name in self.formats if str(name).strip()))
        unknown = [name for name in formats if name not in FORMATS]
        if unknown or not formats:
            raise ValueError(f"unknown export format {', '.join(unknown) or '(none given)'}: choose from "
                             f"{', '.join(FORMATS)}")
        self.formats = formats
        return self

    @staticmethod
    def parse_formats(text: str) -> tuple[str, ...]:
        """"glb,obj" -> ("glb", "obj") (checked by :meth:`validate`)."""
        return tuple(part for part in str(text).split(","))


@dataclass
class TexturedMesh:
    """A mesh whose colours live in a texture: vertices split along the UV charts' seams."""

    vertices: np.ndarray  # (V, 3) float32, world frame (z up)
    normals: np.ndarray  # (V, 3) float32, world frame
    faces: np.ndarray  # (F, 3) int64
    uvs: np.ndarray  # (V, 2) float32 in [0, 1], glTF's convention: (0, 0) is the image's top-left corner
    texture: np.ndarray  # (S, S, 3) uint8, sRGB
    coverage: float  # the fraction of texels that lie on a triangle (the rest are dilated or filled)


@dataclass
class Exported:
    """What an export wrote: a path per format (OBJ's MTL and PNG lie beside its .obj), the seconds per stage,
    and the mesh written."""

    paths: dict[str, Path]
    timings: dict[str, float] = dataclass_field(default_factory=dict)
    faces: int = 0
    texture: int | None = None


# -- faces ---------------------------------------------------------------------------------------------------------

def decimate(mesh: Mesh, max_faces: int, cancel: CancelToken = NEVER) -> Mesh:
    """``mesh`` with at most ``max_faces`` triangles (quadric edge collapse, shape kept); each new vertex takes the
    colour of the nearest old one until :func:`colour_export` asks the field. A mesh already small enough is
    returned as it is."""
    import fast_simplification
    from scipy.spatial import cKDTree

    if len(mesh.faces) <= max_faces:
        return mesh
    vertices, faces, target = mesh.vertices.astype(np.float32), mesh.faces.astype(np.int32), int(max_faces)
    while len(faces) > max_faces:  # the count is the library's target: aim lower until the budget is met
        vertices, faces = fast_simplification.simplify(vertices, faces, target_count=target)
        vertices, faces, target = vertices.astype(np.float32), faces.astype(np.int32), int(target * 0.98)
        cancel.check()
    colors = mesh.colors[cKDTree(mesh.vertices).query(vertices)[1]]
    return Mesh(vertices, faces.astype(np.int64), colors.astype(np.float32))


# -- texture -------------------------------------------------------------------------------------------------------

def unwrap(mesh: Mesh, size: int = 1024) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """xatlas charts packed for a SIZE^2 texture with a gutter between them (so that the dilated colours, not a
    neighbouring chart, lie under filtering and mipmaps): (source vertex of each new vertex (V',), faces (F, 3)
    into the new vertices, uvs (V', 2) in [0, 1] with v measured from the image's top, as glTF reads them)."""
    import xatlas

    atlas = xatlas.Atlas()
    atlas.add_mesh(mesh.vertices.astype(np.float32), mesh.faces.astype(np.uint32))
    pack = xatlas.PackOptions()
    pack.resolution, pack.padding, pack.bilinear = size, gutter(size), True
    atlas.generate(pack_options=pack)
    source, faces, uvs = atlas[0]
    return source.astype(np.int64), faces.astype(np.int64), uvs.astype(np.float32)


def gutter(size: int) -> int:
    """Texels left empty between charts: 2 at 512, 4 at 1024, 8 at 2048 (the dilation fills them)."""
    return max(2, size // 256)


def rasterise_uv(uvs: np.ndarray, faces: np.ndarray, size: int, offset: tuple[float, float] = (0.5, 0.5),
                 budget: int = 1 << 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Which triangle covers each texel's sample point (x + offset, y + offset) in UV space, and where: the
    triangle index (S, S) (-1: none) and barycentric weights (S, S, 3). Texel (row y, column x) covers
    u in [x, x + 1) / S and v in [y, y + 1) / S (row 0 at the top). A point on an edge shared by two triangles
    goes to one of them. Triangles are taken in chunks whose texel boxes hold at most ``budget`` texels (a larger
    triangle alone, in bands of rows), so memory stays bounded for any mesh and texture size."""
    corners = torch.from_numpy(uvs)[torch.from_numpy(faces)].double() * size  # (F, 3, 2) texel units (x, y)
    shift = torch.tensor(offset, dtype=torch.float64)
    low = torch.ceil(corners.amin(1) - shift).long().clamp(0, size - 1)  # (F, 2) first texel (x, y) whose point
    high = torch.floor(corners.amax(1) - shift).long().clamp(0, size - 1)  # may lie inside; last, inclusive
    side = (high - low + 1).clamp(min=1).amax(1)  # (F,) the longer side of each triangle's texel box
    order = torch.argsort(side)
    cost = side[order] ** 2  # (F,) ascending: a chunk's boxes are all as large as its last one's
    owner = torch.full((size * size,), -1, dtype=torch.long)
    weights = torch.zeros(size * size, 3, dtype=torch.float32)
    start = 0
    while start < len(order):
        # the most triangles from ``start`` on whose boxes, each as large as the chunk's largest, fit the budget
        fits = (torch.arange(1, len(order) - start + 1) * cost[start:] <= budget).nonzero()
        stop = start + (int(fits[-1]) + 1 if len(fits) else 1)
        chunk, width = order[start:stop], int(side[order[stop - 1]])
        rows = max(1, min(width, budget // width))  # one large triangle: bands of rows
        for band in range(0, width, rows):
            band_low = low[chunk] + torch.tensor([0, band])
            _cover(corners[chunk], band_low, high[chunk], chunk, width, rows, offset, size, owner, weights)
        start = stop
    return owner.view(size, size), weights.view(size, size, 3)


def _cover(corners: torch.Tensor, low: torch.Tensor, high: torch.Tensor, index: torch.Tensor, width: int,
           height: int, offset: tuple[float, float], size: int, owner: torch.Tensor, weights: torch.Tensor) -> None:
    """Mark the texels whose sample point lies in one of these triangles (corners (C, 3, 2)), looking at the
    ``width`` x ``height`` texels from ``low`` (C, 2) on, up to ``high`` (C, 2) inclusive."""
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    x = low[:, 0, None, None] + xs  # (C, h, w) texel columns
    y = low[:, 1, None, None] + ys
    in_box = (x <= high[:, 0, None, None]) & (y <= high[:, 1, None, None])
    px, py = x.double() + offset[0], y.double() + offset[1]
    a, b, c = corners[:, 0], corners[:, 1], corners[:, 2]  # (C, 2)
    area = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])  # (C,) twice signed

    def edge(p, q):  # twice the signed area of (p, q, point) for every texel: (C, h, w)
        return ((q[:, 0] - p[:, 0])[:, None, None] * (py - p[:, 1, None, None])
                - (q[:, 1] - p[:, 1])[:, None, None] * (px - p[:, 0, None, None]))

    safe = torch.where(area.abs() > 1e-12, area, torch.ones_like(area))[:, None, None]
    bary = torch.stack([edge(b, c) / safe, edge(c, a) / safe, edge(a, b) / safe], -1)  # (C, h, w, 3)
    inside = in_box & (bary >= -1e-9).all(-1) & (area.abs() > 1e-12)[:, None, None]
    which = inside.nonzero(as_tuple=True)
    flat = y[which] * size + x[which]
    texels, slot = torch.unique(flat, return_inverse=True)  # a texel claimed twice (a shared edge): the first
    first = torch.full((len(texels),), len(flat), dtype=torch.long).scatter_reduce_(
        0, slot, torch.arange(len(flat)), "amin")
    owner[texels] = index[which[0][first]]
    weights[texels] = bary[which][first].float()


@torch.no_grad()
def bake_texture(field: Field, vertices: np.ndarray, faces: np.ndarray, uvs: np.ndarray, size: int,
                 samples: int = 1, cancel: CancelToken = NEVER) -> tuple[np.ndarray, float]:
    """The field's colours on the mesh's surface as a SIZE^2 sRGB texture (uint8) and the covered fraction:
    each texel is the mean of ``samples`` x ``samples`` points spread over it, then colours spread into the empty
    texels beyond the charts."""
    total = torch.zeros(size * size, 3)
    hits = torch.zeros(size * size)
    corners = torch.from_numpy(vertices).float()[torch.from_numpy(faces)]  # (F, 3, 3)
    for sy in range(samples):
        for sx in range(samples):
            cancel.check()
            owner, bary = rasterise_uv(uvs, faces, size, ((sx + 0.5) / samples, (sy + 0.5) / samples))
            owner, bary = owner.view(-1), bary.view(-1, 3)
            covered = (owner >= 0).nonzero().squeeze(1)
            points = (bary[covered, :, None] * corners[owner[covered]]).sum(1)  # (N, 3) on the triangles
            total[covered] += torch.from_numpy(vertex_colors(field, points.numpy(), QUERY_CHUNK, cancel))
            hits[covered] += 1
    colors = (total / hits.clamp(min=1)[:, None]).view(size, size, 3)
    mask = (hits > 0).view(size, size)
    coverage = float(mask.float().mean())
    colors = dilate(colors, mask)
    return (colors.clamp(0, 1) * 255 + 0.5).to(torch.uint8).numpy(), coverage


def dilate(colors: torch.Tensor, mask: torch.Tensor, texels: int = DILATION_TEXELS) -> torch.Tensor:
    """Spread ``colors`` (H, W, 3) from the texels in ``mask`` (H, W) into their empty neighbours, one ring per
    round for ``texels`` rounds (the mean of the filled 3x3 neighbours); texels still empty get the mean colour."""
    image = colors.permute(2, 0, 1)[None].clone()  # (1, 3, H, W)
    filled = mask[None, None].float()
    for _ in range(texels):
        if bool(filled.all()):
            break
        summed = F.avg_pool2d(image * filled, 3, stride=1, padding=1, count_include_pad=False)
        weight = F.avg_pool2d(filled, 3, stride=1, padding=1, count_include_pad=False)
        grow = (filled == 0) & (weight > 0)
        image = torch.where(grow, summed / weight.clamp(min=1e-12), image)
        filled = torch.where(grow, torch.ones_like(filled), filled)
    if not bool(filled.all()):
        mean = (image * filled).sum((2, 3), keepdim=True) / filled.sum().clamp(min=1)
        image = torch.where(filled > 0, image, mean)
    return image[0].permute(1, 2, 0)


# -- formats -------------------------------------------------------------------------------------------------------

def png_bytes(texture: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(texture, "RGB").save(buffer, "PNG")
    return buffer.getvalue()


def textured_glb(mesh: TexturedMesh, extras: dict | None = None) -> bytes:
    """Binary glTF 2.0 with TEXCOORD_0 and the texture on the material's baseColorTexture (metallic 0)."""
    glb = GlbBuilder(mesh.vertices, mesh.normals, mesh.faces)
    glb.base_color_texture(png_bytes(mesh.texture), mesh.uvs)
    return glb.pack(extras)


def _y_up(vertices: np.ndarray) -> np.ndarray:
    return world_to_gltf(torch.from_numpy(np.asarray(vertices, np.float32))).numpy()


def write_obj(mesh: Mesh | TexturedMesh, path: Path) -> Path:
    """Wavefront OBJ (y up, front +z). Textured: ``vt`` (v from the image's bottom, OBJ's convention), normals,
    and an MTL beside it naming the PNG with ``map_Kd`` (relative paths). Vertex colours otherwise, as the
    widely read ``v x y z r g b`` extension."""
    lines = ["# recon3d"]
    vertices = _y_up(mesh.vertices)
    if isinstance(mesh, TexturedMesh):
        mtl, png = companions(path)
        Image.fromarray(mesh.texture, "RGB").save(png)
        mtl.write_text(f"newmtl baked\nKa 0 0 0\nKd 1 1 1\nKs 0 0 0\nillum 1\nmap_Kd {png.name}\n")
        lines += [f"mtllib {mtl.name}", "usemtl baked"]
        lines += [f"v {x:.6f} {y:.6f} {z:.6f}" for x, y, z in vertices]
        lines += [f"vt {u:.6f} {1.0 - v:.6f}" for u, v in mesh.uvs]
        lines += [f"vn {x:.5f} {y:.5f} {z:.5f}" for x, y, z in _y_up(mesh.normals)]
        lines += [f"f {a}/{a}/{a} {b}/{b}/{b} {c}/{c}/{c}" for a, b, c in mesh.faces + 1]
    else:
        lines += [f"v {x:.6f} {y:.6f} {z:.6f} {r:.4f} {g:.4f} {b:.4f}"
                  for (x, y, z), (r, g, b) in zip(vertices, mesh.colors)]
        lines += [f"f {a} {b} {c}" for a, b, c in mesh.faces + 1]
    path.write_text("\n".join(lines) + "\n")
    return path


def companions(obj: Path) -> tuple[Path, Path]:
    """The MTL and PNG beside an OBJ, named without spaces (OBJ splits ``mtllib`` and ``map_Kd`` on them)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", obj.stem) or "mesh"
    return obj.with_name(f"{stem}.mtl"), obj.with_name(f"{stem}.png")


def write_ply(mesh: Mesh, path: Path) -> Path:
    """Binary PLY (y up, front +z) with sRGB vertex colours (uchar)."""
    import trimesh

    colors = (np.clip(mesh.colors, 0, 1) * 255 + 0.5).astype(np.uint8)
    shape = trimesh.Trimesh(_y_up(mesh.vertices), mesh.faces, vertex_colors=colors, process=False)
    path.write_bytes(shape.export(file_type="ply"))
    return path


def write_stl(mesh: Mesh | TexturedMesh, path: Path) -> Path:
    """Binary STL for slicers: z up, front -y, millimetres (the [-1, 1] box is 100 mm); geometry only."""
    import trimesh

    shape = trimesh.Trimesh(mesh.vertices * STL_MM_PER_UNIT, mesh.faces, process=False)
    path.write_bytes(shape.export(file_type="stl"))
    return path


@dataclass
class ExportPlan:
    """The CPU half of an export, done before the device is needed: the decimated geometry (its colours not yet
    asked of the field) and, for a texture, its UV charts."""

    mesh: Mesh
    recolour: bool  # the mesh was decimated: its new vertices' colours come from the field
    charts: tuple[np.ndarray, np.ndarray, np.ndarray] | None  # unwrap(): source vertices, faces, uvs
    timings: dict[str, float] = dataclass_field(default_factory=dict)


def plan_export(mesh: Mesh, options: ExportOptions, cancel: CancelToken = NEVER) -> ExportPlan:
    """Decimate to the face budget and unwrap for the texture: CPU work that needs no field."""
    options.validate()
    timings, start = {}, time.perf_counter()
    small = decimate(mesh, options.faces, cancel=cancel) if options.faces is not None else mesh
    timings["decimate"] = time.perf_counter() - start
    charts = None
    if options.texture:
        cancel.check()
        start = time.perf_counter()
        charts = unwrap(small, options.texture)
        timings["unwrap"] = time.perf_counter() - start
    return ExportPlan(small, small is not mesh, charts, timings)


@torch.no_grad()
def colour_export(plan: ExportPlan, field: Field, options: ExportOptions,
                  cancel: CancelToken = NEVER) -> tuple[Mesh, TexturedMesh | None]:
    """The device half: the field's colours at the decimated vertices and in the texture's texels."""
    mesh, start = plan.mesh, time.perf_counter()
    if plan.recolour:
        mesh = Mesh(mesh.vertices, mesh.faces, vertex_colors(field, mesh.vertices, cancel=cancel))
    plan.timings["colours"] = time.perf_counter() - start
    if plan.charts is None:
        return mesh, None
    start = time.perf_counter()
    source, faces, uvs = plan.charts
    vertices = mesh.vertices[source].astype(np.float32)
    texture, coverage = bake_texture(field, vertices, faces, uvs, options.texture, options.samples, cancel)
    plan.timings["bake"] = time.perf_counter() - start
    return mesh, TexturedMesh(vertices, mesh.vertex_normals()[source].astype(np.float32), faces, uvs, texture,
                              coverage)


def write_export(mesh: Mesh, textured: TexturedMesh | None, options: ExportOptions, stem: str | Path,
                 extras: dict | None = None, timings: dict | None = None, cancel: CancelToken = NEVER) -> Exported:
    """Write ``stem.<format>`` for each of ``options.formats``; the GLB records ``extras`` and the export's
    settings."""
    stem, timings = Path(stem), dict(timings or {})
    if options.faces is not None or options.texture:  # how the export changed the mesh, in the GLB
        extras = {**(extras or {}), "export": {"faces": len(mesh.faces), "texture": options.texture,
                                              "samples_per_texel": options.samples ** 2 if options.texture else None}}
    paths = {}
    for name in options.formats:
        cancel.check()
        start, path = time.perf_counter(), stem.with_name(f"{stem.name}.{name}")
        if name == "glb" and textured is not None:
            path.write_bytes(textured_glb(textured, extras))
        elif name == "glb":
            mesh.save_glb(path, extras)
        elif name == "obj":
            write_obj(textured if textured is not None else mesh, path)
        elif name == "ply":
            write_ply(mesh, path)
        else:
            write_stl(mesh, path)
        paths[name] = path
        timings[f"write_{name}"] = time.perf_counter() - start
    return Exported(paths, timings, len(mesh.faces), options.texture)


def export_mesh(field: Field, mesh: Mesh, options: ExportOptions, stem: str | Path, extras: dict | None = None,
                cancel: CancelToken = NEVER) -> Exported:
    """Write ``mesh`` (made from ``field``) as ``stem.<format>`` for each of ``options.formats``, decimated to the
    face budget and textured when asked: :func:`plan_export`, :func:`colour_export`, :func:`write_export` in a
    row (a server runs the middle one alone on its device)."""
    plan = plan_export(mesh, options, cancel)
    mesh, textured = colour_export(plan, field, options, cancel)
    return write_export(mesh, textured, options, stem, extras, plan.timings, cancel)


__all__ = ["ExportOptions", "ExportPlan", "Exported", "FORMATS", "TexturedMesh", "bake_texture", "colour_export",
           "decimate", "dilate", "export_mesh", "plan_export", "rasterise_uv", "textured_glb",
           "unwrap", "write_export", "write_obj", "write_ply", "write_stl"]
