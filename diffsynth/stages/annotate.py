"""Stage 3, annotate: per ControlNet unit and frame, the unit's conditioning image.

`tile` has no annotator: its conditioning is the cropped frame itself, read straight from the crop stage (no copy).
Annotators run at detect resolution min(W, H) and their output is resized back to (W, H). Learned annotators
(lineart, lineart_coarse, lineart_anime, softedge, depth) read their weights from `models.annotators_folder`
(see diffsynth.models.annotators); nothing is downloaded.
"""

import numpy as np
from PIL import Image

from ..cache import image_to_bytes
from ..models.annotators import (  # noqa: F401 (re-exported)
    ANNOTATOR_FILES,
    annotator_file,
    make_annotator,
    openpose_hand_file,
)
from ..models.loader import device_kind, file_identity
from .base import Stage


class AnnotateStage(Stage):
    version = "2"  # 2: grey maps (edges, depth) stored as one channel, zstd-compressed; readers expand to RGB

    def __init__(self, ctx, cropped, processor_id, name):
        super().__init__(ctx, [cropped])
        self.name = name
        self.cropped = cropped
        self.processor_id = processor_id
        self._annotator = None

    @property
    def _folder(self):
        return getattr(self.ctx.config.models, "annotators_folder", None)

    def params(self):
        params = {"processor_id": self.processor_id}
        if self.processor_id in ANNOTATOR_FILES:  # a learned annotator: a network, run on the models' device
            params["weights"] = file_identity(annotator_file(self.processor_id, self._folder))
            params["device"] = device_kind(getattr(self.ctx.models, "device", "cpu"))
        if self.processor_id == "openpose" and openpose_hand_file(self._folder):
            params["hand_weights"] = file_identity(openpose_hand_file(self._folder))
        return params

    def unit_keys(self):
        return self.cropped.unit_keys()

    def compute(self, key):
        if self._annotator is None:
            device = getattr(self.ctx.models, "device", "cpu")
            self._annotator = make_annotator(self.processor_id, self._folder, device)
        image = self.read_image(self.cropped, key)
        height, width = image.shape[:2]
        annotated = np.asarray(self._annotator(image, min(width, height))).astype(np.uint8)
        if annotated.ndim == 3 and annotated.shape[2] == 3 and is_grey(annotated):
            annotated = np.ascontiguousarray(annotated[:, :, 0])  # edges, lines, depth: one channel is enough
        if annotated.shape[:2] != (height, width):
            annotated = np.asarray(Image.fromarray(annotated).resize((width, height), Image.BILINEAR))
        return image_to_bytes(annotated), None


def is_grey(image):
    """True when every pixel of an (H, W, 3) image has R = G = B: then it is stored as one channel (a third of the
    bytes, and the reader's expansion gives back exactly the same RGB)."""
    return bool((image[:, :, 0] == image[:, :, 1]).all() and (image[:, :, 0] == image[:, :, 2]).all())
