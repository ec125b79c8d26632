"""Checkpoints from the Hugging Face Hub or a local folder, loaded strictly.

A checkpoint is a folder (or Hub repo) with ``config.json`` and ``model.safetensors`` (or ``pytorch_model.bin``).
Every failure is a :class:`CheckpointError` whose message names the checkpoint and says what to do.
"""

from __future__ import annotations

import json
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
DOWNLOAD_HINT = ("download it where the Hub is reachable (hf download {repo_id}) and copy the cache, "
                 "or pass the checkpoint folder")
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be found, downloaded or loaded; the message is for the user."""


@dataclass
class CheckpointFiles:
    source: str  # what the user asked for
    config: dict
    weights: Path
    revision: str | None = None


def hub_reachable(timeout: float = 2.0) -> bool:
    """One quick probe of the Hub endpoint, so callers decide once instead of paying retries per file.
    False without probing when HF_HUB_OFFLINE is set."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_checkpoint(repo_or_folder: str | Path, revision: str | None = None, offline: bool | None = None) -> CheckpointFiles:
    """A local folder, or a Hub repo id (downloaded once into the Hub cache), -> its config and weight file.

    ``offline=None`` follows HF_HUB_OFFLINE; ``True`` uses the cache only.
    """
    folder = Path(repo_or_folder).expanduser()
    if folder.is_dir():
        return _from_folder(folder, str(repo_or_folder))
    if folder.exists() or not REPO_ID.fullmatch(str(repo_or_folder)):
        raise CheckpointError(f"{repo_or_folder!r} is neither a checkpoint folder nor a Hub repo id (owner/name)")
    return _from_hub(str(repo_or_folder), revision, offline)


def _from_folder(folder: Path, source: str) -> CheckpointFiles:
    config_path = folder / "config.json"
    weights = next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)
    if not config_path.is_file() or weights is None:
        raise CheckpointError(f"{source}: a checkpoint folder needs config.json and one of {', '.join(WEIGHT_FILES)}")
    return CheckpointFiles(source, read_json(config_path, source), weights)


def read_json(path: Path, source: str) -> dict:
    """A checkpoint's JSON file (config.json, unet/config.json, ...) as a dict, or a CheckpointError naming it."""
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{source}: {Path(path).name} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{source}: {Path(path).name} must hold a JSON object")
    return config


def _from_hub(repo_id: str, revision: str | None, offline: bool | None) -> CheckpointFiles:
    from huggingface_hub import constants

    local_only = constants.HF_HUB_OFFLINE if offline is None else offline
    config_path = _download(repo_id, "config.json", revision, local_only)
    weights, _ = _first_available(repo_id, WEIGHT_FILES, revision, local_only)
    return CheckpointFiles(repo_id, read_json(config_path, repo_id), weights, revision)


def _first_available(repo_id: str, names: tuple[str, ...], revision: str | None, local_only: bool) -> tuple[Path, str]:
    """The first of ``names`` (alternative files, e.g. two weight formats) that the repo or the cache has, and
    which one it is."""
    for name in names:
        try:
            return _download(repo_id, name, revision, local_only, alternatives=True), name
        except _MissingFile:
            continue
    if local_only:
        raise CheckpointError(f"{repo_id}: its weights are not in the local cache (no {' or '.join(names)}) and "
                              f"offline mode is on: {DOWNLOAD_HINT.format(repo_id=repo_id)}")
    raise CheckpointError(f"{repo_id}: the repo has none of {', '.join(names)}")


def resolve_repo_files(repo_or_folder: str | Path, wanted: list[tuple[str, ...]], revision: str | None = None,
                       offline: bool | None = None, expected: str = "a checkpoint") -> Path:
    """A multi-file checkpoint (files in subfolders, e.g. diffusers' ``unet/``, ``vae/``): the local folder, or
    the Hub snapshot folder after downloading what is missing, holding for each entry of ``wanted`` one of its
    alternative paths (relative, ``/``-separated). Errors as :func:`resolve_checkpoint`'s."""
    folder = Path(repo_or_folder).expanduser()
    if folder.is_dir():
        for names in wanted:
            if not any((folder / name).is_file() for name in names):
                raise CheckpointError(f"{repo_or_folder}: {' or '.join(names)} is missing; is it {expected}?")
        return folder
    if folder.exists() or not REPO_ID.fullmatch(str(repo_or_folder)):
        raise CheckpointError(f"{repo_or_folder!r} is neither a checkpoint folder nor a Hub repo id (owner/name)")
    from huggingface_hub import constants

    repo_id = str(repo_or_folder)
    local_only = constants.HF_HUB_OFFLINE if offline is None else offline
    root = None
    for names in wanted:
        if len(names) == 1:
            path, name = _download(repo_id, names[0], revision, local_only, expected=expected), names[0]
        else:
            path, name = _first_available(repo_id, names, revision, local_only)
        root = path.parents[len(name.split("/")) - 1]  # every file of one revision lies in one snapshot folder
    return root


def split_hub_file(name: str) -> tuple[str, str]:
    """``owner/repo/path/in/repo`` -> (repo id, path in the repo); ValueError for anything else."""
    parts = str(name).split("/", 2)
    if len(parts) < 3 or not REPO_ID.fullmatch("/".join(parts[:2])) or not parts[2]:
        raise ValueError(f"{name!r} is not owner/repo/file")
    return "/".join(parts[:2]), parts[2]


def resolve_file(path_or_hub_file: str | Path, revision: str | None = None, offline: bool | None = None,
                 expected: str = "a checkpoint") -> tuple[Path, str]:
    """One checkpoint file: a local path, or ``owner/repo/path/in/repo`` downloaded once into the Hub cache ->
    (local path, the name to report). Errors as :func:`resolve_checkpoint`'s."""
    path = Path(path_or_hub_file).expanduser()
    if path.is_file():
        return path, str(path_or_hub_file)
    try:
        if path.exists():
            raise ValueError("a folder")
        repo_id, filename = split_hub_file(str(path_or_hub_file))
    except ValueError:
        raise CheckpointError(f"{path_or_hub_file!r} is neither a file nor owner/repo/file on the Hub") from None
    from huggingface_hub import constants

    local_only = constants.HF_HUB_OFFLINE if offline is None else offline
    return _download(repo_id, filename, revision, local_only, expected=expected), f"{repo_id}/{filename}"


class _MissingFile(Exception):
    pass


def _download(repo_id: str, filename: str, revision: str | None, local_only: bool, alternatives: bool = False,
              expected: str = "an OpenLRM v1.1 checkpoint") -> Path:
    """One file of a repo through the Hub cache. ``alternatives``: the file is one of several acceptable ones, so
    its absence raises :class:`_MissingFile` for the caller to try the next."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    at = f"{repo_id}@{revision}" if revision else repo_id
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, local_files_only=local_only))
    except LocalEntryNotFoundError:  # (a subclass of EntryNotFoundError: handle it first)
        if local_only and alternatives:
            raise _MissingFile(filename) from None  # the other weight format may be cached
        how = "offline mode is on" if local_only else "the Hub is unreachable"
        raise CheckpointError(f"{at} is not in the local cache and {how}: {DOWNLOAD_HINT.format(repo_id=repo_id)}") from None
    except EntryNotFoundError:
        if alternatives:
            raise _MissingFile(filename) from None
        raise CheckpointError(f"{at}: the repo has no {filename}; is it {expected}?") from None
    except GatedRepoError:
        raise CheckpointError(f"{at}: the repo is gated; accept its terms on the Hub and log in (hf auth login)") from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{at}: no such revision on the Hub") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"{at}: no such repo on the Hub (or it is private)") from None
    except Exception as exc:  # HTTP errors, dropped connections, a full disk: one line, not a traceback
        raise CheckpointError(f"{at}: downloading {filename} failed ({type(exc).__name__}: {exc})") from None


@dataclass
class LoadReport:
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # name, expected, found

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self, limit: int = 5) -> str:
        parts = []
        for title, items in (("missing", self.missing), ("unexpected", self.unexpected)):
            if items:
                parts.append(f"{len(items)} {title} ({', '.join(items[:limit])}{', ...' if len(items) > limit else ''})")
        if self.mismatched:
            shown = ", ".join(f"{n}: expected {list(e)}, found {list(f)}" for n, e, f in self.mismatched[:limit])
            parts.append(f"{len(self.mismatched)} with the wrong shape ({shown}{', ...' if len(self.mismatched) > limit else ''})")
        return "; ".join(parts)


def compare_state_dict(expected: dict[str, tuple], found: dict[str, torch.Tensor]) -> LoadReport:
    """What differs between a model's expected tensor shapes and a checkpoint's tensors."""
    report = LoadReport()
    report.missing = sorted(set(expected) - set(found))
    report.unexpected = sorted(set(found) - set(expected))
    for name in sorted(set(expected) & set(found)):
        if tuple(found[name].shape) != tuple(expected[name]):
            report.mismatched.append((name, tuple(expected[name]), tuple(found[name].shape)))
    return report


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors or (weights-only) PyTorch file, on CPU."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read the weights ({type(exc).__name__}: {exc})") from None


def load_strict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load every tensor or refuse: a short report lists missing, unexpected and mis-shaped tensors.

    The model may live on the meta device; its parameters are then replaced by the checkpoint's tensors.
    """
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    report = compare_state_dict(expected, state_dict)
    if not report.ok:
        raise CheckpointError(f"{source}: the weights do not match the model: {report.summary()}")
    model.load_state_dict(state_dict, strict=True, assign=True)


def save_checkpoint(folder: str | Path, config: dict, state_dict: dict[str, torch.Tensor]) -> Path:
    """Write a checkpoint in Hub layout: config.json + model.safetensors."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, str(folder / "model.safetensors"))
    return folder


class PretrainedModel:
    """``from_pretrained`` / ``save_pretrained`` for an nn.Module built from one config dataclass: the subclass
    names its ``config_class`` (with ``from_dict(config, source)`` that checks it, and ``to_dict()``) and keeps
    the config as ``self.config``. One loading path for every model: strict, built on the meta device, CPU
    float32 unless the caller picks a device and dtype."""

    config_class: type

    @classmethod
    def from_pretrained(cls, repo_or_folder: str | Path, revision: str | None = None, offline: bool | None = None,
                        device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        """Strictly load a checkpoint (Hub repo id or folder): its config, then every tensor or a report."""
        files = resolve_checkpoint(repo_or_folder, revision, offline)
        config = cls.config_class.from_dict(files.config, files.source)
        with torch.device("meta"):
            model = cls(config)
        load_strict(model, read_state_dict(files.weights), files.source)
        return model.to(device=device or "cpu", dtype=dtype or torch.float32).eval()

    def save_pretrained(self, folder: str | Path) -> Path:
        return save_checkpoint(folder, self.config.to_dict(), self.state_dict())
