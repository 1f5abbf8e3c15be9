"""Lightning behaviour we rebuild from public trainer state instead of calling its private API: pinned here, so a
Lightning upgrade that changes the rule fails a test instead of silently moving our per-step diagnostics."""

from __future__ import annotations

import lightning as L
import pytest
from conftest import ROOT, TINY
from hydra import compose, initialize_config_dir

from ncsn.app import instantiate


class CompareLoggingSteps(L.Callback):
    """At both places ``ScoreModel._logging_step`` is asked (around training_step and before the optimizer step):
    our answer and Lightning's own (private) one; stops training at ``stop_at`` to cover ``should_stop``."""

    def __init__(self, stop_at: int) -> None:
        self.stop_at = stop_at
        self.pairs: list[tuple[int, bool, bool]] = []

    def _compare(self, trainer, pl_module) -> None:
        self.pairs.append((trainer.global_step, pl_module._logging_step(),
                           bool(trainer._logger_connector.should_update_logs)))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.stop_at:
            trainer.should_stop = True
        self._compare(trainer, pl_module)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._compare(trainer, pl_module)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_logging_steps_are_lightnings_should_update_logs(tmp_path, accumulate):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*TINY, f"paths.output_dir={tmp_path}"])
    compare = CompareLoggingSteps(stop_at=7)
    trainer = L.Trainer(max_steps=20, log_every_n_steps=3, accumulate_grad_batches=accumulate, accelerator="cpu",
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[compare])
    trainer.fit(instantiate(cfg.model), datamodule=instantiate(cfg.data))
    assert trainer.global_step < 20  # stopped by should_stop, set at step 7
    assert [ours for _, ours, _ in compare.pairs] == [lightning for _, _, lightning in compare.pairs]
    logged = sorted({step for step, ours, _ in compare.pairs if ours})
    assert logged == [2, 5, 7]  # every 3rd step (1-based) and the one where training stops
