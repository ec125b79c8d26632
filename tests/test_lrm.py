"""The LRM is checkpoint-exact: the published manifests, and numerics per the OpenLRM facts."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from recon3d.cameras import lrm_source_camera
from recon3d.models.dinov2 import DinoV2, ViTSpec
from recon3d.models.lrm import LRM, PUBLISHED_CONFIGS, TINY_LRM_CONFIG, LRMConfig, ModLN, PlaneDecoder, random_lrm

MANIFESTS = Path(__file__).resolve().parent / "data" / "manifests"


@pytest.mark.parametrize("size, source_size", [("small", 224), ("base", 336), ("large", 448)])
def test_published_configs_match_the_manifests_exactly(size, source_size):
    manifest = json.loads((MANIFESTS / f"openlrm-{size}-1.1.json").read_text())
    cfg = LRMConfig.from_dict(manifest["config"])
    assert cfg.to_dict() == manifest["config"]  # config.json round-trips unchanged
    assert PUBLISHED_CONFIGS[size] == cfg
    with torch.device("meta"):  # no weights allocated
        model = LRM(cfg)
    ours = [(name, list(t.shape)) for name, t in model.state_dict().items()]
    assert ours == [(name, shape) for name, shape in manifest["tensors"]]
    assert len(ours) == manifest["num_tensors"]
    assert sum(t.numel() for t in model.state_dict().values()) == manifest["num_params"]
    assert cfg.sizes[0] == source_size


def test_modln_applies_shift_first_then_scale():
    layer = ModLN(4, 3)
    with torch.no_grad():
        layer.mlp[1].weight.zero_()
        layer.mlp[1].bias.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0, 0.5, 0.5, 0.5, 0.5]))  # shift, then scale
    x = torch.randn(2, 5, 4)
    expected = F.layer_norm(x, (4,), eps=1e-6) * 1.5 + torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert torch.allclose(layer(x, torch.randn(2, 3)), expected, atol=1e-5)


def test_decoder_activations():
    decoder = PlaneDecoder(6)
    with torch.no_grad():
        for layer in decoder.net[:-1]:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.zero_()
                layer.bias.zero_()
        decoder.net[-1].weight.zero_()
        decoder.net[-1].bias.copy_(torch.tensor([2.0, 0.0, 10.0, -10.0]))
    density, rgb = decoder(torch.zeros(1, 6))
    assert torch.allclose(density, F.softplus(torch.tensor([[1.0]])))  # softplus(raw - 1)
    assert torch.allclose(rgb, torch.sigmoid(torch.tensor([[0.0, 10.0, -10.0]])) * 1.002 - 0.001)


def test_encoder_token_layout_registers_after_position_embedding():
    enc = DinoV2(ViTSpec(depth=0, heads=1), dim=8)  # no blocks: the output is the normed input tokens
    with torch.no_grad():
        for p in (enc.cls_token, enc.pos_embed, enc.register_tokens):
            p.normal_()
    images = torch.rand(1, 3, 518, 518)
    tokens = enc(images)
    assert tokens.shape == (1, 1 + 37 * 37, 8)  # CLS + patches, registers dropped
    patches = enc.patch_embed(images)
    expected = torch.cat([enc.cls_token, patches], 1) + enc.pos_embed  # 37x37 grid: embedding unchanged
    assert torch.allclose(tokens, F.layer_norm(expected, (8,), enc.norm.weight, enc.norm.bias, 1e-6), atol=1e-5)


@pytest.mark.parametrize("size, grid", [(224, 16), (336, 24), (448, 32)])
def test_position_embedding_is_resampled_to_the_patch_grid(size, grid):
    enc = DinoV2(ViTSpec(depth=1, heads=2), dim=8)
    with torch.no_grad():
        enc.pos_embed.copy_(torch.linspace(-1, 1, 1370 * 8).reshape(1, 1370, 8))
    pos = enc.position_embedding(grid, grid)
    assert pos.shape == (1, 1 + grid * grid, 8)
    assert torch.equal(pos[:, 0], enc.pos_embed[:, 0])  # CLS keeps its embedding (values: test_dinov2_reference)
    assert not torch.allclose(pos[:, 1:2], enc.pos_embed[:, 1:2])  # the patch grid was resampled
    assert enc(torch.rand(1, 3, size, size)).shape == (1, 1 + grid * grid, 8)


def test_forward_planes_and_query_points_shapes_and_ranges():
    model = random_lrm(TINY_LRM_CONFIG, seed=3)
    images, cams = torch.rand(2, 3, 56, 56), lrm_source_camera().expand(2, 16)
    planes = model.forward_planes(images, cams)
    assert planes.shape == (2, 3, 8, 16, 16)
    density, rgb = model.query_points(planes, torch.rand(2, 100, 3) * 2 - 1)
    assert density.shape == (2, 100, 1) and rgb.shape == (2, 100, 3)
    assert density.min() >= 0 and rgb.min() >= -0.001 and rgb.max() <= 1.001
    # batch elements are independent: the first image alone gives the same planes
    assert torch.allclose(model.forward_planes(images[:1], cams[:1]), planes[:1], atol=1e-5)


def test_camera_conditions_the_planes_and_seeds_reproduce():
    a, b = random_lrm(TINY_LRM_CONFIG, seed=1), random_lrm(TINY_LRM_CONFIG, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    images = torch.rand(1, 3, 56, 56)
    near, far = a.forward_planes(images, lrm_source_camera(1.5)[None]), a.forward_planes(images, lrm_source_camera(2.5)[None])
    assert not torch.allclose(near, far)


def attention_by_hand(x, context, w_q, w_k, w_v, w_o, heads):
    """Multi-head attention written out: softmax(q k^T / sqrt(d)) v, no biases."""
    n, length, dim = x.shape
    q, k, v = x @ w_q.T, context @ w_k.T, context @ w_v.T

    def split(t):
        return t.reshape(n, t.shape[1], heads, dim // heads).transpose(1, 2)

    weights = torch.softmax(split(q) @ split(k).transpose(-1, -2) / (dim // heads) ** 0.5, -1)
    return (weights @ split(v)).transpose(1, 2).reshape(n, length, dim) @ w_o.T


def test_conditioned_block_is_cross_then_self_then_mlp_with_raw_encoder_keys():
    from recon3d.models.lrm import ConditionedBlock

    torch.manual_seed(0)
    block = ConditionedBlock(dim=16, heads=2, cond_dim=8, context_dim=12).eval()  # context width != dim (small/large)
    x, context, cond = torch.randn(2, 5, 16), torch.randn(2, 7, 12), torch.randn(2, 8)
    cross, self_attn = block.cross_attn, block.self_attn
    h = x + attention_by_hand(block.norm1(x, cond), context, cross.q_proj_weight, cross.k_proj_weight,
                              cross.v_proj_weight, cross.out_proj.weight, 2)
    w_q, w_k, w_v = self_attn.in_proj_weight.chunk(3)
    normed = block.norm2(h, cond)
    h = h + attention_by_hand(normed, normed, w_q, w_k, w_v, self_attn.out_proj.weight, 2)
    mlp = block.mlp
    h = h + mlp[3](F.gelu(mlp[0](block.norm3(h, cond))))
    with torch.no_grad():
        assert torch.allclose(block(x, context, cond), h, atol=1e-5)
