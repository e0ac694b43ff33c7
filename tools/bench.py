"""Speed and peak memory of the course's attention modules, alone and inside DeiT-T (a tool).

    python tools/bench.py modules                  # every module vs softmax, N = 197 ... 12545
    python tools/bench.py modules --sizes 197 785 --rounds 3
    python tools/bench.py model                    # DeiT-T: the final attention vs softmax, 224 px
    python tools/bench.py model --img-size 448 --batch 64 --compile --amp bf16 --device cuda

modules: every module of attentions.py (01-05, and yours) at C = 192, 6 heads (InLine-DeiT-T's),
float32, on random tokens x (B, N, C), B = --batch or min(8, 32768 // N); every module starts from
the same seed. Two passes: forward + backward (the gradients of sum(output) with respect to x and
the parameters) and inference (forward under no_grad). Softmax is torch's fused SDPA (step 01).

model: DeiT-T (06's VisionTransformer) with --attn and with softmax (timm's DeiT-T, 3 heads), on
random images and labels. A training step is forward, cross entropy, backward and the AdamW step that training
uses (06's make_optimizer), under 06's autocast; inference is the forward in eval mode under
no_grad. img/s = batch / seconds per step. --warmup untimed steps of each model come first.

How each figure is measured:
  time       torch.utils.benchmark.Timer.blocked_autorange(min_run_time=--min-time), on the threads
             torch uses: it first runs the call 1, 10, 100, ... times, not counted, to choose a
             block of calls (at least --min-time / 1000 s), then times blocks until --min-time has
             passed; a round's time is the median time per call over its blocks. A round measures
             every module (model) once, in turn, so that a change in the machine's load hits all
             of them alike. Printed: median [min - max] over --rounds.
  x softmax  time / softmax's time in the same round (the load of that round cancels), median
             [min - max] over the rounds; below 1 is faster than softmax. The model's img/s ratio
             is the inverse: softmax's time / the attention's time, above 1 is faster.
  peak MB    memory allocated at the peak of one call, above what was allocated before it: on CPU
             torch.profiler's allocation records (profile_memory=True) summed in time order, on
             CUDA the allocator's max_memory_allocated; its ratio to softmax. Never from a timed
             call: modules, the first call; model, a step after --warmup steps (so what is
             allocated once, AdamW's state, and compiling with --compile are left out).
  warning    printed when a module's times spread, (max - min) / median over the rounds, by more
             than 10%: the machine was busy. Rerun on an idle machine or with more --rounds.
"""
import argparse
import contextlib
import importlib
import os
import statistics
import sys
import types

import torch
import torch.nn.functional as F
from torch.utils import benchmark

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `python tools/bench.py` finds the steps
    sys.path.insert(0, ROOT)
deit = importlib.import_module("06_train_deit")

SPREAD_LIMIT = 0.1  # warn when timings spread by more than this fraction of their median
OPTIMIZER = types.SimpleNamespace(lr=5e-4, weight_decay=0.05, betas=(0.9, 0.999))  # the recipe's


# ----------------------------------------------------------------------------------------------
# measuring


@contextlib.contextmanager
def quiet_stderr():
    """Silence file descriptor 2 for a moment (the profiler's C++ side logs there); restore it."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory(fn, device="cpu"):
    """Bytes that torch allocates for fn() at its peak, above what was allocated before the call;
    None where the profiler gives no memory records. The profiler is on for this one call only."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    activities = [torch.profiler.ProfilerActivity.CPU]
    with quiet_stderr(), torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        fn()
    try:
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    except AttributeError:  # a torch whose profiler keeps no raw events
        return None
    now = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):  # + bytes allocated, - bytes freed
        now += e.nbytes()
        peak = max(peak, now)
    return peak


def make_timer(fn):
    """torch.utils.benchmark's Timer of fn() on as many threads as torch uses now (the Timer's
    default is 1); its clock synchronizes the accelerator, if there is one, at every reading."""
    return benchmark.Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())


def interleaved(fns, baseline, rounds, min_time):
    """Time the closures of the dict `fns` in `rounds` rounds, each timing every one in turn:
    {name: {"time": [seconds per call, per round], "ratio": [time / baseline's, per round]}}."""
    timers = {name: make_timer(fn) for name, fn in fns.items()}
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, timer in timers.items():
            times[name].append(timer.blocked_autorange(min_run_time=min_time).median)
    return {name: {"time": ts, "ratio": [t / b for t, b in zip(ts, times[baseline])]}
            for name, ts in times.items()}


def spread(xs):
    """(median, min, max) of a list of numbers."""
    return statistics.median(xs), min(xs), max(xs)


def unsteady(results, limit=SPREAD_LIMIT):
    """{name: (max - min) / median} of the timings in interleaved()'s results that spread by more
    than `limit` of their median: a sign that the machine was busy."""
    out = {}
    for name, r in results.items():
        med, lo, hi = spread(r["time"])
        if (hi - lo) / med > limit:
            out[name] = (hi - lo) / med
    return out


def cell(xs, scale=1.0, fmt=".3f"):
    """'median [min - max]' of xs * scale."""
    med, lo, hi = (v * scale for v in spread(xs))
    return f"{med:{fmt}} [{lo:{fmt}} - {hi:{fmt}}]"


def mb(b):
    return "n/a" if b is None else f"{b / 2**20:.1f}"


def ratio(a, b):
    return "n/a" if a is None or not b else f"{a / b:.2f}"


def warn_if_busy(busy):
    """Print the warning for {where: unsteady(...)}, if any timing spread."""
    if busy:
        print(f"\nwarning: timings spread by more than {SPREAD_LIMIT:.0%} of their median (the"
              f" machine was busy?); rerun on an idle machine or with more --rounds:\n   "
              + "\n   ".join(f"{where}: " + ", ".join(f"{name} {s:.0%}" for name, s in b.items())
                            for where, b in busy.items()))


# ----------------------------------------------------------------------------------------------
# modules: every attention module against softmax


def module_passes(names, n, batch, device):
    """{pass: {name: closure}}: forward + backward and inference of every module on one x."""
    x = torch.randn(batch, n, 192, device=device, requires_grad=True)   # (B, N, C)
    passes = {"forward + backward": {}, "inference (no grad)": {}}
    for name in names:
        torch.manual_seed(0)  # the same qkv / proj weights for every module
        m = deit.ATTENTIONS[name](192, num_heads=6).to(device)
        passes["forward + backward"][name] = lambda m=m: torch.autograd.grad(
            m(x).sum(), [x, *m.parameters()])
        passes["inference (no grad)"][name] = torch.no_grad()(lambda m=m: m(x))
    return passes


def bench_modules(args):
    names = list(deit.ATTENTIONS)
    threads = "" if args.device == "cuda" else f" ({torch.get_num_threads()} threads)"
    print(f"Every module at C = 192, 6 heads, float32, {args.device}{threads}, {args.rounds} rounds"
          f" of\nblocked_autorange(min_run_time={args.min_time:g}) per module, interleaved. ms:"
          f" median [min - max]; x softmax:\nthe same of the per-round ratio to softmax (SDPA);"
          f" below 1 is better.", flush=True)
    final, busy = {}, {}
    for n in args.sizes:
        batch = args.batch or max(1, min(8, 32768 // n))
        for title, fns in module_passes(names, n, batch, args.device).items():
            peak = {k: peak_memory(fn, args.device) for k, fn in fns.items()}  # and a warm-up
            res = interleaved(fns, "softmax", args.rounds, args.min_time)
            print(f"\nN = {n}, B = {batch}, {title}")
            print(f"   {'module':>9} | {'ms [min - max]':>27} | {'x softmax [min - max]':>23} |"
                  f" {'peak MB':>8} {'x softmax':>9}")
            for k in names:
                print(f"   {k:>9} | {cell(res[k]['time'], 1e3, '7.2f'):>27} |"
                      f" {cell(res[k]['ratio']):>23} | {mb(peak[k]):>8}"
                      f" {ratio(peak[k], peak['softmax']):>9}", flush=True)
            final[n, title] = (spread(res["final"]["ratio"])[0],
                               ratio(peak["final"], peak["softmax"]))
            if unsteady(res):
                busy[f"N = {n}, {title}"] = unsteady(res)
    print("\nThe final module / softmax (median ratios):")
    print(f"   {'N':>6} | {'time, fwd + bwd':>15} {'memory':>7} | {'time, inference':>15}"
          f" {'memory':>7}")
    for n in args.sizes:
        (tt, mt), (ti, mi) = final[n, "forward + backward"], final[n, "inference (no grad)"]
        print(f"   {n:>6} | {tt:>15.3f} {mt:>7} | {ti:>15.3f} {mi:>7}")
    warn_if_busy(busy)
    if args.profile:
        n = args.profile
        fn = module_passes(["final"], n, args.batch or max(1, min(8, 32768 // n)),
                           args.device)["forward + backward"]["final"]
        fn()
        with quiet_stderr(), torch.profiler.profile() as prof:
            fn()
        print(f"\nWhere the final module's time goes at N = {n} (torch.profiler, self time):")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    return {"final": final, "busy": busy}


# ----------------------------------------------------------------------------------------------
# model: DeiT-T with the chosen attention against softmax DeiT-T


def model_steps(name, x, y, args, device, amp):
    """(model, train step, inference step) of DeiT-T with attention `name`."""
    size = {k: v for k, v in (("depth", args.depth), ("embed_dim", args.embed_dim)) if v}
    torch.manual_seed(0)
    model = deit.VisionTransformer(attn=name, img_size=x.shape[-1], num_classes=1000,
                           num_heads=args.num_heads if name == args.attn else None,
                           drop_path_rate=args.drop_path, **size).to(device)
    run = torch.compile(model) if args.compile else model
    opt = deit.make_optimizer(model, OPTIMIZER, device)  # training's (lr does not change the time)

    def train_step():
        model.train()
        with deit.autocast(device, amp):
            loss = F.cross_entropy(run(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def infer_step():
        model.eval()
        with torch.no_grad(), deit.autocast(device, amp):
            run(x)
    return model, train_step, infer_step


def bench_model(args):
    device = torch.device(args.device)
    amp = args.amp or ("bf16" if device.type == "cuda" else "none")
    batch = args.batch or (128 if device.type == "cuda" else 8)
    x = torch.randn(batch, 3, args.img_size, args.img_size, device=device)  # (B, 3, S, S)
    y = torch.randint(1000, (batch,), device=device)
    names = list(dict.fromkeys([args.attn, "softmax"]))
    models, train, infer, peak = {}, {}, {}, {}
    for name in names:
        models[name], train[name], infer[name] = model_steps(name, x, y, args, device, amp)
        for _ in range(args.warmup):  # compile (--compile); the allocator and caches settle
            train[name](), infer[name]()
        peak[name] = (peak_memory(train[name], device), peak_memory(infer[name], device))
    m = models[args.attn]
    print(f"model: {len(m.blocks)} blocks x {m.pos_embed.shape[-1]} channels, {args.img_size} px"
          f" (N = {m.pos_embed.shape[1]} tokens), batch {batch}, {device.type}, amp {amp},"
          f" compile {args.compile}" + ("" if device.type == "cuda" else
                                        f", {torch.get_num_threads()} threads")
          + f", {args.rounds} rounds (median [min - max])", flush=True)
    res = {"train": interleaved(train, "softmax", args.rounds, args.min_time),
           "infer": interleaved(infer, "softmax", args.rounds, args.min_time)}
    print(f"{'attention':>10} {'heads':>5} {'params':>9} | {'train img/s [min - max]':>27}"
          f" {'peak MB':>8} | {'infer img/s [min - max]':>27} {'peak MB':>8}")
    for name in names:
        cells = [f"{cell([batch / t for t in res[mode][name]['time']], fmt='9.1f'):>27}"
                 f" {mb(peak[name][i]):>8}" for i, mode in enumerate(res)]
        print(f"{name:>10} {models[name].num_heads:>5} "
              f"{sum(p.numel() for p in models[name].parameters()):>9,} | " + " | ".join(cells))
    if args.attn != "softmax":
        speed = {mode: [1 / r for r in res[mode][args.attn]["ratio"]] for mode in res}
        mem = [ratio(peak[args.attn][i], peak["softmax"][i]) for i in (0, 1)]
        print(f"{args.attn} / softmax: img/s train x{cell(speed['train'], fmt='.2f')}, inference"
              f" x{cell(speed['infer'], fmt='.2f')} (> 1: faster than softmax); peak memory"
              f" train x{mem[0]}, inference x{mem[1]}")
    warn_if_busy({mode: unsteady(r) for mode, r in res.items() if unsteady(r)})
    return {"time": res, "peak": peak, "batch": batch}


# ----------------------------------------------------------------------------------------------
# command line


def main(argv=None):
    p = argparse.ArgumentParser(prog="tools/bench.py", description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)
    kw = dict(formatter_class=argparse.ArgumentDefaultsHelpFormatter,
              epilog="How each figure is measured: python tools/bench.py --help")
    mods = sub.add_parser("modules", help="every attention module against softmax (SDPA)", **kw)
    mods.add_argument("--sizes", type=int, nargs="+", default=[197, 785, 3137, 12545],
                      help="tokens N (DeiT at 224, 448, 896, 1792 px)")
    mods.add_argument("--batch", type=int, help="None: min(8, 32768 // N), at least 1")
    mods.add_argument("--profile", type=int, default=0, metavar="N",
                      help="also profile the final module's forward + backward at N tokens")
    model = sub.add_parser("model", help="DeiT-T with --attn against softmax DeiT-T", **kw)
    model.add_argument("--attn", default="final", choices=list(deit.ATTENTIONS))
    model.add_argument("--num-heads", type=int, help="heads of --attn (None: 06's default)")
    model.add_argument("--img-size", type=int, default=224)
    model.add_argument("--batch", type=int, help="None: 128 on cuda, 8 on cpu")
    model.add_argument("--depth", type=int, help="blocks (None: DeiT-T's 12)")
    model.add_argument("--embed-dim", type=int, help="channels (None: DeiT-T's 192)")
    model.add_argument("--drop-path", type=float, default=0.1, help="drop-path rate (the recipe's)")
    model.add_argument("--amp", choices=["bf16", "fp16", "none"],
                       help="autocast dtype (None: bf16 on cuda, none on cpu)")
    model.add_argument("--compile", action="store_true", help="torch.compile both models")
    model.add_argument("--warmup", type=int, default=3, help="untimed steps of each model first")
    for s in (mods, model):
        s.add_argument("--rounds", type=int, default=5, help="timed rounds (median [min - max])")
        s.add_argument("--min-time", type=float, default=0.2,
                       help="seconds of blocked_autorange per module and round")
        s.add_argument("--device", choices=["cpu", "cuda"], help="where to run",
                       default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    return bench_modules(args) if args.mode == "modules" else bench_model(args)


if __name__ == "__main__":
    main()
