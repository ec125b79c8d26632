"""Benchmark the exporter (recon3d/export.py): seconds per stage for a mesh of a 256^3 grid decimated to 50k faces
with a 1024^2 baked texture, written as GLB, OBJ + MTL + PNG, PLY and STL.

Run from the repository root::

    python bench/export.py                                  # 256^3, 50,000 faces, 1024 texture, on the CPU
    python bench/export.py --device cuda --texture 2048     # on a GPU
    python bench/export.py --quick                          # 96^3, 5,000 faces, 256 texture: a smoke test

The object is a ball of radius 0.6 (its density analytic, so the mesh is the same everywhere: about 150k triangles
at 256^3) whose colour comes from a triplane in the small LRM layout (32 channels, 64x64 planes) read by the LRM's
plane decoder with random weights: every texel's colour costs what it costs with a real LRM field. Results go to a
table and ``bench/results/export-<device>.json``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from lrm import REPO, format_table, machine_info, write_report  # bench/lrm.py: same reports and sys.path

from recon3d.field import Field, sample_triplane  # noqa: E402  (after lrm.py put the clone on the path)

RADIUS = 0.6


class DecodedBall(Field):
    """Density of a ball (iso level 5), colour from a random small-LRM triplane through the LRM's decoder."""

    iso_level = 5.0

    def __init__(self, device: torch.device):
        from recon3d.models.lrm import PlaneDecoder

        generator = torch.Generator().manual_seed(0)
        self.planes = torch.randn(1, 3, 32, 64, 64, generator=generator).to(device)
        self.decoder = PlaneDecoder(3 * 32).to(device).eval()
        self._device = device

    @property
    def device(self) -> torch.device:
        return self._device

    def query(self, points: torch.Tensor):  # (1, P, 3) -> (1, P, 1), (1, P, 3)
        with torch.no_grad():
            _, rgb = self.decoder(sample_triplane(self.planes, points.to(self._device)))
        density = (5.0 + 20.0 * (RADIUS - points.norm(dim=-1, keepdim=True))).clamp(min=0)
        return density.to(rgb.device), rgb.clamp(0, 1)


def run(resolution: int, faces: int, texture: int, device: torch.device) -> dict:
    """One export of every format through the library's three stages, each timed (the device synchronised)."""
    from recon3d.export import FORMATS, ExportOptions, colour_export, plan_export, write_export
    from recon3d.mesh import MeshSettings, extract_mesh
    from recon3d.pipelines.progress import synchronize

    field, options = DecodedBall(device), ExportOptions(formats=FORMATS, faces=faces, texture=texture)
    synchronize(device)
    start = time.perf_counter()
    mesh, _ = extract_mesh(field, MeshSettings(resolution=resolution))
    synchronize(device)
    meshed = time.perf_counter() - start
    plan = plan_export(mesh, options)
    coloured, textured = colour_export(plan, field, options)
    synchronize(device)
    with tempfile.TemporaryDirectory() as folder:
        exported = write_export(coloured, textured, options, Path(folder) / "ball", timings=plan.timings)
    seconds = {"mesh": round(meshed, 3), **{stage: round(value, 3) for stage, value in exported.timings.items()}}
    return {"resolution": resolution, "faces_meshed": len(mesh.faces), "faces": exported.faces, "texture": texture,
            "texel_coverage": round(textured.coverage, 3), "seconds": seconds,
            "export_total_s": round(sum(value for stage, value in seconds.items() if stage != "mesh"), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--faces", type=int, default=50_000)
    parser.add_argument("--texture", type=int, default=1024)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="96^3, 5,000 faces, a 256 texture")
    args = parser.parse_args()
    if args.quick:
        args.resolution, args.faces, args.texture = 96, 5000, 256
    device = torch.device(args.device)
    result = run(args.resolution, args.faces, args.texture, device)
    print(format_table(["stage", "seconds"], [[stage, value] for stage, value in result["seconds"].items()]))
    print(f"{result['faces_meshed']:,} -> {result['faces']:,} faces, {result['texture']}^2 texture "
          f"({result['texel_coverage']:.0%} of texels on a triangle); export {result['export_total_s']} s")
    suffix = "-quick" if args.quick else ""
    write_report(REPO / "bench" / "results" / f"export-{device.type}{suffix}.json",
                 {"machine": machine_info(), "device": str(device), **result})


if __name__ == "__main__":
    main()
