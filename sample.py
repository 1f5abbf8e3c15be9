"""Sample from a trained checkpoint: python sample.py ckpt_path=RUN/checkpoints/last.ckpt [mode=...]

Composes conf/sample.yaml and calls ncsn.app.sample.sample. See README.md.
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from ncsn.app.command_line import run_entry_point
from ncsn.app.common import user_errors_exit
from ncsn.app.cpu_kernels import apply_for_entry_point

CONF_DIR = Path(__file__).resolve().parent / "conf"
if __name__ == "__main__":  # before anything imports torch, which reads its CPU kernel choice once
    apply_for_entry_point("sample", sys.argv[1:], CONF_DIR)


@hydra.main(version_base="1.3", config_path="conf", config_name="sample")
@user_errors_exit
def main(cfg: DictConfig) -> None:
    from ncsn.app.sample import sample

    sample(cfg)


if __name__ == "__main__":
    run_entry_point(main, CONF_DIR, sys.argv[1:], config_name="sample")
