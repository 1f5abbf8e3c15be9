"""Train a score network: python train.py [experiment=NAME] [group=option ...] [key=value ...]

Without experiment=NAME it runs the GPU recipe (experiment=mnist) where a CUDA GPU is visible and the CPU
recipe (experiment=cpu) otherwise, and says which in one line.

Composes conf/train.yaml and calls ncsn.app.train.train. See README.md.
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
    apply_for_entry_point("train", sys.argv[1:], CONF_DIR)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@user_errors_exit
def main(cfg: DictConfig) -> float | None:
    from ncsn.app.train import train

    return train(cfg)


if __name__ == "__main__":
    run_entry_point(main, CONF_DIR, sys.argv[1:], pick_experiment=True, config_name="train")
