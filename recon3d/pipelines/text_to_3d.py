"""Text to 3D: MVDream's 4-view prior, a quick look at what it imagines, and score distillation into a mesh.

    pipe = TextTo3D.from_pretrained("ashawkey/mvdream-sd2.1-diffusers", device=gpu, dtype=torch.float16)
    for event in pipe.sample_views("a wooden chair", generator=torch.Generator().manual_seed(0)):  # quick look
        ...
    for event in pipe.generate("a wooden chair", preset="fast", seed=0):  # SDS; the last event holds the GLB
        ...
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

import torch

from ..cameras import orbit_camera
from ..cancel import NEVER, CancelToken
from ..images import views_grid
from ..mesh import EmptyMeshError, Mesh, MeshSettings, extract_mesh
from ..models.mvdream import MVDreamParts, camera_condition, load_parts, random_parts
from .progress import Progress
from .sds import PRESETS, SDSControl, SDSOptions, SDSState, optimise

PROMPT_SUFFIX = ", 3d asset"  # MVDream's plain sampling appends it
METHOD = "MVDream SDS"


@dataclass
class PromptEmbeddings:
    text: torch.Tensor  # (1, L, D) the prompt
    plain: torch.Tensor  # (1, L, D) the negative prompt ("" when none)
    truncated: bool  # the prompt was longer than the tokenizer takes and was cut


class MVDreamPrior:
    """MVDream as SDS's :class:`~recon3d.pipelines.sds.MultiViewPrior`: VAE encoder + multi-view UNet with the
    text and negative-prompt embeddings. Computes in the parts' dtype; hands float32 back."""

    encoder_size = 256

    def __init__(self, parts: MVDreamParts, prompt: PromptEmbeddings):
        self.parts, self.prompt = parts, prompt
        self.alphas_cumprod = parts.scheduler.alphas_cumprod.float()

    @property
    def _dtype(self) -> torch.dtype:
        return next(self.parts.unet.parameters()).dtype

    def encode(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        vae = self.parts.vae
        posterior = vae.encode((images * 2 - 1).to(self._dtype)).latent_dist  # (B, 4, S/8, S/8)
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator).to(
            posterior.mean.device, posterior.mean.dtype)
        return latents.float() * vae.config.scaling_factor

    def predict_noise(self, noisy: torch.Tensor, t: torch.Tensor, c2w: torch.Tensor,
                      intrinsics: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = noisy.shape[0]
        text = torch.cat([self.prompt.text.expand(b, -1, -1), self.prompt.plain.expand(b, -1, -1)])  # (2B, L, D)
        cameras = camera_condition(c2w).repeat(2, 1)  # (2B, 16)
        eps = self.parts.unet(noisy.repeat(2, 1, 1, 1).to(self._dtype), t.repeat(2), encoder_hidden_states=text,
                              class_labels=cameras.to(self._dtype)).sample.float()
        return eps[:b], eps[b:]


@dataclass
class TextTo3DResult:
    mesh: Mesh
    extras: dict  # written into the GLB
    previews: torch.Tensor | None  # (4, S, S, 3) the last four views
    losses: list[float] = field(default_factory=list)
    radiance_field: object = None  # the optimised field (to render or mesh again)

    def save_glb(self, path: str | Path) -> Path:
        return self.mesh.save_glb(path, extras=self.extras)


class TextTo3D:
    """MVDream's parts (``.unet`` with the multi-view processor installed, ``.vae``, ``.text_encoder``,
    ``.tokenizer``, ``.scheduler``) and the two jobs built on them."""

    def __init__(self, parts: MVDreamParts, random_weights: bool = False):
        self.parts, self.random_weights = parts, random_weights

    unet = property(lambda self: self.parts.unet)
    vae = property(lambda self: self.parts.vae)
    text_encoder = property(lambda self: self.parts.text_encoder)
    tokenizer = property(lambda self: self.parts.tokenizer)
    scheduler = property(lambda self: self.parts.scheduler)

    @classmethod
    def from_pretrained(cls, repo_or_folder: str, revision: str | None = None, offline: bool | None = None,
                        device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                        **kwargs) -> "TextTo3D":
        """MVDream from a Hub repo or folder in the diffusers layout or the original single file."""
        parts = load_parts(repo_or_folder, revision, offline, **kwargs)
        return cls(parts.to(device or "cpu", dtype or torch.float32))

    @classmethod
    def random(cls, seed: int = 0, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
               **kwargs) -> "TextTo3D":
        """Tiny random weights: every step runs, the shapes mean nothing (tests, --random-weights)."""
        return cls(random_parts(seed, **kwargs).to(device or "cpu", dtype or torch.float32), random_weights=True)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def max_prompt_tokens(self) -> int:
        return self.tokenizer.model_max_length - 2  # without the start and end tokens

    @torch.no_grad()
    def encode_prompt(self, prompt: str, negative_prompt: str = "") -> PromptEmbeddings:
        """Text embeddings of the prompt and the negative prompt; a prompt longer than the tokenizer takes is cut."""
        def embed(text: str) -> tuple[torch.Tensor, bool]:
            length = len(self.tokenizer(text, truncation=False).input_ids)
            ids = self.tokenizer(text, padding="max_length", max_length=self.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids.to(self.device)
            return self.text_encoder(ids)[0], length > self.tokenizer.model_max_length

        text, truncated = embed(prompt)
        plain, _ = embed(negative_prompt or "")
        return PromptEmbeddings(text, plain, truncated)

    # ---- quick look: plain multi-view sampling ---------------------------------------------------------------

    @torch.no_grad()
    def sample_views(self, prompt: str, negative_prompt: str = "", steps: int = 50, guidance_scale: float = 7.5,
                     elevation_deg: float = 15.0, size: int = 256, generator: torch.Generator | None = None,
                     cancel: CancelToken = NEVER) -> Iterator[Progress]:
        """Four views 90 deg apart from text by DDIM, as MVDream samples them (prompt + ", 3d asset"); yields the
        current x0 estimate as ``preview`` and, last, ``result`` (4, size, size, 3) in [0, 1]."""
        generator = generator or torch.Generator().manual_seed(0)
        scheduler = type(self.scheduler).from_config(self.scheduler.config)  # its own step state
        scheduler.set_timesteps(steps, device=self.device)
        prior = MVDreamPrior(self.parts, self.encode_prompt(prompt + PROMPT_SUFFIX, negative_prompt))
        c2w = orbit_camera(torch.arange(4.0) * 90.0, elevation_deg, 1.0).to(self.device)  # (4, 4, 4)
        latent_size = size // 8
        latents = torch.randn((4, 4, latent_size, latent_size), generator=generator).to(self.device)
        for i, t in enumerate(scheduler.timesteps):
            cancel.check()
            eps_text, eps_plain = prior.predict_noise(latents, t.expand(4), c2w, None)
            eps = eps_plain + guidance_scale * (eps_text - eps_plain)
            out = scheduler.step(eps, t, latents)
            latents = out.prev_sample
            preview = self.decode(out.pred_original_sample) if (i + 1) % 10 == 0 else None
            yield Progress("sample", (i + 1) / len(scheduler.timesteps), f"DDIM step {i + 1}/{steps}", preview=preview)
        yield Progress("done", 1.0, "four views sampled", result=self.decode(latents))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, 4, h, w) -> images (B, 8h, 8w, 3) in [0, 1], on the CPU."""
        vae = self.vae
        images = vae.decode((latents / vae.config.scaling_factor).to(next(vae.parameters()).dtype)).sample
        return ((images.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).cpu()

    # ---- score distillation ----------------------------------------------------------------------------------

    def generate(self, prompt: str, negative_prompt: str = "", preset: str = "fast", steps: int | None = None,
                 seed: int = 0, guidance_scale: float | None = None, options: SDSOptions | None = None,
                 control: SDSControl | None = None, cancel: CancelToken = NEVER, source: str | None = None,
                 ) -> Iterator[Progress]:
        """SDS from text: the events of :func:`~recon3d.pipelines.sds.optimise` (plus a "mesh" result for each
        export request), then a last event whose ``result`` is the :class:`TextTo3DResult` of the state reached
        (all steps, Stop, or the last good step before a NaN loss)."""
        prompt = check_prompt(prompt)
        options = options_for(preset, steps, guidance_scale, options)
        embeddings = self.encode_prompt(prompt, negative_prompt)
        extras = {"method": METHOD, "checkpoint": source or self.parts.source, "prompt": prompt,
                  "negative_prompt": negative_prompt, "seed": int(seed), "preset": preset if steps is None else "custom",
                  "steps": options.steps, "guidance_scale": options.guidance_scale,
                  "random_weights": self.random_weights, "prompt_truncated": embeddings.truncated}
        if self.parts.notes:
            extras["checkpoint_notes"] = list(self.parts.notes)
        if embeddings.truncated:
            yield Progress("prompt", 0.0, f"the prompt is longer than {self.max_prompt_tokens} tokens; "
                                          "only its beginning is used")
        generator = torch.Generator().manual_seed(int(seed))
        prior = MVDreamPrior(self.parts, embeddings)
        yield from distill_to_mesh(prior, options, generator, self.device, extras, control, cancel)


def check_prompt(prompt: str) -> str:
    prompt = " ".join((prompt or "").split())
    if not prompt:
        raise ValueError("type a prompt: a short description of one object, e.g. 'a wooden rocking chair'")
    return prompt


def options_for(preset: str, steps: int | None, guidance_scale: float | None,
                options: SDSOptions | None = None) -> SDSOptions:
    """The recipe of a preset ("fast", "quality") with an optional custom step count and guidance scale."""
    if options is None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
        options = PRESETS[preset]
    changes = {k: v for k, v in (("steps", steps), ("guidance_scale", guidance_scale)) if v is not None}
    return replace(options, **changes)  # (validated again by SDSOptions.__post_init__)


def distill_to_mesh(prior, options: SDSOptions, generator: torch.Generator, device: torch.device | str,
                    extras: dict, control: SDSControl | None = None, cancel: CancelToken = NEVER,
                    ) -> Iterator[Progress]:
    """:func:`optimise`, turning its export requests and its end into meshes (:class:`TextTo3DResult`)."""
    last_preview = None
    for event in optimise(prior, options, generator, device, control, cancel):
        if event.preview is not None:
            last_preview = event.preview
        if event.stage == "export":
            yield Progress("mesh", event.fraction, f"mesh of step {event.result.step}",
                           result=export_state(event.result, options, extras, last_preview, cancel))
        elif event.stage == "done":
            state: SDSState = event.result
            result = export_state(state, options, {**extras, "stopped": event.metrics["stopped"]}, last_preview, cancel)
            yield Progress("done", 1.0, event.message, result=result, metrics=event.metrics)
        else:
            yield event


def export_state(state: SDSState, options: SDSOptions, extras: dict, previews: torch.Tensor | None,
                 cancel: CancelToken = NEVER) -> TextTo3DResult:
    """Marching cubes on the field at its iso level, vertex colours; an almost empty field falls back to the
    mesher's automatic level so an early export still shows something."""
    settings = MeshSettings(resolution=options.mesh_resolution, min_part_fraction=0.05)
    extras = {**extras, "steps_done": state.step}
    try:
        mesh, grid = extract_mesh(state.field, settings, cancel=cancel)
    except EmptyMeshError:
        mesh, grid = extract_mesh(state.field, replace(settings, level=None), cancel=cancel)
        extras["iso_level"] = "automatic (the field had no surface at its level yet)"
    extras.setdefault("iso_level", float(grid.stats["level"]))
    return TextTo3DResult(mesh, extras, previews, list(state.losses), state.field)


def views_strip(views: torch.Tensor) -> "Image.Image":
    """Views (V, S, S, 3) in [0, 1], as the previews and the quick look give them, side by side in one image."""
    return views_grid(views.permute(0, 3, 1, 2)[None])
