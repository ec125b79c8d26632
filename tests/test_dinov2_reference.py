"""Our DINOv2-with-registers encoder against an independent implementation (transformers), same weights."""

import pytest
import torch

from recon3d.models.dinov2 import DinoV2, ViTSpec

transformers = pytest.importorskip("transformers")


def transformers_to_ours(state: dict, depth: int) -> dict:
    """Rename transformers' Dinov2WithRegistersModel tensors to the published (timm-style) names."""
    ours = {
        "cls_token": state["embeddings.cls_token"],
        "pos_embed": state["embeddings.position_embeddings"],
        "register_tokens": state["embeddings.register_tokens"],
        "patch_embed.proj.weight": state["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": state["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": state["layernorm.weight"],
        "norm.bias": state["layernorm.bias"],
    }
    for i in range(depth):
        theirs, mine = f"encoder.layer.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            ours[mine + f"attn.qkv.{kind}"] = torch.cat([state[theirs + f"attention.{p}_proj.{kind}"] for p in "qkv"])
            ours[mine + f"attn.proj.{kind}"] = state[theirs + f"attention.o_proj.{kind}"]
            for name in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                ours[mine + f"{name}.{kind}"] = state[theirs + f"{name}.{kind}"]
        ours[mine + "ls1.gamma"] = state[theirs + "layer_scale1.lambda1"]
        ours[mine + "ls2.gamma"] = state[theirs + "layer_scale2.lambda1"]
    return ours


@pytest.mark.parametrize("size", [224, 336, 448, 518])
def test_encoder_matches_transformers_dinov2_with_registers(size):
    config = transformers.Dinov2WithRegistersConfig(
        image_size=518, patch_size=14, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_register_tokens=4, layer_norm_eps=1e-6, layerscale_value=0.5, hidden_act="gelu")
    torch.manual_seed(0)  # transformers initialises from the global generator
    reference = transformers.Dinov2WithRegistersModel(config).eval()
    with torch.no_grad():  # make every tensor matter: non-trivial embeddings, scales and norms
        for param in reference.parameters():
            param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(param.numel())) * 0.1)
    ours = DinoV2(ViTSpec(depth=2, heads=4), dim=48).eval()
    ours.load_state_dict(transformers_to_ours(reference.state_dict(), 2), strict=True)
    images = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(size))
    with torch.no_grad():
        expected = reference(pixel_values=images).last_hidden_state  # CLS, 4 registers, patches
        got = ours(images)
    expected = torch.cat([expected[:, :1], expected[:, 5:]], 1)  # LRM drops the registers
    assert got.shape == expected.shape == (2, 1 + (size // 14) ** 2, 48)
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
