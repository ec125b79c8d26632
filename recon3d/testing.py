"""Scaffolding for tests and offline mirrors: tiny checkpoints written in the exact layouts the Hub serves.

Nothing here is used by the app or the CLI; it lives in the package so that tests, benchmarks and anyone
preparing an offline cache write these layouts one way.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .models.mvdream import MVDreamParts, diffusers_to_ldm_names

DEFAULT_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def place_in_hub_cache(folder: str | Path, repo_id: str, cache: str | Path, commit: str = DEFAULT_COMMIT) -> Path:
    """Copy a checkpoint folder into a Hugging Face cache (``HF_HUB_CACHE``) as the snapshot of ``repo_id`` at
    ``commit`` on ``main``, so that the repo id resolves offline; the snapshot folder."""
    repo_dir = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    shutil.copytree(folder, snapshot, dirs_exist_ok=True)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return snapshot


def write_diffusers_layout(parts: MVDreamParts, folder: str | Path, ldm_names: list[str]) -> Path:
    """Write ``parts`` in ``ashawkey/mvdream-sd2.1-diffusers``'s exact layout (UNet under the published names
    ``ldm_names``, config in MVDream's own keys), as tests and offline mirrors need it."""
    from safetensors.torch import save_file

    folder = Path(folder)
    (folder / "unet").mkdir(parents=True, exist_ok=True)
    index = {"_class_name": "MVDreamPipeline", "unet": ["mv_unet", "MultiViewUNetModel"],
             "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDIMScheduler"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    (folder / "unet" / "config.json").write_text(json.dumps(parts.unet_config.to_dict(), indent=2))
    state = parts.unet.state_dict()
    names = diffusers_to_ldm_names(ldm_names, parts.unet_config)
    save_file({ldm: state[name].detach().contiguous() for ldm, name in names.items()},
              str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    parts.vae.save_pretrained(str(folder / "vae"))
    parts.text_encoder.save_pretrained(str(folder / "text_encoder"))
    _write_tokenizer(parts.tokenizer, folder / "tokenizer")
    parts.scheduler.save_pretrained(str(folder / "scheduler"))
    return folder


def _write_tokenizer(tokenizer, folder: Path) -> None:
    """The tokenizer files SD 2.1 repos hold: vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json."""
    tokenizer.save_pretrained(str(folder))
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"].get("merges", [])
    (folder / "vocab.json").write_text(json.dumps(tokenizer.get_vocab()))
    lines = [m if isinstance(m, str) else " ".join(m) for m in merges]
    (folder / "merges.txt").write_text("\n".join(["#version: 0.2", *lines]) + "\n")
    special = {k: getattr(tokenizer, k) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))


def write_instant_nerf_checkpoint(model, path: str | Path, training_extras: int = 2) -> Path:
    """Save an :class:`~recon3d.models.instant_nerf.InstantNeRF` as InstantMesh publishes its NeRF checkpoints: a
    torch pickle ``{'state_dict': {'lrm_generator.<name>': tensor, ...}}`` plus ``training_extras`` entries
    that are not the model's (the published files carry e.g. ``lpips.*``)."""
    import torch

    from .models.instant_nerf import STATE_DICT_PREFIX

    state = {STATE_DICT_PREFIX + k: v.detach().contiguous() for k, v in model.state_dict().items()}
    state.update({f"lpips.net.slice{i}.weight": torch.zeros(2, 2) for i in range(training_extras)})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state}, path)
    return path


def write_zero123plus_layout(parts, folder: str | Path) -> Path:
    """Write :class:`~recon3d.models.zero123plus.Zero123PlusParts` in ``sudo-ai/zero123plus-v1.2``'s layout:
    model_index.json (with the ramping coefficients), unet/, vae/, text_encoder/, tokenizer/, vision_encoder/,
    feature_extractor_clip/, feature_extractor_vae/ and scheduler/ (the published config, "linspace" as stored)."""
    from diffusers import EulerAncestralDiscreteScheduler

    from .models.zero123plus import PUBLISHED_SCHEDULER, model_index

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps(model_index(parts.ramping), indent=2))
    for name in ("unet", "vae", "text_encoder", "vision_encoder"):
        getattr(parts, name).save_pretrained(str(folder / name))
    _write_tokenizer(parts.tokenizer, folder / "tokenizer")
    for name, processor in (("feature_extractor_clip", parts.clip_processor),
                            ("feature_extractor_vae", parts.vae_processor)):
        processor.save_pretrained(str(folder / name))
        config_path = folder / name / "preprocessor_config.json"
        config = json.loads(config_path.read_text())
        config.update(image_processor_type="CLIPImageProcessor", feature_extractor_type="CLIPFeatureExtractor")
        config_path.write_text(json.dumps(config, indent=2))  # the published class names
    EulerAncestralDiscreteScheduler(**PUBLISHED_SCHEDULER).save_pretrained(str(folder / "scheduler"))
    return folder


def write_unet_state_dict(unet, path: str | Path) -> Path:
    """A UNet as InstantMesh publishes its fine-tune: a plain state dict in a torch pickle."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().contiguous() for k, v in unet.state_dict().items()}, path)
    return path
