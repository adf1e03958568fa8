import torch

from diffsynth.schedule import (
    add_noise,
    alphas_cumprod,
    ddim_step,
    eps_from_x0,
    frame_noise,
    sliding_windows,
    tent_weight,
    timesteps,
    windows_containing,
    x0_from_eps,
)


def test_timesteps_follow_the_reference_rule():
    assert timesteps(1.0, 10) == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    assert timesteps(0.5, 4) == [499, 333, 166, 0]
    assert timesteps(1.0, 1) == [999]


def test_betas_are_linear_with_a_motion_module_and_scaled_linear_without():
    linear, scaled = alphas_cumprod(True), alphas_cumprod(False)
    betas = 1 - linear[1:] / linear[:-1]
    assert torch.allclose(betas[:3], torch.tensor([0.00085 + (0.012 - 0.00085) / 999 * i for i in (1, 2, 3)],
                                                  dtype=betas.dtype), atol=1e-7)
    assert not torch.allclose(linear, scaled)


def test_sliding_windows_cover_every_frame_and_stop_at_the_end():
    assert sliding_windows(20, 8, 4) == [(0, 8), (4, 12), (8, 16), (12, 20)]
    assert sliding_windows(21, 8, 4)[-1] == (16, 21)
    assert sliding_windows(5, 16, 8) == [(0, 5)]
    for n in range(1, 60):
        windows = sliding_windows(n, 16, 8)
        assert all(windows_containing(i, windows) for i in range(n))
        assert windows[-1][1] == n


def test_tent_weights_peak_in_the_middle_and_never_vanish():
    weights = [tent_weight(i, 0, 16) for i in range(16)]
    assert weights == weights[::-1]
    assert min(weights) == weights[0] == 0.01
    assert max(weights) == weights[7] > 0.9


def test_ddim_last_step_gives_x0_and_eps_round_trips():
    x0 = torch.randn(4, 8, 8)
    noise = torch.randn(4, 8, 8)
    alpha = alphas_cumprod(True)[500].item()
    x_t = add_noise(x0, noise, alpha)
    eps = eps_from_x0(x_t, x0, alpha)
    assert torch.allclose(eps, noise, atol=1e-5)
    assert torch.allclose(x0_from_eps(x_t, eps, alpha), x0, atol=1e-5)
    assert torch.allclose(ddim_step(x_t, eps, alpha, 1.0), x0, atol=1e-5)


def test_frame_noise_depends_only_on_seed_and_frame():
    assert torch.equal(frame_noise(3, 17, (4, 8, 8)), frame_noise(3, 17, (4, 8, 8)))
    assert not torch.equal(frame_noise(3, 17, (4, 8, 8)), frame_noise(3, 18, (4, 8, 8)))
    assert not torch.equal(frame_noise(3, 17, (4, 8, 8)), frame_noise(4, 17, (4, 8, 8)))
