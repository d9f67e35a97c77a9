"""What train.py and sample.py share: the data that goes into ZigMa, and the files that come out.

    1. messages        UserError and ArgumentParser: a user's mistake in one sentence; warn
    2. image folders   ImageFolder (images, with classes or captions) and ClipFolder (GIFs, frame folders)
    3. built-in data   SmileyFaces and MovingShapes, which need no download
    4. text encoders   CaptionEncoder (built in, learned with the model), PretrainedTextEncoder (transformers)
    5. latents         VAE (a pretrained autoencoder from diffusers) and Latents, a folder encoded by it once
    6. checkpoints     save and load them atomically, rebuild the networks, save sample grids
    7. devices         pick_device, and CPUThreads, which keeps torch off the cores other processes use
"""

import argparse
import contextlib
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
import unicodedata
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from zigma import ZigMa, ZigMaConfig

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


#################################################################################
#                                    Messages                                   #
#################################################################################

class UserError(Exception):
    """A mistake in the command line or the files it names: reported in one sentence, without a traceback."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad argument is a UserError (one sentence) rather than the whole usage text, and an option
    is taken only by its whole name (train.py --ckpt would otherwise be --ckpt-every)."""

    def __init__(self, **options):
        super().__init__(allow_abbrev=False, **options)

    def error(self, message):
        raise UserError(f"{message} (see --help)")


if sys.stderr is None:  # started with stderr closed (2>&-, cron, some supervisors): like a terminal that has gone away
    sys.stderr = open(os.devnull, "w")


class Terminal:
    """stderr for progress bars and warnings, where a terminal that has gone away (a closed pipe, a hung-up
    session) is ignored, so that training goes on, and still saves its checkpoint when it stops."""

    def write(self, text: str) -> int:
        with contextlib.suppress(OSError):
            sys.stderr.write(text)
        return len(text)

    def flush(self) -> None:
        with contextlib.suppress(OSError):
            sys.stderr.flush()

    def fileno(self) -> int:  # for the progress bar's width
        return sys.stderr.fileno()


def warn(message: str) -> None:
    """One line on stderr, written so that it does not break a progress bar."""
    tqdm.write(f"warning: {message}", file=Terminal())


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


#################################################################################
#                                 Image folders                                 #
#################################################################################

def image_files(folder: Path) -> list[Path]:
    """Every image file under folder, recursively, sorted. Linked folders are followed, each real folder once, so
    that a link back up the tree is no loop."""
    def unreadable(error: OSError):
        raise UserError(f"cannot read the folder {error.filename} ({error.strerror}): its images would be left out; "
                        f"make it readable, or move it out of {folder}")

    files, seen = [], set()
    for parent, folders, names in os.walk(folder, onerror=unreadable, followlinks=True):
        here = os.stat(parent)
        if (here.st_dev, here.st_ino) in seen:  # reached again through a link
            folders.clear()
            continue
        seen.add((here.st_dev, here.st_ino))
        folders.sort()
        files += [Path(parent) / name for name in names if Path(name).suffix.lower() in IMAGE_EXTENSIONS]
    return sorted(p for p in files if p.is_file())


def frame_count(path: Path) -> int:
    """How many frames PIL finds in the file (1 for a still image), or 0, with a warning that says why, if it is
    not a readable image."""
    try:
        with Image.open(path) as image:
            return getattr(image, "n_frames", 1)
    except Image.DecompressionBombError as error:
        warn(f"skipping {path}: {error.args[0].split(' exceeds')[0].lower()}, more than PIL's limit against "
             f"decompression bombs (PIL.Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS})")
    except Image.UnidentifiedImageError:
        warn(f"skipping {path}: not a readable image")
    except Exception as error:
        warn(f"skipping {path}: not a readable image ({error})")
    return 0


BACKGROUND = (255, 255, 255)  # what transparent pixels are composited over: white


def to_rgb(image: Image.Image) -> Image.Image:
    """Any image as 8-bit RGB: 16-bit grey scaled down (not clipped to white), transparency composited over white."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L"):  # 16-bit greyscale PNGs and TIFFs
        image = Image.fromarray((np.asarray(image, dtype=np.float64) / 257).round().clip(0, 255).astype(np.uint8))
    elif image.mode == "F":  # 32-bit float greyscale TIFFs: in [0, 1] by convention, else taken to be in [0, 255]
        values = np.asarray(image, dtype=np.float64)
        scale = 255 if np.nanmax(values, initial=0) <= 1 else 1
        image = Image.fromarray(np.nan_to_num(values * scale).round().clip(0, 255).astype(np.uint8))
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
    empty = sorted(d.name for d in root.iterdir() if d.is_dir() and d.name not in names and not d.name.startswith("."))
    if empty:
        warn(f"--class-cond: {', '.join(empty)} in {root} {'holds' if len(empty) == 1 else 'hold'} no images, so "
             f"{'is not a class' if len(empty) == 1 else 'are not classes'}")
    if len(names) == 1:
        warn(f"--class-cond: {root} has one class only ({next(iter(names))}); a label that never changes teaches nothing")
    return sorted(names)


def read_text(path: Path) -> str:
    """A text file's contents, or one sentence naming the file where it is not UTF-8 or cannot be read."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise UserError(f"{path} is not UTF-8 text (byte {error.start}); save it as UTF-8")
    except OSError as error:
        raise UserError(f"cannot read {path}: {error.strerror or error}")


def read_captions(images: list[Path]) -> list[str]:
    """The caption of each image: the text of the .txt file with the same stem beside it."""
    captions = [read_text(p.with_suffix(".txt")).strip() if p.with_suffix(".txt").is_file() else None for p in images]
    missing = sum(c is None for c in captions)
    if missing == len(captions):
        raise UserError("--captions: no image has a caption file (NAME.txt beside NAME.png)")
    if missing:
        warn(f"{missing} of {plural(len(captions), 'image')} have no caption file; they get the empty caption")
    if not any(CaptionEncoder.words(c) for c in captions if c):
        warn("--captions: no caption has a word in it; the model learns only the empty caption")
    return [c or "" for c in captions]


def image_transform(image_size: int):
    """An image as a (3, S, S) tensor in [-1, 1]: resized so that its shorter side is S, then centre-cropped."""
    from torchvision import transforms  # torchvision takes 3 s to import: only image files need it
    return transforms.Compose([
        transforms.Resize(image_size),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        transforms.Normalize([0.5] * 3, [0.5] * 3),  # [0, 1] -> [-1, 1]
    ])


class Folder(Dataset):
    """What ImageFolder and ClipFolder share: a file that passes the header check but does not decode (cut short,
    say) is skipped with one warning, and the next one that decodes takes its place."""

    def name(self, index) -> Path:
        return self.files[index]

    def decoded(self, index, read=None) -> torch.Tensor | None:
        """read(index) (default: unflipped), or None, with a warning the first time, if its file does not decode."""
        if index in self.broken:
            return None
        try:
            return (read or self.unflipped)(index)
        except Exception as error:
            self.broken.add(index)
            warn(f"skipping {self.name(index)}: {error}")
            return None

    def readable(self, index, read) -> tuple[int, torch.Tensor]:
        """(j, read(j)) for the first item j from index on, wrapping round, whose file decodes."""
        for j in itertools.chain(range(index, len(self)), range(index)):  # lazily: this runs for every item
            x = self.decoded(j, read)
            if x is not None:
                return j, x
        raise UserError(f"none of the {plural(len(self), 'file')} in {self.folder} decodes; check that they are "
                        f"whole image files")


class ImageFolder(Folder):
    """The images under a folder, as (3, S, S) tensors in [-1, 1]: resized, centre-cropped, flipped left to
    right at random unless flip is False.

    Items are dicts: "x", and "y" (the class index) or "caption" when asked for. unflipped(i) is image
    i, as a clip of one frame: what the latent cache encodes.
    """

    def __init__(self, folder: Path, image_size: int, class_cond: bool = False, captions: bool = False,
                 option: str = "--data", flip: bool = True):
        files = image_files(folder)
        if not files:
            raise UserError(f"{option} {folder} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        self.files = [p for p in files if frame_count(p)]
        if not self.files:
            raise UserError(f"{option} {folder}: none of its {len(files)} image files could be read")
        self.folder, self.flip, self.broken = folder, flip, set()
        self.class_names = class_names_of(folder, self.files) if class_cond else None
        self.labels = [self.class_names.index(p.relative_to(folder).parts[0]) for p in self.files] if class_cond else None
        self.captions = read_captions(self.files) if captions else None
        self.transform = image_transform(image_size)
        self.readable(0, self.unflipped)  # one that decodes, or one sentence now rather than during training

    def __len__(self):
        return len(self.files)

    def unflipped(self, index) -> torch.Tensor:
        return self.transform(load_frames(self.files[index])[0])[None]  # (1, 3, S, S)

    def __getitem__(self, index):
        index, x = self.readable(index, self.unflipped)  # x: (1, 3, S, S)
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        item = {"x": x[0]}  # (3, S, S)
        if self.labels is not None:
            item["y"] = self.labels[index]
        if self.captions is not None:
            item["caption"] = self.captions[index]
        return item


class ClipFolder(Folder):
    """The clips under a folder, as (T, 3, S, S) tensors in [-1, 1].

    A clip is an animated GIF, or a folder of frame images (sorted by name). Each item is T frames,
    `stride` apart, from a random start; every frame gets the same resize and crop, and the same random flip
    unless flip is False. unflipped(i) is every frame of clip i: what the latent cache encodes.
    """

    def __init__(self, folder: Path, image_size: int, frames: int, stride: int = 1, class_cond: bool = False,
                 flip: bool = True):
        files = image_files(folder)
        by_folder = {}  # folder -> its frame images
        self.clips = []  # (frame files, or one GIF file, frames available)
        for p in files:
            count = frame_count(p)
            if count and p.suffix.lower() == ".gif":
                self.clips.append(([p], count))
            elif count:
                by_folder.setdefault(p.parent, []).append(p)
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
        self.folder, self.frames, self.stride, self.span, self.flip, self.broken = folder, frames, stride, span, flip, set()
        self.class_names, self.labels, self.captions = None, None, None
        if class_cond:
            anchors = [paths[0] for paths, _ in self.clips]
            self.class_names = class_names_of(folder, anchors)
            self.labels = [self.class_names.index(p.relative_to(folder).parts[0]) for p in anchors]
        self.files = [p for paths, _ in self.clips for p in paths]
        self.transform = image_transform(image_size)
        self.readable(0, self.frames_from_random_start)

    def __len__(self):
        return len(self.clips)

    def name(self, index) -> Path:
        paths, _ = self.clips[index]
        return paths[0] if len(paths) == 1 else paths[0].parent

    def unflipped(self, index) -> torch.Tensor:
        paths, available = self.clips[index]
        images = load_frames(paths[0], 0, available) if len(paths) == 1 else [load_frames(p)[0] for p in paths]
        return torch.stack([self.transform(image) for image in images])  # (F, 3, S, S)

    def frames_from_random_start(self, index) -> torch.Tensor:
        paths, available = self.clips[index]
        start = torch.randint(0, available - self.span + 1, ()).item()
        if len(paths) == 1:  # a GIF
            images = load_frames(paths[0], start, self.frames, self.stride)
        else:
            images = [load_frames(p)[0] for p in paths[start:start + self.span:self.stride]]
        return torch.stack([self.transform(image) for image in images])  # (T, 3, S, S)

    def __getitem__(self, index):
        index, x = self.readable(index, self.frames_from_random_start)
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)  # the same flip for every frame
        item = {"x": x}
        if self.labels is not None:
            item["y"] = self.labels[index]
        return item


#################################################################################
#                                 Built-in data                                 #
#################################################################################

FACE_COLOURS = {"yellow": (0.95, 0.85, 0.1), "orange": (0.95, 0.55, 0.1), "pink": (0.95, 0.6, 0.75)}
BACKGROUNDS = {"blue": (0.1, 0.2, 0.5), "green": (0.1, 0.4, 0.15), "purple": (0.35, 0.1, 0.4)}


class SmileyFaces(Dataset):
    """Procedurally drawn faces, (3, S, S) in [-1, 1]: built-in data that needs no download.

    Each index draws one face from its own seed: colours, size, position, eyes and mouth. The classes are
    moods, "smiling" and "frowning" (bench.py draws all four), and a caption names the colours and the mood,
    for trying --class-cond and --captions without data.
    """

    all_moods = ["smiling", "frowning", "surprised", "neutral"]

    def __init__(self, image_size: int, size: int = 100_000, class_cond: bool = False, captions: bool = False,
                 moods: int = 2):
        self.image_size, self.size = image_size, size
        self.moods = self.all_moods[:moods]  # face i has mood i mod len(moods)
        self.class_names = self.moods if class_cond else None
        self.captions = [self.caption(i) for i in range(1000)] if captions else None  # enough for the vocabulary

    def __len__(self):
        return self.size

    def choices(self, index) -> tuple[torch.Generator, int, str, str]:
        """Face `index`'s random generator, after drawing its class, face colour and background."""
        g = torch.Generator().manual_seed(index)
        face = list(FACE_COLOURS)[torch.randint(3, (), generator=g).item()]
        background = list(BACKGROUNDS)[torch.randint(3, (), generator=g).item()]
        return g, index % len(self.moods), face, background

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
        mood = self.moods[label]
        if mood == "smiling":  # the lower arc of a circle
            mouth = (((x ** 2 + (y - mouth_y) ** 2).sqrt() - mouth_r).abs() <= 0.08) & (y > mouth_y + 0.1)
        elif mood == "frowning":  # the upper arc of a circle below the mouth line
            mouth = (((x ** 2 + (y - mouth_y - 0.75) ** 2).sqrt() - mouth_r).abs() <= 0.08) & (y < mouth_y + 0.65)
        elif mood == "surprised":  # a ring
            mouth = ((x ** 2 + (y - mouth_y - 0.45) ** 2).sqrt() - 0.45 * mouth_r).abs() <= 0.08
        else:  # neutral: a straight line
            mouth = ((y - mouth_y - 0.45).abs() <= 0.08) & (x.abs() <= 0.8 * mouth_r)
        ink = torch.tensor([0.1, 0.05, 0.0]).view(3, 1, 1)
        image = torch.tensor(BACKGROUNDS[background]).view(3, 1, 1).expand(3, s, s)
        image = torch.where(x ** 2 + y ** 2 <= 1, torch.tensor(FACE_COLOURS[face]).view(3, 1, 1), image)
        image = torch.where(((x.abs() - eye_x) ** 2 + (y - eye_y) ** 2).sqrt() <= eye_r, ink, image)  # both eyes
        image = torch.where(mouth, ink, image)
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
#                       Text encoders for cross-attention                       #
#################################################################################

class CaptionEncoder(nn.Module):
    """The built-in text encoder, learned with the model: word embeddings and a small transformer.

    It needs no download. Its vocabulary, the words of the training captions that it reads (the first
    max_words of each), is saved with the model; index 0 pads, 1 stands for an unknown word, 2 starts every
    caption (so that "" still has a token). A word is a run of letters or digits in any script, lower-cased
    ("école", "猫"), and each symbol such as an emoji is a word of its own; punctuation is dropped.
    """

    special = ["<pad>", "<unknown>", "<start>"]
    max_words = 32

    def __init__(self, vocabulary: list[str], dim: int, depth: int = 2):
        super().__init__()
        assert vocabulary[:3] == self.special, "the vocabulary starts with the special tokens"
        self.vocabulary = vocabulary
        self.index = {word: i for i, word in enumerate(vocabulary)}
        self.embed = nn.Embedding(len(vocabulary), dim)
        self.position = nn.Parameter(torch.randn(1, self.max_words + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, max(1, dim // 64), 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)

    @staticmethod
    def words(caption: str) -> list[str]:
        text = unicodedata.normalize("NFC", caption).lower()
        tokens = re.findall(r"\w+(?:'\w+)*|[^\w\s]", text)  # words ("don't" is one), and single other characters
        return [t for t in tokens if not unicodedata.category(t[0]).startswith("P")]  # without punctuation

    @classmethod
    def build_vocabulary(cls, captions: list[str]) -> list[str]:
        """The special tokens and every word the encoder reads: the first max_words of each caption."""
        longer = sum(len(cls.words(caption)) > cls.max_words for caption in captions)
        if longer:
            warn(f"{plural(longer, 'caption')} of more than {cls.max_words} words: the model reads the first {cls.max_words}")
        return cls.special + sorted({word for caption in captions for word in cls.words(caption)[:cls.max_words]})

    def forward(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The context tokens (B, S, D) of the captions, padded to the longest, and their mask (B, S): False on padding."""
        rows = [[2] + [self.index.get(word, 1) for word in self.words(c)][:self.max_words] for c in captions]
        length = max(len(row) for row in rows)
        tokens = torch.tensor([row + [0] * (length - len(row)) for row in rows], device=self.position.device)  # (B, S)
        mask = tokens != 0  # (B, S)
        x = self.embed(tokens) + self.position[:, :length]  # (B, S, D)
        return self.transformer(x, src_key_padding_mask=~mask), mask  # (B, S, D), (B, S)


class PretrainedTextEncoder(nn.Module):
    """A frozen pretrained text encoder from the transformers library (e.g. a CLIP text model), by name or path."""

    def __init__(self, name: str):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer  # optional: only this encoder needs transformers

        self.tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModel.from_pretrained(name)
        self.encoder = (model.text_model if hasattr(model, "text_model") else model).requires_grad_(False).eval()
        self.dim = self.encoder.config.hidden_size

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: always in eval mode

    @torch.no_grad()
    def forward(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The context tokens (B, S, hidden) of the captions, padded to the longest, and their mask (B, S): False on padding."""
        device = next(self.encoder.parameters()).device
        tokens = self.tokenizer(captions, padding=True, truncation=True, return_tensors="pt").to(device)
        return self.encoder(**tokens).last_hidden_state, tokens["attention_mask"].bool()  # (B, S, hidden), (B, S)


def load_pretrained_text_encoder(name: str | None, device: torch.device) -> PretrainedTextEncoder | None:
    if name is None:
        return None
    try:
        return PretrainedTextEncoder(name).to(device)
    except ImportError:
        raise UserError(f"the text encoder {name} needs the transformers package: pip install transformers")
    except Exception as error:
        raise UserError(f"could not load the text encoder {name}: {str(error).strip().splitlines()[0]}")


#################################################################################
#                           Latents: a pretrained VAE                           #
#################################################################################

class VAE:
    """A frozen pretrained autoencoder from diffusers (AutoencoderKL), by hub name or local folder: images
    (B, 3, H, W) in [-1, 1] to latents (B, C, H/f, W/f) and back, scaled as the model was trained (as DiT does)."""

    def __init__(self, name: str, device: torch.device):
        try:
            from diffusers import AutoencoderKL  # optional: only latent training needs diffusers
        except ImportError:
            raise UserError(f"the VAE {name} needs the diffusers package: pip install diffusers")
        if not Path(name).exists() and not re.fullmatch(r"[\w-][\w.-]*/[\w-][\w.-]*", name):
            raise UserError(f"the VAE {name} is neither a folder nor a hub name like stabilityai/sd-vae-ft-ema")
        try:
            model = AutoencoderKL.from_pretrained(name, low_cpu_mem_usage=False)
        except Exception as error:
            reason = str(error).strip().splitlines()[0]
            if Path(name).exists():
                raise UserError(f"could not load the VAE from the folder {name}: {reason}")
            from huggingface_hub import try_to_load_from_cache
            from huggingface_hub.constants import HF_HUB_CACHE
            if not isinstance(try_to_load_from_cache(name, "config.json"), str):
                raise UserError(f"could not load the VAE {name}: it is not in the Hugging Face cache ({HF_HUB_CACHE}) and "
                                f"could not be downloaded; connect to the network for the first run, or give a local folder")
            raise UserError(f"could not load the VAE {name} from the Hugging Face cache ({HF_HUB_CACHE}): {reason}")
        self.name, self.model = name, model.requires_grad_(False).eval().to(device)
        config = model.config
        self.channels, self.factor = config.latent_channels, 2 ** (len(config.block_out_channels) - 1)  # C, f
        self.scale, self.shift = config.scaling_factor, getattr(config, "shift_factor", None) or 0.0

    @torch.no_grad()
    def moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean and standard deviation of the latent distribution of images (B, 3, H, W), scaled."""
        latent = self.model.encode(images).latent_dist
        return (latent.mean - self.shift) * self.scale, latent.std * self.scale  # (B, C, H/f, W/f) each

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch: int = 16) -> torch.Tensor:
        """Images (..., 3, H, W) in [-1, 1] from latents (..., C, H/f, W/f): images, or clips frame by frame."""
        flat = latents.flatten(0, -4).float()  # (frames, C, h, w)
        images = torch.cat([self.model.decode(part / self.scale + self.shift).sample for part in flat.split(batch)])
        return images.clamp(-1, 1).view(*latents.shape[:-3], *images.shape[1:])


class Latents(Dataset):
    """A folder data set (ImageFolder or ClipFolder) encoded once by a VAE: every frame, and its mirror image
    unless the folder's flip is off.

    The encoding is cached in a file, with what it was made from (the VAE, the image size, the flips and every
    file's name relative to the folder and its size); it is made again when any of them differs. The encoding
    goes chunk by chunk into a folder beside the cache, so that a run stopped while encoding goes on from its last
    chunk. With several processes (rank of world), the first decides whether to encode, each encodes its share of
    the chunks, and the first puts the cache together. A file that does not decode is skipped with a warning. Each
    item draws a fresh sample of the latent distribution of a random flip: (C, h, w) for an image; for a clip, T
    frames `stride` apart from a random start, (T, C, h, w). Labels and captions come from the folder.
    """

    chunk = 256  # items a chunk file holds

    def __init__(self, source: Folder, vae: VAE, image_size: int, cache: Path, device: torch.device,
                 rank: int = 0, world: int = 1):
        key = {"vae": vae.name, "image_size": image_size, "flips": 2 if source.flip else 1,
               "files": [(str(p.relative_to(source.folder)), p.stat().st_size) for p in source.files]}
        digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()
        contents = self.read(cache, digest) if rank == 0 else None
        encode = [rank == 0 and contents is None]  # the first process decides for all
        if world > 1:
            dist.broadcast_object_list(encode, src=0)
        if encode[0]:
            self.make_cache(source, vae, digest, key["flips"], cache, device, rank, world)
        if contents is None:  # just written, or another process's decision
            contents = self.read(cache, digest)
        assert contents is not None, f"{cache} was just written"
        self.mean, self.std, self.first = contents["mean"], contents["std"], contents["first"].tolist()
        self.clips = isinstance(source, ClipFolder)
        self.frames, self.stride = (source.frames, source.stride) if self.clips else (1, 1)
        kept = contents["kept"].tolist()  # the items whose files decoded
        self.class_names = source.class_names
        self.labels = [source.labels[i] for i in kept] if source.labels is not None else None
        self.captions = [source.captions[i] for i in kept] if source.captions is not None else None

    @staticmethod
    def read(path: Path, digest: str, say: bool = True) -> dict | None:
        """The contents of the cache (or of a chunk, with say=False) if they were made from what digest sums up,
        else None, saying why for the cache."""
        if not path.is_file():
            return None
        try:
            contents = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # cut short by a full disk or a killed run, or not written by train.py
            if say:
                print(f"{path} cannot be read (cut short, or not written by train.py): encoding again")
            return None
        if not isinstance(contents, dict) or contents.get("digest") != digest:
            if say:
                print(f"{path} was encoded from other data, another image size, other flips or another VAE: "
                      f"encoding again")
            return None
        return contents

    @classmethod
    def make_cache(cls, source: Folder, vae: VAE, digest: str, flips: int, cache: Path, device: torch.device,
                   rank: int, world: int, batch: int = 16):
        """Encode this process's chunks (chunk c is process c mod world's) that are not yet in the chunk folder;
        then the first process puts every chunk together into the cache and removes the folder."""
        parts = cache.with_name(f"{cache.name}.parts")
        chunks = range(math.ceil(len(source) / cls.chunk))
        chunk_file = lambda c: parts / f"{c:06d}.pt"  # noqa: E731
        if rank == 0:
            parts.mkdir(exist_ok=True)
        if world > 1:
            dist.barrier()  # the folder exists
        mine = [c for c in chunks if c % world == rank and cls.read(chunk_file(c), digest, say=False) is None]
        done = len(chunks) - len(mine) if world == 1 else 0
        progress = tqdm(total=len(chunks), initial=done, unit="chunk", desc=f"encoding --data with the VAE, once "
                        f"({cls.chunk} items a chunk, kept in {parts})", dynamic_ncols=True, disable=rank > 0,
                        file=Terminal())
        for c in mine:
            means, stds = [], []  # an item's (F, flips, C, h, w) each, or None where its file does not decode
            for index in range(c * cls.chunk, min((c + 1) * cls.chunk, len(source))):
                frames = source.decoded(index)  # (F, 3, S, S), or None, with a warning
                mean = std = None
                if frames is not None:
                    views = torch.stack([frames, frames.flip(-1)][:flips], dim=1).flatten(0, 1)  # (F flips, 3, S, S)
                    moments = [vae.moments(part.to(device)) for part in views.split(batch)]
                    mean, std = (torch.cat(m).unflatten(0, (-1, flips)).half().cpu() for m in zip(*moments))
                means.append(mean)
                stds.append(std)
            save_atomically({"digest": digest, "mean": means, "std": stds}, chunk_file(c))
            progress.update()
        progress.close()
        if world > 1:
            dist.barrier()  # every chunk is written
        if rank == 0:
            means, stds = [], []
            for c in chunks:
                chunk = cls.read(chunk_file(c), digest, say=False)
                means += chunk["mean"]
                stds += chunk["std"]
            kept = [i for i, mean in enumerate(means) if mean is not None]
            if not kept:
                raise UserError(f"none of the {plural(len(source), 'file')} in {source.folder} decodes")
            counts = torch.tensor([0] + [len(means[i]) for i in kept])
            save_atomically({"digest": digest, "mean": torch.cat([means[i] for i in kept]),
                             "std": torch.cat([stds[i] for i in kept]), "first": counts.cumsum(0),
                             "kept": torch.tensor(kept)}, cache)
            shutil.rmtree(parts)
        if world > 1:
            dist.barrier()  # the cache is written

    def __len__(self):
        return len(self.first) - 1

    def __getitem__(self, index):
        start, flip = self.first[index], torch.randint(self.mean.shape[1], ()).item()
        if self.clips:
            span = (self.frames - 1) * self.stride + 1
            start += torch.randint(self.first[index + 1] - start - span + 1, ()).item()
        frames = slice(start, start + (self.frames - 1) * self.stride + 1, self.stride)
        mean, std = self.mean[frames, flip].float(), self.std[frames, flip].float()  # (T, C, h, w)
        x = mean + std * torch.randn_like(std)  # a sample of the latent distribution
        item = {"x": x if self.clips else x[0]}
        if self.labels is not None:
            item["y"] = self.labels[index]
        if self.captions is not None:
            item["caption"] = self.captions[index]
        return item


#################################################################################
#                          Checkpoints and sample files                         #
#################################################################################

def written_atomically(path: Path, write) -> None:
    """write(temporary) to a hidden temporary file beside path, then rename it over path: a crash never leaves a
    broken file, nor one that a reader of *.png takes for a sample. A failed write (a full disk) removes the
    temporary file and keeps the old one. Where path is a link, the file it points to is replaced."""
    path = Path(os.path.realpath(path))
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        write(temporary)
        os.replace(temporary, path)
    except (OSError, RuntimeError) as error:  # torch.save's zip writer raises RuntimeError on a full disk
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error).strip().splitlines()[0]
        if isinstance(error, RuntimeError) and shutil.disk_usage(path.parent).free < 2 ** 20:
            reason = "No space left on device"  # what the zip writer's "unexpected pos" means
        temporary.unlink(missing_ok=True)
        kept = "; the one there before is kept" if path.exists() else ""
        raise UserError(f"could not write {path}: {reason}{kept}")


def save_atomically(contents: dict, path: Path) -> None:
    """torch.save, written atomically (written_atomically), flushed to the disk before the rename."""
    def write(temporary: Path):
        with open(temporary, "wb") as f:
            torch.save(contents, f)
            f.flush()
            os.fsync(f.fileno())
    written_atomically(path, write)


def check_writable(folder: Path, option: str) -> None:
    """Make folder if need be and write a file in it, so that a folder that cannot be written fails before any work."""
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{option} {folder} is a file; name a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise UserError(f"{option} {folder} cannot be written: {error.strerror or error}")


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
    # A checkpoint stripped for release may hold no conditions at all: an unconditional model.
    checkpoint["conditioning"] = {"class_names": None, "vocabulary": None, "text_encoder": None,
                                  **(checkpoint["conditioning"] or {})}
    return checkpoint


RENAMED_CONFIG_FIELDS = {"scan": "path_family", "paths": "path_family", "scan_paths": "num_paths",  # older names
                         "video_scan": "video_pattern"}


def checkpoint_config(checkpoint: dict) -> dict:
    """The checkpoint's model config as ZigMaConfig's fields, with the names older checkpoints used renamed."""
    return {RENAMED_CONFIG_FIELDS.get(name, name): value for name, value in checkpoint["config"].items()}


def load_weights(networks: nn.ModuleDict, state: dict, path: Path, weights: str) -> None:
    """Load the checkpoint's weights (its "model" or "ema") into the networks, or say in one sentence which tensor
    is missing, unexpected or of another shape. Checkpoints written before the scan orders stopped being saved
    hold them too; the config gives them, so they are dropped."""
    state = {name: value for name, value in state.items() if not re.fullmatch(r"zigma\.scans\.\d+\.(order|inverse)", name)}
    needed = networks.state_dict()
    missing, unexpected = sorted(set(needed) - set(state)), sorted(set(state) - set(needed))
    if missing or unexpected:
        what = f"lack {missing[0]}" if missing else f"hold {unexpected[0]}, which the model has not"
        count = len(missing) + len(unexpected)
        raise UserError(f"{path} does not match the model its config describes: its {weights} weights {what}"
                        + (f", and {count - 1} more tensors differ" if count > 1 else ""))
    for name, value in state.items():
        if not isinstance(value, torch.Tensor) or value.shape != needed[name].shape:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise UserError(f"{path} does not match the model its config describes: its {weights} weights hold {name} "
                            f"of shape {shape}, where the model has {tuple(needed[name].shape)}")
    networks.load_state_dict(state)


def build_networks(config: ZigMaConfig, conditioning: dict) -> nn.ModuleDict:
    """What training optimises: the ZigMa, and the built-in caption encoder when it learns with it."""
    networks = nn.ModuleDict({"zigma": ZigMa(config)})
    if conditioning.get("vocabulary"):
        networks["text"] = CaptionEncoder(conditioning["vocabulary"], config.context_dim)
    return networks


def networks_from_checkpoint(checkpoint: dict, path: Path, weights: str = "ema") -> nn.ModuleDict:
    """Rebuild the networks from the checkpoint's config and load their weights ("ema" or "model")."""
    try:
        networks = build_networks(ZigMaConfig(**checkpoint_config(checkpoint)), checkpoint["conditioning"])
    except (TypeError, AssertionError, RuntimeError) as error:
        raise UserError(f"{path} does not match this version of ZigMa: {str(error).strip().splitlines()[0]}")
    load_weights(networks, checkpoint[weights], path, weights)
    broken = [name for name, p in networks.state_dict().items() if p.is_floating_point() and not torch.isfinite(p).all()]
    if broken:
        raise UserError(f"{path} holds NaN or infinite weights (in {plural(len(broken), 'tensor')}, {broken[0]} first): "
                        f"it comes from a run that diverged; train again with a lower --lr")
    return networks


def save_image(*args, **kwargs) -> None:
    from torchvision.utils import save_image  # torchvision takes 3 s to import: only image files need it
    save_image(*args, **kwargs)


def make_grid(*args, **kwargs) -> torch.Tensor:
    from torchvision.utils import make_grid
    return make_grid(*args, **kwargs)


def save_samples(samples: torch.Tensor, path: Path, fps: int = 8) -> None:
    """Save images (B, 3, H, W) in [-1, 1] as one grid, or clips (B, T, 3, H, W) as one animated grid GIF; atomically."""
    samples = samples.float().clamp(-1, 1) * 0.5 + 0.5
    nrow = math.ceil(math.sqrt(samples.shape[0]))
    if samples.dim() == 4:
        image_format = Image.registered_extensions()[path.suffix.lower()]  # the temporary file's name has no extension
        written_atomically(path, lambda temporary: save_image(samples, temporary, nrow=nrow, format=image_format))
        return
    frames = [make_grid(samples[:, t], nrow=nrow).mul(255).round().byte().permute(1, 2, 0).numpy()
              for t in range(samples.shape[1])]  # (H', W', 3) each
    images = [Image.fromarray(frame) for frame in frames]
    written_atomically(path, lambda temporary: images[0].save(temporary, format="GIF", save_all=True,
                                                              append_images=images[1:], duration=1000 // fps, loop=0))


#################################################################################
#                                    Devices                                    #
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
