"""Frame-accurate input: variable frame rate, rotated phone videos, image folders, decoding from the middle."""

from fractions import Fraction

import av
import numpy as np
import pytest
from PIL import Image

from diffsynth.config import FramesConfig
from diffsynth.errors import UserError
from diffsynth.video import decode, probe


def shade(index):
    return (index * 23) % 200 + 30


def write_vfr_video(path, pts_ms, rotation=0, size=(32, 16)):
    """Solid frames whose grey level encodes their index, at irregular timestamps (milliseconds)."""
    width, height = size
    with av.open(str(path), "w") as output:
        stream = output.add_stream("libx264")
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        stream.options = {"crf": "0", "g": "4"}  # lossless, a keyframe every 4 frames: seeking matters
        if rotation:
            stream.set_display_rotation(rotation)
        for index, pts in enumerate(pts_ms):
            array = np.full((height, width, 3), shade(index), np.uint8)
            array[:, : width // 4] = 255  # a white stripe on the left: shows which way is up
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            frame.pts, frame.time_base = pts, Fraction(1, 1000)
            for packet in stream.encode(frame):
                output.mux(packet)
        for packet in stream.encode():
            output.mux(packet)
    return path


def frames_config(**kwargs):
    return FramesConfig(width=32, height=16, **kwargs)


def grey(image):
    return int(np.median(image[:, image.shape[1] // 2:]))


def test_variable_frame_rate_frames_come_in_presentation_order(tmp_path):
    pts = [0, 33, 50, 150, 160, 170, 400, 433, 466, 700, 720, 740, 1000]
    source = probe(frames_config(video_file=str(write_vfr_video(tmp_path / "vfr.mp4", pts))))
    assert len(source) == len(pts)
    frames = dict(decode(source, range(len(pts))))
    assert [abs(grey(frames[i]) - shade(i)) <= 2 for i in range(len(pts))] == [True] * len(pts)
    assert source.seconds(6) == pytest.approx(0.4)


def test_decoding_from_the_middle_gives_the_same_frames(tmp_path):
    pts = [i * 40 + (i % 3) * 7 for i in range(20)]
    source = probe(frames_config(video_file=str(write_vfr_video(tmp_path / "v.mp4", pts))))
    everything = dict(decode(source, range(20)))
    resumed = dict(decode(source, [11, 12, 17]))
    assert sorted(resumed) == [11, 12, 17]
    for index, image in resumed.items():
        assert np.array_equal(image, everything[index])


def test_rotated_phone_video_comes_out_upright(tmp_path):
    source = probe(frames_config(video_file=str(write_vfr_video(tmp_path / "r.mp4", [0, 33, 66], rotation=90))))
    (_, image), = list(decode(source, [1]))
    assert image.shape[:2] == (32, 16)  # portrait now
    # Rotated 90° counter-clockwise (as players show it): the left stripe is at the bottom.
    assert image[-4:].mean() > 250 and image[:4].mean() < 200


def test_image_folder_is_read_in_name_order(tmp_path):
    for index in (2, 0, 1):
        Image.fromarray(np.full((16, 32, 3), shade(index), np.uint8)).save(tmp_path / f"frame_{index:03d}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    source = probe(frames_config(image_folder=str(tmp_path)))
    assert len(source) == 3
    assert [grey(image) for _, image in decode(source, [0, 1, 2])] == [shade(0), shade(1), shade(2)]


def test_image_folder_without_zero_padding_is_read_in_numeric_order(tmp_path):
    """0.png … 12.png, as the original Diffutoon writes and reads them: 2.png before 10.png."""
    for index in range(13):
        Image.fromarray(np.full((16, 32, 3), shade(index), np.uint8)).save(tmp_path / f"{index}.png")
    source = probe(frames_config(image_folder=str(tmp_path)))
    assert [grey(image) for _, image in decode(source, range(13))] == [shade(i) for i in range(13)]


def test_truncated_video_is_a_user_error(tmp_path):
    path = write_vfr_video(tmp_path / "v.mp4", list(range(0, 400, 40)))
    (tmp_path / "cut.mp4").write_bytes(path.read_bytes()[:300])
    with pytest.raises(UserError):
        source = probe(frames_config(video_file=str(tmp_path / "cut.mp4")))
        list(decode(source, range(len(source))))


def test_encoding_the_same_frames_again_gives_the_same_bytes(tmp_path):
    """x264's mbtree assembly gave different bytes from one encode of the same frames to the next (about one encode
    in three here); a resume re-encodes, so the encoder must be deterministic within and across processes."""
    import hashlib

    from diffsynth.video import encode_video
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (8, 8, 3)).astype(np.uint8)
    frames = [np.kron(np.roll(base, i, axis=1), np.ones((8, 8, 1), np.uint8))
              + rng.integers(0, 20, (64, 64, 3)).astype(np.uint8) for i in range(16)]
    digests = set()
    for attempt in range(8):
        encode_video(tmp_path / f"{attempt}.mp4", iter(frames), Fraction(12), 17, 64, 64)
        digests.add(hashlib.sha256((tmp_path / f"{attempt}.mp4").read_bytes()).hexdigest())
    assert len(digests) == 1


def test_nvenc_is_probed_at_the_real_size_with_rate_control_and_the_encoder_is_in_the_fingerprint(monkeypatch):
    """NVENC refuses frames below its minimum size: a probe at a small size always failed and the render silently
    fell back. The probe opens the encoder at the frame size it will encode, with the quality target."""
    import types

    import diffsynth.video as video
    from diffsynth.stages.encode import EncodeStage
    opened = []

    class FakeNvenc:
        def open(self):
            opened.append((self.width, self.height, dict(self.options)))
            if self.width < 145 or self.height < 49:  # NVENC's minimum frame size
                raise av.FFmpegError(22, "Frame Dimension less than the minimum supported value")

        def close(self):
            pass
    monkeypatch.setattr(video.av.codec, "codecs_available", {"h264_nvenc", "libx264"})
    monkeypatch.setattr(video.av.CodecContext, "create", lambda name, mode: FakeNvenc())
    assert video.encoder_name(64, 64, 20) == "libx264"
    assert video.encoder_name(1280, 768, 20) == "h264_nvenc"
    assert opened[-1][:2] == (1280, 768) and opened[-1][2]["cq"] == "20" and opened[-1][2]["rc"] == "vbr"

    ctx = types.SimpleNamespace()
    final = types.SimpleNamespace(fingerprint="f", frame_keys=lambda: [])
    fingerprints = {}
    for codec in ("h264_nvenc", "libx264"):
        monkeypatch.setattr("diffsynth.stages.encode.encoder_name", lambda w, h, crf, codec=codec: codec)
        fingerprints[codec] = EncodeStage(ctx, final, Fraction(12), None, (64, 64), 17).fingerprint
    assert fingerprints["h264_nvenc"] != fingerprints["libx264"]
