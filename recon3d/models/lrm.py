"""LRM (Hong et al., ICLR 2024) in the exact layout of the public OpenLRM v1.1 checkpoints.

image (N, 3, S, S) in [0, 1] --DINOv2--> tokens (N, L, E)
camera (N, 16) --MLP--> c (N, 1024)
learned triplane tokens (N, 3*32*32, D) --[cross-attn to tokens, self-attn, MLP; each after ModLN(c)] x layers-->
--> (N, 3, D, 32, 32) --ConvTranspose x2--> planes (N, 3, C, 64, 64)
points (N, P, 3) --triplane lookup--> (N, P, 3C) --MLP--> density (N, P, 1), rgb (N, P, 3)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..hub import CheckpointError, PretrainedModel
from ..noise import seeded
from .dinov2 import VIT_SPECS, DinoV2
from .random_init import randomize_
from .triplane import TriplaneModel

DENSITY_LEVEL = 3.0  # OpenLRM meshes its density at this level; a property of the model, not of the mesher
# (transformer_dim, transformer_layers, triplane_dim) of the published sizes -> (source size, render size)
PUBLISHED_SIZES = {(512, 12, 32): (224, 192), (768, 12, 48): (336, 288), (1024, 16, 80): (448, 384)}


@dataclass
class LRMConfig:
    """The keys of OpenLRM's config.json; ``source_size``/``render_size`` are ours, for unpublished sizes."""

    camera_embed_dim: int = 1024
    rendering_samples_per_ray: int = 96
    transformer_dim: int = 512
    transformer_layers: int = 12
    transformer_heads: int = 8
    triplane_low_res: int = 32
    triplane_high_res: int = 64
    triplane_dim: int = 32
    encoder_type: str = "dinov2"
    encoder_model_name: str = "dinov2_vits14_reg"
    encoder_feat_dim: int = 384
    encoder_freeze: bool = False
    source_size: int | None = None
    render_size: int | None = None

    @classmethod
    def from_dict(cls, config: dict, source: str = "config") -> "LRMConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise CheckpointError(f"{source}: config.json has keys this LRM does not know: {', '.join(unknown)}")
        cfg = cls(**config)
        if cfg.encoder_type != "dinov2" or cfg.encoder_model_name not in VIT_SPECS:
            raise CheckpointError(f"{source}: unsupported encoder {cfg.encoder_type}/{cfg.encoder_model_name}; "
                                  f"known: {', '.join(VIT_SPECS)}")
        return cfg

    def to_dict(self) -> dict:
        """The config.json content; a published config round-trips unchanged."""
        return {k: v for k, v in dataclasses.asdict(self).items() if not (k.endswith("_size") and v is None)}

    @property
    def sizes(self) -> tuple[int, int]:
        """(source image size, render size)."""
        default = PUBLISHED_SIZES.get((self.transformer_dim, self.transformer_layers, self.triplane_dim), (224, 192))
        return self.source_size or default[0], self.render_size or default[1]


class CameraEmbedder(nn.Module):
    def __init__(self, raw_dim: int, embed_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(raw_dim, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim))

    def forward(self, cameras: torch.Tensor) -> torch.Tensor:
        return self.mlp(cameras)


class ModLN(nn.Module):
    """LayerNorm modulated by the camera: norm(x) * (1 + scale) + shift, (shift, scale) = Linear(SiLU(c))."""

    def __init__(self, dim: int, cond_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * dim))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift, scale = self.mlp(cond).unsqueeze(1).chunk(2, dim=-1)  # shift first
        return self.norm(x) * (1 + scale) + shift


class ConditionedBlock(nn.Module):
    """x += CrossAttn(ModLN1(x), tokens); x += SelfAttn(ModLN2(x)); x += MLP(ModLN3(x)).

    LRM conditions on the camera; DMV3D (``gated=True``) on the diffusion time, adaLN-Zero style: each branch is
    also scaled by a gate computed from the condition, and :meth:`zero_init_modulation` makes the block start as
    the identity. Without gates the parameters are exactly OpenLRM's. With ``cond_dim=None`` the norms are plain
    LayerNorms (eps 1e-5) and the block takes no condition: InstantMesh's layout, whose camera enters the encoder.
    """

    def __init__(self, dim: int, heads: int, cond_dim: int | None, context_dim: int, gated: bool = False):
        super().__init__()
        def norm() -> nn.Module:
            return nn.LayerNorm(dim) if cond_dim is None else ModLN(dim, cond_dim)

        self.norm1 = norm()
        self.cross_attn = nn.MultiheadAttention(dim, heads, bias=False, batch_first=True,
                                                kdim=context_dim, vdim=context_dim)
        self.norm2 = norm()
        self.self_attn = nn.MultiheadAttention(dim, heads, bias=False, batch_first=True)
        self.norm3 = norm()
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(0.0), nn.Linear(4 * dim, dim))
        self.gates = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 3 * dim)) if gated else None

    def zero_init_modulation(self) -> None:
        """adaLN-Zero: plain LayerNorms and closed gates at initialisation."""
        for layer in (self.norm1.mlp[1], self.norm2.mlp[1], self.norm3.mlp[1], *(self.gates or [])[1:]):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        if self.gates is None:
            g1 = g2 = g3 = 1.0
        else:
            g1, g2, g3 = self.gates(cond).unsqueeze(1).chunk(3, dim=-1)  # (N, 1, D) each
        h = self._norm(self.norm1, x, cond)
        x = x + g1 * self.cross_attn(h, context, context, need_weights=False)[0]
        h = self._norm(self.norm2, x, cond)
        x = x + g2 * self.self_attn(h, h, h, need_weights=False)[0]
        return x + g3 * self.mlp(self._norm(self.norm3, x, cond))

    @staticmethod
    def _norm(norm: nn.Module, x: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        return norm(x) if isinstance(norm, nn.LayerNorm) else norm(x, cond)


class TriplaneTransformer(nn.Module):
    """Triplane tokens attend to context tokens and to each other, modulated by a condition (or not: ``cond_dim``
    None), then a LayerNorm (eps 1e-6)."""

    def __init__(self, dim: int, layers: int, heads: int, cond_dim: int | None, context_dim: int,
                 gated: bool = False):
        super().__init__()
        self.layers = nn.ModuleList(ConditionedBlock(dim, heads, cond_dim, context_dim, gated) for _ in range(layers))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor, context: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, context, cond)
        return self.norm(x)


def upsample_planes(tokens: torch.Tensor, upsampler: nn.Module) -> torch.Tensor:
    """Triplane tokens (N, 3*l*l, D), plane-major then row-major, -> planes (N, 3, C, 2l, 2l) through one
    upsampler (a stride-2 transposed convolution) shared by the three planes."""
    n, count, dim = tokens.shape
    low = int(round((count // 3) ** 0.5))
    x = tokens.reshape(n, 3, low, low, dim).permute(0, 1, 4, 2, 3).reshape(n * 3, dim, low, low)
    planes = upsampler(x)  # (N*3, C, 2l, 2l)
    return planes.reshape(n, 3, *planes.shape[1:])


class Encoder(nn.Module):
    def __init__(self, cfg: LRMConfig):
        super().__init__()
        self.model = DinoV2(VIT_SPECS[cfg.encoder_model_name], cfg.encoder_feat_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)


class PlaneDecoder(nn.Module):
    """features (..., 3C) -> density (..., 1) = softplus(raw - 1), rgb (..., 3) = sigmoid * 1.002 - 0.001.

    The hidden layers run in the model's dtype; the output layer and the activations run in float32 and return
    float32: near the surface (density 3, raw about 4) a bfloat16 raw value has steps of 1/64, which would move
    the surface by a large part of a voxel."""

    def __init__(self, in_dim: int, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 4))

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        *hidden, output = self.net
        h = nn.Sequential(*hidden)(features.to(output.weight.dtype))
        raw = F.linear(h.float(), output.weight.float(), output.bias.float())  # (..., 4) float32
        return F.softplus(raw[..., :1] - 1.0), torch.sigmoid(raw[..., 1:]) * 1.002 - 0.001


class Synthesizer(nn.Module):
    def __init__(self, triplane_dim: int):
        super().__init__()
        self.decoder = PlaneDecoder(3 * triplane_dim)


class LRM(TriplaneModel, PretrainedModel, nn.Module):
    """The whole image-to-triplane model. Load an OpenLRM v1.1 checkpoint with :meth:`from_pretrained` (strict).
    ``field(planes)`` meshes at OpenLRM's density level."""

    config_class = LRMConfig
    iso_level = DENSITY_LEVEL

    def __init__(self, cfg: LRMConfig):
        super().__init__()
        self.config = cfg
        low = cfg.triplane_low_res
        self.encoder = Encoder(cfg)
        self.camera_embedder = CameraEmbedder(16, cfg.camera_embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, 3 * low * low, cfg.transformer_dim))  # learned triplane tokens
        self.transformer = TriplaneTransformer(cfg.transformer_dim, cfg.transformer_layers, cfg.transformer_heads,
                                               cfg.camera_embed_dim, cfg.encoder_feat_dim)
        self.upsampler = nn.ConvTranspose2d(cfg.transformer_dim, cfg.triplane_dim, kernel_size=2, stride=2)
        self.synthesizer = Synthesizer(cfg.triplane_dim)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) in [0, 1], not normalised -> image tokens (N, 1 + (S/14)^2, E)."""
        return self.encoder(images)

    def planes_from_tokens(self, tokens: torch.Tensor, cameras: torch.Tensor) -> torch.Tensor:
        """Image tokens (N, L, E) and source cameras (N, 16) -> planes (N, 3, C, 2*low, 2*low)."""
        n = tokens.shape[0]
        cond = self.camera_embedder(cameras.to(tokens.dtype))  # (N, 1024)
        x = self.transformer(self.pos_embed.expand(n, -1, -1), tokens, cond)  # (N, 3*low*low, D)
        return upsample_planes(x, self.upsampler)

    def forward_planes(self, images: torch.Tensor, cameras: torch.Tensor) -> torch.Tensor:
        """images (N, 3, S, S) in [0, 1], cameras (N, 16) source-camera format -> planes (N, 3, C, 64, 64)."""
        return self.planes_from_tokens(self.encode_image(images), cameras)

    @property
    def plane_decoder(self) -> PlaneDecoder:
        return self.synthesizer.decoder


def random_lrm(cfg: LRMConfig, seed: int = 0) -> LRM:
    """A randomly initialised LRM (tests, benchmarks, the --random-weights demo); every draw from one seeded
    generator, so a seed always gives the same model."""
    generator = seeded(seed)
    with torch.device("meta"):
        model = LRM(cfg)
    return randomize_(model, generator).eval()


# The config.json of each published size (tests check them against the tensor manifests).
PUBLISHED_CONFIGS = {
    "small": LRMConfig(),
    "base": LRMConfig(transformer_dim=768, transformer_heads=12, triplane_dim=48,
                      encoder_model_name="dinov2_vitb14_reg", encoder_feat_dim=768),
    "large": LRMConfig(rendering_samples_per_ray=128, transformer_dim=1024, transformer_layers=16, transformer_heads=16,
                       triplane_dim=80, encoder_model_name="dinov2_vitb14_reg", encoder_feat_dim=768),
}
TINY_LRM_CONFIG = LRMConfig(camera_embed_dim=32, transformer_dim=32, transformer_layers=2, transformer_heads=2,
                        triplane_low_res=8, triplane_high_res=16, triplane_dim=8, encoder_model_name="tiny_vit14_reg",
                        encoder_feat_dim=24, rendering_samples_per_ray=32, source_size=56, render_size=48)
