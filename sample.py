"""Draw samples from a ZigMa checkpoint written by train.py, with the EMA weights.

    python sample.py                                                   # out/ckpt.pt -> samples.png
    python sample.py --ckpt out --num-samples 10000 --out-dir fid_samples --fid ./faces   # one PNG each, and FID
    python sample.py --ckpt out --class smiling --cfg 3 --method dopri5   # a --class-cond run; --prompt: --captions
    torchrun --standalone --nproc_per_node 8 sample.py --ckpt out --num-samples 50000 --batch-size 512 --npz samples.npz

A video checkpoint writes an animated grid GIF; a latent one is decoded with the VAE it names. Sample i's noise
comes from (--seed, i), so any number of processes draws the same samples: under torchrun each draws its share
of every batch, and the first writes the files.
"""

import signal
import sys

QUIET_START = signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C while torch imports: one line
if QUIET_START:
    signal.signal(signal.SIGINT, lambda *_: sys.exit("sample.py: interrupted while starting; nothing was written"))

import argparse
import math
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data import (ArgumentParser, Terminal, UserError, load_checkpoint, load_pretrained_text_encoder,
                  networks_from_checkpoint, save_samples)
from plumbing import (FID, GRID_LIMIT, PRECISIONS, Conditions, CountedCalls, autocast_dtype, check_sampling_arguments,
                      end_processes, exit_message, gather, in_any_process, on_first, output_path, precision_name, process_shares,
                      sample_adaptive, sample_noise, start_processes, to_bytes, vae_for, write_npz)
from zigma import sample

if QUIET_START:
    signal.signal(signal.SIGINT, signal.default_int_handler)  # from here on, Ctrl-C is a KeyboardInterrupt


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, default=Path("out/ckpt.pt"), help="checkpoint from train.py, or its --out folder (default: out/ckpt.pt)")
    parser.add_argument("--num-samples", "--n", dest="n", type=int, default=64, help="how many; --n is the older name, "
                        "which torchrun refuses as an abbreviation of its own options (default: 64)")
    parser.add_argument("--sample-steps", "--steps", type=int, help="ODE steps of euler or heun; --steps is the older name (default: 50)")
    parser.add_argument("--method", default="euler", choices=["euler", "heun", "dopri5"],
                        help="ODE solver; dopri5 picks its own steps (pip install torchdiffeq) (default: euler)")
    parser.add_argument("--rtol", type=float, help="with --method dopri5: relative tolerance (default: 1e-3)")
    parser.add_argument("--atol", type=float, help="with --method dopri5: absolute tolerance (default: 1e-6)")
    parser.add_argument("--grid", "--out", type=Path, help="file of a grid of the first 256; --out is the older name (default: samples.png, .gif for video)")
    parser.add_argument("--out-dir", type=Path, help="also write every sample as its own PNG (GIF for video) here")
    parser.add_argument("--npz", type=Path, help="also every sample, as ADM's FID suite reads them (arr_0, uint8 NHWC)")
    parser.add_argument("--seed", type=int, default=0, help="random seed: the same seed gives the same samples (default: 0)")
    parser.add_argument("--device", help="cuda, mps or cpu (default: the first available)")
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS,
                        help="float32 as DiT's and SiT's sample.py, or autocast as train.py's; auto is faster on a GPU (default: fp32)")
    parser.add_argument("--batch-size", type=int, default=64, help="samples a batch, across all processes under torchrun (default: 64)")
    parser.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    parser.add_argument("--class", dest="class_", help="class name or index for every sample (default: all classes in turn)")
    parser.add_argument("--prompt", action="append", help="a caption to sample (repeatable; samples cycle through them)")
    parser.add_argument("--prompts", type=Path, help="a file of captions, one per line")
    parser.add_argument("--cfg", type=float, help="classifier-free guidance scale, 1 = none (default: 4 with a class or prompt, else 1)")
    parser.add_argument("--fid", type=Path, metavar="REAL", help="FID against this folder of images, or a .npz of mu and "
                        "sigma; a folder's statistics are cached in ~/.cache/zigma/fid (needs torchmetrics, torch-fidelity)")
    parser.add_argument("--vae", metavar="NAME_OR_PATH", help="decode with this VAE, where the one the checkpoint names has moved")
    return check_sampling_arguments(parser.parse_args(argv))


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = start_processes(args.device)  # under torchrun, each process draws its share
    checkpoint = load_checkpoint(args.ckpt)
    video = checkpoint["config"]["frames"] > 0
    grid_path = output_path(args, video)
    conditions = Conditions(args, checkpoint["conditioning"])  # each sample's class or caption, and the --cfg scale
    cfg = conditions.cfg_scale
    vae = vae_for(args, checkpoint, device)  # decodes a latent model's samples
    networks = networks_from_checkpoint(checkpoint, args.ckpt, "model" if args.no_ema else "ema").to(device).eval()
    model = networks["zigma"]
    encode = networks["text"] if "text" in networks else load_pretrained_text_encoder(
        checkpoint["conditioning"]["text_encoder"], device)  # the captions' encoder, if any
    fid = on_first(lambda: FID(args.fid, device), rank, world) if args.fid is not None else None  # a refusal stops all
    dtype = autocast_dtype(args.precision, device)
    steps = "adaptive dopri5 steps" if args.method == "dopri5" else f"{args.sample_steps} {args.method} steps"
    print(f"{args.ckpt}: step {checkpoint['step']}, {args.n} samples, {steps}, cfg {cfg:g}, on {device}"
          + (f" in {world} processes" if world > 1 else "") + f", {precision_name(dtype)}")

    batches = math.ceil(args.n / args.batch_size)
    progress = tqdm(total=batches * (1 if args.method == "dopri5" else args.sample_steps), unit="step",
                    disable=rank > 0, file=Terminal())
    counted = CountedCalls(model, progress, 2 if args.method == "heun" else 1)  # the model, advancing the bar
    grid, arrays, calls = [], [], 0
    for first, indices in process_shares(args.n, args.batch_size, rank, world):  # this process's samples of a batch
        samples, finite = torch.empty(0), True  # where a batch leaves this process none
        if indices:
            noise = sample_noise(args.seed, indices, model.config.input_shape, device)
            y, captions = conditions.labels(indices, device), conditions.captions(indices)
            with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                context, context_mask = encode(captions) if captions else (None, None)
                if args.method == "dopri5":
                    samples, used = sample_adaptive(model, noise, y, context, context_mask, cfg, args.rtol, args.atol)
                    calls += used
                    progress.update()
                else:
                    samples = sample(counted, noise, steps=args.sample_steps, y=y, context=context,
                                     context_mask=context_mask, cfg_scale=cfg, method=args.method)
            finite = torch.isfinite(samples).all().item()
            samples = (vae.decode(samples) if vae else samples).float().cpu()  # (B, 3, H, W), or (B, T, 3, H, W)
        if in_any_process(not finite, world, device):  # every process stops, and nothing is written from the batch
            raise UserError(f"samples {first} to {min(first + args.batch_size, args.n) - 1} are NaN or infinite: "
                            f"{args.ckpt} comes from a run that diverged" + (f", or --cfg {cfg:g} is too strong" if cfg > 1 else ""))
        samples = gather(samples, world)  # every process's, on the first
        if rank > 0:
            continue
        for i, one in enumerate(samples if args.out_dir else []):
            save_samples(one[None], args.out_dir / f"{first + i:06d}.{'gif' if video else 'png'}")
        if fid:
            fid.add_samples(samples)
        if args.npz:
            arrays.append(to_bytes(samples).permute(0, 2, 3, 1).numpy())  # (B, H, W, 3)
        grid.append(samples[:max(0, GRID_LIMIT - first)])
    progress.close()
    end_processes()  # all is drawn: the first process writes and measures alone, with no other waiting on it
    if rank > 0:
        return
    save_samples(torch.cat(grid), grid_path)
    if args.npz:
        write_npz(args.npz, arr_0=np.concatenate(arrays))
    print(f"wrote {grid_path}" + (f" and {args.n} files in {args.out_dir}" if args.out_dir else "")
          + (f" and {args.npz}" if args.npz else ""))
    if args.method == "dopri5":
        print(f"dopri5 took {calls / batches:.0f} model calls a batch (rtol {args.rtol:g}, atol {args.atol:g})")
    if fid:
        value = fid.compute()
        print(f"FID {value:.2f}: {args.n} samples against {fid.used} {args.fid}, at {fid.size} x {fid.size} px (FID "
              f"falls as samples are added: compare it only at equal --num-samples; papers use 50,000)")


if __name__ == "__main__":
    try:
        main()
    except UserError as error:
        sys.exit(exit_message(f"sample.py: {error}"))  # said by the first process only, under torchrun
    except KeyboardInterrupt:
        sys.exit(exit_message("sample.py: interrupted; the files written so far are kept"))
    finally:
        end_processes()
