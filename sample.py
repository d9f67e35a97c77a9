"""Draw samples from a ZigMa checkpoint written by train.py.

    python sample.py                                                   # out/ckpt.pt -> samples.png
    python sample.py --ckpt out/ckpt.pt --n 64 --steps 50 --out samples.png
    python sample.py --ckpt out/ckpt.pt --n 10000 --batch-size 250 --out-dir fid_samples   # one PNG each, for FID

Sampling integrates the learned ODE from noise (t = 0) to data (t = 1) with the EMA weights.
"""

import argparse
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from train import UserError, load_checkpoint, model_from_checkpoint, pick_device, save_grid
from zigma import sample

GRID_LIMIT = 256  # samples in the grid image; --out-dir takes any number


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, default=Path("out/ckpt.pt"), help="checkpoint from train.py (default: out/ckpt.pt)")
    parser.add_argument("--n", type=int, default=64, help="number of samples (default: 64)")
    parser.add_argument("--steps", type=int, default=50, help="ODE steps (default: 50)")
    parser.add_argument("--method", default="euler", choices=["euler", "heun"], help="ODE solver; Heun costs two model calls a step (default: euler)")
    parser.add_argument("--out", type=Path, default=Path("samples.png"), help="a grid of the first 256 samples (default: samples.png)")
    parser.add_argument("--out-dir", type=Path, help="also write every sample as its own PNG here")
    parser.add_argument("--seed", type=int, default=0, help="random seed: the same seed gives the same samples (default: 0)")
    parser.add_argument("--device", help="cuda, mps or cpu (default: the first available)")
    parser.add_argument("--batch-size", type=int, default=64, help="samples per model call (default: 64)")
    parser.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.n < 1 or args.steps < 1 or args.batch_size < 1:
        raise UserError("--n, --steps and --batch-size must be positive")
    device = pick_device(args.device)
    checkpoint = load_checkpoint(args.ckpt)
    model = model_from_checkpoint(checkpoint, args.ckpt, "model" if args.no_ema else "ema").to(device).eval()
    config = model.config
    shape = (config.in_channels, config.input_size, config.input_size)
    print(f"{args.ckpt}: step {checkpoint['step']}, {args.n} samples, {args.steps} {args.method} steps, on {device}")

    generator = torch.Generator(device).manual_seed(args.seed)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    if args.out_dir:
        args.out_dir.mkdir(parents=True, exist_ok=True)
    samples = []
    for start in tqdm(range(0, args.n, args.batch_size)):
        count = min(args.batch_size, args.n - start)
        noise = torch.randn(count, *shape, generator=generator, device=device)
        with autocast:
            images = sample(model, noise, steps=args.steps, method=args.method).float().cpu()
        if args.out_dir:
            for i, image in enumerate(images):
                save_grid(image[None], args.out_dir / f"{start + i:06d}.png")
        samples.append(images)
    save_grid(torch.cat(samples)[:GRID_LIMIT], args.out)
    print(f"wrote {args.out}" + (f" and {args.n} PNGs in {args.out_dir}" if args.out_dir else ""))


if __name__ == "__main__":
    try:
        main()
    except UserError as error:
        sys.exit(f"sample.py: {error}")
