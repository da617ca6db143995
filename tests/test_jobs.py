"""The durable job queue on a real SQLite database: submit, claim, progress, cancel, recovery, limits."""

from __future__ import annotations

import io
import json
import os
import sqlite3
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from hunyuan_i2v.server.jobs import JobNotFound, JobStateError, JobStore, new_worker_id
from hunyuan_i2v.server.settings import Limits, LimitError, ServerSettings
from hunyuan_i2v.server.worker import fit_latent_to_rgb, preview_strip, settings_from_json, settings_to_json


def png_bytes(w=48, h=40, color=(200, 100, 50)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def store(tmp_path):
    s = JobStore(tmp_path / "data", Limits(max_queue=4, max_upload_bytes=200_000, max_image_pixels=10_000), 2)
    yield s
    s.close()


def dead_worker() -> str:
    """A worker id whose process has exited (a real, reaped child)."""
    proc = subprocess.Popen([sys.executable, "-c", "import os; print(os.getpid())"], stdout=subprocess.PIPE, text=True)
    pid = int(proc.communicate()[0])
    return new_worker_id("cpu").replace(f":{os.getpid()}:", f":{pid}:", 1)


def test_submit_claim_progress_finish(store):
    job = store.submit(png_bytes(), {"prompt": "the camera pans left", "steps": 4})
    assert job.status == "queued" and job.params == {"prompt": "the camera pans left", "steps": 4}
    assert store.position(job.id) == 0
    me = new_worker_id("cpu")
    claimed = store.claim(me)
    assert claimed.id == job.id and claimed.status == "running" and claimed.attempts == 1
    assert store.claim(new_worker_id("cpu")) is None  # nothing else queued
    assert store.update(job.id, me, stage="denoising", step=1, steps=4, progress=0.5, eta=3.0)
    assert not store.update(job.id, new_worker_id("cpu"), progress=0.9)  # not that worker's job
    assert store.get(job.id).progress == 0.5
    assert store.finish(job.id, me, "succeeded", result={"seed": 7}, output=f"{job.id}.mp4")
    done = store.get(job.id)
    assert done.status == "succeeded" and done.progress == 1.0 and done.result == {"seed": 7}
    public = done.public()
    assert public["video"] and "worker" not in public and "image" not in public


def test_uploads_are_named_by_content_hash(store, tmp_path):
    a = store.submit(png_bytes(), {"prompt": "pan left"})
    b = store.submit(png_bytes(), {"prompt": "pan right"})
    c = store.submit(png_bytes(color=(1, 2, 3)), {"prompt": "pan right"})
    assert a.image == b.image != c.image
    assert a.image.endswith(".png") and len(a.image) == 64 + 4
    assert sorted(p.name for p in (tmp_path / "data" / "uploads").iterdir()) == sorted({a.image, c.image})


def test_wal_mode_and_second_connection_sees_jobs(store, tmp_path):
    job = store.submit(png_bytes(), {"prompt": "tilt up"})
    db = sqlite3.connect(tmp_path / "data" / "jobs.sqlite3")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("SELECT status FROM jobs WHERE id = ?", (job.id,)).fetchone() == ("queued",)
    db.close()
    other = JobStore(tmp_path / "data")
    assert other.get(job.id).prompt == "tilt up"
    other.close()


def test_cancel_queued_and_running(store):
    a = store.submit(png_bytes(), {"prompt": "pan left"})
    b = store.submit(png_bytes(), {"prompt": "pan right"})
    me = new_worker_id("cpu")
    assert store.claim(me).id == a.id
    assert store.cancel(b.id).status == "cancelled"
    running = store.cancel(a.id)
    assert running.status == "running" and running.cancel_requested
    assert store.cancel_requested(a.id, me)
    store.finish(a.id, me, "cancelled", error="cancelled by request")
    with pytest.raises(JobStateError, match="already cancelled"):
        store.cancel(a.id)


def test_recover_requeues_a_dead_workers_job_then_gives_up(store):
    job = store.submit(png_bytes(), {"prompt": "zoom in"})
    first = dead_worker()
    store.claim(first)
    store.update(job.id, first, step=2, steps=10)
    assert store.recover(stale_after=3600) == [job.id]
    again = store.get(job.id)
    assert again.status == "queued" and again.attempts == 1 and "step 3/10" in again.history[-1]["event"]
    second = dead_worker()
    assert store.claim(second).attempts == 2
    assert store.recover(stale_after=3600) == [job.id]
    failed = store.get(job.id)  # max_attempts = 2
    assert failed.status == "failed" and failed.error.startswith("gave up after 2 attempts")


def test_recover_leaves_a_live_worker_alone_until_its_heartbeat_is_stale(store):
    job = store.submit(png_bytes(), {"prompt": "zoom out"})
    me = new_worker_id("cpu")  # this very process: alive
    store.claim(me)
    assert store.recover(stale_after=3600) == []
    assert store.recover(stale_after=-1) == [job.id]  # a heartbeat older than the limit counts as lost
    assert not store.update(job.id, me, progress=0.5)  # the old worker cannot write to it any more


def test_release_gives_the_job_back_without_an_attempt(store):
    job = store.submit(png_bytes(), {"prompt": "static"})
    me = new_worker_id("cpu")
    store.claim(me)
    assert store.release(job.id, me, "the server shut down; re-queued")
    again = store.get(job.id)
    assert again.status == "queued" and again.attempts == 0


@pytest.mark.parametrize("params, message", [
    ({"prompt": ""}, "prompt is required"),
    ({"prompt": "pan", "frames": 10}, "4k\\+1"),
    ({"prompt": "pan", "frames": 133}, "frames must be within 1..129"),
    ({"prompt": "pan", "steps": 0}, "steps must be within"),
    ({"prompt": "pan", "steps": 101}, "steps must be within"),
    ({"prompt": "pan", "height": 64}, "both height and width"),
    ({"prompt": "pan", "height": 64, "width": 70}, "multiple"),
    ({"prompt": "pan", "height": 2048, "width": 64}, "within 16..1280"),
    ({"prompt": "pan", "resolution": "1080p"}, "resolution must be one of"),
    ({"prompt": "pan", "cfg_scale": 0.5}, "cfg_scale"),
    ({"prompt": "pan", "seed": -1}, "seed"),
    ({"prompt": "pan", "steps": "4"}, "steps must be an integer"),
    ({"prompt": "pan", "stability": 1}, "true or false"),
    ({"prompt": "pan", "offload": "disk"}, "offload must be one of"),
    ({"prompt": "pan", "rewrite": "poetic"}, "rewrite must be one of"),
    ({"prompt": "pan", "output": "/etc/passwd"}, "unknown parameter 'output'"),
    (["pan"], "JSON object"),
])
def test_bad_parameters_are_refused_before_anything_is_stored(store, tmp_path, params, message):
    with pytest.raises(Exception, match=message) as info:
        store.submit(png_bytes(), params)
    assert isinstance(info.value, ValueError)
    assert store.count("queued", "running", "succeeded", "failed", "cancelled") == 0
    assert list((tmp_path / "data" / "uploads").iterdir()) == []


def test_image_limits(store):
    with pytest.raises(LimitError, match="pixels") as info:
        store.submit(png_bytes(200, 100), {"prompt": "pan"})  # 20000 > 10000 pixels
    assert info.value.status == 413
    noisy = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (99, 99, 3), dtype=np.uint8)).save(noisy, "BMP")
    big = noisy.getvalue() * 8  # a valid BMP header followed by junk, over the byte limit
    with pytest.raises(LimitError, match="bytes") as info:
        store.submit(big, {"prompt": "pan"})
    assert info.value.status == 413
    with pytest.raises(LimitError, match="not an image"):
        store.submit(b"#!/bin/sh\necho hi\n", {"prompt": "pan"})
    truncated = png_bytes(90, 90)[:200]
    with pytest.raises(LimitError, match="damaged|truncated|not an image"):
        store.submit(truncated, {"prompt": "pan"})


def test_queue_length_limit(store):
    for i in range(4):
        store.submit(png_bytes(), {"prompt": f"pan {i}"})
    with pytest.raises(LimitError, match="queue is full") as info:
        store.submit(png_bytes(), {"prompt": "one more"})
    assert info.value.status == 429


def test_job_ids_are_never_paths(store):
    for bad in ("../../etc/passwd", "a" * 31, "A" * 32, "0" * 31 + "/"):
        with pytest.raises(JobNotFound):
            store.get(bad)
        with pytest.raises(JobNotFound):
            store.output_path(bad)
    job = store.submit(png_bytes(), {"prompt": "pan"})
    assert store.output_path(job.id).parent == store.root / "outputs"


def test_settings_refuse_an_open_bind_without_a_token(tmp_path):
    ServerSettings(tmp_path).check()
    ServerSettings(tmp_path, host="0.0.0.0", token="s3cret").check()
    with pytest.raises(ValueError, match="--token"):
        ServerSettings(tmp_path, host="0.0.0.0").check()
    with pytest.raises(ValueError, match="--token"):
        ServerSettings(tmp_path, host="192.168.1.10").check()


def test_settings_round_trip_to_the_worker(tmp_path):
    s = ServerSettings(tmp_path, devices=("cpu", "cuda:1"), limits=Limits(max_frames=33, resolutions=("360p",)),
                       rewrite={"url": "http://127.0.0.1:9/v1"})
    assert settings_from_json(settings_to_json(s)) == s
    assert json.loads(settings_to_json(s))["limits"]["max_frames"] == 33


def test_latent_preview_recovers_a_linear_colour_map():
    rng = np.random.default_rng(0)
    latent = rng.normal(size=(8, 6, 5)).astype(np.float32)
    true_map = rng.normal(size=(9, 3)).astype(np.float32) * 0.1
    rgb = np.concatenate([latent.reshape(8, -1).T, np.ones((30, 1), np.float32)], 1) @ true_map + 0.5
    mapping = fit_latent_to_rgb(latent, rgb.reshape(6, 5, 3))
    np.testing.assert_allclose(mapping, true_map + np.r_[np.zeros((8, 3)), np.full((1, 3), 0.5)], atol=1e-4)
    strip = preview_strip(np.stack([latent] * 9, axis=1), mapping)
    assert strip.shape == (6, 5 * 6, 3) and strip.dtype == np.uint8
    np.testing.assert_allclose(strip[:, :5] / 255.0, np.clip(rgb.reshape(6, 5, 3), 0, 1), atol=1 / 255 + 1e-6)
