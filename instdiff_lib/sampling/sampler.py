"""PLMS / DDIM sampling with classifier-free guidance, the alpha (fuser) schedule and the Multi-Instance Sampler.

Official behaviour reproduced (``ldm/models/diffusion/plms.py`` and ``plms_instance.py``):

* Timesteps "uniform": ``arange(0, 1000, 1000 // steps) + 1``, visited high to low; eta = 0;
  ``alpha_prev`` of the last step is ``alphas_cumprod[0]``.
* PLMS on the raw eps history (last 3 kept): step 0 is a pseudo improved-Euler step (a second model call
  at ``t_next`` on the provisional ``x_prev``), then Adams-Bashforth 2/3/4. The history stores the
  *uncombined* guided eps. This equals diffusers' ``PNDMScheduler(skip_prk_steps=True,
  set_alpha_to_one=False, steps_offset=1)`` (checked in the tests).
* CFG: ``e = e_u + g (e_c - e_u)``; the unconditional half uses the negative-prompt context and the
  *null grounding* tokens (fusers and ScaleU still run on it).
* Alpha: fuser scale 1 for the first ``int(alpha * steps)`` PLMS steps, 0 afterwards (both evaluations
  of the improved-Euler step use step 0's scale).
* MIS: ``n + 1`` branches (full layout, then each instance alone with its caption as prompt) start from
  the same noise and each runs the first ``int(mis * steps)`` steps with its own history; their latents
  are averaged uniformly; sampling continues with branch 0's conditioning *and* branch 0's history.

Speed (results identical to the official order, see ``tests/test_sampler.py``): tokens are computed once
per run and branch; guidance halves and MIS branches run as one batch, chunked to ``max_batch``.
``batched=False`` runs the official order instead (every branch and guidance half separately, tokens
recomputed per call) and serves as the reference in ``instdiff bench``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from instdiff_lib.model.config import DropFlags, ScheduleConfig
from instdiff_lib.model.unet import InstanceUNet

METHODS = ("plms", "ddim")


def alphas_cumprod(cfg: ScheduleConfig) -> torch.Tensor:
    """cumprod(1 - betas) of the config's schedule (:meth:`ScheduleConfig.betas`), in float64, stored as float32."""
    return torch.cumprod(1.0 - cfg.betas(), dim=0).to(torch.float32)


@dataclass
class Schedule:
    """DDIM/PLMS sub-schedule for ``steps`` steps (index i = 0 is the *lowest* timestep)."""

    timesteps: torch.Tensor  # [S] int64, ascending
    alphas: torch.Tensor  # [S] float32, alphas_cumprod[timesteps]
    alphas_prev: torch.Tensor  # [S] float32
    sqrt_one_minus_alphas: torch.Tensor  # [S] float32

    @classmethod
    def make(cls, steps: int, cfg: ScheduleConfig | None = None) -> "Schedule":
        cfg = cfg or ScheduleConfig()
        T = cfg.num_train_timesteps
        if not 1 <= steps < T:  # steps = T would put the last timestep (T - 1) * 1 + 1 = T past the table
            raise ValueError(f"steps must be in [1, {T - 1}], got {steps}")
        ac = alphas_cumprod(cfg)
        # = official range(0, T, T // steps) + 1 whenever steps divides T (50 does); for other step counts
        # the official code overruns the table, we take the first `steps` entries (diffusers "leading").
        ts = torch.arange(steps, dtype=torch.int64) * (T // steps) + 1
        alphas = ac[ts]
        alphas_prev = torch.cat([ac[:1], ac[ts[:-1]]])
        return cls(ts, alphas, alphas_prev, torch.sqrt(1.0 - alphas))

    def __len__(self) -> int:
        return len(self.timesteps)

    def x_prev(self, x: torch.Tensor, e: torch.Tensor, index: int) -> torch.Tensor:
        """Deterministic DDIM update (eta = 0) with the coefficients of sub-step ``index``."""
        a_t, a_prev = self.alphas[index].item(), self.alphas_prev[index].item()
        c = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731  float32 like the official torch.full
        pred_x0 = (x - c(self.sqrt_one_minus_alphas[index].item()).to(x) * e) / c(a_t).sqrt().to(x)
        return c(a_prev).sqrt().to(x) * pred_x0 + (1.0 - c(a_prev)).sqrt().to(x) * e


def gate_schedule(steps: int, alpha: float) -> list[int]:
    """Official ``alpha_generator(steps, [alpha, 0, 1 - alpha])``: int(alpha*steps) ones, then zeros."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    n_on = int(alpha * steps)
    return [1] * n_on + [0] * (steps - n_on)


def plms_combine(e_t: torch.Tensor, old: list[torch.Tensor]) -> torch.Tensor:
    """Adams-Bashforth combination of the current eps with the history (len(old) >= 1)."""
    if len(old) == 1:
        return (3 * e_t - old[-1]) / 2
    if len(old) == 2:
        return (23 * e_t - 16 * old[-1] + 5 * old[-2]) / 12
    return (55 * e_t - 59 * old[-1] + 37 * old[-2] - 9 * old[-3]) / 24


@dataclass
class Branch:
    """One conditioning: prompt context [B, L, D] and grounding tensors (batch B) for UniFusion."""

    context: torch.Tensor
    grounding: dict[str, torch.Tensor]
    objs: torch.Tensor | None = None  # filled once per run
    regions: torch.Tensor | None = None  # instance-masked fusers only: filled once per run


@dataclass
class SamplerStats:
    unet_calls: int = 0  # UNet evaluations counted per sample-batch half (official accounting)
    unet_batches: int = 0  # actual forward passes
    tokenizations: int = 0
    trace: list[dict] = field(default_factory=list)


class Sampler:
    def __init__(self, model: InstanceUNet, schedule_cfg: ScheduleConfig | None = None):
        self.model = model
        self.schedule_cfg = schedule_cfg or model.cfg.schedule

    def sample(self, x_T: torch.Tensor, branches: list[Branch], uc: torch.Tensor, **kw) -> torch.Tensor:
        """Sample latents from ``x_T`` [B, C, H, W]. ``branches[0]`` is the full layout; ``branches[1:]`` are
        the MIS instance branches (ignored when ``mis == 0``). ``uc`` is the negative-prompt context [B, L, D].
        Keywords as :meth:`sample_many`."""
        return self.sample_many([(x_T, branches)], uc, **kw)[0]

    def sample_many(self, jobs: list[tuple[torch.Tensor, list[Branch]]], uc: torch.Tensor, *, steps: int = 50,
                    guidance: float = 7.5, alpha: float = 0.75, mis: float = 0.36, method: str = "plms",
                    drop: DropFlags | None = None, batched: bool = True, max_batch: int | None = None,
                    trace: bool = False, progress: bool = True,
                    stats: SamplerStats | None = None) -> list[torch.Tensor]:
        """Sample several layouts at once: ``jobs`` are ``(x_T, branches)`` pairs as :meth:`sample` takes them (the
        same batch B each), sharing ``uc`` and every sampler setting. Every branch of every job is one more entry of
        the same UNet batches (CPU: fewer, fuller calls), and each job's MIS branches are merged among themselves, so
        each result equals that job sampled alone up to float rounding (exactly, for a single job)."""
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if not 0.0 <= mis < 1.0:
            raise ValueError(f"mis must be in [0, 1), got {mis}")
        if not jobs:
            return []
        if len({x.shape for x, _ in jobs}) > 1:
            shapes = sorted({tuple(x.shape) for x, _ in jobs})
            raise ValueError(f"every job must start from noise of one shape, got {shapes}")
        stats = stats if stats is not None else SamplerStats()
        with torch.no_grad():  # a context, not a decorator: mutmut skips decorated functions
            sched = Schedule.make(steps, self.schedule_cfg)
            gates = gate_schedule(steps, alpha)
            mis_steps = int(steps * mis) if any(len(brs) > 1 for _, brs in jobs) else 0
            groups = [brs if mis_steps > 0 else brs[:1] for _, brs in jobs]  # each job's active branches
            active = [br for g in groups for br in g]
            x_T = jobs[0][0]
            device, dtype = x_T.device, x_T.dtype

            null = self.model.position_net.null_grounding(x_T.shape[0], device=device, seg_size=1)
            null_objs = null_regions = None
            grid = tuple(x_T.shape[-2:])
            if batched:  # tokens (and regions) once per run and branch, not per step
                for br in active:
                    br.objs = self.model.tokenize(br.grounding, drop).to(dtype)
                    br.regions = self.model.regions(br.grounding, drop, grid)
                null_objs = self.model.tokenize(null, drop).to(dtype)
                null_regions = self.model.regions(null, drop, grid)
                stats.tokenizations += len(active) + 1

            cond_cache: dict[bool, tuple] = {}  # merged? -> (contexts, tokens, regions), per phase

            def guided_eps(xs: list[torch.Tensor], brs: list[Branch], t: int, gate: int) -> list[torch.Tensor]:
                if batched:
                    if merged not in cond_cache:  # [cond of every branch | uncond of every branch], built once
                        regions = None
                        if null_regions is not None:
                            regions = torch.cat([br.regions for br in brs] + [null_regions] * len(brs))
                        cond_cache[merged] = (torch.cat([br.context for br in brs] + [uc] * len(brs)),
                                              torch.cat([br.objs for br in brs] + [null_objs] * len(brs)), regions)
                    return self._eps_batched(xs, *cond_cache[merged], t, gate, guidance, max_batch, stats)
                return [self._eps_reference(x, br, uc, null, t, gate, guidance, drop, stats) for x, br in zip(xs, brs)]

            xs = [x.clone() for (x, _), g in zip(jobs, groups) for _ in g]
            history: list[list[torch.Tensor]] = [[] for _ in active]
            sizes = [len(g) for g in groups]
            merged = False
            iterator = range(steps)
            if progress:
                iterator = tqdm(iterator, desc=f"{method} x{len(active)} branch", leave=False)
            for i in iterator:
                if i == mis_steps and len(xs) > len(jobs):  # MIS merge: per job, the mean and branch 0's history
                    starts = [sum(sizes[:j]) for j in range(len(sizes))]
                    xs = [torch.stack(xs[s:s + n]).mean(0) for s, n in zip(starts, sizes)]
                    history, active = [history[s] for s in starts], [active[s] for s in starts]
                    merged = True
                index = steps - 1 - i
                t, t_next = int(sched.timesteps[index]), int(sched.timesteps[max(index - 1, 0)])
                x_in = [x.clone() for x in xs] if trace else None
                n_old = len(history[0])  # all branches share the step count, hence the history length
                e_t = guided_eps(xs, active, t, gates[i])
                if method == "ddim":
                    e_prime = e_t
                elif n_old == 0:  # improved Euler: a second evaluation at t_next on the provisional x_prev
                    provisional = [sched.x_prev(x, e, index) for x, e in zip(xs, e_t)]
                    e_next = guided_eps(provisional, active, t_next, gates[i])
                    e_prime = [(e + en) / 2 for e, en in zip(e_t, e_next)]
                else:
                    e_prime = [plms_combine(e, old) for e, old in zip(e_t, history)]
                xs = [sched.x_prev(x, e, index) for x, e in zip(xs, e_prime)]
                history = [(old + [e])[-3:] for old, e in zip(history, e_t)]
                if trace:
                    stats.trace.append({"step": i, "t": t, "t_next": t_next, "index": index, "gate": gates[i],
                                        "n_old_eps": n_old, "x_in": torch.stack(x_in), "e_t": torch.stack(e_t),
                                        "x_out": torch.stack(xs)})
            return xs

    # ---- eps evaluations -----------------------------------------------------------------------
    def _eps_batched(self, xs, ctx_all, objs_all, regions_all, t, gate, guidance, max_batch,
                     stats) -> list[torch.Tensor]:
        """All branches x both guidance halves in as few UNet calls as ``max_batch`` allows."""
        B = xs[0].shape[0]
        x_all = torch.cat(xs + xs)
        n = x_all.shape[0]
        chunk = max_batch or n
        outs = []
        for s in range(0, n, chunk):
            tt = torch.full((min(chunk, n - s),), t, dtype=torch.int64, device=x_all.device)
            regions = regions_all[s:s + chunk] if regions_all is not None else None
            outs.append(self.model(x_all[s:s + chunk], tt, ctx_all[s:s + chunk], objs_all[s:s + chunk], gate, regions))
            stats.unet_batches += 1
        stats.unet_calls += 2 * len(xs)
        eps = torch.cat(outs)
        e_c, e_u = eps[: n // 2], eps[n // 2:]
        guided = e_u + guidance * (e_c - e_u)
        return [self._as_eps(g, x, t) for g, x in zip(guided.split(B), xs)]

    def _as_eps(self, out: torch.Tensor, x: torch.Tensor, t: int) -> torch.Tensor:
        """The (guided) model output as eps: identity for epsilon models; ``sqrt(a) v + sqrt(1 - a) x`` for v."""
        if self.schedule_cfg.prediction_type == "epsilon":
            return out
        cached = getattr(self, "_acp", None)
        if cached is None or cached[0] is not self.schedule_cfg:  # the 1000-entry table once, not per step
            self._acp = cached = (self.schedule_cfg, alphas_cumprod(self.schedule_cfg))
        a = float(cached[1][t])
        return a ** 0.5 * out + (1.0 - a) ** 0.5 * x

    def _eps_reference(self, x, br, uc, null, t, gate, guidance, drop, stats) -> torch.Tensor:
        """The official order: conditional and unconditional calls separately, tokens recomputed."""
        tt = torch.full((x.shape[0],), t, dtype=torch.int64, device=x.device)
        grid = tuple(x.shape[-2:])
        e_c = self.model(x, tt, br.context, self.model.tokenize(br.grounding, drop).to(x.dtype), gate,
                         self.model.regions(br.grounding, drop, grid))
        e_u = self.model(x, tt, uc, self.model.tokenize(null, drop).to(x.dtype), gate,
                         self.model.regions(null, drop, grid))
        stats.unet_calls += 2
        stats.unet_batches += 2
        stats.tokenizations += 2
        return self._as_eps(e_u + guidance * (e_c - e_u), x, t)
