"""``python -m ncsn.metrics score FILE.npz [data=NAME]``: see ``ncsn.tools.score``."""

import sys

from ncsn.tools.score import main

sys.exit(main())
