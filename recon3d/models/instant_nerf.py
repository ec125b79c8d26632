"""InstantMesh's NeRF reconstructor (Xu et al. 2024; ``instant_nerf_{base,large}.ckpt`` of TencentARC/InstantMesh)
in the exact layout of the published checkpoints, written from the facts of its public source (no code of it
runs here). An LRM of OpenLRM's lineage that reads several posed views:

images (N, V, 3, H, W) in [0, 1] --ImageNet mean/std--> DINO ViT-B/16 whose every layer is modulated by its
view's camera (adaLN: shift/scale before attention and before the MLP) --> tokens (N, V * (1 + h*w), 768)
learned triplane tokens (N, 3*32*32, D) --[cross-attn to the tokens, self-attn, MLP; plain LayerNorms] x layers-->
--> (N, 3, D, 32, 32) --ConvTranspose x2--> planes (N, 3, C, 64, 64)
points (N, P, 3) --triplane lookup--> (N, P, 3C) --MLP 64-64-64--> density softplus(raw - 1), rgb (N, P, 3)

Its world is z up like recon3d's, but the input view looks from +x (azimuth 0 on its +x axis), where recon3d's
front camera sits on -y: :meth:`InstantNeRF.query_points` speaks InstantMesh's frame, :meth:`InstantNeRF.field`
recon3d's (a quarter turn about z), so meshes and renders face the way every other method's do.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..cameras import intrinsics_from_fov, lrm_camera_vector, orbit_camera
from ..field import TriplaneField
from ..hub import CheckpointError, load_strict, read_json, read_state_dict, resolve_file
from ..noise import seeded
from ..render import RenderSettings
from .dinov2 import resize_position_table, tokens_with_cls
from .lrm import Synthesizer, TriplaneTransformer, upsample_planes
from .random_init import randomize_
from .triplane import TriplaneModel

MESH_THRESHOLD = 10.0  # InstantMesh meshes its density at this level (infer_config.mesh_threshold)
STATE_DICT_PREFIX = "lrm_generator."  # the model's tensors inside the training checkpoint
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Zero123++ v1.2's six views, relative to the input view: what InstantMesh's reconstructor was trained to read.
ZERO123PLUS_AZIMUTHS = (30.0, 90.0, 150.0, 210.0, 270.0, 330.0)
ZERO123PLUS_ELEVATIONS = (20.0, -10.0, 20.0, -10.0, 20.0, -10.0)
ZERO123PLUS_FOV = 30.0
ZERO123PLUS_DISTANCE = 4.0
VIEW_SIZE = 320  # pixels per view, as Zero123++ makes them and InstantMesh reads them

# recon3d world -> InstantMesh world: a quarter turn about z taking recon3d's front (-y) to InstantMesh's (+x)
TO_INSTANT_FRAME = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])


@dataclass(frozen=True)
class ViTSizes:
    """The fields of a transformers ``ViTConfig`` that fix the encoder's tensors and numerics."""

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    image_size: int = 224
    patch_size: int = 16
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"

    @classmethod
    def from_config_json(cls, folder: Path) -> "ViTSizes":
        """A local folder holding a transformers ViT ``config.json`` (defaults: transformers' ViTConfig's)."""
        config = read_json(folder / "config.json", str(folder))
        sizes = cls(**{f.name: config[f.name] for f in dataclasses.fields(cls) if f.name in config})
        if sizes.hidden_act != "gelu":
            raise CheckpointError(f"{folder}: encoder activation {sizes.hidden_act!r} is not supported (gelu only)")
        return sizes


# Encoders known by name: DINO ViT-B/16 (what InstantMesh names; its sizes are held here, nothing is downloaded)
# and a tiny one for tests and random-weight demos.
KNOWN_ENCODERS = {
    "facebook/dino-vitb16": ViTSizes(),
    "recon3d/tiny-dino-vit": ViTSizes(hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=48, image_size=32, patch_size=8),
}


@dataclass
class InstantNeRFConfig:
    """The ``model_config.params`` of InstantMesh's ``configs/instant-nerf-*.yaml``; defaults are the large model."""

    encoder_freeze: bool = False
    encoder_model_name: str = "facebook/dino-vitb16"
    encoder_feat_dim: int = 768
    transformer_dim: int = 1024
    transformer_layers: int = 16
    transformer_heads: int = 16
    triplane_low_res: int = 32
    triplane_high_res: int = 64
    triplane_dim: int = 80
    rendering_samples_per_ray: int = 128

    def render_settings(self) -> RenderSettings:
        """How the model renders (its synthesizer's split): half the samples stratified, half by importance."""
        half = self.rendering_samples_per_ray // 2
        return RenderSettings(coarse_samples=half, fine_samples=self.rendering_samples_per_ray - half)

    @classmethod
    def from_dict(cls, params: dict, source: str = "config") -> "InstantNeRFConfig":
        unknown = sorted(set(params) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise CheckpointError(f"{source}: model_config.params has keys InstantNeRF does not know: "
                                  f"{', '.join(unknown)}")
        config = cls(**params)
        sizes = config.encoder_sizes(source)
        if sizes.hidden_size != config.encoder_feat_dim:
            raise CheckpointError(f"{source}: encoder_feat_dim {config.encoder_feat_dim} != the encoder's width "
                                  f"{sizes.hidden_size}")
        if config.triplane_high_res != 2 * config.triplane_low_res:
            raise CheckpointError(f"{source}: triplane_high_res must be twice triplane_low_res (one stride-2 "
                                  f"upsampling)")
        return config

    @classmethod
    def from_yaml(cls, path: str | Path) -> "InstantNeRFConfig":
        """An InstantMesh config file: its ``model_config.params``."""
        import yaml

        try:
            document = yaml.safe_load(Path(path).read_text())
            params = document["model_config"]["params"]
        except (OSError, yaml.YAMLError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{path}: not an InstantMesh config with model_config.params "
                                  f"({type(exc).__name__}: {exc})") from None
        return cls.from_dict(dict(params), str(path))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def encoder_sizes(self, source: str = "config") -> ViTSizes:
        """The ViT's sizes: a known name, or a local folder with a transformers ViT config.json."""
        if self.encoder_model_name in KNOWN_ENCODERS:
            return KNOWN_ENCODERS[self.encoder_model_name]
        folder = Path(self.encoder_model_name).expanduser()
        if folder.is_dir():
            return ViTSizes.from_config_json(folder)
        raise CheckpointError(f"{source}: encoder {self.encoder_model_name!r} is neither one of "
                              f"{', '.join(KNOWN_ENCODERS)} nor a folder with a ViT config.json")


PUBLISHED_CONFIGS = {
    "base": InstantNeRFConfig(transformer_layers=12, triplane_dim=40, rendering_samples_per_ray=96),
    "large": InstantNeRFConfig(),
}
TINY_INSTANT_NERF_CONFIG = InstantNeRFConfig(encoder_model_name="recon3d/tiny-dino-vit", encoder_feat_dim=24,
                                             transformer_dim=32, transformer_layers=2, transformer_heads=2,
                                             triplane_low_res=4, triplane_high_res=8, triplane_dim=8,
                                             rendering_samples_per_ray=32)


# ----------------------------------------------------------------------------- the camera-modulated ViT

class _Linear(nn.Module):
    """A module holding one ``dense`` Linear: the transformers ViT names (``output.dense``, ...)."""

    def __init__(self, inputs: int, outputs: int):
        super().__init__()
        self.dense = nn.Linear(inputs, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(x)


class ViTSelfAttention(nn.Module):
    def __init__(self, sizes: ViTSizes):
        super().__init__()
        dim = sizes.hidden_size
        self.heads = sizes.num_attention_heads
        self.query = nn.Linear(dim, dim, bias=sizes.qkv_bias)
        self.key = nn.Linear(dim, dim, bias=sizes.qkv_bias)
        self.value = nn.Linear(dim, dim, bias=sizes.qkv_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, dim = x.shape
        q, k, v = (proj(x).reshape(n, length, self.heads, dim // self.heads).transpose(1, 2)
                   for proj in (self.query, self.key, self.value))  # (N, heads, L, head_dim) each
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, length, dim)


class ViTAttention(nn.Module):
    def __init__(self, sizes: ViTSizes):
        super().__init__()
        self.attention = ViTSelfAttention(sizes)
        self.output = _Linear(sizes.hidden_size, sizes.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.attention(x))


class ModulatedViTLayer(nn.Module):
    """A pre-norm ViT layer whose two LayerNorm outputs are modulated by the camera:
    x += Attn(LN(x) * (1 + scale_a) + shift_a); x += MLP(LN(x) * (1 + scale_m) + shift_m), with
    (shift_a, scale_a, shift_m, scale_m) = Linear(SiLU(camera embedding)) in that order."""

    def __init__(self, sizes: ViTSizes):
        super().__init__()
        dim = sizes.hidden_size
        self.attention = ViTAttention(sizes)
        self.intermediate = _Linear(dim, sizes.intermediate_size)
        self.output = _Linear(sizes.intermediate_size, dim)
        self.layernorm_before = nn.LayerNorm(dim, eps=sizes.layer_norm_eps)
        self.layernorm_after = nn.LayerNorm(dim, eps=sizes.layer_norm_eps)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 4 * dim))

    def forward(self, x: torch.Tensor, camera: torch.Tensor) -> torch.Tensor:
        shift_a, scale_a, shift_m, scale_m = self.adaLN_modulation(camera).unsqueeze(1).chunk(4, dim=-1)
        x = x + self.attention(self.layernorm_before(x) * (1 + scale_a) + shift_a)
        h = self.layernorm_after(x) * (1 + scale_m) + shift_m
        return x + self.output(F.gelu(self.intermediate(h)))


class ViTEmbeddings(nn.Module):
    """Patches plus the CLS token, with position embeddings resized to the image's patch grid."""

    def __init__(self, sizes: ViTSizes):
        super().__init__()
        dim, grid = sizes.hidden_size, sizes.image_size // sizes.patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.position_embeddings = nn.Parameter(torch.zeros(1, 1 + grid * grid, dim))
        self.patch_embeddings = _PatchProjection(sizes)

    def position_embedding(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """(1, 1 + h*w, D). As DINO (and InstantMesh's copy of it) resizes them: bicubic by the *scale factor*
        ``(n + 0.1) / sqrt(N)`` (not to a target size), which maps output to input coordinates slightly
        differently from a resize to (h, w). Square grids of the trained size are kept as they are."""
        count = self.position_embeddings.shape[1] - 1
        if grid_h * grid_w == count and grid_h == grid_w:
            return self.position_embeddings
        side = math.sqrt(count)
        return resize_position_table(self.position_embeddings, grid_h, grid_w,
                                     ((grid_h + 0.1) / side, (grid_w + 0.1) / side))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return tokens_with_cls(images, self.patch_embeddings.patch, self.patch_embeddings, self.cls_token,
                               self.position_embedding)


class _PatchProjection(nn.Module):
    def __init__(self, sizes: ViTSizes):
        super().__init__()
        self.patch = sizes.patch_size
        self.projection = nn.Conv2d(3, sizes.hidden_size, sizes.patch_size, stride=sizes.patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.projection(images).flatten(2).transpose(1, 2)


class _Layers(nn.Module):
    def __init__(self, sizes: ViTSizes):
        super().__init__()
        self.layer = nn.ModuleList(ModulatedViTLayer(sizes) for _ in range(sizes.num_hidden_layers))


class ModulatedViT(nn.Module):
    """normalised images (M, 3, H, W), camera embeddings (M, D) -> tokens (M, 1 + h*w, D), the CLS token kept."""

    def __init__(self, sizes: ViTSizes):
        super().__init__()
        self.embeddings = ViTEmbeddings(sizes)
        self.encoder = _Layers(sizes)
        self.layernorm = nn.LayerNorm(sizes.hidden_size, eps=sizes.layer_norm_eps)

    def forward(self, images: torch.Tensor, cameras: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(images)
        for layer in self.encoder.layer:
            x = layer(x, cameras)
        return self.layernorm(x)


class CameraModulatedEncoder(nn.Module):
    """images (N, V, 3, H, W) in [0, 1], cameras (N, V, 16) -> tokens (N, V * (1 + h*w), D), views side by side."""

    def __init__(self, sizes: ViTSizes):
        super().__init__()
        dim = sizes.hidden_size
        self.model = ModulatedViT(sizes)
        self.camera_embedder = nn.Sequential(nn.Linear(16, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, images: torch.Tensor, cameras: torch.Tensor) -> torch.Tensor:
        n, views = images.shape[:2]
        dtype = self.camera_embedder[0].weight.dtype
        mean, std = (torch.tensor(s, device=images.device).view(1, 3, 1, 1) for s in (IMAGENET_MEAN, IMAGENET_STD))
        pixels = ((images.flatten(0, 1).float() - mean) / std).to(dtype)  # (N*V, 3, H, W), ImageNet statistics only
        embedded = self.camera_embedder(cameras.flatten(0, 1).to(dtype))  # (N*V, D)
        tokens = self.model(pixels, embedded)  # (N*V, L, D)
        return tokens.reshape(n, views * tokens.shape[1], tokens.shape[2])


class PlaneGenerator(TriplaneTransformer):
    """Learned triplane tokens through unconditioned blocks, then one transposed convolution per plane:
    context tokens (N, L, E) -> planes (N, 3, C, 2 low, 2 low)."""

    def __init__(self, cfg: InstantNeRFConfig):
        super().__init__(cfg.transformer_dim, cfg.transformer_layers, cfg.transformer_heads, None,
                         cfg.encoder_feat_dim)
        low = cfg.triplane_low_res
        self.pos_embed = nn.Parameter(torch.zeros(1, 3 * low * low, cfg.transformer_dim))
        self.deconv = nn.ConvTranspose2d(cfg.transformer_dim, cfg.triplane_dim, kernel_size=2, stride=2)

    def generate(self, context: torch.Tensor) -> torch.Tensor:
        tokens = super().forward(self.pos_embed.expand(context.shape[0], -1, -1), context, None)  # (N, 3 l^2, D)
        return upsample_planes(tokens, self.deconv)


# ----------------------------------------------------------------------------- the model

class InstantNeRF(TriplaneModel, nn.Module):
    """Posed views to triplanes. Load a published checkpoint with :meth:`from_pretrained` (strict, weights only).

    ``forward_planes`` and ``query_points`` have exactly InstantMesh's meaning (its frame, density after its
    activation); ``field(planes)`` is the same object in recon3d's frame, meshed at InstantMesh's level 10."""

    iso_level = MESH_THRESHOLD

    def __init__(self, cfg: InstantNeRFConfig):
        super().__init__()
        self.config = cfg
        self.encoder = CameraModulatedEncoder(cfg.encoder_sizes())
        self.transformer = PlaneGenerator(cfg)
        self.synthesizer = Synthesizer(cfg.triplane_dim)

    @property
    def plane_decoder(self) -> nn.Module:
        return self.synthesizer.decoder

    def forward_planes(self, images: torch.Tensor, cameras: torch.Tensor) -> torch.Tensor:
        """images (N, V, 3, H, W) in [0, 1] (H, W multiples of the patch), cameras (N, V, 16) -> planes
        (N, 3, C, 2 low, 2 low)."""
        if images.dim() != 5 or cameras.shape != (*images.shape[:2], 16):
            raise ValueError(f"images (N, V, 3, H, W) and cameras (N, V, 16) expected, got {tuple(images.shape)} "
                             f"and {tuple(cameras.shape)}")
        return self.transformer.generate(self.encoder(images, cameras))

    def field(self, planes: torch.Tensor) -> TriplaneField:
        """Planes as a recon3d field: points in recon3d's frame (front at -y) are turned into InstantMesh's."""
        def decode(planes: torch.Tensor, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.query_points(planes, to_instant_frame(points))

        return TriplaneField(planes, decode, iso_level=self.iso_level)

    @classmethod
    def from_pretrained(cls, checkpoint: str | Path, config: str | Path | dict | InstantNeRFConfig | None = None,
                        revision: str | None = None, offline: bool | None = None,
                        device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "InstantNeRF":
        """Strictly load ``checkpoint``: a local ``.ckpt``/``.safetensors`` file or ``owner/repo/file`` on the
        Hub (e.g. ``TencentARC/InstantMesh/instant_nerf_large.ckpt``). ``config``: an InstantMesh yaml, its params
        as a dict, a config, or None for the published base/large values chosen by the file name."""
        path, source = resolve_file(checkpoint, revision, offline, expected="an InstantMesh checkpoint")
        cfg = _config_for(config, Path(source).name, source)
        with torch.device("meta"):
            model = cls(cfg)
        tensors, skipped = read_instant_nerf_state_dict(path, source)
        load_strict(model, tensors, source)
        model.skipped_entries = skipped  # training entries of the file that are not the model's (e.g. lpips.*)
        return model.to(device=device or "cpu", dtype=dtype or torch.float32).eval()


def _config_for(config: str | Path | dict | InstantNeRFConfig | None, filename: str, source: str) -> InstantNeRFConfig:
    if isinstance(config, InstantNeRFConfig):
        return config
    if isinstance(config, dict):
        return InstantNeRFConfig.from_dict(config, source)
    if config is not None:
        return InstantNeRFConfig.from_yaml(config)
    sizes = [size for size in PUBLISHED_CONFIGS if size in filename.lower()]
    if len(sizes) != 1:
        raise CheckpointError(f"{source}: cannot tell base from large by the file name; pass the InstantMesh "
                              f"config yaml (configs/instant-nerf-base.yaml or -large.yaml)")
    return PUBLISHED_CONFIGS[sizes[0]]


CONVERT_COMMAND = ("python -c \"import torch, safetensors.torch as st; d = torch.load({path!r}, weights_only=False); "
                   "d = d.get('state_dict', d); st.save_file({{k: v.contiguous() for k, v in d.items() "
                   "if torch.is_tensor(v)}}, {out!r})\"")


def read_instant_nerf_state_dict(path: Path, source: str) -> tuple[dict[str, torch.Tensor], int]:
    """The model's tensors of an InstantMesh checkpoint (``state_dict`` entries under ``lrm_generator.``, prefix
    stripped) and how many other training entries (e.g. ``lpips.*``) were skipped. Pickles
    are read with ``weights_only=True`` only: a file that needs code to unpickle is refused with the one command
    that converts it (run it only on a file you trust)."""
    try:
        raw = read_state_dict(path)
    except CheckpointError as exc:
        if path.suffix == ".safetensors":
            raise
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        why = f"it pickles {found[1]}" if found else str(exc).splitlines()[0]
        raise CheckpointError(f"{source}: cannot be read as plain tensors with weights_only=True ({why}); if you "
                              f"trust the file, convert it once with: "
                              f"{CONVERT_COMMAND.format(path=str(path), out=str(path.with_suffix('.safetensors')))}"
                              ) from None
    tensors = raw.get("state_dict", raw) if isinstance(raw, dict) else None
    if not isinstance(tensors, dict):
        raise CheckpointError(f"{source}: expected a dict of tensors (or {{'state_dict': ...}}), found "
                              f"{type(raw).__name__}")
    model = {k[len(STATE_DICT_PREFIX):]: v for k, v in tensors.items() if k.startswith(STATE_DICT_PREFIX)}
    if not model:
        raise CheckpointError(f"{source}: no tensor starts with {STATE_DICT_PREFIX!r}; is it an InstantMesh "
                              f"NeRF checkpoint?")
    return model, len(tensors) - len(model)


def to_instant_frame(points: torch.Tensor) -> torch.Tensor:
    """recon3d world points (..., 3) -> InstantMesh's world (a quarter turn about z)."""
    return points @ TO_INSTANT_FRAME.to(points.device, points.dtype).T


def zero123plus_poses(device: torch.device | str | None = None) -> torch.Tensor:
    """Camera-to-world (6, 4, 4) of Zero123++'s views in recon3d's frame (azimuths relative to the input view)."""
    return orbit_camera(torch.tensor(ZERO123PLUS_AZIMUTHS, device=device),
                        torch.tensor(ZERO123PLUS_ELEVATIONS, device=device), ZERO123PLUS_DISTANCE, device)


def instant_nerf_cameras(poses: torch.Tensor, fov_deg: float = ZERO123PLUS_FOV) -> torch.Tensor:
    """recon3d camera-to-world poses (..., 4, 4) -> InstantMesh's 16-number cameras (..., 16): its frame's
    ``c2w[:3, :4]`` row-major, then fx, fy, cx, cy normalised by the image size."""
    rotation = torch.eye(4, device=poses.device)
    rotation[:3, :3] = TO_INSTANT_FRAME.to(poses.device)
    return lrm_camera_vector(rotation @ poses.float(), intrinsics_from_fov(fov_deg, poses.device))


def random_instant_nerf(cfg: InstantNeRFConfig, seed: int = 0) -> InstantNeRF:
    """A randomly initialised InstantNeRF (tests, benchmarks, the --random-weights demo), every draw from one
    seeded generator."""
    with torch.device("meta"):
        model = InstantNeRF(cfg)
    return randomize_(model, seeded(seed)).eval()
