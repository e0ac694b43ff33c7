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

import numpy as np

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
    assert [r["epoch"] for r in log] == [1, 2]  # counted from 1, as the epoch lines
    assert {"loss", "lr", "top1", "top5", "images_per_s", "time_s"} <= set(log[0])
    assert all(math.isfinite(r["loss"]) and r["images_per_s"] > 0 for r in log)
    assert log[-1]["top5"] == 100.0  # two classes: the top-5 always hold the label
    ckpt = tensors(os.path.join(out, "checkpoint.pth"))
    assert ckpt["epoch"] == 2 and ckpt["model"]["head.weight"].shape == (2, 32)
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
            raise KeyboardInterrupt  # Ctrl-C while epoch 2 is being evaluated
        return real_evaluate(*args, **kw)
    monkeypatch.setattr(deit, "evaluate", crash_in_second_epoch)
    with pytest.raises(SystemExit):
        deit.main(TINY + ["--epochs", "3", "--output", split])
    monkeypatch.undo()
    ckpt = tensors(f"{split}/checkpoint.pth")  # epoch 2's training was saved before evaluating
    assert ckpt["epoch"] == 2 and ckpt["pending"]["epoch"] == 2
    assert len(open(f"{split}/log.jsonl").readlines()) == 1
    capsys.readouterr()
    deit.main(TINY + ["--epochs", "3", "--output", split])  # finds b/checkpoint.pth by itself
    out = capsys.readouterr().out
    assert f"resuming automatically from {split}{os.sep}checkpoint.pth" in out, out
    assert "its evaluation still to do" in out and "--fresh" in out
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


def exit_line(argv):
    """The one line main() exits with (SystemExit), checked to be a single line."""
    with pytest.raises(SystemExit) as e:
        deit.main(argv)
    line = str(e.value.code)
    assert "\n" not in line and "Traceback" not in line, line
    return line


@pytest.fixture(scope="module")
def one_epoch_run(tmp_path_factory):
    """A run directory after `TINY --epochs 1`, made once; tests copy it."""
    out = str(tmp_path_factory.mktemp("one_epoch") / "run")
    deit.main(TINY + ["--epochs", "1", "--output", out])
    return out


def copy_run(one_epoch_run, tmp_path):
    import shutil
    out = str(tmp_path / "run")
    shutil.copytree(one_epoch_run, out)
    return out, os.path.join(out, "checkpoint.pth")


def test_automatic_resume_says_so_and_refuses_a_changed_model(one_epoch_run, tmp_path, capsys,
                                                              monkeypatch):
    out, ckpt = copy_run(one_epoch_run, tmp_path)
    capsys.readouterr()
    # the same command again: it says that it resumes, from where, how to start afresh, and
    # that there is nothing left to train, with what to do about it
    deit.main(TINY + ["--epochs", "1", "--output", out])
    said = capsys.readouterr().out
    assert f"resuming automatically from {ckpt}: epoch 1 of 1 trained" in said, said
    assert "to start afresh add --fresh or choose another --output" in said
    assert "nothing to train" in said and "raise --epochs" in said and "--fresh" in said
    # a changed setting of the model: one line that says so, what differs, what to do
    line = exit_line(TINY + ["--epochs", "2", "--output", out, "--embed-dim", "64"])
    assert line.startswith(f"error: the model changed since the run in {ckpt}"), line
    assert "--embed-dim 32 then, 64 now" in line and "--fresh" in line and "--output" in line
    assert "--attn final then, inline now" in exit_line(TINY + ["--output", out,
                                                                "--attn", "inline"])
    # a changed model with the same flags (an edited module): the state_dicts differ
    final = deit.ATTENTIONS["final"]
    monkeypatch.setitem(deit.ATTENTIONS, "final", lambda *a, **k: final(*a, **k, local=False))
    line = exit_line(TINY + ["--epochs", "2", "--output", out])
    assert "the model changed since the run" in line and "unexpected keys: blocks.0.attn." \
        "residual" in line and "--fresh" in line, line
    monkeypatch.undo()
    # other settings may change; the resume line names them
    deit.main(TINY + ["--epochs", "2", "--output", out, "--seed", "3"])
    assert "--epochs 1 then, 2 now; --seed 0 then, 3 now" in capsys.readouterr().out
    # --fresh: from scratch, saying that it overwrites; the old log does not go on
    deit.main(TINY + ["--epochs", "1", "--output", out, "--fresh"])
    said = capsys.readouterr().out
    assert "--fresh: starting from scratch" in said and "resuming" not in said
    assert [json.loads(r)["epoch"] for r in open(os.path.join(out, "log.jsonl"))] == [1]
    assert tensors(ckpt)["epoch"] == 1
    with pytest.raises(SystemExit):
        deit.get_args(["--fresh", "--resume", ckpt])  # contradictory: a usage error


def test_one_epoch_numbering_and_ctrl_c(tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "run")
    ckpt = os.path.join(out, "checkpoint.pth")
    bars = []
    real_tqdm = deit.tqdm
    monkeypatch.setattr(deit, "tqdm", lambda *a, **k: bars.append(k.get("desc")) or
                        real_tqdm(*a, **k))
    real_forward, steps, stop_at = deit.VisionTransformer.forward, [], [6]

    def ctrl_c(self, x):  # at training step 6: 4 steps per epoch, the second step of epoch 2
        steps.append(self.training)
        if sum(steps) == stop_at[0] and self.training:
            raise KeyboardInterrupt
        return real_forward(self, x)
    monkeypatch.setattr(deit.VisionTransformer, "forward", ctrl_c)
    argv = TINY + ["--epochs", "3", "--output", out]
    with pytest.raises(SystemExit) as e:
        deit.main(argv)
    assert e.value.code == 130
    said = capsys.readouterr()
    assert "Traceback" not in said.err and said.err.count("\n") == 1, said.err
    assert said.err == (f"interrupted: the last checkpoint is {ckpt} (epoch 1 of 3 trained, "
                        f"evaluated); the same command resumes from it\n")
    assert "epoch   1/3 |" in said.out and "epoch   2/3 |" not in said.out
    monkeypatch.setattr(deit.VisionTransformer, "forward", real_forward)
    deit.main(argv)  # the same command
    said = capsys.readouterr().out
    assert f"resuming automatically from {ckpt}: epoch 1 of 3 trained" in said
    # the progress bars, the epoch lines, log.jsonl and the checkpoint count epochs alike
    lines = [line.split("|")[0].split() for line in said.splitlines() if line.startswith("epoch")]
    assert lines == [["epoch", "2/3"], ["epoch", "3/3"]], said
    assert [b for b in bars if b.startswith("epoch")] == ["epoch 1/3", "epoch 2/3", "epoch 2/3",
                                                          "epoch 3/3"]
    assert [json.loads(r)["epoch"] for r in open(os.path.join(out, "log.jsonl"))] == [1, 2, 3]
    assert tensors(ckpt)["epoch"] == 3 and tensors(ckpt)["pending"] is None
    # Ctrl-C before the first checkpoint: nothing to resume, and it says so
    monkeypatch.setattr(deit.VisionTransformer, "forward", ctrl_c)
    steps.clear()
    stop_at[0] = 2
    with pytest.raises(SystemExit):
        deit.main(TINY + ["--epochs", "1", "--output", str(tmp_path / "new")])
    assert "interrupted: nothing saved yet" in capsys.readouterr().err


def flip_middle_bytes(path, n=16):
    data = bytearray(open(path, "rb").read())
    mid = len(data) // 2
    data[mid:mid + n] = bytes(b ^ 0xFF for b in data[mid:mid + n])
    open(path, "wb").write(bytes(data))


def test_damaged_checkpoint_is_refused(one_epoch_run, tmp_path):
    out, ckpt = copy_run(one_epoch_run, tmp_path)
    saved = tensors(ckpt)
    assert saved["sha256"] == deit.checksum({k: v for k, v in saved.items() if k != "sha256"})
    flip_middle_bytes(ckpt)
    damaged = tensors(ckpt)  # torch.load itself notices nothing: the bytes were in a tensor
    assert set(damaged) == set(saved) and damaged["sha256"] == saved["sha256"]
    for argv in (["--output", out], ["--resume", ckpt, "--output", str(tmp_path / "b")]):
        line = exit_line(TINY + ["--epochs", "2"] + argv)
        assert line.startswith(f"error: checkpoint {ckpt} is damaged"), line
        assert "sha256" in line and "--fresh" in line
    # the checksum sees one changed value anywhere: a weight, an optimizer moment, a number
    for change in (lambda c: c["model"]["head.bias"][0].add_(1e-7),
                   lambda c: c["optimizer"]["state"][0]["exp_avg"].view(-1)[3].mul_(-1),
                   lambda c: c.update(epoch=2)):
        c = {k: v for k, v in tensors(os.path.join(out, "checkpoint.pth")).items()
             if k != "sha256"}
        before = deit.checksum(c)
        change(c)
        assert deit.checksum(c) != before


def test_resumed_lr_follows_the_global_batch(one_epoch_run, tmp_path, capsys):
    # another number of processes = another global batch and another number of steps per
    # epoch; the place in the schedule is kept in epochs and the peak follows the new batch
    args = deit.get_args(TINY + ["--epochs", "3"])
    lrs = []
    for batch, steps in ((16, 4), (32, 2)):  # 1 process x 16, then "2 processes" x 16
        opt = torch.optim.AdamW(small_vit().parameters())
        peak, sched = deit.schedule(opt, args, batch, steps)
        for _ in range(steps):  # one epoch
            opt.step()
            sched.step()
        lrs.append((peak, opt.param_groups[0]["lr"]))
    opt = torch.optim.AdamW(small_vit().parameters())
    peak, sched = deit.schedule(opt, args, 32, 2, epochs_done=1)  # resumed after epoch 1
    assert peak == pytest.approx(2 * lrs[0][0]) == lrs[1][0]  # lr x global batch / 512
    assert opt.param_groups[0]["lr"] == pytest.approx(lrs[1][1])  # epoch 2 starts where it should
    # end to end: a resume with another global batch (here by --batch-size): the header, the
    # resume line and the epoch lines give the new peak and the lr of its schedule
    out, _ = copy_run(one_epoch_run, tmp_path)  # global batch 16
    capsys.readouterr()
    deit.main(TINY + ["--epochs", "3", "--output", out, "--batch-size", "32"])
    said = capsys.readouterr().out
    args = deit.get_args(TINY + ["--epochs", "3", "--batch-size", "32"])
    peak, warmup_lr, min_lr = deit.scaled_lrs(args, 32)
    assert f"global batch 32, peak lr {peak:.2e}" in said
    assert f"global batch 16 then, 32 now: peak lr {peak / 2:.2e} -> {peak:.2e}" in said
    # after epoch 2: step 4 of 6 (2 per epoch), warm-up 2 steps: half way down the cosine
    expect = min_lr + (peak - min_lr) * 0.5 * (1 + math.cos(math.pi * (4 - 2) / (6 - 2)))
    log = [json.loads(r) for r in open(os.path.join(out, "log.jsonl"))]
    assert log[1]["epoch"] == 2 and log[1]["lr"] == pytest.approx(expect)
    assert f"epoch   2/3 | loss {log[1]['loss']:.4f} | lr {expect:.2e} |" in said


def help_text(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "1000")  # one line per flag
    with pytest.raises(SystemExit):
        deit.get_args(["--help"])
    text = capsys.readouterr().out
    flags, current = {}, None
    for line in text.splitlines():
        if line.startswith("  --"):
            current = line.split()[0]
            flags[current] = line
        elif current and line.startswith("      "):
            flags[current] += " " + line.strip()
    return flags


def test_help_shows_every_default_once_and_what_the_demo_sets(monkeypatch, capsys):
    monkeypatch.setitem(deit.DATASETS["demo"], "epochs", 7)  # read, not copied
    flags = help_text(monkeypatch, capsys)
    assert len(flags) > 40
    for flag, line in flags.items():  # once: in the help's words, or appended, never both
        assert line.count("(default") + line.count("[demo") <= 2 and \
            not ("(default: " in line and "default: " in line.split("(default: ")[0]), line
    for key, value in deit.DATASETS["demo"].items():
        flag = "--" + key.replace("_", "-")
        assert f"demo: {value}" in flags[flag], flags[flag]
    assert "(default: 300) [demo: 7" in flags["--epochs"]
    assert deit.get_args([]).epochs == 7  # what --help says is what the demo runs
    assert "(default: 512) [demo: " in flags["--batch-size"] and "--recipe deit: 256" in \
        flags["--batch-size"]
    for flag in ("--img-size", "--patch-size", "--embed-dim", "--depth", "--seed", "--betas"):
        assert "(default: " in flags[flag], flags[flag]
    assert "(default: " not in flags["--num-heads"]  # its help says it in words


def test_img_size_in_the_demo_names_the_demos_patch_size(tmp_path):
    patch = deit.DATASETS["demo"]["patch_size"]
    line = exit_line(["--img-size", str(3 * patch + 1), "--output", str(tmp_path)])
    assert f"patch_size={patch}" in line and f"the demo chose --patch-size {patch}" in line, line


def test_workers_default_to_the_cores_there_are(monkeypatch, tmp_path):
    for cores, local_world, workers in ((2, None, 2), (32, None, 8), (16, "4", 4), (1, "2", 1)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cores: set(range(n)),
                            raising=False)
        if local_world:
            monkeypatch.setenv("LOCAL_WORLD_SIZE", local_world)
        else:
            monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
        assert deit.default_workers() == workers
        assert deit.get_args(["--data-path", str(tmp_path)]).workers == workers
    monkeypatch.undo()
    import warnings
    loader = torch.utils.data.DataLoader(range(4), num_workers=deit.default_workers())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns of more workers than cores
        loader.check_worker_number_rationality()


def test_held_out_images_are_checked_before_training(tmp_path, monkeypatch):
    trained = []
    monkeypatch.setattr(deit, "train_one_epoch", lambda *a, **k: trained.append(1) or 1.0)
    model_args = ["--img-size", "32", "--patch-size", "8", "--embed-dim", "32", "--depth", "1",
                  "--num-heads", "2", "--batch-size", "4", "--workers", "0", "--epochs", "1"]
    data = write_image_folder(tmp_path / "data", bad="val/dog/broken.png")
    out = str(tmp_path / "out")
    line = exit_line(["--data-path", data, "--output", out] + model_args)
    assert "cannot read held-out image" in line and "broken.png" in line and \
        "before training" in line, line
    assert trained == [] and not os.path.exists(os.path.join(out, "checkpoint.pth"))
    # images that do not fit the model (say an edited eval transform) are found before too
    os.remove(os.path.join(data, "val", "dog", "broken.png"))
    from torchvision.transforms import v2
    monkeypatch.setattr(deit, "eval_transform", lambda args, native: v2.Compose(
        [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Resize((24, 24))]))
    line = exit_line(["--data-path", data, "--output", out] + model_args)
    assert "held-out images do not fit the model" in line and "expected 32 x 32" in line, line
    assert trained == []


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    deit.main(TINY + ["--epochs", "1", "--output", out])
    good = weights(f"{out}/checkpoint.pth")
    real_forward = deit.VisionTransformer.forward
    monkeypatch.setattr(deit.VisionTransformer, "forward",
                        lambda self, x: real_forward(self, x) * float("nan"))
    with pytest.raises(SystemExit) as e:
        deit.main(TINY + ["--epochs", "2", "--output", out])
    assert "loss is nan at epoch 2, step 1" in str(e.value.code)
    ckpt = tensors(f"{out}/checkpoint.pth")
    assert ckpt["epoch"] == 1
    assert all(torch.equal(good[k], v) for k, v in ckpt["model"].items())
    assert len(open(f"{out}/log.jsonl").readlines()) == 1


def test_bench_reports_both_attentions(capsys):
    speed = deit.main(["--bench", "--img-size", "16", "--patch-size", "4", "--embed-dim", "24",
                       "--depth", "1", "--bench-batch", "2", "--bench-steps", "1"])
    assert set(speed) == {"final", "softmax"} and all(v > 0 for s in speed.values() for v in s)
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith("final / softmax img/s: train x"))
    ratio = float(line.split("train x")[1].split()[0])  # the median of one round: that round's
    assert ratio == pytest.approx(speed["final"][0] / speed["softmax"][0], abs=0.006)  # img/s
    assert "inference x" in line and "params" in out and "peak MB" in out


def test_bench_interleaves_the_models_and_warns_when_busy(monkeypatch, capsys):
    order = []
    real = deit.softmax.timings

    def spy(fns, repeat=3, device="cpu"):
        order.append((list(fns), repeat))
        return real(fns, repeat, device)
    monkeypatch.setattr(deit.softmax, "timings", spy)
    monkeypatch.setattr(deit.softmax, "unsteady", lambda res, limit: {"softmax": 0.5})
    deit.main(["--bench", "--img-size", "16", "--patch-size", "4", "--embed-dim", "24",
               "--depth", "1", "--bench-batch", "2", "--bench-steps", "3"])
    assert order == [(["final", "softmax"], 3)] * 2  # train, then inference: both per round
    assert "warning: timings spread by more than 10%" in capsys.readouterr().out


def test_bench_times_the_optimizer_training_uses(monkeypatch):
    # the train step of --bench is training's step: its AdamW from make_optimizer (weight decay
    # groups, betas, fused on CUDA), for each model
    made = []
    real = deit.make_optimizer

    def spy(model, args, device):
        opt = real(model, args, device)
        made.append((type(model.blocks[0].attn).__name__, len(opt.param_groups), opt.defaults["betas"]))
        return opt
    monkeypatch.setattr(deit, "make_optimizer", spy)
    deit.main(["--bench", "--img-size", "16", "--patch-size", "4", "--embed-dim", "24",
               "--depth", "1", "--bench-batch", "2", "--bench-steps", "1", "--betas", "0.8", "0.9"])
    assert made == [("RankAugmentedInLineAttention", 2, (0.8, 0.9)),
                    ("SoftmaxAttention", 2, (0.8, 0.9))]


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


# ----------------------------------------------------------------------------------------------
# recipes: InLine's and DeiT's values, flags win, the official augmentation and eval resize


def test_recipes_set_the_official_values_and_flags_win(tmp_path):
    inline = deit.get_args(["--data-path", str(tmp_path)])
    assert inline.data == "imagenet" and inline.recipe == "inline"
    assert (inline.batch_size, inline.warmup_epochs, inline.clip_grad, inline.repeated_aug,
            inline.eval_resize, inline.auto_augment) == (512, 20, 5.0, 0, "square",
                                                         "rand-m9-mstd0.5-inc1")
    # InLine's main.py: base, warm-up and minimum lr all x global batch / 512; 8 GPUs x 512
    assert deit.scaled_lrs(inline, 8 * 512) == pytest.approx((4e-3, 4e-6, 4e-5))
    d = deit.get_args(["--data-path", str(tmp_path), "--recipe", "deit"])
    assert (d.batch_size, d.warmup_epochs, d.clip_grad, d.repeated_aug, d.eval_resize) == \
        (256, 5, 0.0, 3, "shorter")
    # DeiT's main.py scales only the base lr: 4 GPUs x 256 -> 1e-3, warm-up 1e-6, min 1e-5
    assert deit.scaled_lrs(d, 4 * 256) == pytest.approx((1e-3, 1e-6, 1e-5))
    mine = deit.get_args(["--data-path", str(tmp_path), "--recipe", "deit", "--clip-grad", "1",
                          "--eval-resize", "square", "--batch-size", "64"])
    assert (mine.clip_grad, mine.eval_resize, mine.batch_size, mine.warmup_epochs) == \
        (1.0, "square", 64, 5)                             # given flags win, the rest stay deit's
    demo = deit.get_args([])
    assert demo.data == "demo" and demo.demo and demo.batch_size == deit.DEMO["batch_size"]
    assert deit.scaled_lrs(demo, 64)[1:] == (deit.DEMO["warmup_lr"], deit.DEMO["min_lr"])
    cifar = deit.get_args(["--data", "cifar100"])
    assert (cifar.data_path, cifar.img_size, cifar.patch_size, cifar.batch_size) == \
        ("data", 32, 4, 128) and cifar.output == os.path.join("runs", "cifar100-final")
    with pytest.raises(SystemExit):
        deit.get_args(["--data", "imagenet"])              # no --data-path: usage error


def test_train_transform_is_timms_rand_m9_mstd05_inc1():
    timm_aa = pytest.importorskip("timm.data.auto_augment")
    timm_tf = pytest.importorskip("timm.data.transforms")
    args = deit.get_args(["--data-path", "x"])
    tf = deit.train_transform(args).transforms
    crop, flip, ra = tf[0], tf[1], tf[2]
    assert isinstance(crop, timm_tf.RandomResizedCropAndInterpolation) and crop.size == (224, 224)
    assert crop.scale == (0.08, 1.0) and "bicubic" in str(crop.interpolation).lower()
    assert flip.p == 0.5
    assert isinstance(ra, timm_aa.RandAugment) and ra.num_layers == 2
    names = [op.name for op in ra.ops]
    assert {"PosterizeIncreasing", "SolarizeIncreasing", "ColorIncreasing",
            "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing"} <= set(names)
    assert "Posterize" not in names and len(names) == 15             # the 'inc1' op set
    assert all(op.prob == 0.5 and op.magnitude == 9 and op.magnitude_std == 0.5
               for op in ra.ops)                                       # m9 of 10, mstd 0.5
    erase = tf[-1]
    assert type(erase).__name__ == "RandomErasing" and erase.probability == 0.25
    assert erase.mode == "pixel"
    small = deit.train_transform(deit.get_args(["--data", "cifar10"])).transforms
    assert type(small[0]).__name__ == "RandomCrop" and list(small[0].padding) == [4] * 4  # 32 px


def test_eval_resize_square_for_inline_shorter_side_for_deit():
    from PIL import Image
    img = Image.fromarray(torch.randint(0, 256, (40, 48, 3), dtype=torch.uint8,
                                        generator=torch.Generator().manual_seed(0)).numpy())
    mean, std = torch.tensor(deit.MEAN)[:, None, None], torch.tensor(deit.STD)[:, None, None]

    def reference(w, h):  # PIL bicubic resize to (w, h), centre 32 x 32 crop, normalise
        r = torch.from_numpy(np.array(img.resize((w, h), Image.BICUBIC))).permute(2, 0, 1)
        top, left = int(round((h - 32) / 2)), int(round((w - 32) / 2))
        return (r[:, top:top + 32, left:left + 32].float() / 255 - mean) / std
    common = ["--data-path", "x", "--img-size", "32", "--patch-size", "8"]
    square = deit.eval_transform(deit.get_args(common), None)(img)            # 36 x 36
    shorter = deit.eval_transform(deit.get_args(common + ["--recipe", "deit"]), None)(img)
    assert torch.allclose(square, reference(36, 36), atol=1e-5)   # 32 / 0.875 = 36, InLine
    assert torch.allclose(shorter, reference(43, 36), atol=1e-5)  # 40 -> 36, 48 -> 43, timm
    assert not torch.allclose(square, shorter, atol=1e-2)


def test_repeated_augmentation_sampler_is_deits():
    ds = list(range(600))
    per_rank = [list(deit.RepeatedAugSampler(ds, 4, r, repeats=3, seed=0)) for r in range(4)]
    assert [len(p) for p in per_rank] == [512 // 4] * 4            # 600 // 256 * 256 / 4 each
    # the copies of an image go to consecutive processes (different augmentations of it)
    assert per_rank[0][0] == per_rank[1][0] == per_rank[2][0] != per_rank[3][0]
    s = deit.RepeatedAugSampler(ds, 4, 0, seed=0)
    first = list(s)
    s.set_epoch(1)
    assert list(s) != first and sorted(set(first)) != first[:len(set(first))]


# ----------------------------------------------------------------------------------------------
# CIFAR: written in CIFAR's own format (no download in tests)


def write_cifar(root, name="cifar10", n_train=40, n_test=16, classes=10, seed=0):
    """A tiny dataset in CIFAR's on-disk format: pickled dicts, 'data' rows of 3072 uint8 (the
    red, green and blue planes, each 32 x 32 row-major), labels, and the meta file. Each class
    has its own colour, so there is something to learn."""
    import pickle
    spec = deit.CIFAR[name]
    folder = os.path.join(root, spec["folder"])
    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(seed)

    def batch(n):
        y = torch.arange(n) % classes
        x = torch.randint(0, 100, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
        x[:, 0] += (y * 150 // classes).to(torch.uint8)[:, None, None]
        return {"data": x.reshape(n, 3072).numpy(), spec["labels"]: y.tolist()}
    files = {f: batch(n_train // len(spec["train"])) for f in spec["train"]}
    files.update({f: batch(n_test) for f in spec["test"]})
    files[spec["meta"]] = {spec["names"]: [f"class{i}" for i in range(classes)]}
    for f, obj in files.items():
        with open(os.path.join(folder, f), "wb") as fh:
            pickle.dump(obj, fh, protocol=2)
    return files


CIFAR_TINY = ["--embed-dim", "32", "--depth", "1", "--num-heads", "2", "--patch-size", "8",
              "--batch-size", "8", "--workers", "0", "--epochs", "2", "--warmup-epochs", "1"]


def test_cifar_is_read_in_its_own_format_and_trains(tmp_path, monkeypatch):
    files = write_cifar(tmp_path / "c10")
    x, y, xt, yt, classes = deit.read_cifar("cifar10", str(tmp_path / "c10"))
    assert x.shape == (40, 32, 32, 3) and xt.shape == (16, 32, 32, 3) and len(classes) == 10
    row = files["data_batch_1"]["data"][1]                           # image 1 of the first file
    assert x[1, 2, 5, 0] == row[2 * 32 + 5] and x[1, 2, 5, 1] == row[1024 + 2 * 32 + 5]
    assert x[1, 2, 5, 2] == row[2048 + 2 * 32 + 5] and y[1] == 1     # (H, W, RGB) from planes
    write_cifar(tmp_path / "c100", "cifar100", classes=100, n_train=200, n_test=100)
    *_, yt100, names = deit.read_cifar("cifar100", str(tmp_path / "c100"))
    assert len(names) == 100 and set(yt100.tolist()) == set(range(100))  # the fine labels

    def no_download(*a, **k):
        raise AssertionError("the files are there: nothing may be downloaded")
    monkeypatch.setattr(deit, "download_cifar", no_download)
    out = str(tmp_path / "out")
    res = deit.main(["--data", "cifar10", "--data-path", str(tmp_path / "c10"), "--output", out]
                    + CIFAR_TINY)
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert [r["epoch"] for r in log] == [1, 2] and all(math.isfinite(r["loss"]) for r in log)
    assert tensors(os.path.join(out, "checkpoint.pth"))["model"]["head.weight"].shape == (10, 32)
    assert 0 <= res["top1"] <= 100 and res["top5"] >= res["top1"]


def test_cifar_download_failure_and_corrupt_files_give_one_clear_line(tmp_path, monkeypatch):
    import torchvision

    class Offline:
        url, filename = "https://example.invalid/cifar-10-python.tar.gz", "cifar-10-python.tar.gz"

        def __init__(self, *a, **k):
            raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Offline)
    with pytest.raises(SystemExit) as e:
        deit.main(["--data", "cifar10", "--data-path", str(tmp_path / "empty")] + CIFAR_TINY)
    msg = str(e.value.code)
    assert msg.startswith("error: could not download cifar10") and "by hand" in msg
    assert "\n" not in msg
    write_cifar(tmp_path / "bad")
    with open(tmp_path / "bad" / "cifar-10-batches-py" / "data_batch_3", "wb") as f:
        f.write(b"\x80\x02 half a pickle")
    with pytest.raises(SystemExit) as e:
        deit.main(["--data", "cifar10", "--data-path", str(tmp_path / "bad")] + CIFAR_TINY)
    assert "data_batch_3" in str(e.value.code) and "corrupt" in str(e.value.code)


# ----------------------------------------------------------------------------------------------
# no per-step host sync; a NaN still stops training before a bad checkpoint


def count_item_calls(monkeypatch, fn):
    """Host reads of a tensor (.item(), .tolist(), float(), bool()) made by step 06's own code.
    (On CPU, torch's non-fused AdamW reads its step counters too; CUDA runs use the fused one.)"""
    calls = []
    for name in ("item", "tolist", "__float__", "__bool__"):
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, **k):
            if sys._getframe(1).f_code.co_filename == deit.__file__:
                calls.append(1)
            return _real(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)
    fn()
    monkeypatch.undo()
    return len(calls)


def one_epoch(steps, check_every, attn="softmax", poison_at=None):
    torch.manual_seed(0)
    x, y = deit.synthetic_shapes(8, 16, seed=0)
    batch = ((x.float() / 255 - 0.5) / 0.25, y)
    model = small_vit(attn, num_classes=10, depth=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = deit.lr_schedule(opt, 1e-3, 1e-3, 1e-3, 0, steps)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    args = argparse.Namespace(amp="none", clip_grad=5.0, check_every=check_every)
    loader = [batch] * steps
    if poison_at is not None:
        loader[poison_at] = (batch[0] * float("nan"), batch[1])
    return deit.train_one_epoch(model, loader, nn.CrossEntropyLoss(), opt, sched, scaler, None,
                                torch.device("cpu"), args, epoch=3)


def test_no_host_sync_per_step(monkeypatch):
    # .item() (a GPU -> host sync) a fixed number of times per epoch, not once per step
    few = count_item_calls(monkeypatch, lambda: one_epoch(4, check_every=1000))
    many = count_item_calls(monkeypatch, lambda: one_epoch(12, check_every=1000))
    assert few == many <= 3, (few, many)
    checked = count_item_calls(monkeypatch, lambda: one_epoch(12, check_every=4))
    assert many < checked <= many + 3 * 3                  # a look every 4 steps: 3 looks more


def test_nan_between_checks_is_found_with_its_step():
    with pytest.raises(deit.UserError, match=r"loss is nan at epoch 3, step 6"):
        one_epoch(12, check_every=4, poison_at=5)        # seen at the look after step 8
    with pytest.raises(deit.UserError, match=r"loss is nan at epoch 3, step 3"):
        one_epoch(3, check_every=1000, poison_at=2)      # seen at the epoch's end


def test_nan_at_a_later_step_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    deit.main(TINY + ["--epochs", "1", "--output", out, "--check-every", "2"])
    good = weights(f"{out}/checkpoint.pth")
    real_forward, calls = deit.VisionTransformer.forward, []

    def nan_at_third_training_step(self, x):
        calls.append(self.training)
        bad = self.training and sum(calls) == 3
        return real_forward(self, x) * (float("nan") if bad else 1.0)
    monkeypatch.setattr(deit.VisionTransformer, "forward", nan_at_third_training_step)
    with pytest.raises(SystemExit) as e:
        deit.main(TINY + ["--epochs", "2", "--output", out, "--check-every", "2"])
    assert "loss is nan at epoch 2, step 3" in str(e.value.code)
    ckpt = tensors(f"{out}/checkpoint.pth")
    assert ckpt["epoch"] == 1 and all(torch.equal(good[k], v) for k, v in ckpt["model"].items())


# ----------------------------------------------------------------------------------------------
# the GPU code paths, run on CPU: bf16 autocast and torch.compile against eager float32

# bf16 keeps 8 bits of mantissa (relative step 2^-8 = 0.4%); through two blocks and the head the
# logits of these small models stay within 3% of their largest value, the losses within 0.02.
BF16_LOGITS, BF16_LOSS = 0.03, 0.02
COMPILE_LOGITS, COMPILE_LOSS = 1e-4, 1e-4   # float32 both: only the order of sums changes


def train_steps(run, model, batch, args, steps=8):
    """`steps` one-batch epochs of the script's train_one_epoch, then its evaluate."""
    opt = torch.optim.AdamW(deit.param_groups(model, 0.05), lr=3e-3)
    sched = deit.lr_schedule(opt, 3e-3, 3e-3, 3e-3, 0, steps)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    losses = [deit.train_one_epoch(run, [batch], nn.CrossEntropyLoss(), opt, sched, scaler, None,
                                   torch.device("cpu"), args) for _ in range(steps)]
    return losses, deit.evaluate(run, [batch], torch.device("cpu"), args)


@pytest.mark.parametrize("attn", ["softmax", "final"])
@pytest.mark.parametrize("mode", ["bf16", "compile"])
def test_gpu_paths_on_cpu_agree_with_eager_float32(attn, mode):
    import copy
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    x, y = deit.synthetic_shapes(16, 16, seed=2)
    batch = ((x.float() / 255 - 0.5) / 0.25, y)
    eager = small_vit(attn, num_classes=10)
    other = copy.deepcopy(eager)
    f32 = argparse.Namespace(amp="none", clip_grad=5.0, check_every=50)
    args = argparse.Namespace(**{**vars(f32), "amp": "bf16" if mode == "bf16" else "none"})
    run, _ = deit.prepare(other, torch.device("cpu"), 1, compile=mode == "compile")
    eager.eval(), run.eval()
    with torch.no_grad(), deit.autocast(torch.device("cpu"), args.amp):
        ref, got = eager(batch[0]), run(batch[0])
    if mode == "bf16":
        assert got.dtype == torch.bfloat16                   # autocast really ran in bf16
    tol_logits, tol_loss = {"bf16": (BF16_LOGITS, BF16_LOSS),
                            "compile": (COMPILE_LOGITS, COMPILE_LOSS)}[mode]
    err = (got.float() - ref).abs().max() / ref.abs().max()
    assert err < tol_logits, f"{mode} logits differ from eager float32 by {err:.2e} of the max"

    ref_losses, ref_acc = train_steps(eager, eager, batch, f32)
    graphs_before = counters["stats"]["unique_graphs"]       # the eval graph compiled above
    losses, acc = train_steps(run, other, batch, args)
    assert ref_losses[-1] < ref_losses[0] and losses[-1] < losses[0]   # both learn
    diffs = [abs(a - b) for a, b in zip(losses, ref_losses)]
    assert max(diffs) < tol_loss, f"{mode} losses {losses} vs eager float32 {ref_losses}"
    assert abs(acc[0] - ref_acc[0]) <= 100 / 16 + 1e-6       # at most one image flips
    if mode == "compile":
        # static shapes: the training graph is compiled once (forward + backward) and reused
        # for all 8 steps, and evaluate reuses the eval graph; nothing recompiles
        graphs = counters["stats"]["unique_graphs"]
        assert graphs_before >= 1 and graphs - graphs_before == 1, dict(counters["stats"])


def test_demo_runs_end_to_end_in_bf16(tmp_path):
    out = str(tmp_path / "bf16")
    res = deit.main(TINY + ["--epochs", "1", "--output", out, "--amp", "bf16"])
    log = json.loads(open(os.path.join(out, "log.jsonl")).readline())
    assert math.isfinite(log["loss"]) and 0 <= res["top1"] <= 100
    assert tensors(os.path.join(out, "checkpoint.pth"))["args"]["amp"] == "bf16"


# ----------------------------------------------------------------------------------------------
# --analyze, --plot, --summary and the final module's switches


def test_analyze_measures_known_attention_patterns():
    torch.manual_seed(0)
    model = small_vit("softmax", img_size=28, patch_size=4)  # a 7 x 7 grid + class token
    images = torch.randn(3, 3, 28, 28)
    with torch.no_grad():  # zero q, k: every softmax row is uniform over the N tokens
        for blk in model.blocks:
            blk.attn.qkv.weight[:48].zero_()
            blk.attn.qkv.bias[:48].zero_()
    rows = deit.analyze(model, images, tol=1e-6)
    assert [r["block"] for r in rows] == [1, 2]
    for r in rows:
        for w in deit.WINDOWS:  # local attention mass (Fig. 4) of uniform rows is the baseline
            assert r[f"mass_{w}"] == pytest.approx(r[f"uniform_{w}"], rel=1e-9)
        assert r["uniform_3"] == pytest.approx(sum(  # 3x3 windows clipped at the border / N
            min(i + 1, 6) - max(i - 1, 0) + 1 for i in range(7)) ** 2 / 49 / 50, rel=1e-9)
        assert r["confused"] == r["pairs"] == 49 * 48 // 2  # every pair of rows is the same
        assert r["rank_kv"] == pytest.approx(1.0) and r["rank_kv_max"] == 50  # uniform: rank 1
    with torch.no_grad():  # q = k = 30 U x, U orthogonal: LayerNorm gives every token the same
        for blk in model.blocks:  # norm, so q_i . k_j is largest at j = i: each query attends to itself
            u = torch.linalg.qr(torch.randn(24, 24))[0]
            blk.attn.qkv.weight[:24], blk.attn.qkv.weight[24:48] = 30 * u, 30 * u
    rows = deit.analyze(model, images, tol=1e-6)
    assert all(r["mass_3"] > 0.9 and r["mass_3"] / r["uniform_3"] > 5 for r in rows)
    assert all(r["confused"] < 0.01 * r["pairs"] for r in rows)  # distinct tokens: distinct rows


@pytest.mark.parametrize("attn", list(deit.ATTENTIONS))
def test_analyze_every_attention_on_a_fresh_model(attn):
    torch.manual_seed(0)
    model = small_vit(attn)
    rows = deit.analyze(model, torch.randn(2, 3, 16, 16))
    assert len(rows) == 2
    kv_max = 17 if attn == "softmax" else 12  # N x N weights, or d x d buffers (24 / 2 heads)
    for r in rows:
        assert all(0 <= r[f"mass_{w}"] <= 1.0 + 1e-9 or attn in ("injective", "inline", "final")
                   for w in deit.WINDOWS)  # InLine's weights may be negative, so may its mass
        assert 0 <= r["confused"] <= r["pairs"] == 16 * 15 // 2
        assert 1 <= r["rank_kv"] <= r["rank_kv_max"] == kv_max
        assert 1 <= r["rank_out"] <= r["rank_out_max"] == 24
    assert all(p.dtype == torch.float32 for p in model.parameters())  # measured in a copy's dtype


def test_analyze_then_plot_and_summary_from_the_command_line(tmp_path, capsys):
    runs = [str(tmp_path / f"softmax-{s}") for s in (0, 1)]
    for seed, out in zip((0, 1), runs):
        deit.main(TINY + ["--attn", "softmax", "--epochs", "2", "--seed", str(seed),
                          "--output", out])
    capsys.readouterr()
    rows = deit.main(TINY + ["--attn", "softmax", "--output", runs[0], "--analyze",
                             "--analyze-images", "8", "--plot", str(tmp_path / "fig")])
    out = capsys.readouterr().out
    assert f"analysis of softmax ({runs[0]}{os.sep}checkpoint.pth)" in out  # its own weights
    assert len(rows) == 2 and "block | 3x3 mass" in out
    saved = json.load(open(os.path.join(runs[0], "analysis.json")))
    assert saved["label"] == "softmax" and saved["blocks"] == rows and saved["images"] == 8
    for name in ("training_curves.png", "local_mass.png"):
        png = (tmp_path / "fig" / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    groups = deit.main(["--summary", "--runs", *runs])
    table = capsys.readouterr().out
    top1 = [json.loads(open(os.path.join(r, "log.jsonl")).readlines()[-1])["top1"] for r in runs]
    assert len(groups["softmax"]) == 2
    assert f"| softmax | 2 | {np.mean(top1):.1f} +- {np.std(top1, ddof=1):.1f} |" in table


def test_final_module_parts_switch_off_from_the_command_line(tmp_path):
    args = deit.get_args(["--attn", "final", "--no-gate", "--no-local"])
    model = deit.build_model(args, 10)
    attn = model.blocks[0].attn
    assert attn.gate is None and attn.residual is None and attn.reweight
    assert args.output.endswith("demo-final-no-gate-no-local")
    proc = subprocess.run([sys.executable, SCRIPT, "--attn", "softmax", "--no-gate"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "not of --attn softmax" in proc.stderr


def test_quick_shortens_only_the_demo_and_flags_still_win():
    quick = deit.get_args(["--quick"])
    assert all(getattr(quick, k) == v for k, v in deit.QUICK.items())
    assert quick.img_size == deit.DEMO["img_size"] and quick.lr == deit.DEMO["lr"]  # same model
    full = deit.get_args([])
    assert full.demo_train > quick.demo_train and full.epochs > quick.epochs
    assert deit.get_args(["--quick", "--epochs", "7"]).epochs == 7
    with pytest.raises(SystemExit):
        deit.get_args(["--quick", "--data", "cifar10"])
