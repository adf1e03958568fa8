"""Loading without random initialisation (issue 19): the motion UNet is assembled on the meta device from the
2-D UNet's and the adapter's own tensors, and every model is cast once, straight to the run's dtype. Counted: no
random-init op touches a real tensor, and the bytes copied while loading are at most the loaded model's. Exact:
the loaded weights are the same bits (names, dtypes, values) as diffusers' from_unet2d path of before."""

from pathlib import Path

import pytest
import torch
from diffusers import ControlNetModel, MotionAdapter, UNet2DConditionModel, UNetMotionModel
from torch.utils._python_dispatch import TorchDispatchMode

from diffsynth.models.checkpoint import read_state_dict
from diffsynth.models.loader import ModelStore

RANDOM_INIT = {"uniform_", "normal_", "kaiming_uniform_", "kaiming_normal_", "trunc_normal_", "bernoulli_",
               "random_", "exponential_", "geometric_", "cauchy_", "log_normal_"}
COPIES = {"_to_copy", "copy_", "clone"}


class CountOps(TorchDispatchMode):
    """Random-init ops on real (non-meta) tensors, and the bytes that copy/cast ops write."""

    def __init__(self):
        super().__init__()
        self.random_init, self.copied_bytes = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if isinstance(out, torch.Tensor) and out.device.type != "meta":
            if name in RANDOM_INIT:
                self.random_init += 1
            if name in COPIES:
                self.copied_bytes += out.numel() * out.element_size()
        return out


def models_config(model_list, controlnets=(), dtype="float32"):
    from diffsynth.config import ModelsConfig
    units = [{"processor_id": "tile", "model_path": str(path), "scale": 0.5} for path in controlnets]
    return ModelsConfig(model_list=[str(p) for p in model_list], controlnet_units=units, device="cpu",
                        torch_dtype=dtype)


def assert_same_weights(model, reference):
    ours, theirs = model.state_dict(), reference.state_dict()
    assert list(ours) == list(theirs)
    for key, value in theirs.items():
        assert ours[key].dtype == value.dtype, key
        assert torch.equal(ours[key], value), key


@pytest.fixture(scope="module")
def fp16_base(tiny):
    """The tiny single-file base in float16 (as most community checkpoints): the motion weights follow it."""
    from safetensors.torch import save_file
    path = tiny.root / "files" / "tiny_sd15_fp16.safetensors"
    save_file({k: v.half().contiguous() for k, v in read_state_dict(tiny.files["sd_safetensors"]).items()}, path)
    sidecar = str(tiny.files["sd_safetensors"]) + ".config.json"
    (tiny.root / "files" / (path.name + ".config.json")).write_text(Path(sidecar).read_text())
    return path


def before_unet(store, dtype):
    """The UNet as loaded before issue 19: diffusers' from_unet2d (random init, copies), then the dtype cast."""
    if store.files.base.is_dir():
        unet = UNet2DConditionModel.from_pretrained(store.files.base / "unet", low_cpu_mem_usage=False)
    else:
        unet = store._load_unet2d()
    if store.files.motion.is_dir():
        adapter = MotionAdapter.from_pretrained(store.files.motion, low_cpu_mem_usage=False)
    else:
        adapter = store._load_motion_adapter()
    return UNetMotionModel.from_unet2d(unet, adapter).to(dtype=dtype)


@pytest.mark.parametrize("form,dtype", [("folders", "float32"), ("files", "float16"),
                                        ("fp16 file", "float32")])
def test_motion_unet_and_controlnets_load_without_random_init_to_the_same_bits(tiny, fp16_base, form, dtype):
    if form == "folders":
        paths = [tiny.folders["stable_diffusion"], tiny.folders["motion_adapter"]], tiny.folders["controlnet_tile"]
    else:
        base = fp16_base if form == "fp16 file" else tiny.files["sd_safetensors"]
        paths = [base, tiny.files["motion"]], tiny.files["controlnet_tile"]
    store = ModelStore(models_config(paths[0], [paths[1]], dtype))
    counter = CountOps()
    with counter:
        unet = store.unet
        controlnet = store.controlnets[0]
    assert counter.random_init == 0
    model_bytes = sum(t.numel() * t.element_size() for m in (unet, controlnet) for t in m.state_dict().values())
    if form == "fp16 file" and dtype != "float16":  # the motion weights' fp16 stop, kept for the same bits
        model_bytes += sum(t.numel() * 2 for key, t in unet.state_dict().items() if ".motion_modules." in key)
    assert counter.copied_bytes <= model_bytes  # each tensor copied (cast) at most once
    assert_same_weights(unet, before_unet(store, store.dtype))
    if paths[1].is_dir():
        reference = ControlNetModel.from_pretrained(paths[1], low_cpu_mem_usage=False)
    else:
        reference = store._load_controlnet(paths[1])
    assert_same_weights(controlnet, reference.to(dtype=store.dtype))
