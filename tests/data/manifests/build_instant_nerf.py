"""Writes instant-nerf-{base,large}.json: the tensor names and shapes of InstantMesh's NeRF checkpoints
(``state_dict`` entries under ``lrm_generator.``), in checkpoint order, built on the meta device from the published
configs and the module layout of InstantMesh's public source, *independently of recon3d's model*:

* the encoder is the transformers 4.x ``ViTModel`` (InstantMesh ships a copy of it, ``add_pooling_layer=False``)
  with, in every layer after ``layernorm_after``, ``adaLN_modulation`` = SiLU, Linear(768, 4 * 768); then the
  wrapper's ``camera_embedder`` = Linear(16, 768), SiLU, Linear(768, 768). transformers 5 renamed the ViT's
  tensors, so its names are mapped back to the 4.x names the checkpoint holds (table below);
* the transformer: ``pos_embed`` (1, 3 * low^2, D), per layer norm1, cross_attn (torch MultiheadAttention,
  kdim = vdim = 768, no bias), norm2, self_attn (no bias), norm3, mlp (Linear, GELU, Dropout, Linear, Dropout);
  then norm and deconv ConvTranspose2d(D, C, 2, stride 2);
* the synthesizer's decoder: Linear(3C, 64), ReLU, Linear(64, 64), ReLU, Linear(64, 64), ReLU, Linear(64, 4).

Run from the repository root: ``python tests/data/manifests/build_instant_nerf.py``.
"""

import json
import re
from pathlib import Path

import torch
from torch import nn
from transformers import ViTConfig, ViTModel

HERE = Path(__file__).resolve().parent
# instant-nerf-{base,large}.yaml, model_config.params
CONFIGS = {
    "base": dict(encoder_feat_dim=768, encoder_freeze=False, encoder_model_name="facebook/dino-vitb16",
                 transformer_dim=1024, transformer_layers=12, transformer_heads=16, triplane_low_res=32,
                 triplane_high_res=64, triplane_dim=40, rendering_samples_per_ray=96),
    "large": dict(encoder_feat_dim=768, encoder_freeze=False, encoder_model_name="facebook/dino-vitb16",
                  transformer_dim=1024, transformer_layers=16, transformer_heads=16, triplane_low_res=32,
                  triplane_high_res=64, triplane_dim=80, rendering_samples_per_ray=128),
}
# transformers 5 ViT names -> the 4.x names of InstantMesh's copy
RENAMES = [(r"^layers\.(\d+)\.attention\.o_proj\.", r"encoder.layer.\1.attention.output.dense."),
           (r"^layers\.(\d+)\.mlp\.fc1\.", r"encoder.layer.\1.intermediate.dense."),
           (r"^layers\.(\d+)\.mlp\.fc2\.", r"encoder.layer.\1.output.dense."),
           (r"^layers\.(\d+)\.", r"encoder.layer.\1.")]
QKV = {"q": "query", "k": "key", "v": "value"}
LAYER_ORDER = ["attention.attention.query", "attention.attention.key", "attention.attention.value",
               "attention.output.dense", "intermediate.dense", "output.dense", "layernorm_before", "layernorm_after"]


def vit_4x_name(name: str) -> str:
    match = re.match(r"^layers\.(\d+)\.attention\.([qkv])_proj\.(.*)$", name)
    if match:
        return f"encoder.layer.{match[1]}.attention.attention.{QKV[match[2]]}.{match[3]}"
    for pattern, replacement in RENAMES:
        if re.match(pattern, name):
            return re.sub(pattern, replacement, name)
    return name


def encoder_tensors(dim: int = 768) -> list[tuple[str, list[int]]]:
    with torch.device("meta"):
        vit = ViTModel(ViTConfig(), add_pooling_layer=False)  # ViTConfig() is ViT-B/16 at 224 px = dino-vitb16
    shapes = {vit_4x_name(k): list(v.shape) for k, v in vit.state_dict().items()}
    layers = ViTConfig().num_hidden_layers
    names = [k for k in shapes if k.startswith("embeddings.")]
    for i in range(layers):
        prefix = f"encoder.layer.{i}."
        names += [prefix + part + suffix for part in LAYER_ORDER for suffix in (".weight", ".bias")]
        shapes[prefix + "adaLN_modulation.1.weight"], shapes[prefix + "adaLN_modulation.1.bias"] = [4 * dim, dim], [4 * dim]
        names += [prefix + "adaLN_modulation.1.weight", prefix + "adaLN_modulation.1.bias"]
    names += ["layernorm.weight", "layernorm.bias"]
    out = [("encoder.model." + n, shapes[n]) for n in names]
    camera = nn.Sequential(nn.Linear(16, dim), nn.SiLU(), nn.Linear(dim, dim))
    return out + [("encoder.camera_embedder." + k, list(v.shape)) for k, v in camera.state_dict().items()]


def transformer_tensors(p: dict) -> list[tuple[str, list[int]]]:
    d, low = p["transformer_dim"], p["triplane_low_res"]
    out = [("transformer.pos_embed", [1, 3 * low * low, d])]
    with torch.device("meta"):
        layer = nn.ModuleDict(dict(
            norm1=nn.LayerNorm(d), cross_attn=nn.MultiheadAttention(d, p["transformer_heads"], kdim=p["encoder_feat_dim"],
                                                                    vdim=p["encoder_feat_dim"], bias=False, batch_first=True),
            norm2=nn.LayerNorm(d), self_attn=nn.MultiheadAttention(d, p["transformer_heads"], bias=False, batch_first=True),
            norm3=nn.LayerNorm(d), mlp=nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Dropout(0.0), nn.Linear(4 * d, d),
                                                     nn.Dropout(0.0))))
        tail = nn.ModuleDict(dict(norm=nn.LayerNorm(d, eps=1e-6),
                                  deconv=nn.ConvTranspose2d(d, p["triplane_dim"], kernel_size=2, stride=2)))
    for i in range(p["transformer_layers"]):
        out += [(f"transformer.layers.{i}.{k}", list(v.shape)) for k, v in layer.state_dict().items()]
    return out + [(f"transformer.{k}", list(v.shape)) for k, v in tail.state_dict().items()]


def decoder_tensors(p: dict) -> list[tuple[str, list[int]]]:
    c = p["triplane_dim"]
    with torch.device("meta"):
        net = nn.Sequential(nn.Linear(3 * c, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                            nn.Linear(64, 4))
    return [(f"synthesizer.decoder.net.{k}", list(v.shape)) for k, v in net.state_dict().items()]


def main() -> None:
    for size, params in CONFIGS.items():
        tensors = encoder_tensors(params["encoder_feat_dim"]) + transformer_tensors(params) + decoder_tensors(params)
        count = sum(int(torch.Size(s).numel()) for _, s in tensors)
        manifest = {"checkpoint": f"TencentARC/InstantMesh/instant_nerf_{size}.ckpt",
                    "prefix_in_file": "lrm_generator.", "config": params, "num_tensors": len(tensors),
                    "num_params": count, "tensors": tensors}
        path = HERE / f"instant-nerf-{size}.json"
        path.write_text(json.dumps(manifest, indent=1) + "\n")
        print(f"{path.name}: {len(tensors)} tensors, {count:,} parameters")


if __name__ == "__main__":
    main()
