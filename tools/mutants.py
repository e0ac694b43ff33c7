"""Formula mutants of steps 01-05: does a student's mistake make the step's tests fail?

One change at a time in a step file: + <-> -, * <-> /, ** -> *, < <-> <=, > <-> >=, == <-> !=,
+= <-> -=; an operand dropped (a - b -> a, a * s -> a); a @ b -> b @ a; .mT, .transpose() dropped;
.mean <-> .sum, .max <-> .min; an int (axis, index, size) +-1, a float x2 and /2, a literal's sign
(x ** -0.5 -> x ** 0.5, dim=-1 -> 1; not -2 -> 2: the same axis of (B, H, N, d)); keepdim flipped.
Left alone: docstrings, f-strings, print, argparse, errors, main() and plotting, and data: random
tensors' shapes and seeds, `seed=` defaults, literal tables of numbers. What only main() needs is
"demo", counted apart from the "formulas" (the rest: what other files build on).

Each mutant goes into a temporary copy of the repository (never the working tree), and the step's
tests that run its lines (traced once, unmutated) run on it: pytest -x, in a child forked from
this process (torch imported once). A test fails: "caught".

    python tools/mutants.py                                 # steps 01-05, every mutant
    python tools/mutants.py --step 03 --sample 80 --seed 0 --jobs 2
"""
import argparse, ast, glob, io, json, os, random, re  # noqa: E401
import shutil, signal, sys, tempfile, threading, tokenize  # noqa: E401
from collections import namedtuple

import pytest
import torch  # noqa: F401  imported once, here: every forked test run starts with it

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
Mutant = namedtuple("Mutant", "start end text kind line end_line demo")  # start, end: characters
SWAP = {ast.Add: "-", ast.Sub: "+", ast.Mult: "/", ast.Div: "*", ast.FloorDiv: "/", ast.Pow: "*",
        ast.BitAnd: "|", ast.BitOr: "&", ast.Lt: "<=", ast.LtE: "<", ast.Gt: ">=", ast.GtE: ">",
        ast.Eq: "!=", ast.NotEq: "=="}
KEEP = {ast.Sub: "l", ast.Div: "l", ast.Add: "lr", ast.Mult: "lr"}  # the operand left standing
RENAME = {"mean": "sum", "sum": "mean", "max": "min", "min": "max", "add_": "sub_", "mul_": "div_"}
SKIP_CALLS = {"print", "add_argument", "ArgumentParser", "error", "randn", "rand", "manual_seed"}
SKIP_DEFS = r"main|plot_\w*|save_png|fwd_bwd_ms"  # the demo's printout, figures and timing
NOT_OPS = {"(", ")", "[", "]", "{", "}", ",", ":", ".", ";", "=", "...", "->"}


def number(n):
    """The value of a numeric literal (2, -0.5), else None."""
    if isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.USub):
        v = number(n.operand) if isinstance(n.operand, ast.Constant) else None
        return None if v is None else -v
    return n.value if type(getattr(n, "value", None)) in (int, float) else None


def is_table(n):
    """A literal list or tuple of numbers (or of such lists): data, e.g. an example's keys."""
    return isinstance(n, (ast.List, ast.Tuple)) and all(
        number(e) is not None or is_table(e) for e in n.elts)


def demo_lines(tree, used_elsewhere):
    """The lines of the top-level definitions that only main() needs (and no other file uses)."""
    tops = {getattr(n, "name", None) or ast.unparse(n.targets[0]): n for n in tree.body
            if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.Assign))}
    uses = {k: {getattr(x, "id", None) or x.attr for x in ast.walk(n)
                if isinstance(x, (ast.Name, ast.Attribute))} for k, n in tops.items()}
    demo, new = set(), {"main"}
    while new:
        demo |= new
        new = {k for k in tops if k not in demo | used_elsewhere
               and any(k in uses.get(d, ()) for d in demo)
               and not any(k in uses[u] for u in tops if u not in demo and u != k)}
    return {i for k in demo & set(tops) for i in range(tops[k].lineno, tops[k].end_lineno + 1)}


def mutants(src, used_elsewhere=(), skip_defs=SKIP_DEFS):
    """Every mutant of the source `src`: Mutant(start, end, new text, kind, lines, demo?)."""
    tree, lines, starts = ast.parse(src), src.splitlines(keepends=True), [0]
    for line in lines:
        starts.append(starts[-1] + len(line))

    def span(n):  # ast counts columns in UTF-8 bytes
        at = lambda row, col: starts[row - 1] + len(lines[row - 1].encode()[:col].decode())  # noqa
        return at(n.lineno, n.col_offset), at(n.end_lineno, n.end_col_offset)

    def text(n, paren=False):
        t = src[slice(*span(n))]
        simple = (ast.Name, ast.Attribute, ast.Call, ast.Subscript)
        return t if not paren or isinstance(n, simple) else f"({t})"

    tokens = [t for t in tokenize.generate_tokens(io.StringIO(src).readline)
              if t.type == tokenize.OP and t.string not in NOT_OPS]
    ops = [(starts[t.start[0] - 1] + t.start[1], starts[t.end[0] - 1] + t.end[1]) for t in tokens]
    op = lambda a, b: next((s, e) for s, e in ops if s >= span(a)[1] and e <= span(b)[0])  # noqa
    seeds = {id(d) for f in ast.walk(tree) if isinstance(f, ast.arguments)  # def f(seed=0): data
             for a, d in zip((f.args + f.kwonlyargs)[::-1], (f.defaults + f.kw_defaults)[::-1])
             if a.arg == "seed"}
    demo, out = demo_lines(tree, set(used_elsewhere)), []

    def add(n, where, new, kind):
        out.append(Mutant(*where, new, kind, n.lineno, n.end_lineno, n.lineno in demo))

    def visit(n):
        func = getattr(n, "func", None)
        name = getattr(n, "name", None) or getattr(func, "attr", None) or getattr(func, "id", None)
        if isinstance(n, (ast.JoinedStr, ast.Raise, ast.Assert, ast.Import, ast.ImportFrom)) or \
                isinstance(n, (ast.FunctionDef, ast.ClassDef)) and re.fullmatch(skip_defs, name) \
                or isinstance(n, ast.Call) and name in SKIP_CALLS or is_table(n) or id(n) in seeds \
                or isinstance(n, ast.If) and "__main__" in ast.unparse(n.test):
            return
        v = number(n)
        if v is not None:
            new = [v + 1, v - 1] if isinstance(v, int) else [v * 2, v / 2] if v else [1.0]
            for x in new + ([-v] if v < 0 and v != -2 else []):
                add(n, span(n), repr(x), "constant")
            return
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.USub):
            add(n, span(n), text(n.operand, paren=True), "flip sign")
        elif isinstance(n, ast.BinOp):
            if type(n.op) in SWAP:
                add(n, op(n.left, n.right), SWAP[type(n.op)], "swap operator")
            if isinstance(n.op, ast.MatMult):
                swapped = f"{text(n.right, True)} @ {text(n.left, True)}"
                add(n, span(n), swapped, "transpose product")
            for kept in KEEP.get(type(n.op), ""):
                add(n, span(n), text(n.left if kept == "l" else n.right, True), "drop operand")
        elif isinstance(n, ast.Compare):
            for a, o, b in zip([n.left] + n.comparators, n.ops, n.comparators):
                if type(o) in SWAP:
                    add(n, op(a, b), SWAP[type(o)], "swap comparison")
        elif isinstance(n, ast.AugAssign) and type(n.op) in KEEP:
            add(n, op(n.target, n.value), SWAP[type(n.op)] + "=", "swap operator")
        elif isinstance(n, ast.Attribute) and n.attr in RENAME:
            add(n, (span(n)[1] - len(n.attr), span(n)[1]), RENAME[n.attr], "rename")
        elif isinstance(n, ast.Attribute) and n.attr in ("mT", "T"):
            add(n, span(n), text(n.value), "drop transpose")
        elif isinstance(func, ast.Attribute) and name in ("transpose", "t"):
            add(n, span(n), text(func.value), "drop transpose")
        elif isinstance(n, ast.keyword) and isinstance(getattr(n.value, "value", None), bool):
            add(n.value, span(n.value), repr(not n.value.value), "flip bool")
        for child in ast.iter_child_nodes(n):
            visit(child)

    visit(tree)
    return [m for m in out if parses_differently(apply(src, m), ast.dump(tree))]


def parses_differently(src, dump):
    try:
        return ast.dump(ast.parse(src)) != dump
    except SyntaxError:
        return False


def apply(src, m):
    return src[:m.start] + m.text + src[m.end:]


class Trace:
    """A pytest plugin: the lines of the file `name` that each test runs ("": at collection)."""

    def __init__(self, name):
        self.name, self.order, self.lines = os.sep + name, [""], {}

    def pytest_configure(self, config):
        sys.settrace(self.tracer), threading.settrace(self.tracer)

    def tracer(self, frame, event, arg):
        return self.line if frame.f_code.co_filename.endswith(self.name) else None

    def line(self, frame, event, arg):
        self.lines.setdefault(self.order[-1], set()).add(frame.f_lineno)
        return self.line

    def pytest_runtest_setup(self, item):
        self.order.append(item.nodeid)


def fork_pytest(cwd, args, timeout, trace=None):
    """The pid of a child that runs `pytest -x args` in cwd and exits with its status (1: a test
    failed, 2: the tests did not import), or SIGALRM after `timeout` seconds; with a Trace
    plugin, it saves the lines each test ran to cwd/trace.json."""
    pid = os.fork()
    if pid:
        return pid
    rc = 3
    try:
        os.chdir(cwd)
        signal.alarm(int(timeout))
        sys.dont_write_bytecode = True  # no .pyc of one mutant for the next to load
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1), os.dup2(1, 2)
        plugins = [trace] if trace else []
        rc = int(pytest.main(["-x", "-q", "-p", "no:cacheprovider", *args], plugins))
        if trace:
            with open("trace.json", "w") as f:
                json.dump({"order": trace.order,
                           "lines": {t: sorted(v) for t, v in trace.lines.items()}}, f)
    finally:
        os._exit(rc)


def verdict(status):
    rc = os.waitstatus_to_exitcode(status)
    if rc not in (0, 1, 2, -signal.SIGALRM):
        raise RuntimeError(f"pytest exited with {rc}: run the step's tests by hand")
    return {0: "survived", -signal.SIGALRM: "timeout"}.get(rc, "caught")


def run_step(step, args, copies):
    """(step file, [(mutant, verdict, mutated line)]), len(copies) mutants at a time."""
    step_file = os.path.basename(glob.glob(os.path.join(copies[0], f"{step}_*.py"))[0])
    test_file = os.path.join("tests", os.path.basename(
        glob.glob(os.path.join(copies[0], "tests", f"test_{step}_*.py"))[0]))
    with open(os.path.join(copies[0], step_file)) as f:
        src = f.read()
    others = set()  # the names other files use as step.name
    for path in glob.glob(os.path.join(copies[0], "**", "*.py"), recursive=True):
        if not re.match(rf"tests|{step_file}", os.path.relpath(path, copies[0])):
            with open(path) as f:
                tree = ast.parse(f.read())
            others |= {x.attr for x in ast.walk(tree) if isinstance(x, ast.Attribute)}
    todo = mutants(src, others, args.skip_defs)
    todo = sorted(random.Random(args.seed).sample(todo, min(args.sample or len(todo), len(todo))))
    if verdict(os.waitpid(fork_pytest(copies[0], [test_file], 3600, Trace(step_file)), 0)[1]) \
            != "survived":
        sys.exit(f"{test_file} fails on the unmutated {step_file}: fix that first")
    with open(os.path.join(copies[0], "trace.json")) as f:
        trace = json.load(f)
    running, results = {}, []
    while todo or running:
        while todo and len(running) < len(copies):  # the next mutant into a free copy
            busy = [cwd for _, cwd in running.values()]
            m, cwd = todo.pop(0), next(c for c in copies if c not in busy)
            with open(os.path.join(cwd, step_file), "w") as f:
                f.write(apply(src, m))
            lines = set(range(m.line, m.end_line + 1))
            tests = [t for t in trace["order"] if lines & set(trace["lines"].get(t, ()))]
            tests = [test_file] if tests[:1] in ([], [""]) else tests  # "": at import: all tests
            running[fork_pytest(cwd, tests, args.timeout)] = m, cwd
        pid, status = os.wait()
        m, cwd = running.pop(pid)
        with open(os.path.join(cwd, step_file), "w") as f:
            f.write(src)
        results.append((m, verdict(status), apply(src, m).splitlines()[m.line - 1].strip()))
        print(f"  [{len(results)}/{len(results) + len(running) + len(todo)}] {results[-1][1]:8s}"
              f" {step}:{m.line} {m.kind}: {results[-1][2]}", file=sys.stderr, flush=True)
    return step_file, sorted(results)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__[__doc__.index(
        "\n"):], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--step", nargs="+", default=["01", "02", "03", "04", "05"], help="steps")
    p.add_argument("--sample", type=int, help="at most this many mutants per step, at random")
    p.add_argument("--seed", type=int, default=0, help="seed of --sample")
    p.add_argument("--jobs", type=int, default=1, help="mutants tested at a time")
    p.add_argument("--timeout", type=int, default=300, help="seconds per mutant (then: caught)")
    p.add_argument("--skip-defs", default=SKIP_DEFS, help="regex of the functions never mutated")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mutants_") as tmp:
        copies = [os.path.join(tmp, str(j)) for j in range(args.jobs)]
        for c in copies:  # the .py files and pytest.ini: no venv, no __pycache__
            shutil.copytree(ROOT, c, ignore=lambda d, names: [n for n in names if not (
                n.endswith((".py", ".ini")) or d == ROOT and n in ("tests", "tools"))])
        results = {step: run_step(step, args, copies) for step in args.step}
    print(f"{'step':22s} {'part':8s} {'mutants':>7} {'caught':>6} {'timeout':>7} {'survived':>8}"
          f" {'caught %':>8}")
    for name, rows in results.values():
        for part in ("formulas", "demo"):
            v = [v for m, v, _ in rows if m.demo == (part == "demo")]
            c, t = v.count("caught"), v.count("timeout")
            print(f"{name[:-3]:22s} {part:8s} {len(v):>7} {c:>6} {t:>7} {len(v) - c - t:>8}"
                  f" {100 * (c + t) / max(len(v), 1):>7.1f}%")
    for name, rows in results.values():
        for m, v, line in rows:
            if v == "survived":
                part = "demo" if m.demo else "formula"
                print(f"survived {name}:{m.line} ({part}) {m.kind}: {line}")
    return results


if __name__ == "__main__":
    main()
