"""Train ZigMa with flow matching on a folder of images or clips, or on built-in synthetic data.

    python train.py                                      # built-in smiley faces; a tiny model, fine on a CPU
    python train.py --data ./faces --image-size 64 --model ZigMa-S/2 --steps 200000 --out out-faces   # re-run: resumes
    python train.py --frames 8 --out out-video           # built-in clips of a moving ball: video, the factorized scan
    python train.py --data ./pets --class-cond --out out-pets   # labels: subfolders' names; --captions: NAME.txt files
    python train.py --data ./ffhq --vae stabilityai/sd-vae-ft-ema --model ZigMa-B/2 --out out-ffhq   # 256 px latents
    torchrun --standalone --nproc_per_node 8 train.py --data ./faces --model ZigMa-B/2 --batch-size 256 --out out-ddp

Everything goes to --out (default out/): ckpt.pt, samples_0000500.png (from the EMA weights), log.jsonl, train.lock (one
run at a time) and, with --vae, latents.pt. Re-running a command resumes from OUT/ckpt.pt; a larger --steps trains on.
Under torchrun each process trains on its share of every batch (DistributedDataParallel); the first writes the files.
"""

import signal
import sys

QUIET_START = signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C while torch imports: one line
if QUIET_START:
    signal.signal(signal.SIGINT, lambda *_: sys.exit("train.py: interrupted while starting; nothing was written"))

import argparse
import copy
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from data import (VAE, ArgumentParser, CaptionEncoder, CPUThreads, Latents, Terminal, UserError, build_networks,
                  load_checkpoint, load_pretrained_text_encoder, plural, save_samples)
from plumbing import (PRECISIONS, TIME_SAMPLING, Batches, LossMeter, RunLog, StopRequest, autocast_dtype, build_dataset, check_resumed_options,
                      check_training_arguments, check_weights_are_sane, default_model, draw_times, on_first, only_writer, precision_name,
                      derived_seed, end_processes, exit_message, preview_conditions, resume, save_checkpoint, saved_arguments, start_processes)
from zigma import PATH_FAMILIES, PRESETS, flow_loss, fused_selective_scan, preset_config, sample

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
    parser.add_argument("--model", choices=sorted(PRESETS), help="preset (default: Tiny, with the largest patch that leaves 8 x 8 tokens)")
    parser.add_argument("--image-size", type=int, help="images are resized and cropped to this side (default: 32, 256 with --vae)")
    parser.add_argument("--path-family", "--paths", "--scan", default="zigzag", choices=PATH_FAMILIES,
                        help="the layers' token orders: zigzag (the paper's), or a baseline, sweep (raster) or hilbert; --paths and "
                        "--scan are older names (default: zigzag)")
    parser.add_argument("--num-paths", "--scan-paths", type=int, default=8, choices=[1, 2, 8],
                        help="K, the paths the layers take turns over: the j-th spatial layer reads path j mod K; --scan-paths is the "
                        "older name (default: 8)")
    parser.add_argument("--vae", metavar="NAME_OR_PATH", help="train in this diffusers AutoencoderKL's latent space "
                        "(a hub name or a folder); --data is encoded once into OUT/latents.pt")
    video = parser.add_argument_group("video")
    video.add_argument("--frames", type=int, default=0, help="train on clips of this many frames (default: 0, images)")
    video.add_argument("--frame-stride", type=int, help="with --frames: take every this-many-th frame of a clip (default: 1)")
    video.add_argument("--video-pattern", "--video-scan", help="with --frames: a letter for each layer, repeated over the "
                       "depth: s spatial, t temporal, v the whole clip; --video-scan is the older name (default: sst, the paper's)")
    conditioning = parser.add_argument_group("conditioning")
    conditioning.add_argument("--class-cond", action="store_true", help="condition on classes: the first-level subfolders of --data")
    conditioning.add_argument("--captions", action="store_true", help="condition on captions: NAME.txt beside each image NAME.png")
    conditioning.add_argument("--text-encoder", help="with --captions: 'learned' (built in) or a transformers model name or path, frozen (default: learned)")
    conditioning.add_argument("--cond-drop", type=float, help="probability of dropping the label or caption, for guidance (default: 0.1)")
    training = parser.add_argument_group("training")
    training.add_argument("--steps", type=int, default=2000, help="total optimizer steps; a larger value resumes a run (default: 2000)")
    training.add_argument("--batch-size", type=int, default=32, help="examples a step, across all processes under torchrun (default: 32)")
    training.add_argument("--lr", type=float, help="AdamW's, after the warm-up (default: 1e-3 for Tiny, 1e-4 for larger)")
    training.add_argument("--warmup", type=int, default=200, help="raise the learning rate linearly over this many first steps (default: 200)")
    training.add_argument("--flip", action=argparse.BooleanOptionalAction,
                          help="with --data: random left-right flips, as DiT's (the default); --no-flip for text, digits, maps")
    training.add_argument("--time-sampling", default="logit-normal", choices=TIME_SAMPLING,
                          help="how t is drawn (0 noise, 1 data): logit-normal, more often mid-way, or uniform on [0, 1] as the paper "
                          "(default: logit-normal)")
    training.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default: 0)")
    training.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this; 0: no clipping (default: 1)")
    training.add_argument("--ema-decay", type=float, help="EMA decay, warmed up as min(decay, (1+step)/(10+step)) (default: 0.999 Tiny, 0.9999 larger)")
    training.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    training.add_argument("--device", help="cuda, mps or cpu (default: the first available)")
    training.add_argument("--precision", default="auto", choices=PRECISIONS,
                          help="autocast: auto is bf16 on a GPU that has it, else fp16; float32 on a CPU (default: auto)")
    training.add_argument("--compile", action="store_true", help="torch.compile the model (on a CPU, the scan stays eager)")
    training.add_argument("--grad-checkpointing", action="store_true", help="less memory, about a third more time")
    training.add_argument("--workers", type=int, default=2, help="data-loading processes; with 0, a resumed run also draws the flips of one that never stopped (default: 2)")
    progress = parser.add_argument_group("progress")
    progress.add_argument("--sample-every", type=int, default=500, help="save samples every N steps; 0: none (default: 500)")
    progress.add_argument("--sample-steps", type=int, help="Euler steps for those samples (default: 50)")
    progress.add_argument("--sample-cfg", type=float, help="the guidance scale of those samples, with --class-cond or --captions (default: 4)")
    progress.add_argument("--ckpt-every", type=int, default=500, help="save the checkpoint every this many steps (default: 500)")
    progress.add_argument("--keep-checkpoints", type=int, default=0, metavar="N", help="also keep the last N as ckpt_STEP.pt (default: 0)")
    progress.add_argument("--log-every", type=int, default=10, help="log the mean loss since the last line, and the lr and gradient norm, every N steps (default: 10)")
    progress.add_argument("--tensorboard", action="store_true", help="also to OUT/tensorboard, with the sample grids")
    return check_training_arguments(parser.parse_args(argv))


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


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = start_processes(args.device, args.batch_size)  # under torchrun: one process per GPU
    try:
        with only_writer(args.out, rank, world):  # OUT/train.lock: one run per --out
            train(args, rank, world, device)
    finally:
        end_processes()


def train(args, rank: int, world: int, device: torch.device):
    torch.manual_seed(args.seed)  # the same initial weights in every process
    ckpt_path = args.out / "ckpt.pt"
    checkpoint = load_checkpoint(ckpt_path) if ckpt_path.exists() else None  # resume
    if checkpoint is not None and checkpoint["step"] >= args.steps:
        print(f"{ckpt_path} is already at step {checkpoint['step']}; pass a larger --steps to train on")
        return
    vae = VAE(args.vae, device) if args.vae else None  # frozen, kept out of the checkpoint; only its name is saved
    if vae and args.model is None:
        args.model = default_model(args.image_size // vae.factor)  # for the side of the latents
    if checkpoint is not None:
        changed = check_resumed_options(checkpoint, ckpt_path, args)  # the training options that changed

    # Data: a folder, or the built-in faces or shapes; with --vae, their latents, encoded once
    dataset = build_dataset(args, vae)
    if vae:
        dataset = Latents(dataset, vae, args.image_size, args.out / "latents.pt", device, rank, world)

    # Model: the text encoder (learned with the model, or a frozen pretrained one), and the ZigMa
    conditioning = {"class_names": dataset.class_names if args.class_cond else None, "vocabulary": None, "text_encoder": None}
    if args.captions and args.text_encoder == "learned":
        conditioning["vocabulary"] = CaptionEncoder.build_vocabulary(dataset.captions)
    elif args.captions:
        conditioning["text_encoder"] = args.text_encoder
    pretrained = load_pretrained_text_encoder(conditioning["text_encoder"], device)  # frozen, not in the checkpoint
    size, channels = (args.image_size // vae.factor, vae.channels) if vae else (args.image_size, 3)
    config = preset_config(args.model, input_size=size, in_channels=channels, path_family=args.path_family,
                           num_paths=args.num_paths, frames=args.frames, video_pattern=args.video_pattern,
                           num_classes=len(conditioning["class_names"] or []),
                           context_dim=(pretrained.dim if pretrained else PRESETS[args.model]["dim"]) if args.captions else 0)
    networks = build_networks(config, conditioning).to(device)  # the ZigMa, and the built-in caption encoder
    ema = copy.deepcopy(networks).requires_grad_(False)  # the EMA weights are what we sample from
    optimizer = torch.optim.AdamW(parameter_groups(networks, args.weight_decay), lr=args.lr)
    dtype = autocast_dtype(args.precision, device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)  # fp16 gradients would underflow
    start, position, kept = 0, (0, 0), "no checkpoint was written"  # kept: what ckpt.pt holds, for the last sentence

    if checkpoint is not None:  # the weights, the EMA, AdamW's moments, fp16's loss scale, the position in the data
        start, position = resume(checkpoint, ckpt_path, networks, ema, optimizer, scaler, config, conditioning)
        kept = f"{ckpt_path} holds step {start}"
        print("\n".join([f"resuming from {ckpt_path} at step {start}", *changed]))
    batches = Batches(dataset, args.batch_size, args.workers, args.seed, rank, world, device, position)  # endless
    log = RunLog(args.out, start, args.tensorboard) if rank == 0 else None  # a fresh run starts a new log
    meter = LossMeter(checkpoint.get("recent_loss") if checkpoint else None)  # the losses that logs and checks use

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # on a GPU: tf32 matmuls
    model = networks["zigma"]
    model.grad_checkpointing = args.grad_checkpointing
    # With several processes, DistributedDataParallel averages the gradients of the model and of the built-in
    # caption encoder, so that every process takes the same step and keeps the same weights and EMA.
    parallel = DistributedDataParallel if world > 1 else (lambda module: module)
    train_model = parallel(model)
    train_model = torch.compile(train_model) if args.compile else train_model
    encode = parallel(networks["text"]) if "text" in networks else pretrained
    scan_name = "mamba-ssm's fused kernel" if fused_selective_scan is not None and device.type == "cuda" else "pure torch"
    print(f"{args.model}: {sum(p.numel() for p in networks.parameters()) / 1e6:.2f}M parameters, "
          f"{plural(len(dataset), 'training clip' if args.frames else 'training image')}, on {device}"
          + (f", one of {world} processes" if world > 1 else "") + f", {precision_name(dtype)}, selective scan in {scan_name}")

    def checkpoint_now(step: int, batch, position: tuple[int, int]) -> str:
        """Write the checkpoint of step `step`, unless the weights have diverged on its batch; returns what is kept."""
        check_weights_are_sane(networks, networks["text"] if "text" in networks else pretrained, batch, meter.recent,
                               step, world, device, autocast, f"{kept}. Train with a lower --lr than {args.lr:g}",
                               args.time_sampling)
        state = {"model": networks.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                 "scaler": scaler.state_dict(), "step": step, "data_position": position, "config": asdict(config),
                 "conditioning": conditioning, "vae": args.vae, "args": saved_arguments(args),
                 "recent_loss": sum(meter.recent) / len(meter.recent)}
        on_first(lambda: save_checkpoint(state, ckpt_path, args.keep_checkpoints), rank, world)  # a full disk stops them all
        return f"{ckpt_path} holds step {step}"

    preview_labels, preview_captions = preview_conditions(dataset, 16)

    def save_preview(step: int):
        if stop.name:  # a stop was asked for: no grid to wait for
            return
        noise = torch.randn(16, *config.input_shape, generator=torch.Generator(device).manual_seed(args.seed), device=device)
        y = preview_labels.to(device) if preview_labels is not None else None
        with autocast:
            context, context_mask = (ema["text"] if "text" in ema else pretrained)(preview_captions) if preview_captions else (None, None)
            samples = sample(ema["zigma"], noise, steps=args.sample_steps, y=y, context=context, context_mask=context_mask,
                             cfg_scale=args.sample_cfg)
        if not torch.isfinite(samples).all():  # a checkpoint of this step, if due, is written first, its weights checked
            raise UserError(f"the samples of step {step} are NaN or infinite; {kept}")
        samples = vae.decode(samples) if vae else samples
        save_samples(samples, args.out / f"samples_{step:07d}.{'gif' if args.frames else 'png'}")
        log.images(step, samples)

    progress = tqdm(total=args.steps, initial=start, dynamic_ncols=True, disable=rank > 0, file=Terminal())
    threads = CPUThreads() if device.type == "cpu" else None  # the cores other processes leave free
    stop = StopRequest(rank)  # Ctrl-C, SIGTERM and SIGHUP stop after the step under way, with a checkpoint
    unsaved = None  # (step, batch, data position after it) of the last step taken, while no checkpoint holds it
    try:
        for step in range(start + 1, args.steps + 1):
            # Noise, times, dropped conditions and (with --workers 0) flips come from a seed for each step and
            # process: a resumed run draws what the run that never stopped drew.
            torch.manual_seed(derived_seed(args.seed, rank, step - 1))
            batch = stop.next_batch(batches, world, device)  # None once a process was asked to stop
            stopped = batch is None  # every process stops before this step
            if stopped:
                break
            if threads:
                threads.update()
            x = batch["x"].to(device, non_blocking=True)
            y = batch["y"].to(device) if "y" in batch else None
            with autocast:
                context, context_mask = encode(batch["caption"]) if "caption" in batch else (None, None)
                loss = flow_loss(train_model, x, y, context, context_mask, drop_prob=args.cond_drop,
                                 t=draw_times(len(x), args.time_sampling, device))
            lr = args.lr * min(1.0, step / (args.warmup + 1))  # the warm-up
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            grad_norm = nn.utils.clip_grad_norm_(networks.parameters(), args.grad_clip or float("inf"))  # before the step
            scaler.step(optimizer)
            scaler.update()
            update_ema(ema, networks, min(args.ema_decay, (1 + step) / (10 + step)))
            unsaved = (step, batch, batches.position)

            # The one wait for the device a step: then a step that diverged stops the run, before anything is saved
            if not scaler.is_enabled() and not torch.isfinite(grad_norm):  # fp16's scaler skips such a step itself
                raise UserError(f"training diverged at step {step}: the loss was {loss.item():.4g} and the gradient "
                                f"norm {grad_norm.item():.4g}; {kept}. Train with a lower --lr than {args.lr:g}")
            meter.add(loss.item(), x.shape[0] * world)  # this process's loss
            progress.update()
            progress.set_postfix(loss=f"{meter.recent[-1]:.4f}", per_s=f"{meter.speed:.1f}")
            if step % args.log_every == 0:
                mean_loss = meter.window_mean(world, device)  # since the last line, over the processes
                if rank == 0:
                    log.scalars(step, {"loss": round(mean_loss, 5), "lr": lr, "grad_norm": round(grad_norm.item(), 5),
                                       "examples_per_s": round(meter.speed, 2)})
            if step % args.ckpt_every == 0 or step == args.steps:  # first the checkpoint, then the preview
                kept, unsaved = checkpoint_now(*unsaved), None
            if args.sample_every and (step % args.sample_every == 0 or step == args.steps):
                on_first(lambda: save_preview(step), rank, world)  # the first process draws; NaN samples stop them all
    finally:
        stop.restore()
        progress.close()
        if log:
            log.close()
    if stopped:  # before step `step`
        if unsaved is not None:
            kept = checkpoint_now(*unsaved)
        raise UserError(f"stopped by {stop.name or 'a signal to another process'} at step {step - 1}; {kept}: re-run the "
                        f"same command to resume")
    print(f"done: step {step}, {ckpt_path}; draw samples from it with: python sample.py --ckpt {args.out}")


if __name__ == "__main__":
    try:
        main()
    except UserError as error:
        sys.exit(exit_message(f"train.py: {error}"))  # said by the first process only, under torchrun
    except KeyboardInterrupt:  # before training started, or a second Ctrl-C
        sys.exit(exit_message("train.py: interrupted; nothing more was saved (re-run the same command to resume from the "
                              "last checkpoint)"))
