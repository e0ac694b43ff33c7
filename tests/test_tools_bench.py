"""tools/bench.py: what it measures and prints, on tiny sizes. No test asserts a speed: the clock
is replaced where a test needs known times."""
import statistics
import types

import pytest
import torch

from conftest import load

bench = load("tools.bench")
deit = load("06_train_deit")

TINY_MODULES = ["modules", "--sizes", "17", "--batch", "1", "--rounds", "2", "--min-time", "0.01"]
TINY_MODEL = ["model", "--img-size", "32", "--depth", "1", "--embed-dim", "24", "--batch", "2",
              "--rounds", "2", "--min-time", "0.01", "--warmup", "1"]


class FakeTimer:
    """Stands in for torch.utils.benchmark.Timer without running anything: records each call in
    `log` and reports median(fn, i) seconds per call at its i-th call (i = 0, 1, ...)."""

    def __init__(self, fn, log, median):
        self.fn, self.log, self.median, self.calls = fn, log, median, 0

    def blocked_autorange(self, min_run_time):
        self.log.append(self.fn)
        self.calls += 1
        return types.SimpleNamespace(median=self.median(self.fn, self.calls - 1))


def fake_clock(monkeypatch, median):
    """Replace the tool's timers by FakeTimers; returns the log of the closures timed, in order."""
    log = []
    monkeypatch.setattr(bench, "make_timer", lambda fn: FakeTimer(fn, log, median))
    return log


def cells(text):
    """The numbers of 'median [min - max]' cells in a line of the tables."""
    return [float(t) for t in text.replace("[", " ").replace("]", " ").replace(" - ", " ").split()]


# ----------------------------------------------------------------------------------------------
# the measurements


def test_peak_memory_sees_a_large_allocation():
    def alloc():
        t = torch.ones(64 * 2**20 // 4)  # 64 MiB, freed before the 32 MiB below
        del t
        u = torch.ones(32 * 2**20 // 4)
        return float(u.sum())
    peak = bench.peak_memory(alloc)
    assert 64 * 2**20 <= peak < 70 * 2**20, f"peak {peak / 2**20:.1f} MiB, expected 64 MiB"
    assert bench.peak_memory(lambda: None) < 2**20


def test_make_timer_runs_the_closure_on_torchs_threads():
    calls = []
    timer = bench.make_timer(lambda: calls.append(torch.get_num_threads()))
    m = timer.blocked_autorange(min_run_time=0.001)
    assert m.median > 0 and calls and set(calls) == {torch.get_num_threads()}


def test_rounds_interleave_and_ratios_cancel_the_load(monkeypatch):
    # "fast" takes 1 unit and "slow" 2; the machine is 10x slower in round 2. Round r times every
    # closure once, in order; the ratio to the baseline of the same round cancels the load,
    # and the spread of the times flags it
    load = [1.0, 10.0, 1.0]
    log = fake_clock(monkeypatch, lambda units, i: units * load[i])
    res = bench.interleaved({"fast": 1.0, "slow": 2.0}, "fast", rounds=3, min_time=0.2)
    assert log == [1.0, 2.0] * 3
    assert res["fast"]["time"] == [1.0, 10.0, 1.0] and res["slow"]["time"] == [2.0, 20.0, 2.0]
    assert res["slow"]["ratio"] == [2.0, 2.0, 2.0] and res["fast"]["ratio"] == [1.0, 1.0, 1.0]
    assert bench.spread(res["slow"]["time"]) == (2.0, 2.0, 20.0)
    assert bench.unsteady(res) == {"fast": 9.0, "slow": 9.0}
    steady = {"a": {"time": [1.0, 0.96, 1.04]}}
    assert bench.unsteady(steady, limit=0.1) == {} and bench.unsteady(steady, limit=0.05) != {}


# ----------------------------------------------------------------------------------------------
# modules: a row for every attention, ratios to softmax


def test_modules_table_has_every_attention(capsys):
    r = bench.main(TINY_MODULES + ["--profile", "17"])
    out = capsys.readouterr().out
    for title in ("forward + backward", "inference (no grad)"):
        table = out.split(f"N = 17, B = 1, {title}")[1].split("\n\n")[0].splitlines()[2:]
        assert [line.split("|")[0].strip() for line in table] == list(deit.ATTENTIONS)
        for line in table:
            name, ms, ratio, memory = (c.strip() for c in line.split("|"))
            assert len(cells(ms)) == len(cells(ratio)) == 3 and all(v > 0 for v in cells(ms))
            mb, x = memory.split()
            assert float(mb) > 0 and float(x) > 0
            if name == "softmax":  # against itself, every round
                assert cells(ratio) == [1.0, 1.0, 1.0] and x == "1.00"
        final_ratio = cells(table[-1].split("|")[2])[0]
        ratio, mem = r["final"][17, title]
        assert f"{ratio:.3f}" == f"{final_ratio:.3f}" and float(mem) > 0
    assert "The final module / softmax" in out
    assert "Where the final module's time goes at N = 17" in out and "aten::" in out


def test_module_passes_compute_gradients_and_inference():
    passes = bench.module_passes(["softmax", "final"], 17, 2, "cpu")
    grads = passes["forward + backward"]["final"]()
    m = deit.ATTENTIONS["final"](192, num_heads=6)
    assert len(grads) == 1 + len(list(m.parameters())) and grads[0].shape == (2, 17, 192)
    y = passes["inference (no grad)"]["final"]()
    assert y.shape == (2, 17, 192) and not y.requires_grad


# ----------------------------------------------------------------------------------------------
# model: DeiT-T with the chosen attention against softmax DeiT-T


def test_model_table_and_the_optimizer_training_uses(monkeypatch, capsys):
    made, order = [], []
    real_optimizer, real_interleaved = deit.make_optimizer, bench.interleaved

    def spy_optimizer(model, args, device):
        opt = real_optimizer(model, args, device)
        before = [p.detach().clone() for p in model.parameters()]
        made.append((type(model.blocks[0].attn).__name__, len(opt.param_groups),
                     opt.defaults["betas"], model, before))
        return opt

    def spy_interleaved(fns, baseline, rounds, min_time):
        order.append((list(fns), baseline, rounds))
        return real_interleaved(fns, baseline, rounds, min_time)
    monkeypatch.setattr(deit, "make_optimizer", spy_optimizer)
    monkeypatch.setattr(bench, "interleaved", spy_interleaved)
    r = bench.main(TINY_MODEL)
    out = capsys.readouterr().out.splitlines()
    # training's AdamW (weight-decay groups, betas), and its steps ran: the weights moved
    assert [m[:3] for m in made] == [("RankAugmentedInLineAttention", 2, (0.9, 0.999)),
                                     ("SoftmaxAttention", 2, (0.9, 0.999))]
    for *_, model, before in made:
        assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), before))
    # train rounds, then inference rounds, both models in each round
    assert order == [(["final", "softmax"], "softmax", 2)] * 2
    rows = {line.split()[0]: line for line in out if line.count("|") == 2}
    assert list(rows) == ["attention", "final", "softmax"]
    for name, heads in (("final", 6), ("softmax", 3)):
        left, train, infer = rows[name].split("|")
        assert left.split()[1] == str(heads)
        for cell, mode in ((train, "train"), (infer, "infer")):
            img_s = [2 / t for t in r["time"][mode][name]["time"]]  # batch / seconds, per round
            med, lo, hi, mb = cells(cell)
            expected = (statistics.median(img_s), min(img_s), max(img_s))
            assert (med, lo, hi) == pytest.approx(expected, abs=0.051) and mb > 0
    line = next(l for l in out if l.startswith("final / softmax: img/s train x"))
    speed = [1 / x for x in r["time"]["train"]["final"]["ratio"]]
    assert f"train x{bench.cell(speed, fmt='.2f')}" in line and "peak memory train x" in line


@pytest.mark.parametrize("mode", [TINY_MODULES, TINY_MODEL], ids=["modules", "model"])
def test_busy_machine_warning(mode, monkeypatch, capsys):
    fake_clock(monkeypatch, lambda fn, i: 1.0)  # every round alike: no warning
    bench.main(mode)
    assert "warning" not in capsys.readouterr().out
    fake_clock(monkeypatch, lambda fn, i: 1.0 + 0.5 * (i % 2))  # rounds of 1.0 s, then 1.5 s
    bench.main(mode)
    out = capsys.readouterr().out
    assert "warning: timings spread by more than 10% of their median" in out
    assert "softmax 40%" in out  # (1.5 - 1.0) / 1.25


# ----------------------------------------------------------------------------------------------
# the command line and importing


def test_help_says_how_each_figure_is_measured(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    for words in ("blocked_autorange", "profile_memory=True", "max_memory_allocated",
                  "same round", "than 10%", "modules", "model"):
        assert words in out


def test_importing_the_tool_changes_no_process_wide_state():
    import os
    import subprocess
    import sys
    from test_01_softmax_attention import IMPORT_STATE
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", IMPORT_STATE, root, "tools.bench"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
