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
from hunyuan_i2v.server.loras import LoraCatalog, bundled_lora_dir
from hunyuan_i2v.server.settings import Limits, LimitError, ServerSettings
from hunyuan_i2v.server.worker import fit_latent_to_rgb, preview_strip, settings_from_json, settings_to_json

GRAYFADE = "grayfade.safetensors"


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


def test_settings_refuse_a_lora_dir_that_is_not_a_folder(tmp_path):
    ServerSettings(tmp_path, lora_dir=tmp_path).check()
    with pytest.raises(ValueError, match="--lora-dir .* is not a folder"):
        ServerSettings(tmp_path, lora_dir=tmp_path / "nope").check()


def test_settings_round_trip_to_the_worker(tmp_path):
    s = ServerSettings(tmp_path, devices=("cpu", "cuda:1"), limits=Limits(max_frames=33, resolutions=("360p",),
                                                                          max_loras=2, max_lora_scale=1.5),
                       rewrite={"url": "http://127.0.0.1:9/v1"}, lora_dir=tmp_path / "loras")
    assert settings_from_json(settings_to_json(s)) == s
    assert json.loads(settings_to_json(s))["limits"]["max_frames"] == 33
    assert settings_from_json(settings_to_json(s.replace(lora_dir=None))).lora_dir is None


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


# -- LoRAs ------------------------------------------------------------------------------------------------

def bad_lora(path) -> None:
    """A LoRA in the official naming whose shapes fit no layer of the tiny model."""
    import torch
    from safetensors.torch import save_file

    stem = "Hunyuan_video_I2V_lora_double_blocks_0_img_attn_qkv"
    save_file({f"{stem}.lora_down.weight": torch.zeros(4, 7), f"{stem}.lora_up.weight": torch.zeros(5, 4)}, str(path))


@pytest.fixture
def lora_dir(tmp_path):
    """A LoRA folder: the bundled grayfade, one that does not fit the model, and files that are no LoRAs."""
    folder = tmp_path / "loras"
    folder.mkdir()
    (folder / GRAYFADE).write_bytes((bundled_lora_dir() / GRAYFADE).read_bytes())
    bad_lora(folder / "wrong-size.safetensors")
    (folder / "notes.txt").write_text("grayfade: trigger word 'grayfade'")
    (folder / ".hidden.safetensors").write_bytes(b"")
    (folder / "sub.safetensors").mkdir()  # a folder, not a file
    return folder


@pytest.fixture
def lora_store(tmp_path, lora_dir):
    s = JobStore(tmp_path / "data", Limits(max_loras=2), 2, loras=LoraCatalog(lora_dir, bundled_model_dir()))
    yield s
    s.close()


def bundled_model_dir():
    from hunyuan_i2v.cli import bundled_model_dir as find

    return find()


def test_the_default_catalog_is_the_bundled_lora(tmp_path):
    entries = LoraCatalog.for_settings(ServerSettings(tmp_path)).entries()
    size = (bundled_lora_dir() / GRAYFADE).stat().st_size
    assert [e.public() for e in entries] == [{"name": GRAYFADE, "size_bytes": size, "format": "official",
                                              "usable": True, "error": None}]


def test_catalog_lists_lora_files_only_and_says_which_do_not_fit(lora_dir):
    catalog = LoraCatalog(lora_dir, bundled_model_dir())
    listed = {e.name: e for e in catalog.entries()}
    assert sorted(listed) == [GRAYFADE, "wrong-size.safetensors"]  # no .txt, hidden file or folder
    assert listed[GRAYFADE].error is None and listed[GRAYFADE].format == "official"
    assert "does not fit layer double_blocks.0.img_attn_qkv" in listed["wrong-size.safetensors"].error
    assert catalog.get(GRAYFADE).path == lora_dir / GRAYFADE
    with pytest.raises(LimitError, match="does not fit this server's model"):
        catalog.get("wrong-size.safetensors")
    bad_lora(lora_dir / GRAYFADE)  # replaced under a running server: checked again
    with pytest.raises(LimitError, match="does not fit"):
        catalog.get(GRAYFADE)


def test_job_loras_are_validated_and_stored_with_the_job(lora_store, tmp_path):
    job = lora_store.submit(png_bytes(), {"prompt": "grayfade, pan left", "loras": [{"name": GRAYFADE, "scale": 0.5}]})
    assert job.params["loras"] == [{"name": GRAYFADE, "scale": 0.5}]
    plain = lora_store.submit(png_bytes(), {"prompt": "pan left", "loras": []})
    assert "loras" not in plain.params  # no LoRA: the same job as one that names none
    default_scale = lora_store.submit(png_bytes(), {"prompt": "pan left", "loras": [{"name": GRAYFADE}]})
    assert default_scale.params["loras"] == [{"name": GRAYFADE, "scale": 1.0}]
    reopened = JobStore(tmp_path / "data")
    assert reopened.get(job.id).params["loras"] == [{"name": GRAYFADE, "scale": 0.5}]
    assert reopened.get(job.id).public()["params"]["loras"] == [{"name": GRAYFADE, "scale": 0.5}]
    reopened.close()


@pytest.mark.parametrize("loras, message", [
    ([{"name": "style.safetensors"}], "unknown LoRA 'style.safetensors': this server has grayfade.safetensors"),
    ([{"name": "../loras/grayfade.safetensors"}], "unknown LoRA"),
    ([{"name": "<absolute path of grayfade>"}], "unknown LoRA"),
    ([{"name": "notes.txt"}], "unknown LoRA"),
    ([{"name": "wrong-size.safetensors"}], "does not fit this server's model"),
    ([{"name": GRAYFADE, "scale": float("nan")}], r"loras\[0\].scale must be a finite number, got nan"),
    ([{"name": GRAYFADE, "scale": float("inf")}], "finite number"),
    ([{"name": GRAYFADE, "scale": 4.5}], r"within -4..4 on this server, got 4.5"),
    ([{"name": GRAYFADE, "scale": -4.01}], "within -4..4"),
    ([{"name": GRAYFADE, "scale": 10**400}], "within -4..4"),  # a JSON integer too big for a float
    ([{"name": GRAYFADE, "scale": True}], "finite number"),
    ([{"name": GRAYFADE, "scale": "1"}], "finite number"),
    ([{"name": GRAYFADE}, {"name": GRAYFADE, "scale": 0.2}], "given twice"),
    ([{"name": GRAYFADE}] * 3, "3 LoRAs is over this server's limit of 2 per job"),
    (GRAYFADE, "loras must be a list"),
    ({"name": GRAYFADE}, "loras must be a list"),
    ([GRAYFADE], r"loras\[0\] must be an object like"),
    ([{"name": GRAYFADE, "path": "/etc/passwd"}], r"loras\[0\] has an unknown field 'path'"),
    ([{"scale": 1.0}], r"loras\[0\].name must be the name of a LoRA"),
    ([{"name": 3}], "name must be the name of a LoRA"),
])
def test_bad_loras_are_refused_before_anything_is_stored(lora_store, lora_dir, tmp_path, loras, message):
    if loras == [{"name": "<absolute path of grayfade>"}]:
        loras = [{"name": str(lora_dir / GRAYFADE)}]  # the very file: a path is never a name
    with pytest.raises(LimitError, match=message) as info:
        lora_store.submit(png_bytes(), {"prompt": "grayfade, pan left", "loras": loras})
    assert info.value.status == 422 and len(str(info.value).splitlines()) == 1
    assert lora_store.count("queued", "running", "succeeded", "failed", "cancelled") == 0
    assert list((tmp_path / "data" / "uploads").iterdir()) == []


def test_a_store_without_a_catalog_or_with_max_loras_0_takes_no_lora(tmp_path, lora_dir):
    no_catalog = JobStore(tmp_path / "a")
    with pytest.raises(LimitError, match="this server has no LoRAs"):
        no_catalog.submit(png_bytes(), {"prompt": "pan", "loras": [{"name": GRAYFADE}]})
    no_catalog.close()
    off = JobStore(tmp_path / "b", Limits(max_loras=0), loras=LoraCatalog(lora_dir, bundled_model_dir()))
    with pytest.raises(LimitError, match="takes no LoRAs"):
        off.submit(png_bytes(), {"prompt": "pan", "loras": [{"name": GRAYFADE}]})
    assert off.submit(png_bytes(), {"prompt": "pan"}).params == {"prompt": "pan"}
    off.close()


PRE_LORA_SCHEMA = """
CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    created REAL NOT NULL, started REAL, finished REAL, prompt TEXT NOT NULL, image TEXT NOT NULL,
    params TEXT NOT NULL, stage TEXT, progress REAL NOT NULL DEFAULT 0, step INTEGER, steps INTEGER, eta REAL,
    attempts INTEGER NOT NULL DEFAULT 0, max_attempts INTEGER NOT NULL, worker TEXT, heartbeat REAL,
    cancel_requested INTEGER NOT NULL DEFAULT 0, error TEXT, history TEXT NOT NULL DEFAULT '[]', result TEXT,
    output TEXT
);
CREATE INDEX jobs_status_created ON jobs (status, created);
"""


def test_a_database_from_before_loras_opens_and_its_jobs_have_none(tmp_path, lora_dir):
    data = tmp_path / "data"
    data.mkdir()
    db = sqlite3.connect(data / "jobs.sqlite3")  # the schema of the first release, written by an old server
    db.executescript(PRE_LORA_SCHEMA)
    db.execute("INSERT INTO jobs (id, status, created, prompt, image, params, stage, max_attempts) VALUES "
               "(?, 'queued', 1.0, 'pan left', 'x.png', ?, 'queued', 3)",
               ("a" * 32, json.dumps({"prompt": "pan left"})))
    db.commit()
    db.close()
    store = JobStore(data, Limits(), loras=LoraCatalog(lora_dir, bundled_model_dir()))
    old = store.get("a" * 32)
    assert old.params == {"prompt": "pan left"} and "loras" not in old.params
    new = store.submit(png_bytes(), {"prompt": "grayfade", "loras": [{"name": GRAYFADE, "scale": 2.0}]})
    assert [j.id for j in store.list()] == [new.id, old.id]
    assert store.claim(new_worker_id("cpu")).id == old.id  # the old job is still first in the queue
    store.close()


def test_worker_runs_a_jobs_loras_as_adapters_then_the_base_model_again(tmp_path, lora_dir):
    """Real worker, real queue, the bundled model: a LoRA job changes the video; the next job without one gives
    the base video again, from the same pipeline and transformer (nothing reloaded)."""
    import torch

    from hunyuan_i2v.lora import LoraLinear
    from hunyuan_i2v.server.worker import Worker
    from hunyuan_i2v.video import read_video

    settings = ServerSettings(tmp_path / "data", lora_dir=lora_dir, limits=Limits(max_loras=2))
    store = JobStore(settings.data_dir, settings.limits, loras=LoraCatalog.for_settings(settings))
    worker = Worker(settings, "cpu")
    base = {"prompt": "grayfade, the camera pans left", "steps": 2, "frames": 9, "seed": 11}
    photo = png_bytes(64, 64, (200, 40, 30))
    ids = [store.submit(photo, p).id for p in (base, {**base, "loras": [{"name": GRAYFADE, "scale": 1.0}]}, base)]
    pipes, transformers, weights = [], [], []
    for _ in ids:
        worker.run(store.claim(worker.id))
        pipes.append(worker._pipe)
        transformers.append(worker._pipe.transformer)
        weights.append({k: v.clone() for k, v in worker._pipe.transformer.state_dict().items()})
        assert not any(isinstance(m, LoraLinear) for m in worker._pipe.transformer.modules())
        assert worker._pipe.loras == []
    jobs = [store.get(i) for i in ids]
    assert [j.status for j in jobs] == ["succeeded"] * 3, [j.error for j in jobs]
    assert jobs[1].result["loras"] == [{"name": GRAYFADE, "scale": 1.0}] and "loras" not in jobs[2].result
    videos = [read_video(store.output_path(i)) for i in ids]
    assert videos[1][2]["loras"] == [{"name": GRAYFADE, "scale": 1.0}] and "loras" not in videos[2][2]
    first, with_lora, after = (v[0].astype(np.int16) for v in videos)
    lora_change = np.abs(with_lora - first).mean()
    assert lora_change > 0.5  # the LoRA changed the video
    # and left nothing behind: the base weights bit for bit, and the same video up to the MP4 encode: in full test
    # runs identical frames with identical metadata were now and then encoded differently (0.8 levels mean against
    # 10+ for the LoRA; the same frames re-encoded in a fresh process are identical every time)
    for before, later in zip(weights[0].items(), weights[2].items()):
        assert before[0] == later[0] and torch.equal(before[1], later[1]), before[0]
    assert np.abs(after - first).mean() < min(1.5, lora_change / 5)
    assert pipes[0] is pipes[1] is pipes[2] and transformers[0] is transformers[1] is transformers[2]

    # a LoRA removed from the folder after its job was queued: that job fails with the reason, the next one runs
    gone = store.submit(photo, {**base, "loras": [{"name": GRAYFADE, "scale": 1.0}]})
    (lora_dir / GRAYFADE).unlink()
    worker.run(store.claim(worker.id))
    failed = store.get(gone.id)
    assert failed.status == "failed" and failed.error.startswith("unknown LoRA 'grayfade.safetensors'"), failed.error
    assert worker._pipe is pipes[0] and worker._pipe.loras == []
    store.close()
    worker.store.close()
