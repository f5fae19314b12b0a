"""benchmarks/guidance_fade.py's measurement on synthetic trajectories with a known decay."""

import pytest
import torch


@pytest.fixture(scope="module")
def fade(load_benchmark):
    return load_benchmark("guidance_fade")


def test_projection_follows_a_known_decay_from_each_samples_switch_step(fade):
    """Sample 0 reaches the cosine at step 2, sample 1 never: after step 2, d_t = (t / t_k)^2 d_k plus a part
    orthogonal to d_k, so the projection is (t / t_k)^2 and sample 1 gives no points."""
    g = torch.Generator().manual_seed(0)
    t = torch.linspace(1000, 100, 6, dtype=torch.float64)
    c = torch.randn(6, 2, 8, generator=g, dtype=torch.float64)
    u = c.clone()
    d_k = torch.zeros(8, dtype=torch.float64)
    d_k[0] = 1.0
    side = torch.zeros(8, dtype=torch.float64)
    side[1] = 1.0
    for step in range(6):
        u[step, 1] = -c[step, 1]  # opposite: cosine -1
        if step < 2:
            u[step, 0] = -c[step, 0]
        else:
            u[step, 0] = c[step, 0] - 1e-3 * ((t[step] / t[2]) ** 2 * d_k + (step - 2) * side)
    points = fade.fade_points(t, u, c, gamma=0.99)
    assert [r for r, _ in points] == pytest.approx((t[2:] / t[2]).tolist())
    assert [q for _, q in points] == pytest.approx(((t[2:] / t[2]) ** 2).tolist())
