"""The web UI: its mount on the API app, and one video made end to end in a real headless browser.

The browser tests start the real service (``python -m hunyuan_i2v.cli ui``) with its CPU worker, drive
Debian's Chromium with Playwright (never downloaded: skipped without /usr/bin/chromium or playwright) with every
request off this machine refused and recorded, upload a real photo, generate a 4-step video of the bundled
tiny model and check that the page plays it and that the queue recorded the job; a second one picks the bundled
LoRA and a scale and checks that the job ran with them. The screenshot goes to
``$HUNYUAN_I2V_ARTIFACTS/ui.png`` (default: the test's tmp_path); its path is printed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import pytest

pytest.importorskip("gradio")

from hunyuan_i2v.server.settings import ServerSettings  # noqa: E402
from hunyuan_i2v.server.ui import DEFAULT, ModelDefaults, job_params, lora_choices, model_defaults  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
SERVER_START_S = 240  # the service imports torch and gradio and starts a worker: slow on a busy 2-core machine
VIDEO_S = 300
GRAYFADE_KB = round((Path(__file__).resolve().parents[1] / "src/hunyuan_i2v/assets/loras/grayfade.safetensors")
                    .stat().st_size / 1e3)  # 658


def _app(tmp_path, **settings):
    from hunyuan_i2v.server.api import create_app

    return create_app(ServerSettings(data_dir=tmp_path, ui=True, **settings), workers=False)


def test_ui_is_mounted_and_root_redirects(tmp_path):
    from fastapi.testclient import TestClient

    with TestClient(_app(tmp_path)) as client:
        r = client.get("/", follow_redirects=False)
        assert r.status_code in (302, 307) and r.headers["location"] == "/ui/"
        r = client.get("/ui/")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert "<html" in r.text.lower()
        config = client.get("/ui/config").json()
        assert config["analytics_enabled"] is False
        assert client.get("/health").json()["status"] == "ok"  # the API is still there


def test_ui_with_a_token_needs_the_login(tmp_path):
    from fastapi.testclient import TestClient

    with TestClient(_app(tmp_path, token="s3cret")) as client:
        assert client.get("/ui/config").status_code == 401
        assert client.post("/ui/login", data={"username": "hunyuan", "password": "wrong"}).status_code >= 400
        assert client.post("/ui/login", data={"username": "hunyuan", "password": "s3cret"}).status_code == 200
        assert client.get("/ui/config").status_code == 200


def test_form_defaults_come_from_the_bundled_model(tmp_path):
    d = model_defaults(ServerSettings(data_dir=tmp_path))
    s = d.sampler
    assert (s.height, s.width, s.num_frames, s.steps, s.cfg_scale) == (64, 64, 33, 20, 3.0)
    assert d.guidance_embed is False


def test_job_params_leave_defaults_to_the_worker():
    from hunyuan_i2v.config import SamplerDefaults
    from hunyuan_i2v.server.settings import Limits, clean_params

    tiny = ModelDefaults("tiny", SamplerDefaults(), guidance_embed=False)
    p = job_params(tiny, prompt="the cat turns its head", resolution=DEFAULT, frames=33.0, steps=4.0, seed=7.0,
                   guidance=6.0, cfg_scale=3.0, fps=8.0, offload="none", weights_dtype="auto", attention=DEFAULT)
    assert p == {"prompt": "the cat turns its head", "frames": 33, "steps": 4, "seed": 7, "cfg_scale": 3.0,
                 "stability": False, "fps": 8.0}
    assert clean_params(p, Limits()) == p  # exactly what the API accepts
    big = ModelDefaults("13B", SamplerDefaults(), guidance_embed=True)
    p = job_params(big, prompt="x", resolution="540p", guidance=6.0, offload="blocks", weights_dtype="int8",
                   attention="sdpa", negative_prompt="blur", flow_shift=7.0)
    assert {k: p[k] for k in ("resolution", "guidance", "offload", "weights_dtype", "attention", "negative_prompt",
                              "flow_shift")} == {"resolution": "540p", "guidance": 6.0, "offload": "blocks",
                                                 "weights_dtype": "int8", "attention": "sdpa",
                                                 "negative_prompt": "blur", "flow_shift": 7.0}
    assert "loras" not in p


def test_job_params_carry_the_chosen_loras_with_the_one_scale(tmp_path):
    from hunyuan_i2v.config import SamplerDefaults
    from hunyuan_i2v.server.loras import LoraCatalog
    from hunyuan_i2v.server.settings import Limits, clean_params

    catalog = LoraCatalog.for_settings(ServerSettings(data_dir=tmp_path))
    assert lora_choices(catalog) == [(f"grayfade.safetensors (official, {GRAYFADE_KB} kB)", "grayfade.safetensors")]
    tiny = ModelDefaults("tiny", SamplerDefaults(), guidance_embed=False)
    p = job_params(tiny, prompt="grayfade, pan left", loras=["grayfade.safetensors"], lora_scale=0.75)
    assert p["loras"] == [{"name": "grayfade.safetensors", "scale": 0.75}]
    assert clean_params(p, Limits(), catalog) == p  # exactly what the API accepts
    assert "loras" not in job_params(tiny, prompt="pan left", loras=[], lora_scale=0.75)


def _png_bytes() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (48, 40), (200, 100, 50)).save(buf, format="PNG")
    return buf.getvalue()


def test_a_poll_that_started_before_generate_cannot_take_the_new_job_from_the_page(tmp_path):
    """The UI's poll on a real queue: bookkeeping a stale tick writes back (for no job, or the previous, finished
    job) never hides the page's current job, and a finished job's video is sent exactly once."""
    from hunyuan_i2v.server.jobs import JobStore
    from hunyuan_i2v.server.ui import poll_view, status_html

    s = JobStore(tmp_path / "data")
    stale, changed = poll_view(s, None, {}, 10, 10)  # a tick that read the page before Generate
    assert "status" not in changed and changed["table"] == []
    first = s.submit(_png_bytes(), {"prompt": "pan left", "steps": 2})
    # Generate returned first.id; the stale tick's bookkeeping comes back after it.
    state, changed = poll_view(s, first.id, stale, 10, 10)
    assert changed["status"] == status_html(s.get(first.id), 0) and "data-status='queued'" in changed["status"]
    assert [row[0] for row in changed["table"]] == [first.id[:8]]
    state, changed = poll_view(s, first.id, state, 10, 10)
    assert changed == {}  # nothing new: nothing re-sent

    claimed = s.claim("w0")
    assert claimed.id == first.id
    out = s.output_path(first.id)
    out.write_bytes(b"not really an mp4")
    assert s.finish(first.id, "w0", "succeeded", result={"frames": 9}, output=str(out))
    state, changed = poll_view(s, first.id, state, 10, 10)
    assert "data-status='succeeded'" in changed["status"] and changed["video"] == changed["file"] == str(out)
    assert [job_id for _, job_id in changed["pick"]] == [first.id]
    done_state = state
    state, changed = poll_view(s, first.id, state, 10, 10)
    assert "video" not in changed and "status" not in changed  # sent once

    # A second job from the same page; a stale tick writes back the first job's finished bookkeeping.
    second = s.submit(_png_bytes(), {"prompt": "zoom in", "steps": 2})
    state, changed = poll_view(s, second.id, done_state, 10, 10)
    assert "data-status='queued'" in changed["status"] and second.id[:8] in changed["status"]
    assert s.claim("w0").id == second.id
    assert s.finish(second.id, "w0", "failed", error="out of memory")
    state, changed = poll_view(s, second.id, state, 10, 10)
    assert "data-status='failed'" in changed["status"] and changed["warning"] == "The job failed: out of memory"
    assert "video" not in changed


# -- the real browser ----------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


@pytest.fixture
def ui_server(tmp_path):
    """The real `hunyuan-i2v ui` service with one CPU worker; yields (base url, data dir). Always stopped."""
    port = _free_port()
    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HUNYUAN_I2V_REWRITE", "GRADIO_"))}
    env["HUNYUAN_I2V_TOKEN"] = ""
    log_path = tmp_path / "server.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen([sys.executable, "-m", "hunyuan_i2v.cli", "ui", "--data-dir", str(data), "--port",
                             str(port), "--devices", "cpu"], stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)  # its own process group: the worker goes with it
    base = f"http://127.0.0.1:{port}"

    def tail() -> str:
        log.flush()
        return log_path.read_text(errors="replace")[-4000:]

    try:
        deadline = time.time() + SERVER_START_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the server exited with {proc.returncode}:\n{tail()}")
            try:
                if _get_json(f"{base}/health")["status"] == "ok":
                    break
            except (urllib.error.URLError, OSError, ValueError):
                pass
            if time.time() > deadline:
                pytest.fail(f"the server did not answer /health within {SERVER_START_S} s:\n{tail()}")
            time.sleep(1.0)
        yield base, data, tail
    finally:
        if proc.poll() is None:
            proc.terminate()  # uvicorn shuts down and stops its workers
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of its group is left
        except ProcessLookupError:
            pass
        proc.wait()
        log.close()


def _artifact_dir(tmp_path: Path) -> Path:
    path = Path(os.environ.get("HUNYUAN_I2V_ARTIFACTS") or tmp_path / "artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _set_steps(page, n: int) -> None:
    box = page.locator("#hy-steps input[type=number]")
    box.fill(str(n))
    box.press("Tab")


def _wait_for_video(page, server_log) -> set:
    """Wait for the result video; returns the job statuses the page showed meanwhile."""
    seen, deadline = set(), time.time() + VIDEO_S
    while not page.evaluate("() => !!document.querySelector('#hy-video video')?.getAttribute('src')"):
        status = page.locator("#hy-status [data-status]")
        if status.count():
            seen.add(status.first.get_attribute("data-status"))
        if "failed" in seen:
            pytest.fail(f"the job failed: {page.locator('#hy-status').inner_text()}\n{server_log()}")
        if time.time() > deadline:
            pytest.fail(f"no video after {VIDEO_S} s; seen statuses {sorted(seen)}; status: "
                        f"{page.locator('#hy-status').inner_text()}\n{server_log()}")
        page.wait_for_timeout(500)
    return seen


def _play(page, selector: str) -> dict:
    """Play the <video> for 1.5 s once it has data; its clock, size and error code."""
    page.wait_for_function(f"() => document.querySelector({selector!r}).readyState >= 2", timeout=60_000)
    return page.evaluate("""async (selector) => {
        const v = document.querySelector(selector);
        v.muted = true;
        await v.play();
        const t0 = v.currentTime;
        await new Promise(r => setTimeout(r, 1500));
        return {t0, t1: v.currentTime, duration: v.duration, width: v.videoWidth, height: v.videoHeight,
                error: v.error && v.error.code};
    }""", selector)


def _browser_or_skip():
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium); the test never downloads a browser")
    return pytest.importorskip("playwright.sync_api", reason="Python Playwright is not installed")


@contextlib.contextmanager
def _local_page(sync_api, height: int, failure_shot: Path):
    """A headless Chromium page that may reach only this machine: yields (page, external), where ``external``
    collects every request it tried to send elsewhere (aborted); a failing body leaves a screenshot."""
    external: list[str] = []

    def only_this_machine(route):
        host = urlparse(route.request.url).hostname
        if route.request.url.startswith(("data:", "blob:")) or host in ("127.0.0.1", "localhost"):
            route.continue_()
        else:
            external.append(route.request.url)
            route.abort()

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": height})
        page.route("**/*", only_this_machine)
        try:
            yield page, external
        except BaseException:
            page.screenshot(path=str(failure_shot), full_page=True)
            print(f"UI screenshot at the failure: {failure_shot}")
            raise
        finally:
            browser.close()


def test_ui_generates_and_plays_a_video_in_chromium(tmp_path, request):
    sync_api = _browser_or_skip()
    skimage_data = pytest.importorskip("skimage.data", reason="scikit-image (for a real photo) is not installed")
    from PIL import Image

    photo = tmp_path / "chelsea.png"
    Image.fromarray(skimage_data.chelsea()).save(photo)  # a real photo of a cat, 451x300
    shot = _artifact_dir(tmp_path) / "ui.png"
    server = request.getfixturevalue("ui_server")
    base, data, server_log = server
    with _local_page(sync_api, 1400, shot.with_name("ui-failure.png")) as (page, external):
        page.goto(f"{base}/", timeout=120_000)  # the redirect to /ui/
        assert urlparse(page.url).path == "/ui/"
        page.locator("#hy-generate").wait_for(timeout=120_000)
        prompt = page.locator("#hy-prompt textarea")
        prompt.fill("the cat slowly turns its head")

        page.locator("#hy-generate").click()  # no photo yet: a one-line error, no job
        page.get_by_text("Upload a photo first.").first.wait_for(timeout=60_000)

        # Rewrite without a configured language model: a clear message, the prompt kept
        page.locator("#hy-rewrite").click()
        page.locator("#hy-notes").get_by_text("No rewrite backend").wait_for(timeout=60_000)
        assert prompt.input_value() == "the cat slowly turns its head"

        page.locator("#hy-image input[type=file]").set_input_files(str(photo))
        page.locator("#hy-image img").first.wait_for(timeout=60_000)
        _set_steps(page, 4)
        page.locator("#hy-generate").click()

        seen = _wait_for_video(page, server_log)
        assert seen & {"queued", "running"}, seen  # progress was shown before the video
        page.locator("#hy-status [data-status=succeeded]").wait_for(timeout=30_000)
        played = _play(page, "#hy-video video")
        assert played["error"] is None, played
        assert played["duration"] > 0 and played["t1"] > played["t0"], played
        assert (played["width"], played["height"]) == (64, 64), played
        assert page.locator("#hy-preview img").first.get_attribute("src")  # the latent preview was shown
        assert ".mp4" in page.locator("#hy-download").inner_text()  # the download link
        page.wait_for_function("() => document.querySelector('#hy-queue').textContent.includes('succeeded')",
                               timeout=30_000)  # the queue table
        page.screenshot(path=str(shot), full_page=True)
        print(f"UI screenshot: {shot}")
        job_id = _get_json(f"{base}/v1/jobs")["jobs"][0]["id"]

        # the finished video in the Videos tab
        page.get_by_role("tab", name="Videos").click()
        page.locator("#hy-pick input").click()
        page.get_by_role("option", name=job_id[:8]).first.click()
        page.wait_for_function("() => !!document.querySelector('#hy-gallery-video video')?.getAttribute('src')",
                               timeout=60_000)
        assert _play(page, "#hy-gallery-video video")["duration"] > 0

        # a long job, cancelled from the page
        page.get_by_role("tab", name="Generate").click()
        _set_steps(page, 100)
        page.locator("#hy-generate").click()
        page.locator("#hy-status [data-status=queued], #hy-status [data-status=running]").first.wait_for(
            timeout=60_000)
        page.locator("#hy-cancel").click()
        page.locator("#hy-status [data-status=cancelled]").wait_for(timeout=120_000)

    assert not external, f"the page tried to reach the internet: {external}"
    jobs = _get_json(f"{base}/v1/jobs")["jobs"]  # newest first
    assert [j["status"] for j in jobs] == ["cancelled", "succeeded"], jobs
    assert jobs[0]["params"]["steps"] == 100
    job = jobs[1]
    assert job["status"] == "succeeded", job
    assert job["params"]["prompt"] == "the cat slowly turns its head"
    assert job["params"]["steps"] == 4 and job["steps"] == 4
    assert "offload" not in job["params"] and "attention" not in job["params"]
    assert "loras" not in job["params"] and "loras" not in job["result"]  # no LoRA unless one is picked
    assert (job["result"]["width"], job["result"]["height"], job["result"]["frames"]) == (64, 64, 33)
    assert (data / "outputs" / f"{job['id']}.mp4").stat().st_size > 0


def test_ui_lora_picker_submits_the_chosen_loras_in_chromium(tmp_path, request):
    """Pick the bundled LoRA and a scale in the page: the job runs with exactly them, and the page shows its video."""
    sync_api = _browser_or_skip()
    skimage_data = pytest.importorskip("skimage.data", reason="scikit-image (for a real photo) is not installed")
    from PIL import Image

    photo = tmp_path / "coffee.png"
    Image.fromarray(skimage_data.coffee()).save(photo)
    base, data, server_log = request.getfixturevalue("ui_server")
    with _local_page(sync_api, 1600, _artifact_dir(tmp_path) / "ui-lora-failure.png") as (page, external):
        page.goto(f"{base}/ui/", timeout=120_000)
        page.locator("#hy-generate").wait_for(timeout=120_000)
        page.locator("#hy-prompt textarea").fill("grayfade, the camera pans left")
        page.locator("#hy-image input[type=file]").set_input_files(str(photo))
        page.locator("#hy-image img").first.wait_for(timeout=60_000)
        _set_steps(page, 2)
        page.locator("#hy-lora-box").get_by_role("button", name="LoRAs").first.click()  # open the accordion
        page.locator("#hy-loras input").click()
        options = page.get_by_role("option")
        options.first.wait_for(timeout=30_000)
        listed = [o.strip() for o in options.all_inner_texts()]
        assert listed == [f"grayfade.safetensors (official, {GRAYFADE_KB} kB)"]
        options.first.click()
        page.keyboard.press("Escape")
        page.locator("#hy-loras").get_by_text("grayfade.safetensors").first.wait_for(timeout=30_000)  # the chip
        scale = page.locator("#hy-lora-scale input[type=number]")
        scale.fill("0.6")
        scale.press("Tab")
        page.locator("#hy-generate").click()
        _wait_for_video(page, server_log)
        page.locator("#hy-status [data-status=succeeded]").wait_for(timeout=30_000)
        assert "LoRA grayfade.safetensors x0.6" in page.locator("#hy-status").inner_text()
        assert _play(page, "#hy-video video")["duration"] > 0
        shot = _artifact_dir(tmp_path) / "ui-lora.png"
        page.screenshot(path=str(shot), full_page=True)
        print(f"UI screenshot: {shot}")

    assert not external, f"the page tried to reach the internet: {external}"
    jobs = _get_json(f"{base}/v1/jobs")["jobs"]
    assert len(jobs) == 1 and jobs[0]["status"] == "succeeded", jobs
    job = jobs[0]
    assert job["params"]["loras"] == [{"name": "grayfade.safetensors", "scale": 0.6}]
    assert job["result"]["loras"] == [{"name": "grayfade.safetensors", "scale": 0.6}]
    assert job["params"]["prompt"] == "grayfade, the camera pans left" and job["params"]["steps"] == 2
    assert (data / "outputs" / f"{job['id']}.mp4").stat().st_size > 0
