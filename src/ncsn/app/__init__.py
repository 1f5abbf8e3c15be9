"""The Lightning/Hydra application over the core: the only package of ncsn whose modules import Lightning or Hydra.

``module`` (the LightningModule: DSM training, the sampling API) with ``validation`` (its per-σ validation pass),
``datamodules`` (the Lightning DataModules over ``ncsn.data``'s datasets), ``callbacks`` (sample grid + quality
pass, per-σ chart), ``fid_callback`` (``val/fid``), ``ema`` (EMA keeping the raw weights), ``checkpoints`` (safe
checkpoint IO, final last.ckpt), ``best_checkpoint``, ``progress`` (one bar over max_steps), ``run_files`` (run
record, metrics.json, RNG state), ``provenance``, ``lightning_private`` (every private Lightning name), ``train``
and ``sample`` (the two applications behind train.py and sample.py), ``common`` (instantiate, user errors, quiet
console, W&B logger), ``command_line`` (the command-line pre-checks, the default experiment, config composition
for the tools), ``console`` (the closing lines of train.py), ``sweeps``, ``cpu_kernels`` + ``cpu_timing`` (the
CPU kernel choice, made before torch starts).

Nothing is imported here: ``train.py`` imports ``ncsn.app.cpu_kernels`` before torch.
"""
