"""Flash loss terms on tiny callables, against expectations built by hand."""
import math

import pytest
import torch

from imagine_flash.denoisers import Cond, Denoiser
from imagine_flash.losses.flash import FlashLoss
from imagine_flash.schedule import make_schedule

S = make_schedule()


def abar(t):
    """alphas_cumprod by hand (scaled-linear betas), independent of the implementation."""
    betas = [(math.sqrt(0.00085) + (math.sqrt(0.012) - math.sqrt(0.00085)) * i / 999) ** 2 for i in range(1000)]
    p = 1.0
    for b in betas[: t + 1]:
        p *= 1 - b
    return p


class Recorder:
    """A fake eps network that logs what it sees: eps_hat = c * x_t (+ a cond-dependent offset)."""

    def __init__(self, c):
        self.c, self.calls = c, []

    def __call__(self, x_t, t, cond):
        self.calls.append((x_t.detach().clone(), t.clone()))
        return self.c * x_t


def call(loss, student, rollout, teacher, *args):
    """Run a method's loss with the denoisers it may use (losses.Models)."""
    from imagine_flash.losses import Models
    return loss(Models(student=student, rollout=rollout, teacher=teacher, ema=None, schedule=S, disc=None), *args)


def cond_of(B):
    return Cond(torch.zeros(B, 2, 4), torch.ones(B, 2, dtype=torch.bool))


def test_backward_rollout_uses_only_noise_and_student_outputs():
    B = 64
    student_net = Recorder(0.5)
    student = Denoiser(student_net, S)
    teacher = Denoiser(Recorder(0.1), S)
    loss = FlashLoss(S, [999, 750, 500], k=2)
    x0_real = torch.full((B, 3, 4, 4), float("nan"))  # any use of data would poison the loss
    gen = torch.Generator().manual_seed(0)
    out = call(loss, student, student, teacher, x0_real, cond_of(B), gen)
    assert torch.isfinite(out["recon"]).all()
    # Replay the rollout by hand from the same x_T: every state the student saw is a function of x_T and its eps.
    gen = torch.Generator().manual_seed(0)
    x_T = torch.randn((B, 3, 4, 4), generator=gen)
    i = torch.randint(0, 3, (B,), generator=gen)
    x_train, t_train = student_net.calls[-1]
    ts = [999, 750, 500]
    for b in range(B):
        x = x_T[b].double()
        for j in range(int(i[b])):
            t, tn = ts[j], ts[j + 1]
            eps = 0.5 * x
            x0 = (x - math.sqrt(1 - abar(t)) * eps) / math.sqrt(abar(t))
            corr = x_T[b].double() if j == 0 else eps  # Eq. 9 at the first step
            x = math.sqrt(abar(tn)) * x0 + math.sqrt(1 - abar(tn)) * corr
        assert int(t_train[b]) == ts[int(i[b])]
        torch.testing.assert_close(x_train[b].double(), x, rtol=1e-4, atol=1e-5)


def test_no_backward_uses_forward_noised_data():
    B = 16
    student = Denoiser(Recorder(0.5), S)
    teacher = Denoiser(Recorder(0.1), S)
    loss = FlashLoss(S, [999, 750, 500], k=2, backward=False)
    x0_nan = torch.full((B, 3, 4, 4), float("nan"))
    out = call(loss, student, student, teacher, x0_nan, cond_of(B), torch.Generator().manual_seed(0))
    assert torch.isnan(out["recon"]).all()  # the data entered the student's input
    # And the input is exactly q(x0, eps, t) of Eq. 1.
    net = Recorder(0.5)
    x0 = torch.randn(B, 3, 4, 4)
    call(loss, Denoiser(net, S), None, teacher, x0, cond_of(B), torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    eps = torch.randn(x0.shape, generator=g)
    i = torch.randint(0, 3, (B,), generator=g)
    x_seen, t_seen = net.calls[0]
    for b in range(B):
        t = [999, 750, 500][int(i[b])]
        assert int(t_seen[b]) == t
        exp = math.sqrt(abar(t)) * x0[b].double() + math.sqrt(1 - abar(t)) * eps[b].double()
        torch.testing.assert_close(x_seen[b].double(), exp, rtol=1e-4, atol=1e-5)


def test_srl_teacher_starts_at_gamma_and_takes_k_steps():
    B, k = 32, 8
    teacher_net = Recorder(0.2)
    student = Denoiser(Recorder(0.5), S)
    loss = FlashLoss(S, [999, 750, 500], k=k)
    call(loss, student, student, Denoiser(teacher_net, S), torch.zeros(B, 3, 4, 4), cond_of(B),
               torch.Generator().manual_seed(3))
    assert len(teacher_net.calls) == k
    ts = torch.stack([t for _, t in teacher_net.calls], 1)  # (B, k)
    g = torch.Generator().manual_seed(3)
    torch.randn((B, 3, 4, 4), generator=g)
    i = torch.randint(0, 3, (B,), generator=g)
    gamma = torch.tensor([990, 950, 200])[i]  # §5.1: gamma(999)=990, gamma(750)=950, gamma(500)=200
    assert torch.equal(ts[:, 0], gamma)
    for b in range(B):  # uniform spacing gamma, gamma (1 - 1/k), ..., gamma / k
        exp = [round(int(gamma[b]) * (1 - j / k)) for j in range(k)]
        assert ts[b].tolist() == exp


def test_srl_value_by_hand():
    """One sample, 1-step student at t=999, k=1: target = teacher x0_hat at gamma(999)=990 from chi."""
    stu, tea = 0.5, 0.2
    loss = FlashLoss(S, [999], k=1)
    B = 4
    out = call(loss, Denoiser(lambda x, t, c: stu * x, S), Denoiser(lambda x, t, c: stu * x, S),
               Denoiser(lambda x, t, c: tea * x, S), torch.zeros(B, 3, 2, 2), cond_of(B),
               torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    x_T = torch.randn((B, 3, 2, 2), generator=g).double()
    torch.randint(0, 1, (B,), generator=g)
    eps2 = torch.randn((B, 3, 2, 2), generator=g).double()
    a, s = math.sqrt(abar(999)), math.sqrt(1 - abar(999))
    x0_s = (x_T - s * stu * x_T) / a
    a2, s2 = math.sqrt(abar(990)), math.sqrt(1 - abar(990))
    chi = a2 * x0_s + s2 * eps2
    target = (chi - s2 * tea * chi) / a2
    exp = (target - x0_s).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(out["recon"].double(), exp, rtol=1e-4, atol=1e-6)


def test_recon_step_weights_scale_each_sample_by_its_step():
    """recon_step_weights: each sample's loss is multiplied by the weight of the step index it drew."""
    B, w = 64, (0.25, 1.0, 3.0)
    args = lambda: (Denoiser(lambda x, t, c: 0.5 * x, S), Denoiser(lambda x, t, c: 0.5 * x, S),
                    Denoiser(lambda x, t, c: 0.2 * x, S), torch.zeros(B, 3, 2, 2), cond_of(B))
    plain = call(FlashLoss(S, [999, 750, 500], k=2), *args(), torch.Generator().manual_seed(7))["recon"]
    weighted = call(FlashLoss(S, [999, 750, 500], k=2, step_weights=w), *args(),
                    torch.Generator().manual_seed(7))["recon"]
    g = torch.Generator().manual_seed(7)
    torch.randn((B, 3, 2, 2), generator=g)
    i = torch.randint(0, 3, (B,), generator=g)  # the step each sample drew, as backward_input draws it
    assert set(i.tolist()) == {0, 1, 2}
    torch.testing.assert_close(weighted, plain * torch.tensor(w)[i])


def test_recon_step_weights_must_match_the_steps():
    import pytest

    from imagine_flash.config import ConfigError, DistillConfig
    from imagine_flash.losses import build_method

    with pytest.raises(ConfigError, match="recon_step_weights"):
        build_method(DistillConfig(recon_step_weights=(1.0, 2.0)), S, [999, 750, 500])
    with pytest.raises(ConfigError, match="recon_step_weights"):
        build_method(DistillConfig(method="lcm", recon_step_weights=(1.0,)), S, [999])


def test_rollout_all_steps_same_states_fixed_calls():
    """all_steps (several processes): every process runs all steps but the last, and the states are unchanged."""
    from imagine_flash.sampling import rollout

    g = torch.Generator().manual_seed(0)
    x_T, cond = torch.randn(4, 3, 2, 2, generator=g), cond_of(4)
    for i in ([0, 0, 1, 1], [0, 1, 2, 0], [0, 0, 0, 0]):
        i = torch.tensor(i)
        runs = []
        for all_steps in (False, True):
            net = Recorder(0.3)
            runs.append((rollout(Denoiser(net, S), x_T, cond, [999, 750, 500], S, i, True, all_steps), len(net.calls)))
        assert torch.equal(runs[0][0], runs[1][0])
        assert runs[0][1] == int(i.max()) and runs[1][1] == 2


def test_no_srl_has_no_reconstruction_term():
    out = call(FlashLoss(S, [999], reconstruction="none"), Denoiser(lambda x, t, c: x, S), Denoiser(lambda x, t, c: x, S),
                                                      None, torch.zeros(2, 3, 2, 2), cond_of(2),
                                                      torch.Generator().manual_seed(0))
    assert "recon" not in out and out["x0_student"].shape == (2, 3, 2, 2)


def test_cfg_is_one_batched_forward_and_lerp():
    calls = []

    def net(x, t, cond):
        calls.append(x.shape[0])
        return x * 0 + cond.hidden[:, :1, :1].reshape(-1, 1, 1, 1)  # eps = the cond's first value

    c = Cond(torch.full((3, 2, 4), 2.0), torch.ones(3, 2, dtype=torch.bool))
    null = Cond(torch.full((1, 2, 4), -1.0), torch.ones(1, 2, dtype=torch.bool))
    eps = Denoiser(net, S, guidance_scale=3.0, null_cond=null)(torch.zeros(3, 1, 2, 2), 500, c)
    assert calls == [6]  # cond and uncond in one forward
    torch.testing.assert_close(eps, torch.full((3, 1, 2, 2), -1.0 + 3.0 * (2.0 + 1.0)))


def test_hinge_losses_by_hand():
    from imagine_flash.losses.discriminator import HingeAdversarial

    adv = HingeAdversarial(S, t_max=0)  # t_d = 0: x_t = sqrt(abar_0) x0 + sqrt(1 - abar_0) eps
    disc = lambda x, t, c: x.flatten(1).mean(1) * 10
    real, fake = torch.full((2, 1, 2, 2), 0.3), torch.full((2, 1, 2, 2), -0.05)
    g = torch.Generator().manual_seed(0)
    d = adv.discriminator(disc, real, fake, None, None, g)
    g = torch.Generator().manual_seed(0)
    torch.randint(0, 1, (2,), generator=g)
    eps = torch.randn((2, 1, 2, 2), generator=g)
    a, s = math.sqrt(abar(0)), math.sqrt(1 - abar(0))
    d_real = (a * real + s * eps).flatten(1).mean(1) * 10
    d_fake = (a * fake + s * eps).flatten(1).mean(1) * 10
    torch.testing.assert_close(d, torch.relu(1 - d_real) + torch.relu(1 + d_fake))
    g = torch.Generator().manual_seed(0)
    torch.testing.assert_close(adv.generator(disc, fake, None, g), -d_fake)


def test_approx_r1_by_hand():
    """disc_r1: r1 * (D(x_real) - D(x_real + sigma n))^2 added per sample, n drawn after the hinge's own noise;
    r1 = 0 draws nothing more (the default's random stream is unchanged)."""
    from imagine_flash.losses.discriminator import HingeAdversarial

    disc = lambda x, t, c: x.square().flatten(1).sum(1)  # nonlinear: the difference depends on x
    real, fake = torch.full((2, 1, 2, 2), 0.3), torch.full((2, 1, 2, 2), -0.05)
    g0 = torch.Generator().manual_seed(0)
    plain = HingeAdversarial(S, t_max=0).discriminator(disc, real, fake, None, None, g0)
    d = HingeAdversarial(S, t_max=0, r1=100.0, r1_sigma=0.1).discriminator(disc, real, fake, None, None,
                                                                            torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    torch.randint(0, 1, (2,), generator=g)
    eps = torch.randn((2, 1, 2, 2), generator=g)
    assert torch.equal(g0.get_state(), g.get_state())  # r1 = 0: no further draw
    n = torch.randn((2, 1, 2, 2), generator=g)
    x_real = math.sqrt(abar(0)) * real + math.sqrt(1 - abar(0)) * eps
    d_r1 = (x_real.square().flatten(1).sum(1) - (x_real + 0.1 * n).square().flatten(1).sum(1)).square()
    torch.testing.assert_close(d, plain + 100.0 * d_r1)
    assert (d_r1 > 0).all()


def test_disc_mismatch_by_hand():
    """disc_mismatch: + m * relu(1 + D(x_real, the prompts rolled by one)), on the same noised real inputs; no further
    random draw; m = 0 calls the discriminator twice only."""
    from imagine_flash.losses.discriminator import HingeAdversarial

    calls = []

    def disc(x, t, c):  # depends on the image and on its prompt: prompt k matches images of mean k / 10
        calls.append(c.hidden[:, 0, 0].clone())
        return 1 - 20 * (x.flatten(1).mean(1) - c.hidden[:, 0, 0] / 10).abs()

    real = torch.tensor([0.1, 0.5, 0.9]).view(3, 1, 1, 1).expand(3, 1, 2, 2)
    fake = torch.zeros(3, 1, 2, 2)
    cond = Cond(torch.tensor([1.0, 5.0, 9.0]).view(3, 1, 1).expand(3, 2, 4))
    g0 = torch.Generator().manual_seed(0)
    plain = HingeAdversarial(S, t_max=0).discriminator(disc, real, fake, cond, cond, g0)
    assert len(calls) == 2
    g1 = torch.Generator().manual_seed(0)
    d = HingeAdversarial(S, t_max=0, mismatch=0.5).discriminator(disc, real, fake, cond, cond, g1)
    assert torch.equal(g0.get_state(), g1.get_state())  # no further draw
    torch.testing.assert_close(calls[-1], torch.tensor([9.0, 1.0, 5.0]))  # each image with the previous prompt
    g = torch.Generator().manual_seed(0)
    torch.randint(0, 1, (3,), generator=g)
    eps = torch.randn((3, 1, 2, 2), generator=g)
    x_real = math.sqrt(abar(0)) * real + math.sqrt(1 - abar(0)) * eps
    d_wrong = 1 - 20 * (x_real.flatten(1).mean(1) - torch.tensor([0.9, 0.1, 0.5])).abs()
    torch.testing.assert_close(d, plain + 0.5 * torch.relu(1 + d_wrong))
    with pytest.raises(ValueError, match="at least 2 samples"):
        HingeAdversarial(S, t_max=0, mismatch=1.0).discriminator(disc, real[:1], fake[:1], cond[:1], cond[:1],
                                                                  torch.Generator().manual_seed(0))


def test_adv_step_weights_weigh_each_sample_by_its_step():
    """adv_step_weights: per-sample adversarial weights by the sample's student step, and the discriminator's fake
    term weighted by them."""
    from imagine_flash.losses.discriminator import HingeAdversarial

    B = 16
    st = Denoiser(lambda x, t, c: 0.5 * x, S)
    out = call(FlashLoss(S, [999, 666, 333], k=1, reconstruction="srl+eq7", adv_step_weights=[0.5, 0, 2]), st, st, st,
               torch.zeros(B, 3, 2, 2), cond_of(B), torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    torch.randn((B, 3, 2, 2), generator=g)
    i = torch.randint(0, 3, (B,), generator=g)
    assert set(i.tolist()) == {0, 1, 2}
    torch.testing.assert_close(out["adv_weight"], torch.tensor([0.5, 0.0, 2.0])[i])
    disc = lambda x, t, c: x.flatten(1).mean(1) * 10
    real, fake = torch.full((B, 1, 2, 2), 0.3), torch.full((B, 1, 2, 2), -0.05)
    adv = HingeAdversarial(S, t_max=0)
    plain = adv.discriminator(disc, real, fake, None, None, torch.Generator().manual_seed(0))
    only_real = adv.discriminator(disc, real, torch.full_like(fake, -1e3), None, None, torch.Generator().manual_seed(0))
    w = out["adv_weight"]
    torch.testing.assert_close(adv.discriminator(disc, real, fake, None, None, torch.Generator().manual_seed(0), w),
                               only_real + w * (plain - only_real))


def test_srl_eq7_uses_eq7_at_the_last_step_and_srl_elsewhere():
    """reconstruction='srl+eq7': per sample, the Eq. 7 value at the last student step, the Eq. 8 value elsewhere.

    By hand, with a 1-step k=1 teacher (x0 estimate (x - s tea x) / a at its start) and linear nets: the last
    step's target starts from the student's own x_t at t, the others from chi = q(x0_s, eps2, gamma(t))."""
    stu, tea, B = 0.5, 0.2, 64
    ts = [999, 500]
    out = call(FlashLoss(S, ts, k=1, reconstruction="srl+eq7"), Denoiser(lambda x, t, c: stu * x, S),
               Denoiser(lambda x, t, c: stu * x, S), Denoiser(lambda x, t, c: tea * x, S),
               torch.zeros(B, 3, 2, 2), cond_of(B), torch.Generator().manual_seed(3))["recon"].double()
    g = torch.Generator().manual_seed(3)
    x_T = torch.randn((B, 3, 2, 2), generator=g).double()
    i = torch.randint(0, 2, (B,), generator=g)
    eps2 = torch.randn((B, 3, 2, 2), generator=g).double()
    assert set(i.tolist()) == {0, 1}
    aT, sT = math.sqrt(abar(999)), math.sqrt(1 - abar(999))
    a5, s5 = math.sqrt(abar(500)), math.sqrt(1 - abar(500))
    x0_first = (x_T - sT * stu * x_T) / aT
    x_500 = a5 * x0_first + s5 * x_T  # step 2's input: Eq. 9 puts x_T in the sigma term
    for b in range(B):
        if i[b] == 0:  # SRL at gamma(999) = 990
            a, s = math.sqrt(abar(990)), math.sqrt(1 - abar(990))
            chi = a * x0_first[b] + s * eps2[b]
            exp = (((chi - s * tea * chi) / a - x0_first[b]) ** 2).mean()
        else:  # Eq. 7: the teacher from the student's own x_500
            x0_s = (x_500[b] - s5 * stu * x_500[b]) / a5
            exp = (((x_500[b] - s5 * tea * x_500[b]) / a5 - x0_s) ** 2).mean()
        torch.testing.assert_close(out[b], exp, rtol=1e-4, atol=1e-6)


def test_snr_recon_weight_is_the_eps_space_error():
    """recon_weight='snr': each sample's x0 error times alpha_t^2 / sigma_t^2 of its step, computed by hand."""
    B, ts = 64, [999, 750, 500]
    args = lambda: (Denoiser(lambda x, t, c: 0.5 * x, S), Denoiser(lambda x, t, c: 0.5 * x, S),
                    Denoiser(lambda x, t, c: 0.2 * x, S), torch.zeros(B, 3, 2, 2), cond_of(B))
    plain = call(FlashLoss(S, ts, k=2), *args(), torch.Generator().manual_seed(7))["recon"]
    snr = call(FlashLoss(S, ts, k=2, recon_weight="snr"), *args(), torch.Generator().manual_seed(7))["recon"]
    g = torch.Generator().manual_seed(7)
    torch.randn((B, 3, 2, 2), generator=g)
    i = torch.randint(0, 3, (B,), generator=g)
    w = torch.tensor([abar(t) / (1 - abar(t)) for t in ts])[i]
    torch.testing.assert_close(snr, plain * w.float())


def test_student_prediction_sample_and_v_by_hand():
    """student_prediction: a 'sample' net's output is x0_hat itself and eps_hat = (x_t - alpha x0) / sigma; a
    'v_prediction' net's x0_hat = alpha x_t - sigma v (Salimans & Ho 2022), with alpha and sigma by hand."""
    x_t, out = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    t = torch.tensor([999, 333])
    a = torch.tensor([abar(999), abar(333)]).sqrt().view(-1, 1, 1, 1).float()
    s = (1 - a.square()).sqrt()
    p = Denoiser(lambda x, tt, c: out, S, "sample").predict(x_t, t, None)
    torch.testing.assert_close(p.x0, out)
    torch.testing.assert_close(p.eps, (x_t - a * out) / s)
    p = Denoiser(lambda x, tt, c: out, S, "v_prediction").predict(x_t, t, None)
    torch.testing.assert_close(p.x0, a * x_t - s * out)
    torch.testing.assert_close(p.eps, s * x_t + a * out)
    p = Denoiser(lambda x, tt, c: out, S, "v_at_T").predict(x_t, t, None)  # v at t = 999, eps at 333
    torch.testing.assert_close(p.x0[0], (a * x_t - s * out)[0])
    torch.testing.assert_close(p.x0[1], ((x_t - s * out) / a)[1])
    torch.testing.assert_close(p.eps, torch.stack([(s * x_t + a * out)[0], out[1]]))


def test_a_scheduler_taking_x0_or_v_samples_as_one_taking_eps():
    """scheduler_sample hands a FlashScheduler the output form its prediction_type names: the same x0_hat sampled
    through an 'epsilon', a 'sample', a 'v_prediction' and a 'v_at_T' scheduler gives the same images."""
    from imagine_flash.sampling import scheduler_sample
    from imagine_flash.scheduler import FlashScheduler

    x0_net = lambda x, t, c: torch.tanh(x) * 0.5  # an x0-predicting toy network
    den = Denoiser(x0_net, S, "sample")
    x_T = torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    outs = [scheduler_sample(den, FlashScheduler(timesteps=[999, 666, 333], prediction_type=kind), x_T, None, 3)
            for kind in ("epsilon", "sample", "v_prediction", "v_at_T")]
    for other in outs[1:]:
        torch.testing.assert_close(other, outs[0], rtol=1e-4, atol=1e-5)
    # and by hand: Eq. 9 at 999 (x_T in place of eps), then Eq. 4 with eps from x0 (Eq. 5), then x0_hat at 333
    a = {t: abar(t) ** 0.5 for t in (666, 333)}
    x = a[666] * x0_net(x_T, 0, None) + (1 - a[666] ** 2) ** 0.5 * x_T
    x0 = x0_net(x, 0, None)
    eps = (x - a[666] * x0) / (1 - a[666] ** 2) ** 0.5
    x = a[333] * x0 + (1 - a[333] ** 2) ** 0.5 * eps
    torch.testing.assert_close(outs[1], x0_net(x, 0, None), rtol=1e-4, atol=1e-5)
