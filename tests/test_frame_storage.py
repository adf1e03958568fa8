"""How frames are stored: one lossless compressed format for every cached image, one channel for grey maps, decode
fused into crop (no source-resolution frame on disk), fast PNGs for frames/, and frames/ optional."""

import io
import shutil
import sqlite3
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import run_cli, small_config, write_config
from PIL import Image

from diffsynth.cache import (FRAME_MAGIC, RunCache, as_rgb, bytes_to_image, image_to_bytes, image_to_png,
                             tensors_to_bytes)
from diffsynth.config import FramesConfig
from diffsynth.demo import synthetic_frame
from diffsynth.runner import run_stages
from diffsynth.stages.annotate import AnnotateStage
from diffsynth.stages.crop import CropStage
from diffsynth.video import probe, read_video_frames


@pytest.mark.parametrize("shape", [(1, 1, 3), (7, 5, 3), (64, 48, 3), (33, 17), (1, 9), (6, 4, 4)])
def test_codec_round_trips_random_frames_exactly(shape):
    array = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    data = image_to_bytes(array)
    assert data[:4] == FRAME_MAGIC
    back = bytes_to_image(data)
    assert back.shape == array.shape and back.dtype == np.uint8 and (back == array).all()


def test_codec_round_trips_real_frames_and_compresses_them(demo_assets):
    frames = read_video_frames(demo_assets / "clip.mp4")[:3] + [synthetic_frame(5, 320, 192)]
    extremes = [np.zeros((16, 24, 3), np.uint8), np.full((16, 24, 3), 255, np.uint8),
                (np.indices((16, 24)).sum(0) % 2 * 255).astype(np.uint8)]  # a checkerboard: every residual wraps
    for frame in frames + extremes:
        data = image_to_bytes(frame)
        assert (bytes_to_image(data) == frame).all()
    for frame in frames:  # natural pictures: well under the raw size
        assert len(image_to_bytes(frame)) < 0.6 * frame.nbytes
    # a (H, W, 1) array is stored as one channel; a frame of the old format (raw safetensors) still reads
    grey = frames[0][:, :, :1]
    assert bytes_to_image(image_to_bytes(grey)).shape == grey.shape[:2]
    assert (bytes_to_image(tensors_to_bytes({"image": torch.from_numpy(frames[0].copy())})) == frames[0]).all()


def test_png_frames_keep_rgb_order():
    frame = np.random.default_rng(1).integers(0, 256, (9, 13, 3), dtype=np.uint8)
    with Image.open(io.BytesIO(image_to_png(frame))) as image:
        assert image.mode == "RGB" and (np.asarray(image) == frame).all()


class RecordingCache(RunCache):
    """A run cache that remembers the shape of every image unit written through it."""
    shapes = []

    def write(self, stage, key, data, path=None, digest=None):
        if not callable(data) and bytes(data[:4]) == FRAME_MAGIC:
            self.shapes.append((stage, key, bytes_to_image(data).shape))
        return super().write(stage, key, data, path, digest)


def test_crop_stores_no_source_frame_and_edge_maps_are_one_channel(demo_assets, tmp_path):
    """Decode + crop + canny of 8 frames of the 160×120 demo clip at 64×48: every stored image is 64×48, the canny
    maps one channel (read back as RGB); a resume after losing frames 3 and 6 gives the same bytes."""
    frames_config = FramesConfig(video_file=str(demo_assets / "clip.mp4"), width=64, height=48, end_frame_id=8)
    source = probe(frames_config)
    RecordingCache.shapes = []
    cache = RecordingCache(tmp_path / "run")
    try:
        ctx = SimpleNamespace(cache=cache, config=SimpleNamespace(models=SimpleNamespace()), models=None,
                              device="cpu")
        crop = CropStage(ctx, frames_config, source, (0, 8))
        canny = AnnotateStage(ctx, crop, "canny", name="annotate.0.canny")
        run_stages([crop, canny], cache, progress=False)
        assert {shape for _, _, shape in RecordingCache.shapes} == {(48, 64, 3), (48, 64)}
        assert {stage for stage, _, shape in RecordingCache.shapes if shape == (48, 64)} == {"annotate.0.canny"}
        assert not (tmp_path / "run" / "cache" / "decode").exists()
        edges = canny.read_image(canny, "000002.safetensors")
        stored = bytes_to_image(cache.read("annotate.0.canny", "000002.safetensors"))
        assert edges.shape == (48, 64, 3) and (edges == as_rgb(stored)).all() and stored.any()
        before = {key: cache.read("crop", key) for key in crop.unit_keys()}
        cache.forget_units("crop", ["000003.safetensors", "000006.safetensors"])
        crop = CropStage(ctx, frames_config, source, (0, 8))
        run_stages([crop], cache, progress=False)
        assert {key: cache.read("crop", key) for key in crop.unit_keys()} == before
    finally:
        cache.close()


def test_old_layout_folder_and_save_frames_off(small_render, demo_assets, tmp_path):
    """A run folder of the old layout (a `decode` stage of source frames) rendered with save_frames off: the decode
    stage and its files are dropped, frames/ is gone, only the encode stage runs, and the video is the same bytes."""
    run_dir = tmp_path / "run"
    shutil.copytree(small_render / "run", run_dir)
    stale = run_dir / "cache" / "decode" / "000000.safetensors"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old source frame")
    db = sqlite3.connect(run_dir / "manifest.sqlite")
    db.execute("INSERT INTO stages VALUES ('decode', 'old', 12, 0, -1)")
    db.execute("INSERT INTO units VALUES ('decode', '000000.safetensors', 'cache/decode/000000.safetensors', 16, "
               "'c', 1.0)")
    db.commit()
    before = dict(db.execute("SELECT stage || '/' || key, finished FROM units").fetchall())
    db.close()
    config = small_config(demo_assets, run_dir)
    config["data"]["save_frames"] = False
    result = run_cli("render", write_config(tmp_path / "c.yaml", config), "--no-progress")
    assert result.returncode == 0, result.stderr
    db = sqlite3.connect(run_dir / "manifest.sqlite")
    after = dict(db.execute("SELECT stage || '/' || key, finished FROM units").fetchall())
    stages = {name for (name,) in db.execute("SELECT name FROM stages")}
    db.close()
    assert "decode" not in stages and not stale.exists()
    assert {unit for unit, finished in after.items() if before.get(unit) != finished} == {"encode/video.mp4"}
    assert not list((run_dir / "frames").glob("*.png"))
    assert (run_dir / "video.mp4").read_bytes() == (small_render / "run" / "video.mp4").read_bytes()


def test_frames_png_are_the_final_frames(small_render):
    cache = RunCache(small_render / "run")
    try:
        final = bytes_to_image(cache.read("smooth.final", "000003.safetensors"))
    finally:
        cache.close()
    with Image.open(small_render / "run" / "frames" / "00003.png") as image:
        assert (np.asarray(image.convert("RGB")) == final).all()
