"""Samplers over the σ list: plain functions over a score callable. No Lightning, no Hydra.

``score_fn(x, levels)`` takes a batch ``x`` and a LongTensor ``levels`` of shape [B] (indices into
``sigmas``, 0 = the largest σ) and returns the score ∇ₓ log p_σ(x), shaped like ``x``. Use
``ncsn.nets.score_function(net, sigmas)`` to turn a network into one.

Three samplers walk the σ list from the largest level to the smallest:

* ``ald`` — annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1): T Langevin steps per level.
* ``pc`` — predictor–corrector (Song et al. 2021, score_sde, the VE SDE discretised on our σ list): at each
  level ``n_corrector`` Langevin corrector steps with the signal-to-noise step size, then one reverse-diffusion
  predictor step from σ_i to σ_{i+1}.
* ``cas`` — consistent annealed sampling (Jolicoeur-Martineau et al. 2021, Algorithm 2): each step removes
  the fraction η of the noise and adds back just enough fresh noise that the sample's noise level follows the
  schedule exactly.

Each is ONE per-level update (``ald_level``, ``pc_level``, ``cas_level``: the steps of one level over
pre-drawn noise) plus a coefficient table, packed in a :class:`SamplerPlan`; :func:`run_plan` is the one loop
over levels that every sampler shares, and the CUDA-graph runner of ``ncsn.perf`` captures the same per-level
update (never a second copy of a loop). Every plan states its network evaluations per sample (``plan.nfe``).

Step-size convention (the official code's): at level i ALD's step is α_i = step_lr · σ_i² / σ_L² and one
Langevin step is

    x ← x + α_i · s(x, σ_i) + sqrt(2 α_i) · z,   z ~ N(0, I).

The paper's Algorithm 1 writes x ← x + (α_i/2) s + sqrt(α_i) z, so the paper's ε equals 2 · step_lr:
the paper's toy experiment (ε = 0.1) is ``step_lr=0.05`` here. For images the paper quotes ε = 2e-5
and the official code passes that same number as step_lr to the form above; our image configs follow
the official code (``step_lr=2e-5``).

The loops never synchronise with the host: coefficients are precomputed on the device, nothing calls
``.item()`` or prints per step. ``callback`` (optional) is called after every step with a dict
``{"level": i, "step": t, "sigma": σ_i (0-d tensor), "x": current sample}`` so callers can record
trajectories; ``progress=True`` shows a progress bar over levels. The Langevin noise of a level is drawn
before its steps, one ``randn`` per step in step order, so a seeded ``generator`` gives the same samples on
every path.

Modules: ``plans`` (per-level updates, coefficient tables, settings, NFE), ``run`` (the shared loop and the
samplers as functions).
"""

from ncsn.samplers.plans import (
    DEFAULT_INIT,
    SAMPLER_DEFAULTS,
    SAMPLERS,
    AfterStep,
    Callback,
    LevelUpdate,
    SamplerPlan,
    ScoreFn,
    ald_level,
    ald_plan,
    build_plan,
    cas_level,
    cas_plan,
    check_sampler_settings,
    denoise_step,
    describe_sampler,
    fill_noise,
    initial_samples,
    langevin_step,
    nfe,
    pc_level,
    pc_plan,
    sampler_settings,
    step_sizes,
)
from ncsn.samplers.run import (
    annealed_langevin,
    annealed_langevin_inpaint,
    consistent_annealed,
    inpaint,
    langevin,
    predictor_corrector,
    run_plan,
    sample,
)

__all__ = [
    "DEFAULT_INIT",
    "SAMPLERS",
    "SAMPLER_DEFAULTS",
    "AfterStep",
    "Callback",
    "LevelUpdate",
    "SamplerPlan",
    "ScoreFn",
    "ald_level",
    "ald_plan",
    "annealed_langevin",
    "annealed_langevin_inpaint",
    "build_plan",
    "cas_level",
    "cas_plan",
    "check_sampler_settings",
    "consistent_annealed",
    "denoise_step",
    "describe_sampler",
    "fill_noise",
    "initial_samples",
    "inpaint",
    "langevin",
    "langevin_step",
    "nfe",
    "pc_level",
    "pc_plan",
    "predictor_corrector",
    "run_plan",
    "sample",
    "sampler_settings",
    "step_sizes",
]
