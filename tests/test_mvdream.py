"""MVDream loading without remote code: the published tensor names, both layouts, the multi-view attention."""

import json
import re
import shutil

import pytest
import torch
from conftest import _CACHE, ROOT

from recon3d.hub import CheckpointError
from recon3d.models.mvdream import (LDM_UNET_PREFIX, LDM_VAE_PREFIX, ORIGINAL_FILE, TINY_UNET_CONFIG, TINY_VAE_CONFIG,
                                    MultiViewUNetConfig, build_unet, diffusers_to_ldm_names, install_multiview_attention,
                                    load_unet, random_parts)
from recon3d.testing import place_in_hub_cache, write_diffusers_layout
from recon3d.pipelines.text_to_3d import TextTo3D

MANIFEST = json.loads((ROOT / "tests" / "data" / "manifests" / "mvdream-sd2.1-diffusers-unet.json").read_text())
PUBLISHED_NAMES = [name for name, _ in MANIFEST["tensors"]]
TINY_REPO, TINY_COMMIT = "recon3d-test/tiny-mvdream", "89abcdef0123456789abcdef0123456789abcdef"


def meta_tensors(entries):
    return {name: torch.empty(shape, device="meta") for name, shape in entries}


def test_full_size_unet_maps_every_published_tensor_once():
    config = MultiViewUNetConfig.from_dict(MANIFEST["config"], "manifest")
    assert config == MultiViewUNetConfig()  # the published config is SD 2.1-base's
    unet = load_unet(config, meta_tensors(MANIFEST["tensors"]), "manifest")  # built on meta: no memory
    state = unet.state_dict()
    assert len(state) == MANIFEST["num_tensors"] == 690
    assert sum(t.numel() for t in state.values()) == MANIFEST["num_params"]
    assert all(t.is_meta for t in state.values())
    # the camera MLP became the projection class embedding
    assert tuple(state["class_embedding.linear_1.weight"].shape) == (1280, 16)


def test_missing_extra_and_misshaped_unet_tensors_are_refused():
    entries = dict(MANIFEST["tensors"])
    config = MultiViewUNetConfig()
    missing = {k: v for k, v in entries.items() if k != "out.2.bias"}
    with pytest.raises(CheckpointError, match=r"1 missing \(conv_out.bias\)"):
        load_unet(config, meta_tensors(missing.items()), "ckpt")
    extra = {**entries, "camera_embed.4.weight": [3, 3]}
    with pytest.raises(CheckpointError, match="1 UNet tensors have no place.*camera_embed.4.weight"):
        load_unet(config, meta_tensors(extra.items()), "ckpt")
    wrong = {**entries, "camera_embed.0.weight": [1280, 12]}
    with pytest.raises(CheckpointError, match=r"class_embedding.linear_1.weight: expected \[1280, 16\], found \[1280, 12\]"):
        load_unet(config, meta_tensors(wrong.items()), "ckpt")


def test_unknown_unet_config_is_refused():
    with pytest.raises(CheckpointError, match="does not support: use_spatial_transformer"):
        MultiViewUNetConfig.from_dict({**MANIFEST["config"], "use_spatial_transformer": True}, "ckpt")


@pytest.fixture(scope="module")
def tiny_parts():
    return random_parts(seed=3)


@pytest.fixture(scope="module")
def tiny_mvdream_repo(tiny_parts, tmp_path_factory):
    """The tiny model in ashawkey/mvdream-sd2.1-diffusers's layout, placed in the Hub cache as a repo id."""
    folder = write_diffusers_layout(tiny_parts, tmp_path_factory.mktemp("tiny-mvdream"), PUBLISHED_NAMES)
    place_in_hub_cache(folder, TINY_REPO, _CACHE, TINY_COMMIT)
    return folder


def test_tiny_checkpoint_has_the_published_layout(tiny_mvdream_repo):
    from safetensors import safe_open

    with safe_open(str(tiny_mvdream_repo / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert sorted(f.keys()) == sorted(PUBLISHED_NAMES)  # same names, smaller shapes
    assert json.loads((tiny_mvdream_repo / "unet" / "config.json").read_text())["_class_name"] == "MultiViewUNetModel"
    for name in ("model_index.json", "vae/config.json", "text_encoder/config.json", "tokenizer/vocab.json",
                 "tokenizer/merges.txt", "scheduler/scheduler_config.json"):
        assert (tiny_mvdream_repo / name).is_file(), name


def test_repo_id_loads_every_part(tiny_parts, tiny_mvdream_repo):
    pipe = TextTo3D.from_pretrained(TINY_REPO, offline=True)
    for ours, theirs in ((pipe.unet, tiny_parts.unet), (pipe.vae, tiny_parts.vae),
                         (pipe.text_encoder, tiny_parts.text_encoder)):
        a, b = ours.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert pipe.tokenizer("a chair").input_ids == tiny_parts.tokenizer("a chair").input_ids
    assert pipe.scheduler.config.steps_offset == 1 and pipe.scheduler.config.beta_schedule == "scaled_linear"
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(8, 4, 8, 8, generator=g), torch.randn(8, 77, 32, generator=g)
    cameras = torch.randn(8, 16, generator=g)
    with torch.no_grad():
        out = pipe.unet(x, torch.full((8,), 500), encoder_hidden_states=text, class_labels=cameras).sample
        ref = tiny_parts.unet(x, torch.full((8,), 500), encoder_hidden_states=text, class_labels=cameras).sample
    assert out.shape == (8, 4, 8, 8) and torch.allclose(out, ref, atol=1e-5)


def test_repo_not_cached_offline_says_how_to_get_it():
    with pytest.raises(CheckpointError, match="recon3d-test/absent is not in the local cache and offline mode is on"):
        TextTo3D.from_pretrained("recon3d-test/absent", offline=True)


def test_folder_with_a_missing_part_is_refused(tiny_mvdream_repo, tmp_path):
    broken = shutil.copytree(tiny_mvdream_repo, tmp_path / "broken")
    (broken / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="vae/diffusion_pytorch_model.safetensors or .*bin is missing"):
        TextTo3D.from_pretrained(broken)


@pytest.mark.parametrize("part, weights", [("vae", "diffusion_pytorch_model.safetensors"),
                                           ("text_encoder", "model.safetensors")])
def test_stock_parts_with_unexpected_tensors_are_refused(tiny_mvdream_repo, tmp_path, part, weights):
    """Strict like the UNet: a VAE or text encoder file holding a tensor its config has no place for is refused."""
    from safetensors.torch import load_file, save_file

    broken = shutil.copytree(tiny_mvdream_repo, tmp_path / "broken")
    tensors = load_file(str(broken / part / weights))
    save_file({**tensors, "extra.weight": torch.zeros(3)}, str(broken / part / weights))
    with pytest.raises(CheckpointError, match=f"(?i)the {part.replace('_', ' ')} weights do not match.*extra.weight"):
        TextTo3D.from_pretrained(broken)


def views_input(seed=0, batch=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(4 * batch, 4, 8, 8, generator=g), torch.randn(4 * batch, 77, 32, generator=g),
            torch.randn(4 * batch, 16, generator=g))


def test_processor_mixes_the_views_of_one_object_only(tiny_parts):
    unet = tiny_parts.unet
    x, text, cams = views_input(batch=2)
    changed = x.clone()
    changed[2] += 1.0  # view 2 of object 0 only
    with torch.no_grad():
        before = unet(x, torch.full((8,), 300), encoder_hidden_states=text, class_labels=cams).sample
        after = unet(changed, torch.full((8,), 300), encoder_hidden_states=text, class_labels=cams).sample
    assert (after[0] - before[0]).abs().max() > 1e-3  # view 0 sees view 2
    assert torch.equal(after[4:], before[4:])  # object 1 does not


def test_one_view_equals_the_stock_unet(tiny_parts):
    from diffusers.models.attention_processor import AttnProcessor2_0

    stock = build_unet(TINY_UNET_CONFIG, empty=False)
    stock.load_state_dict(tiny_parts.unet.state_dict())
    stock.set_attn_processor(AttnProcessor2_0())
    single = build_unet(TINY_UNET_CONFIG, num_views=1, empty=False)
    single.load_state_dict(tiny_parts.unet.state_dict())
    x, text, cams = views_input(seed=1)
    t = torch.full((4,), 700)
    with torch.no_grad():
        a = single(x, t, encoder_hidden_states=text, class_labels=cams).sample
        b = stock(x, t, encoder_hidden_states=text, class_labels=cams).sample
        install_multiview_attention(stock, 4)
        c = stock(x, t, encoder_hidden_states=text, class_labels=cams).sample
    assert torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(c, b, atol=1e-3)  # four views mixed differ from four images alone


# ---- the original single file (MVDream/MVDream sd-v2.1-base-4view.pt) ---------------------------------------------

def ldm_vae_name(name: str) -> str:
    """diffusers AutoencoderKL name -> LDM first_stage_model name (the inverse of diffusers' converter, written
    out independently here so the test checks the conversion, not itself)."""
    name = re.sub(r"encoder\.down_blocks\.(\d)\.resnets\.(\d)", r"encoder.down.\1.block.\2", name)
    name = re.sub(r"encoder\.down_blocks\.(\d)\.downsamplers\.0", r"encoder.down.\1.downsample", name)
    name = re.sub(r"decoder\.up_blocks\.(\d)\.resnets\.(\d)", lambda m: f"decoder.up.{3 - int(m[1])}.block.{m[2]}", name)
    name = re.sub(r"decoder\.up_blocks\.(\d)\.upsamplers\.0", lambda m: f"decoder.up.{3 - int(m[1])}.upsample", name)
    name = re.sub(r"mid_block\.resnets\.(\d)", lambda m: f"mid.block_{int(m[1]) + 1}", name)
    for new, old in (("mid_block.attentions.0.group_norm", "mid.attn_1.norm"), ("mid_block.attentions.0.to_q", "mid.attn_1.q"),
                     ("mid_block.attentions.0.to_k", "mid.attn_1.k"), ("mid_block.attentions.0.to_v", "mid.attn_1.v"),
                     ("mid_block.attentions.0.to_out.0", "mid.attn_1.proj_out"), ("conv_norm_out", "norm_out"),
                     ("conv_shortcut", "nin_shortcut")):
        name = name.replace(new, old)
    return LDM_VAE_PREFIX + name


def test_original_single_file_loads_unet_and_vae(tiny_parts, tiny_mvdream_repo, tmp_path):
    state = {LDM_UNET_PREFIX + ldm: tiny_parts.unet.state_dict()[name]
             for ldm, name in diffusers_to_ldm_names(PUBLISHED_NAMES, TINY_UNET_CONFIG).items()}
    for name, tensor in tiny_parts.vae.state_dict().items():
        is_attention_matrix = ".attentions." in name and name.endswith("weight") and tensor.dim() == 2
        state[ldm_vae_name(name)] = tensor[:, :, None, None] if is_attention_matrix else tensor  # LDM: 1x1 convs
    state["cond_stage_model.model.ln_final.weight"] = torch.ones(32)  # OpenCLIP: not converted
    folder = tmp_path / "MVDream"
    folder.mkdir()
    torch.save({"state_dict": state}, folder / ORIGINAL_FILE)
    pipe = TextTo3D.from_pretrained(folder, text_from=str(tiny_mvdream_repo), unet_config=TINY_UNET_CONFIG,
                                    vae_config=TINY_VAE_CONFIG)
    for ours, theirs in ((pipe.unet, tiny_parts.unet), (pipe.vae, tiny_parts.vae)):
        a, b = ours.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "OpenCLIP text encoder is not converted" in pipe.parts.notes[0]
    del state[ldm_vae_name("decoder.conv_in.bias")]
    torch.save(state, folder / ORIGINAL_FILE)
    with pytest.raises(CheckpointError, match="missing.*decoder.conv_in.bias"):
        TextTo3D.from_pretrained(folder, text_from=str(tiny_mvdream_repo), unet_config=TINY_UNET_CONFIG,
                                 vae_config=TINY_VAE_CONFIG)
