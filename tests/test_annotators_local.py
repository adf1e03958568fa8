"""Each learned annotator runs from a local folder of weights in its real file layout (random values; the
tensors are views of one small storage so even MiDaS's 120M-parameter file is a few hundred kilobytes)."""

import functools

import numpy as np
import pytest
import torch

from diffsynth.errors import UserError
from diffsynth.models.annotators import ANNOTATOR_FILES, make_annotator


def compact_random(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(1 << 16, generator=generator) * 0.05
    out = {}
    for key, tensor in model.state_dict().items():
        if not tensor.is_floating_point():
            out[key] = torch.zeros(tensor.shape, dtype=tensor.dtype)
            continue
        strides, step = [], 1
        for _ in tensor.shape:
            strides.append(step)
            step = step % 97 + 2
        span = sum((d - 1) * s for d, s in zip(tensor.shape, strides)) + 1
        view = base[:span].as_strided(tuple(tensor.shape), tuple(strides))
        out[key] = view.abs() + 1 if "running_var" in key else view
    return out


def _factories():
    from controlnet_aux.hed import ControlNetHED_Apache2
    from controlnet_aux.lineart import Generator
    from controlnet_aux.lineart_anime import UnetGenerator
    from controlnet_aux.midas.midas.dpt_depth import DPTDepthModel
    from controlnet_aux.open_pose.model import bodypose_model
    norm = functools.partial(torch.nn.InstanceNorm2d, affine=False, track_running_stats=False)
    return {
        "lineart": lambda: Generator(3, 1, 3),
        "lineart_coarse": lambda: Generator(3, 1, 3),
        "lineart_anime": lambda: UnetGenerator(3, 1, 8, 64, norm_layer=norm, use_dropout=False),
        "softedge": ControlNetHED_Apache2,
        "depth": lambda: DPTDepthModel(path=None, backbone="vitb_rn50_384", non_negative=True),
        "openpose": bodypose_model,
    }


@pytest.fixture(scope="module")
def annotators_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("annotators")
    for processor_id, factory in _factories().items():
        with torch.device("meta"):
            model = factory()
        state = compact_random(model)
        if processor_id == "lineart_anime":  # netG.pth was saved from DataParallel
            state = {"module." + key: value for key, value in state.items()}
        if processor_id == "openpose":  # body_pose_model.pth names tensors without the first module
            state = {key.split(".", 1)[1]: value for key, value in state.items()}
        torch.save(state, folder / ANNOTATOR_FILES[processor_id])
    return folder


@pytest.mark.parametrize("processor_id", list(ANNOTATOR_FILES))
def test_annotator_runs_from_local_folder(annotators_folder, processor_id):
    image = (np.random.default_rng(0).random((48, 64, 3)) * 255).astype(np.uint8)
    annotator = make_annotator(processor_id, str(annotators_folder))
    out = np.asarray(annotator(image, 48))
    assert out.dtype == np.uint8 and out.shape == (48, 64, 3)


def test_annotate_stage_resizes_to_frame_size(annotators_folder):
    from diffsynth.stages.annotate import AnnotateStage
    annotator = make_annotator("lineart", str(annotators_folder))
    image = np.zeros((40, 72, 3), np.uint8)
    assert annotator(image, min(40, 72)).shape == (40, 72, 3)
    assert AnnotateStage  # the stage passes models.annotators_folder (see diffsynth/stages/annotate.py)


def test_missing_annotator_file_names_it_and_where_to_get_it(tmp_path):
    with pytest.raises(UserError, match="needs .*sk_model2.pth, which is missing.*lllyasviel/Annotators"):
        make_annotator("lineart_coarse", str(tmp_path))
    with pytest.raises(UserError, match="set models.annotators_folder"):
        make_annotator("depth", None)


def test_wrong_annotator_file_is_one_line(tmp_path):
    torch.save({"foo": torch.zeros(2)}, tmp_path / "ControlNetHED.pth")
    with pytest.raises(UserError, match="is not the expected annotator file"):
        make_annotator("softedge", str(tmp_path))
