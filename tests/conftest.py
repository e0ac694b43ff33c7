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


def assert_close(actual, expected, formula, atol, rtol=0.0):
    """allclose, with a failure message that names the formula being checked and by how much
    the code misses it, so a student who broke an equation sees which one."""
    import torch
    assert actual.shape == expected.shape, f"{formula}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if not torch.allclose(actual, expected, atol=atol, rtol=rtol):
        diff = float((actual - expected).abs().max())
        raise AssertionError(f"{formula}\n  max |code - formula| = {diff:.3e} > atol {atol:g}")


def png_size(path):
    """(width, height) of a PNG file, read from its header; AssertionError if it is not a PNG."""
    import struct
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", f"{path} is not a PNG file"
    return struct.unpack(">II", head[16:24])


def run_demo(step, argv, capsys):
    """Run step.main(argv); returns (the numbers it returned, what it printed)."""
    numbers = step.main(argv)
    return numbers, capsys.readouterr().out
