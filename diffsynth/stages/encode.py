"""Stage 10, encode: the final frames as frames/00000.png … and video.mp4 (H.264, the source's frame rate and
the source's audio for the rendered range)."""

import logging
from pathlib import Path

from ..cache import bytes_to_image, image_to_png
from ..video import encode_video, encoder_name
from .base import Stage, frame_index, frame_key

VIDEO_KEY = "video.mp4"
log = logging.getLogger("diffsynth")


class EncodeStage(Stage):
    name = "encode"
    version = "4"  # 2: frames stored as raw uint8 safetensors instead of PNG; 3: x264 without mbtree (determinism);
    # 4: frames/ PNGs written by OpenCV (zlib level 1, RLE) instead of Pillow
    prefetch_inputs = False  # the video unit reads every frame: streamed one at a time instead
    on_coordinator = True  # the one serial stage: the video is written where the run folder is

    def __init__(self, ctx, final_frames, fps, audio, size, crf, save_frames=True):
        super().__init__(ctx, [final_frames])
        self.save_frames = save_frames  # frames/00000.png …; off: the stage's only unit is video.mp4
        self.final_frames = final_frames
        self.fps = fps
        self.audio = audio  # (source path, start seconds, end seconds) or None
        self.width, self.height = size
        self.crf = crf
        self.codec = encoder_name(self.width, self.height, crf)

    def params(self):
        # save_frames changes the stage's units (frames/*.png or none), not their bytes: toggling it on a finished
        # run makes the stage stale (its PNGs deleted or written, the video encoded again, a few seconds).
        return {"fps": str(self.fps), "crf": self.crf, "audio": self.audio, "size": [self.width, self.height],
                "codec": self.codec, "save_frames": self.save_frames}

    def unit_keys(self):
        frames = [f"frames/{frame_index(key):05d}.png" for key in self.final_frames.frame_keys()]
        return (frames if self.save_frames else []) + [VIDEO_KEY]

    def reads(self, key):
        if key == VIDEO_KEY:
            return [(self.final_frames, k) for k in self.final_frames.frame_keys()]
        return [(self.final_frames, frame_key(int(Path(key).stem)))]

    def compute(self, key):
        if key == VIDEO_KEY:
            return self._encode(), VIDEO_KEY
        return image_to_png(self.read_image(self.final_frames, frame_key(int(Path(key).stem)))), key

    def _encode(self):
        """A function that streams the frames into the encoder (one frame in memory at a time) at the path the
        cache gives it; the cache renames it into place and records it."""
        log.info("encoding %s with %s (crf %s)", VIDEO_KEY, self.codec, self.crf)
        frames = (bytes_to_image(self.read_bytes(self.final_frames, key)) for key in self.final_frames.frame_keys())
        return lambda tmp: encode_video(tmp, frames, self.fps, self.crf, self.width, self.height, audio=self.audio,
                                        codec=self.codec)
