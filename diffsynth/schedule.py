"""DDIM (eta 0) and AnimateDiff sliding windows as small pure functions (facts: shared/reference/diffutoon.md)."""

import bisect
import math

import torch
from diffusers import DDIMScheduler

LATENT_SCALE = 0.18215


def alphas_cumprod(with_motion_module):
    """ᾱ_t for t = 0..999: linear betas 0.00085→0.012 with a motion module (AnimateDiff), scaled_linear without."""
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012,
                              beta_schedule="linear" if with_motion_module else "scaled_linear")
    return scheduler.alphas_cumprod.to(torch.float64)


def timesteps(denoising_strength, num_inference_steps):
    """t_k = round(max_t − k·max_t/(steps−1)), max_t = round(1000·strength) − 1: 999, 888, …, 111, 0 at strength 1."""
    max_t = round(1000 * denoising_strength) - 1
    if num_inference_steps == 1:
        return [max_t]
    return [round(max_t - k * max_t / (num_inference_steps - 1)) for k in range(num_inference_steps)]


def ddim_step(x_t, eps, alpha_t, alpha_prev):
    """x' = x·√(ᾱp/ᾱt) + ε·(√(1−ᾱp) − √(ᾱp(1−ᾱt)/ᾱt)); the last step passes ᾱp = 1, giving x0."""
    return x_t * math.sqrt(alpha_prev / alpha_t) + eps * (
        math.sqrt(1 - alpha_prev) - math.sqrt(alpha_prev * (1 - alpha_t) / alpha_t))


def x0_from_eps(x_t, eps, alpha_t):
    return (x_t - math.sqrt(1 - alpha_t) * eps) / math.sqrt(alpha_t)


def eps_from_x0(x_t, x0, alpha_t):
    return (x_t - math.sqrt(alpha_t) * x0) / math.sqrt(1 - alpha_t)


def add_noise(x0, noise, alpha_t):
    return math.sqrt(alpha_t) * x0 + math.sqrt(1 - alpha_t) * noise


def sliding_windows(num_frames, batch_size, stride):
    """[(s, e)]: starts 0, stride, 2·stride, …; stop after the first window that reaches the last frame."""
    windows = []
    start = 0
    while True:
        end = min(start + batch_size, num_frames)
        windows.append((start, end))
        if end >= num_frames:
            return windows
        start += stride


def shot_ranges(shot_starts, num_frames):
    """[(start, end)] of each shot, from the first frames of the shots (sorted; frame 0 starts the first shot
    whether listed or not)."""
    bounds = sorted({0, *shot_starts}) + [num_frames]
    return list(zip(bounds, bounds[1:]))


def shot_of(index, shot_starts, num_frames):
    """(start, end) of the shot holding frame `index`."""
    starts = sorted({0, *shot_starts})
    position = bisect.bisect_right(starts, index) - 1
    return starts[position], starts[position + 1] if position + 1 < len(starts) else num_frames


def shot_windows(shot_starts, num_frames, batch_size, stride):
    """The sliding windows made inside each shot (a shot shorter than a window is one window): no window holds
    frames of two shots. One shot gives exactly `sliding_windows`."""
    return [(start + first, start + end) for start, stop in shot_ranges(shot_starts, num_frames)
            for first, end in sliding_windows(stop - start, batch_size, stride)]


def tent_weight(index, start, end):
    """Weight of frame `index` in window [start, end): highest at the centre, 0.01 at the far edges."""
    centre = (start + end - 1) / 2
    return max(1 - abs(index - centre) / ((end - start - 1 + 0.01) / 2), 0.01)


def windows_containing(index, windows):
    return [j for j, (start, end) in enumerate(windows) if start <= index < end]


def shared_noise(seed, shape):
    """One initial noise for every frame, drawn from the seed alone: what the original does without a motion module
    (an image model then flickers less), and still independent of the rendered frame range."""
    generator = torch.Generator("cpu").manual_seed((seed * 1_000_003 - 1) % (2 ** 63))
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def frame_noise(seed, frame_id, shape):
    """Initial noise for one frame, drawn from (seed, source frame id) on the CPU: the same on every device and
    however the frames are split into runs, windows or machines."""
    generator = torch.Generator("cpu").manual_seed((seed * 1_000_003 + frame_id) % (2 ** 63))
    return torch.randn(shape, generator=generator, dtype=torch.float32)
