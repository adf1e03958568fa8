"""Stages 1–2, decode and crop, fused: per source frame of [start_frame_id, end_frame_id), decoded, then
centre-cropped to the output aspect and resized (`crop`), or letterboxed (`fill`).

Only the cropped frame is stored: a source frame (often 1080p, twice the output's pixels) never reaches the disk.
A unit is still one frame, so a crash loses at most one; a resume decodes sequentially from the keyframe before
the first pending frame.
"""

import numpy as np
from PIL import Image

from ..cache import image_to_bytes
from ..models.loader import file_identity
from ..video import decode, image_sizes
from .base import Stage, frame_index, frame_key


def crop_and_resize(image, width, height, mode):
    """uint8 (H, W, 3) → uint8 (height, width, 3)."""
    source_h, source_w = image.shape[:2]
    picture = Image.fromarray(image)
    if mode == "crop":
        scale = max(width / source_w, height / source_h)
        crop_w, crop_h = round(width / scale), round(height / scale)
        left, top = (source_w - crop_w) // 2, (source_h - crop_h) // 2
        picture = picture.crop((left, top, left + crop_w, top + crop_h))
        return np.asarray(picture.resize((width, height), Image.LANCZOS))
    scale = min(width / source_w, height / source_h)
    inner_w, inner_h = max(1, round(source_w * scale)), max(1, round(source_h * scale))
    canvas = Image.new("RGB", (width, height))
    canvas.paste(picture.resize((inner_w, inner_h), Image.LANCZOS), ((width - inner_w) // 2, (height - inner_h) // 2))
    return np.asarray(canvas)


class CropStage(Stage):
    """Decode + crop of one frame source (the input frames, or a ControlNet unit's own frames)."""
    version = "3"  # 2: frames stored as raw uint8 safetensors instead of PNG; 3: decode fused in (source frames
    # never stored), frames stored zstd-compressed (cache.image_to_bytes)
    on_coordinator = True  # streams the source file in order; with many workers the render process decodes

    def __init__(self, ctx, frames_config, source, frame_range, name="crop"):
        super().__init__(ctx)
        self.name = name
        self.source = source
        self.start, self.end = frame_range
        self.width, self.height, self.mode = frames_config.width, frames_config.height, frames_config.resize_mode

    def params(self):
        return {"source": file_identity(self.source.path), "start": self.start, "end": self.end,
                "width": self.width, "height": self.height, "mode": self.mode}

    def unit_keys(self):
        return [frame_key(i) for i in range(self.end - self.start)]

    def input_warnings(self):
        """An image folder whose frames (in the rendered range) differ in size: each is cropped or letterboxed to
        the output size on its own, so the picture's framing jumps where the size changes."""
        if self.source.is_video:
            return []
        sizes = image_sizes(self.source, self.start, self.end)
        if len(set(sizes.values())) < 2:
            return []
        counts = {}
        for size in sizes.values():
            counts[size] = counts.get(size, 0) + 1
        common = max(counts, key=counts.get)
        odd = next(name for name, size in sizes.items() if size != common)
        shown = ", ".join(f"{count} at {w}x{h}" for (w, h), count in sorted(counts.items(), key=lambda c: -c[1])[:3])
        verb = "cropped" if self.mode == "crop" else "letterboxed"
        return [f"image folder {self.source.path} holds frames of {len(counts)} sizes ({shown}; e.g. {odd} is "
                f"{sizes[odd][0]}x{sizes[odd][1]}): each is {verb} and resized to {self.width}x{self.height} on its "
                "own, so the framing changes where the size does; give the folder frames of one size to avoid it"]

    def run(self, pending_keys):
        """Decode sequentially from the keyframe before the first pending frame (seeking per frame is slow), crop
        each frame as it comes: one source frame in memory at a time."""
        by_source_index = {self.start + frame_index(key): key for key in pending_keys}
        for source_index, image in decode(self.source, by_source_index):
            image = crop_and_resize(image, self.width, self.height, self.mode)
            yield by_source_index[source_index], image_to_bytes(image), None

    def compute(self, key):
        ((_, data, path),) = list(self.run([key]))
        return data, path
