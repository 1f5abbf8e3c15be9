"""ncsn: Noise Conditional Score Networks (Song & Ermon, 2019) with Lightning and Hydra."""

__version__ = "0.1.0"
