"""Step 06 - DeiT-T with the course's attention, and its ImageNet training script.

The model is timm's VisionTransformer (ViT; DeiT, Touvron et al.) with the steps' attention:

    x = [cls; patches(img) W_e] + pos_embed                 (B, N, C),  N = 1 + (S/P)^2
    x = x + drop_path(attn(norm1(x)))                        for each of the `depth` blocks
    x = x + drop_path(mlp(norm2(x)))                         mlp = fc2(GELU(fc1(x))), 4C wide
    logits = head(norm(x)[:, 0])                             the class token classifies

Names, shapes, initialisation and defaults (DeiT-T's) follow timm: VisionTransformer(attn=
"softmax") is timm's deit_tiny_patch16_224 (5,717,416 parameters; its checkpoint loads strictly),
attn="inline" the official InLine-DeiT-T (6,477,736). The default, --attn final, is this course's
own combination of InLine and RALA (step 05), proposed and trained by neither paper.

The recipe (--recipe inline, the default) is the one of InLine-DeiT-T (74.5% top-1, 8 GPUs x 512
images; on fewer, --accum-steps keeps the global batch): 300 epochs of AdamW, weight decay 0.05,
one cosine set every update from 5e-4 per 512 images to 5e-6, its first 20 epochs a linear warm-up
from 5e-7; label smoothing 0.1, drop-path 0.1, grad-norm clip 5.0; RandomResizedCrop, flip,
RandAugment, RandomErasing, MixUp or CutMix; evaluation in float32. --recipe deit is DeiT's own.

    python 06_train_deit.py                                # the CPU demo: synthetic tiles
    python 06_train_deit.py --data cifar10                 # CIFAR-10, downloaded into ./data
    python 06_train_deit.py --data-path /data/imagenet     # one GPU
    torchrun --nproc_per_node 8 06_train_deit.py --data-path /data/imagenet
Each epoch ends in OUTPUT/checkpoint.pth (atomic, its SHA-256 beside it), best.pth and log.jsonl;
the same command resumes a stopped run exactly, --fresh starts afresh. Measuring is in tools/.
"""
import argparse
import contextlib
import functools
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

attentions = importlib.import_module("attentions")
ATTENTIONS = attentions.ATTENTIONS  # every attention by name (steps 01-05, and yours)


class UserError(Exception):
    """A problem with the input (flags, paths, files): one line, exit status 1."""


# ---- the model: timm's VisionTransformer, parameter for parameter --------------------------
class Block(nn.Module):
    def __init__(self, dim, num_heads, drop_path, attn_cls):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = attn_cls(dim, num_heads=num_heads, qkv_bias=True)   # DeiT: no dropout
        if drop_path > 0:  # stochastic depth: a sample's residual branch dropped (training)
            from timm.layers import DropPath
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(OrderedDict(fc1=nn.Linear(dim, 4 * dim), act=nn.GELU(),
                                             fc2=nn.Linear(4 * dim, dim)))  # timm's names

    def forward(self, x):                                               # (B, N, C)
        x = x + self.drop_path(self.attn(self.norm1(x)))                # pre-norm residuals
        return x + self.drop_path(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """ViT / DeiT with `attn` (a name in ATTENTIONS, or a class); num_heads: SETTINGS says."""

    def __init__(self, img_size=224, patch_size=16, num_classes=1000, embed_dim=192, depth=12,
                 num_heads=None, drop_path_rate=0.1, attn="final"):
        super().__init__()
        if isinstance(attn, str) and attn not in ATTENTIONS:
            raise ValueError(f"unknown attention {attn!r}; choose from {', '.join(ATTENTIONS)}")
        self.num_heads = num_heads or (3 if attn == "softmax" else 6)
        if img_size < patch_size or img_size % patch_size:
            raise ValueError(f"img_size={img_size} is not divisible by patch_size={patch_size}")
        self.grid = img_size // patch_size  # grid x grid patches, each to C channels (a conv)
        self.patch_embed = nn.ModuleDict({"proj": nn.Conv2d(3, embed_dim, patch_size, patch_size)})
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid ** 2, embed_dim))
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()  # deeper blocks dropped more
        attn = ATTENTIONS[attn] if isinstance(attn, str) else attn
        self.blocks = nn.Sequential(*[Block(embed_dim, self.num_heads, p, attn) for p in dpr])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes)
        # timm's init, also of the Linear layers in attention, as InLine's and RALA's code do
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):                                               # (B, 3, S, S)
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)         # (B, N-1, C)
        cls = self.cls_token.expand(x.shape[0], -1, -1)                 # (B, 1, C)
        x = torch.cat([cls, x], dim=1) + self.pos_embed                 # (B, N, C)
        x = self.norm(self.blocks(x))                                   # (B, N, C)
        return self.head(x[:, 0])                                       # (B, num_classes)


def model_label(args):  # 'final', or 'final-no-gate' etc. with parts switched off
    return args.attn + "".join(f"-no-{p}" for p in args.no)


def build_model(args, num_classes):
    """The model of the flags; sizes that do not fit are a UserError naming them."""
    attn = functools.partial(ATTENTIONS[args.attn], **dict.fromkeys(args.no, False))
    try:
        return VisionTransformer(args.img_size, args.patch_size, num_classes, args.embed_dim,
                                 args.depth, args.num_heads or (3 if args.attn == "softmax" else 6),
                                 args.drop_path, attn)
    except ValueError as e:
        raise UserError(f"{e} (--data {args.data}: --img-size {args.img_size} --patch-size "
                        f"{args.patch_size} --embed-dim {args.embed_dim})") from None


# ---- weights: ours (a digest beside them), timm's, the official InLine ones ----------------
def read_checkpoint(path):
    """torch.load(weights_only=True): data, never code; it must match PATH.sha256 if there is
    one. The yacs config of the official InLine checkpoints is read as a plain OrderedDict."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist")
    sums = [open(f).read()[:64] for f in (path + ".sha256", path + ".sha256.tmp")
            if os.path.isfile(f)]  # .tmp: the run stopped between save_checkpoint's two renames
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    if sums and digest not in sums:
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
    """A state_dict or {"model": ...} (ours, timm's, InLine's), strictly; pos_embed resized."""
    sd = sd["model"] if isinstance(sd.get("model"), dict) else sd
    pe, grid = sd.get("pos_embed"), model.grid
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


# ---- data: synthetic tiles for the CPU demo; ImageNet folders; CIFAR -----------------------
def synthetic_tiles(n, img_size=32, patch=4, noise=2.0, seed=0):
    """The demo task: n images (uint8 (n, 3, S, S)) and labels (n,). Each image is a grid of tiles
    of 2 x 2 patches, each patch one of two textures (a bit); one tile is tinted red, and the label
    is its four bits (16 classes, chance 6.25%). It is built to ask for picking that tile by its
    content (injective weights), reading each patch with its neighbours (local modeling), among 64
    one-bit patches (rank); README's ablation shows that only the local term matters. Noise hides
    some bits: at 2.0 an ideal reader gets 96% (tools/runs.py ceiling)."""
    g, t = torch.Generator().manual_seed(seed), img_size // (2 * patch)       # t x t tiles
    textures = torch.randint(2, (2, patch, patch), generator=torch.Generator().manual_seed(1))
    bits = torch.randint(2, (n, t, t, 2, 2), generator=g)                      # a bit a patch
    img = (2.0 * textures - 1)[bits].permute(0, 1, 3, 5, 2, 4, 6)             # (n, t, 2, P, ...)
    img = img.reshape(n, 1, img_size, img_size).repeat(1, 3, 1, 1)            # (n, 3, S, S)
    red = torch.randint(t * t, (n,), generator=g)                              # the asked tile
    tile = nn.functional.one_hot(red, t * t).view(n, t, 1, t, 1).float()
    img[:, 0] += 2 * tile.expand(n, t, 2 * patch, t, 2 * patch).reshape(n, img_size, img_size)
    y = bits.view(n, t * t, 4)[torch.arange(n), red] @ torch.tensor([8, 4, 2, 1])  # (n,)
    if noise is None:  # the clean float image, for tools/runs.py ceiling
        return img, y
    img = img + noise * torch.randn(img.shape, generator=g)
    return ((img * 0.25 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8), y


MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's; both codebases, all data
LAYOUT = "expected --data-path DIR holding train/ and val/ with one sub-folder of images per class"


def transforms(args):
    """(train, eval) transforms by timm, as both codebases (at 32 px a padded RandomCrop)."""
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


def make_data(args):
    """(train set, held-out set, class names, batch mixer or None) for --data."""
    if args.data == "demo":  # no augmentation: every image is new anyway
        sets = [synthetic_tiles(n, args.img_size, args.patch_size, args.demo_noise, seed)
                for seed, n in enumerate([args.demo_train, args.demo_val])]
        classes = [f"{i:04b}" for i in range(16)]  # the red tile's bits
        return *[TensorDataset((x.float() / 255 - 0.5) / 0.25, y) for x, y in sets], classes, None
    from timm.data import Mixup
    from torchvision import datasets
    train_tf, eval_tf = transforms(args)
    if args.data == "imagenet":
        try:
            train, val = (datasets.ImageFolder(os.path.join(args.data_path, split), tf)
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
        except (RuntimeError, OSError) as e:  # files failing their md5 check; no network
            raise UserError(f"{args.data} in {folder}: {e}: delete {folder} to download it again, "
                            f"or download {cls.url} and unpack it there by hand") from None
    mix = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, switch_prob=args.mix_switch,
                label_smoothing=0.0, num_classes=len(train.classes))  # smoothing: in the loss
    return train, val, train.classes, mix if args.mixup > 0 or args.cutmix > 0 else None


class SeedEachImage(torch.utils.data.Dataset):
    """Training set and sampler in one: yields (epoch, index), augments image index with the seed
    (run seed, epoch, index). Persistent workers keep their RNG; this keeps resume exact."""
    def __init__(self, dataset, sampler, seed):
        self.dataset, self.sampler, self.seed = dataset, sampler, seed
        self.set_epoch = sampler.set_epoch  # the sampler keeps the epoch

    def __len__(self):
        return len(self.sampler)

    def __iter__(self):                                                 # the sampler's part
        return ((self.sampler.epoch, i) for i in self.sampler)

    def __getitem__(self, key):                                         # in a worker process
        seed = (self.seed * 10 ** 4 + key[0]) * 10 ** 8 + key[1]
        random.seed(seed), np.random.seed(seed % 2 ** 32), torch.manual_seed(seed)  # all used
        return self.dataset[key[1]]


def make_loaders(train_set, val_set, args, rank, world, device):
    """Each process reads its 1/world of each epoch (shuffled by seed and epoch) and of val."""
    if args.repeated_aug > 1:  # timm's copy of DeiT's RASampler, shuffled by epoch only as DeiT's
        from timm.data.distributed_sampler import RepeatAugSampler
        sampler = RepeatAugSampler(train_set, world, rank, num_repeats=args.repeated_aug)
    else:
        sampler = DistributedSampler(train_set, world, rank, seed=args.seed, drop_last=True)
    if args.workers > 0:  # workers kept from epoch to epoch; without, train() seeds each epoch
        train_set = sampler = SeedEachImage(train_set, sampler, args.seed)
    kw = dict(batch_size=args.batch_size, num_workers=args.workers,
              pin_memory=device.type == "cuda", persistent_workers=args.workers > 0)
    return (DataLoader(train_set, sampler=sampler, drop_last=True, **kw),
            DataLoader(Subset(val_set, range(rank, len(val_set), world)), **kw))


# ---- the recipe ----------------------------------------------------------------------------
# Each is a flag (img_size: --img-size); ImageNet's defaults, None filled in by the dicts below
SETTINGS = dict(
    # data: demo (without --data-path), imagenet (at --data-path), cifar10 / cifar100 (./data)
    data=None, data_path=None, demo_train=10000, demo_val=2000, demo_noise=2.0, quick=False,
    # the model: the attention of every block, parts of it switched off (--no gate local),
    # num_heads 0: 3 for softmax (timm's DeiT-T), 6 for the linear kinds (InLine's)
    attn="final", no=[], num_heads=0, img_size=224,
    patch_size=16, embed_dim=192, depth=12, drop_path=0.1, pretrained=None,
    # the recipe: lrs per 512 images of global batch = batch_size x processes x accum_steps
    recipe="inline", epochs=300, warmup_epochs=None, warmup_lr=None, lr=None, min_lr=None,
    scale_lr=None, batch_size=None, accum_steps=1, betas=(0.9, 0.999), weight_decay=0.05,
    clip_grad=None, label_smoothing=0.1, auto_augment="rand-m9-mstd0.5-inc1", mixup=0.8,
    cutmix=1.0, mix_switch=0.5, random_erasing=0.25, repeated_aug=None, eval_crop_ratio=0.875,
    eval_resize=None, seed=0,
    # running: cuda and bf16 if there is a GPU; resume: OUTPUT/checkpoint.pth if there is one
    device=None, amp=None, compile=False, check_every=50, output=None, resume=None, fresh=False,
    eval_only=False, workers=None)
RECIPES = {
    # LeapLabTHU/InLine: config.py, cfgs/inline_deit_t.yaml (8 GPUs x 512), main.py
    "inline": dict(batch_size=512, lr=5e-4, warmup_epochs=20, warmup_lr=5e-7, min_lr=5e-6,
                   scale_lr="all", clip_grad=5.0, repeated_aug=0, eval_resize="square"),
    # facebookresearch/deit main.py (DeiT-T: 4 GPUs x 256): repeated augmentation, no clipping
    "deit": dict(batch_size=256, lr=5e-4, warmup_epochs=5, warmup_lr=1e-6, min_lr=1e-5,
                 scale_lr="peak", clip_grad=0.0, repeated_aug=3, eval_resize="shorter"),
}
# --data cifar10 / cifar100: DeiT-T at 32 px with 4 px patches (64 tokens + the class token)
CIFAR = dict(img_size=32, patch_size=4, epochs=200, warmup_epochs=10, batch_size=128, lr=2e-3,
             warmup_lr=1e-6, min_lr=1e-5, scale_lr="peak", repeated_aug=0)
# the demo: 4 blocks x 96 channels on 32 px tiles, 4 px patches (64 tokens); lr 8e-3 x 64 / 512
DEMO = dict(img_size=32, patch_size=4, embed_dim=96, depth=4, epochs=5, warmup_epochs=1,
            batch_size=64, lr=8e-3, warmup_lr=1e-5, min_lr=1e-5, drop_path=0.0, workers=0,
            scale_lr="peak", repeated_aug=0)
QUICK = dict(demo_train=4000, demo_val=1000, epochs=3)  # --quick: about 30 s a run
DATASETS = {"demo": DEMO, "imagenet": {}, "cifar10": CIFAR, "cifar100": CIFAR}
CHOICES = dict(data=DATASETS, attn=ATTENTIONS, recipe=RECIPES, scale_lr=("all", "peak"), amp=(
    "bf16", "fp16", "none"), eval_resize=("square", "shorter"), device=("cuda", "cpu"))


def get_args(argv=None):
    p = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Train DeiT-T with the course's attention (no --data"
                                "-path: the CPU demo). SETTINGS in this file tells each flag.")
    for k, v in SETTINGS.items():
        flag, doc = "--" + k.replace("_", "-"), f"SETTINGS[{k!r}]"  # a help: with its default
        if isinstance(v, bool):
            p.add_argument(flag, action="store_true", help=doc)
        elif isinstance(v, tuple):
            p.add_argument(flag, type=float, nargs=len(v), default=v, help=doc)
        elif isinstance(v, list):
            p.add_argument(flag, nargs="+", default=v, metavar="PART", help=doc)
        else:  # None: of the type the recipe or the demo gives it, else a string (a path)
            kind = type(v) if v is not None else type({**DEMO, **RECIPES["inline"]}.get(k, ""))
            p.add_argument(flag, type=kind, default=v, choices=CHOICES.get(k), help=doc)
    args = p.parse_args(argv)
    data = args.data or ("demo" if args.data_path is None else "imagenet")
    parts = attentions.switches(ATTENTIONS[args.attn])  # its constructor's on/off keywords
    for bad, why in [(args.fresh and args.resume, "--fresh starts afresh; leave out --resume"),
                     (set(args.no) - set(parts), f"--no: the parts of --attn {args.attn} are "
                                                 f"{', '.join(parts) or 'none'}"),
                     (data == "demo" and args.data_path, "--data demo makes its own images"),
                     (data == "imagenet" and not args.data_path, f"--data imagenet: {LAYOUT}"),
                     (args.quick and data != "demo", "--quick shortens the demo only"),
                     (args.eval_only and not (args.resume or args.pretrained),
                      "--eval-only needs weights: --pretrained PATH or --resume PATH"),
                     (min(args.accum_steps, args.check_every) < 1, "steps must be at least 1")]:
        if bad:
            p.error(why)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    workers = max(1, min(16, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))  # shared
    p.set_defaults(**{"workers": workers, **RECIPES[args.recipe], **DATASETS[data],
                      **(QUICK if args.quick else {})})
    args = p.parse_args(argv)  # again: flags given on the command line win over the dicts
    args.data, args.data_path = data, args.data_path or ("data" if data != "demo" else None)
    args.no = [p for p in parts if p in args.no]  # one order: one label, one run folder
    args.output = args.output or os.path.join("runs", f"{data}-{model_label(args)}")
    return args


def make_optimizer(model, args, device):
    """AdamW (fused on CUDA); no decay on norms, biases, embeddings (InLine's and timm's groups)."""
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1 or n in ("pos_embed",
                                                                               "cls_token")]
    decay = [p for p in model.parameters() if all(p is not q for q in no_decay)]
    return torch.optim.AdamW([{"params": no_decay, "weight_decay": 0.0},
                              {"params": decay, "weight_decay": args.weight_decay}],
                             lr=args.lr, betas=tuple(args.betas), fused=device.type == "cuda")


def lr_schedule(args, global_batch, steps_per_epoch):
    """lr_of(update from 0) as timm's CosineLRScheduler(t_initial=all updates, lr_min, warmup_t,
    warmup_lr_init) sets it: one cosine over the run, its start a linear warm-up; x batch / 512."""
    s = global_batch / 512
    t = s if args.scale_lr == "all" else 1.0  # warm-up and final lr scaled too (InLine) or not
    peak, warmup_lr, min_lr = args.lr * s, args.warmup_lr * t, args.min_lr * t
    total, warmup = args.epochs * steps_per_epoch, args.warmup_epochs * steps_per_epoch

    def lr_of(step):
        if step < warmup:
            return warmup_lr + (peak - warmup_lr) * step / warmup
        return min_lr + 0.5 * (peak - min_lr) * (1 + math.cos(math.pi * min(step, total) / total))
    return lr_of


# ---- one epoch of training, one evaluation -------------------------------------------------
def autocast(device, amp):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def all_reduce(t):
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def train_one_epoch(model, loader, criterion, optimizer, scaler, mix, device, args, lr_of,
                    epoch=1, rank=0):
    """One epoch (from 1), an update every --accum-steps steps: (mean loss, seconds waiting for
    data). No step waits for the GPU: the loss sum stays there, checked every --check-every."""
    model.train()
    accum, updates = args.accum_steps, len(loader) // args.accum_steps  # a partial one dropped
    loss_sum, seen, waited, t = torch.zeros((), device=device), 0, 0.0, time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch}", total=updates * accum, leave=False,
               disable=(rank != 0) or None, dynamic_ncols=True)         # None: only on a terminal
    for step, (images, targets) in zip(range(updates * accum), bar):
        waited += time.perf_counter() - t                               # for the data loader
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
                raise UserError(f"loss is {total} in epoch {epoch} by step {step + 1}: stopped; "
                                f"the last good checkpoint is kept. Try a lower --lr, --amp none")
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}", lr=f"{group['lr']:.2e}")
        t = time.perf_counter()
    bar.close()  # the last step's look summed the loss over all processes, each saw `seen`
    return total / (seen * (dist.get_world_size() if dist.is_initialized() else 1)), waited


@torch.no_grad()
def evaluate(model, loader, device, rank=0):
    """Top-1, top-5 (%) over all of the held-out set, in float32 as InLine's validate()."""
    model.eval()
    hits = torch.zeros(3, device=device)                                # top-1, top-5, images
    for images, targets in tqdm(loader, desc="eval", disable=(rank != 0) or None, leave=False):
        images, targets = images.to(device, non_blocking=True), targets.to(device)
        logits = model(images)                                          # (B, K)
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices == targets[:, None]  # (B, 5)
        hits += torch.stack([top5[:, 0].sum(), top5.any(1).sum(), hits.new_tensor(len(top5))])
    hits = all_reduce(hits)
    return (100 * hits[0] / hits[2]).item(), (100 * hits[1] / hits[2]).item()


# ---- checkpoints: atomic writes with a digest; resume --------------------------------------
def save_checkpoint(obj, path):
    """Write PATH.tmp, flush it to disk, rename it over PATH (a crash leaves the old file or the
    new, never half of one), then PATH.sha256 in sha256sum's format (`sha256sum -c` checks it)."""
    with open(path + ".tmp", "w+b") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
        f.seek(0)  # and read it back for its digest
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    os.replace(path + ".tmp", path)
    with open(path + ".sha256.tmp", "w") as f:
        f.write(f"{digest}  {os.path.basename(path)}\n")
    os.replace(path + ".sha256.tmp", path + ".sha256")


# ---- main: processes and devices, resume, the loop over epochs -----------------------------
def setup_distributed(device=None):
    """(rank, world size, device) as torchrun sets them; NCCL between GPUs, gloo between CPUs."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    cuda = torch.cuda.is_available() if device is None else device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise UserError("--device cuda, but torch sees no CUDA GPU (torch.cuda.is_available())")
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.set_float32_matmul_precision("high")  # TF32 for what runs outside autocast
        torch.backends.cudnn.benchmark = True  # convolutions: the fastest algorithm, timed once
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return rank, world, device


def train(args):
    rank, world, device = setup_distributed(args.device)
    args.amp = args.amp or ("bf16" if device.type == "cuda" else "none")
    log = print if rank == 0 else (lambda *a, **k: None)
    torch.manual_seed(args.seed)  # the initial weights (DDP copies rank 0's to the others)
    build_model(args, 1)  # sizes that do not fit fail now, before any data is read or made
    train_set, val_set, classes, mix = make_data(args)
    model = build_model(args, len(classes))
    ckpt_path = os.path.join(args.output, "checkpoint.pth")
    auto = [not (args.resume or args.fresh or args.eval_only) and os.path.exists(ckpt_path)]
    if world > 1:  # rank 0's disk decides: all resume or none, with or without a shared disk
        dist.broadcast_object_list(auto)
    auto, resume = auto[0], args.resume or (ckpt_path if auto[0] else None)
    ckpt = read_checkpoint(resume) if resume else None
    if ckpt is not None:  # a training checkpoint of this script, of this very model
        if not {"model", "optimizer", "args", "log"} <= set(ckpt):
            raise UserError(f"{resume} is not a training checkpoint of this script: start afresh"
                            f" (--fresh, or another --output), or from its weights (--pretrained)")
        changed = [f"--{k.replace('_', '-')} {ckpt['args'].get(k)} then, {getattr(args, k)} now"
                   for k in ("data", "attn", "no", "img_size", "patch_size", "embed_dim", "depth",
                             "num_heads", "drop_path") if ckpt["args"].get(k) != getattr(args, k)]
        if changed:
            raise UserError(f"the model changed since the run in {resume} ({', '.join(changed)}):"
                            f" give its flags, or --fresh (overwriting it), or another --output")
        load_weights(model, ckpt, resume)
    if args.pretrained and not resume:
        load_weights(model, read_checkpoint(args.pretrained), args.pretrained)
    model = model.to(device)
    train_model = torch.compile(model) if args.compile else model
    eval_model = train_model  # evaluation skips DDP: shards differ in length, no gradients
    if world > 1:
        train_model = nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None)
    train_loader, val_loader = make_loaders(train_set, val_set, args, rank, world, device)
    if args.eval_only:
        top1, top5 = evaluate(eval_model, val_loader, device, rank)
        log(f"{resume or args.pretrained}: top-1 {top1:.2f}%  top-5 {top5:.2f}%  "
            f"({len(val_set)} images at {args.img_size} px)")
        return {"top1": top1, "top5": top5}
    global_batch = args.batch_size * world * args.accum_steps
    steps = len(train_loader) // args.accum_steps                      # updates per epoch
    if steps == 0:
        raise UserError(f"{len(train_set)} training images cannot fill one update of "
                        f"{args.batch_size} x {world} processes x {args.accum_steps} steps")
    optimizer = make_optimizer(model, args, device)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    history = ckpt["log"] if ckpt else []  # one dict per epoch: the lines of log.jsonl
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        for group in optimizer.param_groups:  # this device's implementation, not the saved one
            group["fused"] = device.type == "cuda"
        if scaler.is_enabled() and ckpt["scaler"]:
            scaler.load_state_dict(ckpt["scaler"])
        log(f"resuming {'automatically ' * auto}from {resume}: {len(history)} of {args.epochs} "
            f"epochs done" + "; to start afresh add --fresh or choose another --output" * auto)
    lr_of = lr_schedule(args, global_batch, steps)
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)  # takes soft targets
    log(f"{args.data}: {len(train_set)} images, {len(classes)} classes; {model_label(args)}, "
        f"{sum(p.numel() for p in model.parameters()):,} parameters; {world} process(es) on "
        f"{device.type}, global batch {global_batch} ({args.batch_size} x {world} x "
        f"{args.accum_steps}), {steps} updates per epoch, amp {args.amp}")
    os.makedirs(args.output, exist_ok=True)
    for epoch in range(len(history) + 1, args.epochs + 1):             # counted from 1
        train_loader.sampler.set_epoch(epoch - 1)  # new shuffle, the same on every process
        seed = args.seed + 1000 * epoch + rank  # drop-path, augmentation: a resumed run
        torch.manual_seed(seed), random.seed(seed), np.random.seed(seed)  # draws the same
        t0 = time.time()
        loss, waited = train_one_epoch(train_model, train_loader, criterion, optimizer, scaler,
                                       mix, device, args, lr_of, epoch, rank)
        train_s = time.time() - t0
        top1, top5 = evaluate(eval_model, val_loader, device, rank)
        best = max([top1] + [r["top1"] for r in history])
        history.append({"epoch": epoch, "loss": loss, "lr": optimizer.param_groups[0]["lr"],
                        "top1": top1, "top5": top5, "best_top1": best, "train_s": train_s,
                        "images_per_s": steps * global_batch / train_s, "data_wait_s": waited,
                        "time_s": time.time() - t0})
        if rank == 0:
            save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "scaler": scaler.state_dict(), "log": history,
                             "args": vars(args)}, ckpt_path)
            if top1 == best:  # the best epoch's weights, as DeiT, InLine and timm keep
                save_checkpoint({"model": model.state_dict(), "epoch": epoch, "top1": top1,
                                 "args": vars(args)}, os.path.join(args.output, "best.pth"))
            with open(os.path.join(args.output, "log.jsonl"), "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in history)
        log("epoch {epoch}/{n} | loss {loss:.4f} | lr {lr:.2e} | top-1 {top1:.2f}% top-5 "
            "{top5:.2f}% | {images_per_s:.0f} img/s | waited {data_wait_s:.0f} of {train_s:.0f}"
            " s for data".format(n=args.epochs, **history[-1]))
    best = max([r["top1"] for r in history], default=0.0)
    log(f"best top-1 {best:.2f}% of {len(history)} epochs; checkpoints, log in {args.output}")
    return {"best_top1": best, **{k: history[-1][k] for k in ("top1", "top5") if history}}


def main(argv=None):
    args, rank = get_args(argv), int(os.environ.get("RANK", 0))
    try:
        return train(args)
    except (UserError, OSError) as e:  # OSError: an image or disk; from a DataLoader worker
        sys.exit(f"error{f' (rank {rank})' * (rank > 0)}: "  # a worker's traceback: its last line
                 + str(e).strip().splitlines()[-1].split("UserError: ")[-1])
    except ModuleNotFoundError as e:  # timm, torchvision: needed for real data only
        sys.exit(f"error: this needs {e.name.split('.')[0]}: pip install -r requirements.txt")
    except KeyboardInterrupt:  # Ctrl-C: one line, where the last checkpoint is
        ckpt = os.path.join(args.output, "checkpoint.pth")  # saved after every epoch
        if rank == 0:
            print(f"interrupted: the same command resumes from {ckpt}" if os.path.exists(ckpt)
                  else "interrupted before the first checkpoint (after epoch 1)", file=sys.stderr)
        sys.exit(130)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
