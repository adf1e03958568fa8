"""Stage 2, crop: per frame, centre-crop to the output aspect then resize (`crop`), or letterbox (`fill`)."""

import numpy as np
from PIL import Image

from ..cache import image_to_bytes
from .base import Stage


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
    version = "2"  # 2: frames stored as raw uint8 safetensors instead of PNG

    def __init__(self, ctx, decoded, frames_config, name="crop"):
        super().__init__(ctx, [decoded])
        self.name = name
        self.decoded = decoded
        self.width, self.height, self.mode = frames_config.width, frames_config.height, frames_config.resize_mode

    def params(self):
        return {"width": self.width, "height": self.height, "mode": self.mode}

    def unit_keys(self):
        return self.decoded.unit_keys()

    def compute(self, key):
        image = crop_and_resize(self.read_image(self.decoded, key), self.width, self.height, self.mode)
        return image_to_bytes(image), None
