"""MVDream's multi-view UNet as a stock diffusers ``UNet2DConditionModel`` plus one attention processor.

MVDream (Shi et al., ICLR 2024) fine-tunes Stable Diffusion 2.1-base to denoise the 4 views of one object at
once. Its UNet is SD 2.1-base's with two changes, both expressible without custom model code:

- a camera MLP (16 -> 1280 -> 1280) whose output is added to the time embedding: diffusers'
  ``class_embed_type="projection"``, the camera going in as ``class_labels`` (c2w flattened row-major);
- self-attention across the views: every ``attn1`` sees the tokens of all views of an object
  (:class:`MultiViewAttnProcessor`); cross-attention to the text stays per view.

The published weights keep the original LDM tensor names; :func:`ldm_to_diffusers_names` maps them through
diffusers' own LDM -> diffusers converter and checks that every published tensor is used exactly once. The model
is built on the meta device, so no memory is spent on weights that are then overwritten.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import torch

from ..hub import CheckpointError, compare_state_dict

if TYPE_CHECKING:  # diffusers is imported when a model is built, not when this module is
    from diffusers import UNet2DConditionModel

NUM_VIEWS = 4
LDM_UNET_PREFIX = "model.diffusion_model."
LDM_VAE_PREFIX = "first_stage_model."
# keys of the published unet/config.json that only describe the original implementation
_IGNORED_CONFIG_KEYS = {"_class_name", "_diffusers_version", "use_checkpoint", "_name_or_path"}


@dataclass
class MultiViewUNetConfig:
    """The published ``unet/config.json`` (MVDream's own names; SD 2.1-base values by default)."""

    image_size: int = 32
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    attention_resolutions: list[int] = field(default_factory=lambda: [4, 2, 1])
    num_res_blocks: int = 2
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    num_head_channels: int = 64
    transformer_depth: int = 1
    context_dim: int = 1024
    camera_dim: int = 16

    @classmethod
    def from_dict(cls, config: dict, source: str) -> "MultiViewUNetConfig":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(config) - known - _IGNORED_CONFIG_KEYS)
        if unknown:
            raise CheckpointError(f"{source}: unet/config.json has settings this MVDream UNet does not support: "
                                  f"{', '.join(unknown)}")
        made = cls(**{k: v for k, v in config.items() if k in known})
        for width in made.widths():
            if width % made.num_head_channels or width % 32:
                raise CheckpointError(f"{source}: unet/config.json: block width {width} must be a multiple of "
                                      f"num_head_channels ({made.num_head_channels}) and of 32 (group norm)")
        return made

    def to_dict(self) -> dict:
        return {"_class_name": "MultiViewUNetModel", **asdict(self)}

    def widths(self) -> list[int]:
        return [self.model_channels * m for m in self.channel_mult]

    def diffusers_config(self) -> dict:
        """The same network as ``UNet2DConditionModel`` keyword arguments."""
        has_attention = [2 ** level in self.attention_resolutions for level in range(len(self.channel_mult))]
        return dict(
            sample_size=self.image_size, in_channels=self.in_channels, out_channels=self.out_channels,
            down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in has_attention],
            up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attention)],
            block_out_channels=self.widths(), layers_per_block=self.num_res_blocks,
            attention_head_dim=[w // self.num_head_channels for w in self.widths()],  # (diffusers: head count)
            cross_attention_dim=self.context_dim, transformer_layers_per_block=self.transformer_depth,
            use_linear_projection=True, flip_sin_to_cos=True, freq_shift=0, norm_num_groups=32,
            class_embed_type="projection", projection_class_embeddings_input_dim=self.camera_dim,
        )


class MultiViewAttnProcessor:
    """Self-attention over the tokens of all ``num_views`` views of an object at once.

    Hidden states arrive as (B * V, L, C) with the V views of an object adjacent; they are attended as
    (B, V * L, C) and split back, so every view sees every other. Cross-attention (text) is left per view.
    """

    def __init__(self, num_views: int = NUM_VIEWS):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.num_views, self.per_view = num_views, AttnProcessor2_0()

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs):
        views = self.num_views
        if views == 1 or encoder_hidden_states is not None or hidden_states.dim() != 3:
            return self.per_view(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        batch_views, tokens, channels = hidden_states.shape
        if batch_views % views:
            raise ValueError(f"a batch of {batch_views} images is not whole groups of {views} views")
        joint = hidden_states.reshape(batch_views // views, views * tokens, channels)  # (B, V*L, C)
        out = self.per_view(attn, joint, None, attention_mask, temb)
        return out.reshape(batch_views, tokens, channels)


def install_multiview_attention(unet: "UNet2DConditionModel", num_views: int = NUM_VIEWS) -> None:
    """Make every self-attention of ``unet`` attend across ``num_views`` views (one processor, shared)."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    multiview, plain = MultiViewAttnProcessor(num_views), AttnProcessor2_0()
    unet.set_attn_processor({name: multiview if name.endswith("attn1.processor") else plain
                             for name in unet.attn_processors})


def build_unet(config: MultiViewUNetConfig, num_views: int = NUM_VIEWS, empty: bool = True) -> "UNet2DConditionModel":
    """The UNet for ``config`` with the multi-view processor installed; ``empty`` builds it without allocating
    weights (accelerate's ``init_empty_weights``), ready for ``load_state_dict(..., assign=True)``."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    if empty:
        with init_empty_weights():
            unet = UNet2DConditionModel(**config.diffusers_config())
    else:
        unet = UNet2DConditionModel(**config.diffusers_config())
    install_multiview_attention(unet, num_views)
    return unet


def ldm_to_diffusers_names(ldm_names: list[str], config: MultiViewUNetConfig, source: str = "checkpoint") -> dict[str, str]:
    """{diffusers name: published name} for the published UNet tensor names (no ``model.diffusion_model.``).

    The camera MLP ``camera_embed.{0,2}`` is renamed to LDM's class-label MLP ``label_emb.0.{0,2}``; diffusers'
    converter does the rest. It silently skips names it does not know, so the result is checked: every
    published name must be used exactly once.
    """
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    def ldm_name(name: str) -> str:
        return LDM_UNET_PREFIX + ("label_emb.0." + name[len("camera_embed."):] if name.startswith("camera_embed.")
                                  else name)

    by_ldm = {ldm_name(name): name for name in ldm_names}
    mapping = convert_ldm_unet_checkpoint(by_ldm, config.diffusers_config())  # values pass through unchanged
    used = list(mapping.values())
    unused = sorted(set(ldm_names) - set(used))
    twice = sorted({name for name in used if used.count(name) > 1})
    if unused or twice:
        listed = ", ".join((unused + twice)[:5])
        raise CheckpointError(f"{source}: {len(unused)} UNet tensors have no place in the model and {len(twice)} "
                              f"would be used twice ({listed})")
    return mapping


def diffusers_to_ldm_names(ldm_names: list[str], config: MultiViewUNetConfig) -> dict[str, str]:
    """The inverse: {published name: diffusers name}, for writing a model in the published layout."""
    return {ldm: diffusers for diffusers, ldm in ldm_to_diffusers_names(ldm_names, config).items()}


def load_unet(config: MultiViewUNetConfig, published: dict[str, torch.Tensor], source: str,
              num_views: int = NUM_VIEWS) -> "UNet2DConditionModel":
    """Build the UNet on the meta device and give it the published tensors, strictly (names and shapes)."""
    unet = build_unet(config, num_views, empty=True)
    mapping = ldm_to_diffusers_names(list(published), config, source)
    state = {diffusers: published[ldm] for diffusers, ldm in mapping.items()}
    expected = {name: tuple(t.shape) for name, t in unet.state_dict().items()}
    report = compare_state_dict(expected, state)
    if not report.ok:
        raise CheckpointError(f"{source}: the UNet weights do not match its config: {report.summary()}")
    unet.load_state_dict(state, strict=True, assign=True)
    return unet


def camera_condition(c2w: torch.Tensor) -> torch.Tensor:
    """MVDream's camera code: c2w (..., 4, 4) in recon3d's convention (z up, OpenGL camera axes, azimuth 0 on
    -y; the same frame MVDream trained in) with the position normalised to unit length, flattened row-major
    -> (..., 16)."""
    c2w = c2w.float().clone()
    c2w[..., :3, 3] = torch.nn.functional.normalize(c2w[..., :3, 3], dim=-1)
    return c2w.flatten(-2)


# ---- the other parts: stock classes, loaded from a diffusers layout ----------------------------------------------

DIFFUSERS_REPO = "ashawkey/mvdream-sd2.1-diffusers"
ORIGINAL_REPO, ORIGINAL_FILE = "MVDream/MVDream", "sd-v2.1-base-4view.pt"
_TOKENIZER_FILES = [("tokenizer/tokenizer_config.json",), ("tokenizer/vocab.json",), ("tokenizer/merges.txt",),
                    ("tokenizer/special_tokens_map.json",)]
TEXT_LAYOUT = [("text_encoder/config.json",), ("text_encoder/model.safetensors", "text_encoder/pytorch_model.bin"),
               *_TOKENIZER_FILES, ("scheduler/scheduler_config.json",)]
DIFFUSERS_LAYOUT = [("model_index.json",), ("unet/config.json",),
                    ("unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.bin"),
                    ("vae/config.json",), ("vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.bin"),
                    *TEXT_LAYOUT]
# Stable Diffusion 2.1-base's VAE (the original single file's first_stage_model)
SD_VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=256,
                     block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                     up_block_types=["UpDecoderBlock2D"] * 4, scaling_factor=0.18215)


@dataclass
class MVDreamParts:
    """Everything MVDream needs: the multi-view UNet and SD 2.1's stock VAE, text encoder, tokenizer, scheduler."""

    unet: "UNet2DConditionModel"
    vae: torch.nn.Module  # diffusers AutoencoderKL
    text_encoder: torch.nn.Module  # transformers CLIPTextModel (SD 2.1's OpenCLIP ViT-H, penultimate layer)
    tokenizer: object  # transformers CLIPTokenizer
    scheduler: object  # diffusers DDIMScheduler
    source: str
    unet_config: MultiViewUNetConfig = field(default_factory=MultiViewUNetConfig)
    notes: list[str] = field(default_factory=list)  # what the user should know (e.g. a part taken elsewhere)
    encoder_size: int = 256  # renders are resized to this before the VAE encoder (MVDream's 256 px)

    def to(self, device: torch.device | str, dtype: torch.dtype) -> "MVDreamParts":
        """The UNet and text encoder in ``dtype``; the VAE always in float32: score distillation differentiates
        through its encoder, and a half-precision backward there overflows (83.7 M parameters: cheap to keep)."""
        for module in (self.unet, self.text_encoder):
            module.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.vae.to(device=device, dtype=torch.float32).eval().requires_grad_(False)
        return self


def _first_file(folder, names: tuple[str, ...]):
    return next(folder / name for name in names if (folder / name).is_file())


def load_stock(cls, folder, source: str, what: str):
    """A stock diffusers/transformers model from a local subfolder, strictly: missing, unexpected or mis-shaped
    weights are refused with a report."""
    try:
        model, info = cls.from_pretrained(str(folder), output_loading_info=True)
    except Exception as exc:
        raise CheckpointError(f"{source}: cannot load the {what} ({type(exc).__name__}: {exc})") from None
    bad = [*info.get("missing_keys", []), *info.get("unexpected_keys", []),
           *(str(m[0]) if isinstance(m, tuple) else str(m) for m in info.get("mismatched_keys", []))]
    if bad:
        raise CheckpointError(f"{source}: the {what} weights do not match its config: {len(bad)} missing, "
                              f"unexpected or mis-shaped ({', '.join(sorted(map(str, bad))[:5])})")
    return model


def load_text_parts(root, source: str) -> tuple[torch.nn.Module, object, object]:
    """Text encoder, tokenizer and DDIM scheduler from a diffusers layout's subfolders."""
    from diffusers import DDIMScheduler
    from transformers import CLIPTextModel, CLIPTokenizer

    text_encoder = load_stock(CLIPTextModel, root / "text_encoder", source, "text encoder")
    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(root / "tokenizer"))
        scheduler = DDIMScheduler.from_pretrained(str(root / "scheduler"))
    except Exception as exc:
        raise CheckpointError(f"{source}: cannot load the tokenizer or scheduler ({type(exc).__name__}: {exc})") from None
    return text_encoder, tokenizer, scheduler


def load_diffusers_layout(root, source: str, num_views: int = NUM_VIEWS) -> MVDreamParts:
    """``ashawkey/mvdream-sd2.1-diffusers``'s layout, without executing its remote code: the UNet is rebuilt from
    its config as a stock UNet plus :class:`MultiViewAttnProcessor` and given the published tensors."""
    from diffusers import AutoencoderKL

    from ..hub import read_json, read_state_dict

    config = MultiViewUNetConfig.from_dict(read_json(root / "unet" / "config.json", source), source)
    published = read_state_dict(_first_file(root, DIFFUSERS_LAYOUT[2]))
    unet = load_unet(config, published, source, num_views)
    vae = load_stock(AutoencoderKL, root / "vae", source, "VAE")
    return MVDreamParts(unet, vae, *load_text_parts(root, source), source, config)


def load_original_file(path, source: str, text_parts: tuple, text_source: str, num_views: int = NUM_VIEWS,
                       unet_config: MultiViewUNetConfig | None = None, vae_config: dict | None = None) -> MVDreamParts:
    """MVDream's original single file (``sd-v2.1-base-4view.pt``, SD 2.1-base configs unless given): its UNet and
    VAE are converted; its OpenCLIP text encoder is not (the same weights ship converted in the diffusers layout,
    whose text parts are used)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    from ..hub import load_strict, read_state_dict

    state = read_state_dict(path)
    state = state.get("state_dict", state)
    published = {k[len(LDM_UNET_PREFIX):]: v for k, v in state.items() if k.startswith(LDM_UNET_PREFIX)}
    if not published:
        raise CheckpointError(f"{source}: no UNet tensors (model.diffusion_model.*) in {path.name}")
    unet_config, vae_config = unet_config or MultiViewUNetConfig(), vae_config or SD_VAE_CONFIG
    unet = load_unet(unet_config, published, source, num_views)
    vae_tensors = {k: v for k, v in state.items() if k.startswith(LDM_VAE_PREFIX)}
    vae_state = convert_ldm_vae_checkpoint(vae_tensors, vae_config)
    if len(vae_state) != len(vae_tensors):
        raise CheckpointError(f"{source}: {len(vae_tensors) - len(vae_state)} VAE tensors have no place in the VAE")
    with init_empty_weights():
        vae = AutoencoderKL(**vae_config)
    load_strict(vae, vae_state, source)
    note = f"the text encoder, tokenizer and scheduler come from {text_source} (the original file's OpenCLIP text encoder is not converted)"
    return MVDreamParts(unet, vae, *text_parts, source, unet_config, [note])


def load_parts(repo_or_folder: str, revision: str | None = None, offline: bool | None = None,
               text_from: str = DIFFUSERS_REPO, num_views: int = NUM_VIEWS, **original_configs) -> MVDreamParts:
    """MVDream from a Hub repo id or a local folder in either layout (diffusers, or the original single file;
    a path to the .pt file itself also works; ``original_configs``: ``unet_config``/``vae_config`` of a
    single file that is not SD 2.1-base sized). Strict: every published UNet tensor is used once."""
    from pathlib import Path

    from ..hub import resolve_repo_files

    path = Path(repo_or_folder).expanduser()
    if path.is_file() or (path.is_dir() and (path / ORIGINAL_FILE).is_file()) or str(repo_or_folder) == ORIGINAL_REPO:
        file = path if path.is_file() else resolve_repo_files(repo_or_folder, [(ORIGINAL_FILE,)], revision, offline,
                                                              "MVDream's original checkpoint") / ORIGINAL_FILE
        text_root = resolve_repo_files(text_from, TEXT_LAYOUT, None, offline, "a diffusers text encoder")
        return load_original_file(file, str(repo_or_folder), load_text_parts(text_root, text_from), text_from,
                                  num_views, **original_configs)
    root = resolve_repo_files(repo_or_folder, DIFFUSERS_LAYOUT, revision, offline, "MVDream in the diffusers layout")
    return load_diffusers_layout(root, str(repo_or_folder), num_views)


# ---- tiny random MVDream: tests, benchmarks of the machinery, the --random-weights demo --------------------------

# The published structure (4 levels, attention on the first 3, 2 blocks each) at a fraction of the width, so its
# tensor names are exactly the published ones.
TINY_UNET_CONFIG = MultiViewUNetConfig(image_size=32, model_channels=32, num_head_channels=16, context_dim=32)
TINY_VAE_CONFIG = dict(SD_VAE_CONFIG, block_out_channels=[32, 32, 32, 32], layers_per_block=1, sample_size=64)
SD_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                           prediction_type="epsilon", steps_offset=1, clip_sample=False, set_alpha_to_one=False)


def byte_characters() -> list[str]:
    """The 256 printable stand-ins of byte-level BPE (one per byte, as CLIP's tokenizer maps them)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), ord("\u00ff") + 1)]
    spare = iter(range(256, 512))
    return [chr(b) if b in kept else chr(next(spare)) for b in range(256)]


def tiny_tokenizer(folder) -> object:
    """A CLIP tokenizer without merges (every character a token, 514 ids), written to ``folder`` and loaded."""
    import json
    from pathlib import Path

    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = byte_characters()
    vocab = [*chars, *(c + "</w>" for c in chars), "<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="!", model_max_length=77)


def random_parts(seed: int = 0, unet_config: MultiViewUNetConfig = TINY_UNET_CONFIG, vae_config: dict | None = None,
                 tokenizer_folder=None, num_views: int = NUM_VIEWS) -> MVDreamParts:
    """MVDream with random weights (every draw from one seeded generator): a tiny one by default; the published
    configs (``MultiViewUNetConfig()``, ``SD_VAE_CONFIG``) for benchmarks."""
    import tempfile

    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, DDIMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel

    from ..noise import seeded
    from .random_init import randomize_

    generator = seeded(seed)
    unet = randomize_(build_unet(unet_config, num_views, empty=True), generator)
    with init_empty_weights():
        vae = AutoencoderKL(**(vae_config or TINY_VAE_CONFIG))
    vae = randomize_(vae, generator)
    tokenizer = tiny_tokenizer(tokenizer_folder or tempfile.mkdtemp(prefix="recon3d-tokenizer-"))
    text_config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=unet_config.context_dim,
                                 intermediate_size=2 * unet_config.context_dim, num_hidden_layers=2,
                                 num_attention_heads=2, max_position_embeddings=77, hidden_act="gelu",
                                 bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id, projection_dim=unet_config.context_dim)
    with init_empty_weights():
        text_encoder = CLIPTextModel(text_config)
    text_encoder = randomize_(text_encoder, generator)
    # the tiny VAE encodes 64 px (its latents 8 x 8, as the tiny UNet's 32 px config): tests stay fast
    encoder_size = 64 if unet_config == TINY_UNET_CONFIG else 256
    return MVDreamParts(unet.eval(), vae.eval(), text_encoder.eval(), tokenizer, DDIMScheduler(**SD_SCHEDULER_CONFIG),
                        f"random weights (seed {seed})", unet_config, encoder_size=encoder_size)
