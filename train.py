"""Train ZigMa with flow matching on a folder of images or clips, or on built-in synthetic data.

    python train.py                                      # built-in smiley faces; a tiny model, fine on a CPU
    python train.py --data ./faces --image-size 64 --model ZigMa-S/2 --steps 200000
    python train.py --data ./faces --image-size 64 --model ZigMa-S/2 --steps 400000   # resumes from out/ckpt.pt
    python train.py --frames 8                           # built-in moving shapes: video with the factorized scan
    python train.py --data ./clips --frames 16 --frame-stride 2 --video-scan sst
    python train.py --data ./pets --class-cond           # labels from the first-level subfolder names
    python train.py --data ./captioned --captions        # a caption in NAME.txt beside each NAME.png

    python train.py --data ./ffhq --image-size 256 --vae stabilityai/sd-vae-ft-ema --model ZigMa-B/2   # latent space
    torchrun --standalone --nproc_per_node 8 train.py --data ./faces --model ZigMa-B/2 --batch-size 256  # 8 GPUs

Everything goes to --out (default out/): ckpt.pt (model, EMA, optimizer, step, config, arguments, class
names or vocabulary, the VAE's name), samples_STEP.png or .gif (from the EMA weights), log.jsonl (the loss)
and, with --vae, latents.pt (the encoded data). Re-running a command resumes from OUT/ckpt.pt; a larger
--steps trains on. Sample from a checkpoint with sample.py. Under torchrun each process trains on its share of
every batch with DistributedDataParallel; the first writes the files.
"""

import signal
import sys

QUIET_START = signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C while torch imports: one line
if QUIET_START:
    signal.signal(signal.SIGINT, lambda *_: sys.exit("train.py: interrupted while starting; nothing was written"))

import argparse
import collections
import contextlib
import copy
import fcntl
import itertools
import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from data import (VAE, ArgumentParser, CaptionEncoder, ClipFolder, CPUThreads, ImageFolder, Latents, MovingShapes,
                  SmileyFaces, Terminal, UserError, build_networks, check_writable, checkpoint_config, load_checkpoint,
                  load_pretrained_text_encoder, load_weights, pick_device, plural, save_atomically, save_samples, warn,
                  written_atomically)
from zigma import PRESETS, TIME_SAMPLING, ZigMaConfig, flow_loss, fused_selective_scan, preset_config, sample

if QUIET_START:
    signal.signal(signal.SIGINT, signal.default_int_handler)  # from here on, Ctrl-C is a KeyboardInterrupt


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for ema_p, p in zip(ema.parameters(), model.parameters()):
        ema_p.lerp_(p, 1 - decay)


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="folder of images (or clips), searched recursively; default: built-in synthetic data")
    parser.add_argument("--out", type=Path, default=Path("out"), help="where checkpoint, samples and log go (default: out)")
    parser.add_argument("--model", choices=sorted(PRESETS), help="preset (default: ZigMa-Tiny, small enough for a CPU, with "
                        "the largest patch that leaves 8 x 8 tokens or more: Tiny/4 at 32 px, Tiny/2 at 16, Tiny/8 at 64)")
    parser.add_argument("--image-size", type=int, default=32, help="images are resized and cropped to this side (default: 32)")
    parser.add_argument("--scan", default="zigzag", choices=["zigzag", "sweep", "hilbert"],
                        help="the 2D paths: the paper's zigzag, a raster sweep, or generalized Hilbert curves (default: zigzag)")
    parser.add_argument("--scan-paths", type=int, default=8, choices=[1, 2, 8],
                        help="K: layer i reads path i mod K, the paper's Zigzag-1, -2 and -8 (default: 8)")
    parser.add_argument("--vae", metavar="NAME_OR_PATH", help="train in the latent space of this diffusers AutoencoderKL, "
                        "a hub name (stabilityai/sd-vae-ft-ema) or a local folder; --data is encoded once into OUT/latents.pt")
    video = parser.add_argument_group("video")
    video.add_argument("--frames", type=int, default=0, help="train on clips of this many frames (default: 0, images)")
    video.add_argument("--frame-stride", type=int, help="with --frames: take every this-many-th frame of a clip (default: 1)")
    video.add_argument("--video-scan", help="with --frames: the layer pattern, s spatial, t temporal, v whole clip; "
                       "'sst' is the paper's factorized scan, 'v' with --scan zigzag a 3D zigzag (default: sst)")
    conditioning = parser.add_argument_group("conditioning")
    conditioning.add_argument("--class-cond", action="store_true", help="condition on classes: the first-level subfolders of --data")
    conditioning.add_argument("--captions", action="store_true", help="condition on captions: NAME.txt beside each image NAME.png")
    conditioning.add_argument("--text-encoder", help="with --captions: 'learned' (built in) or a transformers model name or path, frozen (default: learned)")
    conditioning.add_argument("--cond-drop", type=float, default=0.1, help="probability of dropping the label or caption, for guidance (default: 0.1)")
    training = parser.add_argument_group("training")
    training.add_argument("--steps", type=int, default=2000, help="total optimizer steps; a larger value resumes a run (default: 2000)")
    training.add_argument("--batch-size", type=int, default=32,
                          help="examples per step, across all processes under torchrun: each takes its share (default: 32)")
    training.add_argument("--lr", type=float, help="AdamW learning rate, after the warm-up (default: 1e-3 for the Tiny "
                          "presets, measured on a CPU; 1e-4, the official ZigMa's, for the larger ones)")
    training.add_argument("--warmup", type=int, default=200, help="raise the learning rate linearly over this many first steps (default: 200)")
    training.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True,
                          help="flip images and clips left to right at random, as DiT does; --no-flip for digits, text "
                          "and anything else with a handedness (default: --flip)")
    training.add_argument("--time-sampling", default="logit-normal", choices=TIME_SAMPLING,
                          help="how t is drawn: logit-normal, more of it mid-path, or uniform on [0, 1] (default: logit-normal)")
    training.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default: 0)")
    training.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this (default: 1)")
    training.add_argument("--ema-decay", type=float, default=0.999, help="EMA decay, warmed up as min(decay, (1+step)/(10+step)) (default: 0.999)")
    training.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    training.add_argument("--device", help="cuda, mps or cpu (default: the first available)")
    training.add_argument("--compile", action="store_true", help="torch.compile the model: on a GPU it fuses the selective "
                          "scan's operations; on a CPU the scan stays uncompiled, and compiling takes a minute or more")
    training.add_argument("--grad-checkpointing", action="store_true",
                          help="recompute each block in the backward pass: less memory, about a third more time")
    training.add_argument("--workers", type=int, default=2, help="data-loading processes (default: 2)")
    progress = parser.add_argument_group("progress")
    progress.add_argument("--sample-every", type=int, default=500, help="save samples every this many steps (default: 500)")
    progress.add_argument("--sample-steps", type=int, default=50, help="Euler steps for those samples (default: 50)")
    progress.add_argument("--sample-cfg", type=float, default=4.0,
                          help="guidance scale of those samples, for a model with classes or captions (default: 4)")
    progress.add_argument("--ckpt-every", type=int, default=500, help="save the checkpoint every this many steps (default: 500)")
    progress.add_argument("--log-every", type=int, default=10, help="append the loss to log.jsonl every this many steps (default: 10)")
    return check_arguments(parser.parse_args(argv))


MAX_IMAGE_SIZE = 8192  # pixels a side: 1024 x 1024 latent cells, far past the paper's largest model
MAX_SAMPLE_STEPS = 10_000  # ODE steps: sample quality stops changing long before


def check_arguments(args: argparse.Namespace) -> argparse.Namespace:
    """One sentence for an option out of range, or one that does nothing without another; then the defaults that depend on others."""
    for name in ("image_size", "steps", "batch_size", "sample_every", "sample_steps", "ckpt_every", "log_every"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be 1 or more, not {getattr(args, name)}")
    for name, most in (("image_size", MAX_IMAGE_SIZE), ("sample_steps", MAX_SAMPLE_STEPS)):
        if getattr(args, name) > most:
            raise UserError(f"--{name.replace('_', '-')} must be {most} or less, not {getattr(args, name)}")
    for name in ("lr", "warmup", "weight_decay", "grad_clip", "ema_decay", "cond_drop", "sample_cfg"):
        if not math.isfinite(getattr(args, name) if getattr(args, name) is not None else 0):
            raise UserError(f"--{name.replace('_', '-')} must be a finite number, not {getattr(args, name)}")
    args.model = args.model or default_model(args.image_size // (8 if args.vae else 1))
    if args.lr is None:
        args.lr = 1e-3 if args.model.startswith("ZigMa-Tiny/") else 1e-4
    for name in ("lr", "grad_clip"):
        if not getattr(args, name) > 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, not {getattr(args, name)}")
    for name in ("cond_drop", "ema_decay"):
        if not 0 <= getattr(args, name) <= 1:
            raise UserError(f"--{name.replace('_', '-')} must be between 0 and 1, not {getattr(args, name)}")
    for name in ("weight_decay", "workers", "frames", "sample_cfg", "warmup"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be 0 or more, not {getattr(args, name)}")
    if not 0 <= args.seed < 2 ** 63:
        raise UserError(f"--seed must be between 0 and 2^63 - 1, not {args.seed}")
    patch = PRESETS[args.model]["patch_size"]
    if args.image_size % patch:
        raise UserError(f"--image-size {args.image_size} is not a multiple of {args.model}'s patch size {patch}")
    if args.out.exists() and not args.out.is_dir():
        raise UserError(f"--out {args.out} is a file; name a folder")
    if args.data is not None and args.out.resolve().is_relative_to(args.data.resolve()):
        raise UserError(f"--out {args.out} is inside --data {args.data}: its sample grids would become training images; "
                        f"pass an --out outside it")
    if not args.frames:
        for name in ("frame_stride", "video_scan"):
            if getattr(args, name) is not None:
                raise UserError(f"--{name.replace('_', '-')} applies to clips only: add --frames, or leave it out")
    if args.vae is not None and args.data is None:
        raise UserError("--vae needs --data: the built-in data is made for pixel space")
    if args.text_encoder is not None and not args.captions:
        raise UserError("--text-encoder applies to captions only: add --captions, or leave it out")
    if args.frame_stride is not None and args.frame_stride < 1:
        raise UserError(f"--frame-stride must be 1 or more, not {args.frame_stride}")
    if args.video_scan is not None and (not args.video_scan or set(args.video_scan) - set("stv")):
        raise UserError(f"--video-scan takes the letters s, t and v, not {args.video_scan!r}")
    args.frame_stride, args.video_scan = args.frame_stride or 1, args.video_scan or "sst"
    args.text_encoder = args.text_encoder or "learned"
    return args


def default_model(side: int) -> str:
    """The Tiny preset with the largest patch that leaves a grid of 8 x 8 tokens or more on an input of this side
    (pixels, or latent cells: a VAE's factor is 8), else patch 2. At equal time on a CPU, Tiny/4's 8 x 8 grid at 32
    px sampled as well as Tiny/2's 16 x 16 (README, Sample quality); a 4 x 4 grid leaves the zigzag little to order."""
    for patch in (8, 4, 2):
        if side % patch == 0 and side // patch >= 8:
            return f"ZigMa-Tiny/{patch}"
    return "ZigMa-Tiny/2"


def build_dataset(args) -> Dataset:
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


def build_conditioning(args, dataset) -> dict:
    """What the checkpoint keeps about the conditions: class names, caption vocabulary or encoder name."""
    conditioning = {"class_names": dataset.class_names if args.class_cond else None, "vocabulary": None, "text_encoder": None}
    if args.captions and args.text_encoder == "learned":
        conditioning["vocabulary"] = CaptionEncoder.build_vocabulary(dataset.captions)
    elif args.captions:
        conditioning["text_encoder"] = args.text_encoder
    return conditioning


def build_config(args, conditioning: dict, text_dim: int, vae: VAE | None) -> ZigMaConfig:
    """The model's config: a latent one (the VAE's channels, image size / its downsampling factor) with a VAE."""
    class_names = conditioning["class_names"]
    size, channels = (args.image_size // vae.factor, vae.channels) if vae else (args.image_size, 3)
    return preset_config(args.model, input_size=size, in_channels=channels, paths=args.scan, num_paths=args.scan_paths,
                         frames=args.frames, video_pattern=args.video_scan, num_classes=len(class_names) if class_names else 0,
                         context_dim=text_dim if args.captions else 0)


def parameter_groups(networks: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW's groups: weight decay on the weight matrices of linear, convolution and attention layers only, as in
    Mamba and nanoGPT; never on biases, embedding tables, positions, the null conditions, A_log or D."""
    matrices = []
    for module in networks.modules():
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            matrices.append(module.weight)
        elif isinstance(module, nn.MultiheadAttention):  # the caption encoder's query, key and value projections
            matrices.append(module.in_proj_weight)
    decayed = {id(p) for p in matrices}
    return [{"params": matrices, "weight_decay": weight_decay},
            {"params": [p for p in networks.parameters() if id(p) not in decayed], "weight_decay": 0.0}]


# What sets each field of the model's config, for the message when a resumed checkpoint differs.
MODEL_OPTIONS = ["model", "image_size", "vae", "scan", "scan_paths", "frames", "video_scan", "class_cond", "captions",
                 "text_encoder"]
# Options that may change when a run resumes: they take effect, and a line says so.
TRAINING_OPTIONS = ["data", "batch_size", "lr", "warmup", "time_sampling", "weight_decay", "grad_clip", "ema_decay",
                    "cond_drop", "flip"]


def as_option(name: str, value) -> str:
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return flag if value else f"no {flag}"
    return f"{flag} {value}"


def check_resumed_options(checkpoint: dict, path: Path, args) -> None:
    """Refuse to resume a checkpoint trained with other model options, naming the option; say which training options changed."""
    before, now = checkpoint.get("args", {}), saved_arguments(args)
    for name in MODEL_OPTIONS:
        if name in before and before[name] != now[name]:
            raise UserError(f"{path} was trained with {as_option(name, before[name])}, but this run has "
                            f"{as_option(name, now[name])}; pass the options it was trained with, or another --out")
    for name in TRAINING_OPTIONS:
        if name in before and before[name] != now[name]:
            print(f"resuming with {as_option(name, now[name])} (the checkpoint was trained with "
                  f"{as_option(name, before[name])})")


def check_resumed_model(checkpoint: dict, path: Path, config: ZigMaConfig, conditioning: dict) -> None:
    """Refuse to resume a checkpoint whose classes, caption words or model differ from what the options and data give."""
    classes_before, classes_now = checkpoint["conditioning"]["class_names"], conditioning["class_names"]
    if classes_before != classes_now:
        raise UserError(f"{path} was trained on the classes {', '.join(classes_before or ['none'])}, "
                        f"but --data has {', '.join(classes_now or ['none'])}; pass its data, or another --out")
    if checkpoint["conditioning"]["vocabulary"] != conditioning["vocabulary"]:
        raise UserError(f"the captions in --data use other words than those {path} was trained on; pass its data, or another --out")
    changed = [field for field, value in asdict(config).items() if checkpoint_config(checkpoint).get(field) != value]
    if changed:
        raise UserError(f"{path} holds a model with another {', '.join(changed)} than these options give; pass another --out")


def saved_arguments(args) -> dict:
    """The arguments as the checkpoint keeps them: paths as strings."""
    return {name: str(value) if isinstance(value, Path) else value for name, value in vars(args).items()}


def preview_conditions(dataset, count: int) -> tuple[torch.Tensor | None, list[str] | None]:
    """The classes in order, an equal share of the grid each, row by row; or the first captions: what the sample grids show."""
    labels = torch.arange(count) * len(dataset.class_names) // count if dataset.class_names else None
    captions = [dataset.captions[i % len(dataset.captions)] for i in range(count)] if dataset.captions else None
    return labels, captions


def start_processes(args) -> tuple[int, int, torch.device]:
    """This process's rank, the number of processes, and its device. Under torchrun (WORLD_SIZE > 1): the
    process group (nccl on CUDA, gloo on the CPU), one GPU per process; run alone: rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    device = pick_device(args.device)
    if world == 1:
        return 0, 1, device
    if device.type not in ("cuda", "cpu"):
        raise UserError(f"several processes run on CUDA or the CPU, not {device.type}")
    if args.batch_size % world:
        raise UserError(f"--batch-size {args.batch_size} does not split evenly across {world} processes")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, device


class ResumableSampler(DistributedSampler):
    """DistributedSampler that starts its epoch after the first `skip` examples of this process's share, so that a
    resumed run goes on where the epoch stopped instead of reading its start again."""

    skip = 0

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.skip, None)

    def __len__(self):
        return super().__len__() - self.skip


class StopRequest:
    """Ctrl-C (SIGINT), SIGTERM (a cluster scheduler's, or torchrun's when it stops) or SIGHUP (the terminal closed)
    while training: noted here and acted on after the step under way, so that the checkpoint holds whole steps. A
    second signal stops at once."""

    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self):
        self.name = None
        self.before = {s: signal.signal(s, self.note) for s in self.signals}

    def note(self, signum, frame):
        self.name = signal.Signals(signum).name
        self.restore()

    def restore(self):
        for s, handler in self.before.items():
            signal.signal(s, handler)


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
        loss = flow_loss(networks["zigma"], batch["x"].to(device), y, context, context_mask, drop_prob=0.0,
                         time_sampling=time_sampling)
    found = torch.stack([loss.float(), torch.tensor(float(finite), device=device)])  # (2,)
    if world > 1:
        dist.all_reduce(found)
        found /= world
    loss, finite = found.tolist()
    reference = sum(recent_losses) / len(recent_losses)
    if finite < 1 or not loss <= FAR_ABOVE * reference:
        raise UserError(f"training diverged at step {step}: the loss of its weights is {loss:.4g}, against {reference:.4g} "
                        f"over the last steps" + (", and some weights are NaN or infinite" if finite < 1 else "") + f"; {kept}")


def step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of one step's random numbers (data order aside): the same after a resume as in a run that never
    stopped. (Python hashes tuples of ints alike in every process.)"""
    return hash((seed, rank, step)) % 2 ** 63


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


def append_log(log: Path, line: dict) -> None:
    """One line of log.jsonl, or one sentence when the disk is full."""
    try:
        with open(log, "a") as f:
            f.write(json.dumps(line) + "\n")
    except OSError as error:
        raise UserError(f"could not write {log}: {error.strerror or error}")


@contextlib.contextmanager
def only_writer(out: Path, rank: int, world: int):
    """Hold OUT/train.lock while training, so that a second run on the same --out is refused, not left to crash.
    The first process takes it, and tells the others whether it could before any of them goes on."""
    refusal, lock = None, None
    if rank == 0:
        try:
            check_writable(out, "--out")
            lock = open(out / "train.lock", "w")
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except UserError as error:
            refusal = str(error)
        except BlockingIOError:
            refusal = f"another train.py is writing to {out}; wait for it to finish, or pass another --out"
        except OSError as error:
            refusal = f"cannot open the lock file {out / 'train.lock'} ({error.strerror}); remove what is there"
    if world > 1:
        shared = [refusal]
        dist.broadcast_object_list(shared, src=0)
        refusal = shared[0]
    if refusal:
        raise UserError(refusal)
    try:
        yield
    finally:
        if lock:
            lock.close()


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = start_processes(args)
    try:
        with only_writer(args.out, rank, world):
            train(args, rank, world, device)
    except UserError:
        if rank > 0:
            sys.exit(1)  # the first process says what happened
        raise
    finally:
        if world > 1:
            dist.destroy_process_group()


def train(args, rank: int, world: int, device: torch.device):
    if rank > 0:
        sys.stdout = open(os.devnull, "w")  # the first process speaks for all; warnings still reach stderr
    torch.manual_seed(args.seed)  # the same initial weights in every process
    ckpt_path = args.out / "ckpt.pt"
    checkpoint = load_checkpoint(ckpt_path) if ckpt_path.exists() else None  # resume
    if checkpoint is not None:
        check_resumed_options(checkpoint, ckpt_path, args)
        if checkpoint["step"] >= args.steps:
            print(f"{ckpt_path} is already at step {checkpoint['step']}; pass a larger --steps to train on")
            return
    vae = VAE(args.vae, device) if args.vae else None  # frozen, kept out of the checkpoint; only its name is saved
    if vae and args.image_size % (vae.factor * PRESETS[args.model]["patch_size"]):
        raise UserError(f"--image-size {args.image_size} is not a multiple of {vae.factor * PRESETS[args.model]['patch_size']}, "
                        f"the VAE's downsampling factor {vae.factor} times {args.model}'s patch size")
    dataset = build_dataset(args)
    conditioning = build_conditioning(args, dataset)
    pretrained = load_pretrained_text_encoder(conditioning["text_encoder"])  # a frozen encoder, kept out of the checkpoint
    text_dim = pretrained.dim if pretrained else PRESETS[args.model]["dim"]
    config = build_config(args, conditioning, text_dim, vae)
    if vae:  # encoded once, each process its share, then cached
        dataset = Latents(dataset, vae, args.image_size, args.out / "latents.pt", device, rank, world)
    if len(dataset) < args.batch_size:
        warn(f"--batch-size {args.batch_size} is more than the {len(dataset)} examples of the data: each step takes all of them")
    # Every epoch a new order (set_epoch), the same in every process, each of which takes its share of each batch.
    # The loader draws its workers' seeds from a generator of its own, so that it takes nothing from the steps' seeds.
    sampler = ResumableSampler(dataset, num_replicas=world, rank=rank, seed=args.seed)
    loader = DataLoader(dataset, batch_size=args.batch_size // world, sampler=sampler, num_workers=args.workers,
                        drop_last=len(dataset) >= args.batch_size, pin_memory=device.type == "cuda",
                        persistent_workers=args.workers > 0, generator=torch.Generator().manual_seed(args.seed))

    networks = build_networks(config, conditioning).to(device)
    ema = copy.deepcopy(networks).requires_grad_(False)  # the EMA weights are what we sample from
    if pretrained:
        pretrained.to(device)
    optimizer = torch.optim.AdamW(parameter_groups(networks, args.weight_decay), lr=args.lr)
    step, epoch, seen = 0, 0, 0  # seen: the examples of this epoch trained on, by all processes
    saved = "no checkpoint was written"

    if checkpoint is not None:
        check_resumed_model(checkpoint, ckpt_path, config, conditioning)
        load_weights(networks, checkpoint["model"], ckpt_path, "model")
        load_weights(ema, checkpoint["ema"], ckpt_path, "ema")
        chosen = [{"lr": group["lr"], "weight_decay": group["weight_decay"]} for group in optimizer.param_groups]
        if "optimizer" not in checkpoint:  # stripped for release: the weights alone
            warn(f"{ckpt_path} holds no optimizer state; AdamW's moments start afresh")
        else:
            try:
                optimizer.load_state_dict(checkpoint["optimizer"])
            except ValueError:
                raise UserError(f"{ckpt_path} holds the optimizer of an older train.py; sample from it, or train in another --out")
        for group, values in zip(optimizer.param_groups, chosen):
            group.update(values)  # this run's --lr and --weight-decay, not the checkpoint's
        step = checkpoint["step"]
        epoch, seen = checkpoint.get("data_position", (step // len(loader), 0))  # older checkpoints: the epoch's start
        saved = f"{ckpt_path} is kept as it was at step {step}"
        print(f"resuming from {ckpt_path} at step {step}")
    if rank == 0:
        trim_log(args.out / "log.jsonl", step)  # a fresh run starts a new log

    recent_losses = collections.deque(maxlen=50)  # the training loss of the last 50 steps
    recent_losses += [checkpoint["recent_loss"]] if checkpoint and "recent_loss" in checkpoint else []

    def checkpoint_now(batch) -> str:
        """Write the checkpoint, if the weights have not diverged: every process checks the loss of the weights
        as they are now, on its share of the last batch, against the recent training loss. Returns `saved`."""
        check_weights_are_sane(networks, encode_for_check, batch, recent_losses, step, world, device, autocast,
                               f"{saved}. Train with a lower --lr than {args.lr:g}", args.time_sampling)
        if rank == 0:
            save_atomically({"model": networks.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                             "step": step, "data_position": (epoch, seen), "config": asdict(config),
                             "conditioning": conditioning, "vae": args.vae, "args": saved_arguments(args),
                             "recent_loss": sum(recent_losses) / len(recent_losses)}, ckpt_path)
        return f"{ckpt_path} is kept as it was at step {step}"

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    preview_labels, preview_captions = preview_conditions(dataset, 16)

    def save_preview():
        generator = torch.Generator(device).manual_seed(args.seed)
        noise = torch.randn(16, *config.input_shape, generator=generator, device=device)
        y = preview_labels.to(device) if preview_labels is not None else None
        encode = ema["text"] if "text" in ema else pretrained
        with autocast:
            context, context_mask = encode(preview_captions) if preview_captions else (None, None)
            samples = sample(ema["zigma"], noise, steps=args.sample_steps, y=y, context=context, context_mask=context_mask,
                             cfg_scale=args.sample_cfg)
        if not torch.isfinite(samples).all():  # the weights are checked at each checkpoint, which came first
            raise UserError(f"the samples of step {step} are NaN or infinite; {saved}")
        save_samples(vae.decode(samples) if vae else samples, args.out / f"samples_{step:07d}.{'gif' if args.frames else 'png'}")

    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model = networks["zigma"]
    model.grad_checkpointing = args.grad_checkpointing
    # With several processes, DistributedDataParallel averages the gradients of the model and of the built-in
    # caption encoder, so that every process takes the same step and keeps the same weights and EMA.
    parallel = (lambda module: DistributedDataParallel(module)) if world > 1 else (lambda module: module)  # noqa: E731
    train_model = parallel(model)
    train_model = torch.compile(train_model) if args.compile else train_model
    encode = parallel(networks["text"]) if "text" in networks else pretrained
    encode_for_check = networks["text"] if "text" in networks else pretrained  # outside DDP: no gradients to average
    scan_name = "mamba-ssm's fused kernel" if fused_selective_scan is not None and device.type == "cuda" else "pure torch"
    if rank == 0:
        print(f"{args.model}: {sum(p.numel() for p in networks.parameters()) / 1e6:.2f}M parameters, "
              f"{plural(len(dataset), 'training clip' if args.frames else 'training image')}, on {device}"
              + (f", one of {world} processes" if world > 1 else "") + f", selective scan in {scan_name}")

    progress = tqdm(total=args.steps, initial=step, dynamic_ncols=True, disable=rank > 0, file=Terminal())
    recent = collections.deque([(time.perf_counter(), 0)], maxlen=21)  # (time, examples) after each of the last 20 steps
    threads = CPUThreads() if device.type == "cpu" else None
    stop = StopRequest()
    last_batch = None  # the batch of the last step, while that step is not in the checkpoint
    try:
        # Noise, times, dropped conditions and (with --workers 0) flips come from a seed for each step and process.
        torch.manual_seed(step_seed(args.seed, rank, step))
        while step < args.steps and not stop.name:
            sampler.set_epoch(epoch)  # a new order every epoch, the same in every process
            sampler.skip = seen // world
            for batch in loader:
                if threads:
                    threads.update()
                x = batch["x"].to(device, non_blocking=True)
                y = batch["y"].to(device) if "y" in batch else None
                with autocast:
                    context, context_mask = encode(batch["caption"]) if "caption" in batch else (None, None)
                    loss = flow_loss(train_model, x, y, context, context_mask, drop_prob=args.cond_drop,
                                     time_sampling=args.time_sampling)
                for group in optimizer.param_groups:  # the warm-up
                    group["lr"] = args.lr * min(1.0, (step + 1) / (args.warmup + 1))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = nn.utils.clip_grad_norm_(networks.parameters(), args.grad_clip)  # clip before the step
                if not torch.isfinite(grad_norm):  # the same in every process: the gradients are averaged
                    raise UserError(f"training diverged at step {step + 1}: the loss was {loss.item():.4g} and the gradient "
                                    f"norm {grad_norm.item():.4g}; {saved}. Train with a lower --lr than {args.lr:g}")
                optimizer.step()
                step += 1
                seen += x.shape[0] * world
                update_ema(ema, networks, min(args.ema_decay, (1 + step) / (10 + step)))

                recent_losses.append(loss.item())
                recent.append((time.perf_counter(), recent[-1][1] + x.shape[0] * world))
                speed = (recent[-1][1] - recent[0][1]) / (recent[-1][0] - recent[0][0])  # over the last 20 steps
                progress.update()
                progress.set_postfix(loss=f"{loss.item():.4f}", per_s=f"{speed:.1f}")
                if step % args.log_every == 0:
                    loss = loss.detach()
                    if world > 1:
                        dist.all_reduce(loss)  # the whole batch's loss: the mean over the processes
                        loss /= world
                    if rank == 0:
                        append_log(args.out / "log.jsonl", {"step": step, "loss": round(loss.item(), 5),
                                                            "examples_per_s": round(speed, 2)})
                last_batch = batch
                if step % args.ckpt_every == 0 or step == args.steps:  # first the checkpoint, then the preview
                    saved, last_batch = checkpoint_now(batch), None
                if rank == 0 and (step % args.sample_every == 0 or step == args.steps):
                    save_preview()
                torch.manual_seed(step_seed(args.seed, rank, step))
                stopping = torch.tensor(float(stop.name is not None), device=device)
                if world > 1:  # stop together: a process that went on alone would wait for the others for ever
                    dist.all_reduce(stopping)
                if step >= args.steps or stopping.item():
                    break
            else:
                epoch, seen = epoch + 1, 0
    except RuntimeError:
        if not stop.name:  # a data-loading worker stopped by the same Ctrl-C is no error of its own
            raise
    finally:
        stop.restore()
        progress.close()
    if stop.name:
        if last_batch is not None:  # a step since the last checkpoint
            saved = checkpoint_now(last_batch)
        raise UserError(f"stopped by {stop.name} at step {step}; {saved}: re-run the same command to resume")
    print(f"done: step {step}, checkpoint {ckpt_path}, samples in {args.out}")


if __name__ == "__main__":
    try:
        main()
    except UserError as error:
        sys.exit(f"train.py: {error}")
    except KeyboardInterrupt:  # before training started, or a second Ctrl-C
        sys.exit("train.py: interrupted; nothing more was saved (re-run the same command to resume from the last checkpoint)")
