"""``python -m ncsn.metrics score FILE.npz [data=NAME]``: see ``ncsn.metrics.score``."""

import sys

from ncsn.metrics.score import main

sys.exit(main())
