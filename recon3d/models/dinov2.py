"""DINOv2 ViT with register tokens: the image encoder of OpenLRM v1.1.

Parameter names follow the published checkpoints (``cls_token``, ``pos_embed``, ``register_tokens``,
``patch_embed.proj``, ``blocks.i.{norm1,attn,ls1,norm2,mlp,ls2}``, ``norm``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ViTSpec:
    depth: int
    heads: int
    patch: int = 14
    registers: int = 4
    pos_grid: int = 37  # position embedding grid (518 px / 14)


# Width comes from the checkpoint's encoder_feat_dim. "tiny" exists for tests and random-weight demos only.
VIT_SPECS = {
    "dinov2_vits14_reg": ViTSpec(depth=12, heads=6),
    "dinov2_vitb14_reg": ViTSpec(depth=12, heads=12),
    "dinov2_vitl14_reg": ViTSpec(depth=24, heads=16),
    "tiny_vit14_reg": ViTSpec(depth=2, heads=2),
}


def resize_position_table(table: torch.Tensor, grid_h: int, grid_w: int, scale_factor: tuple[float, float],
                          antialias: bool = False) -> torch.Tensor:
    """A ViT's position table (1, 1 + g*g, D) for an h x w patch grid: the CLS entry kept, the g x g grid resized
    bicubically by ``scale_factor`` (ViTs differ in the factor and in antialiasing; the caller states its own),
    in float32, returned in the table's dtype."""
    side = int(round((table.shape[1] - 1) ** 0.5))
    cls_pos, patch_pos = table[:, :1], table[:, 1:].float()
    grid = patch_pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)  # (1, D, g, g)
    grid = F.interpolate(grid, scale_factor=scale_factor, mode="bicubic", align_corners=False, antialias=antialias)
    if grid.shape[-2:] != (grid_h, grid_w):
        raise ValueError(f"position grid {tuple(grid.shape[-2:])} != patch grid {(grid_h, grid_w)}")
    return torch.cat([cls_pos, grid.flatten(2).transpose(1, 2).to(table.dtype)], 1)


def tokens_with_cls(images: torch.Tensor, patch: int, project: nn.Module, cls_token: torch.Tensor,
                    positions: Callable[[int, int], torch.Tensor]) -> torch.Tensor:
    """A ViT's first tokens: images (N, 3, H, W), H and W multiples of ``patch`` -> (N, 1 + h*w, D), the CLS token
    then the projected patches, plus ``positions(h, w)`` (1, 1 + h*w, D)."""
    n, _, height, width = images.shape
    if height % patch or width % patch:
        raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {patch}")
    x = torch.cat([cls_token.expand(n, -1, -1), project(images)], 1)  # (N, 1 + h*w, D)
    return x + positions(height // patch, width // patch)


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)  # (N, h*w, D)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, dim = x.shape
        q, k, v = self.qkv(x).reshape(n, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # (N, heads, L, head_dim)
        return self.proj(out.transpose(1, 2).reshape(n, length, dim))


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), 1e-5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.attn, self.ls1 = nn.LayerNorm(dim, eps=1e-6), Attention(dim, heads), LayerScale(dim)
        self.norm2, self.mlp, self.ls2 = nn.LayerNorm(dim, eps=1e-6), Mlp(dim, 4 * dim), LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DinoV2(nn.Module):
    """images (N, 3, H, W) in [0, 1], H and W multiples of the patch -> tokens (N, 1 + h*w, D): CLS + patches."""

    def __init__(self, spec: ViTSpec, dim: int):
        super().__init__()
        self.spec = spec
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + spec.pos_grid ** 2, dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, spec.registers, dim))
        self.patch_embed = PatchEmbed(spec.patch, dim)
        self.blocks = nn.ModuleList(Block(dim, spec.heads) for _ in range(spec.depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def position_embedding(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """(1, 1 + h*w, D): the CLS embedding and the patch grid resized by antialiased bicubic scaling."""
        g = self.spec.pos_grid
        if (grid_h, grid_w) == (g, g):
            return self.pos_embed
        return resize_position_table(self.pos_embed, grid_h, grid_w, (grid_h / g, grid_w / g), antialias=True)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        n = images.shape[0]
        x = tokens_with_cls(images, self.spec.patch, self.patch_embed, self.cls_token, self.position_embedding)
        x = torch.cat([x[:, :1], self.register_tokens.expand(n, -1, -1), x[:, 1:]], 1)  # registers after CLS
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return torch.cat([x[:, :1], x[:, 1 + self.spec.registers:]], 1)  # drop the registers
