"""Video and image-folder input, H.264 output with the source's audio: PyAV (FFmpeg) underneath.

Frames are addressed by their presentation order: frame i is the i-th distinct timestamp of the video stream, so
variable-frame-rate videos decode frame-accurately, and rotated phone videos come out upright.
"""

import logging
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

from .errors import UserError

log = logging.getLogger("diffsynth")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}


@dataclass
class FrameSource:
    """The frames of a video file or an image folder, probed once (timestamps only, nothing decoded)."""
    path: str
    is_video: bool
    frame_times: list          # presentation timestamps in stream time_base (video) or file names (folder)
    fps: Fraction
    time_base: Fraction | None = None

    def __len__(self):
        return len(self.frame_times)

    def seconds(self, index):
        """Presentation time of frame `index` in seconds (the end of the video for index == len)."""
        if index >= len(self.frame_times):
            return float(self.frame_times[-1] * self.time_base + 1 / self.fps)
        return float(self.frame_times[index] * self.time_base)


def probe(frames_config):
    if frames_config.image_folder:
        return _probe_folder(Path(frames_config.image_folder))
    return probe_video_file(Path(frames_config.video_file))


def natural_order(name):
    """Sort key: numbers in a file name compare as numbers (2.png before 10.png), as the original Diffutoon reads
    image folders; the rest case-insensitively."""
    return [(0, int(part), part) if part.isdigit() else (1, 0, part.lower())
            for part in re.split(r"(\d+)", name) if part]


def _probe_folder(folder):
    if not folder.is_dir():
        raise UserError(f"image folder not found: {folder}")
    files = sorted((p.name for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=natural_order)
    if not files:
        raise UserError(f"image folder {folder} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return FrameSource(str(folder), False, files, Fraction(30))


def _open_video(path):
    if not path.is_file():
        raise UserError(f"video file not found: {path}")
    try:
        container = av.open(str(path))
    except av.FFmpegError as error:
        raise UserError(f"cannot read {path} as a video ({error.strerror or error}); "
                        "is it a video file FFmpeg can open?") from None
    if not container.streams.video:
        container.close()
        raise UserError(f"{path} has no video stream")
    return container


def probe_video_file(path):
    with _open_video(path) as container:
        stream = container.streams.video[0]
        try:
            times = sorted({packet.pts for packet in container.demux(stream) if packet.pts is not None})
        except av.FFmpegError as error:
            raise UserError(f"{path} is damaged: {error.strerror or error}") from None
        if not times:
            raise UserError(f"{path} has no video frames")
        fps = stream.average_rate or stream.guessed_rate or Fraction(30)
        return FrameSource(str(path), True, times, Fraction(fps), Fraction(stream.time_base))


def decode(source, indices):
    """Yield (index, uint8 RGB array) for the wanted frame indices (ascending), decoding sequentially from the
    keyframe before the first one, so a resumed decode does not start from the beginning of a long video."""
    wanted = sorted(indices)
    if not wanted:
        return
    if not source.is_video:
        for index in wanted:
            yield index, read_image(Path(source.path) / source.frame_times[index])
        return
    index_of = {pts: i for i, pts in enumerate(source.frame_times)}
    remaining = set(wanted)
    with _open_video(Path(source.path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        container.seek(source.frame_times[wanted[0]], stream=stream, backward=True, any_frame=False)
        try:
            for frame in container.decode(stream):
                index = index_of.get(frame.pts)
                if index in remaining:
                    remaining.discard(index)
                    yield index, _upright(frame)
                    if not remaining:
                        return
        except av.FFmpegError as error:
            raise UserError(f"{source.path} is damaged near frame {min(remaining)}: {error.strerror or error}") \
                from None
    if remaining:
        raise UserError(f"{source.path}: could not decode frame(s) starting at {min(remaining)}; "
                        "the file may be truncated")


def _upright(frame):
    image = frame.to_ndarray(format="rgb24")
    rotation = getattr(frame, "rotation", 0) or 0
    # The display matrix rotates the picture `rotation` degrees counter-clockwise; np.rot90 does the same for k > 0.
    return np.ascontiguousarray(np.rot90(image, k=round(rotation / 90) % 4)) if rotation else image


def image_sizes(source, start, end):
    """{file name: (width, height)} of an image folder's frames [start, end), from their headers (nothing
    decoded): a file that is not an image is reported (UserError) before the render starts, not when reached."""
    sizes = {}
    for name in source.frame_times[start:end]:
        try:
            with Image.open(Path(source.path) / name) as image:
                sizes[name] = image.size
        except (OSError, ValueError) as error:
            raise UserError(f"cannot read image {Path(source.path) / name}: {error}; replace or remove it") from None
    return sizes


def read_image(path):
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read image {path}: {error}") from None


def nvenc_options(crf):
    """NVENC's rate control for a quality target: constant quality (VBR with cq = the CRF), no bitrate cap."""
    return {"rc": "vbr", "cq": str(crf), "b": "0", "preset": "p5"}


def encoder_name(width, height, crf=17):
    """NVENC when this FFmpeg build has it and a GPU opens it at the real frame size and rate control (NVENC has
    a minimum frame size, so a small probe would always fail), else libx264. Logged by the encode stage."""
    if "h264_nvenc" not in av.codec.codecs_available:
        return "libx264"
    try:
        probe_context = av.CodecContext.create("h264_nvenc", "w")
        probe_context.width, probe_context.height, probe_context.pix_fmt = width, height, "yuv420p"
        probe_context.time_base = Fraction(1, 30)
        probe_context.options = nvenc_options(crf)
        probe_context.open()
        probe_context.close()
        return "h264_nvenc"
    except (av.FFmpegError, OSError, ValueError):  # no driver, no GPU, or a size this GPU's NVENC refuses
        return "libx264"


def encode_video(path, frames, fps, crf, width, height, audio=None, codec="libx264"):
    """Encode an iterator of uint8 RGB frames to H.264 yuv420p at `fps`, muxing `audio` = (source path, start s,
    end s) as AAC. Frames are streamed: one frame in memory at a time. Deterministic for the same inputs."""
    fps = Fraction(fps).limit_denominator(1001 * 1000)
    with av.open(str(path), "w", format="mp4") as output:
        video = output.add_stream(codec, rate=fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        if codec == "libx264":
            # mbtree off: with it, this x264 build's assembly gives different bytes from one encode to the next
            # for the same frames (seen in one process and across processes); identical bytes are a promise.
            video.options = {"crf": str(crf), "preset": "medium", "x264-params": "mbtree=0"}
            video.thread_count = 1  # one thread: identical bytes whatever the machine's core count
        else:
            video.options = nvenc_options(crf)
        audio_stream = None
        if audio:
            audio_stream = _open_audio(*audio, output)
        for frame_index, array in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            frame.pts = frame_index
            frame.time_base = 1 / fps
            for packet in video.encode(frame):
                output.mux(packet)
        for packet in video.encode():
            output.mux(packet)
        if audio_stream:
            _copy_audio(*audio, audio_stream, output)


def _open_audio(source_path, start, end, output):
    with av.open(str(source_path)) as source:
        if not source.streams.audio:
            return None
        rate = source.streams.audio[0].rate or 48000
    stream = output.add_stream("aac", rate=rate)
    stream.layout = "stereo"
    return stream


def _copy_audio(source_path, start, end, stream, output):
    """Decode the source's audio in [start, end) seconds, trim to the exact samples, re-encode as AAC."""
    resampler = av.AudioResampler(format="fltp", layout="stereo", rate=stream.rate, frame_size=1024)
    samples_written = 0
    with av.open(str(source_path)) as source:
        in_stream = source.streams.audio[0]
        for frame in source.decode(in_stream):
            if frame.pts is None:
                continue
            frame_start = float(frame.pts * frame.time_base)
            frame_end = frame_start + frame.samples / frame.sample_rate
            if frame_end <= start:
                continue
            if frame_start >= end:
                break
            frame = _trim_audio(frame, max(0.0, start - frame_start), min(frame_end, end) - frame_start)
            for chunk in resampler.resample(frame):
                chunk.pts, samples_written = samples_written, samples_written + chunk.samples
                for packet in stream.encode(chunk):
                    output.mux(packet)
    for chunk in resampler.resample(None):
        chunk.pts, samples_written = samples_written, samples_written + chunk.samples
        for packet in stream.encode(chunk):
            output.mux(packet)
    for packet in stream.encode(None):
        output.mux(packet)


def _trim_audio(frame, from_seconds, to_seconds):
    first = int(round(from_seconds * frame.sample_rate))
    last = min(frame.samples, int(round(to_seconds * frame.sample_rate)))
    if first == 0 and last == frame.samples:
        return frame
    planar = frame.format.is_planar
    data = frame.to_ndarray()
    data = data[:, first:last] if planar else data[:, first * len(frame.layout.channels):last * len(frame.layout.channels)]
    trimmed = av.AudioFrame.from_ndarray(np.ascontiguousarray(data), format=frame.format.name, layout=frame.layout.name)
    trimmed.sample_rate = frame.sample_rate
    trimmed.time_base = frame.time_base
    trimmed.pts = None
    return trimmed


def read_video_frames(path):
    """All frames of a video as uint8 arrays (for tests and small checks only)."""
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def audio_duration(path):
    """Seconds of audio in a file, or 0.0 when it has none."""
    with av.open(str(path)) as container:
        if not container.streams.audio:
            return 0.0
        samples, rate = 0, container.streams.audio[0].rate
        for frame in container.decode(audio=0):
            samples += frame.samples
        return samples / rate
