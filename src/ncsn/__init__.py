"""ncsn: Noise Conditional Score Networks (Song & Ermon, 2019) with Lightning and Hydra."""

__version__ = "0.1.0"

from ncsn import moved as _moved

_moved.install()  # the old `python -m ncsn.tools.convert` / `ncsn.tools.report` / `ncsn.tools.sigma_helper` spellings
