"""InstantMesh's NeRF reconstructor is checkpoint-exact (manifests built independently of our model), loads
weights-only and strictly, and computes what the public source computes (checked against transformers' ViT,
hand-written layers, and the reference's own formulas for planes, decoder and cameras)."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from recon3d.hub import CheckpointError
from recon3d.models.instant_nerf import (PUBLISHED_CONFIGS, TINY_INSTANT_NERF_CONFIG, InstantNeRF, InstantNeRFConfig,
                                         instant_nerf_cameras, random_instant_nerf, to_instant_frame,
                                         zero123plus_poses)
from recon3d.testing import place_in_hub_cache, write_instant_nerf_checkpoint

MANIFESTS = Path(__file__).resolve().parent / "data" / "manifests"
PUBLISHED_YAML = """model_config:
  target: src.models.lrm.InstantNeRF
  params:
    encoder_feat_dim: 768
    encoder_freeze: false
    encoder_model_name: facebook/dino-vitb16
    transformer_dim: 1024
    transformer_layers: {layers}
    transformer_heads: 16
    triplane_low_res: 32
    triplane_high_res: 64
    triplane_dim: {dim}
    rendering_samples_per_ray: {samples}

infer_config:
  mesh_threshold: 10.0
"""
YAML_VALUES = {"base": dict(layers=12, dim=40, samples=96), "large": dict(layers=16, dim=80, samples=128)}


@pytest.fixture(scope="module")
def tiny():
    return random_instant_nerf(TINY_INSTANT_NERF_CONFIG, seed=3)


def inputs(n: int = 1, size: int = 40, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 6, 3, size, size, generator=generator)
    return images, instant_nerf_cameras(zero123plus_poses()).expand(n, 6, 16)


@pytest.mark.parametrize("size", ["base", "large"])
def test_published_configs_match_the_manifests_exactly(size, tmp_path):
    manifest = json.loads((MANIFESTS / f"instant-nerf-{size}.json").read_text())
    assert PUBLISHED_CONFIGS[size].to_dict() == manifest["config"]
    path = tmp_path / f"instant-nerf-{size}.yaml"
    path.write_text(PUBLISHED_YAML.format(**YAML_VALUES[size]))
    assert InstantNeRFConfig.from_yaml(path) == PUBLISHED_CONFIGS[size]
    with torch.device("meta"):
        model = InstantNeRF(PUBLISHED_CONFIGS[size])
    ours = [(name, list(t.shape)) for name, t in model.state_dict().items()]
    assert ours == [(name, shape) for name, shape in manifest["tensors"]]  # names, shapes and order
    assert sum(t.numel() for t in model.state_dict().values()) == manifest["num_params"]


def test_bad_configs_are_refused_with_a_reason(tmp_path):
    with pytest.raises(CheckpointError, match="does not know: extra"):
        InstantNeRFConfig.from_dict({**PUBLISHED_CONFIGS["base"].to_dict(), "extra": 1})
    with pytest.raises(CheckpointError, match="encoder_feat_dim 512"):
        InstantNeRFConfig.from_dict({**PUBLISHED_CONFIGS["base"].to_dict(), "encoder_feat_dim": 512})
    with pytest.raises(CheckpointError, match="neither one of"):
        InstantNeRFConfig.from_dict({**PUBLISHED_CONFIGS["base"].to_dict(), "encoder_model_name": "nobody/vit"})
    (tmp_path / "bad.yaml").write_text("model: {}\n")
    with pytest.raises(CheckpointError, match="model_config.params"):
        InstantNeRFConfig.from_yaml(tmp_path / "bad.yaml")


def test_an_encoder_folder_with_a_vit_config_json_sets_the_sizes(tmp_path):
    (tmp_path / "vit").mkdir()
    (tmp_path / "vit" / "config.json").write_text(json.dumps(
        {"hidden_size": 24, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 40,
         "image_size": 16, "patch_size": 8, "model_type": "vit"}))
    cfg = InstantNeRFConfig.from_dict({**TINY_INSTANT_NERF_CONFIG.to_dict(), "encoder_model_name": str(tmp_path / "vit")})
    model = random_instant_nerf(cfg)
    assert len(model.encoder.model.encoder.layer) == 1
    assert model.encoder.model.encoder.layer[0].intermediate.dense.out_features == 40
    assert model.encoder.model.embeddings.position_embeddings.shape == (1, 1 + 4, 24)


# ----------------------------------------------------------------------------- numerics

def _hf_vit(encoder, sizes):
    """transformers' ViTModel holding our encoder's weights (its 5.x names)."""
    from transformers import ViTConfig, ViTModel

    hf = ViTModel(ViTConfig(hidden_size=sizes.hidden_size, num_hidden_layers=sizes.num_hidden_layers,
                            num_attention_heads=sizes.num_attention_heads, intermediate_size=sizes.intermediate_size,
                            image_size=sizes.image_size, patch_size=sizes.patch_size, qkv_bias=True,
                            layer_norm_eps=sizes.layer_norm_eps), add_pooling_layer=False).eval()
    renames = {"attention.attention.query": "attention.q_proj", "attention.attention.key": "attention.k_proj",
               "attention.attention.value": "attention.v_proj", "attention.output.dense": "attention.o_proj",
               "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2"}
    state = {}
    for name, tensor in encoder.model.state_dict().items():
        if "adaLN" in name:
            continue
        name = name.replace("encoder.layer.", "layers.")
        for old, new in renames.items():
            name = name.replace(f".{old}.", f".{new}.")
        state[name] = tensor
    hf.load_state_dict(state, strict=True)
    return hf


def test_encoder_without_modulation_is_transformers_vit_on_imagenet_normalised_pixels():
    model = random_instant_nerf(TINY_INSTANT_NERF_CONFIG, seed=1)
    encoder = model.encoder
    sizes = TINY_INSTANT_NERF_CONFIG.encoder_sizes()
    for layer in encoder.model.encoder.layer:  # zero modulation: a plain ViT
        torch.nn.init.zeros_(layer.adaLN_modulation[1].weight)
        torch.nn.init.zeros_(layer.adaLN_modulation[1].bias)
    hf = _hf_vit(encoder, sizes)
    images = torch.rand(1, 2, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # the trained grid: no resize
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        ours = encoder(images, torch.randn(1, 2, 16))
        ref = hf(pixel_values=(images[0] - mean) / std).last_hidden_state  # (2, 1 + 16, D): CLS kept
    assert ours.shape == (1, 2 * 17, 24)
    torch.testing.assert_close(ours[0], ref.reshape(-1, 24), atol=1e-5, rtol=1e-5)


def test_every_vit_layer_is_modulated_by_its_views_camera():
    model = random_instant_nerf(TINY_INSTANT_NERF_CONFIG, seed=2)
    layer = model.encoder.model.encoder.layer[0]
    x, cond = torch.randn(3, 5, 24), torch.randn(3, 24)
    with torch.no_grad():
        ours = layer(x, cond)
        mod = layer.adaLN_modulation[1](F.silu(cond))  # shift_msa, scale_msa, shift_mlp, scale_mlp
        shift_a, scale_a, shift_m, scale_m = (mod[:, i * 24:(i + 1) * 24, None].transpose(1, 2) for i in range(4))
        att = layer.attention
        h = F.layer_norm(x, (24,), layer.layernorm_before.weight, layer.layernorm_before.bias, 1e-12)
        h = h * (1 + scale_a) + shift_a
        heads = lambda t: t.reshape(3, 5, 2, 12).transpose(1, 2)  # noqa: E731
        q, k, v = (heads(lin(h)) for lin in (att.attention.query, att.attention.key, att.attention.value))
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(12), -1)
        x1 = x + att.output.dense((weights @ v).transpose(1, 2).reshape(3, 5, 24))
        h = F.layer_norm(x1, (24,), layer.layernorm_after.weight, layer.layernorm_after.bias, 1e-12)
        h = h * (1 + scale_m) + shift_m
        expected = x1 + layer.output.dense(F.gelu(layer.intermediate.dense(h)))
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    assert ours.sub(layer(x, torch.zeros_like(cond))).abs().max() > 1e-3  # the camera matters


def test_position_embeddings_are_resized_by_dinos_scale_factor():
    embeddings = random_instant_nerf(TINY_INSTANT_NERF_CONFIG, seed=4).encoder.model.embeddings
    table = embeddings.position_embeddings  # (1, 1 + 4*4, D)
    grid = table[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    with torch.no_grad():
        ours = embeddings.position_embedding(5, 5)  # 40 px views: a 5x5 patch grid
        by_scale = F.interpolate(grid, scale_factor=(5.1 / 4, 5.1 / 4), mode="bicubic", align_corners=False)
        by_size = F.interpolate(grid, size=(5, 5), mode="bicubic", align_corners=False)
    torch.testing.assert_close(ours[0, 1:], by_scale.flatten(2)[0].T)
    assert (ours[0, 1:] - by_size.flatten(2)[0].T).abs().max() > 1e-3  # a resize to (5, 5) would differ
    assert torch.equal(ours[0, 0], table[0, 0])
    assert embeddings.position_embedding(4, 4) is table


def test_transformer_blocks_use_plain_layernorms_and_the_published_eps(tiny):
    block = tiny.transformer.layers[0]
    assert all(isinstance(n, torch.nn.LayerNorm) and n.eps == 1e-5 for n in (block.norm1, block.norm2, block.norm3))
    assert tiny.transformer.norm.eps == 1e-6
    assert tiny.encoder.model.layernorm.eps == 1e-12
    assert block.cross_attn.in_proj_bias is None and block.cross_attn.kdim == 24


def test_planes_come_out_per_plane_as_the_reference_reshapes_them(tiny):
    tokens = torch.randn(2, 3 * 16, 32)  # (N, 3 * low^2, D), low = 4
    with torch.no_grad():
        from recon3d.models.lrm import upsample_planes

        ours = upsample_planes(tokens, tiny.transformer.deconv)
        x = torch.einsum("nihwd->indhw", tokens.view(2, 3, 4, 4, 32)).reshape(6, 32, 4, 4)  # reference's path
        ref = torch.einsum("indhw->nidhw", tiny.transformer.deconv(x).view(3, 2, 8, 8, 8))
    torch.testing.assert_close(ours, ref)


def test_density_and_colour_are_the_references_activations_on_eg3d_planes(tiny):
    planes = torch.randn(1, 3, 8, 8, 8, generator=torch.Generator().manual_seed(5))
    points = torch.rand(1, 50, 3, generator=torch.Generator().manual_seed(6)) * 2.2 - 1.1  # some outside the box
    axes = torch.tensor([[[1, 0, 0], [0, 1, 0], [0, 0, 1]], [[1, 0, 0], [0, 0, 1], [0, 1, 0]],
                         [[0, 0, 1], [0, 1, 0], [1, 0, 0]]], dtype=torch.float32)  # EG3D's generate_planes
    with torch.no_grad():
        coords = torch.stack([(points[0] @ torch.linalg.inv(a))[:, :2] for a in axes])  # (3, P, 2)
        feats = F.grid_sample(planes[0], coords[:, None], mode="bilinear", padding_mode="zeros", align_corners=False)
        feats = feats[:, :, 0].permute(2, 0, 1).reshape(1, 50, 24)  # (1, P, 3C), plane by plane
        raw = tiny.synthesizer.decoder.net(feats)
        density, rgb = tiny.query_points(planes, points)
    torch.testing.assert_close(density, F.softplus(raw[..., :1] - 1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(rgb, torch.sigmoid(raw[..., 1:]) * 1.002 - 0.001, atol=1e-6, rtol=1e-5)


def test_zero123plus_cameras_are_instantmeshs_sixteen_numbers():
    cameras = instant_nerf_cameras(zero123plus_poses())
    assert cameras.shape == (6, 16)
    for view, (az, el) in enumerate(zip([30, 90, 150, 210, 270, 330], [20, -10] * 3)):
        az, el = math.radians(az), math.radians(el)
        eye = 4.0 * torch.tensor([math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)])
        z = F.normalize(eye, dim=0)
        x = F.normalize(torch.linalg.cross(torch.tensor([0.0, 0.0, 1.0]), z), dim=0)
        y = F.normalize(torch.linalg.cross(z, x), dim=0)
        c2w = torch.stack([x, y, z, eye], -1)  # (3, 4), OpenGL camera-to-world in InstantMesh's world
        torch.testing.assert_close(cameras[view, :12], c2w.reshape(12), atol=1e-5, rtol=1e-5)
    focal = 0.5 / math.tan(math.radians(15))
    torch.testing.assert_close(cameras[:, 12:], torch.tensor([focal, focal, 0.5, 0.5]).expand(6, 4))


def test_field_speaks_recon3ds_frame(tiny):
    planes = tiny.forward_planes(*inputs())
    points = torch.rand(1, 64, 3) * 2 - 1
    field = tiny.field(planes)
    with torch.no_grad():
        density, rgb = field.query(points)
        ref_density, ref_rgb = tiny.query_points(planes, to_instant_frame(points))
    torch.testing.assert_close(density, ref_density)
    torch.testing.assert_close(rgb, ref_rgb)
    front = to_instant_frame(torch.tensor([[0.0, -0.5, 0.0]]))  # recon3d's front is InstantMesh's +x
    torch.testing.assert_close(front, torch.tensor([[0.5, 0.0, 0.0]]))
    assert field.iso_level == 10.0


# ----------------------------------------------------------------------------- loading

def test_published_layout_loads_weights_only_from_a_file_and_the_hub_cache(tiny, tmp_path):
    from conftest import _CACHE

    path = write_instant_nerf_checkpoint(tiny, tmp_path / "tiny" / "instant_nerf_tiny.ckpt", training_extras=3)
    images, cameras = inputs()
    with torch.no_grad():
        expected = tiny.forward_planes(images, cameras)
    loaded = InstantNeRF.from_pretrained(path, config=TINY_INSTANT_NERF_CONFIG.to_dict())
    assert loaded.skipped_entries == 3
    place_in_hub_cache(tmp_path / "tiny", "recon3d-test/tiny-instantmesh", _CACHE, "e" * 40)
    from_hub = InstantNeRF.from_pretrained("recon3d-test/tiny-instantmesh/instant_nerf_tiny.ckpt",
                                           config=TINY_INSTANT_NERF_CONFIG)
    with torch.no_grad():
        for model in (loaded, from_hub):
            torch.testing.assert_close(model.forward_planes(images, cameras), expected)


def test_files_that_do_not_fit_are_refused_with_one_line(tiny, tmp_path):
    state = {"lrm_generator." + k: v for k, v in tiny.state_dict().items()}
    cfg = TINY_INSTANT_NERF_CONFIG
    del state["lrm_generator.transformer.pos_embed"]
    state["lrm_generator.transformer.deconv.weight"] = torch.zeros(1, 1, 2, 2)
    state["lrm_generator.extra.weight"] = torch.zeros(1)
    torch.save({"state_dict": state}, tmp_path / "damaged.ckpt")
    with pytest.raises(CheckpointError) as info:
        InstantNeRF.from_pretrained(tmp_path / "damaged.ckpt", config=cfg)
    message = str(info.value)
    assert "1 missing (transformer.pos_embed)" in message and "1 unexpected (extra.weight)" in message
    assert "transformer.deconv.weight: expected [32, 8, 2, 2], found [1, 1, 2, 2]" in message
    torch.save({"state_dict": {"model.weight": torch.zeros(1)}}, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match="no tensor starts with 'lrm_generator.'"):
        InstantNeRF.from_pretrained(tmp_path / "other.ckpt", config=cfg)
    with pytest.raises(CheckpointError, match="cannot tell base from large"):
        InstantNeRF.from_pretrained(tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match="neither a file nor owner/repo/file"):
        InstantNeRF.from_pretrained(tmp_path / "missing.ckpt")
    with pytest.raises(CheckpointError, match="not in the local cache"):
        InstantNeRF.from_pretrained("TencentARC/InstantMesh/instant_nerf_large.ckpt")


def test_a_pickle_that_needs_code_is_refused_with_the_conversion_command(tmp_path):
    import argparse

    # a pickled object that weights_only=True must refuse (the training files hold such objects, e.g. configs)
    torch.save({"state_dict": {"lrm_generator.x": torch.zeros(1)}, "args": argparse.Namespace(lr=1)},
               tmp_path / "unsafe.ckpt")
    with pytest.raises(CheckpointError) as info:
        InstantNeRF.from_pretrained(tmp_path / "unsafe.ckpt", config=TINY_INSTANT_NERF_CONFIG)
    message = str(info.value)
    assert "\n" not in message and "weights_only=False" in message and "unsafe.safetensors" in message
    command = message.split("convert it once with: ")[1]
    import subprocess
    import sys

    # the command works (run here on our own, trusted file) and its output loads as far as the tensors go
    subprocess.run([sys.executable, "-c", command.split('-c "', 1)[1].rstrip('"')], check=True, cwd=tmp_path)
    assert (tmp_path / "unsafe.safetensors").is_file()
    with pytest.raises(CheckpointError, match="missing"):
        InstantNeRF.from_pretrained(tmp_path / "unsafe.safetensors", config=TINY_INSTANT_NERF_CONFIG)
