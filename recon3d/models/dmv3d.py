"""DMV3D (Xu et al., ICLR 2024): a multi-view diffusion denoiser that is a 3D reconstruction model.

noisy views (N, V, 3, H, W) in [-1, 1] ++ Plucker rays (N, V, 6, H, W) --patchify--> (N*V, h*w, E) tokens
    --ViT blocks, each view alone--> image tokens (N, V*h*w, E)  [++ projected CLIP text tokens (N, L, E)]
time t (N,) --sinusoidal + MLP--> c (N, Dc)
learned triplane tokens (N, 3*l*l, D) --[cross-attn to image tokens, self-attn, MLP; adaLN-Zero(c)] x layers-->
    --upsample x2--> planes (N, 3, C, 2l, 2l) --triplane field, rendered at the input cameras--> x0 (N, V, 3, H, W)

Camera information enters only through the Plucker rays. The triplane frame is LRM's: the conditioning view sits
at (0, -2, 0) looking along +y (see :func:`canonical_views`). The transformer blocks, the plane upsampling and
the plane decoder are the LRM's own (one implementation, two models). Sizes the paper does not confirm are
settings of :class:`DMV3DConfig`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from .. import cameras
from ..hub import CheckpointError, PretrainedModel
from ..noise import seeded
from ..render import RenderSettings, render_views
from .dinov2 import Block
from .lrm import PlaneDecoder, TriplaneTransformer, upsample_planes
from .random_init import randomize_
from .triplane import TriplaneModel

MODEL_TYPE = "dmv3d"


@dataclass
class DMV3DConfig:
    """Everything that shapes a DMV3D model; written to config.json as is."""

    views: int = 4
    image_size: int = 256
    patch_size: int = 8
    encoder_dim: int = 768
    encoder_layers: int = 12
    encoder_heads: int = 12
    transformer_dim: int = 1024
    transformer_layers: int = 24
    transformer_heads: int = 16
    triplane_low_res: int = 32
    triplane_dim: int = 40
    time_embed_dim: int = 1024
    text_embed_dim: int | None = None  # width of CLIP text embeddings to cross-attend to; None: image-only
    samples_per_ray: int = 128
    fov_deg: float = 50.0
    camera_distance: float = 2.0
    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"  # of diffusers' DDIMScheduler; training and sampling share it
    iso_level: float = 3.5  # density of the surface when meshing: the best level on held-out 3D IoU of the demo
    # model (its model card); a model trained otherwise should measure its own (bench/dmv3d.py)
    model_type: str = MODEL_TYPE

    @classmethod
    def from_dict(cls, config: dict, source: str = "config") -> "DMV3DConfig":
        if config.get("model_type") != MODEL_TYPE:
            raise CheckpointError(f"{source}: not a DMV3D checkpoint (config.json model_type is "
                                  f"{config.get('model_type')!r}, expected {MODEL_TYPE!r})")
        unknown = sorted(set(config) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise CheckpointError(f"{source}: config.json has keys this DMV3D does not know: {', '.join(unknown)}")
        cfg = cls(**config)
        cfg.check(source)
        return cfg

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def check(self, source: str = "config") -> None:
        if self.image_size % self.patch_size:
            raise CheckpointError(f"{source}: image_size {self.image_size} is not a multiple of patch_size "
                                  f"{self.patch_size}")
        if self.views < 2:
            raise CheckpointError(f"{source}: DMV3D needs at least 2 views, got {self.views}")

    def noise_scheduler(self):
        """diffusers' DDIMScheduler predicting x0 ("sample"), the same for training and sampling; "trailing"
        spacing starts sampling from pure noise at any step count."""
        from diffusers import DDIMScheduler  # heavy: only when diffusing

        return DDIMScheduler(num_train_timesteps=self.num_train_timesteps, beta_schedule=self.beta_schedule,
                             prediction_type="sample", clip_sample=False, set_alpha_to_one=True,
                             timestep_spacing="trailing")

    def render_settings(self, chunk_rays: int = 4096) -> RenderSettings:
        half = self.samples_per_ray // 2
        return RenderSettings(coarse_samples=half, fine_samples=self.samples_per_ray - half, chunk_rays=chunk_rays,
                              background=(1.0, 1.0, 1.0))


# The paper's scale (its unconfirmed sizes as the issue lists them), a model small enough to train on a CPU
# (the shipped demo), and a tiny one for tests.
PAPER_CONFIG = DMV3DConfig()
DEMO_CONFIG = DMV3DConfig(image_size=32, patch_size=4, encoder_dim=128, encoder_layers=2, encoder_heads=4,
                          transformer_dim=128, transformer_layers=4, transformer_heads=4, triplane_low_res=8,
                          triplane_dim=16, time_embed_dim=128, samples_per_ray=32)
TINY_DMV3D_CONFIG = DMV3DConfig(image_size=16, patch_size=4, encoder_dim=32, encoder_layers=1, encoder_heads=2,
                          transformer_dim=32, transformer_layers=2, transformer_heads=2, triplane_low_res=4,
                          triplane_dim=8, time_embed_dim=32, samples_per_ray=16, text_embed_dim=24)
CONFIGS = {"paper": PAPER_CONFIG, "demo": DEMO_CONFIG, "tiny": TINY_DMV3D_CONFIG}


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features (N, dim) of (possibly fractional) timesteps (N,), in float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], -1)


def canonical_views(views: int, distance: float = 2.0, fov_deg: float = 50.0,
                    device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """DMV3D's inference cameras: ``views`` evenly spaced on the equator, view 0 at (0, -distance, 0) (the
    conditioning view, LRM's source camera pose). c2w (V, 4, 4) and intrinsics (V, 4)."""
    azimuths = torch.arange(views, dtype=torch.float32, device=device) * (360.0 / views)
    c2w = cameras.orbit_camera(azimuths, torch.zeros_like(azimuths), torch.full_like(azimuths, distance))
    return c2w, cameras.intrinsics_from_fov(fov_deg, device=device).expand(views, 4)


def align_to_first_view(c2w: torch.Tensor, distance: float = 2.0) -> torch.Tensor:
    """Rigidly move cameras (..., V, 4, 4) so that view 0 becomes the canonical pose at (0, -distance, 0): the
    triplane frame of a training sample follows its conditioning view, as at inference."""
    canonical = cameras.orbit_camera(0.0, 0.0, distance, device=c2w.device)  # (4, 4)
    transform = canonical @ torch.linalg.inv(c2w[..., :1, :, :])  # (..., 1, 4, 4)
    return transform @ c2w


class DMV3D(TriplaneModel, PretrainedModel, nn.Module):
    """The denoiser. :meth:`forward` gives planes; :meth:`render` turns planes into x0 views. Checkpoints:
    :meth:`from_pretrained` / :meth:`save_pretrained` (config.json + model.safetensors, strict)."""

    config_class = DMV3DConfig

    def __init__(self, cfg: DMV3DConfig):
        super().__init__()
        cfg.check()
        self.config = cfg
        grid = cfg.image_size // cfg.patch_size
        self.patch_embed = nn.Conv2d(3 + 6, cfg.encoder_dim, cfg.patch_size, stride=cfg.patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, cfg.encoder_dim))
        self.encoder = nn.ModuleList(Block(cfg.encoder_dim, cfg.encoder_heads) for _ in range(cfg.encoder_layers))
        self.encoder_norm = nn.LayerNorm(cfg.encoder_dim, eps=1e-6)
        self.text_proj = nn.Linear(cfg.text_embed_dim, cfg.encoder_dim) if cfg.text_embed_dim else None
        self.time_embed = nn.Sequential(nn.Linear(256, cfg.time_embed_dim), nn.SiLU(),
                                        nn.Linear(cfg.time_embed_dim, cfg.time_embed_dim))
        self.plane_tokens = nn.Parameter(torch.zeros(1, 3 * cfg.triplane_low_res ** 2, cfg.transformer_dim))
        self.transformer = TriplaneTransformer(cfg.transformer_dim, cfg.transformer_layers, cfg.transformer_heads,
                                               cfg.time_embed_dim, cfg.encoder_dim, gated=True)
        self.upsampler = nn.ConvTranspose2d(cfg.transformer_dim, cfg.triplane_dim, kernel_size=2, stride=2)
        self.decoder = PlaneDecoder(3 * cfg.triplane_dim)

    # ---- the denoiser -----------------------------------------------------------------------------------
    def encode_views(self, views: torch.Tensor, c2w: torch.Tensor, intrinsics: torch.Tensor) -> torch.Tensor:
        """views (N, V, 3, H, W) in [-1, 1], cameras (N, V, 4, 4) and (N, V, 4) -> tokens (N, V*h*w, E)."""
        n, v, _, height, width = views.shape
        rays = cameras.plucker_images(c2w, intrinsics, height, width).to(views.dtype)  # (N, V, 6, H, W)
        x = self.patch_embed(torch.cat([views, rays], 2).flatten(0, 1))  # (N*V, E, h, w)
        x = x.flatten(2).transpose(1, 2) + self.pos_embed  # (N*V, h*w, E)
        for block in self.encoder:
            x = block(x)
        return self.encoder_norm(x).reshape(n, v * x.shape[1], -1)

    def forward(self, views: torch.Tensor, c2w: torch.Tensor, intrinsics: torch.Tensor, t: torch.Tensor,
                text: torch.Tensor | None = None, render_c2w: torch.Tensor | None = None,
                render_intrinsics: torch.Tensor | None = None, generators=None, render_size: int | None = None):
        """Noisy views (N, V, 3, H, W) in [-1, 1] at time t (N,) with their cameras, and optional text
        embeddings (N, L, text_embed_dim) -> planes (N, 3, C, 2l, 2l).

        With ``render_c2w`` (N, R, 4, 4) and ``render_intrinsics`` (N, R, 4) -> (planes, their renders
        (N, R, 3, H, W) in [-1, 1]): the training step in one call, so data-parallel wrappers see every parameter
        used."""
        planes = self.predict_planes(views, c2w, intrinsics, t, text)
        if render_c2w is None:
            return planes
        return planes, self.render(planes, render_c2w, render_intrinsics, render_size, generators=generators)

    def predict_planes(self, views: torch.Tensor, c2w: torch.Tensor, intrinsics: torch.Tensor, t: torch.Tensor,
                       text: torch.Tensor | None = None) -> torch.Tensor:
        context = self.encode_views(views, c2w, intrinsics)
        if text is not None:
            if self.text_proj is None:
                raise ValueError("this DMV3D has no text conditioning (text_embed_dim is None)")
            context = torch.cat([context, self.text_proj(text.to(context.dtype))], 1)  # (N, V*h*w + L, E)
        cond = self.time_embed(timestep_embedding(t, 256).to(context.dtype))  # (N, Dc)
        tokens = self.transformer(self.plane_tokens.expand(views.shape[0], -1, -1), context, cond)
        return upsample_planes(tokens, self.upsampler)

    # ---- planes as a field, rendered ---------------------------------------------------------------------
    @property
    def plane_decoder(self) -> PlaneDecoder:
        return self.decoder

    @property
    def iso_level(self) -> float:
        return self.config.iso_level

    def render(self, planes: torch.Tensor, c2w: torch.Tensor, intrinsics: torch.Tensor, size: int | None = None,
               settings: RenderSettings | None = None, generators=None) -> torch.Tensor:
        """Planes (N, ...) seen from cameras (N, V, ...) on white: x0 views (N, V, 3, size, size) in [-1, 1]."""
        size = size or self.config.image_size
        out = render_views(self.field(planes), c2w, intrinsics, size, size, settings or self.config.render_settings(),
                           generators)
        return out["rgb"].permute(0, 1, 4, 2, 3) * 2.0 - 1.0


def new_dmv3d(cfg: DMV3DConfig, seed: int = 0) -> DMV3D:
    """A freshly initialised DMV3D (for training, tests and random-weight demos): every draw from one seeded
    generator; adaLN-Zero modulation starts closed, so each block starts as the identity."""
    generator = seeded(seed)
    with torch.device("meta"):
        model = DMV3D(cfg)
    model = randomize_(model, generator, layer_scale=1.0, token_std=0.02)
    with torch.no_grad():
        for layer in model.transformer.layers:
            layer.zero_init_modulation()
    return model
