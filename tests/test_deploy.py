"""Deployment manifests: the Spaces front matter of README.md and the Deta v0 Spacefile."""

import re

import yaml
from PIL import Image

from recon3d.checkpoints import OPENLRM_CHECKPOINTS

from conftest import ROOT


def front_matter():
    text = (ROOT / "README.md").read_text()
    match = re.match(r"^---\n(.*?)\n---\n", text, re.S)
    assert match, "README.md must start with YAML front matter"
    return yaml.safe_load(match.group(1)), text[match.end():]


def test_spaces_front_matter_pins_gradio_and_preloads_every_checkpoint():
    meta, _ = front_matter()
    requirements = (ROOT / "requirements.txt").read_text()
    assert meta["sdk"] == "gradio" and f"gradio=={meta['sdk_version']}" in requirements
    assert meta["app_file"] == "app.py" and (ROOT / meta["app_file"]).exists()
    assert meta["suggested_hardware"] == "a100-large"
    from recon3d.checkpoints import MVDREAM_CHECKPOINTS
    from recon3d.models.mvdream import DIFFUSERS_LAYOUT

    from recon3d.hub import split_hub_file
    from recon3d.models.zero123plus import INSTANTMESH_UNET, LAYOUT, ZERO123PLUS_REPO
    from recon3d.pipelines.multiview_sample import INSTANT_NERF_LARGE

    lrm_repos, mvdream_repos = {c.repo_id for c in OPENLRM_CHECKPOINTS}, {c.repo_id for c in MVDREAM_CHECKPOINTS}
    instantmesh = {repo: file for repo, file in map(split_hub_file, (INSTANTMESH_UNET, INSTANT_NERF_LARGE))}
    assert len(instantmesh) == 1  # the UNet and the NeRF live in one repo
    (instantmesh_repo, _), = instantmesh.items()
    others = {ZERO123PLUS_REPO, instantmesh_repo}
    assert set(meta["models"]) == lrm_repos | mvdream_repos | others
    preloaded = dict(entry.split() for entry in meta["preload_from_hub"])
    assert set(preloaded) == lrm_repos | mvdream_repos | others
    assert preloaded[ZERO123PLUS_REPO] == ",".join(names[0] for names in LAYOUT)  # what Zero123++ loading reads
    assert preloaded[instantmesh_repo].split(",") == [split_hub_file(f)[1] for f in (INSTANTMESH_UNET, INSTANT_NERF_LARGE)]
    assert all(preloaded[repo] == "config.json,model.safetensors" for repo in lrm_repos)
    every_part = ",".join(names[0] for names in DIFFUSERS_LAYOUT)  # what TextTo3D.from_pretrained reads
    assert all(preloaded[repo] == every_part for repo in mvdream_repos)


def test_readme_begins_with_install_run_and_test_commands():
    _, body = front_matter()
    block = re.search(r"```bash\n(.*?)```", body, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert commands[0].startswith("pip install -r requirements.txt")
    assert commands[1] == "python app.py" and commands[2] == "python -m pytest"
    assert "python -m pytest" in (ROOT / ".ci" / "run").read_text().splitlines()[-1]


# The constraints of the Deta Spacefile v0 JSON schema (public: deta/schemas, spacefile.v0.schema.json).
SPACEFILE_KEYS = {"v", "icon", "app_name", "micros"}
MICRO_KEYS = {"name", "src", "engine", "primary", "path", "serve", "commands", "include", "run", "dev", "presets",
              "public_routes", "public", "actions"}
ENGINES = {"static", "react", "svelte", "vue", "next", "nuxt", "svelte-kit", "python3.9", "python3.8", "nodejs16", "custom"}


def test_spacefile_is_valid_deta_v0():
    spacefile = yaml.safe_load((ROOT / "Spacefile").read_text())
    assert set(spacefile) <= SPACEFILE_KEYS and spacefile["v"] == 0
    assert len(spacefile.get("app_name", "")) <= 12
    assert 1 <= len(spacefile["micros"]) <= 5
    icon = Image.open(ROOT / spacefile["icon"])
    assert icon.format in ("PNG", "WEBP") and icon.size == (512, 512)
    for micro in spacefile["micros"]:
        assert set(micro) <= MICRO_KEYS and {"name", "src", "engine"} <= set(micro)
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", micro["name"])
        assert micro["engine"] in ENGINES
        assert ("serve" in micro) == (micro["engine"] in {"static", "react", "vue", "svelte"})
        assert not ("public" in micro and "public_routes" in micro)
        assert isinstance(micro.get("commands", ["x"]), list) and micro.get("commands", ["x"])
        for env in micro.get("presets", {}).get("env", []):
            assert set(env) <= {"name", "description", "default"} and "name" in env
            assert isinstance(env.get("default", ""), str)
        if micro["engine"] == "custom":
            assert "run" in micro and "app.py" in micro["run"]


def test_the_package_depends_on_exactly_the_spaces_runtime_requirements():
    """pyproject.toml (pip install .) and requirements.txt (the Space) list the same pinned runtime packages."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    assert sorted(project["dependencies"]) == sorted(line for line in lines if line)
    assert project["name"] == "recon3d" and project["scripts"]["recon3d"] == "recon3d.__main__:main_exit"
