"""Draw samples from a ZigMa checkpoint written by train.py.

    python sample.py                                                   # out/ckpt.pt -> samples.png
    python sample.py --ckpt out/ckpt.pt --n 64 --steps 50 --out samples.png
    python sample.py --ckpt out/ckpt.pt --n 10000 --batch-size 250 --out-dir fid_samples   # one PNG each
    python sample.py --ckpt out/ckpt.pt --n 10000 --batch-size 250 --fid ./faces          # FID against a folder
    python sample.py --ckpt out/ckpt.pt --class smiling --cfg 3        # class-conditional; --class takes a name or index
    python sample.py --ckpt out/ckpt.pt --prompt "a pink frowning face" --prompt "a yellow smiling face" --cfg 3

Sampling integrates the learned ODE from noise (t = 0) to data (t = 1) with the EMA weights. A video
checkpoint writes an animated grid GIF (--out samples.gif) and, with --out-dir, one GIF per clip. A latent
checkpoint (train.py --vae) is decoded with the VAE it names, or with --vae where that folder has moved.
"""

import signal
import sys

QUIET_START = signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C while torch imports: one line
if QUIET_START:
    signal.signal(signal.SIGINT, lambda *_: sys.exit("sample.py: interrupted while starting; nothing was written"))

import argparse
import math
import re
from pathlib import Path

import torch
from tqdm import tqdm

from data import (IMAGE_EXTENSIONS, VAE, ArgumentParser, CaptionEncoder, ImageFolder, Terminal, UserError,
                  check_writable, image_transform, load_checkpoint, load_pretrained_text_encoder, networks_from_checkpoint,
                  pick_device, read_text, save_samples, warn)
from zigma import sample

if QUIET_START:
    signal.signal(signal.SIGINT, signal.default_int_handler)  # from here on, Ctrl-C is a KeyboardInterrupt

GRID_LIMIT = 256  # samples in the grid image; --out-dir takes any number
MAX_STEPS = 10_000  # ODE steps: sample quality stops changing long before
FID_FEATURES = 2048  # torchmetrics' FID network: Inception-v3's 2048 pooled features. The tests put a small one here.


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, default=Path("out/ckpt.pt"), help="checkpoint from train.py, or its --out folder (default: out/ckpt.pt)")
    parser.add_argument("--n", type=int, default=64, help="number of samples (default: 64)")
    parser.add_argument("--steps", type=int, default=50, help="ODE steps (default: 50)")
    parser.add_argument("--method", default="euler", choices=["euler", "heun"], help="ODE solver; Heun costs two model calls a step (default: euler)")
    parser.add_argument("--out", type=Path, help="a grid of the first 256 samples, .png, .jpg, .webp or .bmp; .gif for video "
                        "(default: samples.png, or samples.gif for video)")
    parser.add_argument("--out-dir", type=Path, help="also write every sample as its own PNG (GIF for video) here")
    parser.add_argument("--seed", type=int, default=0, help="random seed: the same seed gives the same samples (default: 0)")
    parser.add_argument("--device", help="cuda, mps or cpu (default: the first available)")
    parser.add_argument("--batch-size", type=int, default=64, help="samples per model call (default: 64)")
    parser.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    parser.add_argument("--class", dest="class_", help="class name or index for every sample (default: all classes in turn)")
    parser.add_argument("--prompt", action="append", help="a caption to sample (repeatable; samples cycle through them)")
    parser.add_argument("--prompts", type=Path, help="a file of captions, one per line")
    parser.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale; 1 = none (default: 1)")
    parser.add_argument("--fid", type=Path, metavar="REAL_FOLDER", help="print the FID of the samples against the images "
                        "in this folder (torchmetrics, with torch-fidelity's Inception-v3; its weights download once)")
    parser.add_argument("--vae", metavar="NAME_OR_PATH", help="decode with this VAE, for a latent model whose VAE folder "
                        "has moved (default: the one the checkpoint names)")
    return parser.parse_args(argv)


def label_for(args, class_names: list[str] | None) -> int | None:
    """The label of --class, -1 for every class in turn, or None for an unconditional model."""
    if class_names is None:
        if args.class_ is not None:
            raise UserError(f"{args.ckpt} was trained without classes; leave out --class")
        return None
    if args.class_ is None:
        return -1
    if args.class_ in class_names:
        return class_names.index(args.class_)
    if re.fullmatch(r"[0-9]+", args.class_) and int(args.class_) < len(class_names):
        return int(args.class_)
    raise UserError(f"unknown class {args.class_!r}; the classes are {', '.join(class_names)} (or 0 to {len(class_names) - 1})")


def prompts_for(args, conditioning: dict) -> list[str] | None:
    """The captions to cycle through, from --prompt and --prompts; None when there are none."""
    prompts = list(args.prompt or [])
    if args.prompts:
        if not args.prompts.is_file():
            raise UserError(f"--prompts {args.prompts} is not a file")
        prompts += [line.strip() for line in read_text(args.prompts).splitlines() if line.strip()]
    if not prompts:
        return None
    if not (conditioning["vocabulary"] or conditioning["text_encoder"]):
        raise UserError(f"{args.ckpt} was trained without captions; leave out --prompt")
    if conditioning["vocabulary"]:
        known = set(conditioning["vocabulary"])
        unknown = sorted({word for prompt in prompts for word in CaptionEncoder.words(prompt)} - known)
        if unknown:
            warn(f"the model never saw the words {', '.join(unknown)} in training; it reads them as 'unknown'")
        for prompt in prompts:
            if not CaptionEncoder.words(prompt):
                warn(f"the prompt {prompt!r} has no words; it samples the empty caption")
    return prompts


def output_path(args, video: bool) -> Path:
    """The grid's file, checked before any sampling: an extension PIL writes, in a folder that exists or is made now."""
    out = args.out or Path("samples.gif" if video else "samples.png")
    allowed = [".gif"] if video else sorted(IMAGE_EXTENSIONS - {".gif"})
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; name a file in it, or use --out-dir for one file per sample")
    if out.suffix.lower() not in allowed:
        raise UserError(f"--out {out}: write {'clips' if video else 'images'} to a file ending in {', '.join(allowed)}")
    check_writable(out.parent, "--out's folder")
    if args.out_dir is not None:
        check_writable(args.out_dir, "--out-dir")
    return out


def to_bytes(images: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] as uint8 (B, 3, H, W), rounded as save_samples rounds them into PNGs."""
    return ((images.float().clamp(-1, 1) * 0.5 + 0.5) * 255 + 0.5).clamp(0, 255).byte()


class FID:
    """FID (torchmetrics' FrechetInceptionDistance) between the samples and the images of a folder. The real images
    are resized and centre-cropped to the samples' size as train.py reads them, and both sets are rounded to 8 bits
    as PNGs are. Everything that can fail fast (the folder, the extras, the download) fails when it is built."""

    def __init__(self, folder: Path, device: torch.device):
        if not folder.is_dir():
            raise UserError(f"--fid {folder} is not a folder of images")
        self.device = device
        self.real = ImageFolder(folder, image_size=1, option="--fid")  # its transform is set once the samples' size is known
        if len(self.real) < 2:
            raise UserError(f"--fid {folder} holds one image; FID needs two or more, and thousands to mean much")
        try:
            from torchmetrics.image.fid import FrechetInceptionDistance
            self.metric = FrechetInceptionDistance(feature=FID_FEATURES).to(device)
        except ModuleNotFoundError as error:  # torchmetrics, or the torch-fidelity it needs for Inception
            raise UserError(f"--fid needs torchmetrics and torch-fidelity ({error}): pip install torchmetrics torch-fidelity")
        except (OSError, RuntimeError) as error:  # the weights' download (no network, a proxy), or a corrupt file
            raise UserError(f"--fid: the Inception weights could not be fetched ({error}); they download once, on first "
                            f"use, and need the network then")

    def add_samples(self, samples: torch.Tensor) -> None:  # (B, 3, H, W) in [-1, 1]
        self.metric.update(to_bytes(samples).to(self.device), real=False)
        self.size = samples.shape[-1]

    def compute(self, batch: int = 64) -> float:
        """The FID of the samples added so far against every image of the folder, resized to their size."""
        self.real.transform = image_transform(self.size)
        images, self.used = [], 0
        for i in tqdm(range(len(self.real)), desc="FID: real images", file=Terminal()):
            image = self.real.decoded(i)  # (1, 3, H, W), or None (with a warning) where the file does not decode
            if image is not None:
                images.append(image)
                self.used += 1
            if images and (len(images) == batch or i == len(self.real) - 1):
                self.metric.update(to_bytes(torch.cat(images)).to(self.device), real=True)
                images = []
        return self.metric.compute().item()


def main(argv=None):
    args = parse_args(argv)
    if args.n < 1 or args.steps < 1 or args.batch_size < 1:
        raise UserError("--n, --steps and --batch-size must be 1 or more")
    if args.steps > MAX_STEPS:
        raise UserError(f"--steps must be {MAX_STEPS} or less, not {args.steps}")
    if not 0 <= args.seed < 2 ** 63:
        raise UserError(f"--seed must be between 0 and 2^63 - 1, not {args.seed}")
    if args.n > GRID_LIMIT and args.out_dir is None:
        raise UserError(f"--n {args.n}: the grid holds the first {GRID_LIMIT} samples; pass --out-dir to keep them all, "
                        f"or --n {GRID_LIMIT} or fewer")
    if args.fid is not None and args.out_dir is not None and args.out_dir.resolve().is_relative_to(args.fid.resolve()):
        raise UserError(f"--out-dir {args.out_dir} is inside --fid {args.fid}: the samples would count as real images; "
                        f"pass an --out-dir outside it")
    if args.fid is not None and args.n < 2:
        raise UserError(f"--fid needs 2 samples or more, and thousands to mean much, not --n {args.n}")
    if not 0 <= args.cfg < math.inf:
        raise UserError(f"--cfg must be 0 or more (1 is no guidance) and finite, not {args.cfg}")
    if args.ckpt.is_dir():
        args.ckpt = args.ckpt / "ckpt.pt"  # a training run's --out folder
    device = pick_device(args.device)
    checkpoint = load_checkpoint(args.ckpt)
    conditioning = checkpoint["conditioning"]
    video = checkpoint["config"]["frames"] > 0
    out = output_path(args, video)
    if args.fid is not None and video:
        raise UserError(f"{args.ckpt} is a video model; --fid is for images")
    label, prompts = label_for(args, conditioning["class_names"]), prompts_for(args, conditioning)
    captioned = bool(conditioning["vocabulary"] or conditioning["text_encoder"])
    if args.cfg != 1 and label is None and prompts is None:
        raise UserError("--cfg guides towards a prompt: add --prompt, or leave out --cfg" if captioned else
                        f"{args.ckpt} was trained without classes or captions, so --cfg has nothing to guide towards; leave it out")
    if captioned and prompts is None:
        print(f"{args.ckpt} was trained on captions; without --prompt its samples are not conditioned on one")
    trained_vae = checkpoint.get("vae")
    if args.vae and not trained_vae:
        raise UserError(f"{args.ckpt} was trained on pixels, not latents; leave out --vae")
    try:
        vae = VAE(args.vae or trained_vae, device) if trained_vae else None  # decodes the samples
    except UserError as error:
        if args.vae:
            raise
        raise UserError(f"{error}; {args.ckpt} was trained with it: where it has moved, pass --vae PATH")
    networks = networks_from_checkpoint(checkpoint, args.ckpt, "model" if args.no_ema else "ema").to(device).eval()
    model = networks["zigma"]
    encode = networks["text"] if "text" in networks else load_pretrained_text_encoder(conditioning["text_encoder"])
    if encode is not None:
        encode.to(device)
    fid = FID(args.fid, device) if args.fid is not None else None
    print(f"{args.ckpt}: step {checkpoint['step']}, {args.n} samples, {args.steps} {args.method} steps, cfg {args.cfg}, on {device}")

    generator = torch.Generator(device).manual_seed(args.seed)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    grid = []
    for start in tqdm(range(0, args.n, args.batch_size), file=Terminal()):
        batch = slice(start, min(start + args.batch_size, args.n))
        noise = torch.randn(batch.stop - start, *model.config.input_shape, generator=generator, device=device)
        y = None
        if label == -1:  # every class in turn
            y = torch.arange(start, batch.stop, device=device) % len(conditioning["class_names"])
        elif label is not None:
            y = torch.full((batch.stop - start,), label, device=device)
        captions = [prompts[i % len(prompts)] for i in range(start, batch.stop)] if prompts else None
        with torch.no_grad(), autocast:
            context, context_mask = encode(captions) if captions else (None, None)
            samples = sample(model, noise, steps=args.steps, y=y, context=context, context_mask=context_mask,
                             cfg_scale=args.cfg, method=args.method)
        if not torch.isfinite(samples).all():  # nothing is written from them
            raise UserError(f"samples {start} to {batch.stop - 1} are NaN or infinite: {args.ckpt} comes from a run that "
                            f"diverged" + (f", or --cfg {args.cfg:g} is too strong" if args.cfg > 1 else ""))
        samples = (vae.decode(samples) if vae else samples).float().cpu()  # (B, 3, H, W), or (B, T, 3, H, W) for clips
        if args.out_dir:
            for i, one in enumerate(samples):
                save_samples(one[None], args.out_dir / f"{start + i:06d}.{'gif' if video else 'png'}")
        if fid:
            fid.add_samples(samples)
        grid.append(samples[:max(0, GRID_LIMIT - start)])
    save_samples(torch.cat(grid), out)
    print(f"wrote {out}" + (f" and {args.n} files in {args.out_dir}" if args.out_dir else ""))
    if fid:
        value = fid.compute()
        print(f"FID {value:.2f}: {args.n} samples against the {fid.used} images of {args.fid}, at "
              f"{fid.size} x {fid.size} px (FID falls as samples are added: compare it only at equal --n; papers use 50,000)")


if __name__ == "__main__":
    try:
        main()
    except UserError as error:
        sys.exit(f"sample.py: {error}")
    except KeyboardInterrupt:
        sys.exit("sample.py: interrupted; the files written so far are kept")
