"""Command line: ``python -m recon3d image IMG... -o OUTDIR --model REPO_OR_FOLDER --resolution 256``.

Each input that is refused gets a one-line message; the others are still processed; the exit code is 1 if any
input failed, 2 if the model could not be loaded.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .checkpoints import DEFAULT_LRM, OPENLRM_LICENCE
from .devices import DTYPE_NAMES, choose_device
from .hub import CheckpointError, hub_reachable
from .images import FOREGROUND_RATIO_RANGE, ImageError
from .mesh import EmptyMeshError, MAX_RESOLUTION, MIN_RESOLUTION
from .models.lrm import DENSITY_LEVEL



def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m recon3d", description="Images or text to 3D models (GLB): LRM reconstructions, DMV3D samples, MVDream score distillation.")
    commands = parser.add_subparsers(dest="command", required=True)
    image = commands.add_parser("image", help="image(s) -> GLB mesh(es) with LRM")
    image.add_argument("images", nargs="+", type=Path, help="PNG, JPEG or WebP files")
    image.add_argument("-o", "--output", type=Path, default=Path("outputs"), help="output folder (default: outputs)")
    image.add_argument("--model", default=DEFAULT_LRM, help=f"Hub repo id or checkpoint folder (default: {DEFAULT_LRM})")
    image.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    image.add_argument("--resolution", type=int, default=256, help=f"mesh grid resolution, {MIN_RESOLUTION}..{MAX_RESOLUTION}")
    image.add_argument("--foreground-ratio", type=float, default=0.8, help="object size in the square input (%g..%g, default 0.8)" % FOREGROUND_RATIO_RANGE)
    image.add_argument("--no-remove-background", action="store_true", help="do not remove the background")
    image.add_argument("--threshold", type=parse_threshold, default=DENSITY_LEVEL,
                       help="density iso-level of the surface, or 'auto' for uncalibrated (e.g. fine-tuned) models")
    image.add_argument("--remove-floaters", type=float, default=0.0, metavar="FRACTION",
                       help="drop detached parts smaller than FRACTION of the largest (0: keep all, 1: largest only)")
    image.add_argument("--turntable", action="store_true", help="also write a turntable GIF per image")
    image.add_argument("--turntable-frames", type=positive_int, default=24, help="frames of the turntable (default 24)")
    image.add_argument("--turntable-size", type=positive_int, default=None,
                       help="frame size in pixels (default: the checkpoint's render size)")
    image.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: cuda if available)")
    image.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default=None, help="default: float16 on GPU, float32 on CPU")
    image.add_argument("--offline", action="store_true", help="use the local Hub cache only")
    image.add_argument("--random-weights", action="store_true", help="tiny random model: tests the path, output is meaningless")
    add_sample_command(commands)
    add_train_command(commands)
    add_text_command(commands)
    return parser


def add_device_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: cuda if available)")
    command.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default=None,
                         help="default: float16 on GPU, float32 on CPU")


def add_sample_command(commands) -> None:
    from .checkpoints import DEMO_DMV3D

    sample = commands.add_parser("sample", help="image -> several 3D samples (GLB per seed) with DMV3D")
    sample.add_argument("image", type=Path, help="a PNG, JPEG or WebP file")
    sample.add_argument("--seeds", default="0,1,2", help="comma-separated seeds, one sample each (default 0,1,2)")
    sample.add_argument("--steps", type=positive_int, default=30, help="DDIM steps (default 30)")
    sample.add_argument("--model", default=str(DEMO_DMV3D),
                        help="Hub repo id or checkpoint folder (default: the shipped demo model, procedural shapes only)")
    sample.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    sample.add_argument("-o", "--output", type=Path, default=Path("outputs"), help="output folder (default: outputs)")
    sample.add_argument("--resolution", type=int, default=128, help=f"mesh grid resolution, {MIN_RESOLUTION}..{MAX_RESOLUTION}")
    sample.add_argument("--foreground-ratio", type=float, default=0.8,
                        help="object size in the square input (%g..%g, default 0.8)" % FOREGROUND_RATIO_RANGE)
    sample.add_argument("--no-remove-background", action="store_true", help="do not remove the background")
    sample.add_argument("--comparison", action="store_true", help="also write comparison.png: every sample from 4 angles")
    add_device_options(sample)
    sample.add_argument("--offline", action="store_true", help="use the local Hub cache only")
    sample.add_argument("--random-weights", action="store_true", help="tiny random model: tests the path, output is meaningless")


def add_train_command(commands) -> None:
    train = commands.add_parser("train-dmv3d", help="train a DMV3D model (accelerate: CPU, GPU or many)")
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


def add_text_command(commands) -> None:
    from .checkpoints import MVDREAM_CHECKPOINTS
    from .pipelines.sds import PRESETS

    default = MVDREAM_CHECKPOINTS[0].repo_id
    text = commands.add_parser("text", help="text -> 3D model (GLB) by MVDream score distillation")
    text.add_argument("prompt", help="one object, e.g. 'a wooden rocking chair'")
    text.add_argument("--negative", default="", help="negative prompt")
    text.add_argument("--preset", choices=sorted(PRESETS), default="fast",
                      help=f"fast: {PRESETS['fast'].steps} steps; quality: {PRESETS['quality'].steps} (default fast)")
    text.add_argument("--steps", type=positive_int, default=None, help="a custom step count (the preset's schedule, rescaled)")
    text.add_argument("--seed", type=int, default=0)
    text.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default 50)")
    text.add_argument("--model", default=default, help=f"Hub repo id or folder, diffusers layout or the original "
                                                       f"sd-v2.1-base-4view.pt (default: {default})")
    text.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    text.add_argument("-o", "--output", type=Path, default=Path("outputs"), help="output folder (default: outputs)")
    text.add_argument("--quick-look", action="store_true", help="first write quick-look.png: 4 views sampled by DDIM")
    add_device_options(text)
    text.add_argument("--offline", action="store_true", help="use the local Hub cache only")
    text.add_argument("--random-weights", action="store_true", help="tiny random model: tests the path, output is meaningless")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_threshold(text: str) -> float | None:
    return None if text == "auto" else float(text)


def load_pipeline(args: argparse.Namespace):
    from . import ImageTo3D
    from .models.lrm import TINY_CONFIG

    device, dtype = choose_device(args.device, args.dtype)
    if args.random_weights:
        print("recon3d: random weights: the meshes are meaningless (a test of the path only)", file=sys.stderr)
        return ImageTo3D.random(TINY_CONFIG, device=device, dtype=dtype)
    offline = args.offline or None
    if offline is None and not Path(args.model).is_dir() and not hub_reachable():
        offline = True  # decide once: no retries per file against an unreachable Hub
    print(f"recon3d: loading {args.model} ({OPENLRM_LICENCE}) on {device} in {str(dtype).split('.')[-1]}", file=sys.stderr)
    return ImageTo3D.from_pretrained(args.model, device=device, dtype=dtype, revision=args.revision, offline=offline)


def run_image(args: argparse.Namespace) -> int:
    from .pipelines.image_to_3d import ImageTo3DOptions

    options = ImageTo3DOptions(foreground_ratio=args.foreground_ratio, mesh_resolution=args.resolution,
                               remove_background=not args.no_remove_background,
                               density_threshold=args.threshold, remove_floaters=args.remove_floaters)
    try:
        options.validate()
        pipe = load_pipeline(args)
    except (CheckpointError, ValueError, RuntimeError, AssertionError) as exc:  # device errors come as these
        print(f"recon3d: error: {exc}", file=sys.stderr)
        return 2
    args.output.mkdir(parents=True, exist_ok=True)
    names = output_names(args.images)
    failures = 0
    try:
        for path, name in zip(args.images, names):
            failures += not process_one(pipe, path, options, args.output / name, args)
    except KeyboardInterrupt:  # Ctrl-C: stop now; what was written stays
        print(f"recon3d: interrupted; the finished outputs are in {args.output}", file=sys.stderr)
        return 130
    return 1 if failures else 0


def output_names(paths: list[Path]) -> list[str]:
    """One output name per input: the file name without its last suffix, numbered when two inputs share it."""
    names, seen = [], {}
    for path in paths:
        name = path.name[: -len(path.suffix)] if path.suffix else path.name
        seen[name] = seen.get(name, 0) + 1
        names.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return names


def process_one(pipe, path: Path, options, stem: Path, args: argparse.Namespace) -> bool:
    """Run one image with a progress bar; False (and a one-line message) if it was refused."""
    import torch
    from tqdm import tqdm

    bar = tqdm(total=100, desc=path.name, unit="%", leave=True, file=sys.stderr)
    try:
        result = None
        for event in pipe.run(path, options):
            bar.set_postfix_str(event.message)
            bar.update(int(event.fraction * 100) - bar.n)
            result = event.result or result
        write_outputs(result, stem, args)
        return True
    except (ImageError, EmptyMeshError, ValueError, OSError) as exc:
        bar.write(f"recon3d: {path}: refused: {exc}", file=sys.stderr)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        bar.write(f"recon3d: {path}: out of memory: try a lower --resolution or --dtype float16", file=sys.stderr)
    finally:
        bar.close()
    return False


def write_outputs(result, stem: Path, args: argparse.Namespace) -> None:
    glb = result.save_glb(stem.parent / f"{stem.name}.glb")
    result.processed_image.save(stem.parent / f"{stem.name}_input.png")
    if args.turntable:
        result.save_turntable(stem.parent / f"{stem.name}_turntable.gif", args.turntable_frames, args.turntable_size)
    for note in result.notes:
        print(f"recon3d: {stem.name}: {note}", file=sys.stderr)
    summary = {"glb": str(glb), "faces": result.stats["faces"], "timings_s": {k: round(v, 4) for k, v in result.timings.items()}}
    print(json.dumps(summary))


def run_sample(args: argparse.Namespace) -> int:
    """``sample``: OUTDIR/seed-<s>.glb per seed (and comparison.png); exit 1 for a refused input, 2 when the
    model cannot be loaded, 130 on Ctrl-C."""
    import torch
    from tqdm import tqdm

    from .pipelines.sample_3d import Sample3D, SampleOptions, comparison_grid, parse_seeds

    try:
        options = SampleOptions(seeds=parse_seeds(args.seeds), steps=args.steps, mesh_resolution=args.resolution,
                                foreground_ratio=args.foreground_ratio,
                                remove_background=not args.no_remove_background).validate()
        device, dtype = choose_device(args.device, args.dtype)
        if args.random_weights:
            from .models.dmv3d import TINY_CONFIG

            print("recon3d: random weights: the samples are meaningless (a test of the path only)", file=sys.stderr)
            pipe = Sample3D.random(TINY_CONFIG, device=device, dtype=dtype)
        else:
            from .checkpoints import DEMO_DMV3D, DEMO_DMV3D_ID

            name = DEMO_DMV3D_ID if Path(args.model).resolve() == DEMO_DMV3D else None  # GLBs name no local path
            pipe = Sample3D.from_pretrained(args.model, device=device, dtype=dtype, revision=args.revision,
                                            offline=args.offline or None, name=name)
    except (CheckpointError, ValueError, RuntimeError) as exc:
        print(f"recon3d: error: {exc}", file=sys.stderr)
        return 2
    args.output.mkdir(parents=True, exist_ok=True)
    samples, bar = [], tqdm(total=100, desc=args.image.name, unit="%", file=sys.stderr)
    try:
        for event in pipe.run(args.image, options):
            bar.set_postfix_str(event.message)
            bar.update(int(event.fraction * 100) - bar.n)
            if event.result is not None:
                samples.append(event.result)
                glb = event.result.save_glb(args.output / f"seed-{event.result.seed}.glb")
                bar.write(json.dumps({"seed": event.result.seed, "glb": str(glb), "faces": len(event.result.mesh.faces)}))
        if args.comparison and samples:
            comparison_grid([s.planes for s in samples], pipe.model).save(args.output / "comparison.png")
    except (ImageError, EmptyMeshError, ValueError, OSError) as exc:
        bar.write(f"recon3d: {args.image}: refused: {exc}", file=sys.stderr)
        return 1
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        bar.write("recon3d: out of memory: try fewer seeds or a lower --resolution", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        bar.write(f"recon3d: interrupted; the finished samples are in {args.output}", file=sys.stderr)
        return 130
    finally:
        bar.close()
    return 0


def run_train(args: argparse.Namespace) -> int:
    """``train-dmv3d``: a checkpoint in OUTPUT that ``sample`` and the app load unchanged."""
    from .pipelines.train_dmv3d import TrainOptions, train

    data = args.data
    try:
        if args.synthetic:
            from .models.dmv3d import CONFIGS
            from .synthetic import write_dataset

            data = args.output / "synthetic-data"
            print(f"recon3d: rendering {args.synthetic} procedural objects into {data}", file=sys.stderr)
            write_dataset(data, args.synthetic, size=CONFIGS[args.config].image_size, seed=args.seed)
        options = TrainOptions(data=str(data), output=str(args.output), config=args.config, steps=args.steps,
                               batch_size=args.batch_size, learning_rate=args.lr, grad_accumulation=args.grad_accumulation,
                               mixed_precision=args.mixed_precision, checkpoint_every=args.checkpoint_every,
                               log_every=args.log_every, lpips_weight=args.lpips_weight, seed=args.seed,
                               resume=args.resume, cpu=args.cpu, render_size=args.render_size,
                               warmup_steps=args.warmup_steps)
        for event in train(options):
            print(f"recon3d: {event.message}", file=sys.stderr, flush=True)
    except ValueError as exc:  # bad options and dataset folders (DatasetError is a ValueError)
        print(f"recon3d: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"recon3d: interrupted; the last checkpoint is in {args.output} (continue with --resume)", file=sys.stderr)
        return 130
    return 0


def run_text(args: argparse.Namespace) -> int:
    """``text``: OUTDIR/<prompt>-seed<S>.glb and preview PNGs; the first Ctrl-C stops the optimisation and exports
    the state reached (exit 130), a second one aborts. Exit 2 when the model or the options are refused."""
    import signal

    import torch
    from tqdm import tqdm

    from .pipelines.progress import run_to_end
    from .pipelines.sds import SDSControl, for_device
    from .pipelines.text_to_3d import TextTo3D, check_prompt, options_for, views_strip
    from .sessions import safe_stem

    try:
        prompt = check_prompt(args.prompt)
        device, dtype = choose_device(args.device, args.dtype)
        options = for_device(options_for(args.preset, args.steps, args.guidance), device)
        if args.random_weights:
            print("recon3d: random weights: the object is meaningless (a test of the path only)", file=sys.stderr)
            pipe = TextTo3D.random(device=device, dtype=dtype)
        else:
            pipe = TextTo3D.from_pretrained(args.model, revision=args.revision, offline=args.offline or None,
                                            device=device, dtype=dtype)
    except (CheckpointError, ValueError, RuntimeError) as exc:
        print(f"recon3d: error: {exc}", file=sys.stderr)
        return 2
    for note in pipe.parts.notes:
        print(f"recon3d: note: {note}", file=sys.stderr)
    args.output.mkdir(parents=True, exist_ok=True)
    stem = f"{safe_stem(prompt)}-seed{args.seed}"
    if args.quick_look:
        views = run_to_end(pipe.sample_views(prompt, args.negative, generator=torch.Generator().manual_seed(args.seed)))
        views_strip(views).save(args.output / f"{stem}-quick-look.png")
    control, interrupted = SDSControl(), []

    def on_interrupt(signum, frame) -> None:
        if interrupted:
            raise KeyboardInterrupt
        interrupted.append(True)
        control.stop.set()
        print("\nrecon3d: stopping after this step to export the state reached (Ctrl-C again aborts)", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, on_interrupt)
    bar = tqdm(total=options.steps, desc="SDS", unit="step", file=sys.stderr)
    try:
        for event in pipe.generate(prompt, args.negative, args.preset, args.steps, args.seed, args.guidance,
                                   options=options, control=control, source=args.model if not args.random_weights else None):
            if event.preview is not None:
                views_strip(event.preview).save(args.output / f"{stem}-preview-{event.metrics['step']:05d}.png")
            if event.stage == "sds":
                bar.update(event.metrics["step"] - bar.n)
                bar.set_postfix_str(f"loss {event.metrics['loss']:.4g} t {event.metrics['t']}")
            elif event.result is None:
                bar.write(f"recon3d: {event.message}", file=sys.stderr)
            else:
                glb = event.result.save_glb(args.output / f"{stem}.glb")
                bar.write(json.dumps({"glb": str(glb), "steps_done": event.result.extras["steps_done"],
                                      "stopped": event.result.extras.get("stopped"), "faces": len(event.result.mesh.faces)}))
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        bar.write("recon3d: out of memory: try --dtype float16 or a smaller GPU load", file=sys.stderr)
        return 1
    except (EmptyMeshError, ValueError) as exc:
        bar.write(f"recon3d: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        bar.write("recon3d: aborted", file=sys.stderr)
        return 130
    finally:
        bar.close()
        signal.signal(signal.SIGINT, previous)
    return 130 if interrupted else 0


COMMANDS = {"image": "run_image", "sample": "run_sample", "train-dmv3d": "run_train", "text": "run_text"}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.ERROR)
    args = build_parser().parse_args(argv)
    try:
        return globals()[COMMANDS[args.command]](args)
    except KeyboardInterrupt:  # Ctrl-C outside a command's own handling (e.g. while loading the model)
        print("recon3d: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
