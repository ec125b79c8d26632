"""Multi-view datasets on disk: one folder per object with its views and their cameras.

Format (``recon3d-multiview-v1``)::

    DATASET/
      obj-00000/
        cameras.json    {"format": "recon3d-multiview-v1",
                         "views": [{"image": "000.png", "c2w": [[4 x 4]], "intrinsics": [fx, fy, cx, cy]}, ...]}
        000.png ...     RGBA (alpha = object coverage) or RGB on white, square, all one size

Cameras follow :mod:`recon3d.cameras`: world z up, camera-to-world with OpenGL axes, intrinsics normalised by
the image size. Objects should lie in the box [-1, 1]^3 with cameras about 2 units from the origin.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

FORMAT = "recon3d-multiview-v1"


class DatasetError(ValueError):
    """A dataset folder that does not follow the format; the message names the file and what is wrong."""


def write_object(folder: str | Path, rgba: torch.Tensor, c2w: torch.Tensor, intrinsics: torch.Tensor) -> Path:
    """Write one object's views: rgba (V, H, W, 4) in [0, 1], c2w (V, 4, 4), intrinsics (V, 4)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    views = []
    for index, (image, pose, k) in enumerate(zip(rgba, c2w, intrinsics)):
        name = f"{index:03d}.png"
        Image.fromarray((image.numpy() * 255 + 0.5).astype(np.uint8), "RGBA").save(folder / name)
        views.append({"image": name, "c2w": pose.tolist(), "intrinsics": k.tolist()})
    (folder / "cameras.json").write_text(json.dumps({"format": FORMAT, "views": views}))
    return folder


def _read_image(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """rgb (3, H, W) in [0, 1] composited on white, and alpha (1, H, W) (ones for an RGB file)."""
    try:
        rgba = np.asarray(Image.open(path).convert("RGBA"), dtype=np.float32) / 255.0
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path}: cannot read the image ({exc})") from None
    rgb = rgba[..., :3] * rgba[..., 3:] + (1.0 - rgba[..., 3:])
    return torch.from_numpy(rgb).permute(2, 0, 1).contiguous(), torch.from_numpy(rgba[..., 3].copy())[None]


class MultiViewDataset(torch.utils.data.Dataset):
    """Objects of a dataset folder: item k is {"images": (V, 3, H, W) on white, "alpha": (V, 1, H, W) coverage,
    "c2w": (V, 4, 4), "intrinsics": (V, 4), "name": str}. The folder is checked when opened, so a bad one fails at once."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(f"{self.root}: no such dataset folder")
        self.objects = sorted(p.parent for p in self.root.glob("*/cameras.json"))
        if not self.objects:
            raise DatasetError(f"{self.root}: no object folders with a cameras.json (format {FORMAT})")
        self._cameras = [self._read_cameras(folder) for folder in self.objects]
        counts = {len(views) for views in self._cameras}
        if len(counts) != 1:
            raise DatasetError(f"{self.root}: objects have different numbers of views ({sorted(counts)})")
        self.views_per_object = counts.pop()

    @staticmethod
    def _read_cameras(folder: Path) -> list[dict]:
        path = folder / "cameras.json"
        try:
            meta = json.loads(path.read_text())
            views = meta["views"]
            for view in views:
                if np.shape(view["c2w"]) != (4, 4) or len(view["intrinsics"]) != 4:
                    raise ValueError("c2w must be 4x4 and intrinsics 4 numbers")
                if not (folder / view["image"]).is_file():
                    raise ValueError(f"missing image {view['image']}")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DatasetError(f"{path}: not a {FORMAT} camera file ({exc})") from None
        return views

    def __len__(self) -> int:
        return len(self.objects)

    def __getitem__(self, index: int) -> dict:
        folder, views = self.objects[index], self._cameras[index]
        images, alpha = zip(*(_read_image(folder / view["image"]) for view in views))
        return {"images": torch.stack(images), "alpha": torch.stack(alpha), "name": folder.name,  # (V, 3|1, H, W)
                "c2w": torch.tensor([view["c2w"] for view in views], dtype=torch.float32),
                "intrinsics": torch.tensor([view["intrinsics"] for view in views], dtype=torch.float32)}
