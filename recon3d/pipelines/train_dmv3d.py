"""Train DMV3D: the denoiser reconstructs a 3D model from noisy views; its renders are scored against the views.

One step, per object: pick an input group of views (the dataset's ``input_groups``, e.g. 4 views 90 deg apart,
rotated so any of them can be the conditioning view) and held-out views; move the cameras so the conditioning
view is LRM's canonical camera; draw t and noise the input views (view 0 stays clean with probability
``clean_first_view``); predict planes; render them at the input and held-out cameras; MSE (plus LPIPS if asked)
against the true views. Built on accelerate: the same code runs on a CPU, a GPU or many (``accelerate launch``),
with data parallelism, mixed precision, gradient accumulation, and state saved and resumed through accelerate.
Checkpoints are written in the Hub format (config.json + model.safetensors) that the app and CLI load.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F

from ..cancel import NEVER, CancelToken
from ..datasets import MultiViewDataset
from ..models.dmv3d import CONFIGS, DMV3DConfig, align_to_first_view, new_dmv3d
from ..noise import derived, rand_tensor, randint, randint_tensor, randn_tensor, randperm, seeded
from .events import Event, Finished, Stage

STATE_DIR = "accelerate-state"  # inside the output folder: optimizer, RNG and step, for --resume
LOSS_LOG = "loss.jsonl"


@dataclass
class TrainOptions:
    data: str  # a recon3d-multiview-v1 folder
    output: str  # checkpoint folder (Hub format) with the loss log and the resumable state
    config: str = "demo"  # tiny, demo or paper (see recon3d.models.dmv3d.CONFIGS)
    steps: int = 1000
    batch_size: int = 4  # objects per process and step
    learning_rate: float = 4e-4
    warmup_steps: int = 100
    grad_accumulation: int = 1
    mixed_precision: str = "no"  # no, bf16, fp16
    holdout_views: int = 2
    render_size: int | None = None  # supervise renders at this size (cheaper; None: the model's image size)
    clean_first_view: float = 1.0  # probability that view 0 is given clean (image-conditioned sampling)
    lpips_weight: float = 0.0
    checkpoint_every: int = 250
    log_every: int = 10
    seed: int = 0
    resume: bool = False
    cpu: bool = False  # train on the CPU even when a GPU is present
    workers: int = 0

    def validate(self) -> "TrainOptions":
        if self.config not in CONFIGS:
            raise ValueError(f"unknown config {self.config!r}: choose one of {', '.join(CONFIGS)}")
        for name in ("steps", "batch_size", "grad_accumulation", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', ' ')} must be at least 1, got {getattr(self, name)}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed precision must be no, bf16 or fp16, got {self.mixed_precision!r}")
        if not 0.0 <= self.clean_first_view <= 1.0:
            raise ValueError(f"clean_first_view must be between 0 and 1, got {self.clean_first_view}")
        return self


def input_groups(dataset: MultiViewDataset, views: int) -> list[list[int]]:
    """The view groups a model of ``views`` inputs may take: the dataset's ``dataset.json`` "input_groups"
    of that size, else every view index (random picks)."""
    meta = dataset.root / "dataset.json"
    if meta.is_file():
        groups = [g for g in json.loads(meta.read_text()).get("input_groups", []) if len(g) == views]
        if groups:
            return groups
    return []


def pick_views(total: int, views: int, holdout: int, groups: list[list[int]], generator: torch.Generator) -> list[int]:
    """Input views (the first is the conditioning view) then held-out views, as indices into an object's views."""
    if groups:
        group = groups[randint(0, len(groups), generator)]
        shift = randint(0, len(group), generator)
        chosen = group[shift:] + group[:shift]  # any member of the group may be the conditioning view
    else:
        chosen = randperm(total, generator)[:views].tolist()
    rest = [i for i in range(total) if i not in chosen]
    order = randperm(len(rest), generator)[:holdout].tolist()
    return chosen + [rest[i] for i in order]


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, V, 3, H, W) -> (B, V, 3, size, size), antialiased."""
    if images.shape[-1] == size:
        return images
    return F.interpolate(images.flatten(0, 1), size=(size, size), mode="bilinear", antialias=True,
                         align_corners=False).unflatten(0, images.shape[:2])


def training_batch(batch: dict, cfg: DMV3DConfig, holdout: int, groups: list[list[int]],
                   generator: torch.Generator, render_size: int | None = None) -> dict:
    """Dataset items (B objects of V views) -> aligned inputs at the model's image size and targets at the
    render size, both in [-1, 1]."""
    images, c2w, intrinsics = batch["images"], batch["c2w"], batch["intrinsics"]  # (B, V, ...)
    b, total = images.shape[:2]
    index = torch.stack([torch.tensor(pick_views(total, cfg.views, holdout, groups, generator)) for _ in range(b)])
    take = lambda x: torch.stack([x[i, index[i]] for i in range(b)])  # noqa: E731  (B, V+H, ...)
    images, c2w, intrinsics = take(images), take(c2w), take(intrinsics)
    c2w = align_to_first_view(c2w, cfg.camera_distance)
    return {"inputs": _resize(images[:, :cfg.views], cfg.image_size) * 2 - 1,
            "targets": _resize(images, render_size or cfg.image_size) * 2 - 1, "c2w": c2w, "intrinsics": intrinsics}


def diffusion_loss(model, scheduler, data: dict, cfg: DMV3DConfig, options: TrainOptions,
                   generator: torch.Generator, lpips=None) -> torch.Tensor:
    """The DMV3D objective for one batch (see module docstring)."""
    targets, c2w, intrinsics = data["targets"], data["c2w"], data["intrinsics"]
    b, v = targets.shape[0], cfg.views
    x0 = data["inputs"]
    t = randint_tensor(0, cfg.num_train_timesteps, (b,), generator)  # (B,) on the generator's CPU
    noise = randn_tensor(x0.shape, generator)
    noisy = scheduler.add_noise(x0.cpu(), noise, t).to(x0.device)  # (B, V, 3, H, W)
    clean = (rand_tensor((b,), generator) < options.clean_first_view).to(x0.device)
    noisy[:, 0] = torch.where(clean[:, None, None, None], x0[:, 0], noisy[:, 0])
    render_generators = [derived(generator) for _ in range(b)]
    _, renders = model(noisy, c2w[:, :v], intrinsics[:, :v], t.to(x0.device), None, c2w, intrinsics,
                       render_generators, targets.shape[-1])
    loss = F.mse_loss(renders.float(), targets.float())
    if lpips is not None and options.lpips_weight > 0:
        loss = loss + options.lpips_weight * lpips(renders.flatten(0, 1).float(), targets.flatten(0, 1).float()).mean()
    return loss


def learning_rate_at(step: int, options: TrainOptions) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < options.warmup_steps:
        return options.learning_rate * (step + 1) / options.warmup_steps
    progress = (step - options.warmup_steps) / max(1, options.steps - options.warmup_steps)
    return options.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _load_lpips(options: TrainOptions):
    if options.lpips_weight <= 0:
        return None
    try:
        import lpips
    except ImportError:
        raise ValueError("--lpips-weight needs the lpips package (pip install lpips)") from None
    return lpips.LPIPS(net="vgg").eval().requires_grad_(False)


def train(options: TrainOptions, cancel: CancelToken = NEVER) -> Iterator[Event]:
    """Run training as events (a :class:`Stage` every ``log_every`` steps, saying the step and loss, whose
    numbers are also appended to OUTPUT/loss.jsonl); :class:`Finished` carries the checkpoint folder. Resumes from ``output`` when ``resume`` is set and a saved state exists."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, set_seed

    options = options.validate()
    output, cfg = Path(options.output), CONFIGS[options.config]
    # the text projection gets no gradient when training on images only: data parallelism must know
    unused = DistributedDataParallelKwargs(find_unused_parameters=cfg.text_embed_dim is not None)
    accelerator = Accelerator(mixed_precision=options.mixed_precision, cpu=options.cpu, kwargs_handlers=[unused],
                              gradient_accumulation_steps=options.grad_accumulation)
    set_seed(options.seed, device_specific=True)
    dataset = MultiViewDataset(options.data)
    groups = input_groups(dataset, cfg.views)
    if dataset.views_per_object < cfg.views + options.holdout_views:
        raise ValueError(f"{options.data}: objects have {dataset.views_per_object} views; the model needs "
                         f"{cfg.views} inputs + {options.holdout_views} held out")
    loader = torch.utils.data.DataLoader(dataset, batch_size=options.batch_size, shuffle=True, drop_last=True,
                                         num_workers=options.workers,
                                         generator=seeded(options.seed))
    model = new_dmv3d(cfg, options.seed).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=options.learning_rate, weight_decay=0.01,
                                  betas=(0.9, 0.95))
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    counter = StepCounter()
    accelerator.register_for_checkpointing(counter)
    step = _resume(accelerator, counter, output, options)
    scheduler, lpips = cfg.noise_scheduler(), _load_lpips(options)
    if lpips is not None:
        lpips = lpips.to(accelerator.device)
    log = output / LOSS_LOG
    started, losses = time.perf_counter(), []
    if accelerator.is_main_process:  # one voice for all processes
        yield Stage(name="start", fraction=step / options.steps, message=f"Training {options.config} from step "
                    f"{step} on {accelerator.num_processes} process(es), {accelerator.device}")
    while step < options.steps:
        for batch in loader:
            cancel.check()
            generator = seeded(options.seed * 1_000_003 + step * 9_973 + accelerator.process_index)
            data = {k: v.to(accelerator.device) for k, v in
                    training_batch(batch, cfg, options.holdout_views, groups, generator, options.render_size).items()}
            for group in optimizer.param_groups:
                group["lr"] = learning_rate_at(step, options)
            with accelerator.accumulate(model):
                loss = diffusion_loss(model, scheduler, data, cfg, options, generator, lpips)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad()
            losses.append(accelerator.gather(loss.detach()[None]).mean().item())
            if not accelerator.sync_gradients:
                continue
            step += 1
            counter.step = step
            if step % options.log_every == 0 or step == options.steps:
                record = {"step": step, "loss": sum(losses) / len(losses), "lr": learning_rate_at(step - 1, options),
                          "seconds": round(time.perf_counter() - started, 2)}
                losses = []
                if accelerator.is_main_process:
                    with log.open("a") as handle:
                        handle.write(json.dumps(record) + "\n")
                    yield Stage(name="train", fraction=step / options.steps,
                                message=f"step {step}: loss {record['loss']:.4f}")
            if step % options.checkpoint_every == 0 or step == options.steps:
                _save(accelerator, model, output)
            if step >= options.steps:
                break
    yield Finished(fraction=1.0, message=f"Checkpoint in {output}", result=output)


class StepCounter:
    """The step, saved and restored with accelerate's state."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


def _resume(accelerator, counter: StepCounter, output: Path, options: TrainOptions) -> int:
    state = output / STATE_DIR
    if options.resume and state.is_dir():
        accelerator.load_state(str(state))
        return counter.step
    if accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
        (output / LOSS_LOG).write_text("")
        (output / "train_options.json").write_text(json.dumps(asdict(options), indent=2) + "\n")
    accelerator.wait_for_everyone()
    return 0


def _save(accelerator, model, output: Path) -> None:
    """The Hub-format checkpoint (main process) and the resumable accelerate state (all processes)."""
    accelerator.wait_for_everyone()
    accelerator.save_state(str(output / STATE_DIR))
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(output)
    accelerator.wait_for_everyone()
