"""Sampler behaviour: PLMS == diffusers PNDM, MIS identities, batched == official order, seeds, tokens once."""

import pytest
import torch
from diffusers import PNDMScheduler

from instdiff_lib.model.config import DropFlags, tiny
from instdiff_lib.model.unet import InstanceUNet
from instdiff_lib.sampling.sampler import Branch, Sampler, SamplerStats, Schedule, gate_schedule


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = InstanceUNet(tiny()).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith(("alpha_attn", "alpha_dense")):
                p.fill_(0.8)
            elif "scaleu" in name:
                p.normal_(0, 0.3)
    return m


def _branch(model, B, box, seed):
    g = torch.Generator().manual_seed(seed)
    cfg = model.cfg
    gr = model.position_net.null_grounding(B, seg_size=16)
    gr["masks"][:, 0] = 1
    gr["boxes"][:, 0] = torch.tensor(box)
    gr["points"][:, 0] = torch.tensor([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])
    gr["positive_embeddings"][:, 0] = torch.randn(cfg.unifusion.in_dim, generator=g)
    return Branch(torch.randn(1, 77, cfg.unet.context_dim, generator=g).expand(B, -1, -1), gr)


def _setup(model, B, size):
    """Two instances (one branch each for MIS) and the full layout; noise of B x 4 x size x size."""
    full = _branch(model, B, [0.1, 0.1, 0.6, 0.7], 1)
    full.grounding["masks"][:, 1] = 1
    full.grounding["boxes"][:, 1] = torch.tensor([0.5, 0.4, 0.9, 0.9])
    insts = [_branch(model, B, [0.1, 0.1, 0.6, 0.7], 2), _branch(model, B, [0.5, 0.4, 0.9, 0.9], 3)]
    uc = torch.randn(1, 77, model.cfg.unet.context_dim, generator=torch.Generator().manual_seed(9)).expand(B, -1, -1)
    x_T = torch.randn(B, 4, size, size, generator=torch.Generator().manual_seed(4))
    return full, insts, uc, x_T


@pytest.fixture(scope="module")
def setup(model):
    return _setup(model, 2, 32)


def run(model, setup, **kw):
    full, insts, uc, x_T = setup
    kw.setdefault("progress", False)
    return Sampler(model).sample(x_T, [full, *insts], uc, **kw)


def test_gate_schedule_counts_plms_steps():
    assert sum(gate_schedule(50, 0.75)) == 37 and sum(gate_schedule(50, 0.8)) == 40
    assert gate_schedule(8, 0.75) == [1, 1, 1, 1, 1, 1, 0, 0]
    assert sum(gate_schedule(50, 1.0)) == 50 and sum(gate_schedule(50, 0.0)) == 0
    for alpha in (-0.1, 1.5):  # found by mutation testing: the bounds and the message were unpinned
        with pytest.raises(ValueError, match=rf"^alpha must be in \[0, 1\], got {alpha}$"):
            gate_schedule(50, alpha)


def test_schedule_is_ldm_uniform():
    s = Schedule.make(50)
    assert s.timesteps[0] == 1 and s.timesteps[-1] == 981 and len(s) == 50
    # the most steps: 999 (found by mutation testing: 1000 passed the check, then indexed past the 1000-entry table)
    most = Schedule.make(999)
    assert torch.equal(most.timesteps, torch.arange(999) + 1)
    assert torch.equal(most.alphas_prev[1:], most.alphas[:-1])
    for steps in (0, 1000):
        with pytest.raises(ValueError, match=rf"^steps must be in \[1, 999\], got {steps}$"):
            Schedule.make(steps)


@pytest.mark.parametrize("beta_schedule,b0,b1", [("scaled_linear", 0.00085, 0.012), ("linear", 1e-4, 0.02)])
def test_alphas_cumprod_equal_diffusers(beta_schedule, b0, b1):
    from diffusers import DDPMScheduler

    from instdiff_lib.model.config import ScheduleConfig
    from instdiff_lib.sampling.sampler import alphas_cumprod

    cfg = ScheduleConfig(beta_start=b0, beta_end=b1, beta_schedule=beta_schedule)
    ref = DDPMScheduler(num_train_timesteps=1000, beta_start=b0, beta_end=b1, beta_schedule=beta_schedule)
    torch.testing.assert_close(alphas_cumprod(cfg), ref.alphas_cumprod, atol=1e-6, rtol=0)  # theirs: float32 betas
    other = ScheduleConfig(beta_start=b0, beta_end=b1,
                           beta_schedule={"linear": "scaled_linear", "scaled_linear": "linear"}[beta_schedule])
    assert (alphas_cumprod(other) - alphas_cumprod(cfg)).abs().max() > 0.05
    with pytest.raises(ValueError, match="beta_schedule must be one of"):
        ScheduleConfig(beta_schedule="cosine")
    with pytest.raises(ValueError, match="beta_start <= beta_end"):
        ScheduleConfig(beta_start=0.02, beta_end=0.01)


@pytest.mark.parametrize("beta_schedule,b0,b1", [("scaled_linear", 0.00085, 0.012), ("linear", 1e-4, 0.02)])
def test_plms_equals_diffusers_pndm_skip_prk(model, setup, beta_schedule, b0, b1):
    """Our PLMS (official update rules) vs diffusers' PNDMScheduler(skip_prk_steps) driving the same guided model,
    on SD's schedule (the official one) and on DDPM's linear betas (a model config may name either)."""
    import dataclasses

    full, insts, uc, x_T = setup
    steps, g = 6, 7.5
    schedule = dataclasses.replace(model.cfg.schedule, beta_schedule=beta_schedule, beta_start=b0, beta_end=b1)
    ours = Sampler(model, schedule).sample(x_T, [full, *insts], uc, steps=steps, guidance=g, alpha=1.0, mis=0.0,
                                           progress=False)
    sched = PNDMScheduler(num_train_timesteps=1000, beta_start=b0, beta_end=b1, beta_schedule=beta_schedule,
                          skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
    sched.set_timesteps(steps)
    objs = model.tokenize(full.grounding)
    null = model.tokenize(model.position_net.null_grounding(2, seg_size=1))
    x = x_T.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            tt = torch.full((2,), int(t))
            e_c = model(x, tt, full.context, objs, 1)
            e_u = model(x, tt, uc, null, 1)
            x = sched.step(e_u + g * (e_c - e_u), t, x).prev_sample
    torch.testing.assert_close(ours, x, atol=1e-4 * x.abs().max().item(), rtol=0)


def test_v_prediction_oracle_lands_on_its_image(model, setup, monkeypatch):
    """A v-prediction model that knows the image x0 (it outputs v = sqrt(a) eps - sqrt(1 - a) x0 for its input) and
    an epsilon model that knows it give the same DDIM path, the one that keeps x_t = sqrt(a) x0 + sqrt(1 - a) eps_T:
    the sampler turns v into eps = sqrt(a) v + sqrt(1 - a) x_t. Done twice with one Sampler whose schedule is changed
    in between (its alphas table must follow). Found by mutation testing: no sampler test ran a v-prediction model,
    and the Shapes model is one."""
    import dataclasses

    from instdiff_lib.sampling.sampler import alphas_cumprod

    full, insts, uc, x_T = setup
    x0 = torch.rand(x_T.shape, generator=torch.Generator().manual_seed(21)) * 2 - 1
    sampler = Sampler(model)
    for beta_schedule, b0, b1 in (("linear", 1e-4, 0.02), ("scaled_linear", 0.00085, 0.012)):
        outs = {}
        for kind in ("v_prediction", "epsilon"):
            cfg = dataclasses.replace(model.cfg.schedule, prediction_type=kind, beta_schedule=beta_schedule,
                                      beta_start=b0, beta_end=b1)
            acp = alphas_cumprod(cfg).double()

            def oracle(x, t, *args, acp=acp, kind=kind):
                a, img = acp[t].view(-1, 1, 1, 1), x0.repeat(x.shape[0] // x0.shape[0], 1, 1, 1)  # [cond; uncond]
                eps = (x.double() - a.sqrt() * img) / (1 - a).sqrt()
                out = a.sqrt() * eps - (1 - a).sqrt() * img if kind == "v_prediction" else eps
                return out.float()

            monkeypatch.setattr(model, "forward", oracle)
            sampler.schedule_cfg = cfg
            outs[kind] = sampler.sample(x_T, [full], uc, steps=10, guidance=7.5, mis=0.0, method="ddim",
                                        progress=False)
        eps_T = (x_T.double() - acp[901].sqrt() * x0) / (1 - acp[901]).sqrt()  # t of the first of 10 steps: 901
        want = (acp[0].sqrt() * x0 + (1 - acp[0]).sqrt() * eps_T).float()  # alphas_prev of the last step: acp[0]
        torch.testing.assert_close(outs["epsilon"], want, atol=1e-4, rtol=0)
        torch.testing.assert_close(outs["v_prediction"], want, atol=1e-4, rtol=0)


def test_mis_zero_is_plain_sampler(model, setup):
    full, insts, uc, x_T = setup
    a = run(model, setup, steps=5, mis=0.0)
    b = Sampler(model).sample(x_T, [full], uc, steps=5, mis=0.0, progress=False)
    c = Sampler(model).sample(x_T, [full], uc, steps=5, mis=0.36, progress=False)  # no instance branches
    assert torch.equal(a, b) and torch.equal(a, c)
    d = run(model, setup, steps=5, mis=0.4)
    assert (d - a).abs().max() > 1e-3  # MIS does change the result


def test_one_mis_step_and_none(model, setup):
    """int(steps * mis) = 1 runs one MIS step (every branch, then the merge); mis = 0 tokenizes and samples the full
    layout only (found by mutation testing: both edges were unpinned)."""
    one, none = SamplerStats(), SamplerStats()
    a = run(model, setup, steps=4, mis=0.25, stats=one)
    assert one.unet_calls == 3 * (2 * 1 + 2) + 2 * (4 - 1)  # official accounting (n+1)(2M+2) + 2(T-M), n=2, M=1
    assert one.tokenizations == 3 + 1
    b = run(model, setup, steps=4, mis=0.0, stats=none)
    assert none.unet_calls == 1 * (2 * 0 + 2) + 2 * 4 and none.tokenizations == 1 + 1
    assert (a - b).abs().max() > 1e-3


def test_batched_equals_official_order(model, setup):
    stats_b, stats_r = SamplerStats(), SamplerStats()
    a = run(model, setup, steps=5, mis=0.4, batched=True, stats=stats_b)
    b = run(model, setup, steps=5, mis=0.4, batched=False, stats=stats_r)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)
    assert stats_b.unet_calls == stats_r.unet_calls  # same work, official accounting: (n+1)(2M+2) + 2(T-M)
    assert stats_b.unet_calls == 3 * (2 * 2 + 2) + 2 * (5 - 2)
    assert stats_b.tokenizations == 3 + 1  # once per branch + the null grounding, not per step
    assert stats_r.tokenizations == stats_r.unet_calls
    assert stats_r.unet_batches == stats_r.unet_calls  # the official order: one UNet call per batch
    assert stats_b.unet_batches < stats_r.unet_batches


def test_chunking_does_not_change_results(model, setup):
    whole, chunked = SamplerStats(), SamplerStats()
    a = run(model, setup, steps=4, mis=0.5, stats=whole)
    b = run(model, setup, steps=4, mis=0.5, max_batch=3, stats=chunked)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)  # only float reassociation across batch sizes
    # 2 MIS steps of 3 branches x 2 halves x B=2 = 12 rows (step 0 evaluated twice), then 2 steps of 4 rows
    assert whole.unet_batches == 2 + 1 + 1 + 1
    assert chunked.unet_batches == 4 * 2 + 4 + 2 + 2  # at most 3 rows per UNet call
    assert chunked.unet_calls == whole.unet_calls


def test_stats_add_up_over_calls(model, setup):
    """One SamplerStats passed to several calls counts all of them (found by mutation testing)."""
    once, twice = SamplerStats(), SamplerStats()
    run(model, setup, steps=2, mis=0.5, stats=once)
    for _ in range(2):
        run(model, setup, steps=2, mis=0.5, stats=twice)
    assert once.tokenizations == 3 + 1 and once.unet_calls > 0
    assert (twice.tokenizations, twice.unet_calls, twice.unet_batches) == (
        2 * once.tokenizations, 2 * once.unet_calls, 2 * once.unet_batches)


def test_defaults_are_the_official_inference_settings(model, capsys):
    """Called without settings, the sampler runs the official inference.py defaults: PLMS, 50 steps, guidance 7.5,
    alpha 0.75, MIS 0.36, batched (found by mutation testing: no test called it without them). One 8 x 8 latent:
    50 steps at the size of the other tests would make this the slowest test of the file."""
    setup = _setup(model, 1, 8)
    full, insts, uc, x_T = setup
    stats = SamplerStats()
    default = Sampler(model).sample(x_T, [full, *insts], uc, stats=stats)
    spelled = run(model, setup, steps=50, guidance=7.5, alpha=0.75, mis=0.36, method="plms", batched=True)
    assert torch.equal(default, spelled)
    # int(50 * 0.36) = 18 MIS steps of 3 branches, plus the improved-Euler evaluation of step 0; then 32 steps of 1
    assert stats.unet_calls == 2 * 3 * (18 + 1) + 2 * (50 - 18)
    assert stats.unet_batches == 50 + 1 and len(stats.trace) == 0
    # a progress bar unless asked not to show one, cleared when done (it is nested in the pipeline's)
    err = capsys.readouterr().err
    assert "plms x3 branch" in err and "\n" not in err[err.rindex("plms x3 branch"):]


@pytest.mark.parametrize("batched", [True, False])
def test_sample_many_equals_each_job_alone(model, setup, batched):
    """Jobs of different branch counts (3, 2 and 1) sampled together: each result equals its job sampled alone (MIS
    merges each job's own branches, never across jobs), to float rounding; the first job alone is exactly ``sample``."""
    full, insts, uc, x_T = setup
    g = torch.Generator().manual_seed(11)
    x_b, x_c = torch.randn(x_T.shape, generator=g), torch.randn(x_T.shape, generator=g)
    job_b = [_branch(model, 2, [0.2, 0.5, 0.9, 0.8], 5), _branch(model, 2, [0.2, 0.5, 0.9, 0.8], 6)]
    job_c = [_branch(model, 2, [0.0, 0.0, 0.4, 0.3], 7)]
    jobs = [(x_T, [full, *insts]), (x_b, job_b), (x_c, job_c)]
    kw = dict(steps=6, guidance=5.0, alpha=0.5, mis=0.5, progress=False, batched=batched)
    s = Sampler(model)
    together = s.sample_many(jobs, uc, max_batch=5, **kw)
    alone = [s.sample(x, brs, uc, **kw) for x, brs in jobs]
    for a, b in zip(together, alone):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=0)
    assert (together[0] - together[1]).abs().max() > 0.1  # the jobs do differ
    assert torch.equal(s.sample_many(jobs[:1], uc, **kw)[0], alone[0])
    assert s.sample_many([], uc, **kw) == []
    with pytest.raises(ValueError, match=r"noise of one shape, got \[\(1, 4, 32, 32\), \(2, 4, 32, 32\)\]"):
        s.sample_many([(x_T, job_c), (x_T[:1], job_c)], uc, **kw)


@pytest.mark.parametrize("mis", [1.0, -0.1, 1.5])
def test_mis_outside_zero_one_is_refused(model, setup, mis):
    """MIS is a fraction of the steps in [0, 1): at 1.0 no step would run on the merged latent (found by mutation
    testing: the bounds and the message were not pinned)."""
    full, insts, uc, x_T = setup
    with pytest.raises(ValueError, match=rf"^mis must be in \[0, 1\), got {mis}$"):
        Sampler(model).sample(x_T, [full, *insts], uc, steps=2, mis=mis, progress=False)
    with pytest.raises(ValueError, match=r"^method must be one of \('plms', 'ddim'\), got 'euler'$"):
        Sampler(model).sample(x_T, [full, *insts], uc, steps=2, method="euler", progress=False)


def test_mis_average_and_branch0_history(model, setup):
    """After the MIS steps the latent is the uniform mean of the branch latents."""
    stats = SamplerStats()
    run(model, setup, steps=6, mis=0.5, trace=True, stats=stats)
    merged_in = stats.trace[3]["x_in"][0]
    before = stats.trace[2]["x_out"]
    assert before.shape[0] == 3
    torch.testing.assert_close(merged_in, before.mean(0))
    assert stats.trace[3]["n_old_eps"] == 3  # branch 0's history continues
    assert [e["step"] for e in stats.trace] == list(range(6))  # the only trace field the parity check does not read


def test_alpha_zero_equals_fusers_off(model, setup):
    a = run(model, setup, steps=4, mis=0.0, alpha=0.0)
    model.cfg.fusers = False
    try:
        b = run(model, setup, steps=4, mis=0.0, alpha=1.0)
    finally:
        model.cfg.fusers = True
    assert torch.equal(a, b)
    c = run(model, setup, steps=4, mis=0.0, alpha=1.0)
    assert (c - a).abs().max() > 1e-3


def test_ddim_option(model, setup):
    a = run(model, setup, steps=4, mis=0.0, method="ddim")
    b = run(model, setup, steps=4, mis=0.0, method="plms")
    assert torch.isfinite(a).all() and (a - b).abs().max() > 1e-4
    with pytest.raises(ValueError, match="method"):
        run(model, setup, steps=4, method="euler")


def test_drop_flags_reach_the_tokens(model, setup):
    a = run(model, setup, steps=3, mis=0.0, drop=DropFlags.preset("mask"))
    b = run(model, setup, steps=3, mis=0.0, drop=DropFlags.preset("point"))
    assert (a - b).abs().max() > 1e-4


def test_official_order_uses_the_given_drop_flags_and_the_latents_dtype(model, setup):
    """The official-order path tokenizes with the drop flags it is given (not the model's default), as the batched
    path does, and runs in bf16 (found by mutation testing)."""
    point = DropFlags.preset("point")
    assert point != model.position_net.drop
    a = run(model, setup, steps=2, mis=0.0, drop=point, batched=True)
    b = run(model, setup, steps=2, mis=0.0, drop=point, batched=False)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)
    c = run(model, setup, steps=2, mis=0.0, batched=False)  # the model's own flags: a different result
    assert (b - c).abs().max() > 1e-4
    full, insts, uc, x_T = setup
    m16 = InstanceUNet(model.cfg).eval()
    m16.load_state_dict(model.state_dict())
    m16.to(torch.bfloat16)
    bf = [Branch(br.context.to(torch.bfloat16), br.grounding) for br in (full, *insts)]
    out = Sampler(m16).sample(x_T.to(torch.bfloat16), bf, uc.to(torch.bfloat16), steps=1, mis=0.0, batched=False,
                              progress=False)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
