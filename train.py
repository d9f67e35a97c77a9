"""Train ZigMa with flow matching on a folder of images or clips, or on built-in synthetic data.

    python train.py                                      # built-in smiley faces; a tiny model, fine on a CPU
    python train.py --data ./faces --image-size 64 --model ZigMa-S/2 --steps 200000
    python train.py --data ./faces --image-size 64 --model ZigMa-S/2 --steps 400000   # resumes from out/ckpt.pt
    python train.py --frames 8                           # built-in moving shapes: video with the factorized scan
    python train.py --data ./clips --frames 16 --frame-stride 2 --video-scan sst
    python train.py --data ./pets --class-cond           # labels from the first-level subfolder names
    python train.py --data ./captioned --captions        # a caption in NAME.txt beside each NAME.png

Everything goes to --out (default out/): ckpt.pt (model, EMA, optimizer, step, config, arguments, class
names or vocabulary), samples_STEP.png or .gif (from the EMA weights) and log.jsonl (the loss). Re-running
a command resumes from OUT/ckpt.pt; a larger --steps trains on. Sample from a checkpoint with sample.py.
"""

import argparse
import collections
import copy
import json
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from torchvision.utils import make_grid, save_image
from tqdm import tqdm

from zigma import (PRESETS, CaptionEncoder, PretrainedTextEncoder, ZigMa, ZigMaConfig, flow_loss, preset_config, sample,
                   selective_scan, selective_scan_for)

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"}


class UserError(Exception):
    """A mistake in the command line or the files it names: reported in one sentence, without a traceback."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad argument is a UserError (one sentence) rather than the whole usage text."""

    def error(self, message):
        raise UserError(f"{message} (see --help)")


def warn(message: str) -> None:
    """One line on stderr, written so that it does not break a progress bar."""
    tqdm.write(f"warning: {message}", file=sys.stderr)


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


#################################################################################
#                                 Image folders                                 #
#################################################################################

def image_files(folder: Path) -> list[Path]:
    """Every image file under folder, recursively, sorted."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def frame_count(path: Path) -> int:
    """How many frames PIL finds in the file (1 for a still image), or 0 if it is not a readable image."""
    try:
        with Image.open(path) as image:
            return getattr(image, "n_frames", 1)
    except Exception:
        return 0


BACKGROUND = (255, 255, 255)  # what transparent pixels are composited over: white


def to_rgb(image: Image.Image) -> Image.Image:
    """Any image as 8-bit RGB: 16-bit grey scaled down (not clipped to white), transparency composited over white."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L"):  # 16-bit greyscale PNGs and TIFFs
        image = Image.fromarray((np.asarray(image, dtype=np.float64) / 257).round().clip(0, 255).astype(np.uint8))
    if "A" in image.getbands() or "transparency" in image.info:  # RGBA, LA, PA, or a palette with a transparent colour
        image = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", image.size, BACKGROUND + (255,)), image).convert("RGB")
    return image.convert("RGB")


def load_frames(path: Path, first: int = 0, count: int = 1, stride: int = 1) -> list[Image.Image]:
    """Frames first, first + stride, ... of an image file, as RGB; a still image has only frame 0."""
    with Image.open(path) as image:
        frames = []
        for i in range(first, first + count * stride, stride):
            image.seek(i)
            frames.append(to_rgb(image))
        return frames


def class_names_of(root: Path, paths: list[Path]) -> list[str]:
    """The first-level subfolders of root that the paths lie in: the class names of --class-cond."""
    stray = [p for p in paths if len(p.relative_to(root).parts) == 1]
    if stray:
        raise UserError(f"--class-cond needs every image inside a class subfolder of {root}, but {stray[0]} lies at its top")
    names = {p.relative_to(root).parts[0] for p in paths}
    if not names:
        raise UserError(f"--class-cond needs one subfolder per class in {root}")
    return sorted(names)


def read_captions(images: list[Path]) -> list[str]:
    """The caption of each image: the text of the .txt file with the same stem beside it."""
    captions = [p.with_suffix(".txt").read_text().strip() if p.with_suffix(".txt").is_file() else None for p in images]
    missing = sum(c is None for c in captions)
    if missing == len(captions):
        raise UserError("--captions: no image has a caption file (NAME.txt beside NAME.png)")
    if missing:
        warn(f"{missing} of {plural(len(captions), 'image')} have no caption file; they get the empty caption")
    return [c or "" for c in captions]


class ImageFolder(Dataset):
    """The images under a folder, as (3, S, S) tensors in [-1, 1]: resized, centre-cropped, randomly flipped.

    Items are dicts: "x", and "y" (the class index) or "caption" when asked for.
    """

    def __init__(self, folder: Path, image_size: int, class_cond: bool = False, captions: bool = False):
        files = image_files(folder)
        if not files:
            raise UserError(f"--data {folder} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        self.files = [p for p in files if frame_count(p)]
        for p in sorted(set(files) - set(self.files)):
            warn(f"skipping {p}: not a readable image")
        if not self.files:
            raise UserError(f"--data {folder}: none of its {len(files)} image files could be read")
        self.class_names = class_names_of(folder, self.files) if class_cond else None
        self.labels = [self.class_names.index(p.relative_to(folder).parts[0]) for p in self.files] if class_cond else None
        self.captions = read_captions(self.files) if captions else None
        self.transform = transforms.Compose([
            transforms.Resize(image_size),
            transforms.CenterCrop(image_size),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize([0.5] * 3, [0.5] * 3),  # [0, 1] -> [-1, 1]
        ])

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        try:
            x = self.transform(load_frames(self.files[index])[0])  # (3, S, S)
        except Exception as error:  # a file that passed the header check but does not decode
            warn(f"skipping {self.files[index]}: {error}")
            return self[(index + 1) % len(self)]
        item = {"x": x}
        if self.labels is not None:
            item["y"] = self.labels[index]
        if self.captions is not None:
            item["caption"] = self.captions[index]
        return item


class ClipFolder(Dataset):
    """The clips under a folder, as (T, 3, S, S) tensors in [-1, 1].

    A clip is an animated GIF, or a folder of frame images (sorted by name). Each item is T frames,
    `stride` apart, from a random start; every frame gets the same resize, crop and flip.
    """

    def __init__(self, folder: Path, image_size: int, frames: int, stride: int = 1, class_cond: bool = False):
        files = image_files(folder)
        by_folder = {}  # folder -> its frame images
        self.clips = []  # (frame files, or one GIF file, frames available)
        for p in files:
            if p.suffix.lower() == ".gif":
                self.clips.append(([p], frame_count(p)))
            elif frame_count(p):
                by_folder.setdefault(p.parent, []).append(p)
            else:
                warn(f"skipping {p}: not a readable image")
        self.clips += [(paths, len(paths)) for paths in by_folder.values()]
        if not self.clips:
            raise UserError(f"--data {folder} holds no clips (animated GIFs, or folders of frame images)")
        span = (frames - 1) * stride + 1  # frames a training example covers
        too_short = [c for c in self.clips if c[1] < span]
        for paths, available in too_short:
            warn(f"skipping {paths[0] if len(paths) == 1 else paths[0].parent}: {plural(available, 'frame')}, "
                 f"fewer than the {span} that --frames {frames} --frame-stride {stride} needs")
        self.clips = [c for c in self.clips if c[1] >= span]
        if not self.clips:
            raise UserError(f"--data {folder}: no clip has the {span} frames that --frames {frames} --frame-stride {stride} needs")
        self.frames, self.stride, self.span = frames, stride, span
        self.class_names, self.labels, self.captions = None, None, None
        if class_cond:
            anchors = [paths[0] for paths, _ in self.clips]
            self.class_names = class_names_of(folder, anchors)
            self.labels = [self.class_names.index(p.relative_to(folder).parts[0]) for p in anchors]
        self.transform = transforms.Compose([
            transforms.Resize(image_size),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            transforms.Normalize([0.5] * 3, [0.5] * 3),  # [0, 1] -> [-1, 1]
        ])

    def __len__(self):
        return len(self.clips)

    def __getitem__(self, index):
        paths, available = self.clips[index]
        start = torch.randint(0, available - self.span + 1, ()).item()
        if len(paths) == 1:  # a GIF
            images = load_frames(paths[0], start, self.frames, self.stride)
        else:
            images = [load_frames(p)[0] for p in paths[start:start + self.span:self.stride]]
        x = torch.stack([self.transform(image) for image in images])  # (T, 3, S, S)
        if torch.rand(()) < 0.5:
            x = x.flip(-1)  # the same flip for every frame
        item = {"x": x}
        if self.labels is not None:
            item["y"] = self.labels[index]
        return item


#################################################################################
#                                Synthetic data                                 #
#################################################################################

FACE_COLOURS = {"yellow": (0.95, 0.85, 0.1), "orange": (0.95, 0.55, 0.1), "pink": (0.95, 0.6, 0.75)}
BACKGROUNDS = {"blue": (0.1, 0.2, 0.5), "green": (0.1, 0.4, 0.15), "purple": (0.35, 0.1, 0.4)}


class SmileyFaces(Dataset):
    """Procedurally drawn faces, (3, S, S) in [-1, 1]: built-in data that needs no download.

    Each index draws one face from its own seed: colours, size, position, eyes and mouth. Two classes,
    "smiling" and "frowning", and a caption that names the colours and the mood, for trying
    --class-cond and --captions without data.
    """

    moods = ["smiling", "frowning"]

    def __init__(self, image_size: int, size: int = 100_000, class_cond: bool = False, captions: bool = False):
        self.image_size, self.size = image_size, size
        self.class_names = self.moods if class_cond else None
        self.captions = [self.caption(i) for i in range(1000)] if captions else None  # enough for the vocabulary

    def __len__(self):
        return self.size

    def choices(self, index) -> tuple[torch.Generator, int, str, str]:
        """Face `index`'s random generator, after drawing its class, face colour and background."""
        g = torch.Generator().manual_seed(index)
        face = list(FACE_COLOURS)[torch.randint(3, (), generator=g).item()]
        background = list(BACKGROUNDS)[torch.randint(3, (), generator=g).item()]
        return g, index % 2, face, background

    def caption(self, index) -> str:
        _, label, face, background = self.choices(index)
        return f"a {face} {self.moods[label]} face on a {background} background"

    def __getitem__(self, index):
        g, label, face, background = self.choices(index)
        u = lambda low, high: low + (high - low) * torch.rand((), generator=g).item()  # noqa: E731
        s = self.image_size
        y, x = torch.meshgrid(torch.linspace(-1, 1, s), torch.linspace(-1, 1, s), indexing="ij")  # (S, S) each
        cx, cy, r = u(-0.15, 0.15), u(-0.15, 0.15), u(0.6, 0.8)
        x, y = (x - cx) / r, (y - cy) / r  # face coordinates: the face is the unit disc
        eye_x, eye_y, eye_r = u(0.25, 0.4), u(-0.45, -0.25), u(0.1, 0.16)
        mouth_r, mouth_y = u(0.45, 0.6), u(-0.05, 0.1)
        if label == 1:  # frowning: the upper arc of a circle below the mouth line
            mouth_y += 0.75
        mouth_distance = ((x ** 2 + (y - mouth_y) ** 2).sqrt() - mouth_r).abs()
        mouth_side = (y > mouth_y + 0.1) if label == 0 else (y < mouth_y - 0.1)
        ink = torch.tensor([0.1, 0.05, 0.0]).view(3, 1, 1)
        image = torch.tensor(BACKGROUNDS[background]).view(3, 1, 1).expand(3, s, s)
        image = torch.where(x ** 2 + y ** 2 <= 1, torch.tensor(FACE_COLOURS[face]).view(3, 1, 1), image)
        image = torch.where(((x.abs() - eye_x) ** 2 + (y - eye_y) ** 2).sqrt() <= eye_r, ink, image)  # both eyes
        image = torch.where((mouth_distance <= 0.08) & mouth_side, ink, image)
        item = {"x": image * 2 - 1}
        if self.class_names:
            item["y"] = label
        if self.captions:
            item["caption"] = self.caption(index)
        return item


class MovingShapes(Dataset):
    """Clips of a ball crossing the frame in a straight line, (T, 3, S, S) in [-1, 1]: built-in video data."""

    def __init__(self, image_size: int, frames: int, size: int = 100_000):
        self.image_size, self.frames, self.size = image_size, frames, size
        self.class_names, self.captions = None, None

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        g = torch.Generator().manual_seed(index)
        s, t = self.image_size, torch.linspace(0, 1, self.frames)[:, None, None]  # (T, 1, 1)
        y, x = torch.meshgrid(torch.linspace(-1, 1, s), torch.linspace(-1, 1, s), indexing="ij")  # (S, S) each
        start, end = torch.rand(2, generator=g) * 1.2 - 0.6, torch.rand(2, generator=g) * 1.2 - 0.6  # (x, y) each
        centre = start + t[..., None] * (end - start)  # (T, 1, 1, 2)
        radius = 0.2 + 0.15 * torch.rand((), generator=g)
        inside = (x - centre[..., 0]) ** 2 + (y - centre[..., 1]) ** 2 <= radius ** 2  # (T, S, S)
        colour, background = torch.rand(3, 1, 1, generator=g) * 0.5 + 0.5, torch.rand(3, 1, 1, generator=g) * 0.4
        clip = torch.where(inside[:, None], colour, background)  # (T, 3, S, S)
        return {"x": clip * 2 - 1}


#################################################################################
#                          Devices, checkpoints, images                         #
#################################################################################

def pick_device(name: str | None) -> torch.device:
    """The device asked for, else cuda, then mps, then cpu."""
    if name:
        try:
            device = torch.device(name)
        except RuntimeError:
            raise UserError(f"--device {name} is not a device name; use cuda, mps or cpu (or cuda:1, ...)")
        try:
            torch.empty(0, device=device)
        except Exception:
            raise UserError(f"--device {name} is not available on this machine")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def spare_threads(most: int, cores: int, busy_elsewhere: float) -> int:
    """Threads for torch: the cores that other processes leave free (busy_elsewhere is in cores), 1 to most."""
    return max(1, min(most, round(cores - busy_elsewhere)))


class CPUThreads:
    """Keeps torch's CPU thread count at the cores that other processes leave free, measured every few seconds.

    Every parallel operation waits for its slowest thread. With a core taken by another process, each of the
    thousands of small operations of a step waits for a descheduled thread, and training runs 10-20x slower;
    one thread fewer runs at the speed of the cores that are free. Linux only (it reads /proc); elsewhere it
    leaves the thread count alone.
    """

    def __init__(self, every: float = 2.0):
        self.cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        self.most, self.every = torch.get_num_threads(), every
        self.last, self.checked = self.ticks(), time.monotonic()

    def ticks(self) -> tuple[int, int, int] | None:
        """(busy, all) clock ticks of this process's cores, and this process's own ticks; None without /proc."""
        try:
            with open("/proc/stat") as f:
                rows = {line.split()[0]: [int(v) for v in line.split()[1:9]] for line in f if line.startswith("cpu")}
            with open("/proc/self/stat") as f:
                ours = sum(int(v) for v in f.read().rsplit(")", 1)[1].split()[11:13])  # utime + stime
        except (OSError, ValueError, IndexError):
            return None
        counts = [rows[f"cpu{core}"] for core in self.cores if f"cpu{core}" in rows]
        idle = sum(c[3] + c[4] for c in counts)  # idle and iowait
        total = sum(sum(c) for c in counts)  # user nice system idle iowait irq softirq steal
        return total - idle, total, ours

    def update(self) -> None:
        if time.monotonic() - self.checked < self.every:
            return
        now = self.ticks()
        if now is None or self.last is None or not self.cores:
            return
        busy, total, ours = (a - b for a, b in zip(now, self.last))
        self.last, self.checked = now, time.monotonic()
        if total > 0:
            threads = spare_threads(self.most, len(self.cores), len(self.cores) * (busy - ours) / total)
            if threads != torch.get_num_threads():
                torch.set_num_threads(threads)


def save_checkpoint(checkpoint: dict, path: Path) -> None:
    """Write to a temporary file, then rename over the old one: a crash never leaves a broken checkpoint."""
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as f:
        torch.save(checkpoint, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def load_checkpoint(path: Path) -> dict:
    """A checkpoint written by train.py, or a UserError that says what is wrong with the file."""
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}; train one with train.py or check the path")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        raise UserError(f"{path} is not a readable checkpoint (corrupt or not written by train.py)")
    if not isinstance(checkpoint, dict):
        raise UserError(f"{path} is not a ZigMa checkpoint from train.py (it holds a {type(checkpoint).__name__}, not a dict)")
    missing = {"model", "ema", "config", "step", "conditioning"} - set(checkpoint)
    if missing:
        raise UserError(f"{path} is not a ZigMa checkpoint from train.py (it lacks {', '.join(sorted(missing))})")
    return checkpoint


def build_networks(config: ZigMaConfig, conditioning: dict) -> nn.ModuleDict:
    """What training optimises: the ZigMa, and the built-in caption encoder when it learns with it."""
    networks = nn.ModuleDict({"zigma": ZigMa(config)})
    if conditioning.get("vocabulary"):
        networks["text"] = CaptionEncoder(conditioning["vocabulary"], config.context_dim)
    return networks


def load_pretrained_text_encoder(name: str | None) -> PretrainedTextEncoder | None:
    if name is None:
        return None
    try:
        return PretrainedTextEncoder(name)
    except ImportError:
        raise UserError(f"the text encoder {name} needs the transformers package: pip install transformers")
    except Exception as error:
        raise UserError(f"could not load the text encoder {name}: {str(error).strip().splitlines()[0]}")


def networks_from_checkpoint(checkpoint: dict, path: Path, weights: str = "ema") -> nn.ModuleDict:
    """Rebuild the networks from the checkpoint's config and load their weights ("ema" or "model")."""
    try:
        networks = build_networks(ZigMaConfig(**checkpoint["config"]), checkpoint["conditioning"])
        networks.load_state_dict(checkpoint[weights])
    except (TypeError, AssertionError, RuntimeError) as error:
        raise UserError(f"{path} does not match this version of ZigMa: {str(error).strip().splitlines()[0]}")
    return networks


def save_samples(samples: torch.Tensor, path: Path, fps: int = 8) -> None:
    """Save images (B, 3, H, W) in [-1, 1] as one grid, or clips (B, T, 3, H, W) as one animated grid GIF."""
    samples = samples.float().clamp(-1, 1) * 0.5 + 0.5
    nrow = math.ceil(math.sqrt(samples.shape[0]))
    if samples.dim() == 4:
        save_image(samples, path, nrow=nrow)
        return
    frames = [make_grid(samples[:, t], nrow=nrow).mul(255).round().byte().permute(1, 2, 0).numpy()
              for t in range(samples.shape[1])]  # (H', W', 3) each
    images = [Image.fromarray(frame) for frame in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=1000 // fps, loop=0)


#################################################################################
#                                   Training                                    #
#################################################################################

@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for ema_p, p in zip(ema.parameters(), model.parameters()):
        ema_p.lerp_(p, 1 - decay)


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="folder of images (or clips), searched recursively; default: built-in synthetic data")
    parser.add_argument("--out", type=Path, default=Path("out"), help="where checkpoint, samples and log go (default: out)")
    parser.add_argument("--model", default="ZigMa-Tiny/4", choices=sorted(PRESETS), help="preset (default: ZigMa-Tiny/4, small enough for a CPU)")
    parser.add_argument("--image-size", type=int, default=32, help="images are resized and cropped to this side (default: 32)")
    parser.add_argument("--scan", default="zigzag", choices=["zigzag", "sweep"], help="token paths (default: zigzag)")
    parser.add_argument("--scan-paths", type=int, default=8, choices=[1, 2, 8],
                        help="K: layer i reads path i mod K, the paper's Zigzag-1, -2 and -8 (default: 8)")
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
    training.add_argument("--batch-size", type=int, default=32, help="examples per step (default: 32)")
    training.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate (default: 3e-4)")
    training.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default: 0)")
    training.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this (default: 1)")
    training.add_argument("--ema-decay", type=float, default=0.999, help="EMA decay, warmed up as min(decay, (1+step)/(10+step)) (default: 0.999)")
    training.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    training.add_argument("--device", help="cuda, mps or cpu (default: the first available)")
    training.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA)")
    training.add_argument("--grad-checkpointing", action="store_true",
                          help="recompute each block in the backward pass: less memory, about a third more time")
    training.add_argument("--workers", type=int, default=2, help="data-loading processes (default: 2)")
    progress = parser.add_argument_group("progress")
    progress.add_argument("--sample-every", type=int, default=500, help="save samples every this many steps (default: 500)")
    progress.add_argument("--sample-steps", type=int, default=50, help="Euler steps for those samples (default: 50)")
    progress.add_argument("--ckpt-every", type=int, default=500, help="save the checkpoint every this many steps (default: 500)")
    progress.add_argument("--log-every", type=int, default=10, help="append the loss to log.jsonl every this many steps (default: 10)")
    return check_arguments(parser.parse_args(argv))


def check_arguments(args: argparse.Namespace) -> argparse.Namespace:
    """One sentence for an option out of range, or one that does nothing without another; then the defaults that depend on others."""
    for name in ("image_size", "steps", "batch_size", "sample_every", "sample_steps", "ckpt_every", "log_every"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be 1 or more, not {getattr(args, name)}")
    for name in ("lr", "grad_clip"):
        if not getattr(args, name) > 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, not {getattr(args, name)}")
    for name in ("cond_drop", "ema_decay"):
        if not 0 <= getattr(args, name) <= 1:
            raise UserError(f"--{name.replace('_', '-')} must be between 0 and 1, not {getattr(args, name)}")
    for name in ("weight_decay", "workers", "frames"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be 0 or more, not {getattr(args, name)}")
    patch = PRESETS[args.model]["patch_size"]
    if args.image_size % patch:
        raise UserError(f"--image-size {args.image_size} is not a multiple of {args.model}'s patch size {patch}")
    if args.out.exists() and not args.out.is_dir():
        raise UserError(f"--out {args.out} is a file; name a folder")
    if not args.frames:
        for name in ("frame_stride", "video_scan"):
            if getattr(args, name) is not None:
                raise UserError(f"--{name.replace('_', '-')} applies to clips only: add --frames, or leave it out")
    if args.text_encoder is not None and not args.captions:
        raise UserError("--text-encoder applies to captions only: add --captions, or leave it out")
    if args.frame_stride is not None and args.frame_stride < 1:
        raise UserError(f"--frame-stride must be 1 or more, not {args.frame_stride}")
    if args.video_scan is not None and (not args.video_scan or set(args.video_scan) - set("stv")):
        raise UserError(f"--video-scan takes the letters s, t and v, not {args.video_scan!r}")
    args.frame_stride, args.video_scan = args.frame_stride or 1, args.video_scan or "sst"
    args.text_encoder = args.text_encoder or "learned"
    return args


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
        return ClipFolder(args.data, args.image_size, args.frames, args.frame_stride, args.class_cond)
    return ImageFolder(args.data, args.image_size, args.class_cond, args.captions)


def build_conditioning(args, dataset) -> dict:
    """What the checkpoint keeps about the conditions: class names, caption vocabulary or encoder name."""
    conditioning = {"class_names": dataset.class_names if args.class_cond else None, "vocabulary": None, "text_encoder": None}
    if args.captions and args.text_encoder == "learned":
        conditioning["vocabulary"] = CaptionEncoder.build_vocabulary(dataset.captions)
    elif args.captions:
        conditioning["text_encoder"] = args.text_encoder
    return conditioning


def build_config(args, conditioning: dict, text_dim: int) -> ZigMaConfig:
    class_names = conditioning["class_names"]
    return preset_config(args.model, input_size=args.image_size, in_channels=3, scan=args.scan, scan_paths=args.scan_paths,
                         frames=args.frames, video_scan=args.video_scan, num_classes=len(class_names) if class_names else 0,
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
MODEL_OPTIONS = ["model", "image_size", "scan", "scan_paths", "frames", "video_scan", "class_cond", "captions", "text_encoder"]
# Options that may change when a run resumes: they take effect, and a line says so.
TRAINING_OPTIONS = ["data", "batch_size", "lr", "weight_decay", "grad_clip", "ema_decay", "cond_drop"]


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
            print(f"resuming with {as_option(name, now[name])} (the checkpoint was trained with {before[name]})")


def check_resumed_model(checkpoint: dict, path: Path, config: ZigMaConfig, conditioning: dict) -> None:
    """Refuse to resume a checkpoint whose classes, caption words or model differ from what the options and data give."""
    classes_before, classes_now = checkpoint["conditioning"]["class_names"], conditioning["class_names"]
    if classes_before != classes_now:
        raise UserError(f"{path} was trained on the classes {', '.join(classes_before or ['none'])}, "
                        f"but --data has {', '.join(classes_now or ['none'])}; pass its data, or another --out")
    if checkpoint["conditioning"]["vocabulary"] != conditioning["vocabulary"]:
        raise UserError(f"the captions in --data use other words than those {path} was trained on; pass its data, or another --out")
    changed = [field for field, value in asdict(config).items() if checkpoint["config"].get(field) != value]
    if changed:
        raise UserError(f"{path} holds a model with another {', '.join(changed)} than these options give; pass another --out")


def saved_arguments(args) -> dict:
    """The arguments as the checkpoint keeps them: paths as strings."""
    return {name: str(value) if isinstance(value, Path) else value for name, value in vars(args).items()}


def preview_conditions(dataset, count: int) -> tuple[torch.Tensor | None, list[str] | None]:
    """Labels cycling through the classes, or the first captions: what the sample grids show."""
    labels = torch.arange(count) % len(dataset.class_names) if dataset.class_names else None
    captions = [dataset.captions[i % len(dataset.captions)] for i in range(count)] if dataset.captions else None
    return labels, captions


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = pick_device(args.device)
    ckpt_path = args.out / "ckpt.pt"
    checkpoint = load_checkpoint(ckpt_path) if ckpt_path.exists() else None  # resume
    if checkpoint is not None:
        check_resumed_options(checkpoint, ckpt_path, args)
        if checkpoint["step"] >= args.steps:
            print(f"{ckpt_path} is already at step {checkpoint['step']}; pass a larger --steps to train on")
            return
    dataset = build_dataset(args)
    conditioning = build_conditioning(args, dataset)
    pretrained = load_pretrained_text_encoder(conditioning["text_encoder"])  # a frozen encoder, kept out of the checkpoint
    text_dim = pretrained.dim if pretrained else PRESETS[args.model]["dim"]
    config = build_config(args, conditioning, text_dim)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=len(dataset) >= args.batch_size,
                        num_workers=args.workers, pin_memory=device.type == "cuda", persistent_workers=args.workers > 0)

    networks = build_networks(config, conditioning).to(device)
    ema = copy.deepcopy(networks).requires_grad_(False)  # the EMA weights are what we sample from
    if pretrained:
        pretrained.to(device)
    optimizer = torch.optim.AdamW(parameter_groups(networks, args.weight_decay), lr=args.lr)
    step = 0

    if checkpoint is not None:
        check_resumed_model(checkpoint, ckpt_path, config, conditioning)
        networks.load_state_dict(checkpoint["model"])
        ema.load_state_dict(checkpoint["ema"])
        chosen = [{"lr": group["lr"], "weight_decay": group["weight_decay"]} for group in optimizer.param_groups]
        try:
            optimizer.load_state_dict(checkpoint["optimizer"])
        except ValueError:
            raise UserError(f"{ckpt_path} holds the optimizer of an older train.py; sample from it, or train in another --out")
        for group, values in zip(optimizer.param_groups, chosen):
            group.update(values)  # this run's --lr and --weight-decay, not the checkpoint's
        step = checkpoint["step"]
        print(f"resuming from {ckpt_path} at step {step}")
    args.out.mkdir(parents=True, exist_ok=True)

    def checkpoint_now():
        save_checkpoint({"model": networks.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                         "step": step, "config": asdict(config), "conditioning": conditioning,
                         "args": saved_arguments(args)}, ckpt_path)

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    preview_labels, preview_captions = preview_conditions(dataset, 16)

    def save_preview():
        generator = torch.Generator(device).manual_seed(args.seed)
        noise = torch.randn(16, *dataset[0]["x"].shape, generator=generator, device=device)
        y = preview_labels.to(device) if preview_labels is not None else None
        encode = ema["text"] if "text" in ema else pretrained
        with autocast:
            context, context_mask = encode(preview_captions) if preview_captions else (None, None)
            samples = sample(ema["zigma"], noise, steps=args.sample_steps, y=y, context=context, context_mask=context_mask)
        save_samples(samples, args.out / f"samples_{step:07d}.{'gif' if args.frames else 'png'}")

    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model = networks["zigma"]
    model.grad_checkpointing = args.grad_checkpointing
    train_model = torch.compile(model) if args.compile else model
    encode = networks["text"] if "text" in networks else pretrained
    scan_name = "pure torch" if selective_scan_for(device) is selective_scan else "mamba-ssm's fused kernel"
    print(f"{args.model}: {sum(p.numel() for p in networks.parameters()) / 1e6:.2f}M parameters, "
          f"{plural(len(dataset), 'training clip' if args.frames else 'training image')}, on {device}, selective scan in {scan_name}")

    progress = tqdm(total=args.steps, initial=step, dynamic_ncols=True)
    recent = collections.deque([(time.perf_counter(), 0)], maxlen=21)  # (time, examples) after each of the last 20 steps
    threads = CPUThreads() if device.type == "cpu" else None
    try:
        while step < args.steps:
            for batch in loader:
                if threads:
                    threads.update()
                x = batch["x"].to(device, non_blocking=True)
                y = batch["y"].to(device) if "y" in batch else None
                with autocast:
                    context, context_mask = encode(batch["caption"]) if "caption" in batch else (None, None)
                    loss = flow_loss(train_model, x, y, context, context_mask, drop_prob=args.cond_drop)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(networks.parameters(), args.grad_clip)  # clip before the step
                optimizer.step()
                step += 1
                update_ema(ema, networks, min(args.ema_decay, (1 + step) / (10 + step)))

                recent.append((time.perf_counter(), recent[-1][1] + x.shape[0]))
                speed = (recent[-1][1] - recent[0][1]) / (recent[-1][0] - recent[0][0])  # over the last 20 steps
                progress.update()
                progress.set_postfix(loss=f"{loss.item():.4f}", per_s=f"{speed:.1f}")
                if step % args.log_every == 0:
                    with open(args.out / "log.jsonl", "a") as log:
                        log.write(json.dumps({"step": step, "loss": round(loss.item(), 5), "examples_per_s": round(speed, 2)}) + "\n")
                if step % args.sample_every == 0 or step == args.steps:
                    save_preview()
                if step % args.ckpt_every == 0 or step == args.steps:
                    checkpoint_now()
                if step >= args.steps:
                    break
    except KeyboardInterrupt:
        checkpoint_now()
        progress.close()
        raise UserError(f"interrupted at step {step}; saved {ckpt_path}, re-run the same command to resume")
    progress.close()
    print(f"done: step {step}, checkpoint {ckpt_path}, samples in {args.out}")


if __name__ == "__main__":
    try:
        main()
    except UserError as error:
        sys.exit(f"train.py: {error}")
