"""Zero123++ v1.2 (Shi et al. 2023; ``sudo-ai/zero123plus-v1.2``): one image in, six views of the object out,
tiled 3 rows x 2 columns. Loaded from its diffusers folder layout with stock diffusers/transformers classes; its
custom pipeline code never runs. What that pipeline adds to a stock SD2 UNet is rebuilt here from the published
facts:

* **reference attention**: each UNet call first runs the UNet on the condition latent (the input image's VAE
  latent, noised to the current step with its own seeded noise) with every self-attention (attn1) *writing* its
  input tokens; the sample's pass then lets every attn1 attend to its own tokens followed by the written ones
  (:class:`ReferenceAttnProcessor`). Cross-attention (attn2) is unchanged;
* **conditioning**: the empty prompt's text embeddings plus ``ramping_coefficients[:, None] * image_embeds`` of
  the CLIP vision encoder (the positive branch); the negative branch is the plain empty-prompt embeddings with
  the latent of a zero image; latents are scaled ``(z - 0.22) * 0.75`` and images ``x * 0.5 / 0.8`` around the
  VAE's own scaling;
* the scheduler is ``EulerAncestralDiscreteScheduler`` (v-prediction), with ``timestep_spacing="trailing"``.

InstantMesh's white-background fine-tune of the UNet (``TencentARC/InstantMesh``, ``diffusion_pytorch_model.bin``, a
plain state dict) can replace the UNet; it is read weights-only and strictly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..hub import CheckpointError, load_strict, read_json, read_state_dict, resolve_file, resolve_repo_files
from ..noise import Generators, randn_tensor
from .mvdream import load_stock

ZERO123PLUS_REPO = "sudo-ai/zero123plus-v1.2"
INSTANTMESH_UNET = "TencentARC/InstantMesh/diffusion_pytorch_model.bin"
LATENT_SHIFT, LATENT_SCALE = 0.22, 0.75  # latents: (z - 0.22) * 0.75
IMAGE_SCALE = 0.5 / 0.8  # images into the VAE: x * 0.5 / 0.8
GREY_BACKGROUND, WHITE_BACKGROUND = 127 / 255, 1.0  # behind the input: original UNet, InstantMesh's fine-tune
GRID_ROWS, GRID_COLUMNS = 3, 2  # the six views, row by row
PAD_TOKEN = "!"  # the published tokenizer's (SD2's)

_TOKENIZER = [("tokenizer/tokenizer_config.json",), ("tokenizer/vocab.json",), ("tokenizer/merges.txt",),
              ("tokenizer/special_tokens_map.json",)]
LAYOUT = [("model_index.json",), ("unet/config.json",),
          ("unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.bin"),
          ("vae/config.json",), ("vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.bin"),
          ("text_encoder/config.json",), ("text_encoder/model.safetensors", "text_encoder/pytorch_model.bin"),
          ("vision_encoder/config.json",), ("vision_encoder/model.safetensors", "vision_encoder/pytorch_model.bin"),
          ("feature_extractor_clip/preprocessor_config.json",), ("feature_extractor_vae/preprocessor_config.json",),
          *_TOKENIZER, ("scheduler/scheduler_config.json",)]


# ----------------------------------------------------------------------------- reference attention

class ReferenceBank:
    """What the condition pass wrote, per self-attention layer, for the sample pass to read."""

    def __init__(self):
        self.mode: str | None = None  # "write" (condition pass), "read" (sample pass), None (plain UNet)
        self.states: dict[str, torch.Tensor] = {}


class ReferenceAttnProcessor:
    """A self-attention (attn1) that, writing, stores its input tokens (B, L, C) and attends as usual; reading,
    attends to ``cat([own tokens, stored tokens], 1)`` (keys and values; queries stay its own). A read with nothing
    stored means the condition pass was skipped: an error, never a silent plain attention."""

    def __init__(self, bank: ReferenceBank, name: str):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.bank, self.name, self.plain = bank, name, AttnProcessor2_0()

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if self.bank.mode == "write":
            self.bank.states[self.name] = context
        elif self.bank.mode == "read":
            stored = self.bank.states.pop(self.name, None)
            if stored is None:
                raise RuntimeError(f"reference attention: no condition tokens for {self.name}; the condition pass "
                                   f"did not run before this sample pass")
            context = torch.cat([context, stored.to(context.dtype)], 1)  # (B, L + Lc, C)
        return self.plain(attn, hidden_states, context, attention_mask, temb)


def install_reference_attention(unet) -> ReferenceBank:
    """Every attn1 of ``unet`` becomes a :class:`ReferenceAttnProcessor` sharing one bank; attn2 stays plain."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    bank, plain = ReferenceBank(), AttnProcessor2_0()
    unet.set_attn_processor({name: ReferenceAttnProcessor(bank, name) if name.endswith("attn1.processor") else plain
                             for name in unet.attn_processors})
    return bank


# ----------------------------------------------------------------------------- the prior

@dataclass
class Zero123PlusParts:
    unet: torch.nn.Module  # diffusers UNet2DConditionModel with reference attention installed
    vae: torch.nn.Module  # diffusers AutoencoderKL
    text_encoder: torch.nn.Module  # transformers CLIPTextModel
    tokenizer: object  # transformers CLIPTokenizer
    vision_encoder: torch.nn.Module  # transformers CLIPVisionModelWithProjection
    clip_processor: object  # transformers CLIPImageProcessor (224 px, bicubic, CLIP statistics)
    vae_processor: object  # transformers CLIPImageProcessor (512 px, bilinear, mean 0.5, std 0.8)
    scheduler_config: dict  # EulerAncestralDiscreteScheduler, trailing spacing
    ramping: torch.Tensor  # (77,)
    source: str
    unet_source: str
    background: float  # grey level behind the input image: 127/255 (original UNet) or 1.0 (InstantMesh's)
    bank: ReferenceBank = field(default_factory=ReferenceBank)
    notes: list[str] = field(default_factory=list)

    def to(self, device: torch.device | str, dtype: torch.dtype) -> "Zero123PlusParts":
        """The UNet, text and vision encoders in ``dtype``; the VAE in float32 (its latents carry the 3D loop's
        renders back and forth: 84 M parameters, cheap to keep exact)."""
        for module in (self.unet, self.text_encoder, self.vision_encoder):
            module.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.vae.to(device=device, dtype=torch.float32).eval().requires_grad_(False)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def scheduler(self):
        from diffusers import EulerAncestralDiscreteScheduler

        return EulerAncestralDiscreteScheduler.from_config(self.scheduler_config)

    # ---- conditioning

    def empty_prompt_embeds(self) -> torch.Tensor:
        """(1, 77, D): the text encoder's last hidden state for the empty prompt (the negative branch)."""
        ids = self.tokenizer("", padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
                             return_tensors="pt").input_ids.to(self.device)
        return self.text_encoder(ids)[0]

    def prompt_embeds(self, image) -> torch.Tensor:
        """PIL RGB image -> (1, 77, D): empty-prompt embeddings + ramping coefficients x the image's CLIP embedding,
        the positive branch's cross-attention context."""
        pixels = self.clip_processor(images=image, return_tensors="pt").pixel_values
        image_embeds = self.vision_encoder(pixels.to(self.device, self.dtype)).image_embeds  # (1, D)
        ramp = self.ramping.to(self.device, image_embeds.dtype)[None, :, None]  # (1, 77, 1)
        return self.empty_prompt_embeds() + ramp * image_embeds[:, None, :]

    def condition_latents(self, image, generators: Generators) -> tuple[torch.Tensor, torch.Tensor]:
        """PIL RGB image -> (positive, negative) condition latents (B, 4, h, w), one row per generator: the VAE
        latent distributions of the image and of a zero image, sampled (no scaling factor, as the reference)."""
        pixels = self.vae_processor(images=image, return_tensors="pt").pixel_values.to(self.device, torch.float32)
        count = len(generators) if isinstance(generators, (list, tuple)) else 1
        latents = []
        for source in (pixels, torch.zeros_like(pixels)):
            dist = self.vae.encode(source).latent_dist  # mean, std (1, 4, h, w)
            noise = randn_tensor((count, *dist.mean.shape[1:]), generators, self.device)
            latents.append(dist.mean + dist.std * noise)
        return latents[0], latents[1]

    # ---- the UNet with reference attention

    def predict_v(self, sample: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor,
                  cond: torch.Tensor) -> torch.Tensor:
        """One branch, no guidance: the UNet's v for model input ``sample`` (B, 4, h, w) at timesteps ``t`` (B,),
        with the reference pass run first on ``cond`` (B, 4, hc, wc: the condition latent already noised and
        scaled to this step) under the same ``embeds`` (B, 77, D)."""
        dtype = self.dtype
        try:
            self.bank.states.clear()
            self.bank.mode = "write"
            self.unet(cond.to(dtype), t, encoder_hidden_states=embeds.to(dtype))
            self.bank.mode = "read"
            return self.unet(sample.to(dtype), t, encoder_hidden_states=embeds.to(dtype)).sample
        finally:
            self.bank.mode = None
            self.bank.states.clear()

    # ---- latents and images

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, 4, h, w) -> images (B, 3, 8h, 8w) in [0, 1]."""
        z = (latents.float() / LATENT_SCALE + LATENT_SHIFT) / self.vae.config.scaling_factor
        images = self.vae.decode(z).sample / IMAGE_SCALE
        return (images / 2 + 0.5).clamp(0, 1)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] -> scaled latents (B, 4, H/8, W/8), the distribution's mean (no noise)."""
        x = (images.float() * 2 - 1) * IMAGE_SCALE
        z = self.vae.encode(x.to(self.device)).latent_dist.mean * self.vae.config.scaling_factor
        return (z - LATENT_SHIFT) * LATENT_SCALE


def split_views(grid: torch.Tensor) -> torch.Tensor:
    """Tiled images (B, 3, 3s, 2s) -> the six views (B, 6, 3, s, s), row by row."""
    b, c, height, width = grid.shape
    s = height // GRID_ROWS
    views = grid.reshape(b, c, GRID_ROWS, s, GRID_COLUMNS, s).permute(0, 2, 4, 1, 3, 5)  # (B, 3, 2, C, s, s)
    return views.reshape(b, GRID_ROWS * GRID_COLUMNS, c, s, s)


def tile_views(views: torch.Tensor) -> torch.Tensor:
    """The six views (B, 6, 3, s, s) -> tiled images (B, 3, 3s, 2s), the inverse of :func:`split_views`."""
    b, _, c, s, _ = views.shape
    grid = views.reshape(b, GRID_ROWS, GRID_COLUMNS, c, s, s).permute(0, 3, 1, 4, 2, 5)  # (B, C, 3, s, 2, s)
    return grid.reshape(b, c, GRID_ROWS * s, GRID_COLUMNS * s)


# ----------------------------------------------------------------------------- loading

def load_zero123plus(diffusion: str | Path = ZERO123PLUS_REPO, unet: str | Path | None = None,
                     revision: str | None = None, offline: bool | None = None) -> Zero123PlusParts:
    """Zero123++ from a Hub repo id or a local folder in its diffusers layout; ``unet``: a replacement UNet state
    dict (a local file or ``owner/repo/file``, e.g. InstantMesh's fine-tune), weights-only and strict."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPImageProcessorPil, CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

    source = str(diffusion)
    root = resolve_repo_files(diffusion, LAYOUT, revision, offline, "Zero123++ in its diffusers layout")
    index = read_json(root / "model_index.json", source)
    ramping = index.get("ramping_coefficients")
    if not isinstance(ramping, list) or len(ramping) != 77:
        raise CheckpointError(f"{source}: model_index.json needs 77 ramping_coefficients (found "
                              f"{len(ramping) if isinstance(ramping, list) else 'none'})")
    if unet is None:
        model, unet_source = load_stock(UNet2DConditionModel, root / "unet", source, "UNet"), source
        background = GREY_BACKGROUND
    else:
        model, unet_source = _replacement_unet(root, unet, source, offline), str(unet)
        background = WHITE_BACKGROUND
    bank = install_reference_attention(model)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(root / "tokenizer"))
        # transformers' PIL implementation of CLIPImageProcessor (the default one needs torchvision)
        clip_processor = CLIPImageProcessorPil.from_pretrained(str(root / "feature_extractor_clip"))
        vae_processor = CLIPImageProcessorPil.from_pretrained(str(root / "feature_extractor_vae"))
    except Exception as exc:
        raise CheckpointError(f"{source}: cannot load the tokenizer or image processors ({type(exc).__name__}: "
                              f"{exc})") from None
    if tokenizer.pad_token != PAD_TOKEN:  # SD2's tokenizers pad with "!": another pad changes 75 of 77 embeddings
        raise CheckpointError(f"{source}: the tokenizer pads with {tokenizer.pad_token!r}, Zero123++'s pads with "
                              f"{PAD_TOKEN!r}; is tokenizer/special_tokens_map.json missing?")
    scheduler_config = read_json(root / "scheduler" / "scheduler_config.json", source)
    return Zero123PlusParts(
        model.eval(), load_stock(AutoencoderKL, root / "vae", source, "VAE").eval(),
        load_stock(CLIPTextModel, root / "text_encoder", source, "text encoder").eval(), tokenizer,
        load_stock(CLIPVisionModelWithProjection, root / "vision_encoder", source, "vision encoder").eval(),
        clip_processor, vae_processor, trailing(scheduler_config), torch.tensor(ramping, dtype=torch.float32),
        source, unet_source, background, bank)


def trailing(scheduler_config: dict) -> dict:
    """The published scheduler config with InstantMesh's and the README's ``timestep_spacing="trailing"`` (the
    stored config says "linspace", which never reaches the last, noisiest training step)."""
    config = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    return {**config, "timestep_spacing": "trailing"}


def _replacement_unet(root: Path, unet: str | Path, source: str, offline: bool | None):
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    path, unet_source = resolve_file(unet, None, offline, expected="a UNet state dict")
    with init_empty_weights():
        model = UNet2DConditionModel.from_config(read_json(root / "unet" / "config.json", source))
    state = read_state_dict(path)
    load_strict(model, state.get("state_dict", state), unet_source)
    return model


# ----------------------------------------------------------------------------- random parts

# The published components' sizes (sudo-ai/zero123plus-v1.2; parameter counts 865,910,724 / 83,653,863 /
# 340,387,840 / 632,076,800, checked in the tests): for benchmarks with random weights.
PUBLISHED_UNET = dict(sample_size=96, in_channels=4, out_channels=4, layers_per_block=2,
                      block_out_channels=[320, 640, 1280, 1280], attention_head_dim=[5, 10, 20, 20],
                      cross_attention_dim=1024, use_linear_projection=True,
                      down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                      up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
PUBLISHED_TEXT = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                      projection_dim=1024)  # OpenCLIP ViT-H's text tower, as SD2's
PUBLISHED_VISION = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                        image_size=224, patch_size=14, projection_dim=1024)  # CLIP ViT-H/14
PUBLISHED_SIZES = {"clip": 224, "vae": 512}  # the image processors' input sizes
TINY_UNET = dict(PUBLISHED_UNET, sample_size=16, layers_per_block=1, block_out_channels=[32, 32, 32, 32],
                 attention_head_dim=[2, 2, 2, 2], cross_attention_dim=32)
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, projection_dim=32)
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                   patch_size=8, projection_dim=32)
TINY_SIZES = {"clip": 32, "vae": 64}
PUBLISHED_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="linear",
                           prediction_type="v_prediction", steps_offset=1, timestep_spacing="linspace")
TINY_VIEW_SIZE = 32  # tiny pipelines make 32 px views (a 96 x 64 grid)


def random_zero123plus_parts(seed: int = 0, tokenizer_folder=None, published: bool = False) -> Zero123PlusParts:
    """Zero123++ with random weights (every draw from one seeded generator): a tiny one (the published structure
    at a fraction of the width) for tests and the --random-weights demo, or the published sizes (``published``)
    for benchmarks."""
    import tempfile

    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import (CLIPImageProcessorPil, CLIPTextConfig, CLIPTextModel, CLIPVisionConfig,
                              CLIPVisionModelWithProjection)

    from ..noise import seeded
    from .mvdream import SD_VAE_CONFIG, TINY_VAE_CONFIG, tiny_tokenizer
    from .random_init import randomize_

    unet_config, vae_config, text, vision, sizes = ((PUBLISHED_UNET, SD_VAE_CONFIG, PUBLISHED_TEXT, PUBLISHED_VISION,
                                                     PUBLISHED_SIZES) if published else
                                                    (TINY_UNET, TINY_VAE_CONFIG, TINY_TEXT, TINY_VISION, TINY_SIZES))
    generator = seeded(seed)
    tokenizer = tiny_tokenizer(tokenizer_folder or tempfile.mkdtemp(prefix="recon3d-tokenizer-"))
    text_config = CLIPTextConfig(vocab_size=len(tokenizer), max_position_embeddings=77, **text,
                                 bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)
    with init_empty_weights():
        modules = (UNet2DConditionModel(**unet_config), AutoencoderKL(**vae_config), CLIPTextModel(text_config),
                   CLIPVisionModelWithProjection(CLIPVisionConfig(**vision)))
    unet, vae, text_encoder, vision_encoder = (randomize_(module, generator).eval() for module in modules)
    clip_processor = CLIPImageProcessorPil(size={"shortest_edge": sizes["clip"]}, resample=3,  # bicubic, CLIP stats
                                           crop_size={"height": sizes["clip"], "width": sizes["clip"]})
    vae_processor = CLIPImageProcessorPil(size={"shortest_edge": sizes["vae"]}, resample=2,  # bilinear
                                          crop_size={"height": sizes["vae"], "width": sizes["vae"]},
                                          image_mean=[0.5] * 3, image_std=[0.8] * 3)
    ramping = randn_tensor((77,), generator).abs() / 2
    bank = install_reference_attention(unet)
    name = f"random weights (seed {seed})"
    return Zero123PlusParts(unet, vae, text_encoder, tokenizer, vision_encoder, clip_processor, vae_processor,
                            trailing(PUBLISHED_SCHEDULER), ramping, name, name, WHITE_BACKGROUND, bank)


def model_index(ramping: torch.Tensor) -> dict:
    """``model_index.json`` as the published repo holds it (class names and the 77 ramping coefficients)."""
    return {"_class_name": ["pipeline", "Zero123PlusPipeline"], "_diffusers_version": "0.20.2",
            "feature_extractor_clip": ["transformers", "CLIPImageProcessor"],
            "feature_extractor_vae": ["transformers", "CLIPImageProcessor"],
            "ramping_coefficients": [float(v) for v in ramping], "safety_checker": [None, None],
            "scheduler": ["diffusers", "EulerAncestralDiscreteScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
            "vision_encoder": ["transformers", "CLIPVisionModelWithProjection"]}


__all__ = ["INSTANTMESH_UNET", "ZERO123PLUS_REPO", "ReferenceAttnProcessor", "Zero123PlusParts", "load_zero123plus",
           "random_zero123plus_parts", "split_views", "tile_views"]
