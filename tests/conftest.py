"""Shared fixtures. Tests never touch the network: the Hub is offline and its cache is a temporary folder."""

import os
import tempfile
from pathlib import Path

# Before anything imports huggingface_hub: offline, and a cache of our own.
_CACHE = Path(tempfile.mkdtemp(prefix="recon3d-hf-cache-"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_CACHE"] = str(_CACHE)
os.environ["U2NET_HOME"] = str(_CACHE / "u2net")  # rembg: no model here, so background removal is unavailable

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY_REPO = "recon3d-test/tiny-lrm"
from recon3d.testing import DEFAULT_COMMIT as TINY_COMMIT  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny random LRM saved in Hub layout (config.json + model.safetensors)."""
    from recon3d.models.lrm import TINY_LRM_CONFIG, random_lrm

    folder = tmp_path_factory.mktemp("tiny-lrm")
    random_lrm(TINY_LRM_CONFIG, seed=0).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_repo_in_cache(tiny_checkpoint) -> str:
    """The tiny checkpoint placed in the Hub cache layout, so a repo id resolves offline."""
    from recon3d.testing import place_in_hub_cache

    place_in_hub_cache(tiny_checkpoint, TINY_REPO, _CACHE, TINY_COMMIT)
    return TINY_REPO


class SphereField:
    """Analytic field: density 3 on a sphere surface, larger inside; red above z=0, blue below."""

    iso_level = 3.0

    def __init__(self, centre=(0.0, 0.0, 0.0), radius=0.5, slope=10.0):
        self.centre, self.radius, self.slope = torch.tensor(centre), radius, slope

    def query(self, points):
        d = (points - self.centre).norm(dim=-1, keepdim=True)
        density = (3.0 + self.slope * (self.radius - d)).clamp(min=0)
        up = (points[:, 2:3] > self.centre[2]).float()
        rgb = torch.cat([up, torch.zeros_like(up), 1 - up], -1)
        return density, rgb


@pytest.fixture
def sphere_field():
    return SphereField


def glb_summary(path):
    """Load a GLB with pygltflib, validate it and return (positions, normals, colours, indices) as arrays."""
    import pygltflib
    import pygltflib.validator

    gltf = pygltflib.GLTF2().load(str(path))
    pygltflib.validator.validate(gltf)
    blob = gltf.binary_blob()
    prim = gltf.meshes[0].primitives[0]

    def read(index, dtype, width):
        accessor = gltf.accessors[index]
        view = gltf.bufferViews[accessor.bufferView]
        data = np.frombuffer(blob, dtype=dtype, count=accessor.count * width, offset=view.byteOffset + (accessor.byteOffset or 0))
        return data.reshape(accessor.count, width) if width > 1 else data

    assert prim.attributes.COLOR_0 is not None, "GLB has no vertex colours"
    positions = read(prim.attributes.POSITION, np.float32, 3)
    normals = read(prim.attributes.NORMAL, np.float32, 3)
    colours = read(prim.attributes.COLOR_0, np.uint16, 4) / 65535.0
    indices = read(prim.indices, np.uint32, 1).reshape(-1, 3)
    assert len(positions) > 0 and len(indices) > 0
    return positions, normals, colours, indices
