"""tools/analyze.py (the papers' measurements on a trained model) and tools/runs.py (tables and
plots over runs): known attention patterns give known numbers; the command lines end to end."""
import json
import os

import numpy as np
import pytest
import torch

from conftest import ROOT, load, png_size

deit = load("06_train_deit")
analyze = load("tools.analyze")
runs = load("tools.runs")

TINY = ["--img-size", "16", "--patch-size", "4", "--embed-dim", "32", "--depth", "2",
        "--num-heads", "2", "--batch-size", "16", "--demo-train", "64", "--demo-val", "48",
        "--warmup-epochs", "1"]


def small_vit(attn, **kw):
    return deit.VisionTransformer(**{"img_size": 16, "patch_size": 4, "num_classes": 5,
                                     "embed_dim": 24, "depth": 2, "num_heads": 2,
                                     "drop_path_rate": 0.0, **kw}, attn=attn)


def test_analyze_measures_known_attention_patterns():
    torch.manual_seed(0)
    model = small_vit("softmax", img_size=28, patch_size=4)  # a 7 x 7 grid + class token
    images = torch.randn(3, 3, 28, 28)
    with torch.no_grad():  # zero q, k: every softmax row is uniform over the N tokens
        for blk in model.blocks:
            blk.attn.qkv.weight[:48].zero_()
            blk.attn.qkv.bias[:48].zero_()
    rows = analyze.analyze(model, images, tol=1e-6)
    assert [r["block"] for r in rows] == [1, 2]
    for r in rows:
        for w in analyze.WINDOWS:  # local attention mass (Fig. 4) of uniform rows: the baseline
            assert r[f"mass_{w}"] == pytest.approx(r[f"uniform_{w}"], rel=1e-9)
        assert r["uniform_3"] == pytest.approx(sum(  # 3x3 windows clipped at the border / N
            min(i + 1, 6) - max(i - 1, 0) + 1 for i in range(7)) ** 2 / 49 / 50, rel=1e-9)
        assert r["confused"] == r["pairs"] == 49 * 48 // 2  # every pair of rows is the same
        assert r["rank_kv"] == pytest.approx(1.0) and r["rank_kv_max"] == 50  # uniform: rank 1
    with torch.no_grad():  # q = k = 30 U x, U orthogonal: q_i . k_j is largest at j = i
        for blk in model.blocks:
            u = torch.linalg.qr(torch.randn(24, 24))[0]
            blk.attn.qkv.weight[:24], blk.attn.qkv.weight[24:48] = 30 * u, 30 * u
    rows = analyze.analyze(model, images, tol=1e-6)
    assert all(r["mass_3"] > 0.9 and r["mass_3"] / r["uniform_3"] > 5 for r in rows)
    assert all(r["confused"] < 0.01 * r["pairs"] for r in rows)  # distinct tokens: distinct rows


@pytest.mark.parametrize("attn", list(deit.ATTENTIONS))
def test_analyze_every_attention_on_a_fresh_model(attn):
    torch.manual_seed(0)
    model = small_vit(attn)
    rows = analyze.analyze(model, torch.randn(2, 3, 16, 16))
    assert len(rows) == 2
    has_kv = getattr(model.blocks[0].attn, "kv_buffer", None) is not None  # optional
    for r in rows:
        assert all(0 <= r[f"mass_{w}"] <= 1.0 + 1e-9 or attn in ("injective", "inline", "final")
                   for w in analyze.WINDOWS)  # InLine's weights may be negative, so its mass
        assert 0 <= r["confused"] <= r["pairs"] == 16 * 15 // 2
        assert (r["rank_kv"] is not None) == has_kv
        if has_kv:  # of N x N weights, or of d x d buffers (24 / 2 heads)
            assert 1 <= r["rank_kv"] <= r["rank_kv_max"] in (17, 12)
        assert 1 <= r["rank_out"] <= r["rank_out_max"] == 24
    assert all(p.dtype == torch.float32 for p in model.parameters())  # measured in a copy


def test_analyze_a_module_without_kv_buffer():
    torch.manual_seed(0)
    model = small_vit("linear")
    images = torch.randn(2, 3, 16, 16)
    full = analyze.analyze(model, images)
    for blk in model.blocks:
        blk.attn.kv_buffer = None  # as a module that has none (attentions.py: it is optional)
    rows = analyze.analyze(model, images)
    assert all(r["rank_kv"] is None and r["rank_kv_max"] is None for r in rows)
    assert [{k: v for k, v in r.items() if "kv" not in k} for r in rows] == \
        [{k: v for k, v in r.items() if "kv" not in k} for r in full]  # the rest is measured
    lines = analyze.table(rows, "linear", 2, 0.05)
    assert all(line.split(" | ")[-2] == f"{'-':>7} {'-':>3}" for line in lines[3:]), lines


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    out = [str(root / f"softmax-{s}") for s in (0, 1)] + [str(root / "final-no-gate")]
    for seed, run in zip((0, 1), out):
        deit.main(TINY + ["--attn", "softmax", "--epochs", "2", "--seed", str(seed),
                          "--output", run])
    deit.main(TINY + ["--no", "gate", "--epochs", "1", "--output", out[2]])
    return out


def test_analyze_command_line_reads_each_runs_own_weights(two_seeds, tmp_path, capsys):
    fig = str(tmp_path / "fig" / "local_mass.png")
    res = analyze.main([*two_seeds[:2], "--images", "8", "--plot", fig])
    out = capsys.readouterr().out
    assert f"softmax ({two_seeds[0]}{os.sep}checkpoint.pth) on 8 held-out images" in out
    assert "block | 3x3 mass" in out and f"wrote {fig}" in out
    saved = json.load(open(os.path.join(two_seeds[0], "analysis.json")))
    assert saved["label"] == "softmax" and saved["images"] == 8
    assert saved["blocks"] == res[f"softmax ({two_seeds[0]}{os.sep}checkpoint.pth)"]
    # the two seeds' weights differ, so do their measurements
    a, b = (json.load(open(os.path.join(r, "analysis.json")))["blocks"] for r in two_seeds[:2])
    assert a != b
    assert png_size(fig) == (1200, 360)
    best = analyze.main([two_seeds[2], "--weights", "best", "--images", "4"])
    assert list(best)[0].startswith("final-no-gate (") and "best.pth" in list(best)[0]


def test_analyze_refuses_what_is_not_a_run(tmp_path):
    with pytest.raises(SystemExit) as e:
        analyze.main([str(tmp_path)])
    assert "checkpoint.pth does not exist" in str(e.value.code)


def test_runs_table_groups_seeds_and_plot_draws_every_run(two_seeds, tmp_path, capsys):
    groups = runs.main(["table", *two_seeds])
    lines = capsys.readouterr().out.splitlines()
    top1 = [json.loads(open(os.path.join(r, "log.jsonl")).readlines()[-1])["top1"]
            for r in two_seeds[:2]]
    assert list(groups) == ["softmax", "final-no-gate"]  # the course's order, ablations after
    assert lines[2].startswith(f"| softmax | 2 | {np.mean(top1):.1f} +- "
                               f"{np.std(top1, ddof=1):.1f} | {min(top1):.1f} - {max(top1):.1f} |")
    assert lines[3].startswith("| final-no-gate | 1 |") and "+- -" in lines[3]
    fig = str(tmp_path / "curves.png")
    runs.main(["plot", *two_seeds, "--out", fig])
    assert png_size(fig) == (1000, 380)
    with pytest.raises(SystemExit) as e:
        runs.main(["table", str(tmp_path)])
    assert "holds no checkpoint.pth" in str(e.value.code)


def test_ablation_trains_each_row_and_seed_once_and_resumes(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runs, "ABLATION", [("softmax", []), ("final", ["--no", "gate"])])
    root = str(tmp_path / "abl")
    argv = ["ablation", "--root", root, "--seeds", "0", "1", "--", *TINY, "--epochs", "1",
            "--depth", "1"]
    groups = runs.main(argv)
    assert sorted(os.listdir(root)) == ["final-no-gate-s0", "final-no-gate-s1", "softmax-s0",
                                        "softmax-s1"]
    assert list(groups) == ["softmax", "final-no-gate"]
    assert all(len(g) == 2 for g in groups.values())
    said = open(os.path.join(root, "softmax-s1", "stdout.txt")).read()
    assert "epoch 1/1 |" in said  # 06's own lines go to the run's file, not the screen
    out = capsys.readouterr().out
    assert "| softmax | 2 |" in out and "| final-no-gate | 2 |" in out
    trained = []
    monkeypatch.setattr(deit, "main", lambda argv: trained.append(argv))
    assert runs.main(argv) == groups and trained == []  # the second call trains nothing
    os.remove(os.path.join(root, "softmax-s1", "log.jsonl"))  # as if stopped in its 1st epoch
    runs.main(argv)
    assert len(trained) == 1 and trained[0][-2:] == ["--output", os.path.join(root, "softmax-s1")]
    assert "--seed" in trained[0] and trained[0][trained[0].index("--seed") + 1] == "1"


def test_render_is_how_06_renders_the_demo():
    clean, y = deit.synthetic_tiles(20, 32, 4, None, 3)
    x, y0 = deit.synthetic_tiles(20, 32, 4, 0.0, 3)  # noise 0: only the rendering
    assert torch.equal(runs.render(clean).to(torch.uint8), x) and torch.equal(y, y0)


def test_ceiling_is_the_likeliest_texture_of_each_red_patch_read_pixel_by_pixel():
    # the same reader written out with 06's generator: textures by its seed, red tint + 2
    n, noise, seed = 40, 2.5, 7
    x, y = deit.synthetic_tiles(n, 32, 4, noise, seed)
    clean, _ = deit.synthetic_tiles(n, 32, 4, None, seed)
    textures = 2.0 * torch.randint(2, (2, 4, 4), generator=torch.Generator().manual_seed(1)) - 1
    normal = torch.distributions.Normal(0.0, noise)
    right = 0
    for i in range(n):
        tile = int((clean[i, 0] - clean[i, 1]).view(4, 8, 4, 8).mean((1, 3)).argmax())
        r, c = 8 * (tile // 4), 8 * (tile % 4)
        bits = []
        for a, b in ((0, 0), (0, 4), (4, 0), (4, 4)):                   # the tile's 4 patches
            v = x[i, :, r + a:r + a + 4, c + b:c + b + 4].double()       # (3, 4, 4) pixel values
            scores = []
            for tex in textures:
                mean = tex.double().repeat(3, 1, 1)
                mean[0] += 2
                lo = ((v - 0.5) / 255 - 0.5) / 0.25 - mean
                hi = ((v + 0.5) / 255 - 0.5) / 0.25 - mean
                p = torch.where(v == 255, 1.0, normal.cdf(hi)) - torch.where(v == 0, 0.0,
                                                                             normal.cdf(lo))
                scores.append(p.log().sum())
            bits.append(int(scores[1] > scores[0]))
        right += bits[0] * 8 + bits[1] * 4 + bits[2] * 2 + bits[3] == int(y[i])
    assert runs.ceiling(noise, n=n, seed=seed) == pytest.approx(100 * right / n)
    assert 40 < runs.ceiling(noise, n=n, seed=seed) < 100


def test_ceiling_falls_with_noise_and_its_command_prints_a_table(capsys):
    assert runs.ceiling(0.3, n=200) == 100
    assert runs.ceiling(1.5, n=200) > runs.ceiling(2.5, n=200) > runs.ceiling(4.0, n=200) > 6.25
    runs.main(["ceiling", "--noise", "0.3", "4"])
    out = capsys.readouterr().out
    assert "| 0.3 | 100.0 |" in out and "| 4 |" in out
    with pytest.raises(SystemExit):
        runs.main(["ceiling", "x"])
