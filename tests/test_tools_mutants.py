import argparse
import ast
import textwrap

from conftest import load

mut = load("tools.mutants")

SNIPPET = textwrap.dedent('''\
    """Module docstring: 2 + 3, x.mean(dim=-1) * 0.5, q @ k.mT."""
    import torch

    KEYS = [[1.0, -0.5], [0.0, 1.0]]


    def weights(q, k, scale=0.5, seed=0):
        """w = q @ k.transpose(-2, -1) * scale - mean: 1 / N."""
        w = q @ k.transpose(-2, -1) * scale
        w = w - w.mean(dim=-1, keepdim=True)
        if w.dim() != 4:
            raise ValueError(f"expected 4 dimensions, got {w.dim() + 0}")
        print(w.sum() * 2)
        return w ** -0.5 + torch.randn(3, 4)


    def main():
        return weights(1, 2) * 3
    ''')


def mutated_lines(src):
    """(line, kind, the mutated line) of every mutant of src."""
    return [(m.line, m.kind, mut.apply(src, m).splitlines()[m.line - 1].strip()) for m in mut.mutants(src)]


def test_generator_makes_the_formula_mistakes():
    got = set(mutated_lines(SNIPPET))
    expected = [
        (9, "swap operator", "w = q @ k.transpose(-2, -1) / scale"),
        (9, "drop operand", "w = (q @ k.transpose(-2, -1))"),               # a dropped scale
        (9, "transpose product", "w = k.transpose(-2, -1) @ q * scale"),
        (9, "drop transpose", "w = q @ k * scale"),
        (9, "constant", "w = q @ k.transpose(-3, -1) * scale"),              # another axis
        (9, "constant", "w = q @ k.transpose(-2, 1) * scale"),               # -1 -> 1
        (10, "swap operator", "w = w + w.mean(dim=-1, keepdim=True)"),       # a flipped sign
        (10, "drop operand", "w = w"),                                       # the centring dropped
        (10, "rename", "w = w - w.sum(dim=-1, keepdim=True)"),
        (10, "constant", "w = w - w.mean(dim=-2, keepdim=True)"),
        (10, "flip bool", "w = w - w.mean(dim=-1, keepdim=False)"),
        (11, "swap comparison", "if w.dim() == 4:"),
        (11, "constant", "if w.dim() != 5:"),
        (14, "constant", "return w ** 0.5 + torch.randn(3, 4)"),            # ** -0.5 -> ** 0.5
        (14, "constant", "return w ** -1.0 + torch.randn(3, 4)"),
        (14, "swap operator", "return w * -0.5 + torch.randn(3, 4)"),
        (7, "constant", "def weights(q, k, scale=1.0, seed=0):"),
    ]
    for e in expected:
        assert e in got, f"missing mutant {e}"
    # -2 -> 2 is the same axis of a (B, H, N, d) tensor: not a mistake, not generated
    assert (9, "constant", "w = q @ k.transpose(2, -1) * scale") not in got


def test_generator_leaves_docstrings_errors_printing_data_and_main_alone():
    tree = ast.parse(SNIPPET)
    docs = [ast.get_docstring(tree), ast.get_docstring(tree.body[3])]
    found = mut.mutants(SNIPPET)
    assert len(found) > 20
    for m in found:
        new = ast.parse(mut.apply(SNIPPET, m))
        assert [ast.get_docstring(new), ast.get_docstring(new.body[3])] == docs, m
    # line 4: a table of numbers (data); 7: the seed; 12: the error; 13: print; 14: randn's
    # shape; 17-18: main
    lines = mutated_lines(SNIPPET)
    assert not {4, 12, 13, 17, 18} & {line for line, _, _ in lines}
    assert all("seed=0" in text for line, _, text in lines if line == 7)
    assert all("randn(3, 4)" in text for line, _, text in lines if "randn" in text)
    # weights() is only used by main(): the demo; where another file uses it, a formula
    assert {m.demo for m in found} == {True}
    assert {m.demo for m in mut.mutants(SNIPPET, used_elsewhere={"weights"})} == {False}


TOY = textwrap.dedent('''\
    def add(a, b):
        return a + b


    def halve(x):
        return x / 2
    ''')
TOY_TEST = textwrap.dedent('''\
    import importlib, os, sys
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    toy = importlib.import_module("09_toy")


    def test_add():
        assert toy.add(2, 3) == 5


    def test_halve_weakly():
        assert toy.halve(0) == 0          # 0 / 2 = 0 * 2 = 0 // 3 = 0: a weak test
    ''')


def test_verdicts_on_a_toy_module(tmp_path):
    (tmp_path / "09_toy.py").write_text(TOY)
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_09_toy.py").write_text(TOY_TEST)
    args = argparse.Namespace(sample=None, seed=0, skip_defs=mut.SKIP_DEFS, timeout=60)
    name, rows = mut.run_step("09", args, [str(tmp_path)])
    assert name == "09_toy.py"
    verdicts = {(m.line, line): v for m, v, line in rows}
    assert verdicts == {
        (2, "return a - b"): "caught", (2, "return a"): "caught", (2, "return b"): "caught",
        (6, "return x * 2"): "survived", (6, "return x"): "survived",
        (6, "return x / 3"): "survived", (6, "return x / 1"): "survived"}
    assert (tmp_path / "09_toy.py").read_text() == TOY, "the module is restored after each mutant"
