"""Text to 3D: MVDream's 4-view prior, a quick look at what it imagines, and score distillation into a mesh.

    pipe = TextTo3D.from_pretrained("ashawkey/mvdream-sd2.1-diffusers", device=gpu, dtype=torch.float16)
    views = run_to_end(pipe.sample_views("a wooden chair", QuickLookOptions(seed=0)))  # quick look: (1, 4, 3, S, S)
    result = run_to_end(pipe.generate("a wooden chair", TextTo3DOptions(preset="fast", seed=0)))  # SDS
    result.save_glb("chair.glb")

The options resolve everything for the pipeline's device (the preset or a custom step count, the CPU budget),
so the app, the CLI and a library caller on the same device run the same recipe.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar, Iterator

import torch

from ..cameras import orbit_camera
from ..cancel import NEVER, CancelToken
from ..mesh import FLOATER_FRACTION, Mesh, MeshSettings, extract_mesh_or_fallback
from ..models.mvdream import MVDreamParts, camera_condition, load_parts, random_parts
from ..noise import SEED, randn_tensor, seeded
from ..options import DENOISING_STEPS, Limit, Options, limited
from .events import Event, Exported, Finished, Note, Preview, Stage
from .sds import GUIDANCE, PRESETS, STEPS, SDSControl, SDSOptions, SDSOutcome, SDSState, for_device, optimise

PROMPT_SUFFIX = ", 3d asset"  # MVDream's plain sampling appends it
METHOD = "MVDream SDS"
# MVDream-threestudio's negative prompt (configs/mvdream-sd21.yaml): at guidance 50 it turns every step's
# direction away from these, so it is the default; the quick look, as MVDream's sampling script, uses none
REFERENCE_NEGATIVE_PROMPT = ("ugly, bad anatomy, blurry, pixelated obscure, unnatural colors, poor lighting, dull, "
                             "and unclear, cropped, lowres, low quality, artifacts, duplicate, morbid, mutilated, "
                             "poorly drawn face, deformed, dehydrated, bad proportions")
MAX_PROMPT_CHARS = 1000  # longer than any prompt the tokenizer takes; beyond 77 tokens the prompt is cut (said)
CUSTOM = "custom"


def check_prompt(prompt: str) -> str:
    """The prompt with its white space tidied, or a one-line refusal."""
    prompt = " ".join(str(prompt or "").split())
    if not prompt:
        raise ValueError("type a prompt: a short description of one object, e.g. 'a wooden rocking chair'")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ValueError(f"the prompt is {len(prompt)} characters long; keep it under {MAX_PROMPT_CHARS}")
    return prompt


@dataclass
class TextTo3DOptions(Options):
    """One Text to 3D run. ``preset`` "fast" or "quality" fixes the step count; "custom" takes ``steps``.
    :meth:`recipe` turns them into the :class:`~recon3d.pipelines.sds.SDSOptions` a device runs."""

    PRESET_CHOICES: ClassVar[tuple[str, ...]] = (*PRESETS, CUSTOM)
    preset: str = "fast"
    steps: int | None = limited(None, STEPS)  # with preset "custom" only
    seed: int = limited(0, SEED)
    guidance_scale: float = limited(PRESETS["fast"].guidance_scale, GUIDANCE)  # 50, as published
    negative_prompt: str = REFERENCE_NEGATIVE_PROMPT  # "" for none
    base: SDSOptions | None = None  # an explicit recipe (experiments, tests); its steps unless ``steps`` is given

    def validate(self) -> "TextTo3DOptions":
        super().validate()
        if self.preset not in self.PRESET_CHOICES:
            raise ValueError(f"unknown preset {self.preset!r}: choose one of {', '.join(self.PRESET_CHOICES)}")
        if self.preset == CUSTOM and self.steps is None and self.base is None:
            raise ValueError("the custom preset needs a step count")
        if self.preset != CUSTOM and self.steps is not None and self.base is None:
            raise ValueError(f"the {self.preset} preset runs {PRESETS[self.preset].steps:,} steps; choose custom to "
                             f"set your own")
        self.negative_prompt = " ".join(str(self.negative_prompt or "").split())
        return self

    @property
    def label(self) -> str:
        """The preset as the GLB records it: "custom" for any recipe other than a named preset's."""
        return self.preset if self.steps is None and self.base is None else CUSTOM

    def recipe(self, device: torch.device | str) -> SDSOptions:
        """The SDS recipe on ``device``: the preset's (or ``base``), with the custom steps and guidance, within
        the device's budget (:func:`~recon3d.pipelines.sds.for_device`)."""
        self.validate()
        recipe = self.base or PRESETS.get(self.preset, PRESETS["fast"])
        steps = recipe.steps if self.steps is None else self.steps
        return for_device(replace(recipe, steps=steps, guidance_scale=self.guidance_scale), device)


QUICK_LOOK_STEPS = {"cpu": 20}  # DDIM steps of the quick look by device type; elsewhere MVDream's 50


@dataclass
class QuickLookOptions(Options):
    """Plain 4-view DDIM sampling of what the prior imagines (no 3D), with MVDream's sampling-script settings:
    guidance 10, elevation 15 deg, views 90 deg apart from azimuth 90 deg (its convention and ours agree on
    azimuths: see ``camera_condition``), no negative prompt."""

    seed: int = limited(0, SEED)
    steps: int | None = limited(None, DENOISING_STEPS)  # None: 50, or 20 on a CPU
    guidance_scale: float = limited(10.0, GUIDANCE)
    negative_prompt: str = ""
    elevation_deg: float = limited(15.0, Limit("elevation", -90.0, 90.0))
    azimuth_start_deg: float = limited(90.0, Limit("azimuth", -360.0, 360.0))
    size: int = limited(256, Limit("size", 64, 512, whole=True))

    def device_defaults(self, device: torch.device | str) -> dict:
        return {"steps": QUICK_LOOK_STEPS.get(torch.device(device).type, 50)}

    def validate(self) -> "QuickLookOptions":
        self.negative_prompt = " ".join(str(self.negative_prompt or "").split())
        return super().validate()


@dataclass
class PromptEmbeddings:
    text: torch.Tensor  # (1, L, D) the prompt
    plain: torch.Tensor  # (1, L, D) the negative prompt ("" when none)
    truncated: bool  # the prompt was longer than the tokenizer takes and was cut


class MVDreamPrior:
    """MVDream as SDS's :class:`~recon3d.pipelines.sds.MultiViewPrior`: VAE encoder + multi-view UNet with the
    text and negative-prompt embeddings. The UNet computes in its dtype (half precision on a GPU: no gradient
    flows into it); the VAE is float32 (see ``MVDreamParts.to``), so the gradient from the latents back through
    the encoder to the renders is float32 and needs no loss scaling. Hands float32 back."""

    def __init__(self, parts: MVDreamParts, prompt: PromptEmbeddings):
        self.parts, self.prompt = parts, prompt
        self.encoder_size = parts.encoder_size  # renders are resized to this before encoding
        self.alphas_cumprod = parts.scheduler.alphas_cumprod.float()

    @property
    def _dtype(self) -> torch.dtype:
        return next(self.parts.unet.parameters()).dtype

    def encode(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        vae = self.parts.vae
        vae_dtype = next(vae.parameters()).dtype
        posterior = vae.encode((images * 2 - 1).to(vae_dtype)).latent_dist  # (B, 4, S/8, S/8)
        noise = randn_tensor(posterior.mean.shape, generator, posterior.mean.device, posterior.mean.dtype)
        latents = posterior.mean + posterior.std * noise
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
    previews: torch.Tensor | None  # (1, 4, 3, S, S) in [0, 1]: the last four views
    losses: list[float] = field(default_factory=list)
    radiance_field: object = None  # the optimised field (to render or mesh again)
    elapsed: float | None = None  # seconds the optimisation ran (on the final result)

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
    def sample_views(self, prompt: str, options: QuickLookOptions | None = None,
                     cancel: CancelToken = NEVER) -> Iterator[Event]:
        """Four views 90 deg apart from text by DDIM, as MVDream samples them (prompt + ", 3d asset"): a
        :class:`Preview` of the current x0 estimate every 10 steps, then :class:`Finished` with the views
        (1, 4, 3, S, S) in [0, 1]. The initial noise comes from a CPU generator of ``options.seed``."""
        prompt, options = check_prompt(prompt), (options or QuickLookOptions()).resolved(self.device)
        scheduler = type(self.scheduler).from_config(self.scheduler.config)  # its own step state
        scheduler.set_timesteps(options.steps, device=self.device)
        prior = MVDreamPrior(self.parts, self.encode_prompt(prompt + PROMPT_SUFFIX, options.negative_prompt))
        azimuths = options.azimuth_start_deg + torch.arange(4.0) * 90.0
        c2w = orbit_camera(azimuths, options.elevation_deg, 1.0).to(self.device)  # (4, 4, 4)
        latent_size = options.size // 8
        latents = randn_tensor((4, 4, latent_size, latent_size), seeded(options.seed), self.device)
        for i, t in enumerate(scheduler.timesteps):
            cancel.check()
            eps_text, eps_plain = prior.predict_noise(latents, t.expand(4), c2w, None)
            eps = eps_plain + options.guidance_scale * (eps_text - eps_plain)
            out = scheduler.step(eps, t, latents)
            latents = out.prev_sample
            message = f"DDIM step {i + 1}/{options.steps}"
            if (i + 1) % 10 == 0:
                yield Preview(fraction=(i + 1) / options.steps, message=message,
                              views=self.decode(out.pred_original_sample)[None], step=i + 1, steps=options.steps)
            else:
                yield Stage(name="sample", fraction=(i + 1) / options.steps, message=message)
        yield Finished(fraction=1.0, message="four views sampled", result=self.decode(latents)[None])

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, 4, h, w) -> images (B, 3, 8h, 8w) in [0, 1], on the CPU."""
        vae = self.vae
        images = vae.decode((latents / vae.config.scaling_factor).to(next(vae.parameters()).dtype)).sample
        return ((images.float() + 1) / 2).clamp(0, 1).cpu()

    # ---- score distillation ----------------------------------------------------------------------------------

    def generate(self, prompt: str, options: TextTo3DOptions | None = None, control: SDSControl | None = None,
                 cancel: CancelToken = NEVER, source: str | None = None) -> Iterator[Event]:
        """SDS from text: the events of :func:`~recon3d.pipelines.sds.optimise` (each export request becomes an
        :class:`Exported` mesh), then :class:`Finished` with the :class:`TextTo3DResult` of the state reached
        (all steps, Stop, or the last good step before a run of non-finite steps). The recipe is
        ``options.recipe`` on this pipeline's device; the GLB extras are written from the options."""
        prompt, options = check_prompt(prompt), (options or TextTo3DOptions()).validate()
        recipe = options.recipe(self.device)
        embeddings = self.encode_prompt(prompt, options.negative_prompt)
        extras = {"method": METHOD, "checkpoint": source or self.parts.source, "prompt": prompt,
                  "negative_prompt": options.negative_prompt, "seed": options.seed, "preset": options.label,
                  "steps": recipe.steps, "guidance_scale": recipe.guidance_scale,
                  "random_weights": self.random_weights, "prompt_truncated": embeddings.truncated,
                  "dtype": str(next(self.unet.parameters()).dtype).removeprefix("torch.")}
        if self.parts.notes:
            extras["checkpoint_notes"] = list(self.parts.notes)
        if embeddings.truncated:
            yield Note(fraction=0.0, message=f"the prompt is longer than {self.max_prompt_tokens} tokens; only its "
                                             f"beginning is used")
        prior = MVDreamPrior(self.parts, embeddings)
        yield from distill_to_mesh(prior, recipe, seeded(options.seed), self.device, extras, control, cancel)


def distill_to_mesh(prior, options: SDSOptions, generator: torch.Generator, device: torch.device | str,
                    extras: dict, control: SDSControl | None = None, cancel: CancelToken = NEVER,
                    ) -> Iterator[Event]:
    """:func:`optimise`, turning its export requests and its end into meshes (:class:`TextTo3DResult`); each mesh
    is made holding the device as a step does (``control.lease``)."""
    control, last_preview = control or SDSControl(), None
    for event in optimise(prior, options, generator, device, control, cancel):
        if isinstance(event, Preview):
            last_preview = event.views
        if isinstance(event, Exported):
            with control.lease.hold(cancel, "export"):
                result = export_state(event.result, options, extras, last_preview, cancel)
            yield Exported(fraction=event.fraction, message=f"mesh of step {event.result.step}", result=result)
        elif isinstance(event, Finished):
            outcome: SDSOutcome = event.result
            extras_now = {**extras, "stopped": outcome.stopped}
            with control.lease.hold(cancel, "export"):
                result = export_state(outcome.state, options, extras_now, last_preview, cancel)
            result.elapsed = outcome.elapsed
            yield Finished(fraction=1.0, message=event.message, result=result)
        else:
            yield event


SOLID_LEVEL = 5.0  # where a 0.2-unit slab is 63 % opaque: what the renders show as solid (the first fallback)


def export_state(state: SDSState, options: SDSOptions, extras: dict, previews: torch.Tensor | None,
                 cancel: CancelToken = NEVER) -> TextTo3DResult:
    """Marching cubes on the field at its iso level (the reference's 25), vertex colours. A field that has not
    reached it yet (early exports; short runs, whose renders turn opaque long before the density gets there)
    is meshed at :data:`SOLID_LEVEL`, then at the mesher's automatic level, and the extras say so."""
    settings = MeshSettings(resolution=options.mesh_resolution, min_part_fraction=FLOATER_FRACTION)
    mesh, grid, note = extract_mesh_or_fallback(state.field, settings, cancel=cancel, fallback_levels=(SOLID_LEVEL,))
    # the state is that of the last step that updated it: a closing run of skipped steps did not
    extras = {**extras, "steps_done": state.step - state.skipped_in_a_row, "non_finite_steps": state.skipped,
              "iso_level": float(grid.stats["level"]), **({"iso_level_note": note} if note else {})}
    return TextTo3DResult(mesh, extras, previews, list(state.losses), state.field)
