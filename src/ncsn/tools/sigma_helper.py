"""The σ-schedule helper: ``python -m ncsn.sigmas suggest data=<name> steps_each=T [key=value ...]``
(or ``python -m ncsn.tools.sigma_helper suggest ...``: ``ncsn.sigmas`` runs this module; this module imports
``ncsn.sigmas`` when it computes, never the other way round).

Applies the NCSNv2 rules to a dataset of this project's config (``conf/data/<name>.yaml``):

* technique 1: σ_1 = the largest pairwise distance between ``num_points`` training images (model range
  [0, 1], as the network sees them; default: all of them, at most 10,000);
* technique 2: the ratio γ (and so L) for which the technique-2 value is ``target`` (default 0.5; the
  official NCSNv2 configs sit at ≈ 0.567, i.e. a few more levels);
* technique 4: ``step_lr`` for ``steps_each`` Langevin steps per level;

prints a small table and the Hydra overrides to paste after ``python train.py``.

Arguments (``key=value``; any other ``key=value`` such as ``data.image_size=64`` or ``paths.data_dir=/data``
goes to the config composition as a Hydra override):

    data=NAME         a conf/data option (default: mnist_bundled)
    steps_each=T      Langevin steps per noise level (default 5)
    num_points=N      training images used for σ_1 (default: all, at most 10000)
    sigma_min=S       the smallest σ (default 0.01)
    sigma_max=S       skip technique 1 and use this σ_1
    target=P          the technique-2 target (default 0.5)
"""

from __future__ import annotations

import math
import sys
import time

from ncsn.app.command_line import compose_data_config, find_conf_dir
from ncsn.errors import ConfigError, UserError

EXIT_USER_ERROR = 2
DEFAULT_MAX_POINTS = 10_000
# below this many points the largest pairwise distance is noticeably biased low (see the half-sample check)
MIN_STABLE_POINTS = 1_000
OWN_KEYS = ("steps_each", "num_points", "sigma_min", "sigma_max", "target")
USAGE = ("usage: python -m ncsn.sigmas suggest data=<name> steps_each=T [num_points=N] [sigma_min=0.01] "
         "[sigma_max=S] [target=0.5] [data.<key>=...] [paths.data_dir=...]")


def parse_args(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """Split ``key=value`` arguments into this tool's own settings and Hydra overrides."""
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        raise SystemExit(0)
    if argv[0] != "suggest":
        raise UserError(f"unknown command {argv[0]!r}; {USAGE}")
    own: dict[str, str] = {}
    overrides: list[str] = []
    for arg in argv[1:]:
        if "=" not in arg:
            raise UserError(f"expected key=value, got {arg!r}; {USAGE}")
        key, value = arg.split("=", 1)
        if key in OWN_KEYS:
            own[key] = value
        else:
            overrides.append(arg)
    return own, overrides


def _number(own: dict[str, str], key: str, kind: type, default):
    if key not in own:
        return default
    try:
        value = kind(own[key])
    except ValueError:
        raise UserError(f"{key} must be a {'whole number' if kind is int else 'number'} (got {own[key]!r})") from None
    return value


def check_own_settings(steps_each: int, num_points: int | None, sigma_min: float, sigma_max: float | None,
                       target: float) -> None:
    """This tool's own settings, checked before any data is read (each by the name the user typed)."""
    if steps_each < 1:
        raise UserError(f"steps_each must be a whole number >= 1 (got {steps_each})")
    if num_points is not None and num_points < 2:
        raise UserError(f"num_points must be >= 2 (got {num_points})")
    if not (math.isfinite(sigma_min) and sigma_min > 0):
        raise UserError(f"sigma_min must be > 0 and finite (got {sigma_min:g})")
    if sigma_max is not None and not (math.isfinite(sigma_max) and sigma_max > sigma_min):
        raise UserError(f"sigma_max must be finite and larger than sigma_min={sigma_min:g} (got {sigma_max:g})")
    if not 0.0 < target < 1.0:
        raise UserError(f"target must lie strictly between 0 and 1 (got {target:g}); NCSNv2 uses 0.5")


def suggest_main(argv: list[str]) -> None:
    from ncsn.app.common import instantiate
    from ncsn.sigmas import largest_pairwise_distance, suggest_schedule

    own, overrides = parse_args(argv)
    steps_each = _number(own, "steps_each", int, 5)
    num_points = _number(own, "num_points", int, None)
    sigma_min = _number(own, "sigma_min", float, 0.01)
    sigma_max = _number(own, "sigma_max", float, None)
    target = _number(own, "target", float, 0.5)
    check_own_settings(steps_each, num_points, sigma_min, sigma_max, target)

    conf_dir = find_conf_dir()
    name, data_cfg = compose_data_config(conf_dir, overrides)
    datamodule = instantiate(data_cfg)
    datamodule.setup("fit")
    total = len(datamodule.train_set)
    n = min(total, num_points if num_points is not None else DEFAULT_MAX_POINTS)
    start = time.perf_counter()
    x = datamodule.sample_batch(n)
    dim = int(x[0].numel())
    shape = tuple(x.shape[1:])
    lines = [f"data: {name}, {total} training examples of shape {shape} (D = {dim}), model range [0, 1]"]
    if sigma_max is None:
        sigma_max = largest_pairwise_distance(x)
        half = largest_pairwise_distance(x[: max(2, n // 2)])
        lines.append(f"technique 1: sigma_1 = largest pairwise distance over {n} of {total} training points "
                     f"= {sigma_max:.4g} ({time.perf_counter() - start:.1f} s; over the first {max(2, n // 2)}: "
                     f"{half:.4g}, {100 * (sigma_max - half) / sigma_max:.1f}% lower)")
        if n < min(total, MIN_STABLE_POINTS):
            lines.append(f"warning: {n} points may underestimate sigma_1; use num_points>={MIN_STABLE_POINTS} "
                         "(or all) for a stable value")
    else:
        lines.append(f"technique 1 skipped: sigma_1 = {sigma_max:g} (given)")
    try:
        s = suggest_schedule(None, sigma_max=sigma_max, sigma_min=sigma_min, n_steps_each=steps_each,
                             dim=dim, target=target)
    except ConfigError as exc:
        raise UserError(str(exc)) from exc
    table = [
        ("sigma_1 (sigma_max)", f"{s.sigma_max:.4g}"),
        ("sigma_L (sigma_min)", f"{s.sigma_min:g}"),
        ("L (num_scales)", f"{s.num_scales}"),
        ("gamma (sigma_i-1 / sigma_i)", f"{s.ratio:.5f}"),
        (f"technique-2 value (target {target:g})", f"{s.technique2:.4f}"),
        ("step_lr (technique 4)", f"{s.step_lr:.3g}"),
        ("T (n_steps_each)", f"{s.n_steps_each}"),
        ("sampling steps L*T", f"{s.num_scales * s.n_steps_each}"),
    ]
    width = max(len(k) for k, _ in table)
    lines.append("")
    lines += [f"  {k:<{width}}  {v}" for k, v in table]
    lines += ["", "Hydra overrides (paste after `python train.py`):", s.overrides()]
    if not math.isclose(target, 0.5):
        lines.insert(-2, f"(technique-2 target {target:g})")
    print("\n".join(lines), flush=True)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        suggest_main(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USER_ERROR) from None


if __name__ == "__main__":
    main()
