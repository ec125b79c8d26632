"""The launched app (a subprocess serving random weights): its named API through gradio_client and REST, and a
real browser rendering the meshes. All slow: the in-process checks of the page are in test_app_page.py."""

import contextlib
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, glb_summary

pytestmark = pytest.mark.slow

RANDOM_TINY = "random-tiny (random weights)"
OUTPUT_TTL_S = 20  # the test app removes the files of callers without a browser session after this
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# screenshots of what a visitor sees, kept after the run (CI can publish the folder)
ARTEFACTS = Path(os.environ.get("RECON3D_TEST_ARTEFACTS", ROOT / "test-artefacts"))
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
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GRADIO_HEARTBEAT_INTERVAL": "1"}
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
    proc, url = launch_app(tmp_path_factory, "--random-weights", "--output-ttl", str(OUTPUT_TTL_S))
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


def png_header_claiming(width, height):
    """A small PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb's first bytes)."""
    import io
    import struct
    import zlib

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (64, 64)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def test_uploads_are_checked_by_recon3d_with_one_line_messages(app_url, tmp_path):
    from gradio_client import Client, handle_file

    client = Client(app_url, verbose=False)
    assert "/image_to_3d" in client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    text = tmp_path / "notes.png"
    text.write_text("a text file with an image's name")
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header_claiming(20000, 20000))
    cut = tmp_path / "cut.png"
    cut.write_bytes((ROOT / "examples" / "duck.png").read_bytes()[:3000])  # a valid header, then cut off
    cases = {text: "^notes.png: not an image file \\(PNG, JPEG or WebP expected\\)$",
             bomb: "^bomb.png: too many pixels \\(limit 40 MP\\)$",
             cut: "^cut.png: the file is truncated or corrupt"}
    for path, message in cases.items():
        with pytest.raises(Exception) as refused:
            client.predict(handle_file(str(path)), RANDOM_TINY, True, 0.8, 64, True, api_name="/image_to_3d")
        assert re.search(message, str(refused.value)), str(refused.value)
        assert "\n" not in str(refused.value) and "/tmp" not in str(refused.value)  # one line, no server paths
    for ratio, resolution, message in ((0.8, 10000, "Mesh resolution must be between 64 and 512, got 10000"),
                                       (0.2, 64, "Foreground ratio must be between 0.5 and 1, got 0.2"),
                                       (0.8, 100.5, "Mesh resolution must be a whole number")):
        with pytest.raises(Exception, match=message):  # refused, not clamped
            client.predict(handle_file(str(ROOT / "examples" / "duck.png")), RANDOM_TINY, True, ratio, resolution,
                           True, api_name="/image_to_3d")
    file_glb, processed, result = client.predict(
        handle_file(str(ROOT / "examples" / "duck.png")), RANDOM_TINY, True, 0.8, 64, True, api_name="/image_to_3d")
    positions, normals, colours, indices = glb_summary(file_glb)
    assert len(positions) > 100 and len(indices) > 100
    seconds = result["seconds"]
    assert seconds["encoder"] > 0 and seconds["glb_write"] > 0 and seconds["total"] >= sum(
        value for stage, value in seconds.items() if stage != "total") - 0.01
    assert (result["triangles"], result["random_weights"]) == (len(indices), True)


def require_chromium():
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail(f"Chromium is missing at {CHROMIUM}: .ci/run must install it")
        pytest.skip("Chromium is not installed (apt-get install chromium)")


def screenshot(page, name: str) -> Path:
    """Save what the page shows now as test-artefacts/screenshots/NAME.png (the whole page)."""
    path = ARTEFACTS / "screenshots" / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), full_page=True)
    return path


@contextlib.contextmanager
def browser_page(url, width=1400, height=1300):
    """A page of the app in headless Chromium (software WebGL), closed afterwards."""
    require_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.goto(url, wait_until="domcontentloaded")
            yield page
        finally:
            browser.close()


def test_real_browser_shows_the_mesh_and_its_files_go_with_the_tab(app_url, tmp_path):
    with browser_page(app_url, 1280, 1100) as page:
        page.wait_for_selector("#generate", timeout=60000)
        assert "Random weights" in page.inner_text("#random-weights-banner")
        page.locator("#input-image input[type=file]").set_input_files(str(ROOT / "examples" / "duck.png"))
        page.locator("#mesh-resolution input").fill("64")  # keep CPU meshing quick
        page.locator("#generate").click()
        canvas = page.locator("#viewer canvas")
        canvas.wait_for(state="visible", timeout=90000)
        centre = wait_for_mesh_pixels(page, canvas)
        screenshot(page, "image-to-3d")
        processed = page.locator("#processed img")
        processed.wait_for(state="visible", timeout=30000)
        processed_width = processed.evaluate("img => img.naturalWidth")
        link = page.locator("#download a").first.get_attribute("href")
        glb_url = link if link.startswith("http") else app_url.rstrip("/") + link
        served_during_session = http_status(glb_url)
        page.close()  # the visitor leaves: the heartbeat stops and the app's unload runs
        deadline = time.time() + 30
        while time.time() < deadline and http_status(glb_url) not in GONE:
            time.sleep(0.5)
        served_after_session = http_status(glb_url)
    assert shows_mesh(centre), "the centre of the viewer shows no mesh"
    assert processed_width >= 320  # the processed input at a readable size, not the tiny model's 32 px
    assert served_during_session == 200
    assert served_after_session in GONE, "the GLB is still served after its visitor left"


def test_a_job_whose_visitor_left_is_cancelled(app_url):
    from gradio_client import Client, handle_file

    with browser_page(app_url, 1280, 1100) as page:
        page.wait_for_selector("#generate", timeout=60000)
        page.locator("#input-image input[type=file]").set_input_files(str(ROOT / "examples" / "duck.png"))
        page.locator("#mesh-resolution input").fill("512")  # minutes on a CPU
        page.locator("#generate").click()
        page.get_by_text("Extracting the mesh").first.wait_for(timeout=60000)
        page.close()  # the visitor leaves mid-job
    started = time.time()
    client = Client(app_url, verbose=False)
    outputs = client.predict(handle_file(str(ROOT / "examples" / "duck.png")), RANDOM_TINY, True, 0.8, 64, True,
                             api_name="/image_to_3d")
    glb_summary(outputs[0])
    assert time.time() - started < 20  # the abandoned 512^3 job (minutes) no longer holds the only GPU slot


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


class FrontRedTopGreen:
    """A sphere whose front half (world -y, the side a source photo shows) is red, back blue, top tinted green."""

    def query(self, points):
        import torch

        density = 3 + 10 * (0.6 - points.norm(dim=-1, keepdim=True))
        front, top = (points[:, 1:2] < 0).float(), (points[:, 2:3] > 0.3).float()
        return density, torch.cat([front, top, 1 - front], -1)


def test_viewer_shows_the_front_upright(tmp_path):
    """Our GLB in gr.Model3D's default camera: the front (red) faces the viewer and the top (yellow) is up."""
    import gradio as gr

    from recon3d.mesh import MeshSettings, extract_mesh

    glb = extract_mesh(FrontRedTopGreen(), MeshSettings(resolution=64))[0].save_glb(tmp_path / "orient.glb")
    with gr.Blocks() as demo:
        gr.Model3D(value=str(glb), clear_color=(0.85, 0.85, 0.85, 1.0), height=420, elem_id="viewer")
    _, url, _ = demo.launch(server_port=free_port(), prevent_thread_lock=True, allowed_paths=[str(tmp_path)])
    try:
        with browser_page(url, 900, 700) as page:
            canvas = page.locator("#viewer canvas")
            canvas.wait_for(state="visible", timeout=60000)
            centre = wait_for_mesh_pixels(page, canvas)
            from io import BytesIO

            from PIL import Image

            shot = np.asarray(Image.open(BytesIO(canvas.screenshot())).convert("RGB"), dtype=float)
    finally:
        demo.close()
    h, w = shot.shape[:2]
    red = centre.reshape(-1, 3).mean(0)
    assert red[0] > 150 and red[2] < 100, f"centre is not the red front: {red}"
    column = shot[: h // 2, w // 2 - 5:w // 2 + 5].reshape(-1, 3)
    yellow = (column[:, 0] > 150) & (column[:, 1] > 150) & (column[:, 2] < 100)
    assert yellow.sum() > 20, "no yellow top above the centre: the model is not upright"


def rest_call(url, image_data, resolution=64, ratio=0.8):
    """One job through the REST routes (no browser session, no gradio_client): (event name, data)."""
    import httpx

    api = url + "gradio_api"
    data = [image_data, RANDOM_TINY, True, ratio, resolution, True]
    body = json.dumps({"data": data})  # (allows NaN and Infinity, as some clients send them)
    event = httpx.post(f"{api}/call/image_to_3d", content=body, headers={"content-type": "application/json"}).json()["event_id"]
    with httpx.stream("GET", f"{api}/call/image_to_3d/{event}", timeout=120) as response:
        stream = "".join(response.iter_text())
    kind, data = stream.rstrip().rsplit("event: ", 1)[1].split("\ndata: ", 1)
    return kind, json.loads(data)


def rest_generate(url, image):
    """Upload ``image`` and run one job over REST: the URLs of the GLB and of the uploaded file."""
    import httpx

    with open(image, "rb") as handle:
        uploaded = httpx.post(f"{url}gradio_api/upload", files={"files": (image.name, handle, "image/png")}).json()[0]
    kind, outputs = rest_call(url, {"path": uploaded, "meta": {"_type": "gradio.FileData"}})
    assert kind == "complete", outputs
    return outputs[0]["url"], f"{url}gradio_api/file={uploaded}"


def http_status(url):
    import httpx

    return httpx.get(url, timeout=10).status_code


GONE = (403, 404)  # Gradio answers 403 for a path that is no longer among the files it may serve


def test_output_names_are_unguessable_and_served_to_their_caller(app_url, tmp_path):
    """(Their expiry after --output-ttl: test_app_page.py wires it, test_sessions.py checks it on a fake clock.)"""
    photo = tmp_path / "photo.png"
    photo.write_bytes((ROOT / "examples" / "duck.png").read_bytes())  # a visitor's own upload, not an example
    (first, upload), (second, _) = rest_generate(app_url, photo), rest_generate(app_url, photo)  # the same image
    tokens = []
    for url in (first, second):
        folder, name = url.split("/")[-2:]
        match = re.fullmatch(r"photo-([0-9a-f]{32})\.glb", name)
        assert match and re.fullmatch(r"[0-9a-f]{32}", folder), url  # 128-bit random folder and file tokens
        tokens += [folder, match.group(1)]
    assert len(set(tokens)) == 4  # nothing shared but the image's name
    urls = (first, second, upload)
    assert [http_status(url) for url in urls] == [200, 200, 200]


def test_inline_images_and_non_finite_numbers_are_refused_in_one_line(app_url):
    import base64

    data_url = "data:image/png;base64," + base64.b64encode((ROOT / "examples" / "duck.png").read_bytes()).decode()
    kind, message = rest_call(app_url, {"url": data_url, "path": None, "meta": {"_type": "gradio.FileData"}})
    assert kind == "error" and "Send the image as a file upload" in str(message)
    import httpx

    with open(ROOT / "examples" / "duck.png", "rb") as handle:
        uploaded = httpx.post(f"{app_url}gradio_api/upload", files={"files": ("d.png", handle, "image/png")}).json()[0]
    image = {"path": uploaded, "meta": {"_type": "gradio.FileData"}}
    for resolution, ratio in ((float("nan"), 0.8), (float("inf"), 0.8), (128, float("-inf"))):
        kind, message = rest_call(app_url, image, resolution, ratio)
        assert kind == "error" and re.search("(Mesh resolution|Foreground ratio) must be a finite number", str(message)), message


def test_cancel_frees_the_queue_for_the_next_job(app_url):
    from gradio_client import Client, handle_file

    client = Client(app_url, verbose=False)
    duck = handle_file(str(ROOT / "examples" / "duck.png"))
    slow = client.submit(duck, RANDOM_TINY, True, 0.8, 512, True, api_name="/image_to_3d")  # minutes on a CPU
    deadline = time.time() + 60
    while time.time() < deadline:
        progress = slow.status().progress_data
        if progress and progress[0].desc.startswith("Extracting the mesh"):
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"the 512^3 job never reached the mesh stage: {slow.status()}")
    time.sleep(1)  # well inside the grid queries
    assert slow.cancel()
    started = time.time()
    file_glb, processed, result = client.predict(duck, RANDOM_TINY, True, 0.8, 64, True, api_name="/image_to_3d")
    glb_summary(file_glb)
    # one GPU slot: the next job (about a second) could only start once the cancelled 512^3 job (minutes) let go
    assert time.time() - started < 20


def test_readme_client_example_runs_against_random_weights(app_url, tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    code = next(block for block in re.findall(r"```python\n(.*?)```", readme, re.S) if "gradio_client" in block)
    assert 'checkpoint = "zxhezexin/openlrm-mix-base-1.1"' in code and RANDOM_TINY in code  # names the value
    code = code.replace("http://127.0.0.1:7860/", app_url).replace('"zxhezexin/openlrm-mix-base-1.1"', repr(RANDOM_TINY))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "photo.png").write_bytes((ROOT / "examples" / "duck.png").read_bytes())
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    glb_summary(namespace["glb_file"])
    assert namespace["result"]["seconds"]["total"] > 0 and namespace["result"]["random_weights"] is True


RANDOM_DMV3D = "random DMV3D (random weights, demo shapes)"


def glb_extras(path):
    import pygltflib

    return pygltflib.GLTF2().load(str(path)).asset.extras


def comparison_cells(path):
    """(columns, rows) of 160 px cells in a labelled comparison image (a seed margin left, an angle row below)."""
    from PIL import Image

    from recon3d.images import LABEL_ROW

    width, height = Image.open(path).size
    assert (height - LABEL_ROW) % 160 == 0 and 0 < width % 160 < 160  # the left margin is narrower than a cell
    return width // 160, (height - LABEL_ROW) // 160


def sample_call(client, *, seeds="", count=3, steps=4, checkpoint=RANDOM_DMV3D, api_name="/sample_3d"):
    from gradio_client import handle_file

    return client.submit(handle_file(str(ROOT / "examples" / "duck.png")), checkpoint, count, seeds, steps, False,
                         0.8, api_name=api_name)


def test_samples_tab_streams_three_seeds_into_three_distinct_glbs_and_more_keeps_them(app_url):
    import hashlib

    from gradio_client import Client, handle_file
    from PIL import Image

    client = Client(app_url, verbose=False)
    assert {"/sample_3d", "/more_samples"} <= set(client.view_api(print_info=False,
                                                                  return_format="dict")["named_endpoints"])
    job = sample_call(client, seeds="1, 7, 42")
    status, preview, comparison, files, views, result = job.result()
    assert len(files) == 3 and "3 samples (seeds 1, 7, 42)" in status and "Random weights" in status
    assert (result["seeds"], result["steps"], result["checkpoint"], views) == ([1, 7, 42], 4, RANDOM_DMV3D, None)
    assert result["seconds"]["sampling_and_meshing"] > 0 and result["random_weights"] is True
    digests = {hashlib.sha256(open(path, "rb").read()).hexdigest() for path in files}
    assert len(digests) == 3  # three different objects
    for path, seed in zip(files, (1, 7, 42)):
        glb_summary(path)
        extras = glb_extras(path)
        assert (extras["method"], extras["seed"], extras["steps"], extras["random_weights"]) == ("DMV3D", seed, 4, True)
        assert extras["checkpoint"] == "random weights" and extras["recon3d_version"]
    assert comparison_cells(comparison) == (4, 3)  # one row per sample, four angles, 160 px each, labelled
    streamed = job.outputs()[:-1]
    previews = {update[1] for update in streamed if isinstance(update[1], str)}
    assert len(previews) >= 4  # a new x0 preview at every step, before the samples were done
    assert Image.open(sorted(previews)[0]).size == (4 * 96, 3 * 96)  # three samples x four views
    assert not any(isinstance(update[3], list) for update in streamed[:4])  # the samples came after the previews
    assert len(job.outputs()[0]) == 6  # the result, not the page's slots (those are a page-only event)
    assert [len(update[3]) for update in streamed if isinstance(update[3], list)][-3:] == [1, 2, 3]  # files grow

    again = sample_call(client, seeds="7", count=1).result()[3]  # seed 7 alone: the same object as in the batch
    first_positions, again_positions = glb_summary(files[1])[0], glb_summary(again[0])[0]
    assert first_positions.shape == again_positions.shape and np.abs(first_positions - again_positions).max() < 1e-4

    more = sample_call(client, count=2, api_name="/more_samples").result()  # adds two new seeds to those shown
    status, _, comparison, more_files, _, result = more
    assert len(more_files) == 3 and "3 samples" in status  # the seed-7 call started over, then two were added
    assert comparison_cells(comparison) == (4, 3)
    assert open(more_files[0], "rb").read() == open(again[0], "rb").read()
    seeds = [glb_extras(path)["seed"] for path in more_files]
    assert seeds[0] == 7 and len(set(seeds)) == 3 and result["seeds"] == seeds
    listed = sample_call(client, seeds="7", count=1, api_name="/more_samples").result()[3]  # 7 shown: a new one
    assert len(listed) == 4 and glb_extras(listed[3])["seed"] not in seeds
    with pytest.raises(Exception, match="More samples adds to samples of the same image and checkpoint"):
        other = client.submit(handle_file(str(ROOT / "examples" / "mug.png")), RANDOM_DMV3D, 1, "", 4, False, 0.8,
                              api_name="/more_samples")
        other.result()


RANDOM_INSTANTMESH = "random Zero123++ -> InstantMesh (tiny, random weights)"


def test_samples_tab_serves_zero123plus_instantmesh_with_each_samples_six_views(app_url):
    from PIL import Image

    from gradio_client import Client

    client = Client(app_url, verbose=False)
    job = sample_call(client, seeds="3, 5", count=2, steps=2, checkpoint=RANDOM_INSTANTMESH)
    status, preview, comparison, files, views, result = job.result()
    assert len(files) == 2 and "2 samples (seeds 3, 5)" in status and "Random weights" in status
    assert result["seeds"] == [3, 5] and result["checkpoint"] == RANDOM_INSTANTMESH
    for path, seed in zip(files, (3, 5)):
        glb_summary(path)
        extras = glb_extras(path)
        assert (extras["method"], extras["seed"], extras["steps"], extras["guidance"]) == \
            ("Zero123++ v1.2 -> InstantMesh NeRF", seed, 2, 4.0)
        assert extras["reconstruct_at"] == [] and extras["random_weights"] is True
    assert len(views) == 2 and all(str(v).endswith(".png") for v in views)  # each sample's generated views
    assert Image.open(views[0]).size == (2 * 32, 3 * 32)  # the six views, 3 rows x 2 columns (tiny: 32 px each)
    assert Image.open(views[0]).tobytes() != Image.open(views[1]).tobytes()  # two seeds, two samples
    assert comparison_cells(comparison) == (4, 2)
    assert Image.open(preview).size == (6 * 96, 2 * 96)  # the last step's x0: two samples x six views


def test_image_to_3d_serves_instantmesh_on_zero123plus_views(app_url):
    from gradio_client import Client, handle_file
    from PIL import Image

    client = Client(app_url, verbose=False)
    glb_file, processed, result = client.predict(
        handle_file(str(ROOT / "examples" / "duck.png")), RANDOM_INSTANTMESH, False, 0.85, 64, True,
        api_name="/image_to_3d")
    glb_summary(glb_file)
    extras = glb_extras(glb_file)
    assert extras["method"] == "Zero123++ v1.2 -> InstantMesh NeRF (Image to 3D, one seed)"
    assert (extras["seed"], extras["steps"], extras["foreground_ratio"]) == (42, 75, 0.85)
    assert Image.open(processed).size == (512, 512)
    assert result["seconds"]["views, reconstruction and mesh"] > 0 and result["random_weights"] is True


def test_samples_tab_refuses_bad_seeds_counts_and_steps_in_one_line(app_url):
    from gradio_client import Client

    client = Client(app_url, verbose=False)
    cases = [({"seeds": "1, x"}, "Seeds must be whole numbers separated by commas; 'x' is not one"),
             ({"seeds": ", ".join(str(s) for s in range(9))}, "At most 8 samples at once, got 9"),
             ({"seeds": "3, 3"}, "Each seed may appear once"),
             ({"seeds": "-1"}, "Seed -1 is out of range"),
             ({"count": 9}, "Value 9 is greater than maximum value 8"),  # the slider checks its range
             ({"steps": 0}, "Steps must be between 1 and 200, got 0"),
             ({"steps": 2.5}, "Steps must be a whole number"),
             ({"steps": 1000}, "Steps must be between 1 and 200, got 1000"),
             ({"steps": None}, "Steps must be a number"),
             ({"checkpoint": "/etc"}, "Value: /etc is not in the list of choices")]  # never a server path
    for arguments, message in cases:
        with pytest.raises(Exception) as refused:
            sample_call(client, **arguments).result()
        assert message in str(refused.value) and "\n" not in str(refused.value), (arguments, str(refused.value))


def test_real_browser_cancel_says_it_cancelled(app_url, tmp_path):
    with browser_page(app_url, 1280, 1100) as page:
        page.wait_for_selector("#generate", timeout=60000)
        page.locator("#input-image input[type=file]").set_input_files(str(ROOT / "examples" / "duck.png"))
        page.locator("#mesh-resolution input").fill("384")  # a job long enough to cancel on a CPU
        page.locator("#generate").click()
        time.sleep(3)
        page.locator("#cancel").click()
        page.wait_for_function("document.querySelector('#timings').innerText.includes('Cancelled.')", timeout=30000)
        text = page.inner_text("#timings")
        screenshot(page, "image-to-3d-cancelled")
    assert "The job was stopped; nothing was kept from it." in text


def test_real_browser_shows_samples_side_by_side_with_a_live_preview(app_url, tmp_path):
    """With the default model of a --random-weights server: the tiny Zero123++ -> InstantMesh pair."""
    with browser_page(app_url, 1400, 1300) as page:
        page.get_by_role("tab", name="Stochastic samples").click()
        page.wait_for_selector("#samples-generate", timeout=60000)
        model = page.locator("#samples-model input").input_value()
        default_steps = page.locator("#samples-steps input").input_value()
        page.locator("#samples-image input[type=file]").set_input_files(str(ROOT / "examples" / "duck.png"))
        page.locator("#samples-seeds textarea").fill("1, 2, 3")
        page.locator("#samples-steps input").fill("4")
        waiting = [page.locator(f"#sample-{index}").is_visible() for index in range(8)]  # no wall of empty viewers
        page.locator("#samples-generate").click()
        page.locator("#samples-preview img").wait_for(state="visible", timeout=90000)  # x0 views while it runs
        centres = []
        for index in range(3):
            canvas = page.locator(f"#sample-{index} canvas")
            canvas.wait_for(state="visible", timeout=120000)
            centres.append(wait_for_mesh_pixels(page, canvas))
        page.locator("#samples-comparison img").wait_for(state="visible", timeout=60000)
        captions = [page.inner_text(f"#sample-caption-{index}") for index in range(3)]
        hidden = [page.locator(f"#sample-{part}3").is_visible() for part in ("", "caption-", "file-", "views-")]
        views = [page.locator(f"#sample-views-{index} img") for index in range(3)]
        for image in views:
            image.wait_for(state="visible", timeout=30000)  # each sample's six generated views
        view_sizes = [image.evaluate("img => [img.naturalWidth, img.naturalHeight]") for image in views]
        screenshot(page, "samples")
    assert model == RANDOM_INSTANTMESH and default_steps == "75"  # the pair is the default, with its own steps
    assert view_sizes == [[64, 96]] * 3  # 3 rows x 2 columns of the tiny model's 32 px views
    assert all(shows_mesh(centre) for centre in centres), "a sample's viewer shows no mesh"
    assert [caption.split()[:2] for caption in captions] == [["Seed", "1"], ["Seed", "2"], ["Seed", "3"]]
    assert waiting == [False] * 8 and hidden == [False] * 4  # slots appear as samples arrive; the fourth never did


# ---- Text to 3D -----------------------------------------------------------------------------------------------------

RANDOM_MVDREAM = "random MVDream (tiny, random weights)"


def last_sent(outputs, index):
    """The last value a streaming endpoint sent for output ``index`` (later updates may leave it unchanged)."""
    unchanged = {"__type__": "update"}
    return next(update[index] for update in reversed(outputs) if update[index] != unchanged)


def text_call(client, prompt="a red chair", *, preset="custom", steps=3, seed=5, guidance=50, api_name="/text_to_3d"):
    return client.submit(prompt, "", preset, steps, seed, guidance, RANDOM_MVDREAM, api_name=api_name)


def test_text_tab_streams_progress_previews_and_a_final_glb(app_url):
    from gradio_client import Client
    from PIL import Image

    client = Client(app_url, verbose=False)
    assert {"/text_to_3d", "/quick_look", "/stop_text_to_3d", "/export_text_to_3d"} <= set(
        client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    job = text_call(client)
    status, *_, result = job.result()
    plot, download = (last_sent(job.outputs(), index) for index in (2, 3))
    assert status.startswith("Done at step 3/3") and "Random weights" in status
    assert (result["steps_done"], result["steps"], result["ended"], result["seed"], result["preset"]) == \
        (3, 3, "done", 5, "custom") and result["seconds"] > 0
    extras = glb_extras(download)
    assert (extras["prompt"], extras["seed"], extras["preset"], extras["steps"]) == ("a red chair", 5, "custom", 3)
    assert extras["method"] == "MVDream SDS" and extras["random_weights"] is True
    positions, *_ = glb_summary(download)
    assert len(positions) > 0
    streamed = job.outputs()
    steps = [update[0] for update in streamed if isinstance(update[0], str) and update[0].startswith("Step ")]
    steps = list(dict.fromkeys(steps))  # (a preview comes with the status of its step again)
    assert len(steps) >= 3 and " left" in steps[0] and "loss starting" in steps[0]  # at least 3 progress events
    previews = [update[1] for update in streamed if isinstance(update[1], str)]
    assert len(set(previews)) >= 2 and Image.open(previews[-1]).size == (4 * 64, 64)  # four views, refreshed
    assert [row[0] for row in plot["data"]] == [1, 2, 3] and plot["columns"] == ["step", "log10 loss"]  # the curve
    assert [row[1] for row in plot["data"]] == pytest.approx([math.log10(float(s.rsplit("loss ", 1)[1].split("<")[0]))
                                                             for s in steps[:3]], abs=1e-3)

    look = client.predict("a red chair", 1, RANDOM_MVDREAM, api_name="/quick_look")
    assert Image.open(look).size == (4 * 256, 256)


def test_an_image_to_3d_job_does_not_wait_for_a_long_text_to_3d_run(app_url):
    """Another visitor's seconds-long job runs while an hours-long run is paused between its steps."""
    from gradio_client import Client, handle_file

    runner, visitor = Client(app_url, verbose=False), Client(app_url, verbose=False)
    job = text_call(runner, "a long run", steps=5000, seed=3)
    deadline = time.time() + 120
    while time.time() < deadline and sum(str(u[0]).startswith("Step ") for u in job.outputs()) < 2:
        time.sleep(0.2)
    started = time.time()
    glb, *_ = visitor.predict(handle_file(str(ROOT / "examples" / "duck.png")), "random-tiny (random weights)",
                              False, 0.8, 64, True, api_name="/image_to_3d")
    took = time.time() - started
    assert not job.done()  # the long run is still going ...
    glb_summary(glb)
    assert took < 60  # ... and the short job did not wait for its 5,000 steps
    assert "Stopping" in runner.predict(api_name="/stop_text_to_3d")
    job.result(timeout=120)
    statuses = [str(u[0]) for u in job.outputs() if str(u[0]).startswith("Step ")]
    assert any("for other visitors' jobs" in status for status in statuses)  # the run said it paused


def test_the_text_to_3d_endpoints_result_holds_its_glb(app_url):
    from gradio_client import Client

    client = Client(app_url, verbose=False)
    status, preview, plot, download, result = client.predict("a small vase", "", "custom", 2, 4, 50, RANDOM_MVDREAM,
                                                             api_name="/text_to_3d")
    assert status.startswith("Done at step 2/2") and str(download).endswith(".glb")
    glb_summary(download)
    assert glb_extras(download)["prompt"] == "a small vase"


def test_text_tab_exports_mid_run_and_stop_keeps_the_state(app_url):
    from gradio_client import Client

    client = Client(app_url, verbose=False)
    assert client.predict(api_name="/stop_text_to_3d") == "No text-to-3D job is running."
    job = text_call(client, "a tall lamp", steps=500, seed=9)
    deadline = time.time() + 120
    while time.time() < deadline and sum(str(u[0]).startswith("Step ") for u in job.outputs()) < 2:
        time.sleep(0.2)
    assert "Exporting" in client.predict(api_name="/export_text_to_3d")
    while time.time() < deadline and not any(isinstance(u[3], str) for u in job.outputs()):
        time.sleep(0.2)
    mid_run = next(u[3] for u in job.outputs() if isinstance(u[3], str))
    assert not job.done() and glb_extras(mid_run)["steps_done"] >= 2  # a GLB while the job goes on
    assert "Stopping" in client.predict(api_name="/stop_text_to_3d")
    status = job.result(timeout=120)[0]
    extras = glb_extras(last_sent(job.outputs(), 3))
    assert status.startswith("Stopped at step") and extras["stopped"] == "stop"
    assert extras["steps_done"] < 500 and f"step {extras['steps_done']}/500" in status.replace(",", "")


@pytest.mark.parametrize("prompt, preset, steps, seed, guidance, message", [
    ("   ", "fast", 10, 0, 50, "Type a prompt"),
    ("x" * 1001, "fast", 10, 0, 50, "keep it under 1000"),
    ("a cup", "custom", 0, 0, 50, "Steps must be between 1 and 20000"),
    ("a cup", "custom", 2.5, 0, 50, "Steps must be a whole number"),
    ("a cup", "fast", 10, -1, 50, "Seed must be between 0 and 2147483647, got -1"),
    ("a cup", "fast", 10, 0, None, "Guidance scale must be a number"),
    ("a cup", "fast", 10, 0, 500, "Guidance scale must be between 0 and 200"),
])
def test_text_tab_refuses_bad_input_in_one_line(app_url, prompt, preset, steps, seed, guidance, message):
    from gradio_client import Client

    client = Client(app_url, verbose=False)
    with pytest.raises(Exception) as error:
        client.predict(prompt, "", preset, steps, seed, guidance, RANDOM_MVDREAM, api_name="/text_to_3d")
    assert message in str(error.value) and "\n" not in str(error.value).strip()


def test_text_tab_says_when_a_long_prompt_was_cut(app_url):
    from gradio_client import Client

    client = Client(app_url, verbose=False)
    job = text_call(client, "a very " + "very " * 90 + "tall tower", steps=1)
    status = job.result()[0]
    assert "longer than 75 tokens" in status and glb_extras(last_sent(job.outputs(), 3))["prompt_truncated"] is True


def test_real_browser_sees_the_text_preview_update_and_the_mesh(app_url, tmp_path):
    with browser_page(app_url, 1400, 1400) as page:
        page.get_by_role("tab", name="Text to 3D").click()
        page.wait_for_selector("#text-generate", timeout=60000)
        page.locator("#text-prompt textarea").fill("a blue mug")
        page.locator("#text-preset").get_by_label("custom").check()
        page.locator("#text-steps input").fill("6")
        page.locator("#text-generate").click()
        page.wait_for_function("document.querySelector('#text-status').innerText.includes('Step ')", timeout=120000)
        page.locator("#text-export").click()
        page.wait_for_function("document.querySelector('#text-switch-note').innerText.includes('Exporting')",
                               timeout=30000)
        during_export = page.inner_text("#text-status")  # the step line stays in view beside the note
        image = page.locator("#text-preview img")
        image.wait_for(state="visible", timeout=120000)
        sources = {image.get_attribute("src")}
        deadline = time.time() + 120
        while time.time() < deadline and len(sources) < 2:
            sources.add(image.get_attribute("src"))
            time.sleep(0.2)
        canvas = page.locator("#text-viewer canvas")
        canvas.wait_for(state="visible", timeout=300000)
        centre = wait_for_mesh_pixels(page, canvas, timeout=120)
        status = page.inner_text("#text-status")
        page.wait_for_function("document.querySelector('#text-status').innerText.includes('Done')", timeout=300000)
        page.wait_for_function("document.querySelector('#text-switch-note').innerText.trim() === ''", timeout=30000)
        status, note = page.inner_text("#text-status"), page.inner_text("#text-switch-note")
        screenshot(page, "text-to-3d")
    assert len(sources) >= 2, "the preview never refreshed"
    assert shows_mesh(centre), "the viewer shows no mesh"
    assert during_export.startswith("Step ") and "left" in during_export
    assert "Done at step 6/6" in status and note.strip() == ""  # the export arrived: its note is gone


def test_real_browser_a_refused_upload_says_why_next_to_the_input_which_empties(app_url, tmp_path):
    notes = tmp_path / "notes.png"
    notes.write_text("a text file with an image's name")
    with browser_page(app_url, 1280, 1100) as page:
        for tab, elem in (("Image to 3D", "input-image"), ("Stochastic samples", "samples-image")):
            page.get_by_role("tab", name=tab).click()
            page.locator(f"#{elem} input[type=file]").set_input_files(str(notes))
            page.wait_for_function(f"document.querySelector('#{elem}-note').innerText.includes('not an image')",
                                   timeout=30000)
            note = page.inner_text(f"#{elem}-note")
            time.sleep(0.5)
            emptied = page.locator(f"#{elem} img").count() == 0
            screenshot(page, f"refused-upload-{elem}")
            assert note.strip() == "⚠️ notes.png: not an image file (PNG, JPEG or WebP expected)" and emptied
            page.locator(f"#{elem} input[type=file]").set_input_files(str(ROOT / "examples" / "duck.png"))
            page.wait_for_function(f"document.querySelector('#{elem}-note').innerText.trim() === ''", timeout=30000)


def test_real_browser_on_a_phone_every_tab_is_in_reach(app_url):
    with browser_page(app_url, 390, 844) as page:
        page.wait_for_selector("#generate", timeout=60000)
        time.sleep(1)
        visible = [page.get_by_role("tab", name=name).is_visible()
                   for name in ("Image to 3D", "Stochastic samples", "Text to 3D")]
        screenshot(page, "phone-390px")
        page.get_by_role("tab", name="Text to 3D").click()
        page.wait_for_selector("#text-generate", timeout=30000)
    assert visible == [True, True, True]  # none behind a "..." menu


def test_a_waiting_job_knows_its_place_and_one_visitor_runs_one_long_job(app_url):
    from gradio_client import Client, handle_file

    first, second = Client(app_url, verbose=False), Client(app_url, verbose=False)
    duck = handle_file(str(ROOT / "examples" / "duck.png"))
    slow = first.submit(duck, RANDOM_TINY, True, 0.8, 512, True, api_name="/image_to_3d")  # minutes on a CPU
    deadline = time.time() + 60
    while time.time() < deadline and not (slow.status().progress_data or []):
        time.sleep(0.2)
    quick = second.submit(duck, RANDOM_TINY, True, 0.8, 64, True, api_name="/image_to_3d")
    said = set()
    while time.time() < deadline and not any(text.startswith("Waiting for the device: next in line") for text in said):
        said |= {unit.desc for unit in (quick.status().progress_data or []) if unit.desc}
        time.sleep(0.1)
    slow.cancel()
    glb, _, result = quick.result(timeout=120)
    glb_summary(glb)
    assert any(text.startswith("Waiting for the device: next in line") for text in said), said
    run = text_call(first, "a long run", steps=500, seed=1)
    while time.time() < deadline + 60 and not any(str(u[0]).startswith("Step ") for u in run.outputs()):
        time.sleep(0.2)
    with pytest.raises(Exception, match="You already have a Text to 3D run going or waiting"):
        text_call(first, "another", steps=5).result(timeout=60)  # the same visitor, while the first goes on
    queued, said = text_call(second, "a queued run", steps=5), set()  # another visitor: waits for the first
    while time.time() < deadline + 120 and not any(text.startswith("Waiting for the device: next in line")
                                                   for text in said):
        said |= {unit.desc for unit in (queued.status().progress_data or []) if unit.desc}
        time.sleep(0.1)
    assert any(text.startswith("Waiting for the device: next in line") for text in said), said
    assert second.predict(api_name="/export_text_to_3d") == "Your run is still waiting in line: nothing to export yet."
    assert second.predict(api_name="/stop_text_to_3d") == "Your run had not started: it leaves the line."
    with pytest.raises(Exception, match="The job was cancelled"):
        queued.result(timeout=60)
    assert not run.done()
    assert "Stopping" in first.predict(api_name="/stop_text_to_3d")
    run.result(timeout=120)


def test_every_tab_exports_its_results_through_its_endpoint(app_url):
    """/export_samples, /export_text and /export_image as the README shows them: the results of the same client
    session made again as other files (random weights: the path, not the shapes)."""
    import zipfile

    import pygltflib
    import trimesh
    from gradio_client import Client, handle_file

    client = Client(app_url, verbose=False)
    sample_call(client, seeds="3, 5", count=2, steps=2).result()
    files, message = client.predict(1000, 0, ["ply", "stl"], api_name="/export_samples")
    assert sorted(Path(path).name for path in files) == ["seed-3.ply", "seed-3.stl", "seed-5.ply", "seed-5.stl"]
    assert all(len(trimesh.load(path, process=False).faces) <= 1000 for path in files) and "4 files" in message
    client.predict("a small vase", "", "custom", 2, 4, 50, RANDOM_MVDREAM, api_name="/text_to_3d")
    (glb,), _ = client.predict(None, 64, ["glb"], api_name="/export_text")
    gltf = pygltflib.GLTF2().load(glb)
    assert gltf.meshes[0].primitives[0].attributes.TEXCOORD_0 is not None and gltf.asset.extras["prompt"] == "a small vase"
    client.predict(handle_file(str(ROOT / "examples" / "duck.png")), RANDOM_TINY, True, 0.8, 64, True,
                   api_name="/image_to_3d")
    (archive,), _ = client.predict(300, 128, ["obj"], api_name="/export_image")
    with zipfile.ZipFile(archive) as bundle:
        assert sorted(bundle.namelist()) == ["duck.mtl", "duck.obj", "duck.png"]


def test_real_browser_exports_from_the_panel_and_its_cancel_says_so(app_url):
    with browser_page(app_url, 1280, 1400) as page:
        page.wait_for_selector("#generate", timeout=60000)
        page.locator("#input-image input[type=file]").set_input_files(str(ROOT / "examples" / "duck.png"))
        page.locator("#mesh-resolution input").fill("64")
        page.locator("#generate").click()
        page.wait_for_function("document.querySelector('#timings').innerText.includes('total')", timeout=120000)
        page.locator("#export-image").get_by_text("Export: face budget").click()  # open the accordion
        page.locator("#export-image-faces input").fill("800")
        page.locator("#export-image-formats").get_by_label("stl").check()
        page.locator("#export-image-go").click()
        page.wait_for_function("document.querySelector('#export-image-message').innerText.includes('2 files')",
                               timeout=120000)
        names = page.locator("#export-image-files").inner_text()
        screenshot(page, "image-export")
    assert ".glb" in names and ".stl" in names
