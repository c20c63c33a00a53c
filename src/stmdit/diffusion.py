"""Training objective and dual-guidance sampling.

Training follows PixArt / PixCell: diffusers' ``DDPMScheduler`` with a linear beta schedule
over 1000 steps and epsilon prediction (v prediction, Salimans & Ho 2022, is an option).
Morphology and gene expression are dropped independently (each replaced by its null embedding
with its own probability), and optionally both together (``p_both``), so one model learns the
four conditionals needed for dual classifier-free guidance:

    eps = eps(0, 0) + s_m * (eps(m, 0) - eps(0, 0)) + s_g * (eps(m, g) - eps(m, 0))

Sampling uses ``DPMSolverMultistepScheduler`` (DPM-Solver++, order 2, 20 steps) for latents,
as PixCell, and DDIM with x0 bounded to the data range in pixel space (see :func:`make_sampling_scheduler`);
all guidance branches of a step are computed in one batched forward. With ``precision="bf16"`` that forward
runs under bf16 autocast; the guidance combination and the scheduler stay fp32.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields, replace

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from tqdm.auto import tqdm

from stmdit import defaults
from stmdit.model import STMDiT
from stmdit.precision import autocast

# What the transformer predicts: PixArt's epsilon, or v = sqrt(abar) eps - sqrt(1 - abar) x0.
PREDICTION_TYPES = ("epsilon", "v_prediction")

# PixCell drops its UNI condition with probability 0.1; GE gets the same default.
DEFAULT_P_DROP_MORPHOLOGY = 0.1
DEFAULT_P_DROP_GE = 0.1
# Both together, on top of the independent drops (ModalityDropout).
DEFAULT_P_DROP_BOTH = 0.0


@dataclass
class Condition:
    """The conditioning inputs of a batch. Any field may be None (that modality is absent).

    ``ge_mask`` is True for real genes and False for padding, as in :class:`~stmdit.STMDiT`.
    """

    morphology: torch.Tensor | None = None
    ge: torch.Tensor | None = None
    ge_tokens: torch.Tensor | None = None
    ge_mask: torch.Tensor | None = None

    @property
    def has_morphology(self) -> bool:
        return self.morphology is not None

    @property
    def has_ge(self) -> bool:
        return self.ge is not None or self.ge_tokens is not None

    def _map(self, fn) -> Condition:
        return Condition(
            **{f.name: None if (v := getattr(self, f.name)) is None else fn(v) for f in fields(self)}
        )

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Condition:
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device) if (dtype is None or not t.is_floating_point()) else t.to(device, dtype)

        return self._map(move)

    def repeat(self, n: int) -> Condition:
        """Stack the batch ``n`` times along dim 0 (for batched guidance branches)."""
        return self._map(lambda t: t.repeat(n, *([1] * (t.ndim - 1))))

    def repeat_interleave(self, n: int) -> Condition:
        """Repeat every row ``n`` times (several images per spot)."""
        return self._map(lambda t: t.repeat_interleave(n, dim=0))

    def rows(self, index) -> Condition:
        """The rows ``index`` (a list, slice or boolean mask) of every field."""
        return self._map(lambda t: t[index])

    def without_ge(self) -> Condition:
        return replace(self, ge=None, ge_tokens=None, ge_mask=None)

    def model_kwargs(self) -> dict[str, torch.Tensor | None]:
        return {
            "morphology": self.morphology,
            "ge": self.ge,
            "ge_tokens": self.ge_tokens,
            "ge_mask": self.ge_mask,
        }

    def batch_size(self) -> int | None:
        sizes = {getattr(self, f.name).shape[0] for f in fields(self) if getattr(self, f.name) is not None}
        if len(sizes) > 1:
            raise ValueError(f"condition fields have different batch sizes: {sorted(sizes)}")
        return sizes.pop() if sizes else None


def make_training_scheduler(
    num_train_timesteps: int = 1000, learned_variance: bool = False, prediction_type: str = "epsilon"
) -> DDPMScheduler:
    """PixArt's forward process: linear betas 1e-4..0.02, epsilon prediction by default. The
    samplers built from it (:func:`make_sampling_scheduler`) inherit ``prediction_type``."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}; got {prediction_type!r}")
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=0.02,
        prediction_type=prediction_type,
        variance_type="learned_range" if learned_variance else "fixed_small",
        clip_sample=False,
    )


# Pixel-space x0 bounds: plain clipping, or Imagen's dynamic thresholding (Saharia et al. 2022):
# s = the 99.5th percentile of |x0| per image, at least 1 and at most the cap, and x0 becomes
# clip(x0, -s, s) / s. The cap of 1.5 is DeepFloyd IF's (diffusers' pixel-space cascade).
X0_THRESHOLDS = ("clip", "dynamic")
DYNAMIC_THRESHOLD_PERCENTILE = 0.995
DYNAMIC_THRESHOLD_MAX = 1.5


def make_sampling_scheduler(
    training_scheduler: DDPMScheduler | None = None,
    pixel_space: bool = False,
    x0_threshold: str = defaults.X0_THRESHOLD,
) -> DPMSolverMultistepScheduler | DDIMScheduler:
    """The sampler over the same noise schedule: DPM-Solver++ (order 2) for latents, as PixCell
    samples; DDIM with bounded x0 predictions in pixel space.

    Learned-variance channels are split off before the scheduler sees the prediction, so the
    scheduler is configured for the plain prediction (epsilon or v). Pixel-space data live in
    [-1, 1], so there every step bounds its x0 prediction to that range, ``x0_threshold``:

    * ``"clip"``: clip x0 to [-1, 1] (diffusers' thresholding with ``sample_max_value`` 1,
      which clamps the dynamic scale to exactly 1);
    * ``"dynamic"``: Imagen's dynamic thresholding, x0 clipped to [-s, s] and divided by s,
      s the 99.5th percentile of |x0| per image, kept in [1, 1.5], so a prediction that
      overshoots is pulled in as a whole rather than flattened at the bound.

    The step must then drop what the bound removed. DDIM does: it rebuilds the next sample from
    the bounded x0 and the model's own noise estimate. DPM-Solver++ does not: its data-prediction
    update ``x_s = (sigma_s / sigma_t) x_t + alpha_s (1 - e^-h) x0`` carries ``x_t``, and with it
    a fraction ``e^-h`` of every clipped excess, which then ends as saturated pixels (her2st C4,
    tiny model: 5.4% of pixels at 0 or 255 against 1.1% with DDIM; FD to the real tiles 15x
    lower). Latents have no such bound, so PixCell's solver stays there.
    """
    if x0_threshold not in X0_THRESHOLDS:
        raise ValueError(f"x0_threshold must be one of {X0_THRESHOLDS}; got {x0_threshold!r}")
    # Overrides go in as keyword arguments: from_config drops config keys that the source
    # scheduler left at their defaults (its "_use_default_values"), so a value written into
    # the dict itself could be silently ignored.
    config = (training_scheduler or make_training_scheduler()).config
    if pixel_space:
        return DDIMScheduler.from_config(
            config,
            clip_sample=False,
            thresholding=True,
            sample_max_value=1.0 if x0_threshold == "clip" else DYNAMIC_THRESHOLD_MAX,
            dynamic_thresholding_ratio=DYNAMIC_THRESHOLD_PERCENTILE,
            # From t = 999 in strides DDIM's step also uses ("leading" starts at 950; "linspace"
            # steps 999 -> 949 but then evaluates the model at 946).
            timestep_spacing="trailing",
            set_alpha_to_one=True,
        )
    return DPMSolverMultistepScheduler.from_config(
        config, variance_type=None, algorithm_type="dpmsolver++", solver_order=2
    )


def x0_threshold_of(scheduler) -> str | None:
    """How a sampler bounds its x0 predictions: "clip", "dynamic", or None (no bound)."""
    if not getattr(scheduler.config, "thresholding", False):
        return None
    return "clip" if scheduler.config.sample_max_value <= 1.0 else "dynamic"


@dataclass
class ModalityDropout:
    """Condition dropout for classifier-free guidance: with probability ``p_both`` a sample loses
    both modalities together; otherwise each is dropped independently with its own probability.

    Dual guidance needs the unconditional prediction as much as the single-modality ones (it
    enters with weight 1 - s_m), and independent dropout alone trains it on only p_m * p_g of the
    samples (1% at PixCell's 0.1 each), so ``p_both`` trains it directly, as PixCell's 10% drop of
    its one condition does. Overall, P(morphology dropped) = p_both + (1 - p_both) p_m.
    """

    p_morphology: float = DEFAULT_P_DROP_MORPHOLOGY
    p_ge: float = DEFAULT_P_DROP_GE
    p_both: float = DEFAULT_P_DROP_BOTH

    def __post_init__(self):
        for name in ("p_morphology", "p_ge", "p_both"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1]; got {p}")

    def sample(
        self, batch: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Boolean masks (drop_morphology, drop_ge)."""
        u = torch.rand(2, batch, generator=generator)
        drop_m, drop_g = u[0] < self.p_morphology, u[1] < self.p_ge
        if self.p_both > 0:
            # Drawn after the independent masks, so p_both = 0 repeats earlier runs draw for draw.
            both = torch.rand(batch, generator=generator) < self.p_both
            drop_m, drop_g = drop_m | both, drop_g | both
        return drop_m, drop_g


def _gaussian_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def epsilon_from_prediction(
    scheduler: DDPMScheduler, prediction: torch.Tensor, xt: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """The epsilon a model's output implies: the output itself under epsilon prediction; under
    v prediction, from x_t = sqrt(abar) x0 + sqrt(1 - abar) eps and v = sqrt(abar) eps -
    sqrt(1 - abar) x0, eps = sqrt(abar) v + sqrt(1 - abar) x_t."""
    if scheduler.config.prediction_type == "epsilon":
        return prediction
    alpha_bar = scheduler.alphas_cumprod.to(xt.device)[t].float().view(-1, *([1] * (xt.ndim - 1)))
    return alpha_bar.sqrt() * prediction + (1 - alpha_bar).sqrt() * xt


def variational_bound_term(
    scheduler: DDPMScheduler,
    x0: torch.Tensor,
    xt: torch.Tensor,
    t: torch.Tensor,
    eps: torch.Tensor,
    var_values: torch.Tensor,
) -> torch.Tensor:
    """IDDPM's L_vlb term for the learned-variance channels, in nats per dimension, per sample.

    The model's variance is ``exp(f log beta_t + (1 - f) log beta~_t)`` with ``f = (v + 1) / 2``;
    the mean comes from the (detached) epsilon prediction so that this term trains only the
    variance. KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0; for t = 0 the Gaussian
    negative log-likelihood of x_0 (latents are continuous, so no discretised decoder).
    """
    ac = scheduler.alphas_cumprod.to(x0.device, torch.float64)
    betas = scheduler.betas.to(x0.device, torch.float64)
    ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    # beta~_0 is 0; IDDPM clips its log at beta~_1.
    post_logvar = torch.log(torch.cat([post_var[1:2], post_var[1:]]))
    coef_x0 = betas * ac_prev.sqrt() / (1.0 - ac)
    coef_xt = (1.0 - ac_prev) * (1.0 - betas).sqrt() / (1.0 - ac)

    def at(v: torch.Tensor) -> torch.Tensor:
        return v[t].float().view(-1, *([1] * (x0.ndim - 1)))

    true_mean = at(coef_x0) * x0 + at(coef_xt) * xt
    x0_pred = (xt - at((1 - ac).sqrt()) * eps.detach()) / at(ac.sqrt())
    model_mean = at(coef_x0) * x0_pred + at(coef_xt) * xt
    frac = (var_values.float() + 1) / 2
    model_logvar = frac * at(torch.log(betas)) + (1 - frac) * at(post_logvar)

    kl = _gaussian_kl(true_mean, at(post_logvar), model_mean, model_logvar).flatten(1).mean(1)
    nll = 0.5 * (
        model_logvar
        + (x0 - model_mean) ** 2 * torch.exp(-model_logvar)
        + torch.log(torch.tensor(2 * torch.pi))
    )
    nll = nll.flatten(1).mean(1)
    return torch.where(t == 0, nll, kl)


def training_loss(
    model: STMDiT,
    scheduler: DDPMScheduler,
    x0: torch.Tensor,
    cond: Condition,
    dropout: ModalityDropout,
    generator: torch.Generator | None = None,
    vlb_weight: float = 0.0,
    min_snr_gamma: float | None = None,
) -> dict[str, torch.Tensor]:
    """The MSE of the scheduler's prediction target, epsilon or v (plus ``vlb_weight`` * L_vlb
    for learned-variance models), on one batch.

    ``min_snr_gamma`` weights each sample's epsilon-MSE by min(SNR_t, gamma) / SNR_t (Min-SNR,
    Hang et al. 2023): the nearly clean timesteps, whose denoising is easy and whose gradients
    conflict with the noisy ones, count less, so the global content the noisy steps decide is
    learned in fewer steps. The v error is the epsilon error over sqrt(abar), so on the v-MSE the
    same weighting is min(SNR_t, gamma) / (SNR_t + 1). ``None`` is PixArt's unweighted MSE.
    ``"mse"`` is always unweighted.

    All randomness (timesteps, noise, dropout masks) comes from ``generator`` (a CPU
    generator), so a step is reproducible from its seed alone: this is what makes resume exact.
    Returns ``{"loss", "mse"[, "vlb"]}``.
    """
    b = x0.shape[0]
    t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device, x0.dtype)
    drop_m, drop_g = dropout.sample(b, generator)
    xt = scheduler.add_noise(x0, noise, t)
    kwargs = cond.model_kwargs()
    if not model_has_ge(model):
        if cond.has_ge:
            raise ValueError("the batch carries gene expression but the model has ge_injection='none'")
        drop_g = None
    out = model(
        xt,
        t,
        drop_morphology=drop_m.to(x0.device),
        drop_ge=None if drop_g is None else drop_g.to(x0.device),
        **kwargs,
    )
    c = x0.shape[1]
    pred = out[:, :c]
    v_prediction = scheduler.config.prediction_type == "v_prediction"
    target = scheduler.get_velocity(x0, noise, t) if v_prediction else noise
    per_sample = ((pred.float() - target.float()) ** 2).flatten(1).mean(1)
    mse = per_sample.mean()
    losses = {"mse": mse}
    loss = mse
    if min_snr_gamma is not None:
        alpha_bar = scheduler.alphas_cumprod.to(x0.device)[t]
        snr = alpha_bar / (1 - alpha_bar)
        loss = (per_sample * snr.clamp(max=min_snr_gamma) / (snr + 1 if v_prediction else snr)).mean()
    if model_learns_variance(model) and vlb_weight > 0:
        eps = epsilon_from_prediction(scheduler, pred.float(), xt.float(), t)
        vlb = variational_bound_term(scheduler, x0.float(), xt.float(), t, eps, out[:, c:]).mean()
        losses["vlb"] = vlb
        loss = loss + vlb_weight * vlb
    losses["loss"] = loss
    return losses


def loss_name(min_snr_gamma: float | None = None, prediction_type: str = "epsilon") -> str:
    """What :func:`training_loss` returns as ``"loss"`` (for plot axes)."""
    target = "v" if prediction_type == "v_prediction" else "epsilon"
    if min_snr_gamma is None:
        return f"training loss ({target} MSE)"
    return f"training loss (Min-SNR-weighted {target} MSE, gamma {min_snr_gamma:g})"


def _config(model) -> dict:
    # Works on a bare STMDiT and on one wrapped by DDP / accelerate.
    return getattr(model, "module", model).config


def model_has_ge(model) -> bool:
    return _config(model).ge_injection != "none"


def model_learns_variance(model) -> bool:
    cfg = _config(model)
    return cfg.out_channels == 2 * cfg.in_channels


def guidance_branches(cond: Condition, model_has_ge_pathway: bool) -> list[tuple[bool, bool]]:
    """(drop_morphology, drop_ge) for each forward a guided step needs, in formula order.

    both given        -> [(0,0), (m,0), (m,g)]
    morphology only   -> [(0,0), (m,0)]
    GE only           -> [(0,0), (0,g)]
    nothing           -> [(0,0)]
    """
    has_m = cond.has_morphology
    has_g = cond.has_ge and model_has_ge_pathway
    if has_m and has_g:
        return [(True, True), (False, True), (False, False)]
    if has_m:
        return [(True, True), (False, True)]
    if has_g:
        return [(True, True), (True, False)]
    return [(True, True)]


def combine_guidance(
    preds: list[torch.Tensor], branches: list[tuple[bool, bool]], s_m: float, s_g: float
) -> torch.Tensor:
    """Apply the nested dual-guidance formula to the branch predictions."""
    if len(preds) == 3:
        e00, em0, emg = preds
        return e00 + s_m * (em0 - e00) + s_g * (emg - em0)
    if len(preds) == 2:
        e00, e1 = preds
        scale = s_m if branches[1] == (False, True) else s_g
        return e00 + scale * (e1 - e00)
    return preds[0]


@torch.no_grad()
def guided_prediction(
    model: STMDiT,
    x: torch.Tensor,
    t: torch.Tensor,
    cond: Condition,
    guidance_morph: float = defaults.GUIDANCE_MORPH,
    guidance_ge: float = defaults.GUIDANCE_GE,
    precision: str = "fp32",
) -> torch.Tensor:
    """The guided prediction (epsilon or v, as the model was trained) for a batch of latents,
    all branches in one forward (in ``precision``); guidance is linear, so it applies to either."""
    has_ge_pathway = model_has_ge(model)
    if cond.has_ge and not has_ge_pathway:
        raise ValueError("gene expression was given but the model has ge_injection='none'")
    branches = guidance_branches(cond, has_ge_pathway)
    n, b = len(branches), x.shape[0]
    drops = torch.tensor(branches, device=x.device).repeat_interleave(b, dim=0)
    with autocast(precision, x.device):
        out = model(
            x.repeat(n, 1, 1, 1),
            torch.as_tensor(t, device=x.device).expand(n * b),
            drop_morphology=drops[:, 0],
            drop_ge=drops[:, 1] if has_ge_pathway else None,
            **cond.repeat(n).model_kwargs(),
        )
    pred = out[:, : x.shape[1]].to(x.dtype)
    return combine_guidance(list(pred.chunk(n)), branches, guidance_morph, guidance_ge)


def initial_noise(
    shape: tuple[int, ...], generator: torch.Generator | list[torch.Generator] | None
) -> torch.Tensor:
    """Standard normal noise on the CPU from one generator, or one generator per row."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
        return torch.stack([torch.randn(shape[1:], generator=g, dtype=torch.float32) for g in generator])
    return torch.randn(shape, generator=generator, dtype=torch.float32)


@torch.no_grad()
def sample(
    model: STMDiT,
    scheduler: DPMSolverMultistepScheduler | DDIMScheduler,
    cond: Condition,
    num_images: int | None = None,
    guidance_morph: float = defaults.GUIDANCE_MORPH,
    guidance_ge: float = defaults.GUIDANCE_GE,
    num_inference_steps: int = defaults.STEPS,
    generator: torch.Generator | list[torch.Generator] | None = None,
    latents: torch.Tensor | None = None,
    strength: float = 1.0,
    progress: bool | Callable[[Iterable], Iterable] = True,
    guidance_ge_interval: tuple[float, float] | None = None,
    precision: str = "fp32",
) -> torch.Tensor:
    """Draw latents for every row of ``cond`` (or ``num_images`` unconditional ones).

    ``generator`` may be one generator for the batch or one per row; per-row generators make
    each image independent of how spots are batched (paired counterfactuals rely on this).

    With ``strength < 1`` and ``latents`` given, sampling starts from ``latents`` noised to
    that fraction of the schedule (SDEdit), which keeps the layout of a real tile.

    ``guidance_ge_interval = (low, high)`` applies the GE guidance only at noise levels
    ``low < sigma_t <= high`` (interval guidance, Kynkäänniemi et al. 2024), with
    ``sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)``; elsewhere the GE scale is 1 (the GE
    condition without extrapolation), so high-noise steps do not push layout away from realism.

    ``progress``: show a bar over the steps, or a callable that wraps the steps in one (the
    pipeline passes diffusers' ``progress_bar``, so ``set_progress_bar_config`` applies).

    ``precision`` (``auto``, ``fp32`` or ``bf16``; see :mod:`stmdit.precision`) is the
    transformer's compute precision; latents and the scheduler stay in the weights' dtype.
    """
    if guidance_ge_interval is not None and not 0 <= guidance_ge_interval[0] < guidance_ge_interval[1]:
        raise ValueError(
            f"guidance_ge_interval must be (low, high) with 0 <= low < high; got {guidance_ge_interval}"
        )
    cfg = _config(model)
    batch = cond.batch_size()
    if batch is None:
        if num_images is None:
            raise ValueError("give num_images when no condition is given")
        batch = num_images
    elif num_images is not None and num_images != batch:
        raise ValueError(f"num_images ({num_images}) differs from the condition's batch size ({batch})")
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1]; got {strength}")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    shape = (batch, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    cond = cond.to(device, dtype)

    base = getattr(model, "module", model)
    if hasattr(base, "check_inputs"):
        # Check shapes once, at the user's batch size, before guidance multiplies the batch.
        base.check_inputs(torch.empty(shape, device=device), 0, **cond.model_kwargs())
    scheduler.set_timesteps(num_inference_steps, device=device)
    timesteps = scheduler.timesteps
    noise = initial_noise(shape, generator).to(device, dtype)
    if strength < 1.0:
        if latents is None:
            raise ValueError("strength < 1 edits given latents: pass latents")
        if tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}; got {tuple(latents.shape)}")
        start = int(round(num_inference_steps * (1.0 - strength)))
        timesteps = timesteps[start:]
        if len(timesteps) == 0:
            raise ValueError(f"strength {strength} leaves no denoising step at {num_inference_steps} steps")
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(start)
        x = scheduler.add_noise(latents.to(device, dtype), noise, timesteps[:1].expand(batch))
    else:
        x = noise * scheduler.init_noise_sigma
    steps = (
        progress(timesteps)
        if callable(progress)
        else tqdm(timesteps, desc="sampling", disable=not progress, leave=False)
    )
    for t in steps:
        x_in = scheduler.scale_model_input(x, t)
        s_g = guidance_ge
        if (
            guidance_ge_interval is not None
            and not guidance_ge_interval[0] < noise_level(scheduler, t) <= guidance_ge_interval[1]
        ):
            s_g = 1.0
        pred = guided_prediction(model, x_in, t, cond, guidance_morph, s_g, precision)
        x = scheduler.step(pred, t, x).prev_sample
    return x


def noise_level(scheduler, t) -> float:
    """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t): the noise-to-signal ratio in which
    guidance intervals are given (EDM's sigma of the equivalent variance-exploding process)."""
    alpha_bar = float(scheduler.alphas_cumprod[int(t)])
    return ((1.0 - alpha_bar) / alpha_bar) ** 0.5
