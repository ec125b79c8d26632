"""Field -> density grid -> marching cubes -> vertex colours -> oriented GLB.

The grid has ``resolution`` points per axis spanning [-1, 1]. :func:`coarse_to_fine_grid` evaluates the field on
a coarse lattice (at most the field's ``sample_spacing`` apart, e.g. one triplane texel) first, then exactly in
the coarse cells that may hold the iso-surface (crossing it, or rising close to it) plus a margin of one cell, and
fills the rest by trilinear interpolation of the coarse values, which stays on the correct side of the level. The
mesh then equals the one from the dense grid, thin parts included (tests check both).
"""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass, field as dataclass_field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .cameras import world_to_gltf
from .cancel import NEVER, CancelToken
from .field import Field, as_field
from .options import Limit

RESOLUTION = Limit("mesh resolution", 64, 512, whole=True)  # points per axis of the density grid
CPU_RESOLUTION, GPU_RESOLUTION = 128, 256  # the default on each kind of device: on a CPU, 256^3 takes minutes
FLOATER_FRACTION = 0.05  # "remove floaters": drop detached parts under 5 % of the largest one


@dataclass
class DensityGrid:
    values: torch.Tensor  # (R, R, R) density, index order (x, y, z), on CPU, float32
    queries: int  # how many field queries built it
    stats: dict = dataclass_field(default_factory=dict)
    exact: torch.Tensor | None = None  # (R, R, R) bool: where values are field queries (None: everywhere)

    @property
    def resolution(self) -> int:
        return self.values.shape[0]


@dataclass
class Mesh:
    """A triangle mesh in the world frame (z up), vertex colours in sRGB [0, 1]."""

    vertices: np.ndarray  # (V, 3) float32
    faces: np.ndarray  # (F, 3) int64, counter-clockwise seen from outside
    colors: np.ndarray  # (V, 3) float32

    def vertex_normals(self) -> np.ndarray:
        """Area-weighted unit vertex normals (V, 3) from the face winding."""
        vertices, faces = torch.from_numpy(self.vertices).float(), torch.from_numpy(self.faces).long()
        a, b, c = vertices[faces[:, 0]], vertices[faces[:, 1]], vertices[faces[:, 2]]
        face_normals = torch.linalg.cross(b - a, c - a)  # (F, 3), length = twice the area
        normals = torch.zeros_like(vertices)
        for corner in range(3):
            normals.index_add_(0, faces[:, corner], face_normals)
        return F.normalize(normals, dim=1, eps=1e-12).numpy()

    def save_glb(self, path: str | Path, extras: dict | None = None) -> Path:
        """Write a GLB; ``extras`` (JSON-able: how the mesh was made) goes into the glTF asset's extras."""
        path = Path(path)
        partial = path.with_name(path.name + ".part")  # an interrupted write never leaves a truncated GLB
        partial.write_bytes(mesh_to_glb(self, extras))
        partial.replace(path)
        return path


def check_resolution(resolution: int) -> int:
    return RESOLUTION.check(resolution)


def default_resolution(device: torch.device | str) -> int:
    """The mesh resolution a job gets on ``device`` unless it asks for another (the device budget)."""
    return CPU_RESOLUTION if torch.device(device).type == "cpu" else GPU_RESOLUTION


def grid_points(index: torch.Tensor, resolution: int) -> torch.Tensor:
    """Integer grid indices (..., 3) -> world points (..., 3) in [-1, 1]."""
    return index.to(torch.float32) * (2.0 / (resolution - 1)) - 1.0


def field_device(field: Field) -> torch.device:
    """Where a field computes (grid bookkeeping runs there too); CPU for fields that do not say."""
    return torch.device(getattr(field, "device", "cpu"))


def _query_density(field: Field, points: torch.Tensor, chunk: int, cancel: CancelToken = NEVER) -> torch.Tensor:
    """Densities (P,) on the field's device; ``cancel`` is checked before every chunk."""
    device = field_device(field)
    field, out = as_field(field), []
    for i in range(0, points.shape[0], chunk):
        cancel.check()
        out.append(field.query(points[None, i:i + chunk])[0].reshape(-1).float().to(device))
    return torch.cat(out) if out else torch.zeros(0, device=device)


def _points_near_cells(cells: torch.Tensor, stride: int, resolution: int) -> torch.Tensor:
    """(C, C, C) bool coarse cells -> (R, R, R) bool fine points touched by any set cell.

    Along an axis a fine point either lies on a coarse boundary (touched by two cells) or inside one cell.
    Interleaving boundary and interior flags gives a (2C+1)^3 table, which one gather expands to (R, R, R).
    """
    table = cells
    for axis in range(3):
        x = table.movedim(axis, 0)  # (C, ...)
        edge = torch.zeros_like(x[:1])
        boundary = torch.cat([edge, x]) | torch.cat([x, edge])  # (C+1, ...): cells on either side
        woven = torch.empty((2 * x.shape[0] + 1, *x.shape[1:]), dtype=torch.bool, device=x.device)
        woven[0::2], woven[1::2] = boundary, x
        table = woven.movedim(0, axis)
    fine = torch.arange(resolution, device=cells.device)
    half = torch.where(fine % stride == 0, 2 * (fine // stride), 2 * (fine // stride) + 1)
    return table[half][:, half][:, :, half]


def _lattice(size: int, stride: int, resolution: int) -> torch.Tensor:
    """World points (size^3, 3) of a lattice with ``stride`` fine steps between points, x slowest."""
    axis = torch.arange(size) * stride
    index = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    return grid_points(index, resolution)


@torch.no_grad()
def dense_grid(field: Field, resolution: int, chunk: int = 262144, cancel: CancelToken = NEVER) -> DensityGrid:
    """Density at every point of the resolution^3 grid, built in slabs of x so memory stays bounded."""
    axis = torch.arange(resolution)
    slabs = []
    for x0 in range(0, resolution, 16):
        index = torch.stack(torch.meshgrid(axis[x0:x0 + 16], axis, axis, indexing="ij"), -1).reshape(-1, 3)
        slabs.append(_query_density(field, grid_points(index, resolution), chunk, cancel).cpu())
    return DensityGrid(torch.cat(slabs).reshape(resolution, resolution, resolution), resolution ** 3)


DENSE_WHEN_ACTIVE = 0.6  # above this fraction of active coarse cells, the dense grid is cheaper


def coarse_stride(resolution: int, spacing: float) -> int:
    """Fine steps between coarse samples so that they are at most ``spacing`` apart in world units."""
    return max(1, int(spacing * (resolution - 1) / 2.0))


@torch.no_grad()
def coarse_to_fine_grid(field: Field, resolution: int, level: float, stride: int | None = None,
                        chunk: int = 262144, cancel: CancelToken = NEVER) -> DensityGrid:
    """Density grid evaluated exactly only near the iso-surface ``level`` (see module docstring)."""
    stride = stride or coarse_stride(resolution, as_field(field).sample_spacing)
    if stride == 1:  # nothing to skip at this resolution
        return dense_grid(field, resolution, chunk, cancel)
    cells = -(-(resolution - 1) // stride)  # coarse cells per axis; the lattice may overhang [-1, 1] a little
    padded = cells * stride + 1
    coarse = _query_density(field, _lattice(cells + 1, stride, resolution), chunk, cancel).reshape((cells + 1,) * 3)
    active = _cells_crossing(coarse, level)  # (cells, cells, cells) bool
    active = F.max_pool3d(active[None, None].float(), 3, stride=1, padding=1)[0, 0] > 0  # one cell of margin
    if active.float().mean() > DENSE_WHEN_ACTIVE:  # a surface everywhere (noise): skipping saves nothing
        grid = dense_grid(field, resolution, chunk, cancel)
        grid.queries += coarse.numel()
        return grid
    needed = _points_near_cells(active, stride, resolution)  # (R, R, R) bool: evaluated exactly
    values = F.interpolate(coarse[None, None], size=(padded,) * 3, mode="trilinear", align_corners=True)[0, 0]
    values = values[:resolution, :resolution, :resolution].contiguous()
    queries = coarse.numel()
    for x0 in range(0, resolution, 16):  # slabs bound the memory of the index lists
        index = needed[x0:x0 + 16].nonzero()
        index[:, 0] += x0
        values[index[:, 0], index[:, 1], index[:, 2]] = _query_density(field, grid_points(index, resolution), chunk, cancel)
        queries += index.shape[0]
    stats = {"coarse_queries": coarse.numel(), "active_cells": int(active.sum()), "cells": cells ** 3}
    return DensityGrid(values.cpu(), queries, stats, exact=needed.cpu())


def _cells_crossing(corners: torch.Tensor, level: float, near: float = 0.5) -> torch.Tensor:
    """Cells (n-1)^3 of a lattice (n^3) that may hold the surface ``level``: their 8 corners are not all on one
    side, or (level > 0) some corner is above ``near * level`` while not all are inside. The second rule finds
    parts thinner than the lattice spacing, whose density rises between the samples without crossing at them."""
    grid = corners[None, None]
    highest = F.max_pool3d(grid, 2, stride=1)[0, 0]
    lowest = -F.max_pool3d(-grid, 2, stride=1)[0, 0]
    threshold = near * level if level > 0 else level
    return (highest >= threshold) & (lowest < level)


def auto_level(grid: DensityGrid, inside_fraction: float = 0.1) -> float:
    """A level that puts ``inside_fraction`` of the grid inside: for fields without a calibrated density
    (random weights, early training), where a fixed level may cut no surface at all."""
    sample = grid.values.flatten()[:: max(1, grid.values.numel() // 2_000_000)]
    return float(torch.quantile(sample, 1.0 - inside_fraction))


def marching_cubes(grid: DensityGrid, level: float) -> tuple[np.ndarray, np.ndarray]:
    """Iso-surface of a density grid (larger inside): world vertices (V, 3) and outward faces (F, 3)."""
    from skimage.measure import marching_cubes as skimage_marching_cubes  # heavy import, only when meshing

    values = grid.values.numpy()
    if not values.min() < level < values.max():
        raise EmptyMeshError(f"the field has no surface at density {level:g} (grid range "
                             f"{values.min():.3g}..{values.max():.3g}); try a lower threshold")
    # scikit-image winds faces outward for fields that are smaller inside, so negate the density. Cells
    # whose first corner was not evaluated exactly cannot hold the surface: the mask skips them.
    mask = None if grid.exact is None else grid.exact.numpy()
    verts, faces, _, _ = skimage_marching_cubes(-values, level=-level, mask=mask)
    verts = verts.astype(np.float32) * (2.0 / (grid.resolution - 1)) - 1.0
    return verts, faces.astype(np.int64)


def remove_small_parts(vertices: np.ndarray, faces: np.ndarray, min_fraction: float) -> tuple[np.ndarray, np.ndarray, int]:
    """Drop connected parts with fewer than ``min_fraction`` of the largest part's faces (floaters).

    Works on the mesh's vertex graph (linear in faces), far cheaper than labelling the voxel grid.
    Returns the kept vertices (re-indexed), faces, and how many parts were removed.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(vertices)
    edges = faces[:, [0, 1, 1, 2]].reshape(-1, 2)  # two edges per face connect all three corners
    graph = coo_matrix((np.ones(len(edges), np.int8), (edges[:, 0], edges[:, 1])), shape=(n, n))
    count, labels = connected_components(graph, directed=False)
    face_part = labels[faces[:, 0]]
    sizes = np.bincount(face_part, minlength=count)
    keep_part = sizes >= min_fraction * sizes.max()
    faces = faces[keep_part[face_part]]
    used = np.zeros(n, bool)
    used[faces.ravel()] = True
    new_index = np.cumsum(used) - 1
    return vertices[used], new_index[faces], int((~keep_part & (sizes > 0)).sum())


class EmptyMeshError(ValueError):
    """The field has no iso-surface at the requested level."""


@torch.no_grad()
def vertex_colors(field: Field, vertices: np.ndarray, chunk: int = 262144, cancel: CancelToken = NEVER) -> np.ndarray:
    points = torch.from_numpy(vertices)
    field, rgb = as_field(field), []
    for i in range(0, len(points), chunk):
        cancel.check()
        rgb.append(field.query(points[None, i:i + chunk])[1][0].cpu())
    return torch.cat(rgb).clamp(0, 1).numpy().astype(np.float32) if rgb else np.zeros((0, 3), np.float32)


def srgb_to_linear(c: np.ndarray) -> np.ndarray:
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def mesh_to_glb(mesh: Mesh, extras: dict | None = None) -> bytes:
    """Binary glTF 2.0: POSITION, NORMAL, COLOR_0 (linear, as the spec wants), uint32 indices, y up; ``extras``
    lands in ``asset.extras``."""
    rgba = np.concatenate([srgb_to_linear(mesh.colors), np.ones((len(mesh.colors), 1))], 1)
    colors = np.round(np.clip(rgba, 0, 1) * 65535).astype(np.uint16)
    glb = GlbBuilder(mesh.vertices, mesh.vertex_normals(), mesh.faces)
    glb.attributes["COLOR_0"] = glb.accessor(colors, "VEC4", 34962, normalized=True)
    return glb.pack(extras)


class GlbBuilder:
    """One triangle mesh as binary glTF 2.0: positions and normals (given in the world frame, written y up),
    uint32 indices, and whatever attributes, images and material the caller adds before :meth:`pack`."""

    def __init__(self, vertices: np.ndarray, normals: np.ndarray, faces: np.ndarray):
        self.blobs: list[bytes] = []
        self.views: list[dict] = []
        self.accessors: list[dict] = []
        positions = world_to_gltf(torch.from_numpy(np.asarray(vertices, np.float32))).numpy()
        self.attributes = {"POSITION": self.accessor(positions, "VEC3", 34962, bounds=True),
                           "NORMAL": self.accessor(world_to_gltf(torch.from_numpy(
                               np.asarray(normals, np.float32))).numpy(), "VEC3", 34962)}
        self.indices = self.accessor(np.asarray(faces).astype(np.uint32).reshape(-1), "SCALAR", 34963, bounds=True)
        self.material: dict = {"pbrMetallicRoughness": {"baseColorFactor": [1, 1, 1, 1], "metallicFactor": 0.0,
                                                        "roughnessFactor": 1.0}}
        self.images: list[dict] = []

    def view(self, blob: bytes, target: int | None = None) -> int:
        """A buffer view of ``blob`` (padded to 4 bytes); its index."""
        offset = sum(len(b) for b in self.blobs)
        self.blobs.append(blob + b"\0" * (-len(blob) % 4))
        self.views.append({"buffer": 0, "byteOffset": offset, "byteLength": len(blob),
                           **({"target": target} if target else {})})
        return len(self.views) - 1

    def accessor(self, data: np.ndarray, kind: str, target: int, normalized: bool = False,
                 bounds: bool = False) -> int:
        """An accessor of ``data`` (float32, uint16 or uint32 rows); its index."""
        component = {np.dtype(np.float32): 5126, np.dtype(np.uint16): 5123, np.dtype(np.uint32): 5125}[data.dtype]
        item = {"bufferView": self.view(np.ascontiguousarray(data).tobytes(), target), "componentType": component,
                "count": len(data), "type": kind, **({"normalized": True} if normalized else {})}
        if bounds:
            rows = data.reshape(len(data), -1)
            low, high = rows.min(0).tolist(), rows.max(0).tolist()
            item |= {"min": low, "max": high} if kind != "SCALAR" else {"min": [int(low[0])], "max": [int(high[0])]}
        self.accessors.append(item)
        return len(self.accessors) - 1

    def base_color_texture(self, png: bytes, uvs: np.ndarray) -> None:
        """Texture the material with a PNG (sRGB-encoded, as glTF's baseColorTexture is) read at ``uvs`` (V, 2),
        glTF's convention: (0, 0) is the image's top-left corner."""
        self.attributes["TEXCOORD_0"] = self.accessor(np.asarray(uvs, np.float32), "VEC2", 34962)
        self.images.append({"bufferView": self.view(png), "mimeType": "image/png"})
        self.material["pbrMetallicRoughness"]["baseColorTexture"] = {"index": 0, "texCoord": 0}

    def pack(self, extras: dict | None = None) -> bytes:
        gltf = {
            "asset": {"version": "2.0", "generator": "recon3d", **({"extras": extras} if extras else {})},
            "scene": 0, "scenes": [{"nodes": [0]}], "nodes": [{"mesh": 0}],
            "meshes": [{"primitives": [{"attributes": self.attributes, "indices": self.indices, "material": 0,
                                        "mode": 4}]}],
            "materials": [self.material],
            "buffers": [{"byteLength": sum(len(b) for b in self.blobs)}],
            "bufferViews": self.views, "accessors": self.accessors,
        }
        if self.images:  # linear filtering with mipmaps, clamped at the atlas border
            gltf |= {"images": self.images, "textures": [{"sampler": 0, "source": 0}],
                     "samplers": [{"magFilter": 9729, "minFilter": 9987, "wrapS": 33071, "wrapT": 33071}]}
        return _pack_glb(gltf, b"".join(self.blobs))


def _pack_glb(gltf: dict, binary: bytes) -> bytes:
    text = json.dumps(gltf, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 4)
    binary += b"\0" * (-len(binary) % 4)
    total = 12 + 8 + len(text) + 8 + len(binary)
    return (struct.pack("<4sII", b"glTF", 2, total) + struct.pack("<I4s", len(text), b"JSON") + text
            + struct.pack("<I4s", len(binary), b"BIN\0") + binary)


FIELD_LEVEL = "field"  # MeshSettings.level: the field's own iso_level (picked from the grid if it states none)


@dataclass
class MeshSettings:
    resolution: int = 256
    level: float | str | None = FIELD_LEVEL  # density iso-level; None picks one from the grid (see auto_level)
    # (FIELD_LEVEL: the field's iso_level)
    coarse_to_fine: bool = True
    min_part_fraction: float = 0.0  # drop parts with fewer faces than this fraction of the largest (1: largest only)
    chunk: int = 262144


def extract_mesh(field: Field, settings: MeshSettings | None = None, timings: dict | None = None,
                 cancel: CancelToken = NEVER) -> tuple[Mesh, DensityGrid]:
    """The whole export path for a field of one object (``field.select(k)`` picks one); gradients off.
    ``timings`` (if given) receives seconds per stage; ``cancel`` stops it between chunks of field queries
    (raising :class:`~recon3d.cancel.Cancelled`)."""
    settings, field = settings or MeshSettings(), as_field(field)
    if field.num_objects != 1:
        raise ValueError(f"a mesh is made from one object; this field holds {field.num_objects}: use field.select(k)")
    timings = {} if timings is None else timings
    resolution = check_resolution(settings.resolution)
    start = time.perf_counter()
    level, calibration_queries = field.iso_level if settings.level == FIELD_LEVEL else settings.level, 0
    if level is None:  # calibrate on a cheap lattice, then mesh as usual
        lattice = dense_grid(field, (resolution - 1) // 4 + 1, chunk=settings.chunk, cancel=cancel)
        level, calibration_queries = auto_level(lattice), lattice.queries
    if settings.coarse_to_fine:
        grid = coarse_to_fine_grid(field, resolution, level, chunk=settings.chunk, cancel=cancel)
    else:
        grid = dense_grid(field, resolution, chunk=settings.chunk, cancel=cancel)
    grid.queries += calibration_queries
    grid.stats["level"] = level
    timings["grid_queries"] = time.perf_counter() - start
    start = time.perf_counter()
    vertices, faces = marching_cubes(grid, level)
    if settings.min_part_fraction > 0:
        vertices, faces, grid.stats["parts_removed"] = remove_small_parts(vertices, faces, settings.min_part_fraction)
    timings["marching_cubes"] = time.perf_counter() - start
    start = time.perf_counter()
    colors = vertex_colors(field, vertices, settings.chunk, cancel)
    timings["vertex_colors"] = time.perf_counter() - start
    return Mesh(vertices, faces, colors), grid


def extract_mesh_or_fallback(field: Field, settings: MeshSettings | None = None, timings: dict | None = None,
                             cancel: CancelToken = NEVER, fallback_levels: tuple[float, ...] = (),
                             ) -> tuple[Mesh, DensityGrid, str | None]:
    """:func:`extract_mesh`, and when the field has no surface at its level (an early state, an odd sample),
    the mesh at the first of ``fallback_levels`` that has one, else at an automatic level, with a note saying so
    (None when the level held)."""
    settings = settings or MeshSettings()
    level = as_field(field).iso_level if settings.level == FIELD_LEVEL else settings.level
    for attempt in (level, *fallback_levels):
        try:
            mesh, grid = extract_mesh(field, replace(settings, level=attempt), timings, cancel)
        except EmptyMeshError:
            if attempt is None:
                raise
            continue
        note = None if attempt == level else f"no surface at density {level:g}: meshed at density {attempt:g}"
        return mesh, grid, note
    mesh, grid = extract_mesh(field, replace(settings, level=None), timings, cancel)
    return mesh, grid, f"no surface at density {level:g}: meshed at an automatic level ({grid.stats['level']:.3g})"
