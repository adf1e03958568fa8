"""The bundled demo: a short synthetic clip with an audio track and the tiny model set, generated on first use."""

from fractions import Fraction
from pathlib import Path

import numpy as np

from .errors import UserError

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = REPO_ROOT / "configs" / "demo.yaml"
DEMO_ASSETS = REPO_ROOT / "assets" / "demo"


def synthetic_frame(index, width, height):
    """A textured background with a moving disc and a moving square: enough structure for canny and FastBlend."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    background = 128 + 60 * np.sin(x / 7.0 + index * 0.15) * np.cos(y / 9.0 - index * 0.1)
    image = np.stack([background, background * 0.8 + 30, 255 - background], axis=-1)
    cx, cy = width * (0.2 + 0.6 * (index % 48) / 47), height * 0.5 + height * 0.25 * np.sin(index / 6)
    image[(x - cx) ** 2 + (y - cy) ** 2 < (height * 0.18) ** 2] = (240, 200, 40)
    sx = int(width * 0.7 - index * 1.5) % width
    image[height // 8:height // 8 + height // 5, sx:sx + width // 6] = (30, 160, 90)
    return np.clip(image, 0, 255).astype(np.uint8)


def _scene_frame(scene, index, width, height):
    """Frame `index` of one of five very different synthetic scenes, each drifting slowly (float32 RGB)."""
    if scene == 0:  # the demo's textured blue background, moving disc and square
        return synthetic_frame(index, width, height).astype(np.float32)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32) * (64 / width)  # the same picture at any size
    wave = np.sin((x + 0.5 * index) / 5) * np.cos((y - 0.3 * index) / 6)
    flat = np.ones_like(x)
    colours = {1: (220 * flat, 70 + 50 * wave, 40 * flat),      # red-orange
               2: (20 * flat, 150 + 60 * wave, 40 * flat),       # green
               3: (30 * flat, 70 + 40 * wave, 220 * flat),       # blue
               4: (230 * flat, 210 * flat, 70 + 50 * wave)}      # yellow
    return np.stack(colours[scene], axis=-1)


def cut_clip_frames(width=64, height=48, shot_length=16, dissolve=24):
    """(frames, cut frames) of a synthetic clip with three hard cuts between very different scenes and one
    gradual dissolve inside the third shot (a transition, not a cut): scene 0 | scene 1 | scene 2 dissolving into
    scene 3 | scene 4, each drifting. Every shot is at least `shot_length` frames (PySceneDetect merges shots
    shorter than its min_scene_len, 15)."""
    plan = [[(0, i) for i in range(shot_length)], [(1, i) for i in range(shot_length)],
            [(2, i) for i in range(4)] + [("dissolve", i) for i in range(dissolve)] + [(3, dissolve + 4 + i)
                                                                                        for i in range(4)],
            [(4, i) for i in range(shot_length)]]
    frames, starts = [], []
    for shot in plan:
        starts.append(len(frames))
        for scene, index in shot:
            if scene == "dissolve":  # scene 2 → scene 3, linearly, both still drifting
                t = (index + 1) / (dissolve + 1)
                image = (1 - t) * _scene_frame(2, 4 + index, width, height) + t * _scene_frame(3, 4 + index, width,
                                                                                              height)
            else:
                image = _scene_frame(scene, index, width, height)
            frames.append(np.clip(image, 0, 255).astype(np.uint8))
    return frames, starts[1:]


def write_frames_clip(path, frames, fps=12):
    """An H.264 clip of uint8 RGB frames (crf 12, no audio)."""
    height, width = frames[0].shape[:2]
    return write_clip(path, frames, width, height, fps, audio=False)


def write_synthetic_clip(path, num_frames=48, width=160, height=120, fps=12, audio=True, rotation=0):
    """An H.264 clip with a 440 Hz tone (AAC) covering its whole length; deterministic for the same arguments."""
    frames = (synthetic_frame(index, width, height) for index in range(num_frames))
    return write_clip(path, frames, width, height, fps, audio=audio)


def write_clip(path, frames, width, height, fps=12, audio=False):
    """An H.264 clip (crf 12) of uint8 RGB `frames`, with a 440 Hz stereo tone (AAC) over its length if `audio`."""
    import av  # here, not above: synthetic_frame alone needs no PyAV (bench/gpu.py's original-only device run)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format="mp4") as output:
        video = output.add_stream("libx264", rate=Fraction(fps))
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.options = {"crf": "12"}
        video.thread_count = 1
        rate = 44100
        if audio:  # every stream must exist before the first packet is muxed
            sound = output.add_stream("aac", rate=rate)
            sound.layout = "stereo"
        count = 0
        for index, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = index
            frame.time_base = Fraction(1, fps)
            for packet in video.encode(frame):
                output.mux(packet)
            count += 1
        for packet in video.encode():
            output.mux(packet)
        if audio:
            total = int(rate * count / fps)  # the tone covers every frame written
            t = np.arange(total) / rate
            tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
            for offset in range(0, total, 1024):
                chunk = tone[offset:offset + 1024]
                frame = av.AudioFrame.from_ndarray(np.stack([chunk, chunk]), format="fltp", layout="stereo")
                frame.sample_rate, frame.pts = rate, offset
                for packet in sound.encode(frame):
                    output.mux(packet)
            for packet in sound.encode(None):
                output.mux(packet)
    return path


def ensure_demo_assets(folder=DEMO_ASSETS):
    """Create the demo clip and tiny models under `folder` unless they are there already."""
    from filelock import FileLock  # a dependency of torch and huggingface_hub; works on every OS

    from .models.tiny import write_tiny_models

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # Two processes may ask at once (the web UI and a CLI, or parallel test workers): one writes, the other waits.
    with FileLock(str(folder / ".writing.lock")):
        marker = folder / "models" / "COMPLETE"
        if not marker.exists():
            write_tiny_models(folder / "models")
            marker.write_text("tiny models written by diffsynth.models.tiny\n")
        clip = folder / "clip.mp4"
        if not clip.exists():
            write_synthetic_clip(clip.with_suffix(".partial.mp4"))
            clip.with_suffix(".partial.mp4").rename(clip)
    return folder


def write_demo_config(path, overrides=()):
    """A copy of the demo config that works wherever it is put: every path absolute, rendering into
    runs/<file stem> beside it. Returns the path written."""
    import yaml

    from .cache import atomic_write
    from .config import load_config
    path = Path(path).resolve()
    if path.suffix.lower() not in (".yaml", ".yml"):
        raise UserError(f"--write-config {path}: give a .yaml file name")
    config = load_config(DEMO_CONFIG, list(overrides)).model_dump()
    config["data"]["output_folder"] = str(path.parent / "runs" / path.stem)
    header = "# A copy of the bundled demo config (tiny models); paths are absolute. Edit and render it with\n" \
             f"#   diffsynth render {path}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, (header + yaml.safe_dump(config, sort_keys=False, allow_unicode=True)).encode())
    return path
