"""FlashScheduler against hand-written float64 formulas (Eq. 4, 5, 9), diffusers' DDIMScheduler, and sampling.py."""
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from imagine_flash import FlashScheduler
from imagine_flash.sampling import flash_sample, rollout, scheduler_sample
from imagine_flash.schedule import make_schedule

T = 1000
BETAS = np.linspace(np.sqrt(0.00085), np.sqrt(0.012), T) ** 2  # scaled_linear, by hand
ABAR = np.cumprod(1.0 - BETAS)


def alpha(t: int) -> float:
    return 1.0 if t < 0 else float(np.sqrt(ABAR[t]))


def sigma(t: int) -> float:
    return 0.0 if t < 0 else float(np.sqrt(1.0 - ABAR[t]))


def eps_np(x: np.ndarray, t: int) -> np.ndarray:
    """Deterministic fake eps network, numpy side."""
    return 0.3 * x + 0.1 * np.sin(t / 100.0)


def den(x: torch.Tensor, t, cond=None) -> torch.Tensor:
    """The same fake network as a denoiser callable den(x_t, t, cond) -> eps_hat (scalar t)."""
    return 0.3 * x + 0.1 * torch.sin(torch.as_tensor(t, dtype=x.dtype) / 100.0)


def hand_sample(x_T: np.ndarray, timesteps, noise_correction: bool):
    """Eq. 4/5/9 written out: returns the states [x_T, x_{t_1}, ..., x_0] and each step's x0_hat."""
    states, x0s, x = [x_T], [], x_T
    nexts = list(timesteps[1:]) + [-1]
    for i, (t, t_next) in enumerate(zip(timesteps, nexts)):
        eps_hat = eps_np(x, t)
        x0_hat = (x - sigma(t) * eps_hat) / alpha(t)  # Eq. 5
        direction = x_T if (noise_correction and i == 0) else eps_hat  # Eq. 9 at t = T
        x = alpha(t_next) * x0_hat + sigma(t_next) * direction  # Eq. 4
        states.append(x)
        x0s.append(x0_hat)
    return states, x0s


def noise(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def run_scheduler(sched: FlashScheduler, x_T: torch.Tensor):
    """The diffusers sampling loop; returns the states and each step's pred_original_sample."""
    x, states, x0s = x_T, [x_T], []
    for t in sched.timesteps:
        out = sched.step(den(x, int(t)), t, x)
        x = out.prev_sample
        states.append(x)
        x0s.append(out.pred_original_sample)
    return states, x0s


TIMESTEP_LISTS = [[999, 750, 500], [999, 666], [999], [999, 500, 250, 100], [800, 400]]


@pytest.mark.parametrize("timesteps", TIMESTEP_LISTS)
@pytest.mark.parametrize("noise_correction", [False, True])
def test_step_is_eq4_eq5_eq9(timesteps, noise_correction):
    sched = FlashScheduler(noise_correction=noise_correction)
    sched.set_timesteps(timesteps=timesteps)
    x_T = noise(2, 3, 4, 4)
    states, x0s = run_scheduler(sched, x_T)
    want_states, want_x0s = hand_sample(x_T.numpy(), timesteps, noise_correction)
    for got, want in zip(x0s, want_x0s):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-10)
    for got, want in zip(states, want_states):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-10)
    # After the last timestep alpha = 1, sigma = 0: the result is the last x0_hat.
    np.testing.assert_allclose(states[-1].numpy(), x0s[-1].numpy(), rtol=1e-12, atol=1e-12)


def test_noise_correction_changes_only_the_first_step():
    x_T, ts = noise(2, 3, 4, 4), [999, 750, 500]
    x = {}
    for nc in (False, True):
        sched = FlashScheduler(noise_correction=nc)
        sched.set_timesteps(timesteps=ts)
        x[nc] = sched.step(den(x_T, 999), 999, x_T).prev_sample
    # Eq. 9: x_{750} = alpha_750 x0_hat + sigma_750 x_T, with x_T the sample passed in.
    x0_hat = (x_T.numpy() - sigma(999) * eps_np(x_T.numpy(), 999)) / alpha(999)
    np.testing.assert_allclose(x[True].numpy(), alpha(750) * x0_hat + sigma(750) * x_T.numpy(), rtol=1e-10)
    assert not torch.allclose(x[True], x[False])
    # The same input at a later step is a plain Eq. 4 step under both settings.
    y = {}
    for nc in (False, True):
        sched = FlashScheduler(noise_correction=nc)
        sched.set_timesteps(timesteps=ts)
        sched.step(den(x_T, 999), 999, x_T)
        y[nc] = sched.step(den(x_T, 750), 750, x_T).prev_sample
    torch.testing.assert_close(y[True], y[False], rtol=0, atol=0)


def test_prediction_types_convert_to_the_same_step():
    """v and x0 outputs that encode the same eps_hat give the same step as the eps output."""
    ts, x_T = [999, 750, 500], noise(2, 3, 4, 4)
    ref = FlashScheduler()
    for kind in ("v_prediction", "sample"):
        sched = FlashScheduler(prediction_type=kind)
        sched.set_timesteps(timesteps=ts)
        ref.set_timesteps(timesteps=ts)
        x_ref = x = x_T
        for t in ts:
            eps = den(x, t).numpy()
            x0 = (x.numpy() - sigma(t) * eps) / alpha(t)
            v = alpha(t) * eps - sigma(t) * x0
            out = torch.from_numpy(v if kind == "v_prediction" else x0)
            x = sched.step(out, t, x).prev_sample
            x_ref = ref.step(den(x_ref, t), t, x_ref).prev_sample
            np.testing.assert_allclose(x.numpy(), x_ref.numpy(), rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("n", [1, 2, 4, 5, 10])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_parity_with_diffusers_ddim(n, prediction_type):
    """Without noise correction FlashScheduler is DDIM (eta = 0, trailing, final alpha = 1) on DDIM's own steps."""
    ddim = DDIMScheduler(num_train_timesteps=T, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing",
                         prediction_type=prediction_type)
    ddim.set_timesteps(n)
    ts = ddim.timesteps.tolist()
    # DDIM steps to t - T // n, which is our next timestep in the list (and -1, alpha = 1, after the last).
    assert [t - T // n for t in ts] == ts[1:] + [-1]
    flash = FlashScheduler(noise_correction=False, prediction_type=prediction_type)
    flash.set_timesteps(timesteps=ts)
    x_d = x_f = noise(2, 4, 8, 8, dtype=torch.float32)
    for t_d, t_f in zip(ddim.timesteps, flash.timesteps):
        out_d = ddim.step(den(x_d, int(t_d)), t_d, x_d, eta=0.0)
        out_f = flash.step(den(x_f, int(t_f)), t_f, x_f)
        torch.testing.assert_close(out_f.pred_original_sample, out_d.pred_original_sample, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out_f.prev_sample, out_d.prev_sample, rtol=1e-4, atol=1e-4)
        x_d, x_f = out_d.prev_sample, out_f.prev_sample


def test_trailing_spacing_matches_ddim_when_not_a_student_count():
    ddim = DDIMScheduler(timestep_spacing="trailing")
    flash = FlashScheduler()
    for n in (4, 7, 10, 50):
        ddim.set_timesteps(n)
        flash.set_timesteps(n)
        assert flash.timesteps.tolist() == ddim.timesteps.tolist()


def test_default_timesteps():
    sched = FlashScheduler()
    for n, want in ((1, [999]), (2, [999, 666]), (3, [999, 750, 500]), (4, [999, 749, 499, 249])):
        sched.set_timesteps(n)
        assert sched.timesteps.tolist() == want and sched.num_inference_steps == n
        assert sched.timesteps.dtype == torch.long
    with pytest.raises(ValueError, match="config.timesteps"):
        sched.set_timesteps()
    trained = FlashScheduler(timesteps=[999, 800, 600, 400])
    trained.set_timesteps()
    assert trained.timesteps.tolist() == [999, 800, 600, 400]
    trained.set_timesteps(4)
    assert trained.timesteps.tolist() == [999, 800, 600, 400]
    trained.set_timesteps(3)  # length differs from the trained list: the §5.1 default
    assert trained.timesteps.tolist() == [999, 750, 500]


@pytest.mark.parametrize("bad", [[500, 750], [999, 999, 500], [1000, 500], [999, -1], []])
def test_set_timesteps_rejects_bad_lists(bad):
    sched = FlashScheduler()
    with pytest.raises(ValueError):
        sched.set_timesteps(timesteps=bad)
    with pytest.raises(ValueError):
        FlashScheduler(timesteps=bad)


def test_set_timesteps_argument_errors():
    sched = FlashScheduler()
    with pytest.raises(ValueError, match="not both"):
        sched.set_timesteps(3, timesteps=[999, 750, 500])
    with pytest.raises(ValueError, match="num_inference_steps"):
        sched.set_timesteps(0)
    with pytest.raises(ValueError, match="set_timesteps"):
        sched.step(noise(1, 1, 2, 2), 999, noise(1, 1, 2, 2))


def test_step_index_tracking_and_reset():
    sched = FlashScheduler()
    sched.set_timesteps(timesteps=[999, 750, 500])
    x_T = noise(1, 2, 4, 4)
    assert sched.step_index is None
    first = run_scheduler(sched, x_T)[0]
    assert sched.step_index == 3
    with pytest.raises(ValueError, match="after the last"):
        sched.step(den(x_T, 500), 500, x_T)
    sched.set_timesteps(timesteps=[999, 750, 500])  # resets the index: the next loop starts over, noise-corrected
    assert sched.step_index is None
    second = run_scheduler(sched, x_T)[0]
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    sched.set_timesteps(timesteps=[999, 750, 500])
    with pytest.raises(ValueError, match="not in the scheduler's timesteps"):
        sched.step(den(x_T, 123), 123, x_T)


def test_begin_index_skips_noise_correction():
    """Starting mid-schedule (img2img) the sample is not pure noise: the first step taken is plain Eq. 4."""
    sched = FlashScheduler(noise_correction=True)
    sched.set_timesteps(timesteps=[999, 750, 500])
    sched.set_begin_index(1)
    x = noise(1, 2, 4, 4)
    got = sched.step(den(x, 750), torch.tensor(750), x).prev_sample
    x0_hat = (x.numpy() - sigma(750) * eps_np(x.numpy(), 750)) / alpha(750)
    np.testing.assert_allclose(got.numpy(), alpha(500) * x0_hat + sigma(500) * eps_np(x.numpy(), 750), rtol=1e-10)


def test_step_return_tuple_and_dtype():
    sched = FlashScheduler()
    sched.set_timesteps(3)
    x = noise(1, 2, 4, 4, dtype=torch.float16)
    prev, x0_hat = sched.step(den(x, 999), sched.timesteps[0], x, return_dict=False)
    assert prev.dtype == x0_hat.dtype == torch.float16 and prev.shape == x.shape


def test_add_noise_is_eq1():
    sched = FlashScheduler()
    t = torch.tensor([999, 500, 0])
    x0, eps = noise(3, 2, 4, 4, seed=1), noise(3, 2, 4, 4, seed=2)
    got = sched.add_noise(x0, eps, t).numpy()
    a = np.sqrt(ABAR[[999, 500, 0]]).reshape(-1, 1, 1, 1)
    s = np.sqrt(1 - ABAR[[999, 500, 0]]).reshape(-1, 1, 1, 1)
    np.testing.assert_allclose(got, a * x0.numpy() + s * eps.numpy(), rtol=1e-12, atol=1e-12)


def test_misc_scheduler_contract():
    sched = FlashScheduler()
    x = noise(1, 2, 4, 4)
    assert sched.init_noise_sigma == 1.0 and sched.order == 1 and len(sched) == T
    assert sched.scale_model_input(x, 999) is x
    np.testing.assert_allclose(sched.alphas_cumprod.numpy(), ABAR, rtol=1e-6)
    assert any(c.__name__ == "DDIMScheduler" for c in sched.compatibles)


def test_from_ddim_config():
    sched = FlashScheduler.from_config(DDIMScheduler().config, noise_correction=False)
    assert isinstance(sched, FlashScheduler) and sched.config.noise_correction is False
    # DDIMScheduler() left everything at its defaults, so diffusers hands none of them over: ours apply.
    assert sched.config.beta_schedule == "scaled_linear"
    np.testing.assert_allclose(sched.schedule.alphas_cumprod.numpy(), ABAR, rtol=1e-12)
    sched.set_timesteps(3)
    run_scheduler(sched, noise(1, 2, 4, 4))
    # Values the DDIM config did set are carried over.
    linear = DDIMScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, timestep_spacing="trailing")
    sched = FlashScheduler.from_config(linear.config)
    assert sched.config.noise_correction is True
    np.testing.assert_allclose(sched.schedule.alphas_cumprod.numpy(),
                               np.cumprod(1 - np.linspace(0.0001, 0.02, T)), rtol=1e-12)
    # A zero-terminal-SNR config is refused rather than silently ignored.
    with pytest.raises(ValueError, match="rescale_betas_zero_snr"):
        FlashScheduler.from_config(DDIMScheduler(rescale_betas_zero_snr=True).config)


def test_save_load_round_trip(tmp_path):
    sched = FlashScheduler(noise_correction=False, timesteps=(999, 750, 500), prediction_type="v_prediction")
    sched.save_pretrained(tmp_path)
    loaded = FlashScheduler.from_pretrained(tmp_path)
    assert loaded.config.noise_correction is False
    assert list(loaded.config.timesteps) == [999, 750, 500]
    assert loaded.config.prediction_type == "v_prediction"
    loaded.set_timesteps()  # no arguments: the trained steps
    assert loaded.timesteps.tolist() == [999, 750, 500]
    sched.set_timesteps()
    x_T = noise(1, 2, 4, 4)
    for a, b in zip(run_scheduler(sched, x_T)[0], run_scheduler(loaded, x_T)[0]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("timesteps", [[999, 750, 500], [999, 666], [999]])
@pytest.mark.parametrize("noise_correction", [True, False])
def test_flash_sample_agrees_with_scheduler(timesteps, noise_correction):
    """sampling.flash_sample and FlashScheduler implement the same student sampler."""
    x_T = noise(2, 3, 4, 4)
    got = flash_sample(den, x_T, None, timesteps, make_schedule(), noise_correction)
    sched = FlashScheduler(noise_correction=noise_correction)
    sched.set_timesteps(timesteps=timesteps)
    torch.testing.assert_close(got, run_scheduler(sched, x_T)[0][-1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, scheduler_sample(den, sched, x_T, None, timesteps=timesteps),
                               rtol=1e-12, atol=1e-12)
    want = hand_sample(x_T.numpy(), timesteps, noise_correction)[0][-1]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("noise_correction", [True, False])
def test_rollout_returns_state_after_j_steps(noise_correction):
    timesteps = [999, 750, 500]
    step_index = torch.tensor([0, 2, 1, 0, 2])
    x_T = noise(5, 2, 4, 4)
    got = rollout(den, x_T, None, timesteps, make_schedule(), step_index, noise_correction)
    for b, j in enumerate(step_index.tolist()):
        want = hand_sample(x_T[b:b + 1].numpy(), timesteps, noise_correction)[0][j]
        np.testing.assert_allclose(got[b:b + 1].numpy(), want, rtol=1e-10, atol=1e-10)
    np.testing.assert_array_equal(got[0].numpy(), x_T[0].numpy())  # index 0: the pure noise itself
    # All-zero indices: no denoiser call at all.
    calls = []
    out = rollout(lambda x, t, c: calls.append(t) or den(x, t, c), x_T, None, timesteps, make_schedule(),
                  torch.zeros(5, dtype=torch.long), noise_correction)
    assert not calls
    torch.testing.assert_close(out, x_T, rtol=0, atol=0)


def test_v_at_T_steps_as_v_at_the_first_timestep_and_as_eps_after():
    """prediction_type='v_at_T': the output is read as v at t = T - 1 and as eps at every other timestep."""
    x, out = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    steps = {}
    for kind in ("v_at_T", "v_prediction", "epsilon"):
        s = FlashScheduler(timesteps=[999, 500], prediction_type=kind)
        s.set_timesteps()
        first = s.step(out, 999, x).prev_sample
        steps[kind] = (first, s.step(out, 500, first).prev_sample)
    torch.testing.assert_close(steps["v_at_T"][0], steps["v_prediction"][0])
    e = FlashScheduler(timesteps=[999, 500], prediction_type="epsilon")
    e.set_timesteps()
    e.step(out, 999, x)  # to step index 1
    torch.testing.assert_close(steps["v_at_T"][1], e.step(out, 500, steps["v_at_T"][0]).prev_sample)


def den_rows(x: torch.Tensor, t, cond=None) -> torch.Tensor:
    """den with a per-sample timestep (B,) broadcast over each image."""
    t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, *[1] * (x.ndim - 1))
    return 0.3 * x + 0.1 * torch.sin(t / 100.0)


@pytest.mark.parametrize("k", [2, 3, 8])
def test_dpmpp_target_solver_matches_diffusers_dpm_solver(k):
    """dpmpp_sample (flash's target_solver='dpmpp') is diffusers' DPM-Solver++(2M) on the same timesteps: its x0_hat
    at the last one is the scheduler's final sample (lower_order_final: a first-order step to sigma = 0)."""
    from diffusers import DPMSolverMultistepScheduler

    from imagine_flash.sampling import dpmpp_sample
    from imagine_flash.schedule import uniform_timesteps

    ts = uniform_timesteps(950, k)[0].tolist()
    ref = DPMSolverMultistepScheduler(num_train_timesteps=T, beta_start=0.00085, beta_end=0.012,
                                      beta_schedule="scaled_linear", algorithm_type="dpmsolver++", solver_order=2,
                                      lower_order_final=True, final_sigmas_type="zero")
    ref.set_timesteps(timesteps=ts)
    x_T = noise(2, 3, 4, 4)
    x_ref = x_T
    for t in ref.timesteps:
        x_ref = ref.step(den(x_ref, int(t)), t, x_ref).prev_sample
    out = dpmpp_sample(den_rows, x_T, None, torch.tensor(ts), make_schedule())
    torch.testing.assert_close(out, x_ref, rtol=1e-6, atol=1e-6)


def test_dpmpp_step_by_hand_and_per_sample_rows():
    """Two steps of DPM-Solver++(2M) written out in float64 (lambda = log(alpha/sigma), r = h_prev / h), and rows with
    different timesteps in one batch give each row's own result."""
    from imagine_flash.sampling import dpmpp_sample

    ts = [900, 600, 300]
    x = noise(1, 2, 3, 3).numpy()
    lam = lambda t: np.log(alpha(t) / sigma(t))  # noqa: E731
    x0 = lambda x, t: (x - sigma(t) * eps_np(x, t)) / alpha(t)  # noqa: E731
    m0 = x0(x, 900)
    h0 = lam(600) - lam(900)
    x1 = sigma(600) / sigma(900) * x - alpha(600) * np.expm1(-h0) * m0  # first order: DDIM
    m1 = x0(x1, 600)
    h1 = lam(300) - lam(600)
    d = m1 + h1 / (2 * h0) * (m1 - m0)  # (1 + 1/2r) m1 - (1/2r) m0, r = h0 / h1
    x2 = sigma(300) / sigma(600) * x1 - alpha(300) * np.expm1(-h1) * d
    want = x0(x2, 300)
    sched = make_schedule()
    got = dpmpp_sample(den_rows, torch.from_numpy(x), None, torch.tensor(ts), sched)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-9, atol=1e-9)
    # a batch of two rows on different timesteps = each row alone
    xs = noise(2, 2, 3, 3, seed=1)
    rows = torch.tensor([[900, 600, 300], [500, 333, 166]])
    both = dpmpp_sample(den_rows, xs, None, rows, sched)
    for b in range(2):
        torch.testing.assert_close(both[b:b + 1], dpmpp_sample(den_rows, xs[b:b + 1], None, rows[b], sched))
