"""The published checkpoints recon3d knows, with their licences."""

from __future__ import annotations

from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path


@dataclass(frozen=True)
class CheckpointInfo:
    repo_id: str
    label: str
    licence: str


OPENLRM_LICENCE = "CC BY-NC 4.0 (non-commercial use only)"
OPENLRM_CHECKPOINTS = [
    CheckpointInfo(f"zxhezexin/openlrm-{data}-{size}-1.1", f"OpenLRM {data} {size} v1.1", OPENLRM_LICENCE)
    for size in ("small", "base", "large") for data in ("mix", "obj")
]
DEFAULT_LRM = "zxhezexin/openlrm-mix-base-1.1"

# DMV3D: no public weights exist; recon3d ships a small model trained on procedural shapes only.
DEMO_DMV3D_FOLDER = "dmv3d-demo"
DEMO_DMV3D_LABEL = "recon3d DMV3D demo (trained on procedural shapes only)"
DEMO_DMV3D_ID = "recon3d/dmv3d-demo"  # how the app's dropdown and the GLBs name it (never a server path)

# MVDream (Shi et al., ICLR 2024): the diffusers-layout port of the SD 2.1-base 4-view model (the original single file
# MVDream/MVDream works too, from the CLI or --mvdream).
MVDREAM_CHECKPOINTS = [CheckpointInfo("ashawkey/mvdream-sd2.1-diffusers", "MVDream SD 2.1 4-view",
                                      "CreativeML OpenRAIL-M")]


# Zero123++ v1.2 (six views of a photo) and InstantMesh's NeRF reconstructor, used together for Stochastic samples.
ZERO123PLUS_LICENCE = "CC BY-NC 4.0 (non-commercial use only)"
INSTANTMESH_LICENCE = ("code Apache-2.0; its UNet is a fine-tune of Zero123++ v1.2, so treat it as non-commercial "
                       "(CC BY-NC 4.0)")
INSTANTMESH_LABEL = "Zero123++ v1.2 -> InstantMesh (public weights, CC BY-NC 4.0)"
INSTANTMESH_IMAGE_LABEL = "InstantMesh (Zero123++ views, one seed; CC BY-NC 4.0)"
INSTANTMESH_ID = "zero123plus-v1.2+instantmesh"  # the dropdown's value and how GLBs name the pair


def shipped_checkpoint(name: str) -> Path:
    """The folder of a checkpoint shipped with recon3d: package data of an installed recon3d
    (``recon3d/assets/checkpoints/NAME``, put there by the wheel build), else ``assets/checkpoints/NAME`` of the
    source tree this module runs from (a clone)."""
    installed = Path(str(files("recon3d"))) / "assets" / "checkpoints" / name
    if installed.is_dir():
        return installed
    return Path(__file__).resolve().parents[1] / "assets" / "checkpoints" / name


def demo_dmv3d() -> Path:
    """The shipped DMV3D demo model's folder (config.json, model.safetensors, its model card)."""
    return shipped_checkpoint(DEMO_DMV3D_FOLDER)
