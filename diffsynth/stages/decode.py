"""Stage 1, decode: one unit per source frame of [start_frame_id, end_frame_id) → a lossless PNG."""

from ..cache import image_to_bytes
from ..models.loader import file_identity
from ..video import decode
from .base import Stage, frame_index, frame_key


class DecodeStage(Stage):
    on_coordinator = True  # streams the source file in order; with many workers the render process decodes
    version = "4"  # 2: frames stored as raw uint8 safetensors instead of PNG; 3: image folders in natural order;
    # 4: frames stored zstd-compressed (cache.image_to_bytes)

    def __init__(self, ctx, frames_config, source, frame_range, name="decode"):
        super().__init__(ctx)
        self.name = name
        self.frames_config = frames_config
        self.source = source
        self.start, self.end = frame_range

    def params(self):
        return {"source": file_identity(self.source.path), "start": self.start, "end": self.end}

    def unit_keys(self):
        return [frame_key(i) for i in range(self.end - self.start)]

    def run(self, pending_keys):
        """Decode sequentially from the keyframe before the first pending frame (seeking per frame is slow)."""
        by_source_index = {self.start + frame_index(key): key for key in pending_keys}
        for source_index, image in decode(self.source, by_source_index):
            yield by_source_index[source_index], image_to_bytes(image), None
