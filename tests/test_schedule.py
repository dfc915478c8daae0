"""schedule.py against hand-written float64 formulas (§3 Eq. 1, 4, 5; §4.3 Eq. 9; §5.1 gamma)."""
import numpy as np
import pytest
import torch

from imagine_flash.schedule import (bcast, ddim_step, eps_from_v, eps_from_x0, gamma_shift, make_schedule,
                                    noise_corrected_step, q_sample, uniform_timesteps, x0_from_eps, x0_from_v)

T = 1000


def abar_by_hand(kind: str = "scaled_linear", beta_start: float = 0.00085, beta_end: float = 0.012) -> np.ndarray:
    if kind == "scaled_linear":
        betas = np.linspace(np.sqrt(beta_start), np.sqrt(beta_end), T) ** 2
    else:
        betas = np.linspace(beta_start, beta_end, T)
    return np.cumprod(1.0 - betas)


ABAR = abar_by_hand()


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def per_sample(v):  # (B,) numpy -> (B, 1, 1, 1)
    return np.asarray(v, dtype=np.float64).reshape(-1, 1, 1, 1)


@pytest.mark.parametrize("kind,b0,b1", [("scaled_linear", 0.00085, 0.012), ("linear", 0.0001, 0.02)])
def test_alphas_cumprod_match_hand_computation(kind, b0, b1):
    s = make_schedule(T, b0, b1, kind)
    np.testing.assert_allclose(s.alphas_cumprod.numpy(), abar_by_hand(kind, b0, b1), rtol=1e-12)
    assert s.T == T


def test_trained_betas():
    betas = np.linspace(1e-4, 2e-2, T)
    s = make_schedule(T, trained_betas=betas)
    np.testing.assert_allclose(s.alphas_cumprod.numpy(), np.cumprod(1 - betas), rtol=1e-12)


def test_bad_beta_schedule_raises():
    with pytest.raises(ValueError, match="beta_schedule"):
        make_schedule(beta_schedule="squaredcos_cap_v2")


def test_alpha_sigma_lookup_and_clean_end():
    s = make_schedule()
    t = torch.tensor([0, 1, 500, 999])
    np.testing.assert_allclose(s.alpha(t).numpy(), np.sqrt(ABAR[[0, 1, 500, 999]]), rtol=1e-12)
    np.testing.assert_allclose(s.sigma(t).numpy(), np.sqrt(1 - ABAR[[0, 1, 500, 999]]), rtol=1e-12)
    assert float(s.alpha(-1)) == 1.0 and float(s.sigma(-1)) == 0.0
    mixed = torch.tensor([-1, 999])
    np.testing.assert_allclose(s.alpha(mixed).numpy(), [1.0, np.sqrt(ABAR[999])], rtol=1e-12)
    np.testing.assert_allclose(s.sigma(mixed).numpy(), [0.0, np.sqrt(1 - ABAR[999])], rtol=1e-12)
    # Variance preserving: alpha_t^2 + sigma_t^2 = 1.
    np.testing.assert_allclose((s.alpha(t) ** 2 + s.sigma(t) ** 2).numpy(), 1.0, rtol=1e-12)


def test_scaled_linear_terminal_snr_is_not_zero():
    """§4.1: the SD schedule leaks signal at T; alpha_999 ~ 0.068 > 0."""
    s = make_schedule()
    assert float(s.alpha(999)) > 0.05
    assert float(s.alpha(999)) == pytest.approx(np.sqrt(ABAR[999]), rel=1e-12)


def test_bcast_shapes():
    x = rand(3, 2, 4, 4)
    assert bcast(torch.tensor([1.0, 2.0, 3.0]), x).shape == (3, 1, 1, 1)
    assert bcast(torch.tensor(2.0), x).shape == ()
    assert bcast(torch.tensor([1.0, 2.0, 3.0]), x).dtype == x.dtype


def test_q_sample_eq1_per_sample_timesteps():
    s = make_schedule()
    t = torch.tensor([999, 500, 0])
    x0, eps = rand(3, 2, 4, 4, seed=1), rand(3, 2, 4, 4, seed=2)
    out = q_sample(x0, eps, s.alpha(t), s.sigma(t))
    a, sg = per_sample(np.sqrt(ABAR[[999, 500, 0]])), per_sample(np.sqrt(1 - ABAR[[999, 500, 0]]))
    np.testing.assert_allclose(out.numpy(), a * x0.numpy() + sg * eps.numpy(), rtol=1e-12, atol=1e-12)


def test_q_sample_eq1_scalar_coefficients():
    x0, eps = rand(2, 3, 4, 4, seed=1), rand(2, 3, 4, 4, seed=2)
    out = q_sample(x0, eps, 0.6, 0.8)
    np.testing.assert_allclose(out.numpy(), 0.6 * x0.numpy() + 0.8 * eps.numpy(), rtol=1e-12)


def test_x0_from_eps_eq5_and_round_trip():
    s = make_schedule()
    t = torch.tensor([999, 400])
    a, sg = per_sample(np.sqrt(ABAR[[999, 400]])), per_sample(np.sqrt(1 - ABAR[[999, 400]]))
    x_t, eps_hat = rand(2, 2, 4, 4, seed=3), rand(2, 2, 4, 4, seed=4)
    x0_hat = x0_from_eps(x_t, eps_hat, s.alpha(t), s.sigma(t))
    np.testing.assert_allclose(x0_hat.numpy(), (x_t.numpy() - sg * eps_hat.numpy()) / a, rtol=1e-12)
    # eps_from_x0 inverts Eq. 5 and vice versa.
    eps_back = eps_from_x0(x_t, x0_hat, s.alpha(t), s.sigma(t))
    np.testing.assert_allclose(eps_back.numpy(), eps_hat.numpy(), rtol=1e-10, atol=1e-10)
    x0 = rand(2, 2, 4, 4, seed=5)
    x0_back = x0_from_eps(x_t, eps_from_x0(x_t, x0, s.alpha(t), s.sigma(t)), s.alpha(t), s.sigma(t))
    np.testing.assert_allclose(x0_back.numpy(), x0.numpy(), rtol=1e-10, atol=1e-10)


def test_v_conversions_recover_eps_and_x0():
    """With x_t = alpha x0 + sigma eps and v = alpha eps - sigma x0, both are recovered from (x_t, v)."""
    t = np.array([999, 250])
    a, sg = per_sample(np.sqrt(ABAR[t])), per_sample(np.sqrt(1 - ABAR[t]))
    x0, eps = rand(2, 2, 4, 4, seed=6).numpy(), rand(2, 2, 4, 4, seed=7).numpy()
    x_t, v = torch.from_numpy(a * x0 + sg * eps), torch.from_numpy(a * eps - sg * x0)
    alpha_t, sigma_t = torch.from_numpy(a.ravel()), torch.from_numpy(sg.ravel())
    np.testing.assert_allclose(eps_from_v(x_t, v, alpha_t, sigma_t).numpy(), eps, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(x0_from_v(x_t, v, alpha_t, sigma_t).numpy(), x0, rtol=1e-10, atol=1e-10)


def test_ddim_step_eq4():
    s = make_schedule()
    t_prev = torch.tensor([750, -1])
    x0_hat, eps_hat = rand(2, 2, 4, 4, seed=8), rand(2, 2, 4, 4, seed=9)
    out = ddim_step(x0_hat, eps_hat, s.alpha(t_prev), s.sigma(t_prev))
    a, sg = per_sample([np.sqrt(ABAR[750]), 1.0]), per_sample([np.sqrt(1 - ABAR[750]), 0.0])
    np.testing.assert_allclose(out.numpy(), a * x0_hat.numpy() + sg * eps_hat.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(out[1].numpy(), x0_hat[1].numpy())  # the clean end returns x0_hat


def test_noise_corrected_step_eq9_per_sample_is_first():
    s = make_schedule()
    x0_hat, eps_hat, x_T = rand(3, 2, 4, 4, seed=10), rand(3, 2, 4, 4, seed=11), rand(3, 2, 4, 4, seed=12)
    a, sg = np.sqrt(ABAR[750]), np.sqrt(1 - ABAR[750])
    is_first = torch.tensor([True, False, True])
    out = noise_corrected_step(x0_hat, eps_hat, x_T, s.alpha(750), s.sigma(750), is_first).numpy()
    corrected = a * x0_hat.numpy() + sg * x_T.numpy()  # Eq. 9, t = T: x_T replaces eps_hat
    plain = a * x0_hat.numpy() + sg * eps_hat.numpy()  # Eq. 9, t < T: Eq. 4
    np.testing.assert_allclose(out[0], corrected[0], rtol=1e-12)
    np.testing.assert_allclose(out[1], plain[1], rtol=1e-12)
    np.testing.assert_allclose(out[2], corrected[2], rtol=1e-12)
    # Python bools too.
    np.testing.assert_allclose(noise_corrected_step(x0_hat, eps_hat, x_T, s.alpha(750), s.sigma(750), True).numpy(),
                               corrected, rtol=1e-12)
    np.testing.assert_allclose(noise_corrected_step(x0_hat, eps_hat, x_T, s.alpha(750), s.sigma(750), False).numpy(),
                               plain, rtol=1e-12)


def test_gamma_shift_boundaries():
    t = torch.tensor([999, 901, 900, 501, 500, 0])
    assert gamma_shift(t).tolist() == [990, 990, 950, 950, 200, 200]
    assert int(gamma_shift(torch.tensor(950))) == 990


def test_uniform_timesteps():
    # 990 (1 - j/8), j = 0..7, rounded (half to even, as torch.round): 990, 866.25, 742.5, 618.75, 495, ...
    assert uniform_timesteps(990, 8).tolist() == [[990, 866, 742, 619, 495, 371, 248, 124]]
    out = uniform_timesteps(torch.tensor([990, 200]), 4)
    assert out.shape == (2, 4) and out.dtype == torch.long
    assert out.tolist() == [[990, 742, 495, 248], [200, 150, 100, 50]]


def test_eps_loss_weight_is_the_larger_of_eps_and_x0_error():
    from imagine_flash.schedule import eps_loss_weight
    s = make_schedule()
    t = torch.tensor([0, 300, 999])
    a, sg = s.alpha(t), s.sigma(t)
    w = eps_loss_weight(a, sg, "trunc-snr")
    snr = ABAR[[0, 300, 999]] / (1 - ABAR[[0, 300, 999]])
    np.testing.assert_allclose(w.numpy(), np.maximum(1.0, 1.0 / snr), rtol=1e-12)
    # |x0 - x0_hat|^2 = (sigma/alpha)^2 |eps - eps_hat|^2: the weight is max(that factor, 1)
    e = rand(3, 2, 2, 2)
    x0_err = ((sg / a).reshape(-1, 1, 1, 1) * e).square().flatten(1).mean(1)
    torch.testing.assert_close(w * e.square().flatten(1).mean(1), torch.maximum(x0_err, e.square().flatten(1).mean(1)))
    assert torch.equal(eps_loss_weight(a, sg, "eps"), torch.ones(3, dtype=a.dtype))
    with pytest.raises(ValueError, match="trunc-snr"):
        eps_loss_weight(a, sg, "snr")
