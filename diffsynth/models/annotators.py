"""ControlNet annotators from a local folder, through controlnet-aux's own model classes.

The networks are constructed directly and their weights read from the local files with `weights_only=True` —
never `from_pretrained`, which would fetch from a hub (and unpickle without restriction). Files are the ones of the
lllyasviel/Annotators collection, under their usual names, in `models.annotators_folder`.
"""

import functools
import warnings
from pathlib import Path

import torch

from ..errors import UserError
from .checkpoint import read_state_dict

ANNOTATOR_FILES = {
    "lineart": "sk_model.pth",
    "lineart_coarse": "sk_model2.pth",
    "lineart_anime": "netG.pth",
    "softedge": "ControlNetHED.pth",
    "depth": "dpt_hybrid-midas-501f0c75.pt",
    "openpose": "body_pose_model.pth",
}
OPENPOSE_HAND_FILE = "hand_pose_model.pth"  # optional: hands are drawn when it is in the folder too
NO_MODEL = ("tile", "canny")
WHERE = "the lllyasviel/Annotators collection on Hugging Face (download by hand; nothing is fetched at run time)"


def annotator_file(processor_id, folder):
    """The weight file a processor needs; UserError naming it when the folder or file is missing."""
    name = ANNOTATOR_FILES[processor_id]
    if folder is None:
        raise UserError(f"annotator '{processor_id}' needs {name}: set models.annotators_folder to a folder holding "
                        f"it (it comes from {WHERE})")
    path = Path(folder) / name
    if not path.is_file():
        raise UserError(f"annotator '{processor_id}' needs {path}, which is missing: put {name} from {WHERE} in "
                        "models.annotators_folder")
    return path


def _load(factory, path, strip=(), file_key=None):
    """Build on the meta device (no random init), check every tensor, then assign the file's tensors.
    `file_key(model key)` names a tensor in the file where the two differ."""
    with torch.device("meta"):
        model = factory()
    state = read_state_dict(path)
    if "model" in state and "optimizer" in state and isinstance(state["model"], dict):
        state = state["model"]
    for prefix in strip:
        state = {key.removeprefix(prefix): value for key, value in state.items()}
    if file_key is not None:
        state = {key: state[file_key(key)] for key in model.state_dict() if file_key(key) in state}
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    wrong = [key for key in expected if key in state and tuple(state[key].shape) != tuple(expected[key].shape)]
    if missing or wrong:
        detail = f"no tensor '{missing[0]}'" if missing else f"'{wrong[0]}' has the wrong shape"
        raise UserError(f"{path} is not the expected annotator file ({detail}); get {path.name} from {WHERE}")
    state = {key: state[key] for key in expected}
    model.load_state_dict(state, strict=True, assign=True)
    if any(t.is_meta for t in list(model.parameters()) + list(model.buffers())):
        model = factory()  # a non-persistent buffer needs the real constructor
        model.load_state_dict(state, strict=True)
    return model.float().eval()


def _lineart(path):
    from controlnet_aux.lineart import Generator
    return _load(lambda: Generator(3, 1, 3), path)


def _lineart_anime(path):
    from controlnet_aux.lineart_anime import UnetGenerator
    norm = functools.partial(torch.nn.InstanceNorm2d, affine=False, track_running_stats=False)
    return _load(lambda: UnetGenerator(3, 1, 8, 64, norm_layer=norm, use_dropout=False), path, strip=("module.",))


def _hed(path):
    from controlnet_aux.hed import ControlNetHED_Apache2
    return _load(ControlNetHED_Apache2, path)


def _midas(path):
    from controlnet_aux.midas.midas.dpt_depth import DPTDepthModel
    return _load(lambda: DPTDepthModel(path=None, backbone="vitb_rn50_384", non_negative=True), path)


def _openpose_network(factory, path):
    # The files name each tensor without the network's first module (what controlnet-aux's util.transfer undoes).
    return _load(factory, path, file_key=lambda key: key.split(".", 1)[1])


def openpose_hand_file(folder):
    path = Path(folder) / OPENPOSE_HAND_FILE if folder else None
    return path if path is not None and path.is_file() else None


def make_annotator(processor_id, folder=None, device="cpu"):
    """A function (image HWC uint8, detect resolution) → the annotation, HWC uint8 RGB of the image's own size."""
    with warnings.catch_warnings():
        # Importing any controlnet_aux module imports all of them: a screenful of deprecation and "mediapipe is
        # not installed" warnings about annotators this renderer never uses.
        warnings.simplefilter("ignore")
        annotate = _make(processor_id, folder, device)

    def run(image, resolution):
        import cv2
        import numpy as np
        out = np.asarray(annotate(image, resolution))
        if out.ndim == 2:
            out = np.stack([out] * 3, axis=-1)
        if out.shape[:2] != image.shape[:2]:
            out = cv2.resize(out, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_LINEAR)
        return out.astype(np.uint8)
    return run


def _make(processor_id, folder, device):
    if processor_id == "canny":
        from controlnet_aux.canny import CannyDetector
        detector = CannyDetector()
        return lambda image, resolution: detector(image, low_threshold=100, high_threshold=200,
                                                  detect_resolution=resolution, image_resolution=resolution,
                                                  output_type="np")
    if processor_id == "tile":
        return lambda image, resolution: image
    if processor_id not in ANNOTATOR_FILES:
        raise UserError(f"unknown annotator '{processor_id}' (known: tile, canny, {', '.join(ANNOTATOR_FILES)})")
    path = annotator_file(processor_id, folder)
    if processor_id in ("lineart", "lineart_coarse"):
        from controlnet_aux.lineart import LineartDetector
        model = _lineart(path).to(device)
        detector = LineartDetector(model, model)
        coarse = processor_id == "lineart_coarse"
        return lambda image, resolution: detector(image, coarse=coarse, detect_resolution=resolution,
                                                  image_resolution=resolution, output_type="np")
    if processor_id == "lineart_anime":
        from controlnet_aux.lineart_anime import LineartAnimeDetector
        detector = LineartAnimeDetector(_lineart_anime(path).to(device))
        return lambda image, resolution: detector(image, detect_resolution=resolution, image_resolution=resolution,
                                                  output_type="np")
    if processor_id == "softedge":
        from controlnet_aux.hed import HEDdetector
        detector = HEDdetector(_hed(path).to(device))
        return lambda image, resolution: detector(image, detect_resolution=resolution, image_resolution=resolution,
                                                  safe=False, output_type="np")
    if processor_id == "openpose":  # controlnet-aux's Body/Hand would torch.load without weights_only
        from controlnet_aux.open_pose import OpenposeDetector
        from controlnet_aux.open_pose.body import Body
        from controlnet_aux.open_pose.hand import Hand
        from controlnet_aux.open_pose.model import bodypose_model, handpose_model
        body = Body.__new__(Body)
        body.model = _openpose_network(bodypose_model, path).to(device)
        hand = None
        if openpose_hand_file(folder):
            hand = Hand.__new__(Hand)
            hand.model = _openpose_network(handpose_model, openpose_hand_file(folder)).to(device)
        detector = OpenposeDetector(body, hand)
        return lambda image, resolution: detector(image, detect_resolution=resolution, image_resolution=resolution,
                                                  include_hand=hand is not None, output_type="np")
    from controlnet_aux.midas import MidasDetector
    detector = MidasDetector(_midas(path).to(device))
    return lambda image, resolution: detector(image, detect_resolution=resolution, image_resolution=resolution,
                                              output_type="np")
