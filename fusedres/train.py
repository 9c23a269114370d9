"""``fusedres train``: train ``preact_resnet(depth)`` on CIFAR-10 or on a synthetic dataset.

The data lives on the training device as uint8 images; each batch is augmented there (random
crop with zero padding of 1/8 of the side, 4 pixels at 32x32, and a horizontal flip, in one
gather) and normalised with the CIFAR-10 mean and standard deviation. SGD with momentum 0.9 and
weight decay 5e-4; the learning rate follows a cosine from ``--lr`` to 0 over ``--epochs`` (or
over ``--steps`` where that is longer). Started by ``torchrun`` (``WORLD_SIZE`` > 1) it trains
with DistributedDataParallel: every process takes its own 1/WORLD_SIZE of each epoch's shuffled
order, ``--batch-size`` is per process, and only rank 0 prints and saves.
"""

from __future__ import annotations

import argparse
import math
import os
import pickle
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import _runtime
from .cli import CLIError, reexec_under_interpreter
from .models import preact_resnet

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
CIFAR_DIR = "cifar-10-batches-py"
CHECKPOINT_FORMAT = 1
DEFAULT_DEPTH = 20
NUM_CLASSES = 10


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``train`` subcommand's options."""
    p.add_argument("--depth", type=int, default=DEFAULT_DEPTH,
                   help=f"network depth: 6n+2 for basic blocks, 9n+2 for bottlenecks (default {DEFAULT_DEPTH}; "
                        "164 is the paper's bottleneck ResNet-164)")
    p.add_argument("--block", choices=["auto", "basic", "bottleneck"], default="auto",
                   help="block type (auto: bottleneck for depth >= 164, else basic)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", type=Path, metavar="PATH",
                     help="CIFAR-10 in torchvision's format: PATH or PATH/cifar-10-batches-py holding "
                          "data_batch_1..5 (and test_batch); never downloaded")
    src.add_argument("--synthetic", action="store_true",
                     help="a built-in synthetic 10-class dataset (the default without --data)")
    p.add_argument("--image-size", type=int, default=32, help="synthetic images' side (default 32)")
    p.add_argument("--synthetic-size", type=int, default=10000, help="synthetic images (default 10000)")
    impl = p.add_mutually_exclusive_group()
    impl.add_argument("--fused", dest="fused", action="store_true", default=True,
                      help="the fused Triton blocks (default)")
    impl.add_argument("--eager", dest="fused", action="store_false", help="the same network in eager PyTorch")
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    p.add_argument("--channels-last", action="store_true", help="channels_last model and inputs")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--batch-size", type=int, default=128, help="images per step and process (default 128)")
    p.add_argument("--epochs", type=int, default=1, help="epochs to train (default 1)")
    p.add_argument("--steps", type=int, default=None,
                   help="stop after this many optimizer steps in all, resumed ones included (instead of at the "
                        "end of --epochs; the learning-rate schedule still spans --epochs, or --steps if longer)")
    p.add_argument("--lr", type=float, default=0.1, help="peak learning rate (default 0.1)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: CUDA when present, else CPU")
    p.add_argument("--checkpoint", type=Path, metavar="PATH",
                   help="save model, optimizer, epoch and step here after every epoch and at the end")
    p.add_argument("--resume", type=Path, metavar="PATH", help="continue from this checkpoint")
    p.add_argument("--seed", type=int, default=0, help="initialisation, data order and augmentation (default 0)")
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across processes (CUDA, with torchrun)")
    p.add_argument("--log-every", type=int, default=0, metavar="N",
                   help="without a terminal, a progress line every N steps (default: about 10 lines a run)")


@dataclass
class Dataset:
    """uint8 images (N, 3, H, W) and int64 labels; ``test_*`` may be None."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor | None = None
    test_y: torch.Tensor | None = None


@dataclass
class World:
    """This process's place in a ``torchrun`` job (one process: rank 0 of 1)."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @classmethod
    def from_env(cls) -> World:
        try:
            return cls(int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")),
                       int(os.environ.get("WORLD_SIZE", "1")))
        except ValueError as e:
            raise CLIError(f"bad torchrun environment (RANK/LOCAL_RANK/WORLD_SIZE): {e}") from None


def find_cifar_dir(path: Path) -> Path:
    """The folder holding the CIFAR-10 batches: ``path`` or ``path/cifar-10-batches-py``."""
    if not path.exists():
        raise CLIError(f"--data {path}: no such directory")
    if not path.is_dir():
        raise CLIError(f"--data {path}: not a directory")
    for folder in (path / CIFAR_DIR, path):
        if folder.is_dir() and any(folder.glob("data_batch_*")):
            return folder
    raise CLIError(f"--data {path}: no CIFAR-10 batches (data_batch_1..5) in it or in {path / CIFAR_DIR}")


def _read_batch(file: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(file, "rb") as f:
            d = pickle.load(f, encoding="bytes")
        data = d.get(b"data", d.get("data"))
        labels = d.get(b"labels", d.get("labels"))
        data = np.asarray(data, dtype=np.uint8)
        labels = np.asarray(labels, dtype=np.int64)
    except Exception as e:  # a truncated or foreign file: say which, without a traceback
        raise CLIError(f"cannot read CIFAR-10 batch {file}: {type(e).__name__}: {e}") from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != (data.shape[0],):
        raise CLIError(f"{file}: expected data of shape (n, 3072) and n labels, got data {data.shape} "
                       f"and labels {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise CLIError(f"{file}: labels outside 0..9")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10(path: Path) -> Dataset:
    """CIFAR-10 from torchvision's python pickles (whichever of data_batch_1..5 exist, test_batch if present)."""
    folder = find_cifar_dir(path)
    files = sorted(folder.glob("data_batch_*"))
    parts = [_read_batch(f) for f in files]
    train_x = torch.from_numpy(np.concatenate([x for x, _ in parts]))
    train_y = torch.from_numpy(np.concatenate([y for _, y in parts]))
    test_x = test_y = None
    if (folder / "test_batch").is_file():
        tx, ty = _read_batch(folder / "test_batch")
        test_x, test_y = torch.from_numpy(tx), torch.from_numpy(ty)
    return Dataset(f"CIFAR-10 {folder} ({len(files)} training batches)", train_x, train_y, test_x, test_y)


def synthetic_dataset(n: int, image_size: int, seed: int) -> Dataset:
    """``n`` images of 10 classes: a fixed random pattern per class plus noise, so that the loss
    can fall as on real data. The same for every ``seed`` on every machine."""
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.randint(40, 216, (NUM_CLASSES, 3, image_size, image_size), generator=g, dtype=torch.int16)
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    noise = torch.randint(-40, 41, (n, 3, image_size, image_size), generator=g, dtype=torch.int16)
    images = (prototypes[labels] + noise).clamp_(0, 255).to(torch.uint8)
    return Dataset(f"synthetic ({n} images {image_size}x{image_size})", images, labels)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding of 1/8 of the side and random horizontal flip of a uint8 batch,
    returned normalised, float32, with channels_last strides."""
    b, c, h, w = x.shape
    pad = max(1, h // 8)
    xp = F.pad(x, (pad, pad, pad, pad)).permute(0, 2, 3, 1)  # (b, h + 2 pad, w + 2 pad, c)
    dev = x.device
    oy = torch.randint(0, 2 * pad + 1, (b, 1), device=dev, generator=gen)
    ox = torch.randint(0, 2 * pad + 1, (b, 1), device=dev, generator=gen)
    flip = torch.randint(0, 2, (b, 1), device=dev, generator=gen).bool()
    ar_h = torch.arange(h, device=dev)
    ar_w = torch.arange(w, device=dev)
    rows = oy + ar_h
    cols = ox + torch.where(flip, w - 1 - ar_w, ar_w)
    crop = xp[torch.arange(b, device=dev)[:, None, None], rows[:, :, None], cols[:, None, :]]
    return normalize(crop.permute(0, 3, 1, 2))


def normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8 images → float32 with the CIFAR-10 mean and standard deviation."""
    mean = torch.tensor(CIFAR_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD, device=x.device).view(1, 3, 1, 1)
    return (x.float() / 255.0 - mean) / std


def cosine_lr(peak: float, step: int, total: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based) of ``total``."""
    return peak * 0.5 * (1.0 + math.cos(math.pi * step / max(total, 1)))


class Progress:
    """One line per update: rewritten in place with ``\\r`` on a terminal (a few times a second),
    else printed every ``every`` steps. Only rank 0 prints."""

    def __init__(self, total: int, enabled: bool, every: int, stream: Any = None) -> None:
        self.total = total
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self.every = every if every > 0 else max(1, total // 10)
        self._last_draw = 0.0
        self._width = 0

    def due(self, step: int) -> bool:
        """Whether step ``step`` (1-based) should be shown: the loss is read (a device sync) only then."""
        if not self.enabled:
            return False
        if step == self.total:
            return True
        if self.tty:
            return time.perf_counter() - self._last_draw >= 0.25
        return step % self.every == 0

    def show(self, step: int, epoch: int, loss: float, images_per_s: float | None) -> None:
        self._last_draw = time.perf_counter()
        done = int(20 * step / max(self.total, 1))
        speed = f"{images_per_s:8.1f} images/s" if images_per_s is not None else "       - images/s"
        line = (f"step {step:>{len(str(self.total))}}/{self.total} [{'#' * done}{'.' * (20 - done)}] "
                f"epoch {epoch} loss {loss:.4f} {speed}")
        if self.tty:
            self.stream.write("\r" + line.ljust(self._width))
            self._width = len(line)
            if step == self.total:
                self.stream.write("\n")
                self._width = 0
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        """A line of its own (epoch results) that does not garble the bar."""
        if not self.enabled:
            return
        if self.tty and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self._width = 0
        print(text, flush=True)


def resolve_device(choice: str, world: World) -> torch.device:
    """``--device`` as a device: ``auto`` is CUDA (this process's ``LOCAL_RANK``) when present."""
    cuda = torch.cuda.is_available()
    if choice == "cuda" and not cuda:
        raise CLIError("--device cuda: no CUDA device is available here (torch.cuda.is_available() is False)")
    if choice == "cpu" or not cuda:
        return torch.device("cpu")
    if world.local_rank >= torch.cuda.device_count():
        raise CLIError(f"LOCAL_RANK {world.local_rank} but only {torch.cuda.device_count()} CUDA devices")
    return torch.device("cuda", world.local_rank)


def _block_name(depth: int, block: str) -> str:
    return ("bottleneck" if depth >= 164 else "basic") if block == "auto" else block


def _validate(args: argparse.Namespace, device: torch.device, world: World) -> None:
    """Every user error that can be found before any data is read or any kernel runs."""
    for name in ("batch_size", "epochs", "synthetic_size"):
        if getattr(args, name) < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.steps is not None and args.steps < 1:
        raise CLIError(f"--steps must be at least 1, got {args.steps}")
    if args.image_size < 2:
        raise CLIError(f"--image-size must be at least 2, got {args.image_size}")
    try:
        with torch.device("meta"):
            preact_resnet(args.depth, NUM_CLASSES, block=args.block, fused=args.fused)
    except ValueError as e:
        raise CLIError(str(e)) from None
    if args.data is not None:
        find_cifar_dir(args.data)
    if args.resume is not None and not args.resume.is_file():
        raise CLIError(f"--resume {args.resume}: no such file")
    if args.checkpoint is not None and args.checkpoint.is_dir():
        raise CLIError(f"--checkpoint {args.checkpoint} is a directory; give a file name")
    if args.sync_bn and world.size > 1 and device.type != "cuda":
        raise CLIError("--sync-bn needs CUDA: SyncBatchNorm does not synchronise CPU tensors across processes")


def run(args: argparse.Namespace, argv: list[str]) -> int:
    """``fusedres train``; ``argv`` are the command's arguments, for re-running under the interpreter."""
    world = World.from_env()
    device = resolve_device(args.device, world)
    _validate(args, device, world)
    if args.fused and device.type == "cpu" and not _runtime.INTERPRET:
        reexec_under_interpreter(argv, note="the fused kernels run on the CPU under the Triton interpreter "
                                            "(slow: only tiny sizes are practical; --eager is fast)")
    if world.size > 1:
        import torch.distributed as dist

        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        try:
            return _train(args, device, world)
        finally:
            dist.destroy_process_group()
    return _train(args, device, world)


def _say(world: World, text: str) -> None:
    if world.rank == 0:
        print(text, flush=True)


def _save(path: Path, model: nn.Module, opt: torch.optim.Optimizer, step: int, epoch: int,
          config: dict[str, Any]) -> None:
    """Write the checkpoint through a temporary file, so that an interrupted save keeps the last one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": CHECKPOINT_FORMAT, "config": config, "step": step, "epoch": epoch,
                "model": model.state_dict(), "optimizer": opt.state_dict()}, tmp)
    os.replace(tmp, path)


def _load(path: Path, device: torch.device, config: dict[str, Any]) -> dict[str, Any]:
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # not a checkpoint at all: one line, not a traceback
        raise CLIError(f"--resume {path}: cannot read it as a checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CLIError(f"--resume {path}: not a fusedres train checkpoint")
    if ckpt["config"] != config:
        raise CLIError(f"--resume {path}: saved for {ckpt['config']}, but this run is {config}")
    return ckpt


def _evaluate(model: nn.Module, data: Dataset, device: torch.device, batch: int, fmt: torch.memory_format,
              amp: bool) -> float:
    model.eval()
    correct = 0
    with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=amp):
        for i in range(0, len(data.test_y), batch):
            x = normalize(data.test_x[i:i + batch]).contiguous(memory_format=fmt)
            correct += int((model(x).argmax(1) == data.test_y[i:i + batch]).sum())
    model.train()
    return correct / len(data.test_y)


def _train(args: argparse.Namespace, device: torch.device, world: World) -> int:
    if args.data is not None:
        data = load_cifar10(args.data)
    else:
        data = synthetic_dataset(args.synthetic_size, args.image_size, args.seed)
    data.train_x, data.train_y = data.train_x.to(device), data.train_y.to(device)
    if data.test_x is not None:
        data.test_x, data.test_y = data.test_x.to(device), data.test_y.to(device)
    per_rank = len(data.train_y) // world.size
    steps_per_epoch = per_rank // args.batch_size
    if steps_per_epoch == 0:
        raise CLIError(f"{len(data.train_y)} training images over {world.size} process(es) do not fill "
                       f"one batch of {args.batch_size}")
    total = args.steps if args.steps is not None else args.epochs * steps_per_epoch
    horizon = max(total, args.epochs * steps_per_epoch)  # --steps alone does not reshape the schedule

    block = _block_name(args.depth, args.block)
    config = {"depth": args.depth, "block": block, "num_classes": NUM_CLASSES,
              "image_size": int(data.train_x.shape[-1])}
    torch.manual_seed(args.seed)
    net = preact_resnet(args.depth, NUM_CLASSES, block=block, fused=args.fused)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    net = net.to(device, memory_format=fmt)
    if args.sync_bn:
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    opt = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    start = 0
    if args.resume is not None:
        ckpt = _load(args.resume, device, config)
        net.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        start = int(ckpt["step"])
        _say(world, f"train: resumed from {args.resume} at step {start} (epoch {start // steps_per_epoch})")
    model: nn.Module = net
    if world.size > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        model = torch.compile(model)

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        "CPU, Triton interpreter" if args.fused else "CPU")
    flags = [f for f, on in (("bf16 autocast", args.amp), ("channels_last", args.channels_last),
                             ("torch.compile", args.compile), ("SyncBatchNorm", args.sync_bn)) if on]
    _say(world, f"train: preact_resnet({args.depth}, {block}) {'fused' if args.fused else 'eager'} on {where}"
                f"{', ' + ', '.join(flags) if flags else ''}; {data.name}; batch {args.batch_size}"
                f"{f' per process x {world.size} processes' if world.size > 1 else ''}; "
                f"{steps_per_epoch} steps per epoch; steps {start}..{total}")
    if start >= total:
        _say(world, f"train: the checkpoint is at step {start}, the run ends at step {total}: nothing to do")
        return 0

    progress = Progress(total, world.rank == 0, args.log_every)
    gen = torch.Generator(device=device)
    images_per_step = args.batch_size * world.size
    timed_s, timed_images, t0 = 0.0, 0, None
    order: torch.Tensor | None = None
    loss = torch.zeros(())

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def pause() -> None:
        nonlocal timed_s, t0
        if t0 is not None:
            sync()
            timed_s += time.perf_counter() - t0
            t0 = None

    def end_of_epoch(step: int) -> None:
        """After ``step`` steps: evaluate and save (outside the timed training)."""
        epoch = step // steps_per_epoch
        pause()
        where = f"epoch {epoch}" if step % steps_per_epoch == 0 else f"step {step} (in epoch {epoch + 1})"
        text = f"{where}: train loss {float(loss):.4f}"
        if data.test_x is not None and world.rank == 0:
            acc = _evaluate(net, data, device, args.batch_size, fmt, args.amp)
            text += f", test accuracy {100 * acc:.2f}%"
        progress.message(text)
        if args.checkpoint is not None and world.rank == 0:
            _save(args.checkpoint, net, opt, step, epoch, config)

    model.train()
    for step in range(start, total):
        if t0 is None and step > start:  # (re)start the clock: after the first step, after an epoch's end
            t0 = time.perf_counter()
        epoch, i = divmod(step, steps_per_epoch)
        if order is None or i == 0:
            # The same shuffled order on every rank (seeded by the epoch), so that a resumed run
            # and every process agree on it; each rank takes its own slice.
            perm = torch.randperm(len(data.train_y), generator=torch.Generator().manual_seed(args.seed + epoch))
            order = perm[world.rank::world.size][: steps_per_epoch * args.batch_size].to(device)
        idx = order[i * args.batch_size:(i + 1) * args.batch_size]
        gen.manual_seed(args.seed * 1_000_003 + step * 1009 + world.rank)  # resumable augmentation
        x = augment(data.train_x[idx], gen).contiguous(memory_format=fmt)
        y = data.train_y[idx]
        for group in opt.param_groups:
            group["lr"] = cosine_lr(args.lr, step, horizon)
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, torch.bfloat16, enabled=args.amp):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        loss = loss.detach()
        done = step + 1
        if done == start + 1:  # the first step (compilation, autotuning) is not timed
            sync()
        else:
            timed_images += images_per_step
        if progress.due(done):
            value = float(loss)
            now = time.perf_counter()
            elapsed = timed_s + (now - t0 if t0 is not None else 0.0)
            progress.show(done, epoch + 1, value, timed_images / elapsed if timed_images else None)
        if done % steps_per_epoch == 0 or done == total:
            end_of_epoch(done)
    pause()
    ran = total - start
    if timed_images:
        speed, how = timed_images / timed_s, "excluding the first step"
    else:
        speed, how = float("nan"), "one step: not timed"
    _say(world, f"train: {ran} steps, {speed:.1f} images/s ({how}), final loss {float(loss):.4f}")
    return 0
