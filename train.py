"""Train ZigMa with flow matching on a folder of images, or on built-in smiley faces.

    python train.py                                      # built-in smiley faces; a tiny model, fine on a CPU
    python train.py --data ./faces --image-size 64 --model ZigMa-S/2 --steps 200000
    python train.py --data ./faces --image-size 64 --model ZigMa-S/2 --steps 400000   # resumes from out/ckpt.pt

Everything goes to --out (default out/): ckpt.pt (model, EMA, optimizer, step, config and arguments),
samples_STEP.png (a grid from the EMA weights) and log.jsonl (the loss). Re-running a command resumes from
OUT/ckpt.pt; a larger --steps trains on. Sample from a checkpoint with sample.py.
"""

import argparse
import copy
import json
import math
import os
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from torchvision.utils import save_image
from tqdm import tqdm

from zigma import PRESETS, ZigMa, ZigMaConfig, flow_loss, preset_config, sample

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"}


class UserError(Exception):
    """A mistake in the command line or the files it names: reported in one sentence, without a traceback."""


#################################################################################
#                                     Data                                      #
#################################################################################

def image_files(folder: Path) -> list[Path]:
    """Every image under folder, recursively, sorted."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def readable(path: Path) -> bool:
    """True when PIL recognises the file as an image (the header; a truncated file shows up at load time)."""
    try:
        with Image.open(path) as image:
            image.verify()
        return True
    except Exception:
        return False


def load_rgb(path: Path) -> Image.Image:
    """Any image as RGB; for an animated GIF, its first frame."""
    with Image.open(path) as image:
        image.seek(0)
        return image.convert("RGB")


class ImageFolder(Dataset):
    """The images under a folder, as (3, S, S) tensors in [-1, 1]: resized, centre-cropped, randomly flipped."""

    def __init__(self, folder: Path, image_size: int):
        if not folder.is_dir():
            raise UserError(f"--data {folder} is not a folder; point it at a folder of images")
        files = image_files(folder)
        if not files:
            raise UserError(f"--data {folder} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        self.files = [p for p in files if readable(p)]
        for p in sorted(set(files) - set(self.files)):
            warnings.warn(f"skipping {p}: not a readable image")
        if not self.files:
            raise UserError(f"--data {folder}: none of its {len(files)} image files could be read")
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
            return self.transform(load_rgb(self.files[index]))
        except Exception as error:  # a file that passed the header check but does not decode
            warnings.warn(f"skipping {self.files[index]}: {error}")
            return self[(index + 1) % len(self)]


class SmileyFaces(Dataset):
    """Procedurally drawn smiley faces, (3, S, S) in [-1, 1]: a built-in data set that needs no download.

    Each index draws one face from its own seed: face colour, size and position, eye spacing, smile width.
    """

    def __init__(self, image_size: int, size: int = 100_000):
        self.image_size, self.size = image_size, size

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        g = torch.Generator().manual_seed(index)
        u = lambda low, high: low + (high - low) * torch.rand((), generator=g).item()  # noqa: E731
        s = self.image_size
        y, x = torch.meshgrid(torch.linspace(-1, 1, s), torch.linspace(-1, 1, s), indexing="ij")  # (S, S) each
        cx, cy, r = u(-0.15, 0.15), u(-0.15, 0.15), u(0.6, 0.8)
        x, y = (x - cx) / r, (y - cy) / r  # face coordinates: the face is the unit disc
        background = torch.rand(3, 1, 1, generator=g) * 0.5  # dark
        face = torch.tensor([u(0.8, 1.0), u(0.6, 0.9), u(0.0, 0.3)]).view(3, 1, 1)  # yellow to orange
        ink = torch.tensor([0.1, 0.05, 0.0]).view(3, 1, 1)
        eye_x, eye_y, eye_r = u(0.25, 0.4), u(-0.45, -0.25), u(0.1, 0.16)
        smile_r, smile_y = u(0.45, 0.6), u(-0.05, 0.1)
        smile_distance = ((x ** 2 + (y - smile_y) ** 2).sqrt() - smile_r).abs()
        masks = [
            (x ** 2 + y ** 2 <= 1, face),
            (((x.abs() - eye_x) ** 2 + (y - eye_y) ** 2).sqrt() <= eye_r, ink),  # both eyes
            ((smile_distance <= 0.08) & (y > smile_y + 0.1), ink),  # the lower arc of a circle
        ]
        image = background.expand(3, s, s).clone()
        for mask, colour in masks:
            image = torch.where(mask, colour, image)
        return image * 2 - 1


#################################################################################
#                                  Checkpoints                                  #
#################################################################################

def pick_device(name: str | None) -> torch.device:
    """The device asked for, else cuda, then mps, then cpu."""
    if name:
        try:
            device = torch.device(name)
            torch.empty(0, device=device)
        except Exception:
            raise UserError(f"--device {name} is not available on this machine")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


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
    missing = {"model", "ema", "config", "step"} - set(checkpoint) if isinstance(checkpoint, dict) else {"all"}
    if missing:
        raise UserError(f"{path} is not a ZigMa checkpoint from train.py (it lacks {', '.join(sorted(missing))})")
    return checkpoint


def model_from_checkpoint(checkpoint: dict, path: Path, weights: str = "ema") -> ZigMa:
    """Rebuild the model from the checkpoint's config and load its weights ("ema" or "model")."""
    try:
        model = ZigMa(ZigMaConfig(**checkpoint["config"]))
        model.load_state_dict(checkpoint[weights])
    except (TypeError, AssertionError, RuntimeError) as error:
        first_line = str(error).strip().splitlines()[0]
        raise UserError(f"{path} does not match this version of ZigMa: {first_line}")
    return model


def save_grid(images: torch.Tensor, path: Path) -> None:
    """Save (B, 3, H, W) images in [-1, 1] as one grid."""
    save_image(images.float().clamp(-1, 1) * 0.5 + 0.5, path, nrow=math.ceil(math.sqrt(images.shape[0])))


#################################################################################
#                                   Training                                    #
#################################################################################

@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for ema_p, p in zip(ema.parameters(), model.parameters()):
        ema_p.lerp_(p, 1 - decay)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="folder of images, searched recursively; default: built-in smiley faces")
    parser.add_argument("--out", type=Path, default=Path("out"), help="where checkpoint, samples and log go (default: out)")
    parser.add_argument("--model", default="ZigMa-Tiny/4", choices=sorted(PRESETS), help="preset (default: ZigMa-Tiny/4, small enough for a CPU)")
    parser.add_argument("--image-size", type=int, default=32, help="images are resized and cropped to this side (default: 32)")
    parser.add_argument("--scan", default="zigzag", choices=["zigzag", "sweep"], help="token paths (default: zigzag)")
    parser.add_argument("--scan-paths", type=int, default=8, help="K: layer i reads path i mod K (1, 2 or 8; default: 8)")
    parser.add_argument("--steps", type=int, default=2000, help="total optimizer steps; a larger value resumes a run (default: 2000)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per step (default: 32)")
    parser.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate (default: 3e-4)")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default: 0)")
    parser.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this (default: 1)")
    parser.add_argument("--ema-decay", type=float, default=0.999, help="EMA decay, warmed up as min(decay, (1+step)/(10+step)) (default: 0.999)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--device", help="cuda, mps or cpu (default: the first available)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA)")
    parser.add_argument("--workers", type=int, default=2, help="data-loading processes (default: 2)")
    parser.add_argument("--sample-every", type=int, default=500, help="save a sample grid every this many steps (default: 500)")
    parser.add_argument("--sample-steps", type=int, default=50, help="Euler steps for those samples (default: 50)")
    parser.add_argument("--ckpt-every", type=int, default=500, help="save the checkpoint every this many steps (default: 500)")
    parser.add_argument("--log-every", type=int, default=10, help="append the loss to log.jsonl every this many steps (default: 10)")
    return parser.parse_args(argv)


def build_config(args) -> ZigMaConfig:
    patch = PRESETS[args.model]["patch_size"]
    if args.image_size % patch:
        raise UserError(f"--image-size {args.image_size} is not a multiple of {args.model}'s patch size {patch}")
    if not 1 <= args.scan_paths <= 8:
        raise UserError(f"--scan-paths must be between 1 and 8, not {args.scan_paths}")
    return preset_config(args.model, input_size=args.image_size, in_channels=3, scan=args.scan, scan_paths=args.scan_paths)


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = pick_device(args.device)
    config = build_config(args)
    dataset = ImageFolder(args.data, args.image_size) if args.data else SmileyFaces(args.image_size)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=len(dataset) >= args.batch_size,
                        num_workers=args.workers, pin_memory=device.type == "cuda", persistent_workers=args.workers > 0)

    model = ZigMa(config).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)  # the EMA weights are what we sample from
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    step = 0

    args.out.mkdir(parents=True, exist_ok=True)
    ckpt_path = args.out / "ckpt.pt"
    if ckpt_path.exists():  # resume
        checkpoint = load_checkpoint(ckpt_path)
        if checkpoint["config"] != asdict(config):
            raise UserError(f"{ckpt_path} holds a different model ({checkpoint['args'].get('model')}, "
                            f"--image-size {checkpoint['config']['input_size']}); pass the same model options or another --out")
        model.load_state_dict(checkpoint["model"])
        ema.load_state_dict(checkpoint["ema"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        step = checkpoint["step"]
        print(f"resuming from {ckpt_path} at step {step}")
    if step >= args.steps:
        print(f"{ckpt_path} is already at step {step}; pass a larger --steps to train on")
        return

    def checkpoint_now():
        save_checkpoint({"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                         "step": step, "config": asdict(config), "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}},
                        ckpt_path)

    def sample_grid():
        generator = torch.Generator(device).manual_seed(args.seed)
        noise = torch.randn(16, *dataset[0].shape, generator=generator, device=device)
        save_grid(sample(ema, noise, steps=args.sample_steps), args.out / f"samples_{step:07d}.png")

    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    train_model = torch.compile(model) if args.compile else model
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    print(f"{args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"{len(dataset)} training images, on {device}")

    progress = tqdm(total=args.steps, initial=step, dynamic_ncols=True)
    started, images_seen = time.perf_counter(), 0
    try:
        while step < args.steps:
            for x in loader:
                x = x.to(device, non_blocking=True)
                with autocast:
                    loss = flow_loss(train_model, x)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)  # clip before the step
                optimizer.step()
                step += 1
                update_ema(ema, model, min(args.ema_decay, (1 + step) / (10 + step)))

                images_seen += x.shape[0]
                speed = images_seen / (time.perf_counter() - started)
                progress.update()
                progress.set_postfix(loss=f"{loss.item():.4f}", img_per_s=f"{speed:.1f}")
                if step % args.log_every == 0:
                    with open(args.out / "log.jsonl", "a") as log:
                        log.write(json.dumps({"step": step, "loss": round(loss.item(), 5), "images_per_s": round(speed, 2)}) + "\n")
                if step % args.sample_every == 0 or step == args.steps:
                    sample_grid()
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
