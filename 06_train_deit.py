"""Step 06 - DeiT-T with the final attention module, and its ImageNet training script.

The model is timm's VisionTransformer (Dosovitskiy et al.; DeiT, Touvron et al.) with the attention
of each block swapped for one of the steps before:

    x = [cls; patches(img) W_e] + pos_embed                 (B, N, C),  N = 1 + (S/P)^2
    x = x + drop_path(attn(norm1(x)))                        for each of the `depth` blocks
    x = x + drop_path(mlp(norm2(x)))                         mlp = fc2(GELU(fc1(x))), 4C wide
    logits = head(norm(x)[:, 0])                             the class token classifies

Names, shapes and initialisation follow timm, so `deit_tiny(attn="softmax", num_heads=3)` is timm's
deit_tiny_patch16_224 (5,717,416 parameters) and loads its checkpoint with strict=True, and
`deit_tiny(attn="inline", num_heads=6)` is the official InLine-DeiT-T (6,477,736 parameters).
Default heads: 3 for softmax (timm's 64 channels per head), 6 for every linear kind (as the InLine
paper's DeiT-T, 32 channels per head: linear attention's buffer phi(K)^T V is d x d per head).

The training recipe is the one the InLine paper used for DeiT-T (every value is a flag):
    300 epochs; warm-up 20 epochs from lr 5e-7, then cosine to 5e-6, updated every step
    AdamW, lr 5e-4 per 512 images (lr = 5e-4 * global batch / 512), betas (0.9, 0.999),
        weight decay 0.05 except on norms, biases, pos_embed and cls_token
    label smoothing 0.1, drop-path 0.1 (rising linearly over depth), grad-norm clip 5.0
    RandomResizedCrop 224 (bicubic), flip, RandAugment (magnitude 9), RandomErasing 0.25,
        MixUp 0.8 / CutMix 1.0 (one of the two per batch, CutMix with probability 0.5)
    evaluation: resize 256 (bicubic, = 224 / 0.875), centre crop 224, top-1 / top-5

The same file runs on one CPU, one GPU (bf16 autocast, --compile) or many nodes, unchanged:
    python 06_train_deit.py                                # CPU demo on synthetic shapes (~2 min)
    python 06_train_deit.py --data-path /data/imagenet       # one GPU (or CPU)
    torchrun --nproc_per_node 8 06_train_deit.py --data-path /data/imagenet
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-endpoint host:29500 06_train_deit.py ...
    python 06_train_deit.py --bench --img-size 448          # images/s: chosen attention vs softmax
Every epoch is saved twice to OUTPUT/checkpoint.pth (atomically, with a sha256 of its contents:
a damaged file is refused): after its training, then after its evaluation, with a line of JSON in
OUTPUT/log.jsonl. Running the same command again continues exactly where it stopped, and says so
(--fresh starts afresh); Ctrl-C says where the last checkpoint is. Epochs are counted from 1.
"""
import argparse
import functools
import hashlib
import importlib
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

softmax = importlib.import_module("01_softmax_attention")
injective = importlib.import_module("03_injectivity")
locality = importlib.import_module("04_local_residual")
rank_aug = importlib.import_module("05_rank_augmentation")

# every attention of the course, by name (defined in step 05); each maps (B, N, C) -> (B, N, C):
# softmax (01), linear (02), injective (03), inline (04), rala and final (05)
ATTENTIONS = rank_aug.ATTENTIONS


class UserError(Exception):
    """A problem with the input (paths, sizes, files): reported as one line, exit status 1."""


# ----------------------------------------------------------------------------------------------
# the model: timm's VisionTransformer, parameter for parameter


def default_heads(attn):
    """3 heads of 64 channels for softmax (timm's DeiT-T); 6 of 32 for the linear kinds (InLine)."""
    return 3 if attn == "softmax" else 6


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


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))                          # (B, N, C)


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio, qkv_bias, drop_path, attn_cls):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = attn_cls(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=0.0,
                             proj_drop=0.0)  # DeiT uses no dropout (linear kinds refuse it)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):                                               # (B, N, C)
        x = x + self.drop_path(self.attn(self.norm1(x)))                # pre-norm residuals
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Cut the image into P x P patches and project each to C channels (a strided convolution)."""

    def __init__(self, img_size, patch_size, in_chans, dim):
        super().__init__()
        if img_size < patch_size or img_size % patch_size:
            raise ValueError(f"img_size={img_size} is not divisible by patch_size={patch_size}: "
                             f"the image must be a whole number of patches, e.g. "
                             f"{max(1, round(img_size / patch_size)) * patch_size}")
        self.img_size, self.grid = img_size, img_size // patch_size
        self.proj = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)

    def forward(self, x):                                               # (B, 3, S, S)
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"expected {self.img_size} x {self.img_size} images, got "
                             f"{tuple(x.shape[-2:])}")
        return self.proj(x).flatten(2).transpose(1, 2)                 # (B, g*g, C)


class VisionTransformer(nn.Module):
    """ViT / DeiT with a pluggable attention. `attn`: a name in ATTENTIONS, or any module class
    with the course's constructor (dim, num_heads=, qkv_bias=, attn_drop=, proj_drop=), e.g. a
    functools.partial of the final module with one of its parts switched off.
    num_heads=None picks default_heads(attn)."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dim=192,
                 depth=12, num_heads=None, mlp_ratio=4.0, qkv_bias=True, drop_path_rate=0.1,
                 attn="final"):
        super().__init__()
        if isinstance(attn, str) and attn not in ATTENTIONS:
            raise ValueError(f"unknown attention {attn!r}; choose from {', '.join(ATTENTIONS)}")
        attn_cls = ATTENTIONS[attn] if isinstance(attn, str) else attn
        num_heads = default_heads(attn) if num_heads is None else num_heads
        softmax.check_heads(embed_dim, num_heads)
        self.num_heads = num_heads
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.patch_embed.grid ** 2, embed_dim))
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()  # deeper blocks dropped more
        self.blocks = nn.Sequential(*[Block(embed_dim, num_heads, mlp_ratio, qkv_bias, dpr[i],
                                            attn_cls) for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes)
        # timm / DeiT initialisation. It also re-initialises the Linear layers inside the attention
        # modules, as the official InLine and RALA code do; their convolutions keep torch's default.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):                                               # (B, 3, S, S)
        x = self.patch_embed(x)                                         # (B, N-1, C)
        cls = self.cls_token.expand(x.shape[0], -1, -1)                 # (B, 1, C)
        x = torch.cat([cls, x], dim=1) + self.pos_embed                 # (B, N, C)
        x = self.norm(self.blocks(x))                                   # (B, N, C)
        return self.head(x[:, 0])                                       # (B, num_classes)


def deit_tiny(attn="final", **kw):
    """DeiT-T: 192 channels, 12 blocks, patch 16 at 224 px (heads: see default_heads)."""
    return VisionTransformer(**{"embed_dim": 192, "depth": 12, **kw}, attn=attn)


# ----------------------------------------------------------------------------------------------
# checkpoints: reading, matching, resizing the position embedding


def read_checkpoint(path):
    """torch.load with every failure turned into a one-line UserError. weights_only=True: a
    checkpoint is data, never code (our checkpoints hold only tensors and Python scalars)."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot read checkpoint {path} (corrupt or not a torch file): "
                        f"{reason}") from None
    if not isinstance(ckpt, dict):
        raise UserError(f"checkpoint {path} holds a {type(ckpt).__name__}, not a state_dict")
    if "sha256" in ckpt and checksum({k: v for k, v in ckpt.items() if k != "sha256"}) \
            != ckpt["sha256"]:  # written by save_checkpoint: its contents must hash the same
        raise UserError(f"checkpoint {path} is damaged: its contents do not match the sha256 "
                        f"written with it; use an intact copy, or start afresh (--fresh, or "
                        f"another --output)")
    return ckpt


def match_state_dict(model, sd, path):
    """Raise UserError naming the keys and shapes unless sd fits model exactly (strict=True)."""
    own = model.state_dict()
    if not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"checkpoint {path} is not a state_dict (or {{'model': state_dict}})")
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} in file vs {tuple(v.shape)} in model"
              for k, v in own.items() if k in sd and sd[k].shape != v.shape]

    def some(items):
        return ", ".join(items[:4]) + (f" and {len(items) - 4} more" if len(items) > 4 else "")
    problems = [f"{name} {some(items)}" for name, items in
                [("missing keys:", missing), ("unexpected keys:", unexpected),
                 ("shape mismatch:", shapes)] if items]
    if problems:
        raise UserError(f"checkpoint {path} does not match the model ({model.num_heads} heads, "
                        f"{len(own)} tensors): " + "; ".join(problems))


def resize_pos_embed(pos_embed, grid):
    """(1, 1 + g*g, C) -> (1, 1 + grid*grid, C): class token row kept, the g x g grid resized
    bicubically (the usual way to fine-tune at a new resolution)."""
    cls, patches = pos_embed[:, :1], pos_embed[:, 1:]                   # (1, 1, C), (1, g*g, C)
    g, C = math.isqrt(patches.shape[1]), pos_embed.shape[-1]
    if g * g != patches.shape[1]:
        raise UserError(f"pos_embed with {patches.shape[1]} patch tokens is not a square grid")
    patches = patches.reshape(1, g, g, C).permute(0, 3, 1, 2)           # (1, C, g, g)
    patches = F.interpolate(patches.float(), size=(grid, grid), mode="bicubic",
                            align_corners=False).to(pos_embed.dtype)    # (1, C, grid, grid)
    return torch.cat([cls, patches.permute(0, 2, 3, 1).reshape(1, grid * grid, C)], dim=1)


def load_pretrained(model, path):
    """Load a bare state_dict or {"model": state_dict} with strict=True, resizing pos_embed if
    the checkpoint was trained at another resolution."""
    sd = read_checkpoint(path)
    sd = sd["model"] if isinstance(sd.get("model"), dict) else sd
    pe, own = sd.get("pos_embed"), model.pos_embed
    if isinstance(pe, torch.Tensor) and pe.dim() == 3 and pe.shape[-1] == own.shape[-1] \
            and pe.shape != own.shape:  # same width, another grid: another resolution
        sd = {**sd, "pos_embed": resize_pos_embed(pe, model.patch_embed.grid)}
    match_state_dict(model, sd, path)
    model.load_state_dict(sd, strict=True)


# ----------------------------------------------------------------------------------------------
# data: a synthetic shapes task for the CPU demo, ImageNet folders for the real thing

SHAPES = ("disc", "ring", "plus", "cross", "hbar", "vbar", "triangle", "nabla", "dots", "corner")


def synthetic_shapes(n, img_size=32, seed=0):
    """n images (uint8 (n, 3, S, S)) and labels (n,): one of 10 shapes at a random place and size,
    light on a dark background or dark on a light one, in random colours, with pixel noise. The
    label is the shape, so a model must learn form, not colour or position (chance: 10%)."""
    g = torch.Generator().manual_seed(seed)
    parts = [draw_shapes(min(500, n - i), img_size, g) for i in range(0, n, 500)]  # bounded memory
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
    # a dark and a light colour (each channel 0.1 or more apart); the shape is the light one in
    # half of the images, the dark one in the other half, so that neither brightness nor colour
    # tells the class, but every patch still shows the shape's outline as a contrast
    dark, light = 0.45 * torch.rand(2, n, 3, 1, 1, generator=g)
    light = 1 - light
    shape_is_light = torch.rand(n, 1, 1, 1, generator=g) < 0.5
    fg, bg = torch.where(shape_is_light, light, dark), torch.where(shape_is_light, dark, light)
    img = torch.where(mask, fg, bg) + 0.08 * torch.randn(n, 3, img_size, img_size, generator=g)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8), y


class TensorImages(Dataset):
    """uint8 images in memory, served as normalised float tensors."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return (self.images[i].float() / 255 - 0.5) / 0.25, self.labels[i]


LAYOUT = ("expected --data-path DIR holding train/ and val/, each with one sub-folder of images "
          "per class, e.g. DIR/train/n01440764/x.JPEG and DIR/val/n01440764/y.JPEG (ImageNet's "
          "val/ must be sorted into class folders too)")


def check_layout(root):
    """Fail early, with the expected layout, on a missing or wrongly laid out --data-path."""
    if not os.path.isdir(root):
        raise UserError(f"--data-path {root} is not a directory; {LAYOUT}")
    classes = {}
    for split in ("train", "val"):
        d = os.path.join(root, split)
        if not os.path.isdir(d):
            raise UserError(f"--data-path {root} has no {split}/ folder; {LAYOUT}")
        classes[split] = sorted(e.name for e in os.scandir(d) if e.is_dir())
        if not classes[split]:
            raise UserError(f"{d} has no class folders; {LAYOUT}")
    if classes["train"] != classes["val"]:
        diff = sorted(set(classes["train"]) ^ set(classes["val"]))
        raise UserError(f"train/ ({len(classes['train'])} classes) and val/ "
                        f"({len(classes['val'])}) must have the same class folders; "
                        f"in only one: {', '.join(diff[:5])}")


def load_rgb(path):
    """ImageFolder's loader, naming the file when it cannot be read."""
    from PIL import Image
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except Exception as e:
        raise UserError(f"cannot read image {path}: {e}") from None


def train_transform(args):
    """The official augmentation, built by timm as both official codebases build it (InLine's
    data/build.py build_transform, DeiT's datasets.py): RandomResizedCrop (bicubic), flip,
    RandAugment 'rand-m9-mstd0.5-inc1' (2 ops, each with probability 0.5, magnitude 9 of 10 with
    N(0, 0.5) jitter, the 'increasing' variants), normalise, RandomErasing per pixel. Colour jitter
    0.4 is passed too, as both do; timm skips it when RandAugment is on. Images of 32 px or less
    (CIFAR) get RandomCrop(padding 4) instead of the resized crop, as InLine's build_transform."""
    from timm.data import create_transform
    from torchvision.transforms import v2
    tf = create_transform(args.img_size, is_training=True, color_jitter=0.4,
                          auto_augment=args.auto_augment if args.auto_augment != "none" else None,
                          re_prob=args.random_erasing, re_mode="pixel", re_count=1,
                          interpolation="bicubic", mean=MEAN, std=STD)
    if args.img_size <= 32:
        tf.transforms[0] = v2.RandomCrop(args.img_size, padding=4)
    return tf


def eval_transform(args, native_size):
    """Resize to img-size / eval-crop-ratio (256 for 224), bicubic, then centre-crop img-size.
    --eval-resize square: to a 256 x 256 square (InLine's build_transform); shorter: the shorter
    side to 256, keeping the aspect ratio (timm / DeiT). Images already at img-size (CIFAR at
    32 px) are only normalised, as InLine's build_transform does for 32 px."""
    from torchvision.transforms import v2
    to_tensor = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)]
    if native_size == args.img_size:
        return v2.Compose(to_tensor)
    size = int(args.img_size / args.eval_crop_ratio)  # 256 for 224
    size = (size, size) if args.eval_resize == "square" else size
    return v2.Compose([v2.Resize(size, interpolation=v2.InterpolationMode.BICUBIC),
                       v2.CenterCrop(args.img_size), *to_tensor])


def batch_mixer(args, num_classes):
    """timm's Mixup, as both official codebases: per batch, MixUp (alpha 0.8) or, with probability
    --mix-switch, CutMix (alpha 1.0). It returns soft targets; label smoothing stays in the loss
    (CrossEntropyLoss(label_smoothing) of a mixed one-hot equals timm's smoothed mixed target)."""
    if args.mixup <= 0 and args.cutmix <= 0:
        return None
    from timm.data import Mixup
    return Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=1.0,
                 switch_prob=args.mix_switch, mode="batch", label_smoothing=0.0,
                 num_classes=num_classes)


MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's; both use it for all data


def imagenet_data(args):
    """(train set, val set, classes, batch mixer) from an ImageFolder tree, with the official
    augmentation. torchvision and timm are needed on this path only."""
    from torchvision.datasets import ImageFolder
    check_layout(args.data_path)
    try:
        train = ImageFolder(os.path.join(args.data_path, "train"), train_transform(args),
                            loader=load_rgb)
        val = ImageFolder(os.path.join(args.data_path, "val"), eval_transform(args, None),
                          loader=load_rgb)
    except FileNotFoundError as e:  # a class folder without any image file
        raise UserError(f"{e}; {LAYOUT}") from None
    return train, val, train.classes, batch_mixer(args, len(train.classes))


# CIFAR's own on-disk format (https://www.cs.toronto.edu/~kriz/cifar.html): pickled dicts with
# 'data' (n, 3072) uint8 rows (1024 red, 1024 green, 1024 blue values, row-major 32 x 32).
CIFAR = {"cifar10": dict(folder="cifar-10-batches-py", labels="labels", meta="batches.meta",
                         names="label_names", test=["test_batch"],
                         train=[f"data_batch_{i}" for i in range(1, 6)]),
         "cifar100": dict(folder="cifar-100-python", labels="fine_labels", meta="meta",
                          names="fine_label_names", test=["test"], train=["train"])}


class ArrayImages(Dataset):
    """uint8 images (n, H, W, 3) in memory, served through a PIL transform."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def read_cifar(name, root):
    """(train images, train labels, test images, test labels, class names) from CIFAR's folder."""
    import pickle
    spec, out = CIFAR[name], {}
    folder = os.path.join(root, spec["folder"])

    def load(file):
        path = os.path.join(folder, file)
        try:
            with open(path, "rb") as f:
                return pickle.load(f, encoding="latin1")
        except Exception as e:
            raise UserError(f"cannot read {path} ({type(e).__name__}: {e}): the CIFAR files are "
                            f"corrupt or incomplete; delete {folder} to download them again") \
                from None
    for split in ("train", "test"):
        parts = [load(f) for f in spec[split]]
        try:
            x = np.concatenate([np.asarray(p["data"], dtype=np.uint8) for p in parts])
            y = np.concatenate([np.asarray(p[spec["labels"]], dtype=np.int64) for p in parts])
            x = x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)          # (n, 32, 32, 3)
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{folder} is not in CIFAR's format ({type(e).__name__}: {e}); "
                            f"delete it to download it again") from None
        if len(x) != len(y):
            raise UserError(f"{folder}: {len(x)} {split} images but {len(y)} labels; "
                            f"delete it to download it again")
        out[split] = x, y
    names = load(spec["meta"]).get(spec["names"])
    return (*out["train"], *out["test"], list(names))


def download_cifar(name, root):
    """torchvision's download (progress bar, md5 check, extraction) into root."""
    from torchvision import datasets
    cls = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}[name]
    print(f"downloading {name} ({cls.url}) into {root} ...")
    try:
        cls(root, train=True, download=True)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"could not download {name} from {cls.url} into {root}: {reason}. "
                        f"Check the network, or download and unpack {cls.filename} into {root} "
                        f"by hand") from None


def cifar_data(args):
    """(train set, test set, classes, batch mixer) for --data cifar10 / cifar100: downloaded into
    --data-path on first use, then read from CIFAR's own files; the 10,000 test images are val."""
    root = args.data_path
    if not os.path.isdir(os.path.join(root, CIFAR[args.data]["folder"])):
        os.makedirs(root, exist_ok=True)
        download_cifar(args.data, root)
    x, y, xt, yt, classes = read_cifar(args.data, root)
    train = ArrayImages(x, y, train_transform(args))
    val = ArrayImages(xt, yt, eval_transform(args, 32))
    return train, val, classes, batch_mixer(args, len(classes))


class RepeatedAugSampler(torch.utils.data.Sampler):
    """DeiT's repeated augmentation (its samplers.py RASampler): each epoch every image is taken
    `repeats` times, the copies spread over the processes (each copy gets its own random
    augmentation), and each process keeps len // 256 * 256 / world indices, so an epoch has as
    many steps as without it."""

    def __init__(self, dataset, num_replicas, rank, repeats=3, seed=0):
        self.n, self.world, self.rank, self.repeats = len(dataset), num_replicas, rank, repeats
        self.seed, self.epoch = seed, 0
        self.per_rank = math.ceil(self.n * repeats / num_replicas)
        self.keep = (self.n // 256 * 256 if self.n >= 256 else self.n) // num_replicas

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.keep

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        idx = torch.randperm(self.n, generator=g).repeat_interleave(self.repeats).tolist()
        idx += idx[:self.per_rank * self.world - len(idx)]              # pad to a multiple of world
        return iter(idx[self.rank::self.world][:self.keep])


def default_workers():
    """Data loading processes per training process: the CPU cores this process may use, shared
    by the training processes of this machine (torchrun's LOCAL_WORLD_SIZE), at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(8, (cores or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))


def make_loaders(train_set, val_set, args, rank, world, device):
    """Each process reads its own 1/world of every epoch (the sampler's shuffle depends only on
    seed and epoch) and of the validation set (no padding, so the all-reduced counts are exact).
    Workers are not persistent: a fresh iterator per epoch draws its worker seeds from the
    torch RNG, which the checkpoint restores, so a resumed run sees the same augmentations."""
    if args.repeated_aug > 1:  # DeiT's recipe
        sampler = RepeatedAugSampler(train_set, world, rank, args.repeated_aug, seed=args.seed)
    else:
        sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True,
                                     seed=args.seed, drop_last=True)
    common = dict(batch_size=args.batch_size, num_workers=args.workers,
                  pin_memory=device.type == "cuda")
    train = DataLoader(train_set, sampler=sampler, drop_last=True, **common)
    val = DataLoader(Subset(val_set, range(rank, len(val_set), world)), **common)
    return train, val


# ----------------------------------------------------------------------------------------------
# optimisation


def param_groups(model, weight_decay):
    """AdamW groups: no weight decay on norms, biases (1-D) and the two embeddings."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or name.endswith(".bias") or name in ("pos_embed", "cls_token")
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model, args, device):
    """AdamW on param_groups; fused (one kernel per parameter) on CUDA. On CPU the for-loop one:
    fused there changed the demo's result by rounding (best top-1 99.95% -> 99.85%) and not its
    time (64 s both)."""
    return torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr,
                             betas=tuple(args.betas), fused=device.type == "cuda")


def scaled_lrs(args, global_batch):
    """(peak, warm-up, minimum lr): the linear scaling rule (Goyal et al.), lr x global batch / 512.
    InLine's main.py scales all three; DeiT's main.py the peak only (--scale-lr)."""
    scale = global_batch / 512
    if args.scale_lr == "all":
        return args.lr * scale, args.warmup_lr * scale, args.min_lr * scale
    return args.lr * scale, args.warmup_lr, args.min_lr


def lr_schedule(optimizer, peak, warmup_lr, min_lr, warmup_steps, total_steps, start_step=0):
    """Per step: linear warm-up warmup_lr -> peak, then cosine peak -> min_lr at total_steps.
    The returned scheduler stands at start_step (its lr is that step's)."""
    def factor(step):  # LambdaLR multiplies the peak lr by this
        if step < warmup_steps:
            return (warmup_lr + (peak - warmup_lr) * step / warmup_steps) / peak
        t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return (min_lr + (peak - min_lr) * 0.5 * (1 + math.cos(math.pi * t))) / peak
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] = peak  # also over what a loaded optimizer state had
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=start_step - 1)


def schedule(optimizer, args, global_batch, steps_per_epoch, epochs_done=0):
    """(peak lr, scheduler) for this global batch, standing at the start of epoch epochs_done + 1.
    The place in the schedule is counted in epochs, not steps, and the peak follows the global
    batch: a run resumed with another number of processes (another global batch, another number
    of steps per epoch) continues where it stopped, at the new batch's lr."""
    peak, warmup_lr, min_lr = scaled_lrs(args, global_batch)
    return peak, lr_schedule(optimizer, peak, warmup_lr, min_lr,
                             args.warmup_epochs * steps_per_epoch, args.epochs * steps_per_epoch,
                             start_step=epochs_done * steps_per_epoch)


# ----------------------------------------------------------------------------------------------
# processes and devices


def setup_distributed(device=None):
    """(rank, world size, device). torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; a plain
    `python` run is rank 0 of 1. NCCL between GPUs, gloo between CPU processes."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    use_cuda = torch.cuda.is_available() if device is None else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise UserError("--device cuda, but torch sees no CUDA GPU (torch.cuda.is_available())")
    if use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        torch.set_float32_matmul_precision("high")  # TF32 for what runs outside autocast
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return rank, world, device


def all_reduce_sum(t):
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def all_reduce_max(t):
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def prepare(model, device, world, compile=False):
    """(model to train, model to evaluate): compiled if asked, DDP-wrapped when world > 1.
    Evaluation skips DDP: shards can differ in length, and no gradients need averaging."""
    model = model.to(device)
    if compile:
        model = torch.compile(model)
    if world > 1:
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                       else None), model
    return model, model


def autocast(device, amp):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


# ----------------------------------------------------------------------------------------------
# one epoch of training, one evaluation


def stop_if_not_finite(first_bad, epoch):
    """Look at the device-side record of the first non-finite loss (one host sync; collective, so
    every process stops together) and stop before anything is saved."""
    first_bad = all_reduce_max(first_bad.clone())                       # (2,): step, loss
    if first_bad[0].item() >= 0:
        step, value = int(first_bad[0].item()) + 1, first_bad[1].item()    # counted from 1
        raise UserError(f"loss is {value} at epoch {epoch}, step {step}: training stopped "
                        f"before the epoch's checkpoint; the last good checkpoint is kept. "
                        f"Try a lower --lr, or --amp none")


def train_one_epoch(model, loader, criterion, optimizer, scheduler, scaler, mix, device, args,
                    epoch=1, rank=0):
    """Train on every batch of `loader` (epoch: its number, counted from 1 as everywhere a person
    reads it); returns the mean loss over all processes' images.
    No step waits for the GPU: the loss sum and the first non-finite loss are kept on the device
    and looked at every --check-every steps and at the end (a NaN then stops the run before the
    epoch's checkpoint is written)."""
    model.train()
    loss_sum, images_seen = torch.zeros((), device=device), 0
    first_bad = torch.tensor([-1.0, 0.0], device=device)                # step, loss (-1: none)
    every = getattr(args, "check_every", 50)
    # progress bars on rank 0 only, and only on a terminal (None: tqdm checks for a TTY)
    of = f"/{args.epochs}" if hasattr(args, "epochs") else ""
    bar = tqdm(loader, desc=f"epoch {epoch}{of}", disable=(rank != 0) or None, leave=False,
               dynamic_ncols=True)
    for step, (images, targets) in enumerate(bar):
        images = images.to(device, non_blocking=True)                   # (B, 3, S, S)
        targets = targets.to(device, non_blocking=True)                 # (B,) or (B, classes)
        if mix is not None:
            images, targets = mix(images, targets)                      # soft targets (B, K)
        with autocast(device, args.amp):
            loss = criterion(model(images), targets)                    # label-smoothed CE
        loss_d = loss.detach().float()
        new_bad = ~torch.isfinite(loss_d) & (first_bad[0] < 0)          # the first one only
        first_bad = torch.where(new_bad, torch.stack([torch.full_like(loss_d, step), loss_d]),
                                first_bad)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()                                   # DDP all-reduces here
        if args.clip_grad > 0:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()                                                # lr is set per step
        loss_sum += loss_d * len(images)
        images_seen += len(images)
        if (step + 1) % every == 0:                                     # one sync per k steps
            stop_if_not_finite(first_bad, epoch)
            bar.set_postfix(loss=f"{loss_sum.item() / images_seen:.3f}",
                            lr=f"{optimizer.param_groups[0]['lr']:.2e}")
    stop_if_not_finite(first_bad, epoch)
    total = all_reduce_sum(torch.stack([loss_sum, loss_sum.new_tensor(float(images_seen))]))
    return (total[0] / total[1]).item()


@torch.no_grad()
def check_held_out(model, val_set, device, args, rank=0, world=1):
    """Before the first epoch: open every held-out image file (its header only, each process
    1/world of them) and pass a few held-out images through the transform and the model, so
    that a broken val/ image is reported before an epoch of training is spent. (A file cut short
    after its header shows only when decoded, at the first evaluation.)"""
    samples = getattr(val_set, "samples", [])[rank::world]             # ImageFolder's (path, class)
    if samples:
        from PIL import Image
        for path, _ in tqdm(samples, desc="checking val/ images", disable=(rank != 0) or None,
                            leave=False):
            try:
                with Image.open(path):
                    pass
            except Exception as e:
                raise UserError(f"cannot read held-out image {path} ({e}), found before "
                                f"training: repair or remove it") from None
    model.eval()
    images = held_out_batch(val_set, 4).to(device)                      # (4, 3, S, S)
    try:
        with autocast(device, args.amp):
            model(images)                                               # (4, K)
    except ValueError as e:  # e.g. a changed transform: images of another size
        raise UserError(f"held-out images do not fit the model, found before training: "
                        f"{e}") from None


@torch.no_grad()
def evaluate(model, loader, device, args, rank=0):
    """Top-1 and top-5 accuracy (%) over the whole validation set (all processes)."""
    model.eval()
    hits_sum, seen = torch.zeros(2, device=device), 0                   # top-1, top-5 hits
    for images, targets in tqdm(loader, desc="eval", disable=(rank != 0) or None, leave=False):
        images, targets = images.to(device, non_blocking=True), targets.to(device)
        with autocast(device, args.amp):
            logits = model(images)                                      # (B, K)
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices      # (B, 5)
        hits = top5 == targets[:, None]                                 # (B, 5)
        hits_sum += torch.stack([hits[:, 0].sum(), hits.any(1).sum()]).float()
        seen += len(targets)
    stats = all_reduce_sum(torch.cat([hits_sum, hits_sum.new_tensor([float(seen)])]))
    return (100 * stats[0] / stats[2]).item(), (100 * stats[1] / stats[2]).item()


# ----------------------------------------------------------------------------------------------
# checkpoints: RNG states of every process, atomic writes


def rng_state():
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            # numpy's key array as a tensor: the checkpoint then loads with weights_only=True
            "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)}


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])
    name, keys, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))


def gather_rng_states(world):
    """Every process's RNG states (drop-path masks and augmentations differ per process)."""
    states = [None] * world
    if world > 1:
        dist.all_gather_object(states, rng_state())
    else:
        states[0] = rng_state()
    return states


def checksum(obj):
    """sha256 over every tensor's bytes (with its dtype and shape) and every other value of a
    checkpoint, in order. It is computed again on loading: bytes damaged on disk (in the middle
    of a tensor, where torch.load itself notices nothing) change it."""
    h = hashlib.sha256()

    def walk(x):
        if isinstance(x, torch.Tensor):
            h.update(f"{x.dtype}{tuple(x.shape)}".encode())
            h.update(x.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        elif isinstance(x, dict):
            for k, v in x.items():
                h.update(repr(k).encode())
                walk(v)
        elif isinstance(x, (list, tuple)):
            h.update(f"{type(x).__name__}{len(x)}".encode())
            for v in x:
                walk(v)
        else:
            h.update(repr(x).encode())
    walk(obj)
    return h.hexdigest()


def save_checkpoint(obj, path):
    """save_atomic, with the checksum of everything in it under "sha256"."""
    save_atomic({**obj, "sha256": checksum(obj)}, path)


def save_atomic(obj, path):
    """Write to a temporary file, flush it to disk, then rename over `path`: a crash at any moment
    leaves either the old checkpoint or the new one, never half of one."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def keep_log(path, epochs):
    """Keep the lines of epochs 1..epochs in log.jsonl: those of the run being resumed."""
    if os.path.isfile(path):
        records = [r for r in read_jsonl(path) if r["epoch"] <= epochs]
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)


# ----------------------------------------------------------------------------------------------
# analysis: the papers' measurements on a (trained) model, block by block
#
# For every block the attention's input x (B, N, C) is caught by a forward hook; the module
# itself then gives its weights (attention_weights) and KV buffers (kv_buffer), and the measures
# are those of steps 03-05, imported, not rewritten:
#   local attention mass of the patch queries in their 3x3 / 5x5 / 7x7 windows (InLine Fig. 4),
#   confused pairs: distinct queries of one image whose attention rows are (nearly) the same
#       (L1 distance < tol; InLine Fig. 2 / step 03),
#   effective rank of the per-head KV buffer and of the block's N x C output (RALA's analysis).

WINDOWS = (3, 5, 7)


@torch.no_grad()
def analyze(model, images, tol=0.05):
    """One dict of measurements per block of `model` on `images` (B, 3, S, S)."""
    model.eval()
    seen = {}  # block index -> (input x, output) of its attention module
    hooks = [blk.attn.register_forward_hook(lambda mod, inp, out, i=i: seen.update({i: (inp[0], out)}))
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
        patches = w[..., cls:, :].flatten(0, 1)                 # (B*H, P, N) the patch queries' rows
        row["confused"] = sum(injective.confusion_pairs(r, tol) for r in patches) / (B * H)
        row["pairs"] = (N - cls) * (N - cls - 1) // 2
        kv = attn.kv_buffer(x)                                  # (B, H, d, d); softmax: (B, H, N, N)
        row["rank_kv"], row["rank_kv_max"] = float(rank_aug.effective_rank(kv).mean()), kv.shape[-1]
        row["rank_out"], row["rank_out_max"] = float(rank_aug.effective_rank(out).mean()), out.shape[-1]
        attn.float()
        rows.append(row)
    return rows


def print_analysis(rows, label, n_images, tol, log=print):
    log(f"analysis of {label} on {n_images} held-out images, per block (mean over images, heads and "
        f"patch queries):\n  mass: share of a patch query's attention in its k x k window "
        f"(x: over a uniform distribution, InLine Fig. 4);\n  confused: pairs of patch queries of one "
        f"image with the same attention distribution (L1 < {tol:g}, of {rows[0]['pairs']:,});\n  eff. "
        f"rank: of each head's KV buffer (softmax: its N x N weights) and of the block's N x C output")
    log(f"{'block':>5} | " + " | ".join(f"{w}x{w} mass (x unif)" for w in WINDOWS)
        + f" | {'confused':>8} | {'rank KV':>7} {'of':>3} | {'rank out':>8} {'of':>3}")
    for r in rows:
        log(f"{r['block']:>5} | " + " | ".join(f"{r[f'mass_{w}']:>8.3f} (x{r[f'mass_{w}'] / r[f'uniform_{w}']:>5.2f})"
                                       for w in WINDOWS)
            + f" | {r['confused']:>8.1f} | {r['rank_kv']:>7.2f} {r['rank_kv_max']:>3} |"
              f" {r['rank_out']:>8.2f} {r['rank_out_max']:>3}")


def held_out_batch(val_set, n):
    """n images spread evenly over the held-out set (ImageFolder sorts by class)."""
    idx = torch.linspace(0, len(val_set) - 1, min(n, len(val_set))).round().long().unique()
    return torch.stack([val_set[int(i)][0] for i in idx])       # (n, 3, S, S)


# ----------------------------------------------------------------------------------------------
# figures from run directories (log.jsonl, analysis.json); matplotlib only on this path


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_runs(runs, out_dir, log=print):
    """training_curves.png (loss and top-1 against epoch, one line per run) and, for the runs
    that have an analysis.json, local_mass.png (InLine Fig. 4: mass per block, with the uniform
    baseline). Returns the paths written."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no window
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    os.makedirs(out_dir, exist_ok=True)
    curves = {r: read_jsonl(os.path.join(r, "log.jsonl")) for r in runs
              if os.path.isfile(os.path.join(r, "log.jsonl"))}
    analyses = {r: json.load(open(os.path.join(r, "analysis.json"))) for r in runs
                if os.path.isfile(os.path.join(r, "analysis.json"))}
    if not curves and not analyses:
        raise UserError(f"none of {', '.join(runs)} holds a log.jsonl or analysis.json to plot")
    written = []
    if curves:
        fig, (ax_loss, ax_top1) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=100)
        for r, recs in curves.items():
            epochs = [rec["epoch"] for rec in recs]                      # counted from 1
            ax_loss.plot(epochs, [rec["loss"] for rec in recs], marker=".", label=os.path.basename(r))
            ax_top1.plot(epochs, [rec["top1"] for rec in recs], marker=".", label=os.path.basename(r))
        ax_loss.set(xlabel="epoch", ylabel="training loss", title="training loss")
        ax_top1.set(xlabel="epoch", ylabel="held-out top-1 (%)", title="held-out top-1")
        for ax in (ax_loss, ax_top1):
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))  # whole epochs
        for ax in (ax_loss, ax_top1):
            ax.grid(alpha=0.3)
        ax_top1.legend(fontsize=8)
        fig.tight_layout()
        written.append(os.path.join(out_dir, "training_curves.png"))
        fig.savefig(written[-1])
        plt.close(fig)
    if analyses:
        fig, axes = plt.subplots(1, len(WINDOWS), figsize=(4 * len(WINDOWS), 3.6), dpi=100)
        for r, a in analyses.items():
            blocks = [row["block"] for row in a["blocks"]]
            for ax, win in zip(axes, WINDOWS):
                ax.plot(blocks, [row[f"mass_{win}"] for row in a["blocks"]], marker="o",
                        label=a["label"])
        for ax, win in zip(axes, WINDOWS):
            base = next(iter(analyses.values()))["blocks"][0][f"uniform_{win}"]
            ax.axhline(base, color="gray", ls=":", label="uniform")
            ax.set(xlabel="block", ylabel=f"attention mass in the {win}x{win} window",
                   title=f"local attention mass, {win}x{win}", ylim=(0, None))
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        written.append(os.path.join(out_dir, "local_mass.png"))
        fig.savefig(written[-1])
        plt.close(fig)
    for path in written:
        log(f"wrote {path}")
    return written


def summarize_runs(runs, log=print):
    """A markdown table over run directories, one row per model (attention and switched-off
    parts), over the seeds: final held-out top-1 mean +- std, parameters, train img/s."""
    groups = {}
    for r in runs:
        path = os.path.join(r, "checkpoint.pth")
        if not os.path.isfile(path):
            raise UserError(f"{r} holds no checkpoint.pth: not a finished run directory")
        ckpt = read_checkpoint(path)
        recs = read_jsonl(os.path.join(r, "log.jsonl"))
        label = model_label(argparse.Namespace(**ckpt["args"]))
        params = sum(v.numel() for v in ckpt["model"].values())
        groups.setdefault(label, []).append((recs[-1]["top1"], params,
                                             np.mean([rec["images_per_s"] for rec in recs])))
    order = list(ATTENTIONS)  # the course's order, then the final module's ablations
    log("| attention | seeds | held-out top-1 (%), mean +- std | min - max | parameters |"
        " train img/s |")
    log("|---|---|---|---|---|---|")
    for label in sorted(groups, key=lambda l: (order.index(l.split("-no-")[0])
                                               if l.split("-no-")[0] in order else len(order), l)):
        rows = groups[label]
        top1 = np.array([t for t, _, _ in rows])
        std = f"{top1.std(ddof=1):.1f}" if len(top1) > 1 else "-"  # sample std over seeds
        log(f"| {label} | {len(rows)} | {top1.mean():.1f} +- {std} | {top1.min():.1f} - "
            f"{top1.max():.1f} | {rows[0][1]:,} | {np.mean([s for _, _, s in rows]):.0f} |")
    return groups


# ----------------------------------------------------------------------------------------------
# benchmark: the chosen attention against softmax, same run, same settings


def bench(args, device, log, spread_limit=0.1):
    """Train (forward, backward, AdamW step) and inference images/s at --img-size, for the chosen
    attention and for softmax (timm's DeiT-T with 3 heads), on random images: --bench-steps
    rounds, each running both models once (interleaved, so load hits both alike), after one
    step that measures peak memory and --bench-warmup untimed ones. Returns {name: (train img/s, infer img/s)}."""
    batch = args.bench_batch or (128 if device.type == "cuda" else 8)
    x = torch.randn(batch, 3, args.img_size, args.img_size, device=device)  # (B, 3, S, S)
    y = torch.randint(1000, (batch,), device=device)
    log(f"bench: {args.depth} blocks x {args.embed_dim} channels, {args.img_size} px "
        f"(N = {1 + (args.img_size // args.patch_size) ** 2} tokens), batch {batch}, "
        f"{device.type}, amp {args.amp}, compile {args.compile}"
        + ("" if device.type == "cuda" else f", {torch.get_num_threads()} threads")
        + f", {args.bench_steps} rounds (median [min - max])")
    names = list(dict.fromkeys([args.attn, "softmax"]))
    models, train, infer, peak = {}, {}, {}, {}
    for name in names:
        heads = args.num_heads if name == args.attn else None
        model = build_model(argparse.Namespace(**{**vars(args), "attn": name,
                                                  "num_heads": heads}), 1000).to(device)
        run = torch.compile(model) if args.compile else model
        opt = make_optimizer(model, args, device)  # training's (its lr does not change the time)

        def train_step(model=model, run=run, opt=opt):
            model.train()
            with autocast(device, args.amp):
                loss = F.cross_entropy(run(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        def infer_step(model=model, run=run):
            model.eval()
            with torch.no_grad(), autocast(device, args.amp):
                run(x)
        models[name], train[name], infer[name] = model, train_step, infer_step
        # the first calls (they compile, with --compile) measure peak memory; a few more before
        # timing, as the allocator and caches settle over the first steps (measured on CPU: the
        # final model's first 3-5 training steps are up to 1.7x slower than its later ones)
        peak[name] = (softmax.peak_memory(train_step, device), softmax.peak_memory(infer_step, device))
        for _ in range(args.bench_warmup):
            train_step(), infer_step()
    res = {"train": softmax.compare(train, "softmax", args.bench_steps, device),
           "infer": softmax.compare(infer, "softmax", args.bench_steps, device)}
    log(f"{'attention':>10} {'heads':>5} {'params':>9} | {'train img/s [min - max]':>25} {'peak MB':>8}"
        f" | {'infer img/s [min - max]':>25} {'peak MB':>8}")
    speed = {}
    for name in names:
        cells = []
        for i, mode in enumerate(("train", "infer")):
            t, t0, t1 = res[mode][name]["time"]  # seconds per batch: img/s = batch / t
            cells.append(f"{batch / t:>9.1f} [{batch / t1:>6.1f} - {batch / t0:>6.1f}]"
                         f" {softmax.fmt_mb(peak[name][i]):>8}")
        speed[name] = tuple(batch / res[mode][name]["time"][0] for mode in ("train", "infer"))
        log(f"{name:>10} {models[name].num_heads:>5} "
            f"{sum(p.numel() for p in models[name].parameters()):>9,} | " + " | ".join(cells))
    if args.attn != "softmax":
        # img/s ratio = softmax's time / its time, per round; median [min - max] over rounds
        ratio = {m: [1 / r for r in res[m][args.attn]["ratio"]] for m in res}
        log(f"{args.attn} / softmax img/s: train x{ratio['train'][0]:.2f} [{ratio['train'][2]:.2f}"
            f" - {ratio['train'][1]:.2f}], inference x{ratio['infer'][0]:.2f} "
            f"[{ratio['infer'][2]:.2f} - {ratio['infer'][1]:.2f}] (> 1: faster than softmax)")
    busy = {m: softmax.unsteady(r, spread_limit) for m, r in res.items()}
    if any(busy.values()):
        log(f"warning: timings spread by more than {spread_limit:.0%} of their median (the machine"
            f" was busy?); rerun on an idle machine or with more --bench-steps: " + ", ".join(
                f"{m} {k} {v:.0%}" for m, b in busy.items() for k, v in b.items()))
    return speed


# ----------------------------------------------------------------------------------------------
# command line

# With no --data-path: a small ViT (4 blocks x 96 channels, 6 heads, 8 px patches: 16 tokens + the
# class token) on 32 px synthetic shapes, sized to train in 1-2 min on 2 CPU cores: 94-99.9%
# held-out top-1 depending on the attention, within about 2 points over seeds (README's table;
# chance 10%). Command-line flags still win over these.
DEMO = dict(img_size=32, patch_size=8, embed_dim=96, depth=4, epochs=5, warmup_epochs=1,
            batch_size=64, lr=8e-3, warmup_lr=1e-5, min_lr=1e-5, drop_path=0.0, workers=0)
# --quick: the demo on fewer images for fewer epochs (about 20 s a run), for trying an edit;
# its accuracies are lower and noisier than the demo's
QUICK = dict(demo_train=5000, demo_val=1000, epochs=4)

# The two ImageNet recipes (--recipe), each value as the official code has it; flags given on the
# command line win. Sources, file by file, are in README's recipe table. Both: 300 epochs, AdamW
# (0.9, 0.999) with weight decay 0.05, label smoothing 0.1, drop-path 0.1, RandAugment
# rand-m9-mstd0.5-inc1, RandomErasing 0.25, MixUp 0.8 / CutMix 1.0, eval crop 224 of 256.
RECIPES = {
    # LeapLabTHU/InLine (built on Swin-Transformer's code): config.py defaults, the DeiT-T cfg
    # (512 images per GPU, 8 GPUs), main.py scales base, warm-up and minimum lr by batch / 512
    "inline": dict(batch_size=512, lr=5e-4, warmup_epochs=20, warmup_lr=5e-7, min_lr=5e-6,
                   scale_lr="all", clip_grad=5.0, repeated_aug=0, eval_resize="square"),
    # facebookresearch/deit main.py defaults (DeiT-T: 4 GPUs x 256 in its README); only the
    # base lr is scaled; repeated augmentation x3; no gradient clipping
    "deit": dict(batch_size=256, lr=5e-4, warmup_epochs=5, warmup_lr=1e-6, min_lr=1e-5,
                 scale_lr="peak", clip_grad=0.0, repeated_aug=3, eval_resize="shorter"),
}

# --data cifar10 / cifar100: DeiT-T's width and depth at 32 px with 4 px patches (8 x 8 = 64
# tokens + the class token), InLine's augmentation (RandomCrop with padding 4 instead of the
# resized crop, as its build_transform does at 32 px) and a shorter schedule; lr 5e-4 at batch 128.
CIFAR_RECIPE = dict(img_size=32, patch_size=4, epochs=200, warmup_epochs=10, batch_size=128,
                    lr=2e-3, warmup_lr=1e-6, min_lr=1e-5, scale_lr="peak", repeated_aug=0)

# per --data: settings over the recipe's (the demo keeps absolute warm-up / minimum lr)
DATASETS = {"demo": {"scale_lr": "peak", "repeated_aug": 0, **DEMO}, "imagenet": {},
            "cifar10": CIFAR_RECIPE, "cifar100": CIFAR_RECIPE}


class HelpFormatter(argparse.HelpFormatter):
    """--help: every flag's default once, then [what the demo, --recipe deit and CIFAR set in its
    place], read from the very dicts that get_args applies."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, argparse.SUPPRESS) and action.default is not False \
                and "default" not in text:  # (0 is a default to show; False of a switch is not)
            text += " (default: %(default)s)"
        instead = [f"{name}: {values[action.dest]}" for name, values in
                   [("demo", DATASETS["demo"]), ("--recipe deit", RECIPES["deit"]),
                    ("cifar", DATASETS["cifar10"])] if action.dest in values]
        return text + (f" [{', '.join(instead)}]" if instead else "")


def get_args(argv=None):
    p = argparse.ArgumentParser(
        description="Train / evaluate / benchmark DeiT-T with the course's attention modules. "
                    "With no --data-path it trains a small ViT on a synthetic task (CPU demo). "
                    "Defaults are ImageNet's (InLine's DeiT-T recipe); in [ ] the values the "
                    "demo, --recipe deit and --data cifar10 / cifar100 use instead. Flags given "
                    "on the command line always win.",
        formatter_class=HelpFormatter)
    a = p.add_argument
    a("--data", choices=list(DATASETS), help="demo: synthetic shapes (the default without "
      "--data-path); imagenet: folders train/ and val/ at --data-path (the default with it); "
      "cifar10 / cifar100: downloaded into --data-path (default ./data) on first use")
    a("--data-path", help="ImageNet-style folder with train/ and val/ (one sub-folder per class)"
      ", or where CIFAR is (or goes)")
    a("--recipe", choices=list(RECIPES), default="inline", help="ImageNet recipe: InLine's "
      "DeiT-T or DeiT's own; sets batch, lr, warm-up, clipping, repeated aug, eval resize")
    a("--output", help="checkpoint.pth and log.jsonl go here (default runs/<data>-<attn>)")
    a("--workers", type=int, default=default_workers(), help="data loading processes per "
      "GPU / process (default: the CPU cores, shared by this machine's processes, at most 8: "
      "%(default)s here)")
    a("--demo-train", type=int, default=10000, help="demo: synthetic training images")
    a("--demo-val", type=int, default=2000, help="demo: held-out synthetic images")
    a("--quick", action="store_true", help="demo: " + ", ".join(
      f"--{k.replace('_', '-')} {v}" for k, v in QUICK.items()) + " (a quick look, noisier)")
    # model
    a("--attn", default="final", choices=list(ATTENTIONS), help="attention of every block")
    for part, what in zip(FINAL_PARTS, ("alpha re-weighting of the keys", "output gate",
                                        "local residual")):
        a(f"--no-{part}", action="store_true", help=f"--attn final without its {what} (ablation)")
    a("--img-size", type=int, default=224, help="image side S in pixels")
    a("--patch-size", type=int, default=16, help="patch side P in pixels")
    a("--embed-dim", type=int, default=192, help="channels C of every token")
    a("--depth", type=int, default=12, help="blocks")
    a("--num-heads", type=int, default=None, help="default: 3 for softmax, 6 otherwise")
    a("--drop-path", type=float, default=0.1, help="stochastic depth rate of the last block")
    a("--pretrained", metavar="PATH", help="start from these weights (state_dict or {'model': "
      "...}, strict; pos_embed resized to --img-size); a resumed run ignores it")
    # recipe
    a("--epochs", type=int, default=300, help="epochs in all (a resumed run goes on to this)")
    a("--warmup-epochs", type=int, help="linear warm-up from --warmup-lr to the peak")
    a("--warmup-lr", type=float, help="per 512 images if --scale-lr all")
    a("--min-lr", type=float, help="per 512 images if --scale-lr all")
    a("--batch-size", type=int, help="per process; global = this x processes")
    a("--lr", type=float, help="peak lr per 512 images (scaled by global batch)")
    a("--scale-lr", choices=["all", "peak"], help="scale warm-up and minimum lr by global "
      "batch / 512 as well (InLine), or the peak lr only (DeiT)")
    a("--betas", type=float, nargs=2, default=[0.9, 0.999], help="AdamW's")
    a("--weight-decay", type=float, default=0.05, help="AdamW's, not on norms, biases and "
      "embeddings")
    a("--clip-grad", type=float, help="max gradient norm (0: no clipping)")
    a("--label-smoothing", type=float, default=0.1, help="of the cross-entropy targets")
    a("--auto-augment", default="rand-m9-mstd0.5-inc1", help="timm's RandAugment spec ('none': "
      "off)")
    a("--repeated-aug", type=int, help="each image this many times per epoch, spread over the "
      "processes (DeiT: 3; 0: off)")
    a("--random-erasing", type=float, default=0.25, help="probability per image")
    a("--mixup", type=float, default=0.8, help="MixUp alpha (0: off)")
    a("--cutmix", type=float, default=1.0, help="CutMix alpha (0: off)")
    a("--mix-switch", type=float, default=0.5, help="probability of CutMix instead of MixUp")
    a("--eval-crop-ratio", type=float, default=0.875, help="resize to img-size / this, crop")
    a("--eval-resize", choices=["square", "shorter"], help="resize to a square (InLine) or the "
      "shorter side (timm / DeiT) before the centre crop")
    a("--seed", type=int, default=0, help="of the weights, augmentation and drop-path (the "
      "demo's images are fixed)")
    # hardware and modes
    a("--device", choices=["cuda", "cpu"], help="default: cuda if available")
    a("--amp", choices=["bf16", "fp16", "none"], help="autocast dtype (default: bf16 on cuda)")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--check-every", type=int, default=50, help="look at the loss for NaN / inf every this many "
      "steps (and at each epoch's end); in between no step waits for the GPU")
    a("--resume", metavar="PATH", help="continue from this checkpoint (default: OUTPUT/"
      "checkpoint.pth if it exists)")
    a("--fresh", action="store_true", help="start from scratch even if OUTPUT/checkpoint.pth "
      "exists (its checkpoint and log.jsonl are overwritten)")
    a("--eval-only", action="store_true", help="top-1 / top-5 of --pretrained or --resume")
    a("--bench", action="store_true", help="images/s of --attn and softmax at --img-size")
    a("--bench-batch", type=int, help="default 128 on cuda, 8 on cpu")
    a("--bench-steps", type=int, default=5, help="timed rounds, each a step of both models (median)")
    a("--bench-warmup", type=int, default=3, help="untimed steps of each model before the rounds")
    # analysis of trained models (the papers' measurements) and figures
    a("--analyze", action="store_true", help="per-block local attention mass, confused query "
      "pairs and ranks of --resume / --pretrained weights (default: OUTPUT/checkpoint.pth if "
      "it exists, else a freshly initialised model) on held-out images; writes "
      "OUTPUT/analysis.json")
    a("--analyze-images", type=int, default=32, help="held-out images for --analyze")
    a("--confusion-tol", type=float, default=0.05, help="--analyze: two attention rows "
      "closer than this in L1 distance count as the same distribution (rows sum to 1)")
    a("--plot", metavar="DIR", help="write training_curves.png and local_mass.png for the "
      "run directories --runs (default: OUTPUT) into DIR; after --analyze if both are given")
    a("--summary", action="store_true", help="print a markdown table (top-1 mean +- std over "
      "seeds, parameters, img/s) of the run directories --runs")
    a("--runs", nargs="+", metavar="DIR", help="run directories for --plot and --summary")
    p.set_defaults(**RECIPES["inline"])  # so that --help shows the default recipe
    args = p.parse_args(argv)
    if args.fresh and args.resume:
        p.error("--fresh starts from scratch; leave out --resume")
    if args.attn != "final" and any(getattr(args, f"no_{x}") for x in FINAL_PARTS):
        p.error(f"--no-{'/--no-'.join(FINAL_PARTS)} switch off parts of --attn final, "
                f"not of --attn {args.attn}")
    data = args.data or ("demo" if args.data_path is None else "imagenet")
    if data == "demo" and args.data_path is not None:
        p.error("--data demo makes its own images; leave out --data-path")
    if data == "imagenet" and args.data_path is None and not (args.bench or args.summary or
                                                             (args.plot and not args.analyze)):
        p.error(f"--data imagenet needs --data-path; {LAYOUT}")
    if args.quick and data != "demo":
        p.error("--quick shortens the demo; it does not apply to --data " + data)
    p.set_defaults(**{**RECIPES[args.recipe], **({} if args.bench else DATASETS[data]),
                      **(QUICK if args.quick else {})})
    args = p.parse_args(argv)  # flags given on the command line win over both dicts
    args.data = data
    if data.startswith("cifar") and args.data_path is None:
        args.data_path = "data"
    args.demo = data == "demo" and not args.bench
    if args.output is None:
        args.output = os.path.join("runs", f"{data}-{model_label(args)}")
    return args


FINAL_PARTS = ("reweight", "gate", "local")  # the final module's switches (step 05)


def model_label(args):
    """'final', or 'final-no-gate' etc. when parts of the final module are switched off."""
    return args.attn + "".join(f"-no-{p}" for p in FINAL_PARTS if getattr(args, f"no_{p}", False))


def attention_of(args):
    """The attention of every block: a name in ATTENTIONS, or the final module with parts off."""
    off = {p: False for p in FINAL_PARTS if getattr(args, f"no_{p}", False)}
    return functools.partial(ATTENTIONS["final"], **off) if off else args.attn


# what makes the model: a checkpoint made with other values is of another model
MODEL_FLAGS = ("data", "attn", *(f"no_{p}" for p in FINAL_PARTS), "img_size", "patch_size",
               "embed_dim", "depth", "num_heads", "drop_path")
# where and how a run goes, not what it trains: free to change when resuming
NOT_THE_RUN = ("output", "resume", "fresh", "workers", "device", "compile", "check_every",
               "data_path", "pretrained")


def changed_settings(old, new, keys=None, skip=()):
    """['--lr 0.008 then, 0.01 now', ...]: the settings (vars of args) that differ."""
    heads = {d.get("num_heads") or default_heads(d.get("attn")) for d in (old, new)}
    return [f"--{k.replace('_', '-')} {old.get(k)} then, {new.get(k)} now"
            for k in (keys or old) if k not in skip and old.get(k) != new.get(k)
            and not (k == "num_heads" and len(heads) == 1)]  # None: the default number


def read_run_checkpoint(path, model, args, auto):
    """A checkpoint of this script that continues this run: intact (its sha256), complete and of
    this very model. Each refusal is one line; for OUTPUT/checkpoint.pth, found by itself (auto),
    it says that the model changed since that run and how to start afresh."""
    ckpt = read_checkpoint(path)
    lacking = {"model", "optimizer", "epoch", "pending", "best_top1", "rng", "global_batch",
               "args", "sha256"} - set(ckpt)
    if lacking:
        raise UserError(f"{path} is not a checkpoint of this version of the script (no "
                        f"{', '.join(sorted(lacking))}): start afresh (--fresh, or another "
                        f"--output), or from its weights with --pretrained {path}")
    try:
        changed = changed_settings(ckpt["args"], vars(args), keys=MODEL_FLAGS)
        if changed:
            raise UserError(", ".join(changed))
        match_state_dict(model, ckpt["model"], path)
    except UserError as e:
        todo = ("to start afresh add --fresh (it overwrites that run) or choose another --output"
                if auto else f"give that run's flags, or start from its weights with "
                             f"--pretrained {path}")
        raise UserError(f"the model changed since the run in {path} ({e}): {todo}") from None
    return ckpt


def build_model(args, num_classes):
    try:
        return VisionTransformer(args.img_size, args.patch_size, num_classes=num_classes,
                                 embed_dim=args.embed_dim, depth=args.depth,
                                 num_heads=args.num_heads, drop_path_rate=args.drop_path,
                                 attn=attention_of(args))
    except ValueError as e:  # sizes that do not fit: a user error, not a bug
        # name the sizes the demo (or --data cifar10 ...) chose, when they are in the message
        chosen = [f"--{k.replace('_', '-')} {v}" for k, v in DATASETS[args.data].items()
                  if k in ("img_size", "patch_size", "embed_dim") and getattr(args, k) == v
                  and f"{k.replace('embed_', '')}={v}" in str(e) and not args.bench]
        where = "the demo" if args.data == "demo" else f"--data {args.data}"
        raise UserError(str(e) + (f" ({where} chose {' '.join(chosen)}; give it on the command "
                                  f"line to change it)" if chosen else "")) from None


def run(args):
    rank, world, device = setup_distributed(args.device)
    args.amp = args.amp or ("bf16" if device.type == "cuda" else "none")
    log = print if rank == 0 else (lambda *a, **k: None)
    torch.manual_seed(args.seed + rank)  # different drop-path / augmentation per process; DDP
    random.seed(args.seed + rank)        # copies rank 0's initial weights to the others
    np.random.seed(args.seed + rank)
    if args.bench:
        return bench(args, device, log)

    build_model(args, 1)  # sizes that do not fit fail now, before any data is read or made
    if args.demo:
        train_set = TensorImages(*synthetic_shapes(args.demo_train, args.img_size, seed=0))
        val_set = TensorImages(*synthetic_shapes(args.demo_val, args.img_size, seed=1))
        classes, mix = SHAPES, None  # no augmentation: every image is new anyway
        log(f"DEMO (no --data-path): a small ViT ({args.depth} blocks x {args.embed_dim} "
            f"channels, patch {args.patch_size}, attention '{args.attn}') learns {len(classes)} "
            f"synthetic shapes at {args.img_size} px: {len(train_set)} training images, "
            f"{len(val_set)} held out (fixed seeds). Chance is {100 / len(classes):.0f}%.")
    elif args.data == "imagenet":
        train_set, val_set, classes, mix = imagenet_data(args)
    else:
        train_set, val_set, classes, mix = cifar_data(args)
    model = build_model(args, len(classes))
    n_params = sum(p.numel() for p in model.parameters())

    ckpt_path = os.path.join(args.output, "checkpoint.pth")
    auto = not (args.resume or args.fresh or args.eval_only) and os.path.exists(ckpt_path)
    resume = args.resume or (ckpt_path if auto else None)  # OUTPUT/checkpoint.pth, found by itself
    ckpt = None
    if resume:
        ckpt = read_run_checkpoint(resume, model, args, auto)
        model.load_state_dict(ckpt["model"])
    elif args.pretrained:
        load_pretrained(model, args.pretrained)
    if args.analyze:
        return run_analysis(model, val_set, device, args, resume or args.pretrained, log)
    train_model, eval_model = prepare(model, device, world, args.compile)
    train_loader, val_loader = make_loaders(train_set, val_set, args, rank, world, device)

    if args.eval_only:
        if not (resume or args.pretrained):
            raise UserError("--eval-only needs weights: --pretrained PATH or --resume PATH")
        top1, top5 = evaluate(eval_model, val_loader, device, args, rank)
        log(f"{resume or args.pretrained}: top-1 {top1:.2f}%  top-5 {top5:.2f}%  "
            f"({len(val_set)} images at {args.img_size} px)")
        return {"top1": top1, "top5": top5}

    if len(train_loader) == 0:
        raise UserError(f"{len(train_set)} training images cannot fill one batch of "
                        f"{args.batch_size} x {world} processes; lower --batch-size")
    check_held_out(model, val_set, device, args, rank, world)  # before an epoch is spent
    os.makedirs(args.output, exist_ok=True)
    global_batch, steps = args.batch_size * world, len(train_loader)
    optimizer = make_optimizer(model, args, device)
    done, best, pending = 0, 0.0, None  # epochs trained, best top-1, an epoch not yet evaluated
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        done, best, pending = ckpt["epoch"], ckpt["best_top1"], ckpt["pending"]
    peak, scheduler = schedule(optimizer, args, global_batch, steps, done)  # lr of this batch
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)  # takes soft targets
    log_path = os.path.join(args.output, "log.jsonl")
    if ckpt is not None:
        if scaler.is_enabled() and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        if rank == 0:
            keep_log(log_path, done - 1 if pending else done)  # the epochs it had evaluated
        notes = [f"epoch {done} of {args.epochs} trained"
                 + (", its evaluation still to do" if pending else f", best top-1 {best:.2f}%")]
        notes += changed_settings(ckpt["args"], vars(args), skip=MODEL_FLAGS + NOT_THE_RUN)
        if ckpt["global_batch"] != global_batch:
            notes.append(f"global batch {ckpt['global_batch']} then, {global_batch} now: peak lr "
                         f"{ckpt['peak_lr']:.2e} -> {peak:.2e}, the schedule goes on from "
                         f"epoch {done + 1}")
        if auto:
            notes.append("to start afresh add --fresh or choose another --output")
        log(f"resuming {'automatically ' if auto else ''}from {resume}: " + "; ".join(notes))
        if len(ckpt["rng"]) == world:  # last: nothing may draw random numbers after this
            set_rng_state(ckpt["rng"][rank])
        else:
            log(f"note: checkpoint from {len(ckpt['rng'])} processes, now {world}: "
                f"random streams start afresh")
            torch.manual_seed(args.seed + rank + 1000 * done)
    elif args.fresh and os.path.exists(ckpt_path):
        log(f"--fresh: starting from scratch; {ckpt_path} and log.jsonl will be overwritten")
    log(f"{n_params:,} parameters, {world} process(es) on {device.type}, global batch "
        f"{global_batch}, peak lr {peak:.2e}, {steps} steps per epoch, amp {args.amp}")
    if done >= args.epochs and not pending:
        log(f"{resume} has trained {done} epochs, --epochs is {args.epochs}: nothing to train. "
            f"To train on raise --epochs; to start again add --fresh or choose another --output")
        return {"best_top1": best}

    saved = (done, pending is None) if ckpt is not None and resume == ckpt_path else None

    def save(epoch, pending=None):
        nonlocal saved
        rng = gather_rng_states(world)  # collective: every process takes part
        if rank == 0:
            save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                             "epoch": epoch, "pending": pending, "best_top1": best, "rng": rng,
                             "global_batch": global_batch, "peak_lr": peak, "args": vars(args)},
                            ckpt_path)
        saved = (epoch, pending is None)

    try:
        for epoch in range(done + 1 if pending is None else done, args.epochs + 1):  # from 1
            if pending:  # it stopped while evaluating this epoch: its training is in the checkpoint
                trained, pending = pending, None
            else:
                train_loader.sampler.set_epoch(epoch - 1)  # new shuffle, same on every process
                t0 = time.time()
                loss = train_one_epoch(train_model, train_loader, criterion, optimizer, scheduler,
                                       scaler, mix, device, args, epoch, rank)
                train_s = time.time() - t0
                trained = {"epoch": epoch, "loss": loss, "lr": optimizer.param_groups[0]["lr"],
                           "images_per_s": steps * global_batch / train_s, "train_s": train_s}
                save(epoch, pending=trained)  # before evaluating: a failing one loses no training
            t0 = time.time()
            top1, top5 = evaluate(eval_model, val_loader, device, args, rank)
            best = max(best, top1)
            record = {**trained, "top1": top1, "top5": top5, "best_top1": best,
                      "time_s": trained["train_s"] + time.time() - t0}
            if rank == 0:  # a new run's first line replaces the log of any run before it
                with open(log_path, "a" if ckpt is not None or epoch > 1 else "w") as f:
                    f.write(json.dumps(record) + "\n")
            save(epoch)
            log(f"epoch {epoch:>3}/{args.epochs} | loss {record['loss']:.4f} | lr "
                f"{record['lr']:.2e} | top-1 {top1:6.2f}% top-5 {top5:6.2f}% | "
                f"{record['images_per_s']:7.1f} img/s | {record['time_s']:6.1f} s")
    except KeyboardInterrupt:  # Ctrl-C: main prints this one line, no traceback
        again = "the same command without --fresh" if args.fresh else "the same command"
        if saved is None:
            raise KeyboardInterrupt(f"nothing saved yet (the first checkpoint is written after "
                                    f"epoch {done + 1}'s training); " + (f"the same command "
                                    f"resumes from {resume} again" if resume else "")) from None
        epoch, evaluated = saved
        raise KeyboardInterrupt(f"the last checkpoint is {ckpt_path} (epoch {epoch} of "
                                f"{args.epochs} trained{', evaluated' if evaluated else ''}); "
                                f"{again} resumes from it") from None
    log(f"best top-1 {best:.2f}%; checkpoint and log.jsonl in {args.output}")
    if args.demo:
        log("To train on ImageNet (folders train/ and val/, one sub-folder per class):\n"
            "  torchrun --nproc_per_node 8 06_train_deit.py --data-path /path/to/imagenet\n"
            "  (one GPU: python 06_train_deit.py --data-path /path/to/imagenet)")
    return {"best_top1": best, "top1": top1, "top5": top5}


def run_analysis(model, val_set, device, args, weights, log):
    """--analyze: print and save (OUTPUT/analysis.json) the per-block measurements."""
    if weights is None:
        log("note: no weights given (--resume / --pretrained) and no OUTPUT/checkpoint.pth: "
            "analysing a freshly initialised model")
    images = held_out_batch(val_set, args.analyze_images).to(device)
    rows = analyze(model.to(device), images, args.confusion_tol)
    label = f"{model_label(args)} ({weights or 'freshly initialised'})"
    print_analysis(rows, label, len(images), args.confusion_tol, log)
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "analysis.json"), "w") as f:
        json.dump({"label": model_label(args), "weights": weights, "images": len(images),
                   "tol": args.confusion_tol, "blocks": rows}, f, indent=1)
    if args.plot:
        plot_runs(args.runs or [args.output], args.plot, log)
    return rows


def main(argv=None):
    args = get_args(argv)
    try:
        if args.summary or (args.plot and not args.analyze):
            runs = args.runs or [args.output]
            return summarize_runs(runs) if args.summary else plot_runs(runs, args.plot)
        return run(args)
    except UserError as e:
        # DataLoader workers re-raise with their traceback in the message: its last line is ours
        sys.exit("error: " + str(e).strip().splitlines()[-1].split("UserError: ")[-1])
    except KeyboardInterrupt as e:  # Ctrl-C: one line (where the last checkpoint is), no traceback
        if int(os.environ.get("RANK", 0)) == 0:
            print("interrupted" + (f": {e}" if str(e) else ""), file=sys.stderr)
        sys.exit(130)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
