"""What train.py and sample.py do around the model, kept out of their reading path: the checks that turn a user's
mistake into one sentence before any work, and what keeps a run from losing work.

    1. training options   check_training_arguments, and the checks of a resumed run
    2. processes          start_processes (torchrun), on_first (work of the first process alone), only_writer (the
                          lock on --out), StopRequest (signals)
    3. steps              Batches (endless, resumed mid-epoch), derived_seed, check_weights_are_sane, precision
    4. run files          RunLog (log.jsonl and TensorBoard), save_checkpoint (and the numbered ones)
    5. sampling           check_sampling_arguments, each sample's seed and condition, gathering, the adaptive solver
    6. FID                FID against a folder or saved statistics, which are cached
"""

import argparse
import collections
import contextlib
import fcntl
import hashlib
import itertools
import json
import math
import os
import re
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from data import (IMAGE_EXTENSIONS, RENAMED_CONFIG_FIELDS, VAE, CaptionEncoder, ClipFolder, ImageFolder, MovingShapes,
                  SmileyFaces, Terminal, UserError, check_writable, checkpoint_config, image_transform, load_weights,
                  make_grid, pick_device, plural, read_text, save_atomically, warn, written_atomically)
from zigma import PRESETS, ZigMaConfig, flow_loss, guided_velocity

MAX_IMAGE_SIZE = 8192  # pixels a side: 1024 x 1024 latent cells, far past the paper's largest model
MAX_ODE_STEPS = 10_000  # sample quality stops changing long before
PRECISIONS = ["auto", "bf16", "fp16", "fp32"]
GUIDANCE_SCALE = 4.0  # classifier-free guidance of samples and previews by default, as DiT's and SiT's sample.py


#################################################################################
#                               Training options                                #
#################################################################################

def option(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_training_arguments(args: argparse.Namespace) -> argparse.Namespace:
    """One sentence for an option out of range, or one that does nothing without another; then the defaults that
    depend on others."""
    conditioned = args.class_cond or args.captions
    for name in ("cond_drop", "sample_cfg"):
        if getattr(args, name) is not None and not conditioned:
            raise UserError(f"{option(name)} applies to --class-cond and --captions: add one, or leave it out")
    for name in ("sample_steps", "sample_cfg"):
        if getattr(args, name) is not None and args.sample_every == 0:
            raise UserError(f"{option(name)} applies to the sample grids, which --sample-every 0 turns off; leave one out")
    defaults = dict(image_size=256 if args.vae else 32, cond_drop=0.1, sample_steps=50, sample_cfg=GUIDANCE_SCALE)
    for name, default in defaults.items():
        setattr(args, name, default if getattr(args, name) is None else getattr(args, name))
    for name in ("image_size", "steps", "batch_size", "sample_steps", "ckpt_every", "log_every"):
        if getattr(args, name) < 1:
            raise UserError(f"{option(name)} must be 1 or more, not {getattr(args, name)}")
    for name, most in (("image_size", MAX_IMAGE_SIZE), ("sample_steps", MAX_ODE_STEPS)):
        if getattr(args, name) > most:
            raise UserError(f"{option(name)} must be {most} or less, not {getattr(args, name)}")
    if args.vae is None:  # with --vae, train.py picks the default model once the VAE's factor is known
        args.model = args.model or default_model(args.image_size)
    tiny = args.model is None or args.model.startswith("ZigMa-Tiny/")  # the default model is a Tiny one
    args.lr = args.lr if args.lr is not None else 1e-3 if tiny else 1e-4  # larger: the official ZigMa's
    args.ema_decay = args.ema_decay if args.ema_decay is not None else 0.999 if tiny else 0.9999  # larger: DiT's
    for name in ("lr", "warmup", "weight_decay", "grad_clip", "ema_decay", "cond_drop", "sample_cfg"):
        if not math.isfinite(getattr(args, name)):
            raise UserError(f"{option(name)} must be a finite number, not {getattr(args, name)}")
    if not args.lr > 0:
        raise UserError(f"--lr must be positive, not {args.lr}")
    for name in ("cond_drop", "ema_decay"):
        if not 0 <= getattr(args, name) <= 1:
            raise UserError(f"{option(name)} must be between 0 and 1, not {getattr(args, name)}")
    for name in ("weight_decay", "grad_clip", "workers", "frames", "sample_cfg", "warmup", "sample_every", "keep_checkpoints"):
        if getattr(args, name) < 0:
            raise UserError(f"{option(name)} must be 0 or more, not {getattr(args, name)}")
    if not 0 <= args.seed < 2 ** 63:
        raise UserError(f"--seed must be between 0 and 2^63 - 1, not {args.seed}")
    if args.model and args.image_size % PRESETS[args.model]["patch_size"]:  # with --vae: build_dataset
        raise UserError(f"--image-size {args.image_size} is not a multiple of {args.model}'s patch size "
                        f"{PRESETS[args.model]['patch_size']}")
    if args.data is not None and args.out.resolve().is_relative_to(args.data.resolve()):
        raise UserError(f"--out {args.out} is inside --data {args.data}: its sample grids would become training images; "
                        f"pass an --out outside it")
    if not args.frames:
        for name in ("frame_stride", "video_pattern"):
            if getattr(args, name) is not None:
                raise UserError(f"{option(name)} applies to clips only: add --frames, or leave it out")
    if args.vae is not None and args.data is None:
        raise UserError("--vae needs --data: the built-in data is made for pixel space")
    if args.flip is not None and args.data is None:
        raise UserError(f"{'--flip' if args.flip else '--no-flip'} applies to --data: the built-in data is drawn "
                        f"afresh, never flipped; leave it out")
    if args.text_encoder is not None and not args.captions:
        raise UserError("--text-encoder applies to captions only: add --captions, or leave it out")
    if args.frame_stride is not None and args.frame_stride < 1:
        raise UserError(f"--frame-stride must be 1 or more, not {args.frame_stride}")
    if args.frame_stride is not None and args.data is None:
        raise UserError("--frame-stride applies to --data: the built-in clips are drawn frame by frame; leave it out")
    if args.video_pattern is not None and (not args.video_pattern or set(args.video_pattern) - set("stv")):
        raise UserError(f"--video-pattern takes the letters s, t and v, not {args.video_pattern!r}")
    if args.tensorboard:
        tensorboard_writer(None)  # one sentence now where tensorboard is missing
    args.frame_stride, args.video_pattern = args.frame_stride or 1, args.video_pattern or "sst"
    args.text_encoder = args.text_encoder or "learned"
    args.flip = args.flip is not False  # with --data, flips unless --no-flip
    return args


def default_model(side: int) -> str:
    """The Tiny preset with the largest patch that leaves a grid of 8 x 8 tokens or more on an input of this side
    (pixels, or latent cells), else patch 2. At equal time on a CPU, Tiny/4's 8 x 8 grid at 32 px sampled as well
    as Tiny/2's 16 x 16 (docs/quality.md); a 4 x 4 grid leaves the zigzag little to order."""
    for patch in (8, 4, 2):
        if side % patch == 0 and side // patch >= 8:
            return f"ZigMa-Tiny/{patch}"
    return "ZigMa-Tiny/2"


def build_dataset(args, vae=None):
    """The training data that the options name: a folder of images or clips, or the built-in faces or shapes."""
    if vae and args.image_size % (vae.factor * PRESETS[args.model]["patch_size"]):
        raise UserError(f"--image-size {args.image_size} is not a multiple of {vae.factor * PRESETS[args.model]['patch_size']}, "
                        f"the VAE's downsampling factor {vae.factor} times {args.model}'s patch size")
    if args.frames and args.captions:
        raise UserError("--captions is for images; clips take --class-cond")
    if args.data is None:
        if args.frames:
            if args.class_cond:
                raise UserError("the built-in moving shapes have no classes; pass --data with one subfolder per class")
            return MovingShapes(args.image_size, args.frames)
        return SmileyFaces(args.image_size, class_cond=args.class_cond, captions=args.captions)
    if not args.data.exists():
        raise UserError(f"--data {args.data} does not exist")
    if not args.data.is_dir():
        raise UserError(f"--data {args.data} is not a folder; point it at a folder of images")
    if args.frames:
        return ClipFolder(args.data, args.image_size, args.frames, args.frame_stride, args.class_cond, flip=args.flip)
    return ImageFolder(args.data, args.image_size, args.class_cond, args.captions, flip=args.flip)


# What sets each field of the model's config, for the message when a resumed checkpoint differs.
MODEL_OPTIONS = ["image_size", "vae", "model", "path_family", "num_paths", "frames", "video_pattern", "class_cond", "captions",
                 "text_encoder"]
# Options that may change when a run resumes: they take effect, and a line says so.
TRAINING_OPTIONS = ["data", "seed", "frame_stride", "batch_size", "lr", "warmup", "time_sampling", "weight_decay",
                    "grad_clip", "ema_decay", "cond_drop", "flip", "precision"]


def as_option(name: str, value) -> str:
    if isinstance(value, bool):
        return option(name) if value else f"no {option(name)}"
    return f"{option(name)} {value}"


def saved_arguments(args) -> dict:
    """The arguments as the checkpoint keeps them: paths as strings."""
    return {name: str(value) if isinstance(value, Path) else value for name, value in vars(args).items()}


def check_resumed_options(checkpoint: dict, path: Path, args) -> list[str]:
    """Refuse to resume a checkpoint trained with other model options, naming the option; returns a line for
    each training option that changed, to print once the resume is sure."""
    before = {RENAMED_CONFIG_FIELDS.get(name, name): value for name, value in checkpoint.get("args", {}).items()}
    now = saved_arguments(args)
    for name in MODEL_OPTIONS:
        if name in before and before[name] != now[name]:
            raise UserError(f"{path} was trained with {as_option(name, before[name])}, but this run has "
                            f"{as_option(name, now[name])}; pass the options it was trained with, or another --out")
    return [f"resuming with {as_option(name, now[name])} (the checkpoint was trained with {as_option(name, before[name])})"
            for name in TRAINING_OPTIONS if name in before and before[name] != now[name]]


def check_resumed_model(checkpoint: dict, path: Path, config: ZigMaConfig, conditioning: dict) -> None:
    """Refuse to resume a checkpoint whose classes, caption words or model differ from what the options and data give."""
    classes_before, classes_now = checkpoint["conditioning"]["class_names"], conditioning["class_names"]
    if classes_before != classes_now:
        raise UserError(f"{path} was trained on the classes {', '.join(classes_before or ['none'])}, "
                        f"but --data has {', '.join(classes_now or ['none'])}; pass its data, or another --out")
    if checkpoint["conditioning"]["vocabulary"] != conditioning["vocabulary"]:
        raise UserError(f"the captions in --data use other words than those {path} was trained on; pass its data, "
                        f"or another --out")
    changed = [field for field, value in asdict(config).items() if checkpoint_config(checkpoint).get(field) != value]
    if changed:
        raise UserError(f"{path} holds a model with another {', '.join(changed)} than these options give; pass another --out")


def resume(checkpoint: dict, path: Path, networks: nn.ModuleDict, ema: nn.ModuleDict, optimizer, scaler,
           config: ZigMaConfig, conditioning: dict) -> tuple[int, tuple[int, int]]:
    """Load a checkpoint to train on: the weights, the EMA, AdamW's moments (with this run's weight decay) and an
    fp16 run's loss scale; returns its step and its position in the data."""
    check_resumed_model(checkpoint, path, config, conditioning)
    load_weights(networks, checkpoint["model"], path, "model")
    load_weights(ema, checkpoint["ema"], path, "ema")
    chosen = [group["weight_decay"] for group in optimizer.param_groups]  # this run's, not the checkpoint's
    if "optimizer" in checkpoint:
        try:
            optimizer.load_state_dict(checkpoint["optimizer"])
        except ValueError:
            raise UserError(f"{path} holds the optimizer of an older train.py; sample from it, or train in another --out")
    else:  # stripped for release: the weights alone
        warn(f"{path} holds no optimizer state; AdamW's moments start afresh")
    for group, weight_decay in zip(optimizer.param_groups, chosen):
        group["weight_decay"] = weight_decay
    if checkpoint.get("scaler") and scaler.is_enabled():  # empty where the run saved it without fp16
        scaler.load_state_dict(checkpoint["scaler"])
    return checkpoint["step"], tuple(checkpoint.get("data_position", (0, 0)))  # older checkpoints: (0, 0)


#################################################################################
#                                   Processes                                   #
#################################################################################

def start_processes(device_name: str | None, batch_size: int | None = None) -> tuple[int, int, torch.device]:
    """This process's rank, the number of processes, and its device. Under torchrun (WORLD_SIZE > 1): the
    process group (nccl on CUDA, gloo on the CPU), one GPU per process, and the first process speaks for all
    (the others print nothing); run alone: rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    device = pick_device(device_name)
    if world == 1:
        return 0, 1, device
    if device.type not in ("cuda", "cpu"):
        raise UserError(f"several processes run on CUDA or the CPU, not {device.type}")
    if batch_size is not None and batch_size % world:
        raise UserError(f"--batch-size {batch_size} does not split evenly across {world} processes")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if dist.get_rank() > 0:
        sys.stdout = open(os.devnull, "w")
    return dist.get_rank(), world, device


def exit_message(message: str) -> str | int:
    """What a script exits with after an error: the message in the first process (or alone), and a bare status of 1
    in the others, which under torchrun would print the same sentence again."""
    return message if int(os.environ.get("RANK", "0")) == 0 else 1


def end_processes() -> None:
    """Leave the process group, if there is one. Unless an error is on its way out, first wait for every process
    to get here: a process that tears the group down while another still uses it can abort at exit (gloo)."""
    if not dist.is_initialized():
        return
    if sys.exc_info()[0] is None:
        dist.barrier()
    dist.destroy_process_group()


def on_first(work, rank: int, world: int):
    """Run work() in the first process only; returns its result there, None in the others. A UserError that it
    raises is raised in every process, so that they all stop together instead of waiting for the first."""
    result, refusal = None, None
    if rank == 0:
        try:
            result = work()
        except UserError as error:
            refusal = str(error)
    if world > 1:
        shared = [refusal]
        dist.broadcast_object_list(shared, src=0)
        refusal = shared[0]
    if refusal:
        raise UserError(refusal)
    return result


@contextlib.contextmanager
def only_writer(out: Path, rank: int, world: int):
    """Hold OUT/train.lock while training, so that a second run on the same --out is refused, not left to crash.
    The first process takes it, and tells the others whether it could before any of them goes on."""

    made = not out.exists()  # a folder this run makes, and removes again if it ends with nothing else in it

    def take_lock():
        check_writable(out, "--out")
        try:
            lock = open(out / "train.lock", "w")
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another train.py is writing to {out}; wait for it to finish, or pass another --out")
        except OSError as error:
            raise UserError(f"cannot open the lock file {out / 'train.lock'} ({error.strerror}); remove what is there")
        return lock

    lock = on_first(take_lock, rank, world)
    try:
        yield
    finally:
        if lock:
            with contextlib.suppress(OSError):
                if made and [p.name for p in out.iterdir()] == ["train.lock"]:  # refused before it wrote anything
                    (out / "train.lock").unlink()
                    out.rmdir()
            lock.close()


class StopRequest:
    """Ctrl-C (SIGINT), SIGTERM (a cluster scheduler's, or torchrun's when it stops) or SIGHUP (the terminal closed)
    while training: noted here and acted on after the step under way, so that the checkpoint holds whole steps. A
    second signal stops at once."""

    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self, rank: int):
        self.name, self.rank = None, rank
        self.before = {s: signal.signal(s, self.note) for s in self.signals}

    def note(self, signum, frame):
        self.name = signal.Signals(signum).name
        self.restore()
        if self.rank == 0:  # said at once, since a sample grid under way may take minutes
            Terminal().write(f"\n{self.name}: stopping after the step under way, with a checkpoint; a second "
                             f"{self.name} stops at once, without one\n")

    def restore(self):
        for s, handler in self.before.items():
            signal.signal(s, handler)

    def next_batch(self, batches, world: int, device: torch.device) -> dict | None:
        """The next batch, or None where any process was asked to stop: all stop together, before the same step,
        since one that went on alone would wait for the others for ever."""
        try:
            batch = next(batches)
        except RuntimeError:
            if not self.name:  # a data-loading worker stopped by the same Ctrl-C is no error of its own
                raise
            batch = None
        return None if in_any_process(self.name is not None, world, device) else batch


def in_any_process(flag: bool, world: int, device: torch.device) -> bool:
    """Whether flag holds in some process: every process gets the same answer (a collective under torchrun)."""
    if world == 1:
        return flag
    flags = torch.tensor(float(flag), device=device)
    dist.all_reduce(flags)
    return flags.item() > 0


def mean_over_processes(values: torch.Tensor, world: int) -> torch.Tensor:
    """The mean of each value over the processes, the same in every process (a collective under torchrun)."""
    if world > 1:
        dist.all_reduce(values)
        values = values / world
    return values


class LossMeter:
    """This process's training losses: those of the last 50 steps, which a checkpoint's loss must not far exceed,
    and those since the last log line, whose mean the line reports (as DiT's). Also examples a second."""

    def __init__(self, recent_loss: float | None):
        self.recent = collections.deque([] if recent_loss is None else [recent_loss], maxlen=50)
        self.window = []  # since the last log line, or since the resume
        self.times = collections.deque([(time.perf_counter(), 0)], maxlen=21)  # (time, examples) after each step

    def add(self, loss: float, examples: int) -> None:
        if math.isfinite(loss):  # not the loss of an fp16 step that the scaler skipped
            self.recent.append(loss)
            self.window.append(loss)
        self.times.append((time.perf_counter(), self.times[-1][1] + examples))

    @property
    def speed(self) -> float:
        """Examples a second over the last 20 steps."""
        (start, before), (end, after) = self.times[0], self.times[-1]
        return (after - before) / (end - start)

    def window_mean(self, world: int, device: torch.device) -> float:
        """The mean loss since the last log line over every process (a collective), and a new window."""
        mean = torch.tensor(sum(self.window) / len(self.window) if self.window else math.nan, device=device)
        self.window = []
        return mean_over_processes(mean, world).item()


#################################################################################
#                                     Steps                                     #
#################################################################################

class ResumableSampler(DistributedSampler):
    """DistributedSampler that starts its epoch after the first `skip` examples of this process's share."""

    skip = 0

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.skip, None)

    def __len__(self):
        return super().__len__() - self.skip


class Batches:
    """The batches of this process's share of each batch, for ever: a new order every epoch, the same in every
    process. `position` (epoch, examples of it trained on by all processes) goes into the checkpoint, so that a
    resumed run goes on where the epoch stopped. The loader draws its workers' seeds from a generator of its own,
    so that it takes nothing from the steps' seeds."""

    def __init__(self, dataset, batch_size: int, workers: int, seed: int, rank: int, world: int, device: torch.device,
                 position: tuple[int, int] = (0, 0)):
        self.sampler = ResumableSampler(dataset, num_replicas=world, rank=rank, seed=seed)
        self.loader = DataLoader(dataset, batch_size=batch_size // world, sampler=self.sampler, num_workers=workers,
                                 drop_last=len(dataset) >= batch_size, pin_memory=device.type == "cuda",
                                 persistent_workers=workers > 0, generator=torch.Generator().manual_seed(seed))
        self.world, self.position, self.batches = world, tuple(position), None
        if len(dataset) < batch_size:
            warn(f"--batch-size {batch_size} is more than the {len(dataset)} examples of the data: each step takes all of them")

    def __next__(self) -> dict:
        epoch, seen = self.position
        if self.batches is None:
            self.sampler.set_epoch(epoch)
            self.sampler.skip = seen // self.world
            self.batches = iter(self.loader)
        batch = next(self.batches, None)
        if batch is None:  # the epoch is over
            self.position, self.batches = (epoch + 1, 0), None
            return next(self)
        self.position = (epoch, seen + len(batch["x"]) * self.world)
        return batch


def preview_conditions(dataset, count: int) -> tuple[torch.Tensor | None, list[str] | None]:
    """What train.py's sample grids show: the classes in order, an equal share of the grid each, row by row; or
    the first captions."""
    labels = torch.arange(count) * len(dataset.class_names) // count if dataset.class_names else None
    captions = [dataset.captions[i % len(dataset.captions)] for i in range(count)] if dataset.captions else None
    return labels, captions


def derived_seed(*numbers: int) -> int:
    """A seed made from numbers, the same in every process and every run (Python hashes tuples of ints alike):
    (seed, rank, step) seeds a training step's random numbers, so that a resumed run draws what one that never
    stopped drew, and (seed, i) seeds sample i's noise."""
    return hash(numbers) % 2 ** 63


TIME_SAMPLING = ("uniform", "logit-normal")  # train.py's --time-sampling


def draw_times(batch: int, time_sampling: str, device: torch.device) -> torch.Tensor:
    """Training's flow times t, (B,): uniform on [0, 1], as in SiT and the paper, or logit-normal, t = sigmoid(a)
    with a ~ N(0, 1), as SD3 draws them (arXiv 2403.03206), which samples the middle times more often."""
    if time_sampling == "uniform":
        return torch.rand(batch, device=device)
    return torch.randn(batch, device=device).sigmoid()


FAR_ABOVE = 10  # a checkpoint whose loss is this many times the recent training loss is a diverged one


@torch.no_grad()
def check_weights_are_sane(networks: nn.ModuleDict, encode, batch: dict, recent_losses, step: int, world: int,
                           device: torch.device, autocast, kept: str, time_sampling: str) -> None:
    """Stop with the divergence sentence where the weights are not finite, or where their loss on the last batch
    is far above the recent training loss: one step at a huge learning rate can ruin weights before any loss or
    gradient is NaN. Every process checks its share; their random numbers are left as they were."""
    finite = all(torch.isfinite(p).all() for p in networks.parameters())
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), autocast:
        y = batch["y"].to(device) if "y" in batch else None
        context, context_mask = encode(batch["caption"]) if "caption" in batch else (None, None)
        x = batch["x"].to(device)
        loss = flow_loss(networks["zigma"], x, y, context, context_mask, drop_prob=0.0,
                         t=draw_times(len(x), time_sampling, device))
    reference = torch.tensor(sum(recent_losses) / len(recent_losses), device=device)
    found = torch.stack([loss.float(), torch.tensor(float(finite), device=device), reference])  # (3,)
    # The means over the processes: every process decides on the same numbers
    loss, finite, reference = mean_over_processes(found, world).tolist()
    if finite < 1 or not loss <= FAR_ABOVE * reference:
        raise UserError(f"training diverged at step {step}: the loss of its weights is {loss:.4g}, against {reference:.4g} "
                        f"over the last steps" + (", and some weights are NaN or infinite" if finite < 1 else "") + f"; {kept}")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The dtype that --precision asks autocast for, or None for float32. auto: bf16 on a GPU that has it, else
    fp16 (with a gradient scaler in training), as nanoGPT picks; float32 on a CPU or a Mac."""
    if precision == "auto":
        if device.type != "cuda":
            return None
        precision = "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def precision_name(dtype: torch.dtype | None) -> str:
    return {torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast", None: "float32"}[dtype]


#################################################################################
#                                   Run files                                   #
#################################################################################

def trim_log(log: Path, step: int) -> None:
    """Keep the lines of log.jsonl up to step: a run resumed from an earlier checkpoint logs the later steps again,
    and a fresh run (step 0) starts an empty log. A line cut short (by a full disk, say) is dropped."""
    if log.exists():
        lines = []
        for line in log.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError, TypeError, KeyError):
                if json.loads(line)["step"] <= step:
                    lines.append(line)
        written_atomically(log, lambda temporary: temporary.write_text("".join(line + "\n" for line in lines)))


def tensorboard_writer(folder: Path | None):
    """torch.utils.tensorboard's SummaryWriter for folder, or one sentence where tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard")
    return SummaryWriter(str(folder)) if folder is not None else None


class RunLog:
    """log.jsonl, a line of scalars every --log-every steps, and with --tensorboard the same scalars and each
    sample grid in OUT/tensorboard. A full disk is one sentence."""

    def __init__(self, out: Path, step: int, tensorboard: bool):
        self.path = out / "log.jsonl"
        trim_log(self.path, step)
        self.tensorboard = tensorboard_writer(out / "tensorboard") if tensorboard else None

    def scalars(self, step: int, values: dict) -> None:
        try:
            with open(self.path, "a") as f:
                finite = {name: value if math.isfinite(value) else None for name, value in values.items()}
                f.write(json.dumps({"step": step, **finite}) + "\n")  # strict JSON: null, not NaN or Infinity
        except OSError as error:
            raise UserError(f"could not write {self.path}: {error.strerror or error}")
        for name, value in values.items() if self.tensorboard else ():
            self.tensorboard.add_scalar(name, value, step)

    def images(self, step: int, samples: torch.Tensor) -> None:
        """Images (B, 3, H, W) in [-1, 1] as one grid; of clips (B, T, 3, H, W), the first frames."""
        if self.tensorboard:
            images = (samples if samples.dim() == 4 else samples[:, 0]).float().clamp(-1, 1) * 0.5 + 0.5
            self.tensorboard.add_image("samples", make_grid(images, nrow=math.ceil(math.sqrt(len(images)))), step)

    def close(self) -> None:
        if self.tensorboard:
            self.tensorboard.close()


def save_checkpoint(checkpoint: dict, path: Path, keep: int) -> None:
    """Write the checkpoint atomically. With keep > 0, also as ckpt_STEP.pt (a hard link: no more disk), keeping
    only the last `keep` of those up to this step. Those of later steps, left by an earlier run in the same
    folder, stay."""
    save_atomically(checkpoint, path)
    if not keep:
        return
    numbered = path.with_name(f"{path.stem}_{checkpoint['step']:07d}{path.suffix}")
    numbered.unlink(missing_ok=True)
    try:
        os.link(path, numbered)
    except OSError:  # a file system without hard links
        written_atomically(numbered, lambda temporary: temporary.write_bytes(path.read_bytes()))
    numbered_by_step = {}
    for other in path.parent.glob(f"{path.stem}_*{path.suffix}"):
        step = other.stem.removeprefix(f"{path.stem}_")
        if step.isdigit() and int(step) <= checkpoint["step"]:
            numbered_by_step[int(step)] = other
    for step in sorted(numbered_by_step)[:-keep]:  # by number: step 10,000,000 comes after 9,999,999
        numbered_by_step[step].unlink()


#################################################################################
#                                    Sampling                                   #
#################################################################################

GRID_LIMIT = 256  # samples in the grid image; --out-dir takes any number


def check_sampling_arguments(args: argparse.Namespace) -> argparse.Namespace:
    """One sentence for an option out of range or without what it needs, before the checkpoint is read."""
    if args.sample_steps is not None and args.method == "dopri5":
        raise UserError("--sample-steps applies to --method euler and heun: dopri5 picks its own steps; leave it out")
    args.sample_steps = 50 if args.sample_steps is None else args.sample_steps
    for flag, value in (("--num-samples", args.n), ("--sample-steps", args.sample_steps), ("--batch-size", args.batch_size)):
        if value < 1:
            raise UserError(f"{flag} must be 1 or more, not {value}")
    if args.sample_steps > MAX_ODE_STEPS:
        raise UserError(f"--sample-steps must be {MAX_ODE_STEPS} or less, not {args.sample_steps}")
    if not 0 <= args.seed < 2 ** 63:
        raise UserError(f"--seed must be between 0 and 2^63 - 1, not {args.seed}")
    if args.n > GRID_LIMIT and args.out_dir is None and args.npz is None and args.fid is None:  # FID uses them all
        raise UserError(f"--num-samples {args.n}: the grid holds the first {GRID_LIMIT} samples; pass --out-dir or --npz "
                        f"to keep them all, --fid to measure them, or --num-samples {GRID_LIMIT} or fewer")
    if args.fid is not None and args.out_dir is not None and args.out_dir.resolve().is_relative_to(args.fid.resolve()):
        raise UserError(f"--out-dir {args.out_dir} is inside --fid {args.fid}: the samples would count as real images; "
                        f"pass an --out-dir outside it")
    if args.fid is not None and args.n < 2:
        raise UserError(f"--fid needs 2 samples or more, and thousands to mean much, not --num-samples {args.n}")
    if args.cfg is not None and not 0 <= args.cfg < math.inf:
        raise UserError(f"--cfg must be 0 or more (1 is no guidance) and finite, not {args.cfg}")
    for name, default in (("rtol", 1e-3), ("atol", 1e-6)):
        value = getattr(args, name)
        if value is not None and args.method != "dopri5":
            raise UserError(f"{option(name)} applies to --method dopri5 only: add it, or leave {option(name)} out")
        if value is not None and not 0 < value < 1:
            raise UserError(f"{option(name)} must be between 0 and 1, not {value}")
        setattr(args, name, default if value is None else value)
    if args.method == "dopri5":
        try:
            import torchdiffeq  # noqa: F401
        except ImportError:
            raise UserError("--method dopri5 needs the torchdiffeq package: pip install torchdiffeq")
    if args.npz is not None and args.npz.suffix != ".npz":
        raise UserError(f"--npz {args.npz}: name a file ending in .npz")
    if args.ckpt.is_dir():
        args.ckpt = args.ckpt / "ckpt.pt"  # a training run's --out folder
    return args


def output_path(args, video: bool) -> Path:
    """The grid's file, checked before any sampling with the other outputs: an extension PIL writes, in a folder that
    exists or is made now."""
    grid = args.grid or Path("samples.gif" if video else "samples.png")
    allowed = [".gif"] if video else sorted(IMAGE_EXTENSIONS - {".gif"})
    if grid.is_dir():
        raise UserError(f"--grid {grid} is a folder; name a file in it, or use --out-dir for one file per sample")
    if grid.suffix.lower() not in allowed:
        raise UserError(f"--grid {grid}: write {'clips' if video else 'images'} to a file ending in {', '.join(allowed)}")
    check_writable(grid.parent, "--grid's folder")
    if args.out_dir is not None:
        check_writable(args.out_dir, "--out-dir")
        earlier = sorted(args.out_dir.glob("[0-9][0-9][0-9][0-9][0-9][0-9].*"))  # as sample.py names its files
        if earlier:  # some would be overwritten, and the rest mixed with the new ones
            raise UserError(f"--out-dir {args.out_dir} already holds {plural(len(earlier), 'sample')} ({earlier[0].name} "
                            f"first), which would be overwritten or mixed with these; name a new or empty folder")
    for name in ("npz", "fid"):
        if getattr(args, name) is not None and video:
            raise UserError(f"{args.ckpt} is a video model; --{name} is for images")
    if args.npz is not None:
        check_writable(args.npz.parent, "--npz's folder")
        if args.npz.exists():  # it may hold 50,000 samples of another run
            raise UserError(f"--npz {args.npz} already exists; name a new file, or remove it")
    return grid


class Conditions:
    """What each sample is drawn for: the class of --class (by name or index), else every class in turn; the
    captions of --prompt and --prompts, in turn; or nothing, for an unconditional model. And the guidance scale:
    --cfg, else GUIDANCE_SCALE where there is a class or caption to guide towards."""

    def __init__(self, args, conditioning: dict):
        class_names, self.label, self.prompts = conditioning["class_names"], None, None
        if class_names is None and args.class_ is not None:
            raise UserError(f"{args.ckpt} was trained without classes; leave out --class")
        if class_names is not None and args.class_ is not None:
            if args.class_ in class_names:
                self.label = class_names.index(args.class_)
            elif re.fullmatch(r"[0-9]+", args.class_) and int(args.class_) < len(class_names):
                self.label = int(args.class_)
            else:
                raise UserError(f"unknown class {args.class_!r}; the classes are {', '.join(class_names)} "
                                f"(or 0 to {len(class_names) - 1})")
        self.classes = len(class_names) if class_names else 0
        prompts = list(args.prompt or [])
        if args.prompts:
            if not args.prompts.is_file():
                raise UserError(f"--prompts {args.prompts} is not a file")
            prompts += [line.strip() for line in read_text(args.prompts).splitlines() if line.strip()]
        captioned = bool(conditioning["vocabulary"] or conditioning["text_encoder"])
        if prompts and not captioned:
            given = " and ".join(name for name, value in (("--prompt", args.prompt), ("--prompts", args.prompts)) if value)
            raise UserError(f"{args.ckpt} was trained without captions; leave out {given}")
        if conditioning["vocabulary"]:
            unknown = sorted({word for prompt in prompts for word in CaptionEncoder.words(prompt)}
                             - set(conditioning["vocabulary"]))
            if unknown:
                warn(f"the model never saw the words {', '.join(unknown)} in training; it reads them as 'unknown'")
            for prompt in prompts:
                if not CaptionEncoder.words(prompt):
                    warn(f"the prompt {prompt!r} has no words; it samples the empty caption")
        self.prompts = prompts or None
        guided = bool(self.classes or self.prompts)
        if args.cfg not in (None, 1) and not guided:
            raise UserError("--cfg guides towards a prompt: add --prompt, or leave out --cfg" if captioned else
                            f"{args.ckpt} was trained without classes or captions, so --cfg has nothing to guide "
                            f"towards; leave it out")
        self.cfg_scale = args.cfg if args.cfg is not None else GUIDANCE_SCALE if guided else 1.0
        if captioned and not self.prompts:
            print(f"{args.ckpt} was trained on captions; without --prompt its samples are not conditioned on one")

    def labels(self, indices: range, device: torch.device) -> torch.Tensor | None:
        if not self.classes:
            return None
        if self.label is None:  # every class in turn
            return torch.tensor([i % self.classes for i in indices], device=device)
        return torch.full((len(indices),), self.label, device=device)

    def captions(self, indices: range) -> list[str] | None:
        return [self.prompts[i % len(self.prompts)] for i in indices] if self.prompts else None


def vae_for(args, checkpoint: dict, device: torch.device):
    """The VAE that decodes a latent checkpoint's samples (the one it names, or --vae where that has moved), or
    None for a pixel checkpoint."""
    trained = checkpoint.get("vae")
    if args.vae and not trained:
        raise UserError(f"{args.ckpt} was trained on pixels, not latents; leave out --vae")
    if not trained:
        return None
    try:
        return VAE(args.vae or trained, device)
    except UserError as error:
        if args.vae:
            raise
        raise UserError(f"{error}; {args.ckpt} was trained with it: where it has moved, pass --vae PATH")


def sample_noise(seed: int, indices: range, shape: tuple, device: torch.device) -> torch.Tensor:
    """The noise of samples `indices`, (len(indices), *shape): sample i's from a seed of its own, from (seed, i),
    so that any number of processes draws the same samples."""
    return torch.stack([torch.randn(shape, generator=torch.Generator(device).manual_seed(derived_seed(seed, i)),
                                    device=device) for i in indices])


def process_shares(n: int, batch_size: int, rank: int, world: int):
    """For each batch of the n samples, its first sample and this process's share of it: a range of sample
    indices. The shares have ceil(batch_size / world) samples, but the last processes', which may have fewer or
    none."""
    share = math.ceil(batch_size / world)
    for first in range(0, n, batch_size):
        start = min(first + rank * share, n)
        yield first, range(start, min(start + share, first + batch_size, n))


def gather(samples: torch.Tensor, world: int) -> torch.Tensor | None:
    """Every process's samples, in rank order, on the first process (None on the others)."""
    if world == 1:
        return samples
    shares = [None] * world if dist.get_rank() == 0 else None
    dist.gather_object(samples.cpu(), shares, dst=0)
    return torch.cat([share for share in shares if len(share)]) if shares else None


def write_npz(path: Path, **arrays) -> None:
    """np.savez, written atomically."""
    def write(temporary: Path):
        with open(temporary, "wb") as f:
            np.savez(f, **arrays)
    written_atomically(path, write)


def sample_adaptive(model, noise: torch.Tensor, y=None, context=None, context_mask=None, cfg_scale: float = 1.0,
                    rtol: float = 1e-3, atol: float = 1e-6) -> tuple[torch.Tensor, int]:
    """zigma.sample's ODE, integrated by torchdiffeq's adaptive dopri5 (as SiT and the official code evaluate);
    returns the samples and the number of model calls."""
    from torchdiffeq import odeint

    calls = 0

    def velocity(t, x_t):
        nonlocal calls
        calls += 1
        return guided_velocity(model, x_t, t.expand(x_t.shape[0]), y, context, context_mask, cfg_scale)

    with torch.no_grad():
        ends = torch.tensor([0.0, 1.0], device=noise.device)
        return odeint(velocity, noise, ends, method="dopri5", rtol=rtol, atol=atol)[-1], calls


class CountedCalls(nn.Module):
    """The model, moving a progress bar on by one every calls_per_step calls: a bar that counts ODE steps."""

    def __init__(self, model: nn.Module, progress, calls_per_step: int):
        super().__init__()
        self.model, self.progress, self.calls_per_step, self.calls = model, progress, calls_per_step, 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        if self.calls % self.calls_per_step == 0:
            self.progress.update()
        return self.model(*args, **kwargs)


#################################################################################
#                                      FID                                      #
#################################################################################

FID_FEATURES = 2048  # torchmetrics' FID network: Inception-v3's 2048 pooled features. The tests put a small one here.


def to_bytes(images: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] as uint8 (B, 3, H, W), rounded as save_samples rounds them into PNGs."""
    return ((images.float().clamp(-1, 1) * 0.5 + 0.5) * 255 + 0.5).clamp(0, 255).byte()


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    """|mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), in float64: FID from two feature statistics.
    The trace of the root is that of (R sigma2 R)^(1/2) with R = sigma1^(1/2), a symmetric matrix's eigenvalues."""
    mu1, sigma1, mu2, sigma2 = (x.double() for x in (mu1, sigma1, mu2, sigma2))
    values, vectors = torch.linalg.eigh(sigma1)
    root = vectors @ values.clamp_min(0).sqrt().diag() @ vectors.T  # sigma1^(1/2)
    cross = torch.linalg.eigvalsh(root @ sigma2 @ root).clamp_min(0).sqrt().sum()  # tr (sigma1 sigma2)^(1/2)
    return ((mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * cross).item()


class Statistics:
    """The mean and covariance of feature vectors, added batch by batch, in float64."""

    def __init__(self):
        self.count, self.total, self.products = 0, 0.0, 0.0

    def add(self, features: torch.Tensor) -> None:  # (B, F)
        features = features.double().cpu()
        self.count += len(features)
        self.total = self.total + features.sum(0)
        self.products = self.products + features.T @ features

    def mean_and_covariance(self) -> tuple[torch.Tensor, torch.Tensor]:
        mu = self.total / self.count
        return mu, (self.products - self.count * torch.outer(mu, mu)) / (self.count - 1)


def statistics_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "zigma" / "fid"


class FID:
    """FID between the samples and real images: the images of a folder, resized and centre-cropped to the samples'
    size as train.py reads them, or the statistics (mu, sigma) of a .npz file, as pytorch-fid's --save-stats and
    ADM's reference batches hold them. Both sets are rounded to 8 bits as PNGs are. A folder's statistics are cached
    (keyed by its path, its files' count and latest time, the size and the features), so that a second call costs
    nothing. Everything that can fail fast (the folder, the extras, the download) fails when it is built."""

    def __init__(self, source: Path, device: torch.device):
        self.source, self.device, self.samples, self.real = source, device, Statistics(), None
        if source.is_file() and source.suffix == ".npz":
            try:
                with np.load(source) as saved:
                    self.real = torch.from_numpy(saved["mu"]).double(), torch.from_numpy(saved["sigma"]).double()
            except (OSError, ValueError, KeyError) as error:
                raise UserError(f"--fid {source} is not a .npz of FID statistics with mu and sigma ({error})")
            self.used = "the statistics in"
        elif source.is_dir():
            self.folder = ImageFolder(source, image_size=1, option="--fid")  # its transform is set at the samples' size
            if len(self.folder) < 2:
                raise UserError(f"--fid {source} holds one image; FID needs two or more, and thousands to mean much")
        else:
            raise UserError(f"--fid {source} is not a folder of images, nor a .npz of FID statistics")
        try:
            from torchmetrics.image.fid import FrechetInceptionDistance
            self.network = FrechetInceptionDistance(feature=FID_FEATURES).inception.to(device)
        except ModuleNotFoundError as error:  # torchmetrics, or the torch-fidelity it needs for Inception
            raise UserError(f"--fid needs torchmetrics and torch-fidelity ({error}): pip install torchmetrics torch-fidelity")
        except (OSError, RuntimeError) as error:  # the weights' download (no network, a proxy), or a corrupt file
            raise UserError(f"--fid: the Inception weights could not be fetched ({error}); they download once, on first "
                            f"use, and need the network then")

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) in [-1, 1] -> (B, F)
        return self.network(to_bytes(images).to(self.device)).reshape(len(images), -1)

    def add_samples(self, samples: torch.Tensor) -> None:
        self.samples.add(self.features(samples))
        self.size = samples.shape[-1]

    def compute(self, batch: int = 64) -> float:
        """The FID of the samples added so far against the real statistics, computed (or read from the cache) now."""
        if self.real is None:
            self.real = self.folder_statistics(batch)
        return frechet_distance(*self.samples.mean_and_covariance(), *self.real)

    def folder_statistics(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        files = self.folder.files
        key = json.dumps([str(self.source.resolve()), len(files), max(p.stat().st_mtime_ns for p in files), self.size,
                          repr(FID_FEATURES)])
        cache = statistics_cache() / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.npz"
        if cache.is_file():
            with contextlib.suppress(OSError, ValueError, KeyError), np.load(cache) as saved:
                self.used = f"the {int(saved['count'])} images (statistics cached in {cache}) of"
                return torch.from_numpy(saved["mu"]), torch.from_numpy(saved["sigma"])
        self.folder.transform = image_transform(self.size)
        statistics, images = Statistics(), []
        for i in tqdm(range(len(self.folder)), desc="FID: real images", file=Terminal()):
            image = self.folder.decoded(i)  # (1, 3, H, W), or None (with a warning) where the file does not decode
            if image is not None:
                images.append(image)
            if images and (len(images) == batch or i == len(self.folder) - 1):
                statistics.add(self.features(torch.cat(images)))
                images = []
        mu, sigma = statistics.mean_and_covariance()
        with contextlib.suppress(OSError, UserError):  # a cache that cannot be written is only slower next time
            cache.parent.mkdir(parents=True, exist_ok=True)
            write_npz(cache, mu=mu.numpy(), sigma=sigma.numpy(), count=statistics.count)
        self.used = f"the {statistics.count} images of"
        return mu, sigma
