"""``python -m ncsn.perf calibrate [key=value ...]``: time PyTorch's CPU kernel sets (AVX2, AVX-512) on the network
of ``train.py [key=value ...]`` (default: the CPU recipe's) and keep the faster in the cache that ``train.py`` and
``sample.py`` read (``ncsn.app.cpu_kernels``)."""

import sys

from ncsn.app.cpu_kernels import main

sys.exit(main(sys.argv[1:]))
