"""Stage 10, encode: the final frames as frames/00000.png … and video.mp4 (H.264, the source's frame rate and
the source's audio for the rendered range)."""

from pathlib import Path

from ..cache import bytes_to_image, image_to_png, write_atomically
from ..video import encode_video, encoder_name
from .base import Stage, frame_index, frame_key

VIDEO_KEY = "video.mp4"


class EncodeStage(Stage):
    name = "encode"
    version = "2"  # 2: frames stored as raw uint8 safetensors instead of PNG

    def __init__(self, ctx, final_frames, fps, audio, size, crf):
        super().__init__(ctx, [final_frames])
        self.final_frames = final_frames
        self.fps = fps
        self.audio = audio  # (source path, start seconds, end seconds) or None
        self.width, self.height = size
        self.crf = crf

    def params(self):
        return {"fps": str(self.fps), "crf": self.crf, "audio": self.audio, "size": [self.width, self.height]}

    def unit_keys(self):
        return [f"frames/{frame_index(key):05d}.png" for key in self.final_frames.frame_keys()] + [VIDEO_KEY]

    def compute(self, key):
        if key == VIDEO_KEY:
            return self._encode(), VIDEO_KEY
        return image_to_png(self.read_image(self.final_frames, frame_key(int(Path(key).stem)))), key

    def _encode(self):
        """Stream the frames into the encoder (one frame in memory at a time), writing the video atomically in
        place; the runner records it (data None = the file is already there)."""
        frames = (bytes_to_image(self.read_bytes(self.final_frames, key)) for key in self.final_frames.frame_keys())
        write_atomically(self.ctx.cache.run_dir / VIDEO_KEY, lambda tmp: encode_video(
            tmp, frames, self.fps, self.crf, self.width, self.height, audio=self.audio, codec=encoder_name()))
        return None
