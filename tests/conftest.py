"""Makes the numbered step files importable: `load("02_linear_attention")`."""
import importlib
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def load(name):
    return importlib.import_module(name)


def rand(*shape, seed=0, shift=0.0):
    """A float64 standard normal tensor from its own seeded generator (plus `shift`)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) + shift
