"""The interface every built-in sample-quality metric implements (``ncsn.metrics.quality`` builds them)."""

from __future__ import annotations

import torch

__all__ = ["SampleQuality"]


class SampleQuality:
    """A sample-quality metric of one dataset. Call it on samples; it returns ``{key: float}``.

    ``name``: the primary key (lower is better; its expectation does not depend on the sample count), always in
    the result; ``keys``: every key it returns (all start with ``quality/``); ``description``: one line for logs,
    README and metrics.json; ``num_samples``: the sample count it was built for (any N >= 2 works).
    """

    name: str = "quality/unknown"
    description: str = ""
    keys: tuple[str, ...] = ()
    num_samples: int = 0

    def __call__(self, samples: torch.Tensor) -> dict[str, float]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, num_samples={self.num_samples})"
