"""Command line: ``recon3d image IMG... -o OUTDIR`` (or ``python -m recon3d``), ``sample``, ``text``, ``train-dmv3d``.

The commands pass the same options dataclasses as the app and a library caller (ranges, presets and device
defaults come from them); every failure is one line (the same sentence the app shows). Exit codes: 0 done, 1 an
input was refused or a job failed (the other inputs are still processed), 2 the options or the model were refused,
130 Ctrl-C (what was finished stays written; ``text`` exports the state reached on the first Ctrl-C).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .checkpoints import DEFAULT_LRM, DEMO_DMV3D_ID, MVDREAM_CHECKPOINTS, OPENLRM_LICENCE, demo_dmv3d
from .devices import DTYPE_NAMES, choose_device
from .errors import user_message
from .images import FOREGROUND_RATIO
from .mesh import RESOLUTION, CPU_RESOLUTION, GPU_RESOLUTION
from .models.lrm import DENSITY_LEVEL

EXIT_REFUSED, EXIT_SETUP, EXIT_INTERRUPTED = 1, 2, 130
SETUP_ERRORS = (RuntimeError, AssertionError)  # how torch reports a device it cannot use


def say(message: str) -> None:
    print(f"recon3d: {message}", file=sys.stderr, flush=True)


def refused(error: Exception, what: str = "error", also: tuple[type, ...] = ()) -> str:
    """"WHAT: the one line" for an error the user can act on (:func:`~recon3d.errors.user_message`, or any of
    ``also``); other errors propagate: their traceback is the bug report."""
    message = user_message(error)
    if message is None and isinstance(error, also):
        message = str(error).splitlines()[0]
    if message is None:
        raise error
    return f"{what}: {message}"


# ---- arguments shared by the commands -------------------------------------------------------------------------


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_threshold(text: str) -> float | None:
    return None if text == "auto" else float(text)


def add_model_options(command: argparse.ArgumentParser, default: str, help: str) -> None:
    command.add_argument("--model", default=default, help=help)
    command.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    command.add_argument("-o", "--output", type=Path, default=Path("outputs"), help="output folder (default: outputs)")
    command.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: cuda if available)")
    command.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default=None,
                         help="default: float16 on GPU, float32 on CPU")
    command.add_argument("--offline", action="store_true", help="use the local Hub cache only")
    command.add_argument("--random-weights", action="store_true",
                         help="tiny random model: tests the path, the output is meaningless")


def add_image_options(command: argparse.ArgumentParser) -> None:
    from .pipelines.image_to_3d import ImageTo3DOptions

    command.add_argument("--resolution", type=int, default=None,
                         help=f"mesh grid resolution, {RESOLUTION.text} (default: {CPU_RESOLUTION} on a CPU, "
                              f"{GPU_RESOLUTION} on a GPU)")
    command.add_argument("--foreground-ratio", type=float, default=None,
                         help=f"object size in the square input ({FOREGROUND_RATIO.text}, default "
                              f"{ImageTo3DOptions.foreground_ratio:g})")
    command.add_argument("--no-remove-background", action="store_true", help="do not remove the background")


def add_export_options(command: argparse.ArgumentParser) -> None:
    from .export import FACES, FORMATS, TEXTURE

    group = command.add_argument_group("export (recon3d/export.py)")
    group.add_argument("--formats", default="glb", help=f"comma-separated, of {','.join(FORMATS)} (default glb); "
                                                        "OBJ writes its MTL and PNG beside it")
    group.add_argument("--faces", default=None, metavar="N", help=f"at most N triangles ({FACES.text}; default: as "
                                                                  "meshed)")
    group.add_argument("--texture", default=None, metavar="SIZE",
                       help=f"bake a SIZE x SIZE texture from the field ({TEXTURE.text}, e.g. 1024; default: vertex "
                            f"colours)")


def export_options(args: argparse.Namespace):
    """The export flags as checked :class:`~recon3d.export.ExportOptions` (a ValueError names the bad one)."""
    from .export import ExportOptions

    return ExportOptions(formats=ExportOptions.parse_formats(args.formats), faces=args.faces,
                         texture=args.texture).validate()


def write_mesh(field, mesh, extras: dict, stem: Path, args: argparse.Namespace) -> dict[str, str]:
    """The mesh as every asked format (``stem.<ext>``): format -> path, for the JSON line."""
    from .export import export_mesh

    exported = export_mesh(field, mesh, args.export, stem, extras)
    return {name: str(path) for name, path in exported.paths.items()}


def given(**values) -> dict:
    """The options the user gave (the others keep the options dataclass's defaults: none is restated here)."""
    return {name: value for name, value in values.items() if value is not None}


class Bar:
    """A progress bar on stderr driven by job events (their ``fraction`` and ``message``)."""

    def __init__(self, name: str):
        from tqdm import tqdm

        self.bar = tqdm(total=100, desc=name, unit="%", leave=True, file=sys.stderr)

    def update(self, event) -> None:
        self.bar.set_postfix_str(event.message)
        self.bar.update(int(event.fraction * 100) - self.bar.n)

    def write(self, line: str, error: bool = False) -> None:
        self.bar.write(f"recon3d: {line}" if error else line, file=sys.stderr if error else sys.stdout)

    def close(self) -> None:
        self.bar.close()


def device_and_dtype(args: argparse.Namespace):
    try:
        return choose_device(args.device, args.dtype)
    except RuntimeError as exc:  # torch's word for a device name it does not know
        raise ValueError(f"unknown device {args.device!r} ({exc})") from None


def offline_mode(args: argparse.Namespace, checkpoint: str | None = None) -> bool | None:
    """--offline, or offline when the Hub cannot be reached (decided once: no retries per file) and
    ``checkpoint`` (default --model) is not a local path."""
    from .hub import hub_reachable

    if args.offline:
        return True
    if not Path(checkpoint or args.model).exists() and not hub_reachable():
        return True
    return None


# ---- image ------------------------------------------------------------------------------------------------------


def add_image_command(command: argparse.ArgumentParser) -> None:
    command.add_argument("images", nargs="+", type=Path, help="PNG, JPEG or WebP files")
    add_model_options(command, DEFAULT_LRM, f"Hub repo id or checkpoint folder (default: {DEFAULT_LRM})")
    add_image_options(command)
    add_export_options(command)
    command.add_argument("--threshold", type=parse_threshold, default=DENSITY_LEVEL,
                         help="density iso-level of the surface, or 'auto' for uncalibrated (e.g. fine-tuned) models")
    command.add_argument("--remove-floaters", type=float, default=None, metavar="FRACTION",
                         help="drop detached parts smaller than FRACTION of the largest (0: keep all, the default; "
                              "1: the largest only)")
    command.add_argument("--turntable", action="store_true", help="also write a turntable GIF per image")
    command.add_argument("--turntable-frames", type=positive_int, default=24, help="frames of the turntable (default 24)")
    command.add_argument("--turntable-size", type=positive_int, default=None,
                         help="frame size in pixels (default: the checkpoint's render size)")


def load_pipeline(args: argparse.Namespace):
    from . import ImageTo3D
    from .models.lrm import TINY_LRM_CONFIG

    device, dtype = device_and_dtype(args)
    if args.random_weights:
        say("random weights: the meshes are meaningless (a test of the path only)")
        return ImageTo3D.random(TINY_LRM_CONFIG, device=device, dtype=dtype)
    say(f"loading {args.model} ({OPENLRM_LICENCE}) on {device} in {str(dtype).split('.')[-1]}")
    return ImageTo3D.from_pretrained(args.model, device=device, dtype=dtype, revision=args.revision,
                                     offline=offline_mode(args))


class Processes:
    """The processes of one CLI job: one, or those ``accelerate launch --num_processes N -m recon3d ...`` started.
    Each takes its share of the inputs (accelerate's ``split_between_processes``) on its own device, and the job's
    exit code counts every process's failures."""

    def __init__(self):
        self.state = None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched by accelerate (or torchrun)
            import torch
            from accelerate import PartialState

            # without a GPU the processes share the job over gloo (accelerate's own --cpu flag starts one process:
            # launch with --multi_gpu, as for the trainer)
            self.state = PartialState(cpu=not torch.cuda.is_available())

    @property
    def count(self) -> int:
        return self.state.num_processes if self.state else 1

    @property
    def device(self) -> str | None:
        """This process's device when several share the job (None: the usual choice)."""
        if self.state is None:
            return None
        return "cpu" if self.state.device.type == "cpu" else str(self.state.device)

    def share(self, items: list) -> list:
        if self.state is None:
            return items
        with self.state.split_between_processes(items) as mine:
            return list(mine)

    def total(self, count: int) -> int:
        """``count`` summed over the processes."""
        if self.state is None:
            return count
        from accelerate.utils import gather_object

        return sum(gather_object([count]))

    def label(self, name: str) -> str:
        return f"[{self.state.process_index}] {name}" if self.state else name


def run_image(args: argparse.Namespace) -> int:
    """OUTDIR/<name>.glb (and the asked formats) per image; with ``accelerate launch`` the images are shared
    between the processes, each on its own device, and the files are those of a single process."""
    from .pipelines.image_to_3d import ImageTo3DOptions

    processes = Processes()
    args.device = args.device or processes.device
    options = ImageTo3DOptions(remove_background=not args.no_remove_background, density_threshold=args.threshold,
                               **given(foreground_ratio=args.foreground_ratio, mesh_resolution=args.resolution,
                                       remove_floaters=args.remove_floaters))
    try:
        options.validate()
        args.export = export_options(args)
        pipe = load_pipeline(args)
    except Exception as exc:
        say(refused(exc, also=SETUP_ERRORS))
        processes.total(1)  # the other processes wait for every one's count
        return EXIT_SETUP
    args.output.mkdir(parents=True, exist_ok=True)
    mine = processes.share(list(zip(args.images, output_names(args.images))))  # names from the whole list
    failures = sum(not process_one(pipe, path, options, args.output / name, args, processes.label(path.name))
                   for path, name in mine)
    return EXIT_REFUSED if processes.total(failures) else 0


def output_names(paths: list[Path]) -> list[str]:
    """One output name per input: the file name without its last suffix, numbered when two inputs share it."""
    names, seen = [], {}
    for path in paths:
        name = path.name[: -len(path.suffix)] if path.suffix else path.name
        seen[name] = seen.get(name, 0) + 1
        names.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return names


def process_one(pipe, path: Path, options, stem: Path, args: argparse.Namespace, label: str | None = None) -> bool:
    """Run one image with a progress bar (``label``: its name); False (and a one-line message) if it was refused
    or failed."""
    from .pipelines.events import Finished

    bar = Bar(label or path.name)
    try:
        for event in pipe.run(path, options):
            bar.update(event)
            if isinstance(event, Finished):
                write_outputs(event.result, stem, args, bar)
        return True
    except Exception as exc:
        bar.write(refused(exc, f"{path}: refused", also=(OSError,)), error=True)
        return False
    finally:
        bar.close()


def write_outputs(result, stem: Path, args: argparse.Namespace, bar: Bar) -> None:
    files = write_mesh(result.field, result.mesh, result.metadata, stem, args)
    result.processed_image.save(stem.parent / f"{stem.name}_input.png")
    if args.turntable:
        result.save_turntable(stem.parent / f"{stem.name}_turntable.gif", args.turntable_frames, args.turntable_size)
    for note in result.notes:
        bar.write(f"{stem.name}: {note}", error=True)
    timings = {k: round(v, 4) for k, v in result.timings.items()}
    bar.write(json.dumps({**files, "faces": result.stats["faces"], "timings_s": timings}))


# ---- sample -----------------------------------------------------------------------------------------------------


SAMPLE_METHODS = ("dmv3d", "instantmesh")


def add_sample_command(command: argparse.ArgumentParser) -> None:
    from .models.zero123plus import INSTANTMESH_UNET, ZERO123PLUS_REPO
    from .pipelines.multiview_sample import INSTANT_NERF_LARGE, MultiViewOptions
    from .pipelines.sample_3d import DEFAULT_COUNT, SampleOptions

    seeds = ",".join(str(seed) for seed in range(DEFAULT_COUNT))
    command.add_argument("image", type=Path, help="a PNG, JPEG or WebP file")
    command.add_argument("--method", choices=SAMPLE_METHODS, default="dmv3d",
                         help="dmv3d: recon3d's own model (trained on procedural shapes); instantmesh: Zero123++ v1.2 "
                              "views reconstructed by InstantMesh's NeRF (public weights, CC BY-NC 4.0)")
    command.add_argument("--seeds", default=seeds, help=f"comma-separated seeds, one sample each (default {seeds})")
    command.add_argument("--steps", type=int, default=None,
                         help=f"denoising steps (default {SampleOptions.steps} for dmv3d, {MultiViewOptions.steps} for "
                              f"instantmesh)")
    add_model_options(command, DEMO_DMV3D_ID, "dmv3d: Hub repo id or checkpoint folder (default: the shipped demo "
                                              "model, trained on procedural shapes only)")
    add_image_options(command)
    command.add_argument("--comparison", action="store_true", help="also write comparison.png: every sample from 4 angles")
    add_export_options(command)
    group = command.add_argument_group("instantmesh")  # their defaults are filled in by instantmesh_sources()
    group.add_argument("--diffusion", default=None, help=f"Zero123++ repo id or folder (default {ZERO123PLUS_REPO})")
    group.add_argument("--unet", default=None,
                       help=f"replacement UNet state dict, file or owner/repo/file (default {INSTANTMESH_UNET}, "
                            f"white background); 'none' keeps Zero123++'s own (grey background, which the "
                            f"reconstructor, trained on white, was not made for)")
    group.add_argument("--reconstructor", default=None,
                       help=f"InstantMesh NeRF checkpoint, file or owner/repo/file (default {INSTANT_NERF_LARGE})")
    group.add_argument("--reconstructor-config", default=None,
                       help="its InstantMesh config yaml (needed when the file name says neither base nor large)")
    group.add_argument("--guidance", type=float, default=None, help=f"default {MultiViewOptions.guidance:g}")
    group.add_argument("--reconstruct-at", default=None,
                       help="steps at which the reconstruction replaces x0, e.g. 20,40")


INSTANTMESH_ONLY = ("diffusion", "unet", "reconstructor", "reconstructor_config", "guidance", "reconstruct_at")


def parse_steps(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.replace(";", ",").split(",") if part.strip())
    except ValueError:
        raise ValueError(f"--reconstruct-at takes whole step numbers separated by commas, got {text!r}") from None


def sample_options(args: argparse.Namespace):
    """The method's options from the command line (the rest keep the options dataclass's defaults)."""
    from .pipelines.multiview_sample import MultiViewOptions
    from .pipelines.sample_3d import SampleOptions, parse_seeds

    common = dict(seeds=parse_seeds(args.seeds), remove_background=not args.no_remove_background,
                  **given(steps=args.steps, mesh_resolution=args.resolution, foreground_ratio=args.foreground_ratio))
    if args.method == "dmv3d":
        given_here = [f"--{name.replace('_', '-')}" for name in INSTANTMESH_ONLY if getattr(args, name) is not None]
        if given_here:
            raise ValueError(f"{', '.join(given_here)}: options of --method instantmesh")
        return SampleOptions(**common).validate()
    return MultiViewOptions(**common, reconstruct_at=parse_steps(args.reconstruct_at or ""),
                            **given(guidance=args.guidance)).validate()


def load_sampler(args: argparse.Namespace):
    from .pipelines.sample_3d import Sample3D

    device, dtype = device_and_dtype(args)
    if args.method == "instantmesh":
        return load_multiview_sampler(args, device, dtype)
    if args.random_weights:
        from .models.dmv3d import TINY_DMV3D_CONFIG

        say("random weights: the samples are meaningless (a test of the path only)")
        return Sample3D.random(TINY_DMV3D_CONFIG, device=device, dtype=dtype)
    shipped = args.model == DEMO_DMV3D_ID or Path(args.model).resolve() == demo_dmv3d().resolve()
    location = demo_dmv3d() if shipped else args.model
    # offline is the network's state: it also decides whether the background remover may fetch its model
    offline = (args.offline or None) if shipped else offline_mode(args, args.model)
    return Sample3D.from_pretrained(location, device=device, dtype=dtype, revision=args.revision, offline=offline,
                                    name=DEMO_DMV3D_ID if shipped else None)  # GLBs name no local path


def load_multiview_sampler(args: argparse.Namespace, device, dtype):
    from .pipelines.multiview_sample import MultiViewSample3D

    from .models.zero123plus import INSTANTMESH_UNET, ZERO123PLUS_REPO
    from .pipelines.multiview_sample import INSTANT_NERF_LARGE

    if args.random_weights:
        say("random weights: the samples are meaningless (a test of the path only)")
        return MultiViewSample3D.random(device=device, dtype=dtype)
    diffusion = args.diffusion or ZERO123PLUS_REPO
    unet = None if str(args.unet).lower() == "none" else (args.unet or INSTANTMESH_UNET)
    return MultiViewSample3D.from_pretrained(diffusion, unet, args.reconstructor or INSTANT_NERF_LARGE,
                                             args.reconstructor_config, revision=args.revision,
                                             offline=offline_mode(args, diffusion), device=device, dtype=dtype)


def run_sample(args: argparse.Namespace) -> int:
    """OUTDIR/seed-<s>.glb per seed (with instantmesh also seed-<s>-views.png), and comparison.png."""
    from .pipelines.events import Finished, Note, SampleReady

    try:
        options = sample_options(args)
        args.export = export_options(args)
        pipe = load_sampler(args)
    except Exception as exc:
        say(refused(exc, also=SETUP_ERRORS))
        return EXIT_SETUP
    args.output.mkdir(parents=True, exist_ok=True)
    bar = Bar(args.image.name)
    try:
        for event in pipe.run(args.image, options):
            bar.update(event)
            if isinstance(event, Note):
                bar.write(f"{args.image.name}: {event.message}", error=True)
            elif isinstance(event, SampleReady):
                write_sample(pipe, event.sample, args, bar)
            elif isinstance(event, Finished) and args.comparison and event.result:
                pipe.comparison(event.result).save(args.output / "comparison.png")
    except Exception as exc:
        bar.write(refused(exc, f"{args.image}: refused", also=(OSError,)), error=True)
        return EXIT_REFUSED
    finally:
        bar.close()
    return 0


def write_sample(pipe, sample, args: argparse.Namespace, bar: Bar) -> None:
    files = write_mesh(pipe.field_from(sample.planes), sample.mesh, sample.metadata, args.output / f"seed-{sample.seed}", args)
    line = {"seed": sample.seed, **files, "faces": len(sample.mesh.faces)}
    if args.method == "instantmesh":
        from .pipelines.multiview_sample import MultiViewSample3D

        views = args.output / f"seed-{sample.seed}-views.png"
        MultiViewSample3D.views_image(sample).save(views)  # the 3 x 2 tiling Zero123++ makes
        line["views"] = str(views)
    bar.write(json.dumps(line))


# ---- train-dmv3d -----------------------------------------------------------------------------------------------


def add_train_command(train: argparse.ArgumentParser) -> None:
    source = train.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, help="a recon3d-multiview-v1 dataset folder (see recon3d/datasets.py)")
    source.add_argument("--synthetic", type=positive_int, metavar="N",
                        help="render N procedural objects into OUTPUT/synthetic-data first, then train on them")
    train.add_argument("--config", default="demo", choices=["tiny", "demo", "paper"], help="model size (default demo)")
    train.add_argument("--steps", type=positive_int, default=1000)
    train.add_argument("-o", "--output", type=Path, required=True, help="checkpoint folder (Hub format)")
    train.add_argument("--batch-size", type=positive_int, default=4, help="objects per process and step")
    train.add_argument("--lr", type=float, default=4e-4, help="peak learning rate (AdamW)")
    train.add_argument("--grad-accumulation", type=positive_int, default=1)
    train.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="no")
    train.add_argument("--checkpoint-every", type=positive_int, default=250)
    train.add_argument("--log-every", type=positive_int, default=10)
    train.add_argument("--lpips-weight", type=float, default=0.0, help="add LPIPS (needs the lpips package)")
    train.add_argument("--render-size", type=positive_int, default=None,
                       help="supervise renders at this size (cheaper; default: the model's image size)")
    train.add_argument("--warmup-steps", type=int, default=100)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--resume", action="store_true", help="continue from the state saved in OUTPUT")
    train.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is present")


def run_train(args: argparse.Namespace) -> int:
    """A checkpoint in OUTPUT that ``sample`` and the app load unchanged."""
    from .pipelines.train_dmv3d import TrainOptions, train

    data = args.data
    try:
        if args.synthetic:
            from .models.dmv3d import CONFIGS
            from .synthetic import write_dataset

            data = args.output / "synthetic-data"
            say(f"rendering {args.synthetic} procedural objects into {data}")
            write_dataset(data, args.synthetic, size=CONFIGS[args.config].image_size, seed=args.seed)
        options = TrainOptions(data=str(data), output=str(args.output), config=args.config, steps=args.steps,
                               batch_size=args.batch_size, learning_rate=args.lr, grad_accumulation=args.grad_accumulation,
                               mixed_precision=args.mixed_precision, checkpoint_every=args.checkpoint_every,
                               log_every=args.log_every, lpips_weight=args.lpips_weight, seed=args.seed,
                               resume=args.resume, cpu=args.cpu, render_size=args.render_size,
                               warmup_steps=args.warmup_steps)
        for event in train(options):
            say(event.message)
    except ValueError as exc:  # bad options and dataset folders (DatasetError is a ValueError)
        say(refused(exc))
        return EXIT_SETUP
    return 0


# ---- text -------------------------------------------------------------------------------------------------------


def add_text_command(text: argparse.ArgumentParser) -> None:
    from .pipelines.sds import PRESET_DESCRIPTIONS
    from .pipelines.text_to_3d import TextTo3DOptions

    default = MVDREAM_CHECKPOINTS[0].repo_id
    text.add_argument("prompt", help="one object, e.g. 'a wooden rocking chair'")
    text.add_argument("--negative", default=None,
                      help="negative prompt (default: MVDream-threestudio's reference one; '' for none)")
    presets = "; ".join(f"{name}: {text}" for name, text in PRESET_DESCRIPTIONS.items())
    text.add_argument("--preset", choices=TextTo3DOptions.PRESET_CHOICES, default=None,
                      help=f"{presets} (default: {TextTo3DOptions.preset}, or custom when --steps is given)")
    text.add_argument("--steps", type=int, default=None, help="a custom step count")
    text.add_argument("--seed", type=int, default=None, help=f"default {TextTo3DOptions.seed}")
    text.add_argument("--guidance", type=float, default=None,
                      help=f"classifier-free guidance scale (default {TextTo3DOptions.guidance_scale:g})")
    add_model_options(text, default, f"Hub repo id or folder, diffusers layout or the original "
                                     f"sd-v2.1-base-4view.pt (default: {default})")
    text.add_argument("--quick-look", action="store_true", help="first write quick-look.png: 4 views sampled by DDIM")
    add_export_options(text)


def load_text_pipeline(args: argparse.Namespace):
    from .pipelines.text_to_3d import TextTo3D

    device, dtype = device_and_dtype(args)
    if args.random_weights:
        say("random weights: the object is meaningless (a test of the path only)")
        return TextTo3D.random(device=device, dtype=dtype)
    return TextTo3D.from_pretrained(args.model, revision=args.revision, offline=offline_mode(args), device=device,
                                    dtype=dtype)


class FirstInterruptStops:
    """While active, the first Ctrl-C sets ``control.stop`` (the run ends after this step and exports what it
    reached); a second one raises KeyboardInterrupt as usual."""

    def __init__(self, control):
        self.control, self.interrupted = control, False

    def __enter__(self) -> "FirstInterruptStops":
        import signal

        self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        import signal

        signal.signal(signal.SIGINT, self.previous)

    def _handle(self, signum, frame) -> None:
        if self.interrupted:
            raise KeyboardInterrupt
        self.interrupted = True
        self.control.stop.set()
        print("", file=sys.stderr)
        say("stopping after this step to export the state reached (Ctrl-C again aborts)")


def run_text(args: argparse.Namespace) -> int:
    """OUTDIR/<prompt>-seed<S>.glb and preview PNGs."""
    from .images import views_grid
    from .pipelines.events import Exported, Finished, Note, Preview
    from .pipelines.sds import SDSControl
    from .pipelines.text_to_3d import CUSTOM, QuickLookOptions, TextTo3DOptions, check_prompt
    from .sessions import safe_stem

    preset = args.preset or (CUSTOM if args.steps is not None else TextTo3DOptions.preset)
    try:
        prompt = check_prompt(args.prompt)
        options = TextTo3DOptions(preset=preset, steps=args.steps, **given(
            seed=args.seed, guidance_scale=args.guidance, negative_prompt=args.negative)).validate()
        args.export = export_options(args)
        pipe = load_text_pipeline(args)
    except Exception as exc:
        say(refused(exc, also=SETUP_ERRORS))
        return EXIT_SETUP
    for note in pipe.parts.notes:
        say(f"note: {note}")
    args.output.mkdir(parents=True, exist_ok=True)
    stem = f"{safe_stem(prompt)}-seed{options.seed}"
    source = None if args.random_weights else args.model
    control = SDSControl()
    interrupts = FirstInterruptStops(control)
    if args.quick_look:  # the sampling script's settings: no negative prompt
        look = Bar("quick look")
        try:
            for event in pipe.sample_views(prompt, QuickLookOptions(seed=options.seed)):
                look.update(event)
                if isinstance(event, Finished):
                    views_grid(event.result).save(args.output / f"{stem}-quick-look.png")
        except Exception as exc:
            look.write(refused(exc, also=(OSError,)), error=True)
            return EXIT_REFUSED
        finally:
            look.close()
    bar = Bar("SDS")
    try:
        with interrupts:
            for event in pipe.generate(prompt, options, control=control, source=source):
                bar.update(event)
                if isinstance(event, Preview):
                    views_grid(event.views).save(args.output / f"{stem}-preview-{event.step:05d}.png")
                elif isinstance(event, Note):
                    bar.write(event.message, error=True)
                elif isinstance(event, (Exported, Finished)):
                    result, extras = event.result, event.result.extras
                    files = write_mesh(result.radiance_field, result.mesh, extras, args.output / stem, args)
                    bar.write(json.dumps({**files, "steps_done": extras["steps_done"],
                                          "stopped": extras.get("stopped"), "faces": len(event.result.mesh.faces)}))
    except Exception as exc:
        bar.write(refused(exc, also=(OSError,)), error=True)
        return EXIT_REFUSED
    finally:
        bar.close()
    return EXIT_INTERRUPTED if interrupts.interrupted else 0


# ---- dispatch ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    after_interrupt: Callable[[argparse.Namespace], str]  # what Ctrl-C leaves behind, for people


COMMANDS = {
    "image": Command("image(s) -> GLB mesh(es) with LRM", add_image_command, run_image,
                     lambda args: f"the finished outputs are in {args.output}"),
    "sample": Command("image -> several 3D samples (GLB per seed) with DMV3D", add_sample_command, run_sample,
                      lambda args: f"the finished samples are in {args.output}"),
    "train-dmv3d": Command("train a DMV3D model (accelerate: CPU, GPU or many)", add_train_command, run_train,
                           lambda args: f"the last checkpoint is in {args.output} (continue with --resume)"),
    "text": Command("text -> 3D model (GLB) by MVDream score distillation", add_text_command, run_text,
                    lambda args: f"what was written is in {args.output}"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recon3d", description="Images or text to 3D models (GLB): LRM "
                                     "reconstructions, DMV3D samples, MVDream score distillation.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        command.add_arguments(commands.add_parser(name, help=command.help))
    return parser


def quiet_libraries() -> None:
    """diffusers and transformers report routine steps (a cast, loading shards) as warnings and progress bars that
    would bury the CLI's own lines; before they are imported, ask them for errors only (a user's setting wins)."""
    import os

    for variable in ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY"):
        os.environ.setdefault(variable, "error")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.ERROR)
    quiet_libraries()
    args = build_parser().parse_args(argv)
    command = COMMANDS[args.command]
    try:
        return command.run(args)
    except KeyboardInterrupt:  # Ctrl-C: stop now; what was written stays
        say(f"interrupted; {command.after_interrupt(args)}")
        return EXIT_INTERRUPTED


def main_exit() -> None:
    """The ``recon3d`` console script: :func:`main`'s code as the process's exit status."""
    sys.exit(main())


if __name__ == "__main__":
    main_exit()
