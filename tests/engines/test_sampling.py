import pytest
import torch

from aptserve.engines import sampling


def test_shift_fixes_endpoints_and_moves_toward_noise():
    t = torch.linspace(0, 1, 11)
    s = sampling.shift(t, 12.0)
    assert s[0] == 0 and s[-1] == 1
    assert torch.all(s[1:-1] > t[1:-1])
    torch.testing.assert_close(sampling.shift(t, 1.0), t)
    assert sampling.shift(0.5, 3.0) == pytest.approx(0.75)
    with pytest.raises(ValueError):
        sampling.shift(t, 0.0)


def exact_velocity(x0):
    # On the straight path x_t = (1-t) x0 + t eps the true velocity is (x_t - x0) / t.
    return lambda x, t: (x - x0) / t.view(-1, *[1] * (x.dim() - 1))


def test_one_step_queries_t_equal_one_and_recovers_x0():
    x0, z = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    seen = []

    def velocity(x, t):
        seen.append(t.clone())
        return exact_velocity(x0)(x, t)

    torch.testing.assert_close(sampling.one_step(velocity, z), x0)
    assert len(seen) == 1 and torch.all(seen[0] == 1)


def test_two_step_and_euler_are_exact_on_straight_paths():
    x0, z, eps = torch.randn(2, 8), torch.randn(2, 8), torch.randn(2, 8)
    torch.testing.assert_close(sampling.two_step(exact_velocity(x0), z, eps, 0.5), x0)
    # Euler is exact for a constant velocity field.
    v = torch.randn(2, 8)
    out = sampling.euler(lambda x, t: v.expand_as(x), z, num_steps=7, shift_factor=3.0)
    torch.testing.assert_close(out, z - v)


def test_timesteps_and_guidance():
    ts = sampling.timesteps(4, shift_factor=3.0)
    assert ts.shape == (5,) and ts[0] == 1 and ts[-1] == 0 and torch.all(ts[:-1] > ts[1:])
    cond, uncond = (lambda x, t: torch.ones_like(x)), (lambda x, t: torch.zeros_like(x))
    torch.testing.assert_close(sampling.guided(cond, uncond, 7.5)(torch.zeros(2), torch.ones(2)), torch.full((2,), 7.5))
    with pytest.raises(ValueError):
        sampling.timesteps(0)


def test_noise_is_per_seed_and_independent_of_batch():
    a = sampling.get_noise([1, 2], (3, 4))
    b = sampling.get_noise([2], (3, 4))
    torch.testing.assert_close(a[1], b[0])
    assert not torch.allclose(a[0], a[1])
