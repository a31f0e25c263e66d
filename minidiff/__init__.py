"""minidiff: diffusion models from scratch on NumPy/CuPy, with no autograd anywhere."""

__version__ = "0.1.0"
