"""Stage 3, annotate: per ControlNet unit and frame, the unit's conditioning image.

`tile` has no annotator: its conditioning is the cropped frame itself, read straight from the crop stage (no copy).
Annotators run at detect resolution min(W, H) and their output is resized back to (W, H).
"""

import numpy as np
from PIL import Image

from ..cache import image_to_bytes
from ..errors import UserError
from .base import Stage


def make_annotator(processor_id):
    if processor_id == "canny":
        from controlnet_aux.canny import CannyDetector
        detector = CannyDetector()
        return lambda image, resolution: detector(image, low_threshold=100, high_threshold=200,
                                                  detect_resolution=resolution, image_resolution=resolution,
                                                  output_type="np")
    raise UserError(f"annotator '{processor_id}' needs annotator model files, which this version cannot load yet; "
                    "use processor_id tile or canny")


class AnnotateStage(Stage):
    version = "1"

    def __init__(self, ctx, cropped, processor_id, name):
        super().__init__(ctx, [cropped])
        self.name = name
        self.cropped = cropped
        self.processor_id = processor_id
        self._annotator = None

    def params(self):
        return {"processor_id": self.processor_id}

    def unit_keys(self):
        return self.cropped.unit_keys()

    def compute(self, key):
        if self._annotator is None:
            self._annotator = make_annotator(self.processor_id)
        image = self.read_image(self.cropped, key)
        height, width = image.shape[:2]
        annotated = np.asarray(self._annotator(image, min(width, height)))
        if annotated.ndim == 2:
            annotated = np.stack([annotated] * 3, axis=-1)
        if annotated.shape[:2] != (height, width):
            annotated = np.asarray(Image.fromarray(annotated).resize((width, height), Image.BILINEAR))
        return image_to_bytes(annotated.astype(np.uint8)), None
