"""A measured model of the GPU memory one sliding window of the denoise stage needs, and `auto` batch sizes from it.

peak = weights + activations, where the activations (in elements, × the dtype's bytes) are
  A_WINDOW · S·P        tensors that hold the whole UNet call: skip connections, block outputs, the motion modules'
                        normalised and permuted copies (S = samples per UNet call: 2·window with cfg_halves
                        together, window with apart; P = latent pixels, (width/8)·(height/8))
  A_CHUNK  · s·P        one chunk's activations inside a spatial layer (s = samples per spatial call) — the motion
                        modules run in as many pieces, so theirs are in this term too
  A_ATTN   · s·P²       attention scores; 0 with PyTorch's SDPA (flash / memory-efficient kernels never hold them)
  A_RES    · 2·window·P the ControlNet residuals of the window (kept between windows, joined for the UNet call)
  A_CN     · c·P        one ControlNet call's activations (c = samples per call: 2·controlnet_batch_size with
                        cfg_halves together, where a GPU runs both halves in one call; controlnet_batch_size apart)
The coefficients were fitted by bench/vram.py to peaks measured on the CPU (float32, real SD1.5 + AnimateDiff v2 +
ControlNet architectures, random weights, every tensor an op allocated counted exactly) and checked against held-out
points; bench/results/vram.json has the fit and the points. Activations scale with the dtype's bytes, so the float32
fit predicts float16 by halving them (bench/vram.py --cuda measures the real thing on a GPU).
"""

from .errors import UserError

# Parameter counts of the real architectures (diffsynth/models/configs; bench/vram.py recounts them).
UNET_PARAMS = 859_520_964
MOTION_V2_PARAMS = 453_209_280  # mm_sd_v15_v2 (v3, without the mid-block motion module: 417_137_600)
CONTROLNET_PARAMS = 361_279_120
TEXT_ENCODER_PARAMS = 123_060_480
VAE_PARAMS = 83_653_863  # always float32

# PROVISIONAL: solved from the first four CPU points bench/vram.py measured (window 4 and 8, latent 8×8, one
# ControlNet; 18.2–58.4 MiB, reproduced exactly by these values); those points fix A_CHUNK + A_CN/2 and
# A_WINDOW + A_RES, and the split between the two of each pair is the tensor count (three copies of the window's
# residuals: kept, joined, and added inside the UNet). The full run of bench/vram.py (fit + held-out points) was
# cut short by a busy machine; rerun it and copy its `fitted` values here.
A_WINDOW = 2500.0
A_CHUNK = 4500.0
A_ATTN = 0.0
A_RES = 4940.0
A_CN = 6000.0

# The share of a GPU's total memory the model may plan for: the CUDA context, cuDNN workspaces and the caching
# allocator's fragmentation take the rest.
USABLE_FRACTION = 0.85

DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}


def predict_vram_bytes(width, height, window, unet_batch_size, controlnet_batch_size, controlnet_units, dtype_bytes,
                       cfg_halves="together", motion_module=True, other_models_resident=False):
    """Predicted peak GPU memory (bytes allocated by tensors) of one sliding window of the denoise stage."""
    pixels = (width // 8) * (height // 8)
    videos = 2 if cfg_halves == "together" else 1
    samples = videos * window
    chunk = videos * min(unet_batch_size, window)
    params = UNET_PARAMS + (MOTION_V2_PARAMS if motion_module else 0) + controlnet_units * CONTROLNET_PARAMS
    weights = params * dtype_bytes
    if other_models_resident:  # vram_limit_level 0: the text encoder and the float32 VAE stay on the GPU too
        weights += TEXT_ENCODER_PARAMS * dtype_bytes + VAE_PARAMS * 4
    elements = A_WINDOW * samples * pixels + A_CHUNK * chunk * pixels + A_ATTN * chunk * pixels ** 2
    if controlnet_units:
        elements += A_RES * 2 * window * pixels + A_CN * videos * min(controlnet_batch_size, window) * pixels
    return int(weights + elements * dtype_bytes)


def _dtype_bytes(config, device):
    dtype = config.models.torch_dtype
    if dtype == "auto":
        dtype = "float16" if str(device).startswith("cuda") else "float32"
    return DTYPE_BYTES[dtype]


def predict_for_config(config, unet_batch_size=None, controlnet_batch_size=None, device="cuda", motion_module=True):
    """predict_vram_bytes for a RenderConfig (batch sizes given here replace the config's, e.g. while resolving
    `auto`)."""
    inputs = config.pipeline.pipeline_inputs
    frames = config.data.input_frames
    return predict_vram_bytes(
        frames.width, frames.height, inputs.animatediff_batch_size,
        unet_batch_size if unet_batch_size is not None else inputs.unet_batch_size,
        controlnet_batch_size if controlnet_batch_size is not None else inputs.controlnet_batch_size,
        len(config.models.controlnet_units), _dtype_bytes(config, device), inputs.cfg_halves, motion_module,
        other_models_resident=config.models.vram_limit_level == 0)


def device_memory_bytes(device):
    """The memory `auto` plans for: a GPU's total memory (not its free memory, which changes from run to run — the
    choice must be the same every time on the same device, or a resumed render would change its fingerprints);
    None on the CPU."""
    import torch
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory


def resolve_batch_sizes(config, memory_bytes, device="cuda", motion_module=True):
    """(unet_batch_size, controlnet_batch_size) with `auto` replaced: the largest number of frames per call, at most
    the window, whose predicted peak fits USABLE_FRACTION of `memory_bytes` (both auto keys take the same number);
    on the CPU (memory_bytes None) the whole window, since RAM is not what limits a window there and chunking only
    adds calls. UserError naming the key when even one frame per call does not fit."""
    inputs = config.pipeline.pipeline_inputs
    window = inputs.animatediff_batch_size
    auto = [key for key in ("unet_batch_size", "controlnet_batch_size") if getattr(inputs, key) == "auto"]

    def sizes(n):
        return tuple(n if getattr(inputs, key) == "auto" else getattr(inputs, key)
                     for key in ("unet_batch_size", "controlnet_batch_size"))

    if not auto or memory_bytes is None:
        return sizes(window)
    budget = memory_bytes * USABLE_FRACTION
    for n in range(window, 0, -1):
        if predict_for_config(config, *sizes(n), device=device, motion_module=motion_module) <= budget:
            return sizes(n)
    needed = predict_for_config(config, *sizes(1), device=device, motion_module=motion_module)
    keys = " and ".join(f"pipeline.pipeline_inputs.{key}" for key in auto)
    raise UserError(f"{keys}: auto found no batch size that fits: even 1 frame per call needs about "
                    f"{needed / 2**30:.1f} GiB by the VRAM model, and {budget / 2**30:.1f} GiB of the device's "
                    f"{memory_bytes / 2**30:.1f} GiB may be planned for; lower data.input_frames width/height or "
                    "animatediff_batch_size, set cfg_halves: apart, or raise models.vram_limit_level")

