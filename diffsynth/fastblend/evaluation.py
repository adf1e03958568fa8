"""A synthetic flickering scene with known clean frames, and the two measures the FastBlend tests and benchmarks
judge smoothing by."""

import torch
import torch.nn.functional as F


def flickering_scene(num_frames=12, size=64, seed=0, width=None):
    """Clean frames of a smoothed-noise texture panning by (1, 1.5) px/frame (whole pixels: (1, 1) or (1, 2)), and
    "style" frames = clean frames with per-frame gain in [0.75, 1.25], per-channel bias in [-25, 25] and Gaussian
    noise (sigma 10): strong flicker. Frames are size × size, or size (height) × width."""
    width = width or size
    g = torch.Generator().manual_seed(seed)
    extent = max(size, width) + 2 * num_frames + 8
    noise = torch.rand(1, 3, extent, extent, generator=g) * 255
    tex = ((F.avg_pool2d(noise, 5, 1, 2) - 128) * 3 + 128).clamp(0, 255)[0].permute(1, 2, 0)
    clean, style = [], []
    for i in range(num_frames):
        y, x = i, (3 * i) // 2
        frame = tex[y : y + size, x : x + width].contiguous()
        gain = 0.75 + 0.5 * torch.rand(1, generator=g)
        bias = (torch.rand(3, generator=g) - 0.5) * 50
        jitter = torch.randn(frame.shape, generator=g) * 10
        clean.append(frame)
        style.append((frame * gain + bias + jitter).clamp(0, 255))
    return clean, style


def mean_abs_error(frames, clean):
    return sum(float((f.cpu().float() - c.float()).abs().mean()) for f, c in zip(frames, clean)) / len(frames)


def flicker(frames, clean):
    """Temporal instability: mean |(x[i+1] - clean[i+1]) - (x[i] - clean[i])| over consecutive frames, i.e. how
    much the deviation from the clean video changes from one frame to the next. 0 for the clean video itself and
    for any constant error; brightness jitter and noise make it large."""
    residual = [f.cpu().float() - c.float() for f, c in zip(frames, clean)]
    return sum(float((b - a).abs().mean()) for a, b in zip(residual, residual[1:])) / (len(frames) - 1)
