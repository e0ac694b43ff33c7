"""Step 06: the DeiT-T model (timm's names, shapes, init, logits), weights and checkpoints, the
recipe (timm's schedule, weight-decay groups, augmentation, sampler), the train / eval loop
(accumulation, clipping, NaN stop, float32 evaluation), and the script end to end on CPU: exact
resume after Ctrl-C, ImageFolder and CIFAR data, a 2-process torchrun, and one error line for
each bad input."""
import argparse
import copy
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import types
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import ROOT, load

deit = load("06_train_deit")
SCRIPT = os.path.join(ROOT, "06_train_deit.py")
CPU = torch.device("cpu")

# a small model / demo run that takes a second on CPU; drop-path on, so resume needs the RNG.
# 64 images / batch 16 = 4 steps an epoch, 48 held out
TINY = ["--img-size", "16", "--patch-size", "4", "--embed-dim", "32", "--depth", "2",
        "--num-heads", "2", "--drop-path", "0.1", "--batch-size", "16", "--demo-train", "64",
        "--demo-val", "48", "--warmup-epochs", "1"]
# the same for an ImageFolder / CIFAR run (32 px, 8 px patches: 16 tokens + the class token)
FOLDER_TINY = ["--img-size", "32", "--patch-size", "8", "--embed-dim", "32", "--depth", "1",
               "--num-heads", "2", "--workers", "0"]


def small_vit(attn="final", **kw):
    return deit.VisionTransformer(**{"img_size": 16, "patch_size": 4, "num_classes": 5,
                                     "embed_dim": 24, "depth": 2, "num_heads": 2,
                                     "drop_path_rate": 0.0, **kw}, attn=attn)


def loop_args(**kw):
    """What train_one_epoch reads from the flags."""
    return argparse.Namespace(**{"amp": "none", "clip_grad": 0.0, "accum_steps": 1,
                                 "check_every": 50, **kw})


def opt_args(**kw):
    """What make_optimizer reads from the flags."""
    return argparse.Namespace(**{"lr": 1e-3, "betas": (0.9, 0.999), "weight_decay": 0.05, **kw})


def shapes_batch(n, img_size=16, seed=0):
    x, y = deit.synthetic_tiles(n, img_size, 4, seed=seed)
    return (x.float() / 255 - 0.5) / 0.25, y


def tensors(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def weights(path):
    return tensors(path)["model"]


def log_of(out):
    return [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]


def exit_line(argv):
    """The one line main() exits with (SystemExit), checked to be a single line."""
    with pytest.raises(SystemExit) as e:
        deit.main(argv)
    line = str(e.value.code)
    assert line.startswith("error: ") and "\n" not in line and "Traceback" not in line, line
    return line


def usage_error(argv, capsys):
    """argparse's usage error: exit status 2, its message on stderr."""
    with pytest.raises(SystemExit) as e:
        deit.get_args(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def record_optimizers(monkeypatch):
    """The optimizers train() makes, each with the lrs of its param groups at every update."""
    made, real = [], deit.make_optimizer

    def spy(model, args, device):
        opt = real(model, args, device)
        opt.lrs = []
        opt.register_step_pre_hook(lambda o, a, k: o.lrs.append([g["lr"] for g in
                                                                o.param_groups]))
        made.append(opt)
        return opt
    monkeypatch.setattr(deit, "make_optimizer", spy)
    return made


# ----------------------------------------------------------------------------------------------
# the model


@pytest.fixture(scope="module")
def timm_deit_tiny():
    timm = pytest.importorskip("timm")
    return timm.create_model("deit_tiny_patch16_224", pretrained=False)


def test_softmax_deit_tiny_is_timms_deit_tiny(timm_deit_tiny):
    ref = timm_deit_tiny
    model = deit.VisionTransformer(attn="softmax", num_heads=3)
    assert [(k, v.shape) for k, v in model.state_dict().items()] == \
        [(k, v.shape) for k, v in ref.state_dict().items()]          # key for key, in order
    assert sum(p.numel() for p in model.parameters()) == 5_717_416
    assert deit.VisionTransformer(attn="softmax").num_heads == 3      # the default for softmax
    ref = copy.deepcopy(ref).double().eval()
    torch.manual_seed(0)
    with torch.no_grad():  # norms away from 1 / 0, so eps and the affine terms matter
        for m in ref.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    model.double().eval()
    deit.load_weights(model, ref.state_dict(), "timm")                # timm's weights, strictly
    x = torch.randn(2, 3, 224, 224, dtype=torch.float64)
    with torch.no_grad():
        ours, theirs = model(x), ref(x)
    assert theirs.abs().max() > 0.1
    assert torch.allclose(ours, theirs, atol=1e-10, rtol=0), (ours - theirs).abs().max()


def test_inline_deit_tiny_is_the_official_count(timm_deit_tiny):
    model = deit.VisionTransformer(attn="inline", num_heads=6)
    assert sum(p.numel() for p in model.parameters()) == 6_477_736
    keys, timm_keys = set(model.state_dict()), set(timm_deit_tiny.state_dict())
    assert keys >= timm_keys  # every timm name, plus the local residual
    assert keys - timm_keys == {f"blocks.{i}.attn.residual.{j}.{p}" for i in range(12)
                                for j in (0, 2) for p in ("weight", "bias")}
    assert deit.VisionTransformer(attn="inline").num_heads == 6
    assert deit.VisionTransformer().num_heads == 6


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


def test_timm_initialisation_and_drop_path_schedule():
    torch.manual_seed(0)
    model = deit.VisionTransformer(attn="final")
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
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for b in model.blocks]  # 0: nn.Identity
    assert rates == pytest.approx([0.1 * i / 11 for i in range(12)])
    x = torch.randn(2, 3, 224, 224)
    model.train()  # drop-path drops whole samples' branches in training ...
    torch.manual_seed(1)
    assert not torch.equal(model(x), model(x))
    model.eval()   # ... and nothing at evaluation: deterministic
    assert torch.equal(model(x), model(x))


def test_model_errors():
    with pytest.raises(ValueError, match="img_size=225 is not divisible by patch_size=16"):
        deit.VisionTransformer(img_size=225)
    with pytest.raises(ValueError, match="unknown attention 'flash'"):
        deit.VisionTransformer(attn="flash")
    with pytest.raises(ValueError, match="num_heads=5"):
        deit.VisionTransformer(num_heads=5)
    # build_model names the flags (and the dataset that chose them) in a UserError
    patch = deit.DATASETS["demo"]["patch_size"]
    args = deit.get_args(["--img-size", str(3 * patch + 1)])
    with pytest.raises(deit.UserError, match=rf"img_size={3 * patch + 1} is not divisible by "
                       rf"patch_size={patch}.*\(--data demo: --img-size {3 * patch + 1} "
                       rf"--patch-size {patch} --embed-dim 96\)"):
        deit.build_model(args, 10)


def test_final_module_parts_switch_off_from_the_command_line(capsys):
    args = deit.get_args(["--attn", "final", "--no", "local", "gate"])
    assert deit.model_label(args) == "final-no-gate-no-local"
    model = deit.build_model(args, 10)
    attn = model.blocks[0].attn
    assert attn.gate is None and attn.residual is None and attn.reweight
    assert args.output == os.path.join("runs", "demo-final-no-gate-no-local")
    full = deit.build_model(deit.get_args([]), 10).blocks[0].attn
    assert full.gate is not None and full.residual is not None and full.reweight
    err = usage_error(["--attn", "softmax", "--no", "gate"], capsys)
    assert "--no: the parts of --attn softmax are none" in err
    err = usage_error(["--attn", "final", "--no", "gates"], capsys)
    assert "--no: the parts of --attn final are reweight, gate, local" in err


# ----------------------------------------------------------------------------------------------
# weights: strict loading, another resolution, official InLine files, what read_checkpoint refuses


def test_load_weights_is_strict_in_one_line_and_resamples_pos_embed_as_timm(tmp_path):
    from timm.layers import resample_abs_pos_embed
    sd = small_vit().state_dict()
    same = small_vit()
    deit.load_weights(same, sd, "bare.pth")                          # a state_dict
    assert all(torch.equal(v, same.state_dict()[k]) for k, v in sd.items())
    big = small_vit(img_size=24)                                     # 6 x 6 patches, not 4 x 4
    deit.load_weights(big, {"model": sd, "epoch": 3}, "wrapped.pth")  # {"model": state_dict}
    assert big.pos_embed.shape == (1, 37, 24)
    assert torch.equal(big.pos_embed, resample_abs_pos_embed(sd["pos_embed"], [6, 6]))
    assert torch.equal(big.pos_embed[:, 0], sd["pos_embed"][:, 0])  # the class token's own
    assert torch.equal(big.blocks[1].attn.qkv.weight, sd["blocks.1.attn.qkv.weight"])
    with pytest.raises(deit.UserError) as e:
        deit.load_weights(small_vit(num_classes=7), sd, "bare.pth")
    line = str(e.value)
    assert line.startswith("bare.pth does not fit the model: ") and "\n" not in line
    assert "size mismatch for head.weight" in line and "torch.Size([5, 24])" in line
    with pytest.raises(deit.UserError) as e:  # strict: a missing part of the model is an error
        deit.load_weights(small_vit(), small_vit("softmax").state_dict(), "softmax.pth")
    assert "does not fit the model" in str(e.value) and "Missing key(s)" in str(e.value) \
        and "blocks.0.attn.residual" in str(e.value)
    extra = {**sd, "dist_token": torch.zeros(1, 1, 24)}
    with pytest.raises(deit.UserError, match="Unexpected key.*dist_token"):
        deit.load_weights(small_vit(), extra, "extra.pth")


def test_load_weights_refuses_a_pos_embed_of_no_square_grid_in_one_line():
    # A distilled DeiT (timm's deit_tiny_distilled_patch16_224) has two prefix tokens: its
    # pos_embed holds 1 + 1 + 14*14 rows. Resampling it as one class token + a grid fails inside
    # timm; that must be the one-line UserError, not a RuntimeError with a traceback.
    sd = {**small_vit().state_dict(), "pos_embed": torch.randn(1, 2 + 16, 24)}
    with pytest.raises(deit.UserError, match="does not fit the model"):
        deit.load_weights(small_vit(), sd, "distilled.pth")


def test_load_weights_refuses_weights_the_model_has_no_place_for():
    # Official InLine-DeiT weights (with the local residual) into the final module with every
    # part switched off but not its local residual's place: `self.residual = None` keeps the
    # name among the submodules, and torch's strict load then skips the file's residual.*
    # weights silently. Strict must mean every weight of the file is used.
    src = small_vit("inline")
    args = deit.get_args(["--img-size", "16", "--patch-size", "4", "--embed-dim", "24",
                          "--depth", "2", "--num-heads", "2", "--attn", "final", "--no", "local",
                          "gate", "reweight"])
    model = deit.build_model(args, 5)
    assert set(model.state_dict()) < set(src.state_dict())
    with pytest.raises(deit.UserError, match=r"inline.pth does not fit the model.*"
                                             r"blocks.0.attn.residual"):
        deit.load_weights(model, src.state_dict(), "inline.pth")


def make_inline_checkpoint(path, monkeypatch, state_dict):
    """A file as the official InLine main.py saves it: weights beside its yacs CfgNode config.
    yacs is not installed: a stand-in CfgNode (a dict, with its attribute dict as yacs's) is
    registered as yacs.config for the pickling only."""
    yacs, config = types.ModuleType("yacs"), types.ModuleType("yacs.config")

    class CfgNode(dict):
        def __init__(self, init=None):
            super().__init__(init or {})
            self.__dict__["__immutable__"] = False

    CfgNode.__module__, CfgNode.__qualname__ = "yacs.config", "CfgNode"
    config.CfgNode, yacs.config = CfgNode, config
    monkeypatch.setitem(sys.modules, "yacs", yacs)
    monkeypatch.setitem(sys.modules, "yacs.config", config)
    cfg = CfgNode({"MODEL": CfgNode({"TYPE": "inline_deit", "NUM_CLASSES": 10}),
                   "TRAIN": CfgNode({"BASE_LR": 5e-4, "EPOCHS": 300})})
    torch.save({"model": state_dict, "optimizer": {"state": {}, "param_groups": []},
                "max_accuracy": 74.5, "epoch": 299, "config": cfg}, path)
    monkeypatch.delitem(sys.modules, "yacs")
    monkeypatch.delitem(sys.modules, "yacs.config")


def test_official_inline_checkpoint_with_a_yacs_config_loads_without_yacs(tmp_path, monkeypatch,
                                                                            capsys):
    path = str(tmp_path / "inline_deit_t.pth")
    args = deit.get_args(TINY + ["--attn", "inline"])
    torch.manual_seed(5)
    src = deit.build_model(args, 16).eval()
    make_inline_checkpoint(path, monkeypatch, src.state_dict())
    assert "yacs" not in sys.modules
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(path, weights_only=True)  # plain weights_only: the CfgNode is not allowed
    ckpt = deit.read_checkpoint(path)
    assert type(ckpt["config"]) is OrderedDict and ckpt["epoch"] == 299
    assert ckpt["config"]["MODEL"]["TYPE"] == "inline_deit"
    assert ckpt["config"]["TRAIN"]["BASE_LR"] == 5e-4
    model = deit.build_model(args, 16)
    deit.load_weights(model, ckpt, path)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in src.state_dict().items())
    # from the command line: --eval-only --pretrained, strictly, the same top-1 as the source
    res = deit.main(TINY + ["--attn", "inline", "--eval-only", "--pretrained", path,
                            "--output", str(tmp_path / "out")])
    _, val, _, _ = deit.make_data(args)
    expected = deit.evaluate(src, DataLoader(val, batch_size=16), CPU)
    assert (res["top1"], res["top5"]) == pytest.approx(expected)
    assert f"{path}: top-1 {expected[0]:.2f}%" in capsys.readouterr().out


class Payload:
    """An object whose unpickling would run code (it makes a folder)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (self.marker,)


def test_read_checkpoint_runs_no_code_and_names_what_is_wrong(tmp_path):
    with pytest.raises(deit.UserError, match="nowhere.pth does not exist"):
        deit.read_checkpoint(str(tmp_path / "nowhere.pth"))
    (tmp_path / "junk.pth").write_bytes(b"PK\x03\x04 definitely not a checkpoint")
    with pytest.raises(deit.UserError, match=r"cannot read checkpoint .*junk.pth \(damaged, or "
                                             r"not a torch file\)"):
        deit.read_checkpoint(str(tmp_path / "junk.pth"))
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    with pytest.raises(deit.UserError, match="holds a list, not a state_dict"):
        deit.read_checkpoint(str(tmp_path / "list.pth"))
    marker = str(tmp_path / "code_ran")
    torch.save({"model": Payload(marker)}, tmp_path / "code.pth")
    with pytest.raises(deit.UserError, match="cannot read checkpoint"):
        deit.read_checkpoint(str(tmp_path / "code.pth"))
    assert not os.path.exists(marker)  # weights_only: the payload never ran


# ----------------------------------------------------------------------------------------------
# checkpoints of a run: atomic, a sha256sum file beside, the log, the best epoch, exact resume


def test_save_checkpoint_is_atomic_with_a_sha256sum_file(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pth")
    deit.save_checkpoint({"w": torch.arange(5.0)}, path)
    digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
    assert open(path + ".sha256").read() == f"{digest}  checkpoint.pth\n"  # sha256sum's format
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pth", "checkpoint.pth.sha256"]
    if shutil.which("sha256sum"):
        check = subprocess.run(["sha256sum", "-c", "checkpoint.pth.sha256"], cwd=tmp_path,
                               capture_output=True, text=True)
        assert check.returncode == 0 and "checkpoint.pth: OK" in check.stdout
    # a crash (here a full disk) half way through writing the next one leaves this one intact
    real_save = torch.save

    def full_disk(obj, f):
        f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError):
        deit.save_checkpoint({"w": torch.zeros(5)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.equal(deit.read_checkpoint(path)["w"], torch.arange(5.0))  # digest still fits


def test_training_checkpoint_log_and_best_epoch(tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    scores = iter([(50.0, 90.0), (70.0, 95.0), (60.0, 96.0)])  # epoch 2 is the best
    monkeypatch.setattr(deit, "evaluate", lambda *a, **k: next(scores))
    saved, real_save = [], deit.save_checkpoint

    def spy(obj, path):
        saved.append((os.path.basename(path), copy.deepcopy(obj["model"])))
        real_save(obj, path)
    monkeypatch.setattr(deit, "save_checkpoint", spy)
    res = deit.main(TINY + ["--epochs", "3", "--output", out])
    assert res == {"best_top1": 70.0, "top1": 60.0, "top5": 96.0}
    # a checkpoint every epoch, best.pth when an epoch is the best so far
    assert [name for name, _ in saved] == ["checkpoint.pth", "best.pth", "checkpoint.pth",
                                           "best.pth", "checkpoint.pth"]
    ckpt = deit.read_checkpoint(os.path.join(out, "checkpoint.pth"))
    assert set(ckpt) == {"model", "optimizer", "scaler", "log", "args"}
    log = log_of(out)
    assert ckpt["log"] == log                                       # the lines of log.jsonl
    assert [r["epoch"] for r in log] == [1, 2, 3] and [r["top1"] for r in log] == [50, 70, 60]
    assert [r["best_top1"] for r in log] == [50, 70, 70]
    assert {"loss", "lr", "top5", "train_s", "images_per_s", "data_wait_s", "time_s"} <= set(log[0])
    assert 0 <= log[0]["data_wait_s"] <= log[0]["train_s"]
    assert ckpt["args"]["attn"] == "final" and ckpt["args"]["epochs"] == 3
    assert all(torch.equal(v, saved[-1][1][k]) for k, v in ckpt["model"].items())
    best = deit.read_checkpoint(os.path.join(out, "best.pth"))
    assert set(best) == {"model", "epoch", "top1", "args"}
    assert best["epoch"] == 2 and best["top1"] == 70.0
    assert all(torch.equal(v, saved[2][1][k]) for k, v in best["model"].items())  # epoch 2's
    assert not torch.equal(best["model"]["head.weight"], ckpt["model"]["head.weight"])
    for name in ("checkpoint.pth", "best.pth"):
        digest = hashlib.sha256(open(os.path.join(out, name), "rb").read()).hexdigest()
        assert open(os.path.join(out, name + ".sha256")).read() == f"{digest}  {name}\n"
    assert sorted(os.listdir(out)) == ["best.pth", "best.pth.sha256", "checkpoint.pth",
                                       "checkpoint.pth.sha256", "log.jsonl"]  # no .tmp left


@pytest.fixture(scope="module")
def one_epoch_run(tmp_path_factory):
    """A run directory after `TINY --epochs 1`, made once; tests copy it."""
    out = str(tmp_path_factory.mktemp("one_epoch") / "run")
    deit.main(TINY + ["--epochs", "1", "--output", out])
    return out


def copy_run(one_epoch_run, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(one_epoch_run, out)
    return out, os.path.join(out, "checkpoint.pth")


def test_resume_after_ctrl_c_is_bit_identical(tmp_path, capsys, monkeypatch):
    straight, split = str(tmp_path / "a"), str(tmp_path / "b")
    argv = TINY + ["--epochs", "3"]
    deit.main(argv + ["--output", straight])
    real_evaluate, calls = deit.evaluate, []

    def ctrl_c_in_epoch_2(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C while epoch 2 is being evaluated
        return real_evaluate(*args, **kw)
    monkeypatch.setattr(deit, "evaluate", ctrl_c_in_epoch_2)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        deit.main(argv + ["--output", split])
    assert e.value.code == 130
    ckpt = os.path.join(split, "checkpoint.pth")
    said = capsys.readouterr()
    assert said.err == f"interrupted: the same command resumes from {ckpt}\n"  # one line
    assert "epoch 1/3 |" in said.out and "epoch 2/3 |" not in said.out
    assert len(deit.read_checkpoint(ckpt)["log"]) == 1 and len(log_of(split)) == 1
    after_epoch_1 = weights(ckpt)
    monkeypatch.undo()
    deit.main(argv + ["--output", split])  # the same command finds b/checkpoint.pth by itself
    said = capsys.readouterr().out
    assert f"resuming automatically from {ckpt}: 1 of 3 epochs done; to start afresh add " \
           f"--fresh or choose another --output" in said, said
    assert [line.split("|")[0].strip() for line in said.splitlines()
            if line.startswith("epoch ")] == ["epoch 2/3", "epoch 3/3"]
    a, b = weights(f"{straight}/checkpoint.pth"), weights(ckpt)
    assert all(torch.equal(a[k], b[k]) for k in a)       # drop-path, shuffle: the same numbers
    timing = ("train_s", "images_per_s", "data_wait_s", "time_s")
    la, lb = ([{k: v for k, v in r.items() if k not in timing} for r in log_of(run)]
              for run in (straight, split))
    assert la == lb and [r["epoch"] for r in lb] == [1, 2, 3]
    # and the run did learn something in between: resuming is not the same as restarting
    assert not torch.equal(b["head.weight"], after_epoch_1["head.weight"])


def test_ctrl_c_before_the_first_checkpoint_says_nothing_is_saved(tmp_path, capsys,
                                                                  monkeypatch):
    real_forward, steps = deit.VisionTransformer.forward, []

    def ctrl_c(self, x):  # at the second training step of epoch 1
        steps.append(self.training)
        if sum(steps) == 2:
            raise KeyboardInterrupt
        return real_forward(self, x)
    monkeypatch.setattr(deit.VisionTransformer, "forward", ctrl_c)
    out = str(tmp_path / "new")
    with pytest.raises(SystemExit) as e:
        deit.main(TINY + ["--epochs", "1", "--output", out])
    assert e.value.code == 130
    assert capsys.readouterr().err == "interrupted before the first checkpoint (after epoch 1)\n"
    assert not os.path.exists(os.path.join(out, "checkpoint.pth"))


def test_automatic_resume_says_so_and_refuses_a_changed_model(one_epoch_run, tmp_path, capsys,
                                                              monkeypatch):
    out, ckpt = copy_run(one_epoch_run, tmp_path)
    before = weights(ckpt)
    capsys.readouterr()
    # the same command again: it says that it resumes, from where, how to start afresh; there
    # is nothing left to train
    res = deit.main(TINY + ["--epochs", "1", "--output", out])
    said = capsys.readouterr().out
    assert f"resuming automatically from {ckpt}: 1 of 1 epochs done; to start afresh add " \
           f"--fresh or choose another --output" in said, said
    assert "epoch 1/1 |" not in said and res["best_top1"] == log_of(out)[0]["top1"]
    # a changed setting of the model: one line that says so, what differs, what to do
    line = exit_line(TINY + ["--epochs", "2", "--output", out, "--embed-dim", "64"])
    assert line.startswith(f"error: the model changed since the run in {ckpt} "), line
    assert "--embed-dim 32 then, 64 now" in line and "--fresh" in line and "--output" in line
    assert "--attn final then, inline now" in exit_line(TINY + ["--output", out,
                                                                "--attn", "inline"])
    # a changed model with the same flags (an edited module): the weights do not fit
    final = deit.ATTENTIONS["final"]
    monkeypatch.setitem(deit.ATTENTIONS, "final", lambda *a, **k: final(*a, **k, gate=False))
    line = exit_line(TINY + ["--epochs", "2", "--output", out])
    assert f"{ckpt} does not fit the model" in line and "Unexpected key(s)" in line and \
        "blocks.0.attn.gate.weight" in line, line
    monkeypatch.undo()
    # best.pth is weights, not a run to continue
    line = exit_line(TINY + ["--epochs", "2", "--output", str(tmp_path / "x"), "--resume",
                             os.path.join(out, "best.pth")])
    assert "best.pth is not a training checkpoint of this script" in line and \
        "--pretrained" in line
    # --fresh: from scratch (here another seed), over the old run
    deit.main(TINY + ["--epochs", "1", "--output", out, "--fresh", "--seed", "1"])
    assert "resuming" not in capsys.readouterr().out
    assert len(log_of(out)) == 1
    assert not torch.equal(weights(ckpt)["head.weight"], before["head.weight"])


def flip_middle_bytes(path, n=16):
    data = bytearray(open(path, "rb").read())
    mid = len(data) // 2
    data[mid:mid + n] = bytes(b ^ 0xFF for b in data[mid:mid + n])
    open(path, "wb").write(bytes(data))


def all_tensors(obj):
    """Every tensor in a nested checkpoint, in a fixed order."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for k in sorted(obj, key=str) for t in all_tensors(obj[k])]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in all_tensors(v)]
    return []


def test_damaged_checkpoint_is_refused(one_epoch_run, tmp_path):
    out, ckpt = copy_run(one_epoch_run, tmp_path)
    saved = tensors(ckpt)
    flip_middle_bytes(ckpt)
    damaged = tensors(ckpt)  # torch.load itself notices nothing: the bytes were in a tensor
    assert set(damaged) == set(saved)
    assert any(not torch.equal(a, b) for a, b in zip(all_tensors(saved), all_tensors(damaged)))
    for argv in (["--output", out], ["--resume", ckpt, "--output", str(tmp_path / "b")]):
        line = exit_line(TINY + ["--epochs", "2"] + argv)
        assert line.startswith(f"error: checkpoint {ckpt} is damaged: it does not match the "
                               f"SHA-256 in {ckpt}.sha256"), line
        assert "--fresh" in line
    deit.main(TINY + ["--epochs", "1", "--output", out, "--fresh"])  # --fresh reads nothing
    assert len(deit.read_checkpoint(ckpt)["log"]) == 1


def test_resumed_optimizer_is_fused_only_on_cuda(one_epoch_run, tmp_path, monkeypatch):
    # a checkpoint made on a GPU (fused AdamW) resumes on CPU with the CPU implementation
    out, ckpt = copy_run(one_epoch_run, tmp_path)
    saved = deit.read_checkpoint(ckpt)
    for group in saved["optimizer"]["param_groups"]:
        group["fused"] = True
    deit.save_checkpoint(saved, ckpt)
    made = record_optimizers(monkeypatch)
    deit.main(TINY + ["--epochs", "2", "--output", out])
    assert len(made) == 1 and len(made[0].lrs) == 4            # resumed and trained epoch 2
    assert all(not g["fused"] for g in made[0].param_groups)
    assert all(not g["fused"] for g in deit.read_checkpoint(ckpt)["optimizer"]["param_groups"])
    assert len(log_of(out)) == 2
    fresh = deit.make_optimizer(small_vit(), opt_args(), CPU)
    assert all(not g["fused"] for g in fresh.param_groups)


# ----------------------------------------------------------------------------------------------
# the recipe: optimizer groups, the schedule, accumulation, clipping


def test_make_optimizer_groups_are_timms_param_groups_weight_decay():
    from timm.optim import param_groups_weight_decay
    for model in (small_vit("final"), small_vit("softmax"), small_vit("rala")):
        opt = deit.make_optimizer(model, opt_args(weight_decay=0.07, betas=(0.8, 0.9)), CPU)
        ours = {g["weight_decay"]: {id(p) for p in g["params"]} for g in opt.param_groups}
        ref = {g["weight_decay"]: {id(p) for p in g["params"]} for g in param_groups_weight_decay(
            model, 0.07, no_weight_decay_list=("pos_embed", "cls_token"))}
        assert ours == ref and len(opt.param_groups) == 2
        names = {id(p): n for n, p in model.named_parameters()}
        assert {"pos_embed", "cls_token", "norm.weight", "head.bias"} <= \
            {names[i] for i in ours[0.0]}
        assert {"head.weight", "patch_embed.proj.weight"} <= {names[i] for i in ours[0.07]}
        assert opt.defaults["betas"] == (0.8, 0.9) and opt.defaults["lr"] == 1e-3
        assert isinstance(opt, torch.optim.AdamW)


@pytest.mark.parametrize("recipe", ["inline", "deit"])
def test_lr_schedule_equals_timms_cosine_scheduler(recipe, tmp_path):
    from timm.scheduler import CosineLRScheduler
    epochs, warmup, steps, batch = 7, 2, 5, 2048
    args = deit.get_args(["--data-path", str(tmp_path), "--recipe", recipe, "--epochs",
                          str(epochs), "--warmup-epochs", str(warmup)])
    lr_of = deit.lr_schedule(args, batch, steps)
    s = batch / 512  # InLine's main.py scales all three lrs, DeiT's main.py the peak only
    peak, warmup_lr, min_lr = args.lr * s, args.warmup_lr, args.min_lr
    if recipe == "inline":
        warmup_lr, min_lr = warmup_lr * s, min_lr * s
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=peak)
    sched = CosineLRScheduler(opt, t_initial=epochs * steps, lr_min=min_lr,
                              warmup_t=warmup * steps, warmup_lr_init=warmup_lr, cycle_limit=1,
                              t_in_epochs=False)
    ours, timms = [], []
    for u in range(epochs * steps + 3):  # and a few past the end: the floor
        sched.step_update(u)
        ours.append(lr_of(u))
        timms.append(opt.param_groups[0]["lr"])
    assert ours == pytest.approx(timms, rel=1e-12, abs=0)
    # the warm-up rises towards the peak, where the cosine over the whole run would be; after
    # the run the floor
    assert ours[0] == pytest.approx(warmup_lr) and ours[-1] == pytest.approx(min_lr)
    assert ours[warmup * steps // 2] == pytest.approx((warmup_lr + peak) / 2)
    assert len(set(ours)) > epochs * steps - 5


def timm_lrs(args, global_batch, steps):
    """The lr of every update of a run, from timm's CosineLRScheduler."""
    from timm.scheduler import CosineLRScheduler
    s = global_batch / 512
    low = s if args.scale_lr == "all" else 1.0
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=args.lr * s)
    sched = CosineLRScheduler(opt, t_initial=args.epochs * steps, lr_min=args.min_lr * low,
                              warmup_t=args.warmup_epochs * steps,
                              warmup_lr_init=args.warmup_lr * low, cycle_limit=1,
                              t_in_epochs=False)
    lrs = []
    for u in range(args.epochs * steps):
        sched.step_update(u)
        lrs.append(opt.param_groups[0]["lr"])
    return lrs


def test_training_sets_timms_lr_at_every_update_and_counts_accumulation(tmp_path, capsys,
                                                                       monkeypatch):
    out = str(tmp_path / "run")
    made = record_optimizers(monkeypatch)
    # 4 steps of 16 an epoch, 2 accumulated per update: global batch 32, 2 updates an epoch
    argv = TINY + ["--epochs", "2", "--accum-steps", "2", "--output", out]
    deit.main(argv)
    assert "global batch 32 (16 x 1 x 2), 2 updates per epoch" in capsys.readouterr().out
    expected = timm_lrs(deit.get_args(argv), 32, 2)
    assert len(made[0].lrs) == 4                                       # one per update
    assert all(len(set(lrs)) == 1 for lrs in made[0].lrs)              # both groups alike
    assert [lrs[0] for lrs in made[0].lrs] == pytest.approx(expected, rel=1e-12)
    assert [r["lr"] for r in log_of(out)] == pytest.approx(expected[1::2], rel=1e-12)
    # resumed on another global batch (batch 32 x 2 steps = 64, 1 update an epoch): the place
    # in the schedule is kept in epochs, the lrs follow the new batch
    argv = TINY + ["--epochs", "4", "--batch-size", "32", "--accum-steps", "2", "--output", out]
    deit.main(argv)
    assert "global batch 64 (32 x 1 x 2), 1 updates per epoch" in capsys.readouterr().out
    expected = timm_lrs(deit.get_args(argv), 64, 1)
    assert [lrs[0] for lrs in made[1].lrs] == pytest.approx(expected[2:], rel=1e-12)
    assert [r["lr"] for r in log_of(out)][2:] == pytest.approx(expected[2:], rel=1e-12)


def sgd_copy(model):
    """A copy of the model and a plain SGD on it: an update is lr x the gradient."""
    other = copy.deepcopy(model)
    return other, torch.optim.SGD(other.parameters(), lr=1.0)


def test_gradient_accumulation_equals_one_big_batch_and_clips_the_sum():
    torch.manual_seed(0)
    model = small_vit("final", num_classes=16)  # no drop-path; no mixing below
    x, y = shapes_batch(8, seed=1)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    big, opt_big = sgd_copy(model)
    loss_big = deit.train_one_epoch(big, [(x, y)], criterion, opt_big, scaler, None, CPU,
                                    loop_args(), lambda u: 1.0)[0]
    acc, opt_acc = sgd_copy(model)  # 2 steps of 4 accumulated into one update
    loss_acc = deit.train_one_epoch(acc, [(x[:4], y[:4]), (x[4:], y[4:])], criterion, opt_acc,
                                    scaler, None, CPU, loop_args(accum_steps=2), lambda u: 1.0)[0]
    assert loss_acc == pytest.approx(loss_big, rel=1e-6)       # the mean over all 8 images
    moved = 0.0
    for (k, p0), p1, p2 in zip(model.named_parameters(), big.parameters(), acc.parameters()):
        assert torch.allclose(p2, p1, rtol=1e-6, atol=1e-7), k
        moved += (p1 - p0).norm() ** 2
    assert moved.sqrt() > 1e-2  # a real update, much larger than the tolerance
    # clipping acts on the accumulated gradient: the whole update has norm clip_grad
    clipped, opt_clip = sgd_copy(model)
    deit.train_one_epoch(clipped, [(x[:4], y[:4]), (x[4:], y[4:])], criterion, opt_clip, scaler,
                         None, CPU, loop_args(accum_steps=2, clip_grad=1e-3), lambda u: 1.0)
    norm = sum((p1 - p0).norm() ** 2 for p0, p1 in zip(model.parameters(),
                                                       clipped.parameters())).sqrt()
    assert norm.item() == pytest.approx(1e-3, rel=1e-3)
    # a partial last update is dropped: 3 steps with accum 2 make one update, on steps 1-2
    part, opt_part = sgd_copy(model)
    updates = []
    opt_part.register_step_pre_hook(lambda *a: updates.append(1))
    deit.train_one_epoch(part, [(x[:4], y[:4]), (x[4:], y[4:]), (x[:4], y[:4])], criterion,
                         opt_part, scaler, None, CPU, loop_args(accum_steps=2), lambda u: 1.0)
    assert updates == [1]
    assert all(torch.allclose(a, b, rtol=1e-6, atol=1e-7) for a, b in
               zip(part.parameters(), acc.parameters()))


def test_a_few_steps_of_training_lower_the_loss():
    torch.manual_seed(0)
    batch = shapes_batch(32)
    model = small_vit(num_classes=16)
    opt = deit.make_optimizer(model, opt_args(lr=2e-3), CPU)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    losses = [deit.train_one_epoch(model, [batch], nn.CrossEntropyLoss(), opt, scaler, None, CPU,
                                   loop_args(clip_grad=5.0), lambda u: 2e-3, epoch=e + 1)[0]
              for e in range(30)]
    assert losses[0] > 2.0                                  # ~ln(10) at the start
    assert losses[-1] < losses[15] < losses[0]
    assert sum(losses[-5:]) / 5 < 0.8 * losses[0]


def test_evaluate_counts_top1_and_top5():
    class Table(nn.Module):  # logits looked up by the "image", an index
        def __init__(self, logits):
            super().__init__()
            self.logits = logits

        def forward(self, i):
            return self.logits[i]
    logits = torch.tensor([[9., 8, 7, 6, 5, 4],    # label 0: top-1
                           [9., 8, 7, 6, 5, 4],    # label 4: top-5 only
                           [9., 8, 7, 6, 5, 4],    # label 5: neither
                           [1., 2, 3, 4, 5, 6]])   # label 5: top-1
    loader = [(torch.tensor([0, 1]), torch.tensor([0, 4])), (torch.tensor([2, 3]),
                                                             torch.tensor([5, 5]))]
    assert deit.evaluate(Table(logits), loader, CPU) == pytest.approx((50.0, 75.0))
    two = [(torch.tensor([0, 1]), torch.tensor([1, 0]))]  # 2 classes: top-5 is all of them
    assert deit.evaluate(Table(torch.tensor([[2., 1], [2, 1]])), two, CPU) == \
        pytest.approx((50.0, 100.0))


# ----------------------------------------------------------------------------------------------
# no per-step host sync; a NaN still stops training before a bad checkpoint


def count_item_calls(monkeypatch, fn):
    """Host reads of a tensor (.item(), .tolist(), float(), bool()) made by train_one_epoch.
    (On CPU, torch's non-fused AdamW reads its step counters too; CUDA runs use the fused one.)"""
    calls = []
    for name in ("item", "tolist", "__float__", "__bool__"):
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, **k):
            caller = sys._getframe(1).f_code
            if caller.co_filename == deit.__file__ and caller.co_name == "train_one_epoch":
                calls.append(1)
            return _real(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)
    fn()
    monkeypatch.undo()
    return len(calls)


def one_epoch(steps, check_every, poison_at=None):
    torch.manual_seed(0)
    batch = shapes_batch(8)
    model = small_vit("softmax", num_classes=16, depth=1)
    opt = deit.make_optimizer(model, opt_args(), CPU)
    loader = [batch] * steps
    if poison_at is not None:
        loader[poison_at] = (batch[0] * float("nan"), batch[1])
    return deit.train_one_epoch(model, loader, nn.CrossEntropyLoss(), opt,
                                torch.amp.GradScaler("cpu", enabled=False), None, CPU,
                                loop_args(clip_grad=5.0, check_every=check_every),
                                lambda u: 1e-3, epoch=3)


def test_no_host_sync_per_step(monkeypatch):
    # .item() (a GPU -> host sync) a fixed number of times per epoch, not once per step
    few = count_item_calls(monkeypatch, lambda: one_epoch(4, check_every=1000))
    many = count_item_calls(monkeypatch, lambda: one_epoch(12, check_every=1000))
    assert few == many <= 3, (few, many)
    checked = count_item_calls(monkeypatch, lambda: one_epoch(12, check_every=4))
    assert many < checked <= many + 3 * 2                  # a look every 4 steps: 2 looks more


def test_nan_between_checks_is_found_with_its_steps():
    with pytest.raises(deit.UserError, match=r"^loss is nan in epoch 3 by step 8: stopped; "
                                             r"the last good checkpoint is kept"):
        one_epoch(12, check_every=4, poison_at=5)          # seen at the look after step 8
    with pytest.raises(deit.UserError, match=r"loss is nan in epoch 3 by step 3"):
        one_epoch(3, check_every=1000, poison_at=2)        # seen at the epoch's end
    assert math.isfinite(one_epoch(3, check_every=1)[0])


def test_nan_in_a_run_keeps_the_last_good_checkpoint(one_epoch_run, tmp_path, monkeypatch):
    out, ckpt = copy_run(one_epoch_run, tmp_path)
    good = weights(ckpt)
    real_forward, calls = deit.VisionTransformer.forward, []

    def nan_at_third_training_step(self, x):
        calls.append(self.training)
        bad = self.training and sum(calls) == 3
        return real_forward(self, x) * (float("nan") if bad else 1.0)
    monkeypatch.setattr(deit.VisionTransformer, "forward", nan_at_third_training_step)
    line = exit_line(TINY + ["--epochs", "2", "--output", out, "--check-every", "2"])
    assert line.startswith("error: loss is nan in epoch 2 by step 4: stopped; the last good "
                           "checkpoint is kept"), line
    kept = deit.read_checkpoint(ckpt)  # intact: its digest fits
    assert len(kept["log"]) == 1 and len(log_of(out)) == 1
    assert all(torch.equal(good[k], v) for k, v in kept["model"].items())


# ----------------------------------------------------------------------------------------------
# the GPU code paths, run on CPU: bf16 autocast and torch.compile against eager float32

# bf16 keeps 8 bits of mantissa (relative step 2^-8 = 0.4%); through two blocks and the head the
# logits of these small models stay within 3% of their largest value, the losses within 0.02.
BF16_LOGITS, BF16_LOSS = 0.03, 0.02
COMPILE_LOGITS, COMPILE_LOSS = 1e-4, 1e-4   # float32 both: only the order of sums changes


def train_steps(run, model, batch, args, steps=8):
    """`steps` one-batch epochs of the script's train_one_epoch, then its evaluate."""
    opt = deit.make_optimizer(model, opt_args(lr=3e-3), CPU)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    losses = [deit.train_one_epoch(run, [batch], nn.CrossEntropyLoss(), opt, scaler, None, CPU,
                                   args, lambda u: 3e-3, epoch=e + 1)[0] for e in range(steps)]
    return losses, deit.evaluate(run, [batch], CPU)


@pytest.mark.parametrize("attn", ["softmax", "final"])
@pytest.mark.parametrize("mode", ["bf16", "compile"])
def test_gpu_paths_on_cpu_agree_with_eager_float32(attn, mode):
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    batch = shapes_batch(16, seed=2)
    # one block when compiled: the C++ that inductor writes for CPU takes ~10 s a block to build
    eager = small_vit(attn, num_classes=16, depth=1 if mode == "compile" else 2)
    other = copy.deepcopy(eager)
    f32 = loop_args(clip_grad=5.0)
    args = loop_args(clip_grad=5.0, amp="bf16" if mode == "bf16" else "none")
    run = torch.compile(other) if mode == "compile" else other  # as train() does
    eager.eval(), run.eval()
    with torch.no_grad(), deit.autocast(CPU, args.amp):
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


def test_bf16_run_trains_in_bf16_and_evaluates_in_float32(tmp_path, monkeypatch):
    seen, real_build = set(), deit.build_model

    def spy(args, num_classes):
        model = real_build(args, num_classes)
        model.head.register_forward_hook(lambda m, i, o: seen.add((m.training, o.dtype)))
        return model
    monkeypatch.setattr(deit, "build_model", spy)
    out = str(tmp_path / "bf16")
    res = deit.main(TINY + ["--epochs", "1", "--output", out, "--amp", "bf16"])
    assert seen == {(True, torch.bfloat16), (False, torch.float32)}
    log = log_of(out)[0]
    assert math.isfinite(log["loss"]) and res["top1"] == log["top1"]
    assert deit.read_checkpoint(os.path.join(out, "checkpoint.pth"))["args"]["amp"] == "bf16"


# ----------------------------------------------------------------------------------------------
# the flags: SETTINGS, the recipes, the datasets' values, what may not be combined


def help_text(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "1000")  # one line per flag
    with pytest.raises(SystemExit) as e:
        deit.get_args(["--help"])
    assert e.value.code == 0
    flags, current = {}, None
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("  --"):
            current = line.split()[0]
            flags[current] = line
        elif current and line.startswith("      "):  # a long flag's help goes on the next line
            flags[current] += " " + line.strip()
    return flags


def test_help_lists_every_setting_as_a_flag_with_its_default(monkeypatch, capsys):
    flags = help_text(monkeypatch, capsys)
    assert set(flags) == {"--" + k.replace("_", "-") for k in deit.SETTINGS}
    for key, value in deit.SETTINGS.items():
        line = flags["--" + key.replace("_", "-")]
        assert f"(default: {value})" in line, line


def test_recipes_set_the_official_values_and_flags_win(tmp_path):
    inline = deit.get_args(["--data-path", str(tmp_path)])
    assert inline.data == "imagenet" and inline.recipe == "inline"
    assert (inline.batch_size, inline.epochs, inline.warmup_epochs, inline.clip_grad,
            inline.repeated_aug, inline.eval_resize, inline.auto_augment, inline.scale_lr) == \
        (512, 300, 20, 5.0, 0, "square", "rand-m9-mstd0.5-inc1", "all")
    # InLine's main.py: base, warm-up and minimum lr all x global batch / 512; 8 GPUs x 512
    lr_of = deit.lr_schedule(inline, 8 * 512, 10)  # 10 updates an epoch: warm-up 200
    assert (lr_of(0), lr_of(100), lr_of(3000)) == pytest.approx((4e-6, (4e-6 + 4e-3) / 2, 4e-5))
    d = deit.get_args(["--data-path", str(tmp_path), "--recipe", "deit"])
    assert (d.batch_size, d.warmup_epochs, d.clip_grad, d.repeated_aug, d.eval_resize,
            d.scale_lr) == (256, 5, 0.0, 3, "shorter", "peak")
    # DeiT's main.py scales only the base lr: 4 GPUs x 256 -> 1e-3, warm-up 1e-6, min 1e-5
    lr_of = deit.lr_schedule(d, 4 * 256, 10)       # warm-up 50 updates
    assert (lr_of(0), lr_of(25), lr_of(3000)) == pytest.approx((1e-6, (1e-6 + 1e-3) / 2, 1e-5))
    mine = deit.get_args(["--data-path", str(tmp_path), "--recipe", "deit", "--clip-grad", "1",
                          "--eval-resize", "square", "--batch-size", "64"])
    assert (mine.clip_grad, mine.eval_resize, mine.batch_size, mine.warmup_epochs) == \
        (1.0, "square", 64, 5)                             # given flags win, the rest stay deit's
    demo = deit.get_args([])
    assert demo.data == "demo" and demo.data_path is None
    assert all(getattr(demo, k) == v for k, v in deit.DEMO.items())
    assert demo.output == os.path.join("runs", "demo-final")
    cifar = deit.get_args(["--data", "cifar100"])
    assert all(getattr(cifar, k) == v for k, v in deit.CIFAR.items())
    assert (cifar.data_path, cifar.img_size, cifar.patch_size, cifar.batch_size) == \
        ("data", 32, 4, 128) and cifar.output == os.path.join("runs", "cifar100-final")
    assert deit.get_args(["--data", "cifar10", "--lr", "1e-3"]).lr == 1e-3


@pytest.mark.parametrize("argv, message", [
    (["--fresh", "--resume", "x.pth"], "--fresh starts afresh; leave out --resume"),
    (["--data", "demo", "--data-path", "x"], "--data demo makes its own images"),
    (["--data", "imagenet"], "--data imagenet: expected --data-path DIR holding train/ and val/"),
    (["--quick", "--data", "cifar10"], "--quick shortens the demo only"),
    (["--accum-steps", "0"], "steps must be at least 1"),
    (["--check-every", "0"], "steps must be at least 1"),
    (["--eval-only"], "--eval-only needs weights: --pretrained PATH or --resume PATH"),
    (["--attn", "flash"], "argument --attn: invalid choice: 'flash'"),
    (["--amp", "fp8"], "argument --amp: invalid choice: 'fp8'"),
    (["--epochs", "2.5"], "argument --epochs: invalid int value: '2.5'"),
])
def test_contradictory_or_invalid_flags_are_usage_errors(argv, message, capsys):
    err = usage_error(argv, capsys)
    assert message in err and err.count("error:") == 1, err


def test_quick_shortens_only_the_demo_and_flags_still_win():
    quick = deit.get_args(["--quick"])
    assert all(getattr(quick, k) == v for k, v in deit.QUICK.items())
    assert quick.img_size == deit.DEMO["img_size"] and quick.lr == deit.DEMO["lr"]  # same model
    full = deit.get_args([])
    assert full.demo_train > quick.demo_train and full.epochs > quick.epochs
    assert deit.get_args(["--quick", "--epochs", "7"]).epochs == 7


def test_workers_default_to_the_cores_there_are(monkeypatch, tmp_path):
    for cores, local_world, workers in ((2, None, 2), (32, None, 16), (16, "4", 4), (1, "2", 1)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cores: set(range(n)),
                            raising=False)
        if local_world:
            monkeypatch.setenv("LOCAL_WORLD_SIZE", local_world)
        else:
            monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
        assert deit.get_args(["--data-path", str(tmp_path)]).workers == workers
        assert deit.get_args(["--data-path", str(tmp_path), "--workers", "3"]).workers == 3
    monkeypatch.undo()
    assert deit.get_args([]).workers == 0  # the demo's tensors need no worker processes
    import warnings
    loader = DataLoader(range(4), num_workers=deit.get_args(["--data-path", "x"]).workers)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns of more workers than cores
        loader.check_worker_number_rationality()


# ----------------------------------------------------------------------------------------------
# data: the demo, timm's transforms and sampler, ImageFolder, CIFAR


def test_synthetic_tiles_are_fixed_balanced_and_labelled_by_the_red_tile():
    x, y = deit.synthetic_tiles(2000, 32, 4, seed=0)
    x2, y2 = deit.synthetic_tiles(2000, 32, 4, seed=0)
    x3, _ = deit.synthetic_tiles(2000, 32, 4, seed=1)
    assert x.shape == (2000, 3, 32, 32) and x.dtype == torch.uint8
    assert torch.equal(x, x2) and torch.equal(y, y2) and not torch.equal(x, x3)
    assert torch.bincount(y, minlength=16).min() > 80       # all 16 classes present
    # without noise the label can be read off the image: the red tile's four patches, each one
    # of the two textures, as the bits 8, 4, 2, 1 (row by row)
    x, y = deit.synthetic_tiles(200, 32, 4, noise=0.0, seed=0)
    img = x.float() / 255                                   # (n, 3, S, S) in [0, 1]
    red = img[:, 0] - img[:, 1]                             # > 0 on the red tile only
    tiles = red.unfold(1, 8, 8).unfold(2, 8, 8).mean((-1, -2)).flatten(1)  # (n, 16)
    assert (tiles.max(1).values > 0.2).all() and (tiles.sort(1).values[:, -2] < 0.01).all()
    at = tiles.argmax(1)                                    # the red tile, row by row
    patches = img[:, 1].unfold(1, 4, 4).unfold(2, 4, 4).flatten(3)  # (n, 8, 8, 16): green
    assert patches.flatten(0, 2).unique(dim=0).shape[0] == 2  # two textures in all
    bits = ~(patches == patches[0, 0, 0]).all(-1)           # (n, 8, 8): the other texture?
    r, c, n = 2 * (at // 4), 2 * (at % 4), torch.arange(200)
    code = torch.stack([bits[n, r, c], bits[n, r, c + 1], bits[n, r + 1, c],
                        bits[n, r + 1, c + 1]], 1).long() @ torch.tensor([8, 4, 2, 1])
    assert torch.equal(code, y) or torch.equal(15 - code, y)  # up to which texture is "1"


def test_demo_data_is_normalised_synthetic_tiles():
    args = deit.get_args(TINY)
    train, val, classes, mix = deit.make_data(args)
    assert classes == [f"{i:04b}" for i in range(16)] and mix is None
    assert isinstance(train, TensorDataset) and len(train) == 64 and len(val) == 48
    for ds, (n, seed) in ((train, (64, 0)), (val, (48, 1))):  # their own seeds: no overlap
        x, y = deit.synthetic_tiles(n, 16, 4, args.demo_noise, seed)
        assert torch.equal(ds.tensors[0], (x.float() / 255 - 0.5) / 0.25)
        assert torch.equal(ds.tensors[1], y)


def test_the_demo_needs_only_torch_numpy_and_tqdm(tmp_path, monkeypatch):
    # COURSE.md: the demo of 06 runs with torch, numpy and tqdm alone (no timm, torchvision or
    # Pillow, which comes with torchvision)
    blocked = ("timm", "torchvision", "PIL", "matplotlib")
    for name in {*blocked, *(m for m in sys.modules if m.split(".")[0] in blocked)}:
        monkeypatch.setitem(sys.modules, name, None)  # `import name` now fails, submodules too
    out = str(tmp_path / "run")
    res = deit.main(TINY + ["--epochs", "1", "--drop-path", "0", "--output", out])  # the demo's
    assert len(log_of(out)) == 1 and res["top1"] == log_of(out)[0]["top1"]


def test_train_transform_is_timms_rand_m9_mstd05_inc1():
    timm_aa = pytest.importorskip("timm.data.auto_augment")
    timm_tf = pytest.importorskip("timm.data.transforms")
    tf = deit.transforms(deit.get_args(["--data-path", "x"]))[0].transforms
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
    norm, erase = tf[-2], tf[-1]
    assert tuple(norm.mean.tolist()) == pytest.approx(deit.MEAN)
    assert type(erase).__name__ == "RandomErasing" and erase.probability == 0.25
    assert erase.mode == "pixel"
    small = deit.transforms(deit.get_args(["--data", "cifar10"]))[0].transforms
    assert type(small[0]).__name__ == "RandomCrop" and small[0].padding == 4  # 32 px
    assert small[0].size == (32, 32) and isinstance(small[2], timm_aa.RandAugment)


def test_eval_transform_square_for_inline_shorter_side_for_deit():
    from PIL import Image
    img = Image.fromarray(torch.randint(0, 256, (40, 48, 3), dtype=torch.uint8,
                                        generator=torch.Generator().manual_seed(0)).numpy())
    mean, std = torch.tensor(deit.MEAN)[:, None, None], torch.tensor(deit.STD)[:, None, None]

    def reference(image, w, h, size):  # PIL bicubic resize to (w, h), centre crop, normalise
        r = torch.from_numpy(np.array(image.resize((w, h), Image.BICUBIC))).permute(2, 0, 1)
        top, left = int(round((h - size) / 2)), int(round((w - size) / 2))
        return (r[:, top:top + size, left:left + size].float() / 255 - mean) / std
    common = ["--data-path", "x", "--img-size", "48", "--patch-size", "8"]
    square = deit.transforms(deit.get_args(common))[1](img)            # 48 / 0.875 -> 54 x 54
    shorter = deit.transforms(deit.get_args(common + ["--recipe", "deit"]))[1](img)
    assert square.shape == shorter.shape == (3, 48, 48)
    assert torch.allclose(square, reference(img, 54, 54, 48), atol=1e-5)  # InLine: a square
    assert torch.allclose(shorter, reference(img, 64, 54, 48), atol=1e-5)  # 40 -> 54, 48 -> 64
    assert not torch.allclose(square, shorter, atol=1e-2)
    # 32 px (CIFAR): no resize, no crop, only normalised
    small = Image.fromarray(torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8,
                                          generator=torch.Generator().manual_seed(1)).numpy())
    for recipe in ("inline", "deit"):
        tf = deit.transforms(deit.get_args(["--data", "cifar10", "--recipe", recipe]))[1]
        assert torch.allclose(tf(small), reference(small, 32, 32, 32), atol=1e-6)


def test_repeated_augmentation_is_timms_copy_of_deits_sampler(tmp_path):
    from timm.data.distributed_sampler import RepeatAugSampler
    from torch.utils.data.distributed import DistributedSampler
    args = deit.get_args(["--data-path", str(tmp_path), "--recipe", "deit"])
    assert args.repeated_aug == 3
    ds = TensorDataset(torch.arange(600))
    loaders = [deit.make_loaders(ds, ds, args, r, 4, CPU) for r in range(4)]
    samplers = [train.sampler.sampler for train, _ in loaders]  # each image seeded around it
    assert all(type(s) is RepeatAugSampler and s.num_repeats == 3 for s in samplers)
    per_rank = [list(s) for s in samplers]
    assert [len(p) for p in per_rank] == [600 // 256 * 256 // 4] * 4  # DeiT's: 128 each
    # the 3 copies of an image go to consecutive processes (different augmentations of it)
    assert per_rank[0][0] == per_rank[1][0] == per_rank[2][0] != per_rank[3][0]
    samplers[0].set_epoch(1)
    assert list(samplers[0]) != per_rank[0]                       # a new shuffle every epoch
    assert len(deit.make_loaders(ds, ds, args, 0, 1, CPU)[0].sampler) == 512  # one process
    # held-out: every process evaluates its own 1/world of the images, all of them together
    held = [list(val.dataset.indices) for _, val in loaders]
    assert held[1] == list(range(1, 600, 4)) and sorted(sum(held, [])) == list(range(600))
    # the InLine recipe: no repeats, each process 1/world of the images
    inline = deit.get_args(["--data-path", str(tmp_path)])
    train, _ = deit.make_loaders(ds, ds, inline, 1, 4, CPU)
    assert type(train.sampler.sampler) is DistributedSampler and len(train.sampler) == 150
    assert len(set(train.sampler)) == 150


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


def test_persistent_workers_give_a_resumed_run_the_same_augmented_images(tmp_path):
    # workers live through all epochs (their RNG with them); each image is seeded by (run seed,
    # epoch, index), so epoch 3 is the same whether the loader ran epochs 1-2 first or not, and
    # with any number of workers
    data = write_image_folder(tmp_path / "data", n=(6, 1))
    args = deit.get_args(["--data-path", data, "--batch-size", "4", "--mixup", "0", "--cutmix",
                          "0"] + FOLDER_TINY[:-2] + ["--workers", "2"])
    train, val, _, _ = deit.make_data(args)

    def epochs(loader, first, last):  # {epoch: the images of each batch}
        out = {}
        for epoch in range(first, last + 1):
            loader.sampler.set_epoch(epoch)
            out[epoch] = torch.cat([x for x, _ in loader])
        return out
    loader = deit.make_loaders(train, val, args, 0, 1, CPU)[0]
    assert loader.persistent_workers and isinstance(loader.sampler, deit.SeedEachImage)
    straight = epochs(loader, 1, 3)
    resumed = epochs(deit.make_loaders(train, val, args, 0, 1, CPU)[0], 3, 3)
    args.workers = 1
    one_worker = epochs(deit.make_loaders(train, val, args, 0, 1, CPU)[0], 3, 3)
    assert torch.equal(straight[3], resumed[3]) and torch.equal(straight[3], one_worker[3])
    assert not torch.equal(straight[2], straight[3])  # a new shuffle and new augmentations
    args.seed = 1
    assert not torch.equal(straight[3], epochs(deit.make_loaders(train, val, args, 0, 1, CPU)[0],
                                               3, 3)[3])  # another seed, other images


def test_image_folder_training_and_eval_only(tmp_path):
    data = write_image_folder(tmp_path / "data")
    out = str(tmp_path / "out")
    args = deit.get_args(["--data-path", data] + FOLDER_TINY)
    train, val, classes, mix = deit.make_data(args)
    assert classes == ["cat", "dog"] and len(train) == 8 and len(val) == 4
    assert train[0][0].shape == (3, 32, 32) and val[0][0].shape == (3, 32, 32)
    images = torch.stack([train[i][0] for i in range(4)])
    np.random.seed(0)  # timm's Mixup draws from numpy
    mixed, soft = mix(images.clone(), torch.tensor([0, 0, 1, 1]))
    assert soft.shape == (4, 2) and torch.allclose(soft.sum(1), torch.ones(4))
    assert soft.min() > 0 and not torch.equal(mixed, images)  # MixUp or CutMix: always one
    res = deit.main(["--data-path", data, "--output", out, "--epochs", "2", "--batch-size", "4"]
                    + FOLDER_TINY)
    log = log_of(out)
    assert [r["epoch"] for r in log] == [1, 2]  # counted from 1, as the epoch lines
    assert all(math.isfinite(r["loss"]) and r["images_per_s"] > 0 for r in log)
    assert log[-1]["top5"] == 100.0  # two classes: the top-5 always hold the label
    ckpt = deit.read_checkpoint(os.path.join(out, "checkpoint.pth"))
    assert len(ckpt["log"]) == 2 and ckpt["model"]["head.weight"].shape == (2, 32)
    again = deit.main(["--data-path", data, "--eval-only", "--resume",
                       os.path.join(out, "checkpoint.pth"), "--output", str(tmp_path / "e")]
                      + FOLDER_TINY)
    assert again["top1"] == pytest.approx(res["top1"])  # eval-only reproduces the logged top-1


def test_a_broken_held_out_image_is_named_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(deit, "train_one_epoch", lambda *a, **k: (1.0, 0.0))
    data = write_image_folder(tmp_path / "data", bad="val/dog/broken.png")
    out = str(tmp_path / "out")
    line = exit_line(["--data-path", data, "--output", out, "--batch-size", "4", "--epochs", "1"]
                     + FOLDER_TINY)
    assert line.startswith("error: cannot identify image file ") and "broken.png" in line, line
    assert not os.path.exists(os.path.join(out, "checkpoint.pth"))  # no epoch without its top-1


def write_cifar(root, cls, n_train=40, n_test=16, classes=10, seed=0):
    """A tiny dataset in CIFAR's on-disk format, in the files torchvision's class reads:
    pickled dicts, 'data' rows of 3072 uint8 (the red, green and blue planes, each 32 x 32
    row-major), labels, and the meta file with the class names. Each class has its own colour,
    so there is something to learn."""
    import pickle
    folder = os.path.join(root, cls.base_folder)
    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    labels = "labels" if cls.base_folder == "cifar-10-batches-py" else "fine_labels"

    def batch(n):
        y = torch.arange(n) % classes
        x = torch.randint(0, 100, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
        x[:, 0] += (y * 150 // classes).to(torch.uint8)[:, None, None]
        return {"data": x.reshape(n, 3072).numpy(), labels: y.tolist()}
    files = {f: batch(n_train // len(cls.train_list)) for f, _ in cls.train_list}
    files.update({f: batch(n_test) for f, _ in cls.test_list})
    files[cls.meta["filename"]] = {cls.meta["key"]: [f"class{i}" for i in range(classes)]}
    for f, obj in files.items():
        with open(os.path.join(folder, f), "wb") as fh:
            pickle.dump(obj, fh, protocol=2)
    return files


CIFAR_TINY = ["--embed-dim", "32", "--depth", "1", "--num-heads", "2", "--patch-size", "8",
              "--batch-size", "8", "--workers", "0", "--epochs", "1", "--warmup-epochs", "1"]


def test_cifar_is_read_by_torchvision_and_trains(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR10, CIFAR100, cifar
    files = write_cifar(tmp_path / "c10", CIFAR10)
    write_cifar(tmp_path / "c100", CIFAR100, n_train=200, n_test=100, classes=100)
    # our files are not CIFAR's: their md5 sums differ, so the check passes by hand here
    monkeypatch.setattr(CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(cifar, "check_integrity", lambda *a, **k: True)  # the meta file's

    def no_download(*a, **k):
        raise AssertionError("the files are there: nothing may be downloaded")
    monkeypatch.setattr(CIFAR10, "download", no_download)
    args = deit.get_args(["--data", "cifar10", "--data-path", str(tmp_path / "c10")]
                         + CIFAR_TINY)
    train, val, classes, mix = deit.make_data(args)
    assert type(train) is CIFAR10 and train.train and not val.train
    assert len(train) == 40 and len(val) == 16 and classes == [f"class{i}" for i in range(10)]
    assert train.targets[:3] == [0, 1, 2] and mix is not None
    row = files["data_batch_1"]["data"][1]                     # image 1 of the first file
    assert train.data[1, 2, 5, 0] == row[2 * 32 + 5] and train.data[1, 2, 5, 2] == row[2048 + 69]
    assert val[0][0].shape == (3, 32, 32) and train[0][0].shape == (3, 32, 32)
    args100 = deit.get_args(["--data", "cifar100", "--data-path", str(tmp_path / "c100")]
                            + CIFAR_TINY)
    train100, val100, names, _ = deit.make_data(args100)
    assert type(train100) is CIFAR100 and len(names) == 100 and len(train100) == 200
    assert set(val100.targets) == set(range(100))                  # the fine labels
    out = str(tmp_path / "out")
    res = deit.main(["--data", "cifar10", "--data-path", str(tmp_path / "c10"), "--output", out]
                    + CIFAR_TINY)
    log = log_of(out)
    assert [r["epoch"] for r in log] == [1] and math.isfinite(log[0]["loss"])
    ckpt = deit.read_checkpoint(os.path.join(out, "checkpoint.pth"))
    assert ckpt["model"]["head.weight"].shape == (10, 32)
    assert ckpt["model"]["pos_embed"].shape == (1, 17, 32)      # 32 px, 8 px patches
    assert 0 <= res["top1"] <= res["top5"] <= 100


def test_cifar_damaged_folder_and_failed_download_give_one_line(tmp_path, monkeypatch):
    from urllib.error import URLError
    from torchvision.datasets import CIFAR10
    bad = tmp_path / "bad"
    write_cifar(bad, CIFAR10)  # not CIFAR's md5 sums: as a damaged or half-unpacked download
    with open(bad / CIFAR10.base_folder / "data_batch_3", "wb") as f:
        f.write(b"\x80\x02 half a pickle")
    folder = os.path.join(str(bad), CIFAR10.base_folder)
    line = exit_line(["--data", "cifar10", "--data-path", str(bad)] + CIFAR_TINY)
    assert line.startswith(f"error: cifar10 in {folder}: ") and f"delete {folder} to download" \
        in line, line

    def offline(self):
        raise URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(CIFAR10, "download", offline)
    empty = str(tmp_path / "empty")
    line = exit_line(["--data", "cifar10", "--data-path", empty] + CIFAR_TINY)
    assert line.startswith("error: cifar10 in "), line
    assert "Temporary failure in name resolution" in line and CIFAR10.url in line and \
        "by hand" in line


def test_a_missing_package_is_named_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "timm.data", None)  # as if timm were not installed
    line = exit_line(["--data", "cifar10", "--data-path", str(tmp_path)] + CIFAR_TINY)
    assert line.startswith("error: this needs timm:") and \
        "pip install -r requirements.txt" in line, line


# ----------------------------------------------------------------------------------------------
# bad input: a one-line message and a non-zero exit, no traceback


def bad_inputs(tmp_path):
    torch.save(small_vit("softmax", embed_dim=32).state_dict(), tmp_path / "softmax.pth")
    (tmp_path / "corrupt.pth").write_bytes(b"PK\x03\x04 definitely not a checkpoint")
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "img.png").write_bytes(b"")
    odd = write_image_folder(tmp_path / "odd", n=(1, 1))
    os.rename(os.path.join(odd, "val", "dog"), os.path.join(odd, "val", "bird"))
    folder = ["--batch-size", "2"] + FOLDER_TINY
    return {
        "missing": (["--data-path", str(tmp_path / "nowhere")] + folder,
                    [os.path.join(str(tmp_path / "nowhere"), "train"), "train/ and val/",
                     "one sub-folder of images per class"]),
        "layout": (["--data-path", str(flat)] + folder,
                   [os.path.join(str(flat), "train"), "one sub-folder of images per class"]),
        "classes": (["--data-path", odd] + folder,
                    ["train/ and val/ must have the same class folders (in only one: bird, "
                     "dog)"]),
        "img-size": (TINY + ["--img-size", "30"],
                     ["img_size=30 is not divisible by patch_size=4", "--img-size 30"]),
        "mismatch": (TINY + ["--attn", "final", "--eval-only", "--pretrained",
                             str(tmp_path / "softmax.pth")],
                     ["softmax.pth does not fit the model", "Missing key(s)",
                      "blocks.0.attn.residual"]),
        "corrupt": (TINY + ["--resume", str(tmp_path / "corrupt.pth")],
                    ["cannot read checkpoint", "corrupt.pth"]),
        "too-few": (TINY + ["--demo-train", "8"],
                    ["8 training images cannot fill one update of 16 x 1 processes x 1 steps"]),
        "no-gpu": (TINY + ["--device", "cuda"], ["--device cuda, but torch sees no CUDA GPU"]),
    }


@pytest.mark.parametrize("case", ["missing", "layout", "classes", "img-size", "mismatch",
                                  "corrupt", "too-few", "no-gpu"])
def test_bad_input_gives_one_clear_line(tmp_path, case):
    if case == "no-gpu" and torch.cuda.is_available():
        pytest.skip("there is a GPU")
    argv, expected = bad_inputs(tmp_path)[case]
    line = exit_line(argv + ["--output", str(tmp_path / "out")])
    for text in expected:
        assert text in line, line
    assert not os.path.exists(tmp_path / "out" / "checkpoint.pth")


def test_bad_input_from_the_command_line(tmp_path):
    # the real process: exit status 1, one line on stderr, no traceback. An image that cannot
    # be read inside a DataLoader worker process comes back as the same one line.
    data = write_image_folder(tmp_path / "data", n=(2, 1), bad="train/cat/broken.png")
    argv = ["--data-path", data, "--batch-size", "5"] + FOLDER_TINY[:-2] + ["--workers", "1"]
    proc = subprocess.run([sys.executable, SCRIPT, *argv, "--output", str(tmp_path / "out")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-2000:]
    assert "cannot identify image file" in errors[0] and \
        os.path.join(data, "train", "cat", "broken.png") in errors[0], errors[0]


# ----------------------------------------------------------------------------------------------
# two processes under torchrun: gradients, metrics and checkpoint as from one process

WORKER = """
import argparse, os, sys
import torch
sys.path.insert(0, {root!r})
import importlib
deit = importlib.import_module("06_train_deit")
sys.path.insert(0, {tests!r})
from test_06_train_deit import small_vit, loop_args

rank, world, device = deit.setup_distributed("cpu")
torch.manual_seed(0)
model = small_vit(num_classes=16)
if rank == 1:  # DDP must start every process from rank 0's weights
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
train_model = torch.nn.parallel.DistributedDataParallel(model)
# which accumulation step each gradient all-reduce happens in: with no_sync, the last only
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
step, synced = [0], []
model.register_forward_pre_hook(lambda m, i: step.__setitem__(0, step[0] + 1))
train_model.register_comm_hook(None, lambda s, bucket: synced.append(step[0]) or
                               allreduce_hook(None, bucket))
batch = torch.load({batch!r})
x, y = batch["x"][rank::world], batch["y"][rank::world]   # this process's half of the batch
opt = torch.optim.SGD(model.parameters(), lr=0.0)
grads = {{}}
opt.register_step_pre_hook(lambda o, a, k: grads.update(
    {{n: p.grad.clone() for n, p in model.named_parameters()}}))
scaler = torch.amp.GradScaler("cpu", enabled=False)
loader = [(x[:2], y[:2]), (x[2:], y[2:])]  # two steps accumulated: DDP syncs on the last only
loss = deit.train_one_epoch(train_model, loader, torch.nn.CrossEntropyLoss(), opt, scaler, None,
                            device, loop_args(accum_steps=2), lambda u: 0.0, rank=rank)[0]
torch.save({{"loss": loss, "grads": grads, "synced": synced}},
           os.path.join({out!r}, f"grads{{rank}}.pt"))
# then the whole script, in the same process group
deit.main({tiny!r} + ["--epochs", "1", "--device", "cpu", "--output",
                      os.path.join({out!r}, "run")])
"""


def single_process_grads(x, y):
    torch.manual_seed(0)
    model = small_vit(num_classes=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    grads = {}
    opt.register_step_pre_hook(lambda o, a, k: grads.update(
        {n: p.grad.clone() for n, p in model.named_parameters()}))
    loss = deit.train_one_epoch(model, [(x, y)], nn.CrossEntropyLoss(), opt,
                                torch.amp.GradScaler("cpu", enabled=False), None, CPU,
                                loop_args(), lambda u: 0.0)[0]
    return loss, grads


def test_torchrun_two_processes_match_one(tmp_path):
    x, y = shapes_batch(8, seed=3)
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
        assert got["synced"] and set(got["synced"]) == {2}     # no all-reduce in step 1
        for k, g in grads.items():
            assert torch.allclose(got["grads"][k], g, rtol=1e-4, atol=1e-6), (rank, k)
    # the check has teeth: one process's half of the batch gives clearly different gradients
    _, half = single_process_grads(x[0::2], y[0::2])
    assert not all(torch.allclose(half[k], g, rtol=1e-2, atol=1e-4) for k, g in grads.items())
    # the whole script ran under torchrun: one header (rank 0), the global batch of both
    # processes, metrics over all of val (one process evaluating the same checkpoint gets the
    # same top-1)
    assert proc.stdout.count("global batch 32 (16 x 2 x 1), 2 updates per epoch") == 1, \
        proc.stdout
    run = str(tmp_path / "run")
    logged = log_of(run)[0]
    res = deit.main(TINY + ["--eval-only", "--resume", os.path.join(run, "checkpoint.pth"),
                            "--output", str(tmp_path / "eval")])
    assert res["top1"] == pytest.approx(logged["top1"])
