"""The published checkpoints recon3d knows, with their licences."""

from __future__ import annotations

from dataclasses import dataclass


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
