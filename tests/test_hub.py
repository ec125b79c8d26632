import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from recon3d.hub import CheckpointError, compare_state_dict, resolve_checkpoint
from recon3d.models.lrm import LRM, TINY_LRM_CONFIG


def test_folder_and_repo_id_load_the_same_weights(tiny_checkpoint, tiny_repo_in_cache):
    saved = load_file(str(tiny_checkpoint / "model.safetensors"))
    for source in (tiny_checkpoint, tiny_repo_in_cache):
        model = LRM.from_pretrained(source)
        assert model.config == TINY_LRM_CONFIG
        state = model.state_dict()
        assert state.keys() == saved.keys()
        assert all(torch.equal(state[k], saved[k]) for k in saved)
        assert next(model.parameters()).device.type == "cpu" and next(model.parameters()).dtype == torch.float32


def test_repo_id_resolves_from_the_cache_offline(tiny_repo_in_cache):
    files = resolve_checkpoint(tiny_repo_in_cache, offline=True)
    assert files.weights.name == "model.safetensors" and "snapshots" in str(files.weights)
    assert files.config["encoder_model_name"] == "tiny_vit14_reg"


def test_uncached_repo_offline_gives_one_actionable_line():
    with pytest.raises(CheckpointError) as info:
        resolve_checkpoint("zxhezexin/openlrm-mix-base-1.1", offline=True)
    message = str(info.value)
    assert "\n" not in message
    assert "zxhezexin/openlrm-mix-base-1.1" in message and "hf download" in message and "folder" in message


@pytest.mark.parametrize("name", ["no/such/thing/here", "./ckpt", "~/models", "plainname"])
def test_not_a_folder_nor_a_repo_id(name):
    with pytest.raises(CheckpointError, match="neither a checkpoint folder nor a Hub repo id"):
        resolve_checkpoint(name)


def test_folder_without_weights_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="needs config.json and one of model.safetensors"):
        resolve_checkpoint(tmp_path)


def copy_checkpoint(src, dst, edit_tensors=None, edit_config=None):
    dst.mkdir()
    tensors = load_file(str(src / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    if edit_tensors:
        edit_tensors(tensors)
    if edit_config:
        edit_config(config)
    save_file(tensors, str(dst / "model.safetensors"))
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_wrong_shapes_missing_and_unexpected_tensors_are_listed(tiny_checkpoint, tmp_path):
    def damage(t):
        t["upsampler.bias"] = torch.zeros(5)
        del t["transformer.norm.weight"]
        t["extra.weight"] = torch.zeros(1)

    bad = copy_checkpoint(tiny_checkpoint, tmp_path / "bad", edit_tensors=damage)
    with pytest.raises(CheckpointError) as info:
        LRM.from_pretrained(bad)
    message = str(info.value)
    assert "1 missing (transformer.norm.weight)" in message
    assert "1 unexpected (extra.weight)" in message
    assert "upsampler.bias: expected [8], found [5]" in message


def test_unknown_config_keys_and_encoders_are_refused(tiny_checkpoint, tmp_path):
    bad = copy_checkpoint(tiny_checkpoint, tmp_path / "a", edit_config=lambda c: c.update(magic=1))
    with pytest.raises(CheckpointError, match="keys this LRM does not know: magic"):
        LRM.from_pretrained(bad)
    bad = copy_checkpoint(tiny_checkpoint, tmp_path / "b", edit_config=lambda c: c.update(encoder_model_name="clip"))
    with pytest.raises(CheckpointError, match="unsupported encoder"):
        LRM.from_pretrained(bad)


def test_pytorch_bin_fallback(tiny_checkpoint, tmp_path):
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_checkpoint / "config.json").read_text())
    torch.save(load_file(str(tiny_checkpoint / "model.safetensors")), folder / "pytorch_model.bin")
    model = LRM.from_pretrained(folder)
    assert torch.equal(model.upsampler.weight, LRM.from_pretrained(tiny_checkpoint).upsampler.weight)


def test_compare_state_dict_report():
    report = compare_state_dict({"a": (2,), "b": (3,)}, {"a": torch.zeros(2), "c": torch.zeros(1)})
    assert report.missing == ["b"] and report.unexpected == ["c"] and not report.ok


def test_revisions_resolve_through_the_cache(tiny_repo_in_cache):
    from conftest import TINY_COMMIT

    assert TINY_COMMIT in str(resolve_checkpoint(tiny_repo_in_cache, revision="main", offline=True).weights)
    assert TINY_COMMIT in str(resolve_checkpoint(tiny_repo_in_cache, revision=TINY_COMMIT, offline=True).weights)
    with pytest.raises(CheckpointError, match="recon3d-test/tiny-lrm@v9 is not in the local cache"):
        resolve_checkpoint(tiny_repo_in_cache, revision="v9", offline=True)


def test_cached_config_without_weights_offline_gives_the_download_hint(tmp_path, tiny_checkpoint):
    from conftest import _CACHE

    from recon3d.testing import place_in_hub_cache

    (tmp_path / "config-only").mkdir()
    (tmp_path / "config-only" / "config.json").write_bytes((tiny_checkpoint / "config.json").read_bytes())
    place_in_hub_cache(tmp_path / "config-only", "recon3d-test/config-only", _CACHE, "f" * 40)
    with pytest.raises(CheckpointError, match="weights are not in the local cache.*hf download recon3d-test/config-only"):
        resolve_checkpoint("recon3d-test/config-only", offline=True)
