"""The launched app: its named API through gradio_client, and a real browser rendering the mesh."""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from conftest import ROOT, glb_summary

RANDOM_TINY = "random-tiny (random weights)"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--use-gl=angle",
                 "--use-angle=swiftshader", "--enable-unsafe-swiftshader"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_app(tmp_path_factory, *flags):
    port = free_port()
    log = open(tmp_path_factory.mktemp("app") / "app.log", "w")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), *flags, "--port", str(port)],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(url, timeout=2).status == 200:
                break
        except OSError:
            time.sleep(0.5)
        assert proc.poll() is None, open(log.name).read()
    else:
        proc.kill()
        pytest.fail("the app did not start within 120 s")
    return proc, url


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    proc, url = launch_app(tmp_path_factory, "--random-weights")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_without_reachable_weights_the_page_says_so_and_generate_explains(tmp_path_factory):
    from gradio_client import Client, handle_file

    proc, url = launch_app(tmp_path_factory)  # the tests run with HF_HUB_OFFLINE=1 and an empty Hub cache
    try:
        page = urllib.request.urlopen(url, timeout=10).read().decode()
        assert "Hub is unreachable" in page and "CC BY-NC 4.0" in page
        client = Client(url, verbose=False)
        with pytest.raises(Exception, match="openlrm-mix-base-1.1 is not in the local cache.*hf download"):
            client.predict(handle_file(str(ROOT / "examples" / "duck.png")), "zxhezexin/openlrm-mix-base-1.1",
                           True, 0.8, 64, True, api_name="/image_to_3d")
        assert proc.poll() is None  # still serving
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_named_endpoint_returns_a_valid_glb_and_survives_bad_input(app_url, tmp_path):
    from gradio_client import Client, handle_file

    client = Client(app_url, verbose=False)
    assert "/image_to_3d" in client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    bad = tmp_path / "bad.png"
    bad.write_bytes((ROOT / "examples" / "duck.png").read_bytes()[:3000])  # a valid header, then cut off
    with pytest.raises(Exception, match="truncated or corrupt"):
        client.predict(handle_file(str(bad)), RANDOM_TINY, True, 0.8, 64, True, api_name="/image_to_3d")
    processed, viewer_glb, file_glb, timings = client.predict(
        handle_file(str(ROOT / "examples" / "duck.png")), RANDOM_TINY, True, 0.8, 64, True, api_name="/image_to_3d")
    positions, normals, colours, indices = glb_summary(file_glb)
    assert len(positions) > 100 and len(indices) > 100
    assert "encoder" in timings and "Random weights" in timings


def require_chromium():
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail(f"Chromium is missing at {CHROMIUM}: .ci/run must install it")
        pytest.skip("Chromium is not installed (apt-get install chromium)")


def test_real_browser_shows_the_mesh(app_url, tmp_path):
    require_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1100})
            page.goto(app_url, wait_until="domcontentloaded")
            page.wait_for_selector("#generate", timeout=60000)
            assert "Random weights" in page.inner_text("#random-weights-banner")
            page.locator("#input-image input[type=file]").set_input_files(str(ROOT / "examples" / "duck.png"))
            page.get_by_label("Mesh resolution").first.fill("64")  # keep CPU meshing quick
            page.locator("#generate").click()
            canvas = page.locator("#viewer canvas")
            canvas.wait_for(state="visible", timeout=90000)
            centre = wait_for_mesh_pixels(page, canvas)
            page.screenshot(path=str(tmp_path / "app.png"))
        finally:
            browser.close()
    assert shows_mesh(centre), "the centre of the viewer shows no mesh"


CLEAR = np.array([0.85, 0.85, 0.85]) * 255  # the viewer's clear colour
WHITE = np.array([255.0, 255.0, 255.0])  # the canvas before its first frame


def shows_mesh(pixels) -> bool:
    """True when most pixels differ from both the empty viewer and the blank canvas."""
    flat = pixels.reshape(-1, 3)
    return all(np.abs(flat - empty).max(axis=1).mean() > 20 for empty in (CLEAR, WHITE))


def wait_for_mesh_pixels(page, canvas, timeout=60.0):
    """Poll screenshots of the canvas until its centre shows a mesh; return the centre patch (30 x 30 x 3)."""
    from io import BytesIO

    from PIL import Image

    deadline, centre = time.time() + timeout, None
    while time.time() < deadline:
        shot = np.asarray(Image.open(BytesIO(canvas.screenshot())).convert("RGB"), dtype=float)
        h, w = shot.shape[:2]
        centre = shot[h // 2 - 15:h // 2 + 15, w // 2 - 15:w // 2 + 15]
        if shows_mesh(centre):
            break
        time.sleep(0.5)
    return centre


def test_session_folders_are_per_session_and_removed_on_unload(monkeypatch, tmp_path):
    import importlib

    sys.path.insert(0, str(ROOT))
    app = importlib.import_module("app")
    monkeypatch.setattr(app, "SESSIONS_DIR", tmp_path)

    class Request:  # the two gr.Request attributes the handlers use
        def __init__(self, session_hash):
            self.session_hash = session_hash

    a, b = app.session_dir(Request("alice")), app.session_dir(Request("bob"))
    (a / "mesh.glb").write_bytes(b"x")
    assert a != b and a.parent == b.parent == tmp_path
    app.remove_session_dir(Request("alice"))
    assert not a.exists() and b.exists()


class FrontRedTopGreen:
    """A sphere whose front half (world -y, the side a source photo shows) is red, back blue, top tinted green."""

    def query(self, points):
        import torch

        density = 3 + 10 * (0.6 - points.norm(dim=-1, keepdim=True))
        front, top = (points[:, 1:2] < 0).float(), (points[:, 2:3] > 0.3).float()
        return density, torch.cat([front, top, 1 - front], -1)


def test_viewer_shows_the_front_upright(tmp_path):
    """Our GLB in gr.Model3D's default camera: the front (red) faces the viewer and the top (yellow) is up."""
    require_chromium()
    import gradio as gr
    from playwright.sync_api import sync_playwright

    from recon3d.mesh import MeshSettings, extract_mesh

    glb = extract_mesh(FrontRedTopGreen(), MeshSettings(resolution=64))[0].save_glb(tmp_path / "orient.glb")
    with gr.Blocks() as demo:
        gr.Model3D(value=str(glb), clear_color=(0.85, 0.85, 0.85, 1.0), height=420, elem_id="viewer")
    _, url, _ = demo.launch(server_port=free_port(), prevent_thread_lock=True, allowed_paths=[str(tmp_path)])
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            page = browser.new_page(viewport={"width": 900, "height": 700})
            page.goto(url, wait_until="domcontentloaded")
            canvas = page.locator("#viewer canvas")
            canvas.wait_for(state="visible", timeout=60000)
            centre = wait_for_mesh_pixels(page, canvas)
            from io import BytesIO

            from PIL import Image

            shot = np.asarray(Image.open(BytesIO(canvas.screenshot())).convert("RGB"), dtype=float)
            browser.close()
    finally:
        demo.close()
    h, w = shot.shape[:2]
    red = centre.reshape(-1, 3).mean(0)
    assert red[0] > 150 and red[2] < 100, f"centre is not the red front: {red}"
    column = shot[: h // 2, w // 2 - 5:w // 2 + 5].reshape(-1, 3)
    yellow = (column[:, 0] > 150) & (column[:, 1] > 150) & (column[:, 2] < 100)
    assert yellow.sum() > 20, "no yellow top above the centre: the model is not upright"


class OutOfMemoryPipe:
    random_weights = False

    def run(self, image, options):
        import torch

        yield from ()
        raise torch.OutOfMemoryError("CUDA out of memory")


def test_out_of_memory_becomes_a_clear_ui_error():
    import importlib

    import gradio as gr

    sys.path.insert(0, str(ROOT))
    app = importlib.import_module("app")

    class Service:
        def image_to_3d(self, name):
            return OutOfMemoryPipe()

    handler = app.make_image_to_3d_handler(Service())
    with pytest.raises(gr.Error, match="Out of GPU memory: try a lower mesh resolution"):
        handler(str(ROOT / "examples" / "duck.png"), "any", True, 0.8, 256, True, progress=lambda *a, **k: None)
    with pytest.raises(gr.Error, match="Upload an image first"):
        handler(None, "any", True, 0.8, 256, True, progress=lambda *a, **k: None)


def test_gpu_work_shares_one_bounded_queue_and_sessions_are_cleaned_on_unload():
    import importlib

    sys.path.insert(0, str(ROOT))
    app = importlib.import_module("app")
    from recon3d.service import ModelService, ServiceSettings

    demo = app.build_app(ModelService(ServiceSettings(random_weights=True)))
    demo.queue(max_size=app.parse_args([]).max_queue, default_concurrency_limit=1)
    fns = {fn.name: fn for fn in demo.fns.values()}
    assert (fns["image_to_3d"].concurrency_id, fns["image_to_3d"].concurrency_limit) == (app.GPU_QUEUE, 1)
    assert demo._queue.max_size == 16
    unload = [d for d in demo.config["dependencies"] if d["targets"] == [(None, "unload")]]
    assert [d["api_name"] for d in unload] == ["remove_session_dir"]
