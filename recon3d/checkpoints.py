"""The published checkpoints recon3d knows, with their licences."""

from __future__ import annotations

from dataclasses import dataclass
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
DEMO_DMV3D = Path(__file__).resolve().parents[1] / "assets" / "checkpoints" / "dmv3d-demo"
DEMO_DMV3D_LABEL = "recon3d DMV3D demo (trained on procedural shapes only)"
DEMO_DMV3D_ID = "recon3d/dmv3d-demo"  # how the app's dropdown and the GLBs name it (never a server path)

# MVDream (Shi et al., ICLR 2024): the diffusers-layout port of the SD 2.1-base 4-view model (the original single file
# MVDream/MVDream works too, from the CLI or --mvdream).
MVDREAM_CHECKPOINTS = [CheckpointInfo("ashawkey/mvdream-sd2.1-diffusers", "MVDream SD 2.1 4-view",
                                      "CreativeML OpenRAIL-M")]
