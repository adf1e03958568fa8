"""Reading weight files safely: safetensors memory-mapped, pickles (.ckpt/.pt/.pth/.bin) only with
`torch.load(weights_only=True)` — a file that needs arbitrary code to load is refused, and its code never runs."""

import pickle
import zipfile
from pathlib import Path

import torch

from ..errors import UserError

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
WEIGHT_SUFFIXES = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES


def is_weight_file(path):
    return Path(path).suffix.lower() in WEIGHT_SUFFIXES


def _torch_load(path):
    """weights_only always; mmap when the file is in torch's zip format (legacy files are read once)."""
    mmap = zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        detail = str(error).replace("\n", " ")
        if "GLOBAL" not in detail:  # no code asked for: the bytes are simply not a pickle of weights
            raise UserError(f"cannot read {path}: not a weights file torch can read (a damaged or partly downloaded "
                            "file, or not a model at all? download it again)") from None
        culprit = f" ({detail[detail.index('GLOBAL'):].split(' was not')[0].strip()})"
        raise UserError(f"refusing to load {path}: it is a pickle that needs arbitrary code to load{culprit}, which "
                        "could run anything on this machine; get the .safetensors version of this file, or convert "
                        "it with a tool you trust") from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise UserError(f"cannot read {path}: {str(error).splitlines()[0] if str(error) else type(error).__name__} "
                        "(a damaged or partly downloaded file? download it again)") from None


def _unwrap(data, path):
    """The flat {name: tensor} dict inside a loaded pickle (Lightning checkpoints keep it under "state_dict")."""
    if isinstance(data, dict):
        for key in ("state_dict", "module"):
            if key in data and isinstance(data[key], dict) and len(data) <= 8:
                inner = data[key]
                if any(isinstance(v, torch.Tensor) for v in inner.values()):
                    return dict(inner)
        return dict(data)
    raise UserError(f"{path} holds a {type(data).__name__}, not a dictionary of weights")


def read_state_dict(path, prefixes=None):
    """{name: tensor} of a weight file; with `prefixes`, only the keys that start with one of them (a safetensors
    file then reads only those tensors)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"model file not found: {path}")
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                return {key: handle.get_tensor(key) for key in handle.keys()
                        if prefixes is None or key.startswith(tuple(prefixes))}
        except SafetensorError as error:
            raise UserError(f"cannot read {path}: not a valid .safetensors file ({error}); download it again") from None
    if path.suffix.lower() in PICKLE_SUFFIXES:
        data = _unwrap(_torch_load(path), path)
        if prefixes is not None:
            data = {k: v for k, v in data.items() if k.startswith(tuple(prefixes))}
        return data
    raise UserError(f"{path}: unknown weight file type '{path.suffix}' (expected one of {', '.join(WEIGHT_SUFFIXES)})")


def read_shapes(path):
    """{name: shape} without reading the tensors' data where the format allows (safetensors: the header only;
    pickles: memory-mapped). Non-tensor entries (A1111 embedding metadata) are given as None."""
    path = Path(path)
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        from safetensors import SafetensorError, safe_open
        if not path.is_file():
            raise UserError(f"model file not found: {path}")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
        except SafetensorError as error:
            raise UserError(f"cannot read {path}: not a valid .safetensors file ({error}); download it again") from None
    data = read_state_dict(path)
    return {key: tuple(value.shape) if isinstance(value, torch.Tensor) else None for key, value in data.items()}
