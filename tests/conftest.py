"""Makes the numbered step files importable: `load("02_linear_attention")`."""
import importlib
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def load(name):
    return importlib.import_module(name)
