"""The papers' measurements on a trained model of step 06, block by block.

For every block the input x (B, N, C) of its attention is caught by a forward hook; the module
then gives its weights (attention_weights) and KV buffers (kv_buffer), and the measures are those
of steps 03-05, imported, not rewritten. In float64, on held-out images, per block:

  mass_k     share of a patch query's attention inside its k x k window (k = 3, 5, 7; InLine's
             Fig. 4, local attention mass), beside uniform_k, the share of a uniform row
  confused   pairs of patch queries of one image whose attention rows are (nearly) the same
             distribution (L1 distance < --tol; the per-image confusion count of InLine's Fig. 2,
             step 03), of `pairs` in all
  rank_kv    effective rank (exp of the entropy of the normalised singular values, step 05) of
             each head's KV buffer (softmax: its N x N weights), of at most rank_kv_max; None
             (printed -) for a module without kv_buffer (attentions.py: it is optional)
  rank_out   effective rank of the block's N x C output, of at most rank_out_max

    python tools/analyze.py runs/demo-final runs/demo-softmax --plot figures/local_mass.png

Each RUN is a run directory of 06 (its checkpoint.pth; --weights best for best.pth) or a
checkpoint file. The table is printed, and saved as RUN/analysis.json for a run directory.
"""
import argparse
import importlib
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
deit = importlib.import_module("06_train_deit")
injective = importlib.import_module("03_injectivity")
locality = importlib.import_module("04_local_residual")
rank_aug = importlib.import_module("05_rank_augmentation")

WINDOWS = (3, 5, 7)


@torch.no_grad()
def analyze(model, images, tol=0.05):
    """One dict of measurements per block of `model` on `images` (B, 3, S, S)."""
    model.eval()
    seen = {}  # block index -> (input x, output) of its attention module
    hooks = [blk.attn.register_forward_hook(lambda m, inp, out, i=i: seen.update({i: (inp[0],
                                                                                   out)}))
             for i, blk in enumerate(model.blocks)]
    try:
        model(images)
    finally:
        for h in hooks:
            h.remove()
    rows = []
    for i, blk in enumerate(model.blocks):
        x, out = (t.double() for t in seen[i])                  # (B, N, C) each
        attn = blk.attn.double()                                # measure in float64
        w = attn.attention_weights(x)                           # (B, H, N, N)
        B, H, N, _ = w.shape
        uniform = torch.full((N, N), 1.0 / N, dtype=w.dtype)    # the baseline: no preference
        row = {"block": i + 1}
        for win in WINDOWS:
            row[f"mass_{win}"] = float(locality.local_attention_mass(w, win).mean())
            row[f"uniform_{win}"] = float(locality.local_attention_mass(uniform, win).mean())
        side, cls = locality.grid_size(N)
        patches = w[..., cls:, :].flatten(0, 1)                 # (B*H, P, N) the patch queries
        row["confused"] = sum(injective.confusion_pairs(r, tol) for r in patches) / (B * H)
        row["pairs"] = (N - cls) * (N - cls - 1) // 2
        kv = getattr(attn, "kv_buffer", None)                   # optional (attentions.py)
        kv = None if kv is None else kv(x)                      # (B, H, d, d); softmax (B, H, N, N)
        row["rank_kv"] = None if kv is None else float(rank_aug.effective_rank(kv).mean())
        row["rank_kv_max"] = None if kv is None else kv.shape[-1]
        row["rank_out"] = float(rank_aug.effective_rank(out).mean())
        row["rank_out_max"] = out.shape[-1]
        attn.float()
        rows.append(row)
    return rows


def table(rows, label, n_images, tol):
    """The rows as lines of text, with a header that says what each column is."""
    lines = [f"{label} on {n_images} held-out images, per block (mean over images, heads and "
             f"patch queries)", f"  mass: in the k x k window (x: over uniform); confused: pairs"
             f" of {rows[0]['pairs']:,} with L1 < {tol:g}; effective rank of KV and of the output",
             f"{'block':>5} | " + " | ".join(f"{w}x{w} mass (x unif)" for w in WINDOWS)
             + f" | {'confused':>8} | {'rank KV':>7} {'of':>3} | {'rank out':>8} {'of':>3}"]
    for r in rows:
        masses = [f"{r[f'mass_{w}']:>8.3f} (x{r[f'mass_{w}'] / r[f'uniform_{w}']:>5.2f})"
                  for w in WINDOWS]
        kv = f"{'-':>7} {'-':>3}" if r["rank_kv"] is None else \
            f"{r['rank_kv']:>7.2f} {r['rank_kv_max']:>3}"
        lines.append(f"{r['block']:>5} | " + " | ".join(masses) + f" | {r['confused']:>8.1f} | "
                     f"{kv} | {r['rank_out']:>8.2f} {r['rank_out_max']:>3}")
    return lines


def load_run(run, weights="checkpoint", data_path=None):
    """(model with the run's weights, its args, the checkpoint's path) for a run directory or a
    checkpoint file of 06."""
    path = os.path.join(run, f"{weights}.pth") if os.path.isdir(run) else run
    ckpt = deit.read_checkpoint(path)
    if "args" not in ckpt:
        raise deit.UserError(f"{path} holds no args: not a checkpoint written by 06")
    args = argparse.Namespace(**ckpt["args"])
    args.data_path = data_path or args.data_path
    model = deit.build_model(args, ckpt["model"]["head.weight"].shape[0])
    deit.load_weights(model, ckpt, path)
    return model, args, path


def held_out_images(args, n):
    """n images spread evenly over the run's held-out set (ImageFolder sorts it by class)."""
    _, val_set, _, _ = deit.make_data(args)
    idx = torch.linspace(0, len(val_set) - 1, min(n, len(val_set))).round().long().unique()
    return torch.stack([val_set[int(i)][0] for i in idx])       # (n, 3, S, S)


def plot_local_mass(analyses, path):
    """InLine's Fig. 4 for each run: local attention mass per block, with the uniform baseline."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no window
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    fig, axes = plt.subplots(1, len(WINDOWS), figsize=(4 * len(WINDOWS), 3.6), dpi=100)
    for label, rows in analyses.items():
        for ax, win in zip(axes, WINDOWS):
            ax.plot([r["block"] for r in rows], [r[f"mass_{win}"] for r in rows], marker="o",
                    label=label)
    for ax, win in zip(axes, WINDOWS):
        ax.axhline(next(iter(analyses.values()))[0][f"uniform_{win}"], color="gray", ls=":",
                   label="uniform")
        ax.set(xlabel="block", ylabel=f"attention mass in the {win}x{win} window",
               title=f"local attention mass, {win}x{win}", ylim=(0, None))
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))  # blocks
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="See this file's docstring for what each column is.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directory or checkpoint of 06")
    p.add_argument("--weights", choices=["checkpoint", "best"], default="checkpoint",
                   help="which weights of a run directory: the last epoch's or the best")
    p.add_argument("--images", type=int, default=32, help="held-out images to measure on")
    p.add_argument("--tol", type=float, default=0.05, help="L1 distance below which two "
                   "attention rows (each sums to 1) count as the same distribution")
    p.add_argument("--data-path", help="where the run's data is now, if it moved")
    p.add_argument("--plot", metavar="PNG", help="also draw the local attention mass per block")
    args = p.parse_args(argv)
    analyses = {}
    try:
        for run in args.runs:
            model, run_args, path = load_run(run, args.weights, args.data_path)
            images = held_out_images(run_args, args.images)
            rows = analyze(model, images, args.tol)
            label = f"{deit.model_label(run_args)} ({path})"
            print("\n".join(table(rows, label, len(images), args.tol)) + "\n")
            analyses[label] = rows
            if os.path.isdir(run):
                with open(os.path.join(run, "analysis.json"), "w") as f:
                    json.dump({"label": deit.model_label(run_args), "weights": path,
                               "images": len(images), "tol": args.tol, "blocks": rows}, f,
                              indent=1)
    except deit.UserError as e:
        sys.exit(f"error: {e}")
    if args.plot:
        plot_local_mass(analyses, args.plot)
        print(f"wrote {args.plot}")
    return analyses


if __name__ == "__main__":
    main()
