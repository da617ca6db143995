"""The HTTP service against real uvicorn servers on localhost (``hunyuan-i2v serve`` in a subprocess).

Covers: concurrent submissions with a real worker and the bundled model, ``kill -9`` of the server mid-job and
recovery, bearer authentication on a non-loopback bind, every configured limit answered with a 4xx, LoRAs (the
listing, validation before queueing, a LoRA job's video against the base video), and a schemathesis fuzz run over
the OpenAPI schema with no 5xx.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from PIL import Image  # noqa: E402

START_TIMEOUT = 180.0  # the machines are slow and shared: importing torch alone can take a while
GRAYFADE = Path(__file__).resolve().parents[1] / "src" / "hunyuan_i2v" / "assets" / "loras" / "grayfade.safetensors"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def photo_bytes(seed: int = 0, size=(96, 80)) -> bytes:
    skimage = pytest.importorskip("skimage")
    img = Image.fromarray(skimage.data.astronaut()).resize(size)
    if seed:
        img = img.rotate(seed * 7)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


class Server:
    """A real `hunyuan-i2v serve` process."""

    def __init__(self, data_dir: Path, *args: str, host: str = "127.0.0.1", token: str | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = token
        cmd = [sys.executable, "-m", "hunyuan_i2v.cli", "serve", "--data-dir", str(data_dir), "--host", host,
               "--port", str(self.port), "--log-level", "warning", *args]
        if token:
            cmd += ["--token", token]
        self.log = open(data_dir.parent / f"server-{self.port}.log", "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + START_TIMEOUT
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.read_log()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"server did not start in {START_TIMEOUT} s: {self.read_log()}")

    def read_log(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()[-3000:]

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def submit(self, params: dict, image: bytes | None = None) -> httpx.Response:
        files = {"image": ("photo.png", image if image is not None else photo_bytes(), "image/png")}
        return httpx.post(f"{self.url}/v1/jobs", files=files, data={"params": json.dumps(params)},
                          headers=self.headers, timeout=60)

    def job(self, job_id: str) -> dict:
        r = httpx.get(f"{self.url}/v1/jobs/{job_id}", headers=self.headers, timeout=30)
        r.raise_for_status()
        return r.json()

    def wait(self, job_id: str, timeout: float = 300.0, until=("succeeded", "failed", "cancelled")) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            job = self.job(job_id)
            if job["status"] in until if isinstance(until, tuple) else until(job):
                return job
            time.sleep(0.3)
        raise AssertionError(f"job {job_id} not done after {timeout} s: {self.job(job_id)}\n{self.read_log()}")

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def queue_server(tmp_path_factory):
    """No workers, a token, an open bind and small limits: for auth, limits and fuzzing."""
    data = tmp_path_factory.mktemp("queue") / "data"
    server = Server(data, "--workers", "0", "--max-upload-mb", "0.05", "--max-pixels", "20000", "--max-frames", "33",
                    "--max-steps", "30", "--resolutions", "360p", "--max-queue", "6", "--max-loras", "2",
                    host="0.0.0.0", token="test-token")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def worker_server(tmp_path_factory):
    """A CPU worker and the bundled model; --lora-dir with one LoRA, the bundled grayfade as fade.safetensors."""
    root = tmp_path_factory.mktemp("work")
    (root / "loras").mkdir()
    (root / "loras" / "fade.safetensors").write_bytes(GRAYFADE.read_bytes())
    server = Server(root / "data", "--devices", "cpu", "--lora-dir", str(root / "loras"))
    yield server
    server.stop()


def test_open_bind_without_token_refuses_to_start(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "hunyuan_i2v.cli", "serve", "--data-dir", str(tmp_path / "d"),
                           "--host", "0.0.0.0", "--port", str(free_port())], capture_output=True, text=True,
                          timeout=120, env={k: v for k, v in os.environ.items() if k != "HUNYUAN_I2V_TOKEN"})
    assert proc.returncode != 0
    assert proc.stderr.strip().startswith("error:") and "--token" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_authentication_on_a_non_loopback_bind(queue_server):
    url = queue_server.url
    assert httpx.get(f"{url}/v1/jobs", timeout=10).status_code == 401
    assert httpx.get(f"{url}/v1/jobs", headers={"Authorization": "Bearer wrong"}, timeout=10).status_code == 401
    assert httpx.get(f"{url}/v1/jobs", headers={"Authorization": "test-token"}, timeout=10).status_code == 401
    r = httpx.post(f"{url}/v1/jobs", files={"image": ("p.png", photo_bytes(), "image/png")},
                   data={"params": json.dumps({"prompt": "pan left"})}, timeout=30)
    assert r.status_code == 401
    assert httpx.get(f"{url}/v1/jobs", headers=queue_server.headers, timeout=10).status_code == 200
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200  # liveness stays open


@pytest.mark.parametrize("params, image, status, message", [
    ({"prompt": "pan"}, "big", 413, "limit"),
    ({"prompt": "pan"}, "pixels", 413, "pixels"),
    ({"prompt": "pan", "frames": 37}, None, 422, "frames must be within 1..33"),
    ({"prompt": "pan", "steps": 31}, None, 422, "steps must be within 1..30"),
    ({"prompt": "pan", "resolution": "720p"}, None, 422, "resolution must be one of 360p"),
    ({"prompt": "pan", "height": 2048, "width": 64}, None, 422, "within 16..1280"),
    ({"prompt": ""}, None, 422, "prompt is required"),
    ({"prompt": "pan"}, "text", 422, "not an image"),
])
def test_limits_answer_4xx_with_a_message(queue_server, params, image, status, message):
    flat = io.BytesIO()
    Image.new("RGB", (200, 150), (9, 99, 199)).save(flat, format="PNG")  # a few hundred bytes, 30000 pixels
    data = {"big": os.urandom(60_000), "pixels": flat.getvalue(), "text": b"hello", None: None}[image]
    r = queue_server.submit(params, data)
    assert r.status_code == status, r.text
    assert message in r.json()["detail"]


def test_queue_limit_cancel_and_errors(queue_server):
    url, h = queue_server.url, queue_server.headers
    before = httpx.get(f"{url}/v1/jobs", params={"status": "queued"}, headers=h, timeout=10).json()["total"]
    ids = []
    while True:
        r = queue_server.submit({"prompt": "the camera pans left", "frames": 9, "steps": 2}, photo_bytes(size=(64, 48)))
        if r.status_code != 202:
            break
        assert r.headers["location"] == f"/v1/jobs/{r.json()['id']}"
        ids.append(r.json()["id"])
    assert r.status_code == 429 and "queue is full" in r.json()["detail"]
    assert before + len(ids) == 6
    job = queue_server.job(ids[-1])
    assert job["status"] == "queued" and job["queue_position"] == before + len(ids) - 1
    assert httpx.get(f"{url}/v1/jobs/{ids[0]}/video", headers=h, timeout=10).status_code == 409
    assert httpx.get(f"{url}/v1/jobs/{ids[0]}/preview", headers=h, timeout=10).status_code == 409
    for i in ids:
        c = httpx.post(f"{url}/v1/jobs/{i}/cancel", headers=h, timeout=10)
        assert c.status_code == 200 and c.json()["status"] == "cancelled"
    assert httpx.post(f"{url}/v1/jobs/{ids[0]}/cancel", headers=h, timeout=10).status_code == 409
    assert httpx.get(f"{url}/v1/jobs/{'0' * 32}", headers=h, timeout=10).status_code == 404
    assert httpx.get(f"{url}/v1/jobs/..%2F..%2Fetc%2Fpasswd", headers=h, timeout=10).status_code == 404
    assert queue_server.submit({"prompt": "pan"}).status_code == 202  # room again after cancelling
    bad_json = httpx.post(f"{url}/v1/jobs", files={"image": ("p.png", photo_bytes(), "image/png")},
                          data={"params": "{not json"}, headers=h, timeout=30)
    assert bad_json.status_code == 422 and "JSON object" in bad_json.json()["detail"]


def test_loras_endpoint_lists_the_bundled_lora(queue_server):
    url = queue_server.url
    assert httpx.get(f"{url}/v1/loras", timeout=10).status_code == 401
    r = httpx.get(f"{url}/v1/loras", headers=queue_server.headers, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json() == {"loras": [{"name": "grayfade.safetensors", "size_bytes": GRAYFADE.stat().st_size,
                                   "format": "official", "usable": True, "error": None}],
                        "max_loras": 2, "max_scale": 4.0}
    limits = httpx.get(f"{url}/v1/limits", headers=queue_server.headers, timeout=10).json()
    assert (limits["max_loras"], limits["max_lora_scale"]) == (2, 4.0)


def _all_jobs(server) -> int:
    return httpx.get(f"{server.url}/v1/jobs", headers=server.headers, timeout=10).json()["total"]


@pytest.mark.parametrize("loras, message", [
    ('[{"name": "nope.safetensors"}]', "unknown LoRA 'nope.safetensors': this server has grayfade.safetensors"),
    ('[{"name": "../../../../etc/passwd"}]', "unknown LoRA '../../../../etc/passwd'"),
    (json.dumps([{"name": str(GRAYFADE)}]), "unknown LoRA"),  # the path of the very file the server lists
    ('[{"name": "grayfade.safetensors", "scale": NaN}]', "loras[0].scale must be a finite number, got nan"),
    ('[{"name": "grayfade.safetensors", "scale": Infinity}]', "finite number, got inf"),
    ('[{"name": "grayfade.safetensors", "scale": 1e309}]', "finite number"),
    ('[{"name": "grayfade.safetensors", "scale": 5}]', "loras[0].scale must be within -4..4 on this server, got 5"),
    ('[{"name": "grayfade.safetensors", "scale": "1"}]', "finite number"),
    ('[{"name": "a.safetensors"}, {"name": "b.safetensors"}, {"name": "c.safetensors"}]',
     "3 LoRAs is over this server's limit of 2 per job"),
    ('"grayfade.safetensors"', "loras must be a list"),
    ('[{"name": "grayfade.safetensors", "path": "/etc/passwd"}]', "unknown field 'path'"),
])
def test_bad_loras_answer_422_and_queue_nothing(queue_server, loras, message):
    before = _all_jobs(queue_server)
    params = '{"prompt": "grayfade, the camera pans left", "loras": %s}' % loras
    r = httpx.post(f"{queue_server.url}/v1/jobs", files={"image": ("p.png", photo_bytes(), "image/png")},
                   data={"params": params}, headers=queue_server.headers, timeout=60)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert message in detail and "\n" not in detail
    assert _all_jobs(queue_server) == before


def test_a_job_with_a_listed_lora_is_queued_with_it(queue_server):
    params = {"prompt": "grayfade, pan left", "loras": [{"name": "grayfade.safetensors", "scale": -0.5}]}
    r = queue_server.submit(params)
    if r.status_code == 429:  # another test filled the queue: make room
        for job in httpx.get(f"{queue_server.url}/v1/jobs", params={"status": "queued"}, headers=queue_server.headers,
                             timeout=10).json()["jobs"]:
            httpx.post(f"{queue_server.url}/v1/jobs/{job['id']}/cancel", headers=queue_server.headers, timeout=10)
        r = queue_server.submit(params)
    assert r.status_code == 202, r.text
    job = queue_server.job(r.json()["id"])
    assert job["params"]["loras"] == [{"name": "grayfade.safetensors", "scale": -0.5}]
    httpx.post(f"{queue_server.url}/v1/jobs/{job['id']}/cancel", headers=queue_server.headers, timeout=10)


def test_openapi_documents_the_api(queue_server):
    schema = httpx.get(f"{queue_server.url}/openapi.json", timeout=10).json()
    paths = schema["paths"]
    for path in ("/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/video", "/v1/jobs/{job_id}/cancel", "/v1/loras",
                 "/health"):
        assert path in paths
    assert "202" in paths["/v1/jobs"]["post"]["responses"]
    assert httpx.get(f"{queue_server.url}/docs", timeout=10).status_code == 200


def test_fuzz_openapi_schema_no_server_errors(queue_server):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings as hsettings

    schema = schemathesis.openapi.from_url(f"{queue_server.url}/openapi.json")
    failures, calls = [], []
    for operation in schema.get_all_operations():
        op = operation.ok()

        @hsettings(max_examples=25, deadline=None, derandomize=True,
                   suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy())
        def check(case):
            for headers in ({}, queue_server.headers):
                response = case.call(headers=headers, timeout=30)
                calls.append(response.status_code)
                if response.status_code >= 500:
                    failures.append(f"{case.method} {case.formatted_path}: {response.status_code} {response.text[:200]}")

        check()
    assert calls, "the fuzzer made no requests"
    assert not failures, "\n".join(failures[:10])


def test_five_concurrent_jobs_complete_with_distinct_videos(worker_server):
    from hunyuan_i2v.video import read_video

    def submit(i: int) -> str:
        r = worker_server.submit({"prompt": f"the camera pans {'left' if i % 2 else 'right'}", "steps": 3,
                                  "frames": 9, "seed": 100 + i}, photo_bytes(seed=i))
        assert r.status_code == 202, r.text
        return r.json()["id"]

    with ThreadPoolExecutor(5) as pool:
        ids = list(pool.map(submit, range(5)))
    assert len(set(ids)) == 5
    digests = set()
    for i, job_id in enumerate(ids):
        job = worker_server.wait(job_id)
        assert job["status"] == "succeeded", job
        assert job["result"]["seed"] == 100 + i and job["result"]["frames"] == 9
        assert set(job["result"]["timings"]) >= {"load", "denoise", "decode", "write", "total"}
        r = httpx.get(f"{worker_server.url}/v1/jobs/{job_id}/video", timeout=30)
        assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"
        digests.add(hashlib.sha256(r.content).hexdigest())
        path = Path(worker_server.log.name).parent / "data" / "outputs" / f"{job_id}.mp4"
        frames, fps, meta = read_video(path)
        assert frames.shape[0] == 9 and fps == job["result"]["fps"] and meta["seed"] == 100 + i and meta["prompt"] == job["prompt"]
        preview = httpx.get(f"{worker_server.url}/v1/jobs/{job_id}/preview", timeout=30)
        assert preview.status_code == 200 and preview.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(digests) == 5
    listed = httpx.get(f"{worker_server.url}/v1/jobs", params={"status": "succeeded"}, timeout=10).json()
    assert {j["id"] for j in listed["jobs"]} >= set(ids)
    outputs = Path(worker_server.log.name).parent / "data" / "outputs"
    assert not [p for p in outputs.iterdir() if p.suffix != ".mp4"]  # no temporary files left behind
    worker_server.log.flush()
    log = Path(worker_server.log.name).read_text()  # the worker's lines say when (service logs are read by time)
    assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO hunyuan_i2v\.server\.worker: worker \S+ ready$", log,
                     re.M), log[-2000:]


def test_a_lora_job_changes_the_video_and_the_next_job_is_the_base_again(worker_server):
    """Base, LoRA, base with one seed on one worker: the LoRA changes the video; the job after it, without one, is
    the base video again (the adapters were removed from the kept pipeline, not left behind)."""
    from hunyuan_i2v.video import read_video

    listed = httpx.get(f"{worker_server.url}/v1/loras", timeout=30).json()["loras"]
    assert [e["name"] for e in listed] == ["fade.safetensors"]  # --lora-dir's files, and no other
    base = {"prompt": "grayfade, the camera pans left", "steps": 2, "frames": 9, "seed": 21}
    image = photo_bytes(seed=3, size=(64, 64))
    lora = {**base, "loras": [{"name": "fade.safetensors", "scale": 1.5}]}
    ids = []
    for params in (base, lora, base):
        r = worker_server.submit(params, image)
        assert r.status_code == 202, r.text
        ids.append(r.json()["id"])
    jobs = [worker_server.wait(i) for i in ids]
    assert [j["status"] for j in jobs] == ["succeeded"] * 3, jobs
    assert jobs[1]["params"]["loras"] == jobs[1]["result"]["loras"] == [{"name": "fade.safetensors", "scale": 1.5}]
    assert "loras" not in jobs[0]["result"] and "loras" not in jobs[2]["result"]
    assert jobs[0]["started"] < jobs[1]["started"] < jobs[2]["started"]  # one worker, in this order
    outputs = Path(worker_server.log.name).parent / "data" / "outputs"
    videos = [read_video(outputs / f"{i}.mp4") for i in ids]
    assert videos[1][2]["loras"] == [{"name": "fade.safetensors", "scale": 1.5}]
    first, with_lora, after = (v[0].astype(int) for v in videos)
    lora_change = abs(with_lora - first).mean()
    assert lora_change > 0.5
    # the same frames again; in full test runs identical frames were now and then encoded differently (0.8 and
    # once 1.50 levels on average; cause not found, see the stop notes), so the MP4s are compared within that:
    # a LoRA left applied would differ by about lora_change
    assert abs(after - first).mean() < min(3.0, lora_change / 4)
    workers = httpx.get(f"{worker_server.url}/health", timeout=10).json()["workers"]
    assert [w["restarts"] for w in workers] == [0]


def test_cancel_a_running_job(worker_server):
    r = worker_server.submit({"prompt": "the camera tilts up", "steps": 30, "frames": 33})
    job_id = r.json()["id"]
    worker_server.wait(job_id, until=lambda j: j["status"] == "running" and (j["step"] or 0) >= 1)
    assert httpx.post(f"{worker_server.url}/v1/jobs/{job_id}/cancel", timeout=10).json()["cancel_requested"]
    job = worker_server.wait(job_id)
    assert job["status"] == "cancelled" and job["step"] < 29


def test_kill_9_mid_job_then_restart_completes_it(tmp_path):
    data = tmp_path / "data"
    server = Server(data, "--devices", "cpu")
    try:
        long_job = server.submit({"prompt": "the camera zooms in", "steps": 40, "frames": 33, "seed": 5}).json()["id"]
        queued = server.submit({"prompt": "the camera pans left", "steps": 3, "frames": 9, "seed": 6}).json()["id"]
        running = server.wait(long_job, until=lambda j: j["status"] == "running" and (j["step"] or 0) >= 2)
        worker_pids = [w["pid"] for w in httpx.get(f"{server.url}/health", timeout=10).json()["workers"]]
        server.kill()
    finally:
        server.stop()
    deadline = time.time() + 30  # the worker dies with its server (PR_SET_PDEATHSIG)
    while time.time() < deadline and any(Path(f"/proc/{p}").exists() and "Z" not in
                                         Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1][:3]
                                         for p in worker_pids):
        time.sleep(0.2)
    assert running["step"] < 39
    restarted = Server(data, "--devices", "cpu")
    try:
        done = restarted.wait(long_job, timeout=600)
        assert done["status"] == "succeeded", done
        assert done["attempts"] == 2 and "worker stopped" in done["history"][0]["event"]
        assert restarted.wait(queued, timeout=300)["status"] == "succeeded"
        for job_id in (long_job, queued):
            r = httpx.get(f"{restarted.url}/v1/jobs/{job_id}/video", timeout=30)
            assert r.status_code == 200 and len(r.content) > 1000
    finally:
        restarted.stop()
    assert not [p for p in (data / "outputs").iterdir() if p.suffix != ".mp4"]
