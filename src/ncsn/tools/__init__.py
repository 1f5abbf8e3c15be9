"""The command-line tools, each ``python -m ncsn.tools.<name>``, thin over the core (and the app where they must
build a run's objects from its config): ``convert`` (official checkpoints -> ours; formats in ``official``),
``report`` (a sweep's report; rows from ``report_jobs``), ``sigma_helper`` (``python -m ncsn.sigmas suggest``:
NCSNv2's σ rules for a dataset), ``score`` (``python -m ncsn.metrics score FILE.npz``).

The spellings of earlier releases (before the tools moved here) still run: ``ncsn.moved.OLD_COMMANDS``.
"""
