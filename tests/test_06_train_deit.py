"""Step 06: the DeiT-T model (timm's names, shapes, init, forward), checkpoints, and the training
script end to end on CPU: a loss that falls, the ImageFolder path, exact resume, gradients under
a 2-process torchrun, and a one-line error for each bad input."""
import argparse
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import ROOT, load

deit = load("06_train_deit")
SCRIPT = os.path.join(ROOT, "06_train_deit.py")

# timm's deit_tiny_patch16_224 state_dict, in order (timm.create_model(...).state_dict())
TIMM_BLOCK = [("norm1.weight", (192,)), ("norm1.bias", (192,)),
              ("attn.qkv.weight", (576, 192)), ("attn.qkv.bias", (576,)),
              ("attn.proj.weight", (192, 192)), ("attn.proj.bias", (192,)),
              ("norm2.weight", (192,)), ("norm2.bias", (192,)),
              ("mlp.fc1.weight", (768, 192)), ("mlp.fc1.bias", (768,)),
              ("mlp.fc2.weight", (192, 768)), ("mlp.fc2.bias", (192,))]
TIMM_DEIT_TINY = ([("cls_token", (1, 1, 192)), ("pos_embed", (1, 197, 192)),
                   ("patch_embed.proj.weight", (192, 3, 16, 16)), ("patch_embed.proj.bias", (192,))]
                  + [(f"blocks.{i}.{k}", s) for i in range(12) for k, s in TIMM_BLOCK]
                  + [("norm.weight", (192,)), ("norm.bias", (192,)),
                     ("head.weight", (1000, 192)), ("head.bias", (1000,))])

# a small model / demo run that takes a second on CPU; drop-path on, so resume needs the RNG
TINY = ["--img-size", "16", "--patch-size", "4", "--embed-dim", "32", "--depth", "2",
        "--num-heads", "2", "--drop-path", "0.1", "--batch-size", "16", "--demo-train", "64",
        "--demo-val", "48", "--warmup-epochs", "1"]


def small_vit(attn="final", **kw):
    return deit.VisionTransformer(**{"img_size": 16, "patch_size": 4, "num_classes": 5,
                                     "embed_dim": 24, "depth": 2, "num_heads": 2,
                                     "drop_path_rate": 0.0, **kw}, attn=attn)


def tensors(path):
    return torch.load(path, map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------------------------
# the model


def test_softmax_deit_tiny_is_timms_deit_tiny():
    model = deit.deit_tiny(attn="softmax", num_heads=3)
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == TIMM_DEIT_TINY
    assert sum(p.numel() for p in model.parameters()) == 5_717_416
    assert deit.deit_tiny(attn="softmax").num_heads == 3  # the default for softmax


def test_inline_deit_tiny_is_the_official_count():
    model = deit.deit_tiny(attn="inline", num_heads=6)
    assert sum(p.numel() for p in model.parameters()) == 6_477_736
    keys = set(model.state_dict())
    extra = keys - {k for k, _ in TIMM_DEIT_TINY}
    assert keys >= {k for k, _ in TIMM_DEIT_TINY}  # every timm name, plus the local residual
    assert extra == {f"blocks.{i}.attn.residual.{j}.{p}" for i in range(12) for j in (0, 2)
                     for p in ("weight", "bias")}
    assert deit.deit_tiny(attn="inline").num_heads == 6 and deit.deit_tiny().num_heads == 6


def test_attentions_registry_and_every_parameter_learns():
    # the course's six; an attention a student adds to ATTENTIONS is tested below as well
    assert {"softmax", "linear", "injective", "inline", "rala", "final"} <= set(deit.ATTENTIONS)
    x = torch.randn(3, 3, 16, 16)
    for name in deit.ATTENTIONS:
        model = small_vit(name)
        out = model(x)
        assert out.shape == (3, 5)
        out.logsumexp(-1).sum().backward()
        # DDP (find_unused_parameters=False) needs a gradient for every parameter. Only the class
        # token reaches the head, so the last block's local parts (they skip the class token)
        # get zeros; everything before it must learn.
        for k, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), (name, k)
            assert k.startswith("blocks.1.") or p.grad.abs().sum() > 0, (name, k)


def reference_forward(sd, x, heads, depth):
    """timm's VisionTransformer.forward written with functional ops from a state_dict."""
    C = sd["cls_token"].shape[-1]
    x = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"],
                 stride=sd["patch_embed.proj.weight"].shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([sd["cls_token"].expand(len(x), -1, -1), x], 1) + sd["pos_embed"]
    B, N, _ = x.shape
    for i in range(depth):
        p = lambda k: sd[f"blocks.{i}.{k}"]  # noqa: E731
        h = F.layer_norm(x, (C,), p("norm1.weight"), p("norm1.bias"), eps=1e-6)
        q, k, v = F.linear(h, p("attn.qkv.weight"), p("attn.qkv.bias")).reshape(
            B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
        a = ((q @ k.transpose(-2, -1)) * (C // heads) ** -0.5).softmax(-1) @ v
        x = x + F.linear(a.transpose(1, 2).reshape(B, N, C), p("attn.proj.weight"),
                         p("attn.proj.bias"))
        h = F.layer_norm(x, (C,), p("norm2.weight"), p("norm2.bias"), eps=1e-6)
        h = F.linear(F.gelu(F.linear(h, p("mlp.fc1.weight"), p("mlp.fc1.bias"))),
                     p("mlp.fc2.weight"), p("mlp.fc2.bias"))
        x = x + h
    x = F.layer_norm(x, (C,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)
    return F.linear(x[:, 0], sd["head.weight"], sd["head.bias"])


def test_forward_equals_timms_computation():
    torch.manual_seed(0)
    model = small_vit("softmax", num_heads=3, drop_path_rate=0.1).double().eval()
    with torch.no_grad():  # norms away from 1 / 0, so eps and affine terms matter
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    ref = reference_forward(model.state_dict(), x, heads=3, depth=2)
    assert torch.allclose(model(x), ref, atol=1e-10, rtol=0)


def test_timm_initialisation_and_drop_path_schedule():
    torch.manual_seed(0)
    model = deit.deit_tiny(attn="final")
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            assert m.bias is None or (m.bias == 0).all(), name
        if isinstance(m, nn.LayerNorm) and name.split(".")[-1] in ("norm", "norm1", "norm2"):
            assert m.eps == 1e-6 and (m.weight == 1).all() and (m.bias == 0).all(), name
        if isinstance(m, nn.GELU):
            assert m.approximate == "none", name
    for w in (model.blocks[0].mlp.fc1.weight, model.head.weight, model.pos_embed):
        assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.002
    assert 0.01 < model.cls_token.std().item() < 0.03
    rates = [b.drop_path.p for b in model.blocks]
    assert rates == pytest.approx([0.1 * i / 11 for i in range(12)])
    model.eval()  # no drop-path at evaluation: deterministic
    x = torch.randn(1, 3, 224, 224)
    assert torch.equal(model(x), model(x))


def test_model_errors():
    with pytest.raises(ValueError, match="img_size=225 is not divisible by patch_size=16"):
        deit.VisionTransformer(img_size=225)
    with pytest.raises(ValueError, match="unknown attention 'flash'"):
        deit.VisionTransformer(attn="flash")
    with pytest.raises(ValueError, match="num_heads=5"):
        deit.deit_tiny(num_heads=5)
    with pytest.raises(ValueError, match="expected 16 x 16 images"):
        small_vit()(torch.randn(1, 3, 32, 32))


# ----------------------------------------------------------------------------------------------
# checkpoints


def test_resize_pos_embed_keeps_class_token_and_interpolates_the_grid():
    pe = torch.randn(1, 1 + 4 * 4, 8)
    out = deit.resize_pos_embed(pe, 6)
    assert out.shape == (1, 1 + 36, 8)
    assert torch.equal(out[:, 0], pe[:, 0])
    grid = pe[:, 1:].reshape(1, 4, 4, 8).permute(0, 3, 1, 2)   # row-major patches, as timm
    ref = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False)
    assert torch.allclose(out[:, 1:], ref.permute(0, 2, 3, 1).reshape(1, 36, 8), atol=1e-6)
    assert torch.allclose(deit.resize_pos_embed(pe, 4), pe, atol=1e-5)  # same size: unchanged


def test_load_pretrained_strict_and_at_a_new_resolution(tmp_path):
    src = small_vit()
    sd = src.state_dict()
    torch.save({"model": sd}, tmp_path / "wrapped.pth")
    torch.save(sd, tmp_path / "bare.pth")
    same = small_vit()
    deit.load_pretrained(same, str(tmp_path / "bare.pth"))
    assert all(torch.equal(v, same.state_dict()[k]) for k, v in sd.items())
    big = small_vit(img_size=24)                                  # 6 x 6 patches instead of 4 x 4
    deit.load_pretrained(big, str(tmp_path / "wrapped.pth"))
    assert torch.allclose(big.pos_embed, deit.resize_pos_embed(sd["pos_embed"], 6))
    assert torch.equal(big.blocks[1].attn.qkv.weight, sd["blocks.1.attn.qkv.weight"])
    with pytest.raises(deit.UserError, match=r"shape mismatch: head.weight \(5, 24\) in file vs "
                                             r"\(7, 24\) in model"):
        deit.load_pretrained(small_vit(num_classes=7), str(tmp_path / "bare.pth"))
    with pytest.raises(deit.UserError, match=r"missing keys: blocks.0.attn.residual.0.weight"):
        deit.load_pretrained(small_vit(), _save(tmp_path, small_vit("softmax").state_dict()))


def _save(tmp_path, obj, name="other.pth"):
    torch.save(obj, tmp_path / name)
    return str(tmp_path / name)


# ----------------------------------------------------------------------------------------------
# optimisation pieces


def test_weight_decay_groups():
    model = small_vit()
    decay, no_decay = deit.param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    skip = {names[id(p)] for p in no_decay["params"]}
    assert {"pos_embed", "cls_token", "norm.weight", "norm.bias", "head.bias",
            "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias"} <= skip
    assert all(n.endswith(".bias") or "norm" in n or n in ("pos_embed", "cls_token")
               for n in skip)
    assert {"head.weight", "patch_embed.proj.weight", "blocks.1.attn.qkv.weight",
            "blocks.1.mlp.fc2.weight"} <= {names[id(p)] for p in decay["params"]}
    assert len(decay["params"]) + len(no_decay["params"]) == len(names)


def test_lr_schedule_warmup_then_cosine():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = deit.lr_schedule(opt, peak=1e-3, warmup_lr=1e-6, min_lr=1e-5, warmup_steps=10,
                             total_steps=110)
    lrs = []
    for _ in range(111):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-6)
    assert lrs[5] == pytest.approx(1e-6 + (1e-3 - 1e-6) / 2)   # linear warm-up
    assert lrs[10] == pytest.approx(1e-3)                      # peak after warm-up
    assert lrs[60] == pytest.approx((1e-3 + 1e-5) / 2)         # cosine half way
    assert lrs[110] == pytest.approx(1e-5)                     # floor at the end
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))
    assert all(a > b for a, b in zip(lrs[10:110], lrs[11:111]))


def test_synthetic_shapes_are_fixed_and_balanced():
    x, y = deit.synthetic_shapes(1000, 32, seed=0)
    x2, y2 = deit.synthetic_shapes(1000, 32, seed=0)
    x3, _ = deit.synthetic_shapes(1000, 32, seed=1)
    assert x.shape == (1000, 3, 32, 32) and x.dtype == torch.uint8
    assert torch.equal(x, x2) and torch.equal(y, y2) and not torch.equal(x, x3)
    assert torch.bincount(y, minlength=10).min() > 60       # all 10 classes present
    # the shape, not the colour, is the label: mean colours carry almost no class information
    means = x.float().mean((2, 3))
    per_class = torch.stack([means[y == c].mean(0) for c in range(10)])
    assert (per_class.max(0).values - per_class.min(0).values).max() < 30


def test_a_few_steps_of_training_lower_the_loss():
    torch.manual_seed(0)
    x, y = deit.synthetic_shapes(32, 16, seed=0)
    batch = ((x.float() / 255 - 0.5) / 0.25, y)
    model = small_vit(num_classes=10)
    opt = torch.optim.AdamW(deit.param_groups(model, 0.05), lr=2e-3)
    sched = deit.lr_schedule(opt, 2e-3, 2e-3, 2e-3, 0, 30)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    args = argparse.Namespace(amp="none", clip_grad=5.0)
    losses = [deit.train_one_epoch(model, [batch], nn.CrossEntropyLoss(), opt, sched, scaler,
                                   None, torch.device("cpu"), args) for _ in range(30)]
    assert losses[0] > 2.0                                  # ~ln(10) at the start
    assert losses[-1] < losses[15] < losses[0]
    assert sum(losses[-5:]) / 5 < 0.8 * losses[0]


# ----------------------------------------------------------------------------------------------
# the script: ImageFolder data, resume, NaN, bench


def write_image_folder(root, classes=("cat", "dog"), n=(4, 2), size=40, bad=None):
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for split, count in zip(("train", "val"), n):
        for c, name in enumerate(classes):
            os.makedirs(os.path.join(root, split, name), exist_ok=True)
            for i in range(count):
                img = torch.randint(0, 256, (size, size + 8, 3), generator=g, dtype=torch.uint8)
                img[..., c] = 255  # a class colour, so there is something to learn
                Image.fromarray(img.numpy()).save(os.path.join(root, split, name, f"{i}.png"))
    if bad:
        with open(os.path.join(root, bad), "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\n this is not a png")
    return str(root)


def test_image_folder_training_and_eval_only(tmp_path):
    data = write_image_folder(tmp_path / "data")
    out = str(tmp_path / "out")
    model_args = ["--img-size", "32", "--patch-size", "8", "--embed-dim", "32", "--depth", "1",
                  "--num-heads", "2"]
    args = deit.get_args(["--data-path", data] + model_args)
    train, val, classes, mix = deit.imagenet_data(args)
    assert classes == ["cat", "dog"] and len(train) == 8 and len(val) == 4
    assert train[0][0].shape == (3, 32, 32) and val[0][0].shape == (3, 32, 32)
    images = torch.stack([train[i][0] for i in range(4)])
    mixed, soft = mix(images, torch.tensor([0, 0, 1, 1]))
    assert soft.shape == (4, 2) and torch.allclose(soft.sum(1), torch.ones(4))
    res = deit.main(["--data-path", data, "--output", out, "--epochs", "2", "--batch-size", "4",
                     "--workers", "0", "--warmup-epochs", "1"] + model_args)
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert [r["epoch"] for r in log] == [0, 1]
    assert {"loss", "lr", "top1", "top5", "images_per_s", "time_s"} <= set(log[0])
    assert all(math.isfinite(r["loss"]) and r["images_per_s"] > 0 for r in log)
    assert log[-1]["top5"] == 100.0  # two classes: the top-5 always hold the label
    ckpt = tensors(os.path.join(out, "checkpoint.pth"))
    assert ckpt["epoch"] == 1 and ckpt["model"]["head.weight"].shape == (2, 32)
    again = deit.main(["--data-path", data, "--eval-only", "--resume",
                       os.path.join(out, "checkpoint.pth"), "--workers", "0"] + model_args)
    assert again["top1"] == pytest.approx(res["top1"])  # eval-only reproduces the logged top-1


def weights(path):
    return tensors(path)["model"]


def test_resume_continues_exactly(tmp_path, capsys, monkeypatch):
    straight, split = str(tmp_path / "a"), str(tmp_path / "b")
    deit.main(TINY + ["--epochs", "3", "--output", straight])
    real_evaluate, calls = deit.evaluate, []

    def crash_in_second_epoch(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the job is killed near the end of epoch 2
        return real_evaluate(*args, **kw)
    monkeypatch.setattr(deit, "evaluate", crash_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        deit.main(TINY + ["--epochs", "3", "--output", split])
    monkeypatch.undo()
    assert tensors(f"{split}/checkpoint.pth")["epoch"] == 0
    capsys.readouterr()
    deit.main(TINY + ["--epochs", "3", "--output", split])  # finds b/checkpoint.pth by itself
    assert "resumed from" in capsys.readouterr().out
    a, b = weights(f"{straight}/checkpoint.pth"), weights(f"{split}/checkpoint.pth")
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    la = [json.loads(s) for s in open(f"{straight}/log.jsonl")]
    lb = [json.loads(s) for s in open(f"{split}/log.jsonl")]
    keys = ("epoch", "loss", "lr", "top1", "top5")
    assert [r[k] for r in la for k in keys] == pytest.approx([r[k] for r in lb for k in keys],
                                                              rel=1e-6)
    # and the run did learn something in between: resuming is not the same as restarting
    fresh = str(tmp_path / "c")
    deit.main(TINY + ["--epochs", "1", "--output", fresh])
    c = weights(f"{fresh}/checkpoint.pth")
    assert not torch.allclose(a["head.weight"], c["head.weight"])


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    deit.main(TINY + ["--epochs", "1", "--output", out])
    good = weights(f"{out}/checkpoint.pth")
    real_forward = deit.VisionTransformer.forward
    monkeypatch.setattr(deit.VisionTransformer, "forward",
                        lambda self, x: real_forward(self, x) * float("nan"))
    with pytest.raises(SystemExit) as e:
        deit.main(TINY + ["--epochs", "2", "--output", out])
    assert "loss is nan at epoch 1, step 0" in str(e.value.code)
    ckpt = tensors(f"{out}/checkpoint.pth")
    assert ckpt["epoch"] == 0
    assert all(torch.equal(good[k], v) for k, v in ckpt["model"].items())
    assert len(open(f"{out}/log.jsonl").readlines()) == 1


def test_bench_reports_both_attentions(capsys):
    speed = deit.main(["--bench", "--img-size", "16", "--patch-size", "4", "--embed-dim", "24",
                       "--depth", "1", "--bench-batch", "2", "--bench-steps", "1"])
    assert set(speed) == {"final", "softmax"} and all(v > 0 for s in speed.values() for v in s)
    out = capsys.readouterr().out
    assert "final / softmax: train x" in out and "inference x" in out


# ----------------------------------------------------------------------------------------------
# two processes under torchrun: gradients, metrics and checkpoint as from one process

WORKER = """
import argparse, os, sys
import torch
sys.path.insert(0, {root!r})
import importlib
deit = importlib.import_module("06_train_deit")
sys.path.insert(0, {tests!r})
from test_06_train_deit import small_vit

rank, world, device = deit.setup_distributed("cpu")
torch.manual_seed(0)
model = small_vit(num_classes=10)
if rank == 1:  # DDP must start every process from rank 0's weights
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
train_model, _ = deit.prepare(model, device, world)
batch = torch.load({batch!r})
x, y = batch["x"][rank::world], batch["y"][rank::world]   # this process's half of the batch
opt = torch.optim.SGD(model.parameters(), lr=0.0)
sched = deit.lr_schedule(opt, 1.0, 1.0, 1.0, 0, 1)
scaler = torch.amp.GradScaler("cpu", enabled=False)
args = argparse.Namespace(amp="none", clip_grad=0.0)
loss = deit.train_one_epoch(train_model, [(x, y)], torch.nn.CrossEntropyLoss(), opt, sched,
                            scaler, None, device, args, rank=rank)
torch.save({{"loss": loss, "grads": {{n: p.grad for n, p in model.named_parameters()}}}},
           os.path.join({out!r}, f"grads{{rank}}.pt"))
# then the whole script, in the same process group
deit.main({tiny!r} + ["--epochs", "1", "--device", "cpu", "--output",
                      os.path.join({out!r}, "run")])
"""


def single_process_grads(x, y):
    torch.manual_seed(0)
    model = small_vit(num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    loss = deit.train_one_epoch(model, [(x, y)], nn.CrossEntropyLoss(), opt,
                                deit.lr_schedule(opt, 1.0, 1.0, 1.0, 0, 1),
                                torch.amp.GradScaler("cpu", enabled=False), None,
                                torch.device("cpu"), argparse.Namespace(amp="none", clip_grad=0))
    return loss, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_torchrun_two_processes_match_one(tmp_path):
    x, y = deit.synthetic_shapes(8, 16, seed=3)
    x = (x.float() / 255 - 0.5) / 0.25
    torch.save({"x": x, "y": y}, tmp_path / "batch.pt")
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER.format(root=ROOT, tests=os.path.join(ROOT, "tests"),
                                    batch=str(tmp_path / "batch.pt"), out=str(tmp_path),
                                    tiny=TINY))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", str(worker)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loss, grads = single_process_grads(x, y)
    for rank in (0, 1):
        got = tensors(tmp_path / f"grads{rank}.pt")
        assert got["loss"] == pytest.approx(loss, rel=1e-5)    # the all-reduced mean loss
        for k, g in grads.items():
            assert torch.allclose(got["grads"][k], g, rtol=1e-4, atol=1e-6), (rank, k)
    # the check has teeth: one process's half of the batch gives clearly different gradients
    _, half = single_process_grads(x[0::2], y[0::2])
    assert not all(torch.allclose(half[k], g, rtol=1e-2, atol=1e-4) for k, g in grads.items())
    # the whole script ran under torchrun: RNG states of both processes, metrics over all of
    # val (one process evaluating the same checkpoint gets the same top-1)
    run = str(tmp_path / "run")
    ckpt = tensors(os.path.join(run, "checkpoint.pth"))
    assert len(ckpt["rng"]) == 2 and not torch.equal(ckpt["rng"][0]["torch"],
                                                     ckpt["rng"][1]["torch"])
    logged = json.loads(open(os.path.join(run, "log.jsonl")).readline())
    res = deit.main(TINY + ["--eval-only", "--resume", os.path.join(run, "checkpoint.pth"),
                            "--output", str(tmp_path / "eval")])
    assert res["top1"] == pytest.approx(logged["top1"])


# ----------------------------------------------------------------------------------------------
# bad input: a one-line message and a non-zero exit, no traceback


def bad_inputs(tmp_path):
    torch.save(small_vit("softmax", embed_dim=32).state_dict(), tmp_path / "softmax.pth")
    (tmp_path / "corrupt.pth").write_bytes(b"PK\x03\x04 definitely not a checkpoint")
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "img.png").write_bytes(b"")
    data = write_image_folder(tmp_path / "data", n=(2, 1), bad="train/cat/broken.png")
    return {
        "missing": (["--data-path", str(tmp_path / "nowhere")],
                    ["nowhere is not a directory", "train/ and val/"]),
        "layout": (["--data-path", str(flat)], ["has no train/ folder", "one sub-folder"]),
        "unreadable": (["--data-path", data, "--img-size", "32", "--patch-size", "8",
                        "--embed-dim", "32", "--depth", "1", "--num-heads", "2",
                        "--batch-size", "5",
                        "--workers", "1"], ["cannot read image", "broken.png"]),
        "img-size": (TINY + ["--img-size", "30"],
                     ["img_size=30 is not divisible by patch_size=4"]),
        "mismatch": (TINY + ["--attn", "final", "--eval-only", "--pretrained",
                             str(tmp_path / "softmax.pth")],
                     ["does not match the model", "missing keys: blocks.0.attn.",
                      "shape mismatch: head.weight (5, 32) in file vs (10, 32) in model"]),
        "corrupt": (TINY + ["--resume", str(tmp_path / "corrupt.pth")],
                    ["cannot read checkpoint", "corrupt.pth"]),
    }


@pytest.mark.parametrize("case", ["missing", "layout", "unreadable", "img-size", "mismatch",
                                  "corrupt"])
def test_bad_input_gives_one_clear_line(tmp_path, case):
    argv, expected = bad_inputs(tmp_path)[case]
    proc = subprocess.run([sys.executable, SCRIPT, *argv, "--output", str(tmp_path / "out")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-2000:]
    for text in expected:
        assert text in errors[0], errors[0]
