"""The page built in-process (no server): its wiring, queues and limits, and the handlers' error mapping. Fast;
the launched app and real browsers are in test_app.py (slow)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from recon3d import app
from recon3d.app.common import GPU_QUEUE
from recon3d.service import ModelService, ServiceSettings
from recon3d.sessions import Sessions


def page(service=None):
    return app.build_app(service or ModelService(ServiceSettings(random_weights=True)), Sessions(app.OUTPUTS_DIR))


def component(demo, elem_id):
    return next(c for c in demo.config["components"] if c["props"].get("elem_id") == elem_id)


def test_the_library_and_the_cli_never_import_gradio():
    code = "import sys, recon3d, recon3d.__main__, recon3d.service; print('gradio' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr


def test_app_py_only_composes_the_page():
    source = (ROOT / "app.py").read_text()
    assert "from recon3d.app import main" in source and len(source.splitlines()) < 15


def test_form_limits_are_the_librarys():
    """Every range the page states comes from the options' limits (change a limit, the page follows)."""
    from recon3d.options import limit_of
    from recon3d.pipelines.image_to_3d import ImageTo3DOptions
    from recon3d.pipelines.sample_3d import COUNT, SampleOptions
    from recon3d.pipelines.text_to_3d import TextTo3DOptions

    demo = page()
    resolution = limit_of(ImageTo3DOptions, "mesh_resolution")
    assert component(demo, "mesh-resolution")["props"]["label"] == f"Mesh resolution ({resolution.text})"
    count = component(demo, "samples-count")["props"]
    assert (count["minimum"], count["maximum"]) == (COUNT.low, COUNT.high)
    assert f"({limit_of(SampleOptions, 'steps').text})" in component(demo, "samples-steps")["props"]["label"]
    assert f"({limit_of(TextTo3DOptions, 'steps').text})" in component(demo, "text-steps")["props"]["label"]
    assert component(demo, "text-seed")["props"]["label"] == f"Seed ({limit_of(TextTo3DOptions, 'seed').text})"
    assert [tuple(c) for c in component(demo, "text-preset")["props"]["choices"]] == [(c, c) for c in TextTo3DOptions.PRESET_CHOICES]


def test_the_server_passes_its_ttl_to_a_janitor(tmp_path):
    import threading

    demo, sessions, _ = app.serve(app.parse_args(["--random-weights", "--output-ttl", "7"]), tmp_path / "outputs")
    assert sessions.ttl_s == 7.0 and sessions.root == tmp_path / "outputs"
    assert any(thread.name == "recon3d-outputs-janitor" and thread.is_alive() for thread in threading.enumerate())


def test_the_operators_limits_are_app_options_that_reach_the_queues_and_the_form(tmp_path):
    from recon3d.app.text_tab import form_options
    from recon3d.sharing import QueueRefused

    args = app.parse_args(["--random-weights", "--max-queue", "3", "--max-long-queue", "2",
                           "--long-runs-per-visitor", "1", "--max-text-steps", "500"])
    demo, _, service = app.serve(args, tmp_path / "outputs")
    lease = service.lease
    assert (lease.max_waiting, lease.max_long_waiting, lease.long_runs_per_owner) == (3, 2, 1)
    assert component(demo, "text-steps")["props"]["label"] == "Steps for custom (1..500 on this server)"
    assert "over this server's limit of 500" in component(demo, "text-steps")["props"]["info"]  # fast: 2,000
    assert service.text_steps(form_options("custom", 500, 0, 50, "")) == 500
    with pytest.raises(ValueError, match=r"^this server runs at most 500 steps per Text to 3D run \(the fast "):
        service.text_steps(form_options("fast", None, 0, 50, ""))
    for _ in range(3):
        lease.short_job("Image to 3D")
    with pytest.raises(QueueRefused, match="the queue is full"):
        lease.short_job("Image to 3D")
    with pytest.raises(SystemExit):
        app.parse_args(["--max-queue", "0"])
    assert app.parse_args([]).max_text_steps is None  # no limit but the library's by default


def test_the_page_reads_its_limits_from_the_service_settings():
    from recon3d.app.text_tab import steps_field

    roomy = ModelService(ServiceSettings(random_weights=True, max_text_steps=20000))
    tight = ModelService(ServiceSettings(random_weights=True, max_text_steps=5000))
    assert "over this server" not in steps_field("quality", roomy)["info"]  # 10,000 fits under 20,000
    assert "(over this server's limit of 5,000: choose custom)" in steps_field("quality", tight)["info"]
    assert "over this server" not in steps_field("fast", tight)["info"]  # 2,000 fits


class Clock:
    now = 1000.0

    def __call__(self):
        return self.now


def test_an_api_callers_files_expire_after_the_ttl(tmp_path):
    """The Image to 3D handler as an API caller (no browser session) runs it: its GLB, processed input and
    upload exist, and are deleted once the TTL has passed (on a fake clock, as the janitor would)."""
    import asyncio

    from recon3d.app import image_tab

    clock, upload = Clock(), tmp_path / "photo.png"
    upload.write_bytes((ROOT / "examples" / "duck.png").read_bytes())  # a caller's own upload, not an example
    sessions = Sessions(tmp_path / "outputs", ttl_s=60, clock=clock)
    handler = image_tab.make_handler(ModelService(ServiceSettings(random_weights=True)), sessions)
    glb, processed, result, shown = asyncio.run(handler(str(upload), "random-tiny (random weights)", False, 0.8, 64,
                                                        True, progress=lambda *a, **k: None))
    made = [Path(processed), Path(glb), upload]
    assert all(path.is_file() for path in made) and result["seconds"]["encoder"] > 0
    viewer, table = image_tab.show_result(shown)  # what the page shows of it
    assert viewer == glb and "| encoder |" in table and "**total**" in table
    clock.now += 59
    assert sessions.expire() == [] and all(path.is_file() for path in made)
    clock.now += 2
    assert sessions.expire() == ["anonymous"] and not any(path.exists() for path in made)


def test_the_text_forms_steps_count_only_with_custom():
    """The page passes the Steps box only with "custom", so a GLB says "quality" for a quality run."""
    from recon3d.app.text_tab import form_options

    quality = form_options("quality", 6, 3, 50, " blurry ")
    assert (quality.label, quality.steps, quality.seed, quality.negative_prompt) == ("quality", None, 3, "blurry")
    assert quality.recipe("cpu").steps == 10000
    custom = form_options("custom", 6, 3, 50, "")
    assert (custom.label, custom.recipe("cpu").steps) == ("custom", 6)


class OutOfMemoryPipe:
    random_weights = False

    def run(self, image, options, cancel):
        import torch

        yield from ()
        raise torch.OutOfMemoryError("CUDA out of memory")


def test_out_of_memory_and_a_missing_image_become_clear_ui_errors(tmp_path):
    import asyncio

    import gradio as gr

    from recon3d.app import image_tab
    from recon3d.sessions import Sessions

    from recon3d.sharing import DeviceLease

    class Service:
        lease = DeviceLease()

        def image_to_3d(self, name):
            return OutOfMemoryPipe()

    handler = image_tab.make_handler(Service(), Sessions(tmp_path))

    def call(image):
        return asyncio.run(handler(image, "any", True, 0.8, 256, True, progress=lambda *a, **k: None))

    with pytest.raises(gr.Error, match="Out of memory: try a lower resolution"):
        call(str(ROOT / "examples" / "duck.png"))
    with pytest.raises(gr.Error, match="Upload an image first"):
        call(None)


def test_short_jobs_enter_their_line_at_once_with_a_cancel_button_and_one_progress_display():
    demo = page()
    fns = {fn.name: fn for fn in demo.fns.values()}
    # jobs enter at once and wait in the library's line (in order, with their place); Gradio queues nothing
    assert (fns["image_to_3d"].concurrency_id, fns["image_to_3d"].concurrency_limit) == (GPU_QUEUE, None)
    dependencies = demo.config["dependencies"]
    generate = next(d for d in dependencies if d["api_name"] == "image_to_3d")
    viewer = next(c["id"] for c in demo.config["components"] if c["props"].get("elem_id") == "viewer")
    assert generate["show_progress_on"] == [viewer]  # one progress bar, not one per output panel
    cancel_button = next(c["id"] for c in demo.config["components"] if c["props"].get("elem_id") == "cancel")
    cancels = [d["cancels"] for d in dependencies if d["targets"] == [(cancel_button, "click")]]
    assert [generate["id"]] in cancels
    unload = [d for d in dependencies if d["targets"] == [(None, "unload")]]
    assert [d["api_name"] for d in unload] == ["end_session"]


def test_cpu_servers_default_to_a_lower_resolution_and_say_what_a_job_costs():
    import torch

    from recon3d.app.image_tab import CPU_BENCHMARK, cpu_cost_note, load_cpu_costs
    from recon3d.mesh import default_resolution

    assert default_resolution(torch.device("cpu")) == 128 and default_resolution(torch.device("cuda")) == 256
    recorded = json.loads(CPU_BENCHMARK.read_text())["runs"]
    costs = load_cpu_costs(CPU_BENCHMARK)
    note = cpu_cost_note(costs)
    for run in recorded:  # every CPU figure of the benchmark reaches the page
        assert costs[run["size"]][run["resolution"]] == run["seconds"]["total"]
        assert f"{run['seconds']['total']:.0f} s at {run['resolution']}" in note
    assert {128, 256} <= set(costs["base"])
    assert load_cpu_costs(CPU_BENCHMARK.parent / "missing.json") == {}




def test_samples_tab_shares_the_gpu_queue_its_cancel_stops_both_buttons_and_typed_paths_are_refused():
    from recon3d.checkpoints import DEMO_DMV3D_LABEL
    from recon3d.hub import CheckpointError
    service = ModelService(ServiceSettings(random_weights=True))
    demo = page(service)
    dependencies = demo.config["dependencies"]
    events = {d["api_name"]: d for d in dependencies if d["api_name"] in ("sample_3d", "more_samples")}
    assert set(events) == {"sample_3d", "more_samples"}
    fns = [fn for fn in demo.fns.values() if fn.api_name in events]
    assert {(fn.concurrency_id, fn.concurrency_limit) for fn in fns} == {(GPU_QUEUE, None)}
    cancel_button = next(c["id"] for c in demo.config["components"] if c["props"].get("elem_id") == "samples-cancel")
    cancels = [d["cancels"] for d in dependencies if d["targets"] == [(cancel_button, "click")]]
    assert [events["sample_3d"]["id"], events["more_samples"]["id"]] in cancels
    labels = [label for label, _ in service.dmv3d_choices()]
    assert labels[0] == DEMO_DMV3D_LABEL and "random DMV3D (random weights, demo shapes)" in labels
    with pytest.raises(CheckpointError, match="unknown DMV3D checkpoint"):
        service.sample_3d(str(ROOT / "assets"))  # a folder on the server that is not on the list




def test_zero123plus_instantmesh_is_offered_first_when_cached_with_its_own_defaults_and_licences(monkeypatch):
    from recon3d import service as service_module
    from recon3d.app.samples_tab import intro, model_defaults
    from recon3d.checkpoints import INSTANTMESH_ID
    from recon3d.hub import CheckpointError
    from recon3d.pipelines.multiview_sample import MultiViewOptions
    from recon3d.pipelines.sample_3d import SampleOptions

    service = ModelService(ServiceSettings(offline=True))
    monkeypatch.setattr(service_module, "instantmesh_cached", lambda: False)
    assert service.sample_choices()[-1][1] == INSTANTMESH_ID  # offered, not the default
    monkeypatch.setattr(service_module, "instantmesh_cached", lambda: True)
    choices = service.sample_choices()
    assert choices[0][1] == INSTANTMESH_ID and "CC BY-NC 4.0" in choices[0][0]
    assert "CC BY-NC 4.0" in intro(service) and "Apache-2.0" in intro(service)
    steps, ratio = model_defaults(INSTANTMESH_ID)
    assert (steps["value"], ratio["value"]) == (MultiViewOptions.steps, MultiViewOptions.foreground_ratio) == (75, 0.85)
    steps, ratio = model_defaults(choices[1][1])
    assert (steps["value"], ratio["value"]) == (SampleOptions.steps, SampleOptions.foreground_ratio)
    random = ModelService(ServiceSettings(random_weights=True))
    assert random.sample_choices()[0][1] == service_module.RANDOM_INSTANTMESH
    with pytest.raises(CheckpointError, match="unknown sampler"):
        random.sample_3d(INSTANTMESH_ID)  # the real pair is not served by a random-weights app


def test_image_to_3d_offers_instantmesh_on_zero123plus_views_sharing_the_loaded_sampler():
    from recon3d.checkpoints import INSTANTMESH_ID
    from recon3d.pipelines.multiview_sample import ViewsImageTo3D
    from recon3d.service import RANDOM_INSTANTMESH

    assert ModelService(ServiceSettings(offline=True)).lrm_choices()[-1][1] == INSTANTMESH_ID
    service = ModelService(ServiceSettings(random_weights=True))
    assert service.lrm_choices()[-1][1] == RANDOM_INSTANTMESH
    job = service.image_to_3d(RANDOM_INSTANTMESH)
    assert isinstance(job, ViewsImageTo3D) and job.sampler is service.sample_3d(RANDOM_INSTANTMESH)
    assert job.random_weights
    from recon3d.app.image_tab import foreground_default

    assert foreground_default(RANDOM_INSTANTMESH)["value"] == 0.85
    assert foreground_default(service.lrm_choices()[0][1])["value"] == 0.8


def test_a_refusal_is_one_log_line_and_a_bug_keeps_its_traceback_with_a_report_id(tmp_path, caplog):
    import asyncio
    import logging
    import re

    import gradio as gr

    from recon3d.app import image_tab
    from recon3d.sessions import Sessions
    from recon3d.sharing import DeviceLease

    class Bug(Exception):
        pass

    class Service:
        lease = DeviceLease()

        def image_to_3d(self, name):
            raise Bug("a mistake in the code")

    handler = image_tab.make_handler(Service(), Sessions(tmp_path))

    def call(ratio):
        return asyncio.run(handler(str(ROOT / "examples" / "duck.png"), "any", True, ratio, 64, True,
                                   progress=lambda *a, **k: None))

    caplog.set_level(logging.INFO, logger="recon3d")
    with pytest.raises(gr.Error) as refused:
        call(0.3)
    assert refused.value.print_exception is False  # Gradio prints no traceback for it
    records = [r for r in caplog.records if r.name.startswith("recon3d")]
    assert [(r.levelname, r.getMessage(), r.exc_info) for r in records] == \
        [("INFO", "refused: Foreground ratio must be between 0.5 and 1, got 0.3", None)]
    caplog.clear()
    with pytest.raises(gr.Error) as bug:
        call(0.8)
    report = re.search(r"Unexpected error \(Bug, report ([0-9a-f]{6})\); the server log has the details",
                       str(bug.value)).group(1)
    logged = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(logged) == 1 and report in logged[0].getMessage() and logged[0].exc_info is not None


def test_the_steps_box_shows_what_a_schedule_runs_and_is_editable_for_custom_only():
    from recon3d.app.text_tab import steps_field
    from recon3d.pipelines.sds import PRESETS

    service = ModelService(ServiceSettings(random_weights=True))
    demo = page(service)
    box = component(demo, "text-steps")["props"]
    assert box["value"] == PRESETS["fast"].steps and box["interactive"] is False and "2,000 steps" in box["info"]
    quality = steps_field("quality", service)
    assert (quality["value"], quality["interactive"]) == (PRESETS["quality"].steps, False)
    assert steps_field("custom", service) == {"interactive": True, "info": "custom: the number of steps to run"}


def test_the_step_line_speaks_plain_words_with_the_technical_values_in_a_details_row():
    from recon3d.app.text_tab import loss_trend, step_status
    from recon3d.pipelines.events import StepReport

    falling = [(step, 10.0 ** (6 - 0.1 * step)) for step in range(1, 21)]
    flat = [(step, 5e5) for step in range(1, 21)]
    assert (loss_trend(falling), loss_trend(flat), loss_trend(falling[::-1]), loss_trend(flat[:3])) == \
        ("falling", "flat", "rising", "starting")
    report = StepReport(fraction=0.1, message="", step=20, steps=2000, loss=8.362e6, t=930, t_range=(0.92, 0.95),
                        resolution=64, elapsed=30.0, eta=600.0)
    line = step_status(report, falling)
    assert line.startswith("Step 20/2,000 · noise level 0.92-0.95 · loss falling · 64 px · elapsed 30 s · "
                           "about 10 min left")
    assert line.endswith("<sub>details: timesteps drawn from [0.92, 0.95] of the schedule, loss 8.362e+06</sub>")


def test_cancel_says_that_it_cancelled():
    from recon3d.app import image_tab, samples_tab

    demo = page()
    by_id = {c["id"]: c["props"].get("elem_id") for c in demo.config["components"]}
    for button, shown, text in (("cancel", "timings", image_tab.CANCELLED),
                                ("samples-cancel", "samples-status", samples_tab.CANCELLED)):
        target = next(i for i, elem in by_id.items() if elem == button)
        clicks = [d for d in demo.config["dependencies"] if d["targets"] == [(target, "click")]]
        assert any(d["cancels"] for d in clicks)  # (Gradio keeps the cancelling apart from the message)
        says = next(d for d in clicks if d["outputs"])
        assert [by_id[o] for o in says["outputs"]] == [shown]
        assert demo.fns[says["id"]].fn() == text and text.startswith("**Cancelled.**")


def test_quick_look_has_a_status_line():
    from recon3d.app.text_tab import QUICK_LOOK_DONE, QUICK_LOOK_STARTED

    demo = page()
    by_id = {c["id"]: c["props"].get("elem_id") for c in demo.config["components"]}
    button = next(i for i, elem in by_id.items() if elem == "text-quick-look")
    said = [demo.fns[d["id"]].fn() for d in demo.config["dependencies"]
            if [by_id[o] for o in d["outputs"]] == ["text-quick-status"] and d["backend_fn"]
            and (d["targets"] == [(button, "click")] or d.get("trigger_after") is not None)
            and demo.fns[d["id"]].fn.__code__.co_argcount <= 1]
    assert QUICK_LOOK_STARTED in said and QUICK_LOOK_DONE in said


ENDPOINTS = {  # what each endpoint returns, by name: the README documents these
    "/image_to_3d": ["GLB", "Processed input", "Result"],
    "/sample_3d": ["Status", "Denoising: each sample as it is now (rows: samples, columns: views)",
                   "Comparison: every sample from the same angles", "GLBs", "Generated views", "Result"],
    "/more_samples": ["Status", "Denoising: each sample as it is now (rows: samples, columns: views)",
                      "Comparison: every sample from the same angles", "GLBs", "Generated views", "Result"],
    "/text_to_3d": ["Status", "Optimisation: four views of the current 3D object", "Loss (log10)", "GLB", "Result"],
    "/quick_look": ["Quick look: what the prior imagines (no 3D yet)"],
    "/stop_text_to_3d": ["Message"],
    "/export_text_to_3d": ["Message"],
    "/export_image": ["Exported files", "Message"],
    "/export_samples": ["Exported files", "Message"],
    "/export_text": ["Exported files", "Message"],
}


def test_the_api_shows_each_endpoints_result_by_name_and_none_of_the_pages_widget_slots():
    info = page().get_api_info()
    returns = {name: [r["label"] for r in endpoint["returns"]] for name, endpoint in info["named_endpoints"].items()}
    assert returns == ENDPOINTS  # no unnamed values, no viewers or per-sample slots
    assert not info["unnamed_endpoints"]
    readme = (ROOT / "README.md").read_text()
    assert all(f"`{name}`" in readme for name in ENDPOINTS)  # each one documented


def test_a_refused_upload_says_why_next_to_the_input_and_empties_it(tmp_path, caplog):
    import logging

    from recon3d.app.common import check_upload

    broken = tmp_path / "photo.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    caplog.set_level(logging.INFO, logger="recon3d")
    image, note = check_upload(str(broken))
    assert image is None and note.startswith("⚠️ ") and "photo.png" in note and "\n" not in note
    assert [r.getMessage() for r in caplog.records if r.name.startswith("recon3d")] == [f"refused upload: {note[3:]}"]
    image, note = check_upload(str(ROOT / "examples" / "duck.png"))
    assert image == {"__type__": "update"} and note == ""
    demo = page()
    by_id = {c["id"]: c["props"].get("elem_id") for c in demo.config["components"]}
    for elem in ("input-image", "samples-image"):
        target = next(i for i, e in by_id.items() if e == elem)
        upload = next(d for d in demo.config["dependencies"] if d["targets"] == [(target, "upload")])
        assert [by_id[o] for o in upload["outputs"]] == [elem, f"{elem}-note"]


def test_sample_slots_show_samples_as_they_arrive_and_leave_shown_viewers_alone(tmp_path):
    import gradio as gr

    from recon3d.app.samples_tab import SampleSlots
    from recon3d.service import ShownSample

    with gr.Blocks():
        slots = SampleSlots(4)
        slots.wire(gr.State([]))

    def sample(seed):
        return ShownSample(seed, None, tmp_path / f"seed-{seed}.glb", "model", "digest", True)

    first = slots.fill([sample(1)], [])
    assert first[slots.viewers[0]] == {"__type__": "update", "value": str(tmp_path / "seed-1.glb"), "visible": True}
    assert slots.viewers[1] not in first  # the other slots wait, hidden
    on_page = first[slots.on_page]
    second = slots.fill([sample(1), sample(2)], on_page)
    assert slots.viewers[0] not in second  # already shown: not sent again (a viewer would reload it)
    assert second[slots.captions[1]]["value"].startswith("**Seed 2**") and second[slots.files[1]]["visible"] is True
    cleared = slots.fill([], second[slots.on_page])  # a new run starts
    assert [cleared[viewer]["visible"] for viewer in slots.viewers[:2]] == ["hidden", "hidden"]
    assert cleared[slots.viewers[0]]["value"] is None and cleared[slots.on_page] == []


def test_the_export_panel_makes_the_result_again_as_other_files_without_the_model(tmp_path):
    """Image to 3D as a visitor, then its Export: a textured GLB within the face budget, the OBJ as a ZIP with its
    MTL and PNG, an STL; nothing to export before a result or after the visitor left; bad values in one line."""
    import asyncio
    import zipfile

    import gradio as gr
    import pygltflib

    from recon3d.app import export_panel, image_tab

    service, sessions = ModelService(ServiceSettings(random_weights=True)), Sessions(tmp_path / "outputs")
    export = export_panel.make_handler(service, sessions, "image")
    run = lambda handler, *args: asyncio.run(handler(*args, progress=lambda *a, **k: None))  # noqa: E731
    with pytest.raises(gr.Error, match="Nothing to export yet: make a model in this tab first"):
        run(export, 500, 128, ["glb"])
    glb, *_ = run(image_tab.make_handler(service, sessions), str(ROOT / "examples" / "duck.png"),
                  "random-tiny (random weights)", False, 0.8, 64, True)
    calls = []
    service_image_to_3d = service.image_to_3d
    service.image_to_3d = lambda name: calls.append(name) or service_image_to_3d(name)
    files, message = run(export, 500, 128, ["glb", "obj", "stl"])
    names = sorted(Path(path).name for path in files)
    assert names == ["duck.glb", "duck.obj.zip", "duck.stl"] and message == "3 files: at most 500 faces, a 128x128 texture."
    gltf = pygltflib.GLTF2().load(next(path for path in files if path.endswith(".glb")))
    assert gltf.meshes[0].primitives[0].attributes.TEXCOORD_0 is not None
    assert gltf.asset.extras["export"]["faces"] <= 500 and gltf.asset.extras["method"] == "LRM"
    with zipfile.ZipFile(next(path for path in files if path.endswith(".zip"))) as bundle:
        assert sorted(bundle.namelist()) == ["duck.mtl", "duck.obj", "duck.png"]
    assert all(str(sessions.root) in path for path in files)  # in the visitor's private folder
    assert calls == ["random-tiny (random weights)"]  # the loaded pipeline rebuilt the field: no model run
    for faces, texture, formats, said in ((50, 0, ["glb"], "Face budget must be between 100 and 10000000, got 50"),
                                          (None, 9, ["glb"], "Texture size must be between 64 and 8192, got 9"),
                                          (None, 0, [], "Unknown export format (none given)")):
        with pytest.raises(gr.Error, match=re.escape(said)):
            run(export, faces, texture, formats)
    sessions.end("anonymous")  # the visitor left: what was kept for them is gone with their files
    with pytest.raises(gr.Error, match="Nothing to export yet"):
        run(export, None, 0, ["glb"])


def test_every_element_id_on_the_page_is_unique():
    """Browser tests and visitors' scripts find widgets by id: two widgets with one id would make both ambiguous."""
    from collections import Counter

    ids = Counter(c["props"].get("elem_id") for c in page().config["components"] if c["props"].get("elem_id"))
    assert [elem for elem, count in ids.items() if count > 1] == []


def test_an_export_prepares_on_the_cpu_while_another_job_holds_the_device(tmp_path):
    """Decimation and UV charts need no device: they are done before the export takes its place in line, so a
    busy device delays only the field's colours."""
    import asyncio
    import threading

    from recon3d.app import image_tab
    from recon3d.export import ExportOptions
    from recon3d.pipelines.events import Queued, Stage
    from recon3d.service import export_job

    service, sessions = ModelService(ServiceSettings(random_weights=True)), Sessions(tmp_path / "outputs")
    asyncio.run(image_tab.make_handler(service, sessions)(str(ROOT / "examples" / "duck.png"),
                                                          "random-tiny (random weights)", False, 0.8, 64, True,
                                                          progress=lambda *a, **k: None))
    held, release = threading.Event(), threading.Event()

    def busy():
        with service.lease.short():
            held.set()
            release.wait(30)

    threading.Thread(target=busy).start()
    assert held.wait(10)
    from recon3d.cancel import NEVER

    events = export_job(service, sessions, "anonymous", "image", ExportOptions(faces=500, texture=64), NEVER)
    seen = []
    for event in events:
        seen.append(event)
        if isinstance(event, Queued):
            break
    release.set()
    rest = list(events)
    assert isinstance(seen[0], Stage) and seen[0].name == "prepare" and isinstance(seen[-1], Queued)
    assert rest[-1].result and all(Path(path).is_file() for path in rest[-1].result)
