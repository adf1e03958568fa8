"""`diffsynth smooth`: deflickers a rendered video guided by the original, and resumes after SIGKILL."""

from fractions import Fraction

import av
import numpy as np
import pytest
from helpers import command_until_hang, run_cli

from diffsynth.demo import synthetic_frame, write_synthetic_clip
from diffsynth.video import read_video_frames

SETTINGS = ["--mode", "fast", "--window-size", "3", "--minimum-patch-size", "3", "--num-iter", "2"]
NUM_FRAMES, WIDTH, HEIGHT = 12, 64, 48


def write_flickering_render(path):
    """The clean clip's frames with strong per-frame brightness/colour jitter: what a diffusion render looks like."""
    rng = np.random.default_rng(5)
    with av.open(str(path), "w") as output:
        stream = output.add_stream("libx264", rate=12)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv444p"
        stream.options = {"crf": "4"}
        for index in range(NUM_FRAMES):
            clean = synthetic_frame(index, WIDTH, HEIGHT).astype(np.float32)
            jitter = clean * rng.uniform(0.75, 1.25) + rng.uniform(-25, 25, size=3)
            frame = av.VideoFrame.from_ndarray(np.clip(jitter, 0, 255).astype(np.uint8), format="rgb24")
            frame.pts, frame.time_base = index, Fraction(1, 12)
            for packet in stream.encode(frame):
                output.mux(packet)
        for packet in stream.encode():
            output.mux(packet)
    return path


def flicker(frames, clean):
    """Mean |(x[i+1] − clean[i+1]) − (x[i] − clean[i])|: frame-to-frame change not explained by the motion."""
    residual = [f.astype(np.float32) - c.astype(np.float32) for f, c in zip(frames, clean)]
    return float(np.mean([np.abs(b - a).mean() for a, b in zip(residual, residual[1:])]))


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("smooth")
    guide = write_synthetic_clip(folder / "guide.mp4", num_frames=NUM_FRAMES, width=WIDTH, height=HEIGHT, fps=12)
    style = write_flickering_render(folder / "style.mp4")
    return guide, style


def test_smooth_cuts_the_flicker_and_keeps_frames_and_audio(videos, tmp_path):
    guide, style = videos
    result = run_cli("smooth", "--guide", guide, "--style", style, "-o", tmp_path / "out.mp4", "--no-progress",
                     *SETTINGS)
    assert result.returncode == 0, result.stderr
    clean = [synthetic_frame(i, WIDTH, HEIGHT) for i in range(NUM_FRAMES)]
    before, after = read_video_frames(style), read_video_frames(tmp_path / "out.mp4")
    assert len(after) == NUM_FRAMES and after[0].shape == (HEIGHT, WIDTH, 3)
    assert flicker(after, clean) < 0.5 * flicker(before, clean)
    with av.open(str(tmp_path / "out.mp4")) as container:
        assert container.streams.audio, "the original's audio is kept"


def test_killed_smoothing_resumes_to_identical_bytes(videos, tmp_path):
    guide, style = videos
    args = ["smooth", "--guide", guide, "--style", style, "--no-progress", *SETTINGS]
    assert run_cli(*args, "-o", tmp_path / "reference.mp4").returncode == 0
    command_until_hang([*args, "-o", tmp_path / "out.mp4"], "smooth:10")
    assert not (tmp_path / "out.mp4").exists()
    result = run_cli(*args, "-o", tmp_path / "out.mp4")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out.mp4").read_bytes() == (tmp_path / "reference.mp4").read_bytes()


def test_mismatched_lengths_are_a_user_error(videos, tmp_path):
    guide, _ = videos
    short = write_synthetic_clip(tmp_path / "short.mp4", num_frames=5, width=WIDTH, height=HEIGHT, fps=12)
    result = run_cli("smooth", "--guide", guide, "--style", short, "-o", tmp_path / "o.mp4")
    assert result.returncode == 2
    assert "has 12 frames" in result.stderr and "Traceback" not in result.stderr


def test_bad_setting_names_the_option(videos, tmp_path):
    guide, style = videos
    result = run_cli("smooth", "--guide", guide, "--style", style, "-o", tmp_path / "o.mp4",
                     "--minimum-patch-size", "4")
    assert result.returncode == 2
    assert "--minimum-patch-size" in result.stderr and "odd" in result.stderr
