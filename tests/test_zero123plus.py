"""Zero123++ loads from its exact diffusers layout (folder and Hub cache) without its pipeline code, with
reference attention, the reference's conditioning and a seeded sampler; InstantMesh's UNet replaces the UNet
strictly; the sampler's reconstruction-in-the-loop puts the InstantNeRF's renders back into x0."""

import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from recon3d.cancel import CancelToken, Cancelled
from recon3d.hub import CheckpointError
from recon3d.models.zero123plus import (GREY_BACKGROUND, WHITE_BACKGROUND, ReferenceAttnProcessor, ReferenceBank,
                                        load_zero123plus, random_zero123plus_parts, split_views, tile_views)
from recon3d.noise import randn_tensor, seeded
from recon3d.pipelines.events import Finished, Preview, SampleReady
from recon3d.pipelines.multiview_sample import MultiViewOptions, MultiViewSample3D
from recon3d.testing import place_in_hub_cache, write_unet_state_dict, write_zero123plus_layout

REPO = "recon3d-test/tiny-zero123plus"


@pytest.fixture(scope="module")
def parts():
    return random_zero123plus_parts(seed=0)


@pytest.fixture(scope="module")
def layout(parts, tmp_path_factory):
    from conftest import _CACHE

    folder = write_zero123plus_layout(parts, tmp_path_factory.mktemp("zero123plus") / "repo")
    place_in_hub_cache(folder, REPO, _CACHE, "d" * 40)
    return folder


@pytest.fixture(scope="module")
def pipe():
    return MultiViewSample3D.random(seed=0)


def photo() -> Image.Image:
    image = Image.new("RGBA", (80, 80), (0, 0, 0, 0))
    image.paste((220, 40, 40, 255), (20, 15, 60, 65))
    return image


def sample_inputs(parts, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(batch, 77, 32, generator=g)
    return torch.randn(batch, 4, 12, 8, generator=g), torch.full((batch,), 500.0), embeds, torch.randn(batch, 4, 8, 8, generator=g)


def test_the_published_layout_loads_from_a_folder_and_the_hub_cache(parts, layout):
    files = sorted(p.relative_to(layout).as_posix() for p in layout.rglob("*") if p.is_file())
    for needed in ("model_index.json", "unet/config.json", "vae/config.json", "vision_encoder/config.json",
                   "text_encoder/config.json", "feature_extractor_clip/preprocessor_config.json",
                   "feature_extractor_vae/preprocessor_config.json", "tokenizer/vocab.json",
                   "scheduler/scheduler_config.json"):
        assert needed in files
    assert len(json.loads((layout / "model_index.json").read_text())["ramping_coefficients"]) == 77
    sample, t, embeds, cond = sample_inputs(parts)
    with torch.no_grad():
        expected_v, expected_embeds = parts.predict_v(sample, t, embeds, cond), parts.prompt_embeds(photo().convert("RGB"))
        for source in (layout, REPO):
            loaded = load_zero123plus(source)
            assert loaded.background == GREY_BACKGROUND  # the original UNet: grey behind the input
            torch.testing.assert_close(loaded.predict_v(sample, t, embeds, cond), expected_v, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(loaded.prompt_embeds(photo().convert("RGB")), expected_embeds, atol=1e-5, rtol=1e-5)
    config = load_zero123plus(layout).scheduler()
    assert config.config.prediction_type == "v_prediction" and config.config.timestep_spacing == "trailing"
    config.set_timesteps(75)
    assert int(config.timesteps[0]) == 999  # trailing: the first step is the noisiest training step


def test_instantmeshs_unet_replaces_the_unet_strictly(parts, layout, tmp_path):
    other = random_zero123plus_parts(seed=5)
    path = write_unet_state_dict(other.unet, tmp_path / "instantmesh" / "diffusion_pytorch_model.bin")
    from conftest import _CACHE

    place_in_hub_cache(path.parent, "recon3d-test/tiny-instantmesh-unet", _CACHE, "c" * 40)
    loaded = load_zero123plus(layout, unet=path)
    from_hub = load_zero123plus(REPO, unet="recon3d-test/tiny-instantmesh-unet/diffusion_pytorch_model.bin")
    assert loaded.background == WHITE_BACKGROUND and loaded.unet_source == str(path)
    sample, t, embeds, cond = sample_inputs(parts)
    with torch.no_grad():
        expected = other.predict_v(sample, t, embeds, cond)
        for model in (loaded, from_hub):
            torch.testing.assert_close(model.predict_v(sample, t, embeds, cond), expected, atol=1e-5, rtol=1e-5)
    state = torch.load(path, weights_only=True)
    state.pop("conv_in.weight")
    torch.save(state, tmp_path / "damaged.bin")
    with pytest.raises(CheckpointError, match="1 missing \\(conv_in.weight\\)"):
        load_zero123plus(layout, unet=tmp_path / "damaged.bin")


def test_a_layout_without_ramping_coefficients_is_refused(layout, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(layout, copy)
    index = json.loads((copy / "model_index.json").read_text())
    index["ramping_coefficients"] = index["ramping_coefficients"][:10]
    (copy / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="77 ramping_coefficients \\(found 10\\)"):
        load_zero123plus(copy)
    (copy / "feature_extractor_vae" / "preprocessor_config.json").unlink()
    with pytest.raises(CheckpointError, match="feature_extractor_vae/preprocessor_config.json is missing"):
        load_zero123plus(copy)


def test_reference_attention_attends_to_own_then_stored_tokens():
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    attn = Attention(query_dim=16, heads=2, dim_head=8).eval()
    bank = ReferenceBank()
    attn.set_processor(ReferenceAttnProcessor(bank, "down.attn1.processor"))
    g = torch.Generator().manual_seed(0)
    x, reference = torch.randn(2, 5, 16, generator=g), torch.randn(2, 7, 16, generator=g)
    with torch.no_grad():
        bank.mode = "write"
        written = attn(reference)
        bank.mode = "read"
        read = attn(x)
        plain = AttnProcessor2_0()
        torch.testing.assert_close(written, plain(attn, reference))  # writing attends as usual
        torch.testing.assert_close(read, plain(attn, x, torch.cat([x, reference], 1)))  # keys/values: own, then stored
        assert bank.states == {}  # each stored state is read once
        with pytest.raises(RuntimeError, match="condition pass did not run"):
            attn(x)


def test_only_the_condition_changes_the_prediction_and_a_skipped_condition_pass_is_detected(parts):
    sample, t, embeds, cond = sample_inputs(parts)
    with torch.no_grad():
        base = parts.predict_v(sample, t, embeds, cond)
        again = parts.predict_v(sample, t, embeds, cond)
        moved = parts.predict_v(sample, t, embeds, cond + 0.5)
        parts.bank.mode = "read"  # a sample pass without its condition pass
        with pytest.raises(RuntimeError, match="condition pass did not run"):
            parts.unet(sample, t, encoder_hidden_states=embeds)
        parts.bank.mode = None
    torch.testing.assert_close(base, again)
    assert (moved - base).abs().max() > 1e-3
    assert parts.unet.attn_processors["down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor"].bank is parts.bank


def test_conditioning_is_the_references(parts):
    image = photo().convert("RGB")
    with torch.no_grad():
        embeds = parts.prompt_embeds(image)
        ids = parts.tokenizer("", padding="max_length", max_length=77, return_tensors="pt").input_ids
        text = parts.text_encoder(ids).last_hidden_state  # (1, 77, D)
        clip = torch.from_numpy(__import__("numpy").asarray(
            image.resize((32, 32), Image.Resampling.BICUBIC), dtype="float32") / 255).permute(2, 0, 1)[None]
        mean, std = torch.tensor([0.48145466, 0.4578275, 0.40821073]), torch.tensor([0.26862954, 0.26130258, 0.27577711])
        image_embeds = parts.vision_encoder((clip - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)).image_embeds
        torch.testing.assert_close(embeds, text + parts.ramping[None, :, None] * image_embeds[:, None], atol=2e-3, rtol=1e-3)
        positive, negative = parts.condition_latents(image, [seeded(3), seeded(4)])
        pixels = torch.from_numpy(__import__("numpy").asarray(
            image.resize((64, 64), Image.Resampling.BILINEAR), dtype="float32") / 255).permute(2, 0, 1)[None]
        dist = parts.vae.encode((pixels - 0.5) / 0.8).latent_dist
        generators = [seeded(3), seeded(4)]
        noise = randn_tensor((2, 4, 8, 8), generators)
        torch.testing.assert_close(positive, dist.mean + dist.std * noise, atol=2e-3, rtol=1e-3)
        zero = parts.vae.encode(torch.zeros_like(pixels)).latent_dist
        torch.testing.assert_close(negative, zero.mean + zero.std * randn_tensor((2, 4, 8, 8), generators))


def test_views_tile_row_by_row():
    views = torch.arange(6.0).view(1, 6, 1, 1, 1).expand(1, 6, 3, 4, 4)
    grid = tile_views(views)
    assert grid.shape == (1, 3, 12, 8)
    assert [grid[0, 0, 4 * r, 4 * c].item() for r in range(3) for c in range(2)] == [0, 1, 2, 3, 4, 5]
    assert torch.equal(split_views(grid), views)


def test_latents_scale_around_the_vae_as_the_reference(parts):
    z = torch.randn(1, 4, 12, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        images = parts.decode(z)
        raw = parts.vae.decode((z / 0.75 + 0.22) / parts.vae.config.scaling_factor).sample
    torch.testing.assert_close(images, (raw * 1.6 / 2 + 0.5).clamp(0, 1))


# ----------------------------------------------------------------------------- the sampler

def run(pipe, **options):
    return list(pipe.run(photo(), MultiViewOptions(mesh_resolution=64, **options)))


def test_a_seed_gives_the_same_sample_alone_and_in_a_batch(pipe):
    batch = run(pipe, seeds=[1, 7], steps=3)[-1].result
    alone = run(pipe, seeds=[7], steps=3)[-1].result
    assert [s.seed for s in batch] == [1, 7]
    assert (batch[1].views - alone[0].views).abs().max() < 2e-3  # float noise of batched kernels only
    assert (batch[0].views - batch[1].views).abs().max() > 0.05  # different seeds: different samples
    assert batch[0].views.shape == (6, 3, 32, 32)


def test_the_loop_puts_the_reconstructions_renders_back_into_x0(pipe):
    options = MultiViewOptions(seeds=[2], steps=3, reconstruct_at=(2,)).resolved("cpu")
    plain = MultiViewOptions(seeds=[2], steps=3).resolved("cpu")
    condition = photo().convert("RGB")
    with torch.no_grad():
        looped = [state for state, _ in pipe.denoise(condition, [2], options)]
        unlooped = [state for state, _ in pipe.denoise(condition, [2], plain)]
        renders = pipe.render(looped[1].planes)
        expected = pipe.prior.encode(tile_views(renders))
    assert looped[0].reconstructed is None and looped[1].reconstructed is not None
    torch.testing.assert_close(looped[1].x0, expected, atol=1e-4, rtol=1e-4)  # weight 1: x0 is the renders' latent
    assert (looped[1].x0 - unlooped[1].x0).abs().max() > 1e-2
    assert (looped[2].x0 - unlooped[2].x0).abs().max() > 1e-3  # the sampler went on from it
    half = MultiViewOptions(seeds=[2], steps=3, reconstruct_at=(2,), reconstruct_weight=0.5).resolved("cpu")
    with torch.no_grad():
        blended = [state for state, _ in pipe.denoise(condition, [2], half)][1]
    torch.testing.assert_close(blended.x0, 0.5 * blended.reconstructed + 0.5 * unlooped[1].x0, atol=1e-4, rtol=1e-4)
    none = MultiViewOptions(seeds=[2], steps=3, reconstruct_at=(2,), reconstruct_weight=0.0).resolved("cpu")
    with torch.no_grad():  # weight 0: x0 -> v -> x0 is exact, so the run is the plain one
        final = [latents for _, latents in pipe.denoise(condition, [2], none)][-1]
        plain_final = [latents for _, latents in pipe.denoise(condition, [2], plain)][-1]
    torch.testing.assert_close(final, plain_final, atol=1e-4, rtol=1e-4)


def test_events_previews_and_glbs_with_complete_extras(pipe, tmp_path):
    events = run(pipe, seeds=[3], steps=4, preview_every=2, reconstruct_at=(3,))
    previews = [e for e in events if isinstance(e, Preview)]
    assert [p.step for p in previews] == [2, 4] and previews[0].views.shape == (1, 6, 3, 32, 32)
    fractions = [e.fraction for e in events]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    sample = next(e for e in events if isinstance(e, SampleReady)).sample
    assert isinstance(events[-1], Finished) and events[-1].result[0] is sample
    path = sample.save_glb(tmp_path / "seed-3.glb")
    import pygltflib

    extras = pygltflib.GLTF2().load(str(path)).asset.extras
    for key, value in {"method": "Zero123++ v1.2 -> InstantMesh NeRF", "seed": 3, "steps": 4, "guidance": 4.0,
                       "reconstruct_at": [3], "random_weights": True}.items():
        assert extras[key] == value
    for key in ("checkpoint", "unet", "reconstructor", "recon3d_version"):
        assert extras[key]


def test_bad_options_are_refused_in_one_sentence_and_cancel_stops(pipe):
    with pytest.raises(ValueError, match="reconstruction steps must be between 1 and the 3 steps, got 5"):
        MultiViewOptions(steps=3, reconstruct_at=(5,)).validate()
    with pytest.raises(ValueError, match="guidance must be between 1 and 20"):
        MultiViewOptions(guidance=0.5).validate()
    token = CancelToken()
    events = pipe.run(photo(), MultiViewOptions(seeds=[1], steps=50), cancel=token)
    next(events)
    token.cancel()
    with pytest.raises(Cancelled):
        list(events)


def test_reconstruct_reads_zero123plus_cameras(pipe):
    views = torch.rand(1, 6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    from recon3d.models.instant_nerf import instant_nerf_cameras, zero123plus_poses

    with torch.no_grad():
        planes = pipe.reconstruct(views)
        expected = pipe.reconstructor.forward_planes(views, instant_nerf_cameras(zero123plus_poses()).expand(1, 6, 16))
        larger = F.interpolate(views[0], size=48, mode="bilinear").unsqueeze(0)
        resized = pipe.reconstruct(larger)  # other sizes are resized to the reconstructor's (bicubic, antialiased)
        by_hand = F.interpolate(larger[0], size=32, mode="bicubic", antialias=True).clamp(0, 1).unsqueeze(0)
        cameras = instant_nerf_cameras(zero123plus_poses()).expand(1, 6, 16)
        expected_resized = pipe.reconstructor.forward_planes(by_hand, cameras)
    torch.testing.assert_close(planes, expected)
    torch.testing.assert_close(resized, expected_resized, atol=1e-5, rtol=1e-5)


def test_the_published_component_sizes_have_the_published_parameter_counts():
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    from recon3d.models.mvdream import SD_VAE_CONFIG
    from recon3d.models.zero123plus import PUBLISHED_TEXT, PUBLISHED_UNET, PUBLISHED_VISION

    with init_empty_weights():
        modules = {"unet": UNet2DConditionModel(**PUBLISHED_UNET), "vae": AutoencoderKL(**SD_VAE_CONFIG),
                   "text": CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **PUBLISHED_TEXT)),
                   "vision": CLIPVisionModelWithProjection(CLIPVisionConfig(**PUBLISHED_VISION))}
    counts = {name: sum(p.numel() for p in module.parameters()) for name, module in modules.items()}
    assert counts == {"unet": 865_910_724, "vae": 83_653_863, "text": 340_387_840, "vision": 632_076_800}


def test_image_to_3d_through_zero123plus_views_is_one_seed_of_the_sampler(pipe, tmp_path):
    from recon3d.pipelines.image_to_3d import ImageTo3DOptions, ImageTo3DResult
    from recon3d.pipelines.multiview_sample import ViewsImageTo3D

    job = ViewsImageTo3D(pipe, steps=3)
    options = ImageTo3DOptions(mesh_resolution=64, foreground_ratio=0.85)
    events = list(job.run(photo(), options))
    result = events[-1].result
    assert isinstance(result, ImageTo3DResult) and result.processed_image.size == (512, 512)  # the VAE's size
    assert not any(isinstance(event, Preview) for event in events)  # no preview is decoded for Image to 3D
    alone = run(pipe, seeds=[ViewsImageTo3D.SEED], steps=3)[-1].result[0]  # the sampler's, seed 42
    torch.testing.assert_close(result.planes, alone.planes, atol=1e-5, rtol=1e-5)
    assert result.stats["faces"] == len(result.mesh.faces) > 0 and result.stats["field_queries"] > 0
    assert set(result.timings) == {"preprocess", "views, reconstruction and mesh"}
    extras = __import__("pygltflib").GLTF2().load(str(result.save_glb(tmp_path / "one.glb"))).asset.extras
    assert extras["method"].endswith("(Image to 3D, one seed)") and extras["seed"] == 42 and extras["steps"] == 3
    assert ViewsImageTo3D(pipe).steps == 75  # InstantMesh's setting by default
    frames = result.render_turntable(frames=2, size=32)
    assert len(frames) == 2 and frames[0].size == (32, 32)


def test_the_pair_counts_as_present_only_when_every_file_the_app_loads_is_cached(parts, tmp_path):
    from recon3d.service import instantmesh_cached

    cache = tmp_path / "hub"
    layout = write_zero123plus_layout(parts, tmp_path / "zero123plus")
    (layout / "unet" / "diffusion_pytorch_model.safetensors").unlink()  # the app uses InstantMesh's UNet weights
    place_in_hub_cache(layout, "sudo-ai/zero123plus-v1.2", cache)
    instantmesh = tmp_path / "instantmesh"
    write_unet_state_dict(parts.unet, instantmesh / "diffusion_pytorch_model.bin")
    assert not instantmesh_cached(cache)  # no NeRF yet
    (instantmesh / "instant_nerf_large.ckpt").write_bytes(b"stand-in")
    place_in_hub_cache(instantmesh, "TencentARC/InstantMesh", cache)
    assert instantmesh_cached(cache)
    (cache / "models--sudo-ai--zero123plus-v1.2" / "snapshots" / "0123456789abcdef0123456789abcdef01234567" / "vae" /
     "diffusion_pytorch_model.safetensors").unlink()
    assert not instantmesh_cached(cache)


def test_each_step_is_the_references_arithmetic_from_the_seeds_own_draws(pipe, monkeypatch):
    """The clean estimate is the scheduler's own, the guidance is CFG on the two branches, and the condition is
    noised to the step as ``(cond + sigma eps) / sqrt(sigma^2 + 1)`` with eps the seed's next draws."""
    options = MultiViewOptions(seeds=[4], steps=2, guidance=3.0).resolved("cpu")
    condition = photo().convert("RGB")
    calls, estimates, sigmas = [], [], []
    predict, make_scheduler = pipe.predict_v, pipe.prior.scheduler

    def recording_predict(sample, t, embeds, cond):
        v = predict(sample, t, embeds, cond)
        calls.append((sample.clone(), t.clone(), embeds.clone(), cond.clone(), v.clone()))
        return v

    def recording_scheduler():
        scheduler = make_scheduler()
        step = scheduler.step

        def recording_step(*args, **kwargs):
            sigmas.append(float(scheduler.sigmas[scheduler.step_index]))
            out = step(*args, **kwargs)
            estimates.append(out.pred_original_sample.clone())
            return out

        scheduler.step = recording_step
        return scheduler

    monkeypatch.setattr(pipe, "predict_v", recording_predict)
    monkeypatch.setattr(pipe.prior, "scheduler", recording_scheduler)
    with torch.no_grad():
        states = [state for state, _ in pipe.denoise(condition, [4], options)]
        positive, negative = pipe.prior.condition_latents(condition, [seeded(4)])
        embeds = torch.cat([pipe.prior.empty_prompt_embeds(), pipe.prior.prompt_embeds(condition)])
    for state, estimate in zip(states, estimates):
        torch.testing.assert_close(state.x0, estimate, atol=1e-5, rtol=1e-5)  # the scheduler's own x0
    sample, t, seen_embeds, cond, v = calls[0]
    sigma = sigmas[0]
    v_negative, v_positive = v.chunk(2)
    guided = v_negative + 3.0 * (v_positive - v_negative)
    latents = sample[:1] * (sigma ** 2 + 1) ** 0.5  # the model input is the scaled latents, twice
    torch.testing.assert_close(sample[:1], sample[1:])
    expected_x0 = guided * (-sigma / (sigma ** 2 + 1) ** 0.5) + latents / (sigma ** 2 + 1)
    torch.testing.assert_close(estimates[0], expected_x0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(seen_embeds, embeds)  # negative branch first: the empty prompt alone
    generator = seeded(4)
    for shape in ((4, 8, 8), (4, 8, 8), (4, 12, 8)):  # the seed's earlier draws: condition latents, initial noise
        torch.randn(shape, generator=generator)
    eps = torch.randn((2, 4, 8, 8), generator=generator)  # this step's condition noise: negative, positive
    expected = (torch.cat([negative, positive]) + sigma * eps) / (sigma ** 2 + 1) ** 0.5
    torch.testing.assert_close(cond, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(t, torch.full((2,), float(pipe.prior.scheduler().config.num_train_timesteps - 1)))
