"""Tables and plots over runs of step 06, and the demo's ablation.

    python tools/runs.py ablation                     # 9 rows x 3 seeds of the 5-epoch demo
    python tools/runs.py ablation --quick             # one seed of 06 --quick: a few minutes
    python tools/runs.py table runs/demo-*            # markdown: top-1 mean +- std over seeds
    python tools/runs.py plot runs/demo-* --out figures/training_curves.png
    python tools/runs.py ceiling --noise 1.5 2 2.5    # the best top-1 possible at each noise

`ablation` trains 06's CPU demo once per row of ABLATION and seed, into ROOT/LABEL-sSEED (each
run's output in its stdout.txt), then prints `table` over them. It can be stopped at any time:
the same command skips finished runs and resumes the one it stopped in. Flags after `--` go to
06 (e.g. `-- --epochs 8`).

A RUN is an output directory of 06: its checkpoint.pth says which model it trained (attention,
parts switched off, seed), its log.jsonl has one line per epoch. `table` groups the runs by model
(the attention and its switched-off parts) and prints, over the seeds of each group, the last
epoch's held-out top-1 as mean +- sample std (ddof=1), its min - max, the parameter count and the
mean training images/s. `plot` draws training loss and held-out top-1 against epoch, one line
per run.
"""
import argparse
import contextlib
import importlib
import json
import math
import os
import sys

import numpy as np
import torch
from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
deit = importlib.import_module("06_train_deit")


# the rows of the papers' ablations the course can build: each attention (InLine Table 2: linear
# vs injective; Table 3: the local residual, inline vs injective), and the final module with each
# of its parts off (RALA's ablation of its two rank augmentations, and InLine's local residual)
ABLATION = [("softmax", []), ("linear", []), ("injective", []), ("inline", []), ("rala", []),
            ("final", [])] + [("final", ["--no", part]) for part in ("reweight", "gate", "local")]


def ablation(root, seeds, quick=False, extra=()):
    """Train every row of ABLATION x seed on the demo (skipping finished runs); the runs."""
    jobs = [(os.path.join(root, f"{attn}{''.join('-no-' + p for p in off[1:])}-s{seed}"),
             ["--attn", attn, *off, "--seed", str(seed), *["--quick"] * quick, *extra])
            for seed in seeds for attn, off in ABLATION]  # seed by seed: a stop leaves whole seeds
    for out, argv in tqdm(jobs, desc="ablation", unit="run", dynamic_ncols=True):
        argv = argv + ["--output", out]
        log = os.path.join(out, "log.jsonl")
        if os.path.isfile(log) and sum(1 for _ in open(log)) >= deit.get_args(argv).epochs:
            continue  # finished
        os.makedirs(out, exist_ok=True)
        try:
            with open(os.path.join(out, "stdout.txt"), "a") as f, contextlib.redirect_stdout(f), \
                    contextlib.redirect_stderr(f):
                deit.main(argv)  # a stopped run resumes: 06 finds its checkpoint
        except SystemExit as e:  # 06's error or Ctrl-C: its one line is in the file
            raise deit.UserError(f"06 stopped in {out} (exit status {e.code}; see its "
                                 f"stdout.txt): the same command resumes") from None
    return [out for out, _ in jobs]


SCALE, SHIFT = 0.25, 0.5  # 06's synthetic_tiles renders x as round(255 clamp(x SCALE + SHIFT))


def render(img):
    """06's rendering of a float image to pixel values 0-255 (a test holds it to 06's)."""
    return ((img * SCALE + SHIFT).clamp(0, 1) * 255).round()


def ceiling(noise, n=2000, img_size=32, patch=4, seed=1):
    """Held-out top-1 (%) of an ideal reader of the demo at this noise: it knows the two textures
    and which tile is red, and reads each patch of that tile as the texture under which the
    patch's pixels are likelier. Each pixel is its clean value plus N(0, noise^2), rendered as
    06 renders it, so a pixel value is the noise falling in a bin [v - 0.5, v + 0.5] / 255 (0 and
    255: everything beyond). The bits are independent, so no model can do better on average.
    The defaults are the demo's held-out set (06: seed 1, 2,000 images)."""
    x, y = deit.synthetic_tiles(n, img_size, patch, noise, seed)         # uint8 (n, 3, S, S)
    clean, y_clean = deit.synthetic_tiles(n, img_size, patch, None, seed)  # float, noise-free
    assert torch.equal(y, y_clean)
    t = img_size // (2 * patch)
    def tiles(a):  # (n, C, S, S) -> (n, t * t, C, 2P, 2P)
        return a.unflatten(2, (t, 2 * patch)).unflatten(4, (t, 2 * patch)).permute(
            0, 2, 4, 1, 3, 5).flatten(1, 2)
    rows = torch.arange(n)
    red = tiles(clean[:, :1] - clean[:, 1:2]).mean((2, 3, 4)).argmax(1)  # (n,): the tinted tile
    pixels = tiles(x.double())[rows, red]                               # (n, 3, 2P, 2P)
    truth = tiles(clean.double())[rows, red]                            # its clean values
    two = clean[:, 1].unflatten(1, (-1, patch)).unflatten(3, (-1, patch)).transpose(2, 3)
    two = two.reshape(-1, patch, patch).unique(dim=0).double()          # (2, P, P): the textures
    assert len(two) == 2
    # each patch as the other texture: + (t0 + t1 - 2 t_a), t_a its texture (the green channel)
    other = truth + (two.sum(0).repeat(2, 2) - 2 * truth[:, 1])[:, None]
    normal = torch.distributions.Normal(0.0, float(noise))
    def loglik(mean):  # (n, 2, 2): log P(pixels | clean values), summed per patch
        lo = torch.where(pixels == 0, -math.inf, ((pixels - 0.5) / 255 - SHIFT) / SCALE)
        hi = torch.where(pixels == 255, math.inf, ((pixels + 0.5) / 255 - SHIFT) / SCALE)
        p = normal.cdf(hi - mean) - normal.cdf(lo - mean)
        return p.clamp_min(1e-300).log().unflatten(2, (2, patch)).unflatten(4, (2, patch)).sum(
            (1, 3, 5))
    return 100 * (loglik(truth) > loglik(other)).all(2).all(1).double().mean().item()


def read_run(run):
    """(model label, log records, parameters) of a finished run directory."""
    path = os.path.join(run, "checkpoint.pth")
    if not os.path.isfile(path):
        raise deit.UserError(f"{run} holds no checkpoint.pth: not a run directory of 06")
    ckpt = deit.read_checkpoint(path)
    label = deit.model_label(argparse.Namespace(**ckpt["args"]))
    return label, ckpt["log"], sum(v.numel() for v in ckpt["model"].values())


def summarize(runs):
    """{label: [(last top-1, parameters, mean img/s) per run]}, in the course's order."""
    groups = {}
    for run in runs:
        label, log, params = read_run(run)
        if not log:
            raise deit.UserError(f"{run} has not finished an epoch yet")
        groups.setdefault(label, []).append((log[-1]["top1"], params,
                                             np.mean([r["images_per_s"] for r in log])))
    order = list(deit.ATTENTIONS)  # the course's order, then the final module's ablations
    return dict(sorted(groups.items(), key=lambda kv: (order.index(kv[0].split("-no-")[0]),
                                                       kv[0])))


def table(groups):
    lines = ["| attention | seeds | held-out top-1 (%), mean +- std | min - max | parameters |"
             " train img/s |", "|---|---|---|---|---|---|"]
    for label, rows in groups.items():
        top1 = np.array([t for t, _, _ in rows])
        std = f"{top1.std(ddof=1):.1f}" if len(top1) > 1 else "-"
        lines.append(f"| {label} | {len(rows)} | {top1.mean():.1f} +- {std} | {top1.min():.1f} - "
                     f"{top1.max():.1f} | {rows[0][1]:,} | {np.mean([s for *_, s in rows]):.0f} |")
    return lines


def plot_curves(runs, path):
    import matplotlib
    matplotlib.use("Agg")  # files only, no window
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    fig, (ax_loss, ax_top1) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=100)
    for run in runs:
        with open(os.path.join(run, "log.jsonl")) as f:
            log = [json.loads(line) for line in f if line.strip()]
        epochs = [r["epoch"] for r in log]                              # counted from 1
        ax_loss.plot(epochs, [r["loss"] for r in log], marker=".", label=os.path.basename(run))
        ax_top1.plot(epochs, [r["top1"] for r in log], marker=".", label=os.path.basename(run))
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="training loss")
    ax_top1.set(xlabel="epoch", ylabel="held-out top-1 (%)", title="held-out top-1")
    for ax in (ax_loss, ax_top1):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))          # whole epochs
        ax.grid(alpha=0.3)
    ax_top1.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["ablation", "table", "plot", "ceiling"])
    p.add_argument("runs", nargs="*", metavar="RUN", help="output directories of 06")
    p.add_argument("--out", default="training_curves.png", help="the figure of `plot`")
    p.add_argument("--root", default=os.path.join("runs", "ablation"), help="ablation's runs")
    p.add_argument("--seeds", type=int, nargs="+", help="ablation's seeds (default 0 1 2, "
                   "--quick: 0)")
    p.add_argument("--quick", action="store_true", help="ablation: 06 --quick")
    p.add_argument("--noise", type=float, nargs="+", default=[deit.SETTINGS["demo_noise"]],
                   help="ceiling's pixel noise levels")
    argv = sys.argv[1:] if argv is None else list(argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []  # 06's own flags
    args = p.parse_args(argv[:len(argv) - len(extra) - bool(extra)])
    if (args.what in ("ablation", "ceiling")) == bool(args.runs):
        p.error("ablation and ceiling take no RUN; table and plot take one or more")
    if args.what == "ceiling":
        if min(args.noise) <= 0:
            p.error("--noise must be positive")
        print("| pixel noise | an ideal reader's held-out top-1 (%) |\n|---|---|")
        for noise in args.noise:
            print(f"| {noise:g} | {ceiling(noise):.1f} |")
        return
    try:
        if args.what in ("ablation", "table"):
            seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
            runs = ablation(args.root, seeds, args.quick, extra) if args.runs == [] else args.runs
            groups = summarize(runs)
            print("\n".join(table(groups)))
            return groups
        missing = [r for r in args.runs if not os.path.isfile(os.path.join(r, "log.jsonl"))]
        if missing:
            raise deit.UserError(f"no log.jsonl in {', '.join(missing)}")
        plot_curves(args.runs, args.out)
        print(f"wrote {args.out}")
    except deit.UserError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
