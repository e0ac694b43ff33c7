"""Step 06 - DeiT-T with the course's attention, and its ImageNet training script.

The model is timm's VisionTransformer (ViT, Dosovitskiy et al.; DeiT, Touvron et al.) with the
attention of every block taken from the steps before:

    x = [cls; patches(img) W_e] + pos_embed                 (B, N, C),  N = 1 + (S/P)^2
    x = x + drop_path(attn(norm1(x)))                        for each of the `depth` blocks
    x = x + drop_path(mlp(norm2(x)))                         mlp = fc2(GELU(fc1(x))), 4C wide
    logits = head(norm(x)[:, 0])                             the class token classifies

Names, shapes and initialisation follow timm: deit_tiny(attn="softmax") is timm's
deit_tiny_patch16_224 (5,717,416 parameters; its checkpoint loads strictly), deit_tiny(attn=
"inline") the official InLine-DeiT-T (6,477,736). The default, --attn final, is this course's own
combination of InLine and RALA (step 05), proposed and trained by neither paper.

The recipe (--recipe inline, the default) is the one the InLine paper used for DeiT-T:
    300 epochs; one cosine over the whole run, set every update, whose first 20 epochs are
        replaced by a linear warm-up from 5e-7; it ends at 5e-6 (timm's CosineLRScheduler)
    AdamW, lr 5e-4 per 512 images (all three lrs scaled by global batch / 512), betas (0.9,
        0.999), weight decay 0.05 except on norms, biases, pos_embed and cls_token
    label smoothing 0.1, drop-path 0.1 (rising linearly over depth), grad-norm clip 5.0
    RandomResizedCrop 224 (bicubic), flip, RandAugment (magnitude 9), RandomErasing 0.25,
        MixUp 0.8 / CutMix 1.0 (one of the two per batch, CutMix with probability 0.5)
    evaluation in float32: resize to 256 x 256 (bicubic), centre crop 224, top-1 / top-5
InLine-DeiT-T reached 74.5% top-1 so, on 8 GPUs x 512 images: on fewer, --accum-steps keeps the
global batch. --recipe deit is DeiT's own (4 GPUs x 256 images, repeated augmentation).

    python 06_train_deit.py                                # the CPU demo: synthetic shapes
    python 06_train_deit.py --data cifar10                 # CIFAR-10, downloaded into ./data
    python 06_train_deit.py --data-path /data/imagenet     # one GPU
    torchrun --nproc_per_node 8 06_train_deit.py --data-path /data/imagenet
Every epoch goes to OUTPUT/checkpoint.pth (atomically, its SHA-256 beside it: a damaged file is
refused), the best epoch's weights to best.pth, a line per epoch to log.jsonl. The same command
again resumes exactly where a run stopped; --fresh starts afresh. Measuring is in tools/.
"""
import argparse
import contextlib
import hashlib
import importlib
import json
import math
import os
import random
import sys
import time
from collections import OrderedDict

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, Subset, TensorDataset
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

softmax = importlib.import_module("01_softmax_attention")
rank_aug = importlib.import_module("05_rank_augmentation")
# every attention of the course by name: softmax (01), linear (02), injective (03), inline (04),
# rala and final (05); each maps (B, N, C) -> (B, N, C)
ATTENTIONS = rank_aug.ATTENTIONS
FINAL_PARTS = ("reweight", "gate", "local")  # the final module's switches: --no-gate, ...


class UserError(Exception):
    """A problem with the input (flags, paths, files): one line, exit status 1."""


# ----------------------------------------------------------------------------------------------
# the model: timm's VisionTransformer, parameter for parameter


class DropPath(nn.Module):
    """Stochastic depth: drop a sample's whole residual branch with probability p (train only)."""

    def __init__(self, p=0.0):
        super().__init__()
        self.p = p

    def forward(self, x):                                               # (B, N, C)
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty(x.shape[0], 1, 1).bernoulli_(1 - self.p)     # (B, 1, 1) of 0 / 1
        return x * keep / (1 - self.p)                                  # expectation unchanged


class Block(nn.Module):
    def __init__(self, dim, num_heads, drop_path, attn_cls):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = attn_cls(dim, num_heads=num_heads, qkv_bias=True)   # DeiT: no dropout
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(OrderedDict(fc1=nn.Linear(dim, 4 * dim), act=nn.GELU(),
                                             fc2=nn.Linear(4 * dim, dim)))  # timm's names

    def forward(self, x):                                               # (B, N, C)
        x = x + self.drop_path(self.attn(self.norm1(x)))                # pre-norm residuals
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Cut the image into P x P patches and project each to C channels (a strided convolution)."""

    def __init__(self, img_size, patch_size, dim):
        super().__init__()
        if img_size < patch_size or img_size % patch_size:
            raise ValueError(f"img_size={img_size} is not divisible by patch_size={patch_size}: "
                             f"the image must be a whole number of patches")
        self.grid = img_size // patch_size
        self.proj = nn.Conv2d(3, dim, patch_size, stride=patch_size)

    def forward(self, x):                                               # (B, 3, S, S)
        return self.proj(x).flatten(2).transpose(1, 2)                 # (B, g*g, C)


class VisionTransformer(nn.Module):
    """ViT / DeiT with a pluggable attention: a name in ATTENTIONS, or any class with the course's
    constructor (dim, num_heads=, qkv_bias=). num_heads=None: 3 (timm's 64 channels a head) for
    softmax, 6 (32 channels, as InLine's DeiT-T) for the linear kinds."""

    def __init__(self, img_size=224, patch_size=16, num_classes=1000, embed_dim=192, depth=12,
                 num_heads=None, drop_path_rate=0.1, attn="final"):
        super().__init__()
        if isinstance(attn, str) and attn not in ATTENTIONS:
            raise ValueError(f"unknown attention {attn!r}; choose from {', '.join(ATTENTIONS)}")
        self.num_heads = num_heads or (3 if attn == "softmax" else 6)
        softmax.check_heads(embed_dim, self.num_heads)
        self.patch_embed = PatchEmbed(img_size, patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.patch_embed.grid ** 2, embed_dim))
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()  # deeper blocks dropped more
        attn = ATTENTIONS[attn] if isinstance(attn, str) else attn
        self.blocks = nn.Sequential(*[Block(embed_dim, self.num_heads, p, attn) for p in dpr])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes)
        # timm's initialisation; it also re-initialises the Linear layers inside the attention
        # modules, as the official InLine and RALA code do (convolutions keep torch's default)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight), nn.init.zeros_(m.bias)

    def forward(self, x):                                               # (B, 3, S, S)
        x = self.patch_embed(x)                                         # (B, N-1, C)
        cls = self.cls_token.expand(x.shape[0], -1, -1)                 # (B, 1, C)
        x = torch.cat([cls, x], dim=1) + self.pos_embed                 # (B, N, C)
        x = self.norm(self.blocks(x))                                   # (B, N, C)
        return self.head(x[:, 0])                                       # (B, num_classes)


def deit_tiny(attn="final", **kw):
    """DeiT-T: 192 channels, 12 blocks, patch 16 at 224 px."""
    return VisionTransformer(**{"embed_dim": 192, "depth": 12, **kw}, attn=attn)


def model_label(args):
    """'final', or 'final-no-gate' etc. when parts of the final module are switched off."""
    return args.attn + "".join(f"-no-{p}" for p in FINAL_PARTS if getattr(args, f"no_{p}", False))


def build_model(args, num_classes):
    """The model of the flags; sizes that do not fit are a UserError naming them."""
    off = {p: False for p in FINAL_PARTS if getattr(args, f"no_{p}", False)}
    attn = (lambda *a, **k: ATTENTIONS["final"](*a, **k, **off)) if off else args.attn
    try:
        return VisionTransformer(args.img_size, args.patch_size, num_classes, args.embed_dim,
                                 args.depth, args.num_heads or (3 if args.attn == "softmax" else 6),
                                 args.drop_path, attn)
    except ValueError as e:
        raise UserError(f"{e} (--data {args.data}: --img-size {args.img_size} --patch-size "
                        f"{args.patch_size} --embed-dim {args.embed_dim})") from None


# ----------------------------------------------------------------------------------------------
# weights: ours (a digest beside them), timm's, the official InLine ones


def file_sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def read_checkpoint(path):
    """torch.load(weights_only=True): a checkpoint is data, never code. A file with PATH.sha256
    beside it must match it. The official InLine main.py saves its yacs config beside the
    weights: it is read as a plain dict (yacs.config.CfgNode -> OrderedDict), no code run."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist")
    if os.path.isfile(path + ".sha256") and open(path + ".sha256").read().split()[0] \
            != file_sha256(path):
        raise UserError(f"checkpoint {path} is damaged: it does not match the SHA-256 in "
                        f"{path}.sha256; use an intact copy, or start afresh (--fresh)")
    try:
        with torch.serialization.safe_globals([(OrderedDict, "yacs.config.CfgNode")]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read checkpoint {path} (damaged, or not a torch file): "
                        f"{(str(e).strip().splitlines() or [type(e).__name__])[0]}") from None
    if not isinstance(ckpt, dict):
        raise UserError(f"checkpoint {path} holds a {type(ckpt).__name__}, not a state_dict")
    return ckpt


def load_weights(model, sd, path):
    """A state_dict or {"model": state_dict} (ours, timm's, InLine's), strictly; the error one
    line. pos_embed is resized (timm's resample_abs_pos_embed) for another resolution."""
    sd = sd["model"] if isinstance(sd.get("model"), dict) else sd
    pe, grid = sd.get("pos_embed"), model.patch_embed.grid
    try:
        if isinstance(pe, torch.Tensor) and pe.dim() == 3 and pe.shape[1] != 1 + grid ** 2:
            from timm.layers import resample_abs_pos_embed  # fails on a grid that is no square
            sd = {**sd, "pos_embed": resample_abs_pos_embed(pe, [grid, grid])}
        unused = sorted(set(sd) - set(model.state_dict()))  # torch skips keys of a None module
        if unused:
            raise RuntimeError(f"Unexpected key(s) in state_dict: {', '.join(unused)}")
        model.load_state_dict(sd, strict=True)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise UserError(f"{path} does not fit the model: {' '.join(str(e).split())[:400]}") \
            from None


# ----------------------------------------------------------------------------------------------
# data: synthetic shapes for the CPU demo; ImageNet folders; CIFAR

SHAPES = ("disc", "ring", "plus", "cross", "hbar", "vbar", "triangle", "nabla", "dots", "corner")


def synthetic_shapes(n, img_size=32, seed=0):
    """n images (uint8 (n, 3, S, S)) and labels (n,): one of 10 shapes at a random place and size,
    light on a dark background or dark on a light one, in random colours, with pixel noise. The
    label is the shape, so a model must learn form, not colour or position (chance: 10%)."""
    g = torch.Generator().manual_seed(seed)
    parts = [draw_shapes(min(500, n - i), img_size, g) for i in range(0, n, 500)]  # in parts
    return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])


def draw_shapes(n, img_size, g):
    y = torch.randint(len(SHAPES), (n,), generator=g)
    r = img_size * (0.2 + 0.12 * torch.rand(n, 1, 1, generator=g))     # radius, 20-32% of S
    cx, cy = (r + (img_size - 2 * r) * torch.rand(2, n, 1, 1, generator=g))  # whole shape inside
    grid = torch.arange(img_size) + 0.5
    dx, dy = (grid[None, None, :] - cx) / r, (grid[None, :, None] - cy) / r  # (n, S, S) in radii
    ax, ay = dx.abs(), dy.abs()
    d, box = (dx ** 2 + dy ** 2).sqrt(), torch.maximum(ax, ay)
    masks = torch.stack([d < 0.9, (d < 1) & (d > 0.55),                              # disc, ring
                         ((ax < 0.3) | (ay < 0.3)) & (box < 1),                      # plus
                         ((ax - ay).abs() < 0.3) & (box < 0.85),                     # cross
                         (ay < 0.3) & (ax < 1), (ax < 0.3) & (ay < 1),               # bars
                         (dy < 0.8) & (ax < 0.5 * (dy + 1)),                         # triangle
                         (dy > -0.8) & (ax < 0.5 * (1 - dy)),                        # nabla
                         ((ax - 0.55) ** 2 + dy ** 2 < 0.16),                        # dots
                         (box < 1) & ((dx < -0.45) | (dy > 0.45))])                  # corner
    mask = masks[y, torch.arange(n)][:, None]                           # (n, 1, S, S)
    # the shape is the light colour in half of the images, the dark one in the other half, so
    # that neither brightness nor colour tells the class, but every outline is a contrast
    dark, light = 0.45 * torch.rand(2, n, 3, 1, 1, generator=g)
    light = 1 - light
    is_light = torch.rand(n, 1, 1, 1, generator=g) < 0.5
    fg, bg = torch.where(is_light, light, dark), torch.where(is_light, dark, light)
    img = torch.where(mask, fg, bg) + 0.08 * torch.randn(n, 3, img_size, img_size, generator=g)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8), y


MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's; both codebases, all data
LAYOUT = ("expected --data-path DIR holding train/ and val/ with one sub-folder of images per "
          "class each, e.g. DIR/train/n01440764/x.JPEG and DIR/val/n01440764/y.JPEG")


def transforms(args):
    """(train, eval) transforms as timm builds them for both codebases (InLine's data/build.py,
    DeiT's datasets.py). Train: RandomResizedCrop (bicubic), flip, RandAugment, normalise,
    RandomErasing per pixel (colour jitter 0.4 too, which timm skips under RandAugment); at 32 px
    (CIFAR) RandomCrop with padding 4 instead of the resized crop, as InLine's. Eval: resize to
    img-size / 0.875 (InLine: to a square, 'squash'; DeiT: the shorter side), centre crop."""
    from timm.data import create_transform
    from torchvision.transforms import RandomCrop
    train = create_transform(args.img_size, is_training=True, color_jitter=0.4,
                             auto_augment=None if args.auto_augment == "none" else
                             args.auto_augment,
                             re_prob=args.random_erasing, re_mode="pixel", re_count=1,
                             interpolation="bicubic", mean=MEAN, std=STD)
    if args.img_size <= 32:
        train.transforms[0] = RandomCrop(args.img_size, padding=4)
    crop = 1.0 if args.img_size <= 32 else args.eval_crop_ratio  # 32 px: only normalised
    return train, create_transform(args.img_size, interpolation="bicubic", crop_pct=crop,
                                   crop_mode="squash" if args.eval_resize == "square" else "center",
                                   mean=MEAN, std=STD)


def load_rgb(path):
    """ImageFolder's loader, naming the file when it cannot be read."""
    from PIL import Image
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except Exception as e:
        raise UserError(f"cannot read image {path}: {e}") from None


def make_data(args):
    """(train set, held-out set, class names, batch mixer or None) for --data."""
    if args.data == "demo":  # no augmentation: every image is new anyway
        sets = [synthetic_shapes(n, args.img_size, seed) for seed, n in
                enumerate([args.demo_train, args.demo_val])]
        return *[TensorDataset((x.float() / 255 - 0.5) / 0.25, y) for x, y in sets], SHAPES, None
    from timm.data import Mixup
    from torchvision import datasets
    train_tf, eval_tf = transforms(args)
    if args.data == "imagenet":
        try:
            train, val = (datasets.ImageFolder(os.path.join(args.data_path, split), tf,
                                               loader=load_rgb)
                          for split, tf in (("train", train_tf), ("val", eval_tf)))
        except FileNotFoundError as e:  # no such folder, no class folders, a class w/o images
            raise UserError(f"{e}; {LAYOUT}") from None
        if train.classes != val.classes:  # else a label would mean two classes
            raise UserError(f"train/ and val/ must have the same class folders (in only one: "
                            f"{', '.join(sorted(set(train.classes) ^ set(val.classes))[:5])})")
    else:  # torchvision's CIFAR10 / CIFAR100: downloaded on first use, md5-checked
        cls = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}[args.data]
        folder = os.path.join(args.data_path, cls.base_folder)
        try:
            train = cls(args.data_path, True, train_tf, download=not os.path.isdir(folder))
            val = cls(args.data_path, False, eval_tf)       # the 10,000 test images
        except RuntimeError as e:  # "Dataset not found or corrupted"
            raise UserError(f"{folder}: {e} (the files fail their md5 check): delete {folder} "
                            f"to download them again") from None
        except OSError as e:  # no network, a full disk
            raise UserError(f"could not download {args.data} into {args.data_path} ({e}): "
                            f"download {cls.url} and unpack it there by hand") from None
    mix = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, switch_prob=args.mix_switch,
                label_smoothing=0.0, num_classes=len(train.classes))  # smoothing: in the loss
    return train, val, train.classes, mix if args.mixup > 0 or args.cutmix > 0 else None


def make_loaders(train_set, val_set, args, rank, world, device):
    """Each process reads its own 1/world of every epoch (the shuffle depends on seed and epoch
    only) and of the held-out set. Workers start afresh each epoch: their seeds come from the
    torch RNG, which the checkpoint restores, so a resumed run sees the same augmentations."""
    if args.repeated_aug > 1:  # timm's copy of DeiT's RASampler, shuffled by epoch only as DeiT's
        from timm.data.distributed_sampler import RepeatAugSampler
        sampler = RepeatAugSampler(train_set, world, rank, num_repeats=args.repeated_aug)
    else:
        sampler = DistributedSampler(train_set, world, rank, seed=args.seed, drop_last=True)
    kw = dict(batch_size=args.batch_size, num_workers=args.workers,
              pin_memory=device.type == "cuda")
    return (DataLoader(train_set, sampler=sampler, drop_last=True, **kw),
            DataLoader(Subset(val_set, range(rank, len(val_set), world)), **kw))


# ----------------------------------------------------------------------------------------------
# the recipe

# Every setting is a flag (img_size: --img-size 448). These are the defaults for ImageNet; None is
# filled in by the recipe and the dataset (the dicts below); flags given always win.
SETTINGS = dict(
    # data: demo (the default without --data-path), imagenet (folders train/ and val/ at
    # --data-path), cifar10 / cifar100 (downloaded into --data-path, default ./data)
    data=None, data_path=None, demo_train=10000, demo_val=2000, quick=False, workers=None,
    # the model: the attention of every block (the final module's parts can be switched off),
    # num_heads 0: 3 for softmax (timm's DeiT-T), 6 for the linear kinds (InLine's)
    attn="final", no_reweight=False, no_gate=False, no_local=False, num_heads=0, img_size=224,
    patch_size=16, embed_dim=192, depth=12, drop_path=0.1, pretrained=None,
    # the recipe: lrs per 512 images of global batch = batch_size x processes x accum_steps
    recipe="inline", epochs=300, warmup_epochs=None, warmup_lr=None, lr=None, min_lr=None,
    scale_lr=None, batch_size=None, accum_steps=1, betas=(0.9, 0.999), weight_decay=0.05,
    clip_grad=None, label_smoothing=0.1, auto_augment="rand-m9-mstd0.5-inc1", mixup=0.8,
    cutmix=1.0, mix_switch=0.5, random_erasing=0.25, repeated_aug=None, eval_crop_ratio=0.875,
    eval_resize=None, seed=0,
    # running: device and amp default to cuda and bf16 if there is a GPU; NaN checks every
    # check_every steps; resume defaults to OUTPUT/checkpoint.pth if there is one
    device=None, amp=None, compile=False, check_every=50, output=None, resume=None, fresh=False,
    eval_only=False)
RECIPES = {
    # LeapLabTHU/InLine (on Swin-Transformer's code): config.py and cfgs/inline_deit_t.yaml
    # (512 images per GPU x 8); main.py scales base, warm-up and minimum lr by batch / 512
    "inline": dict(batch_size=512, lr=5e-4, warmup_epochs=20, warmup_lr=5e-7, min_lr=5e-6,
                   scale_lr="all", clip_grad=5.0, repeated_aug=0, eval_resize="square"),
    # facebookresearch/deit main.py (DeiT-T: 4 GPUs x 256): only the base lr scaled, repeated
    # augmentation x3, no gradient clipping, eval resize of the shorter side
    "deit": dict(batch_size=256, lr=5e-4, warmup_epochs=5, warmup_lr=1e-6, min_lr=1e-5,
                 scale_lr="peak", clip_grad=0.0, repeated_aug=3, eval_resize="shorter"),
}
# --data cifar10 / cifar100: DeiT-T at 32 px with 4 px patches (64 tokens + the class token)
CIFAR = dict(img_size=32, patch_size=4, epochs=200, warmup_epochs=10, batch_size=128, lr=2e-3,
             warmup_lr=1e-6, min_lr=1e-5, scale_lr="peak", repeated_aug=0)
# the demo: a small ViT (4 blocks x 96 channels, 8 px patches: 16 tokens + the class token) on
# 32 px synthetic shapes, a few minutes on 2 CPU cores; peak lr 8e-3 x 64 / 512 = 1e-3
DEMO = dict(img_size=32, patch_size=8, embed_dim=96, depth=4, epochs=5, warmup_epochs=1,
            batch_size=64, lr=8e-3, warmup_lr=1e-5, min_lr=1e-5, drop_path=0.0, workers=0,
            scale_lr="peak", repeated_aug=0)
QUICK = dict(demo_train=5000, demo_val=1000, epochs=4)  # --quick: about 20 s a run
DATASETS = {"demo": DEMO, "imagenet": {}, "cifar10": CIFAR, "cifar100": CIFAR}
CHOICES = dict(data=DATASETS, attn=ATTENTIONS, recipe=RECIPES, scale_lr=("all", "peak"),
               eval_resize=("square", "shorter"), device=("cuda", "cpu"),
               amp=("bf16", "fp16", "none"))


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Train DeiT-T with the course's attention (without "
                                "--data-path: the CPU demo). SETTINGS in this file says what "
                                "each flag is.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for k, v in SETTINGS.items():
        flag, doc = "--" + k.replace("_", "-"), f"SETTINGS[{k!r}]"  # a help: with its default
        if isinstance(v, bool):
            p.add_argument(flag, action="store_true", help=doc)
        elif isinstance(v, tuple):
            p.add_argument(flag, type=float, nargs=len(v), default=v, help=doc)
        else:  # None: of the type the recipe gives it, else a string (a path, a name)
            kind = int if k == "workers" else type(RECIPES["inline"].get(k, v))
            kind = str if v is None and k not in RECIPES["inline"] and k != "workers" else kind
            p.add_argument(flag, type=kind, default=v, choices=CHOICES.get(k), help=doc)
    args = p.parse_args(argv)
    data = args.data or ("demo" if args.data_path is None else "imagenet")
    for bad, why in [(args.fresh and args.resume, "--fresh starts afresh; leave out --resume"),
                     (args.attn != "final" and (args.no_reweight or args.no_gate
                                                or args.no_local),
                      "--no-reweight, --no-gate, --no-local switch off parts of --attn final"),
                     (data == "demo" and args.data_path, "--data demo makes its own images"),
                     (data == "imagenet" and not args.data_path, f"--data imagenet: {LAYOUT}"),
                     (args.quick and data != "demo", "--quick shortens the demo only"),
                     (min(args.accum_steps, args.check_every) < 1, "steps must be at least 1")]:
        if bad:
            p.error(why)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    workers = max(1, min(8, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))  # shared
    p.set_defaults(**{"workers": workers, **RECIPES[args.recipe], **DATASETS[data],
                      **(QUICK if args.quick else {})})
    args = p.parse_args(argv)  # again: flags given on the command line win over the dicts
    args.data, args.data_path = data, args.data_path or ("data" if data != "demo" else None)
    args.output = args.output or os.path.join("runs", f"{data}-{model_label(args)}")
    return args


def make_optimizer(model, args, device):
    """AdamW, fused on CUDA. No weight decay on 1-D parameters (norms, biases) and the two
    embeddings: the groups of InLine's set_weight_decay and timm's param_groups_weight_decay."""
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1 or n in ("pos_embed",
                                                                               "cls_token")]
    decay = [p for p in model.parameters() if all(p is not q for q in no_decay)]
    return torch.optim.AdamW([{"params": no_decay, "weight_decay": 0.0},
                              {"params": decay, "weight_decay": args.weight_decay}],
                             lr=args.lr, betas=tuple(args.betas), fused=device.type == "cuda")


def lr_schedule(args, global_batch, steps_per_epoch):
    """lr_of(update): the lr of each update of the run (counted from 0), as timm's
    CosineLRScheduler(t_initial=all updates, lr_min=min_lr, warmup_t=warm-up updates,
    warmup_lr_init=warmup_lr, cycle_limit=1) sets it: one cosine over the whole run, whose start
    the linear warm-up replaces. The lrs are scaled by global batch / 512 (linear scaling):
    all three as InLine's main.py, or the peak only as DeiT's. Its place counts epochs, so a run
    resumes on another global batch."""
    s = global_batch / 512
    peak, warmup_lr, min_lr = args.lr * s, args.warmup_lr, args.min_lr
    if args.scale_lr == "all":
        warmup_lr, min_lr = warmup_lr * s, min_lr * s
    total, warmup = args.epochs * steps_per_epoch, args.warmup_epochs * steps_per_epoch

    def lr_of(step):
        if step < warmup:
            return warmup_lr + (peak - warmup_lr) * step / warmup
        return min_lr + 0.5 * (peak - min_lr) * (1 + math.cos(math.pi * min(step, total) / total))
    return lr_of


# ----------------------------------------------------------------------------------------------
# one epoch of training, one evaluation


def autocast(device, amp):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def all_reduce(t):
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def train_one_epoch(model, loader, criterion, optimizer, scaler, mix, device, args, lr_of,
                    epoch=1, rank=0):
    """Train on `loader` (epoch counted from 1); every args.accum_steps steps make one update,
    with lr lr_of(number of the update in the whole run). Returns the mean loss of all images.
    No step waits for the GPU: the loss sum stays on the device and is looked at (NaN?) every
    --check-every steps and at the end, before anything is saved."""
    model.train()
    accum, updates = args.accum_steps, len(loader) // args.accum_steps  # a partial one dropped
    loss_sum, seen, checked = torch.zeros((), device=device), 0, 0
    bar = tqdm(loader, desc=f"epoch {epoch}", total=updates * accum, leave=False,
               disable=(rank != 0) or None, dynamic_ncols=True)         # None: only on a terminal
    for step, (images, targets) in zip(range(updates * accum), bar):
        if step % accum == 0:
            for group in optimizer.param_groups:
                group["lr"] = lr_of((epoch - 1) * updates + step // accum)
        images = images.to(device, non_blocking=True)                   # (B, 3, S, S)
        targets = targets.to(device, non_blocking=True)                 # (B,)
        if mix is not None:
            images, targets = mix(images, targets)                      # soft targets (B, K)
        last = (step + 1) % accum == 0  # DDP averages the gradients on the last step only
        with model.no_sync() if not last and hasattr(model, "no_sync") else \
                contextlib.nullcontext():
            with autocast(device, args.amp):
                loss = criterion(model(images), targets)                # label-smoothed CE
            scaler.scale(loss / accum).backward()                       # k steps: mean of k*B
        loss_sum += loss.detach().float() * len(images)
        seen += len(images)
        if last:
            if args.clip_grad > 0:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        if (step + 1) % args.check_every == 0 or step + 1 == updates * accum:
            total = all_reduce(loss_sum.clone()).item()  # collective: all processes stop together
            if not math.isfinite(total):
                raise UserError(f"loss is {total} in epoch {epoch}, steps {checked + 1}-"
                                f"{step + 1}: stopped; the last good checkpoint is kept. Try a "
                                f"lower --lr, or --amp none")
            checked = step + 1
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}", lr=f"{group['lr']:.2e}")
    bar.close()
    total = all_reduce(torch.stack([loss_sum, loss_sum.new_tensor(float(seen))]))
    return (total[0] / total[1]).item()


@torch.no_grad()
def evaluate(model, loader, device, rank=0):
    """Top-1 and top-5 accuracy (%) over the whole held-out set (all processes), in float32
    as InLine's validate(): a top-1 that compares with the paper's."""
    model.eval()
    hits = torch.zeros(3, device=device)                                # top-1, top-5, images
    for images, targets in tqdm(loader, desc="eval", disable=(rank != 0) or None, leave=False):
        images, targets = images.to(device, non_blocking=True), targets.to(device)
        logits = model(images)                                          # (B, K)
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices == targets[:, None]  # (B, 5)
        hits += torch.stack([top5[:, 0].sum(), top5.any(1).sum(), hits.new_tensor(len(top5))])
    hits = all_reduce(hits)
    return (100 * hits[0] / hits[2]).item(), (100 * hits[1] / hits[2]).item()


# ----------------------------------------------------------------------------------------------
# checkpoints: atomic writes with a digest, every process's RNG states, exact resume


def rng_states(world):
    """The RNG states of every process (collective): drop-path and augmentation differ."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    mine = {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None,
            # numpy's key array as a tensor: the checkpoint then loads with weights_only=True
            "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)}
    states = [mine] * world
    if world > 1:
        dist.all_gather_object(states, mine)
    return states


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])
    name, keys, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))


def save_checkpoint(obj, path):
    """Write PATH.tmp, flush it to disk, rename it over PATH (a crash leaves the old file or the
    new, never half of one), then PATH.sha256 in sha256sum's format (`sha256sum -c` checks it).
    Only a crash between the two renames leaves them out of step: the file is then refused."""
    with open(path + ".tmp", "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    digest = file_sha256(path + ".tmp")
    os.replace(path + ".tmp", path)
    with open(path + ".sha256.tmp", "w") as f:
        f.write(f"{digest}  {os.path.basename(path)}\n")
    os.replace(path + ".sha256.tmp", path + ".sha256")


# the flags that make the model: a checkpoint made with other values is of another model
MODEL_FLAGS = ("data", "attn", *(f"no_{p}" for p in FINAL_PARTS), "img_size", "patch_size",
               "embed_dim", "depth", "num_heads", "drop_path")


def read_run_checkpoint(path, model, args):
    """A checkpoint of this script that continues this run: intact, complete, of this model."""
    ckpt = read_checkpoint(path)
    if not {"model", "optimizer", "rng", "args", "log"} <= set(ckpt):
        raise UserError(f"{path} is not a training checkpoint of this script: start afresh "
                        f"(--fresh, or another --output), or from its weights (--pretrained)")
    changed = [f"--{k.replace('_', '-')} {ckpt['args'].get(k)} then, {getattr(args, k)} now"
               for k in MODEL_FLAGS if ckpt["args"].get(k) != getattr(args, k)]
    if changed:
        raise UserError(f"the model changed since the run in {path} ({', '.join(changed)}): "
                        f"give that run's flags, add --fresh (it overwrites that run), or choose "
                        f"another --output")
    load_weights(model, ckpt, path)
    return ckpt


# ----------------------------------------------------------------------------------------------
# main: processes and devices, resume, the loop over epochs


def setup_distributed(device=None):
    """(rank, world size, device). torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; a plain
    `python` run is rank 0 of 1. NCCL between GPUs, gloo between CPU processes."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    cuda = torch.cuda.is_available() if device is None else device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise UserError("--device cuda, but torch sees no CUDA GPU (torch.cuda.is_available())")
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.set_float32_matmul_precision("high")  # TF32 for what runs outside autocast
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return rank, world, device


def train(args):
    rank, world, device = setup_distributed(args.device)
    args.amp = args.amp or ("bf16" if device.type == "cuda" else "none")
    log = print if rank == 0 else (lambda *a, **k: None)
    torch.manual_seed(args.seed + rank)  # different drop-path / augmentation per process; DDP
    random.seed(args.seed + rank)        # copies rank 0's initial weights to the others
    np.random.seed(args.seed + rank)
    build_model(args, 1)  # sizes that do not fit fail now, before any data is read or made
    train_set, val_set, classes, mix = make_data(args)
    model = build_model(args, len(classes))
    if args.data == "demo":
        log(f"DEMO: a small ViT ({args.depth} blocks x {args.embed_dim} channels, patch "
            f"{args.patch_size}, attention '{model_label(args)}') learns {len(classes)} shapes "
            f"at {args.img_size} px from {len(train_set)} images; {len(val_set)} held out")
    ckpt_path = os.path.join(args.output, "checkpoint.pth")
    auto = not (args.resume or args.fresh or args.eval_only) and os.path.exists(ckpt_path)
    resume = args.resume or (ckpt_path if auto else None)
    ckpt = read_run_checkpoint(resume, model, args) if resume else None
    if args.pretrained and not resume:
        load_weights(model, read_checkpoint(args.pretrained), args.pretrained)
    model = model.to(device)
    train_model = torch.compile(model) if args.compile else model
    eval_model = train_model  # evaluation skips DDP: shards differ in length, no gradients
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        train_model = nn.parallel.DistributedDataParallel(train_model, device_ids=ids)
    train_loader, val_loader = make_loaders(train_set, val_set, args, rank, world, device)
    if args.eval_only:
        if not (resume or args.pretrained):
            raise UserError("--eval-only needs weights: --pretrained PATH or --resume PATH")
        top1, top5 = evaluate(eval_model, val_loader, device, rank)
        log(f"{resume or args.pretrained}: top-1 {top1:.2f}%  top-5 {top5:.2f}%  "
            f"({len(val_set)} images at {args.img_size} px)")
        return {"top1": top1, "top5": top5}

    global_batch = args.batch_size * world * args.accum_steps
    steps = len(train_loader) // args.accum_steps                      # updates per epoch
    if steps == 0:
        raise UserError(f"{len(train_set)} training images cannot fill one update of "
                        f"{args.batch_size} x {world} processes x {args.accum_steps} steps")
    for path, _ in getattr(val_set, "samples", [])[rank::world]:  # every held-out image's
        from PIL import Image                    # header: a broken one shows now (not the demo)
        try:
            Image.open(path).close()
        except Exception as e:
            raise UserError(f"cannot read held-out image {path} ({e}): repair or remove it")
    optimizer = make_optimizer(model, args, device)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    history = []  # one dict per epoch: the lines of log.jsonl
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        for group in optimizer.param_groups:  # this device's implementation, not the saved one
            group["fused"] = device.type == "cuda"
        if scaler.is_enabled() and ckpt["scaler"]:
            scaler.load_state_dict(ckpt["scaler"])
        history = ckpt["log"]
        log(f"resuming {'automatically ' * auto}from {resume}: {len(history)} of {args.epochs} "
            f"epochs done" + "; to start afresh add --fresh or choose another --output" * auto)
        if len(ckpt["rng"]) == world:  # last: nothing may draw random numbers after this
            set_rng_state(ckpt["rng"][rank])
    lr_of = lr_schedule(args, global_batch, steps)
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)  # takes soft targets
    log(f"{sum(p.numel() for p in model.parameters()):,} parameters, {world} process(es) on "
        f"{device.type}, global batch {global_batch} ({args.batch_size} x {world} x "
        f"{args.accum_steps}), {steps} updates per epoch, amp {args.amp}")
    os.makedirs(args.output, exist_ok=True)
    try:
        for epoch in range(len(history) + 1, args.epochs + 1):             # counted from 1
            train_loader.sampler.set_epoch(epoch - 1)  # new shuffle, the same on every process
            t0 = time.time()
            loss = train_one_epoch(train_model, train_loader, criterion, optimizer, scaler, mix,
                                   device, args, lr_of, epoch, rank)
            train_s = time.time() - t0
            top1, top5 = evaluate(eval_model, val_loader, device, rank)
            best = max([top1] + [r["top1"] for r in history])
            history.append({"epoch": epoch, "loss": loss, "lr": optimizer.param_groups[0]["lr"],
                            "top1": top1, "top5": top5, "best_top1": best, "train_s": train_s,
                            "images_per_s": steps * global_batch / train_s,
                            "time_s": time.time() - t0})
            rng = rng_states(world)
            if rank == 0:
                save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                 "scaler": scaler.state_dict(), "rng": rng, "log": history,
                                 "args": vars(args)}, ckpt_path)
                if top1 == best:  # the best epoch's weights, as DeiT, InLine and timm keep
                    save_checkpoint({"model": model.state_dict(), "epoch": epoch, "top1": top1,
                                     "args": vars(args)}, os.path.join(args.output, "best.pth"))
                with open(os.path.join(args.output, "log.jsonl"), "w") as f:
                    f.writelines(json.dumps(r) + "\n" for r in history)
            log("epoch {epoch}/{n} | loss {loss:.4f} | lr {lr:.2e} | top-1 {top1:.2f}% top-5 "
                "{top5:.2f}% | {images_per_s:.0f} img/s".format(n=args.epochs, **history[-1]))
    except KeyboardInterrupt:  # Ctrl-C: main prints this one line, no traceback
        raise KeyboardInterrupt(f"the last checkpoint is {ckpt_path} (epoch {len(history)}); "
                                f"the same command resumes from it" if history else
                                "nothing saved yet: the first checkpoint comes after epoch 1") \
            from None
    best = max([r["top1"] for r in history], default=0.0)
    log(f"best top-1 {best:.2f}% of {len(history)} epochs; checkpoints, log in {args.output}")
    return {"best_top1": best, **{k: history[-1][k] for k in ("top1", "top5") if history}}


def main(argv=None):
    args = get_args(argv)
    try:
        return train(args)
    except UserError as e:
        # DataLoader workers re-raise with their traceback in the message: its last line is ours
        sys.exit("error: " + str(e).strip().splitlines()[-1].split("UserError: ")[-1])
    except ModuleNotFoundError as e:  # timm, torchvision: needed for real data only
        sys.exit(f"error: this needs the package {e.name}: pip install -r requirements.txt")
    except KeyboardInterrupt as e:  # Ctrl-C: one line (where the last checkpoint is)
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"interrupted: {e}", file=sys.stderr)
        sys.exit(130)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
