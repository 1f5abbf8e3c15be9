"""The Lightning/Hydra application over the core: the only package of ncsn that imports Lightning or Hydra.

``module`` (the LightningModule: DSM training, per-σ validation, the sampling API; ``validation``: its per-σ
validation pass), ``datamodules`` (the Lightning data modules over ``ncsn.data``'s datasets), ``callbacks`` (sample
grid + quality pass, per-σ chart), ``fid_callback`` (``val/fid``), ``ema`` (EMA keeping the raw weights),
``checkpoints`` (safe checkpoint IO, final last.ckpt), ``best_checkpoint``, ``progress`` (one bar over max_steps),
``run_files`` (run record, metrics.json, RNG state), ``provenance``, ``lightning_private`` (every private
Lightning name), ``train`` and ``sample`` (the two applications behind train.py and sample.py), ``common``
(instantiate, user errors, console, the entry-point wrapper), ``command_line`` (pre-checks of the command line,
config composition for the tools), ``cpu_kernels`` + ``cpu_timing`` (the CPU kernel choice made before torch
starts), ``console`` (the closing lines), ``sweeps``.

Nothing is imported here: ``train.py`` imports ``ncsn.app.cpu_kernels`` before torch.
"""
