"""Benchmark the selective scan, whole-model training against DiT, and training beside a busy CPU.

    python bench.py                                   # every table on the default device (cuda, else cpu)
    python bench.py --device cpu --only scan --max-seconds 30
    python bench.py --device cpu --only model --model ZigMa-S/2 --depth 4 --batch-size 2 --tokens 64
    python bench.py --only busy                       # a tiny train.py run alone, then beside a busy process
    python bench.py --only compile                    # the graphs of a ZigMa block under torch.compile
    python bench.py --gpu-check gpu-check.md          # on one GPU, about 8 minutes: tests, tables, training; one report
    python bench.py --gpu-check check.md --tiny --device cpu   # the same at tiny sizes, about 40 s

Scan level: one forward + backward of a selective scan with B=8, E=768, N=16 and D, z, delta_bias and
softplus, for each sequence length L. Every case runs in fresh processes, so that the peak memory of one
does not hide another's: one for the time (the median of up to five passes after one untimed pass), one
for the memory. "extra memory" is the peak during forward + backward minus what the inputs held before
(CPU: the process's peak resident memory, with glibc told to hand freed blocks back at once; CUDA: torch's
peak allocation). "operations" counts the torch operations dispatched (each a kernel launch on a GPU, but
for views). The methods:
    reference      zigma.selective_scan_reference: one token at a time, autograd keeps every state
    materialising  the straightforward scan below: (B, E, L, N) decays and inputs, then a loop
    fast           fast_scan.selective_scan, by blocks and chunks (fast_scan.scan_plan picks them by device)
    compiled       fast_scan.selective_scan under torch.compile (GPUs only: on a CPU it would unroll a loop over tokens)
    fused          mamba-ssm's CUDA kernel (CUDA with mamba-ssm installed only)
A method is skipped at a length where, extrapolated from the shorter one, it would take longer than
--max-seconds or more than half the free memory. A second table counts the fast scan's operations under
each device's plan, on meta tensors, so that a CPU shows what a GPU would launch.

Model level: one training step (flow loss, backward, AdamW step; bf16 autocast on CUDA, as train.py) of a
preset (--depth overrides its depth) at --tokens x --tokens tokens, in fresh processes: the median step
time over --steps steps, and the extra peak memory of one step over what the model and optimizer hold. Next
to it, the same with gradient checkpointing, and a DiT of the same width whose blocks use torch's
scaled_dot_product_attention, with everything else (embeddings, final layer) shared; --dit-depth sets its
depth (default: the same as ZigMa's).

Busy CPU: train.py's default model on the built-in faces for 40 steps, alone, then beside another process
that keeps one core busy; the images/s of the last 20 steps of each, and their ratio.

Class labels: do samples show the class asked for? --label-images of each class (--label-data: four grey shapes,
or the built-in faces in four moods) are written to a folder, each with a caption that names its class ("a
disc", "a smiling face"); a small classifier learns the classes from other images. Then train.py trains its
default model (ZigMa-Tiny/4, 32 x 32, batch 32) on the folder with --class-cond and with --captions
(--label-kinds), resuming from stage to stage (--label-steps); after each stage sample.py draws --label-samples
images of each class, at --cfg 1 and 4. The table gives the share that the classifier reads as the class asked
for; --label-grids keeps the sample grids.

Sample quality (--only quality, an hour or more): train.py trains each recipe (--recipes, each a string of train.py
options) on --quality-data, in --quality-stages stages of --quality-minutes, or of --quality-steps (equal steps are
equal time for recipes of one model, however busy the machine). After each stage --quality-samples samples from the
EMA weights (--quality-sample-steps Euler steps, 25; cfg 4 with labels) are measured in the feature space of a small
classifier trained on real images: the Frechet distance of its 64 pooled features to those of held-out real images,
as FID does with Inception's, its mean confidence, and with labels the share read as the class asked for. Real images
against other real images, and blurred real images, give the scale. --keep-runs keeps each run, with a sample grid at
each stage when stages are counted in steps.

    python bench.py --only quality --quality-steps 1000 --quality-samples 256 --recipes "" "--lr 1e-3"
"""

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils._python_dispatch import TorchDispatchMode

import fast_scan
import plumbing
import zigma
from data import ArgumentParser, SmileyFaces, UserError, check_writable, pick_device, plural, save_samples
from zigma import PRESETS, ZigMa, flow_loss, modulate, preset_config

SCAN_SIZE = dict(batch=8, inner=768, d_state=16)  # B, E, N
FAILED = []  # the cases that failed, for the exit status


def failed(case: str, error: Exception) -> str:
    """Note a failed case and say why, in a table's cell."""
    FAILED.append(case)
    return f"failed: {type(error).__name__}: {str(error).strip().splitlines()[0][:200] if str(error).strip() else ''}"


#################################################################################
#                                  Scan level                                   #
#################################################################################

def selective_scan_materialising(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """The straightforward scan: all decays and inputs as (B, E, L, N) tensors, and autograd keeps every state."""
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    decay = torch.exp(delta[..., None] * A[:, None])  # (B, E, L, N): exp(delta_t A)
    inputs = (delta * u)[..., None] * B.transpose(1, 2)[:, None]  # (B, E, L, N): delta_t B_t u_t
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])  # (B, E, N)
    ys = []
    # unbind, not indexing: the backward of decay[:, :, t] would write a whole (B, E, L, N) gradient per token
    for decay_t, input_t, C_t in zip(decay.unbind(2), inputs.unbind(2), C.unbind(2)):
        h = decay_t * h + input_t  # (B, E, N)
        ys.append((h * C_t[:, None]).sum(-1))  # (B, E)
    y = torch.stack(ys, dim=-1)  # (B, E, L)
    if D is not None:
        y = y + D[:, None] * u
    if z is not None:
        y = y * F.silu(z)
    return y


def scan_methods(device: torch.device, compile_backend: str | None = None) -> dict:
    """The scans to time; "compiled" is the fast scan under torch.compile, on GPUs by default (on a CPU its plan is a
    loop over tokens, which compiling would unroll), or with the backend asked for."""
    methods = dict(reference=zigma.selective_scan_reference, materialising=selective_scan_materialising,
                   fast=fast_scan.selective_scan)
    compile_backend = compile_backend or ("inductor" if device.type != "cpu" else None)
    if compile_backend:
        methods["compiled"] = torch.compile(fast_scan.selective_scan, backend=compile_backend)
    if zigma.fused_selective_scan is not None and device.type == "cuda":
        methods["fused"] = zigma.fused_selective_scan
    return methods


def scan_inputs(length: int, device: torch.device, batch: int, inner: int, d_state: int, seed: int = 0) -> dict:
    """Random float32 inputs in mamba-ssm's layout, with Mamba's initial A and delta ranges; all but A need grad."""
    g = torch.Generator().manual_seed(seed)
    dt = torch.exp(torch.rand(inner, generator=g) * (math.log(0.1) - math.log(0.001)) + math.log(0.001))
    tensors = dict(
        u=torch.randn(batch, inner, length, generator=g),
        delta=0.5 * torch.randn(batch, inner, length, generator=g),
        A=-torch.arange(1, d_state + 1, dtype=torch.float32).repeat(inner, 1),  # (E, N): Mamba's initial A
        B=torch.randn(batch, d_state, length, generator=g),
        C=torch.randn(batch, d_state, length, generator=g),
        D=torch.ones(inner),
        z=torch.randn(batch, inner, length, generator=g),
        delta_bias=dt + torch.log(-torch.expm1(-dt)),  # softplus(delta_bias) = dt in [0.001, 0.1]
    )
    return {name: x.to(device).requires_grad_(name != "A") for name, x in tensors.items()}


def forward_backward(scan, inputs: dict, grad_y: torch.Tensor) -> dict:
    """One forward and backward pass; returns y and the gradients."""
    for x in inputs.values():
        x.grad = None
    y = scan(**inputs, delta_softplus=True)
    y.backward(grad_y)
    return dict(y=y.detach(), **{name: x.grad for name, x in inputs.items() if x.grad is not None})


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def resident_bytes(field: str = "VmRSS") -> int:
    """The process's resident memory now (VmRSS), or its peak since reset_peak_resident (VmHWM); Linux."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def reset_peak_resident():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size


def free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":") for line in f)
    return int(fields["MemAvailable"].split()[0]) * 1024


class OperationCount(TorchDispatchMode):
    """Counts the torch operations dispatched inside it."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def scan_operations(length: int, device_type: str) -> int:
    """The fast scan's operations for one forward + backward at SCAN_SIZE, under device_type's plan, on meta tensors."""
    inputs = {name: x.detach().to("meta").requires_grad_(name != "A")
              for name, x in scan_inputs(length, torch.device("cpu"), **SCAN_SIZE).items()}
    planner = fast_scan.scan_plan
    fast_scan.scan_plan = lambda length, per_token, _: planner(length, per_token, device_type)
    try:
        with OperationCount() as counter:  # the autograd Function itself: meta tensors have no autocast to turn off
            y = fast_scan._SelectiveScan.apply(*(inputs[name] for name in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")), True)
            y.backward(torch.empty_like(y))
    finally:
        fast_scan.scan_plan = planner
    return counter.count


def run_scan_case(method: str, length: int, device: torch.device, max_seconds: float,
                  compile_backend: str | None = None, memory_pass: bool = False) -> dict:
    """Time one method at one length, in this (fresh) process; returns seconds per forward+backward, extra bytes
    and operations (None for the compiled scan, whose kernels are not torch operations). memory_pass: the first
    pass only, which measures the memory."""
    scan = scan_methods(device, compile_backend)[method]
    compiled = method == "compiled"
    warm_up = scan_inputs(length if compiled else 32, device, **SCAN_SIZE)  # compiling for this length happens here
    # Under the counter too: its first operation imports torch._dynamo, whose 100 MiB and 1 s the measured pass
    # would otherwise count.
    with contextlib.nullcontext() if compiled else OperationCount():
        forward_backward(scan, warm_up, torch.randn_like(warm_up["u"]))
    inputs = scan_inputs(length, device, **SCAN_SIZE)
    grad_y = torch.randn(SCAN_SIZE["batch"], SCAN_SIZE["inner"], length, device=device)
    synchronize(device)
    # The first pass measures the peak memory, and counts the operations.
    before = memory_mark(device)
    start = time.perf_counter()
    counter = OperationCount()
    with contextlib.nullcontext() if compiled else counter:
        forward_backward(scan, inputs, grad_y)
    synchronize(device)
    times = [time.perf_counter() - start]
    extra = peak_since(device, before)
    # Then up to five timed passes, within the time limit; the first pass counts only when it is the only one.
    timed = []
    while not memory_pass and len(timed) < 5 and sum(times) + sum(timed) + times[0] < max_seconds:
        start = time.perf_counter()
        forward_backward(scan, inputs, grad_y)
        synchronize(device)
        timed.append(time.perf_counter() - start)
    return dict(seconds=statistics.median(timed or times), extra_bytes=max(extra, 0),
                operations=None if compiled else counter.count)


def memory_mark(device: torch.device) -> int:
    """What is held now, and the start of a new peak: torch's allocation on CUDA, the resident memory on a CPU."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    reset_peak_resident()
    return resident_bytes()


def peak_since(device: torch.device, before: int) -> int:
    """How far the memory rose above `before` since memory_mark."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) - before
    return resident_bytes("VmHWM") - before


def run_in_subprocess(case: list[str], args, device: torch.device, memory: bool = False) -> dict:
    """One case (--case ...) in a fresh process. memory=True: one pass only, with glibc returning every freed
    block over 8 MiB to the system at once (a fixed mmap threshold), so that on the CPU the peak resident
    memory follows what torch holds, not what the allocator keeps for reuse."""
    options = ["--device", str(device), "--max-seconds", str(args.max_seconds), "--model", args.model,
               "--batch-size", str(args.batch_size), "--steps", str(1 if memory else args.steps)]
    if memory:
        options.append("--memory-pass")
    if args.depth:
        options += ["--depth", str(args.depth)]
    if args.dit_depth:
        options += ["--dit-depth", str(args.dit_depth)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(8 << 20)) if memory else None
    finished = subprocess.run([sys.executable, __file__, *options, "--case", *case], capture_output=True, text=True, env=env)
    if finished.returncode:
        said = finished.stderr.strip().splitlines()
        raise RuntimeError(said[-1] if said else f"exit status {finished.returncode}, nothing said")
    return json.loads(finished.stdout.splitlines()[-1])


def scan_table(args, device: torch.device):
    print(f"## Scan: forward + backward, B={SCAN_SIZE['batch']}, E={SCAN_SIZE['inner']}, N={SCAN_SIZE['d_state']}, "
          f"float32, on {device_name(device)}\n")
    print("| L | method | time | extra memory | operations | vs materialising |")
    print("| --- | --- | --- | --- | --- | --- |")
    previous = {}  # method: (length, result) at the last length it ran
    for length in args.lengths:
        results = {}
        for method in scan_methods(device):
            if method in previous:
                last_length, last = previous[method]
                growth = length / last_length
                # The reference's time grows with L; so does every method's memory (the materialising one linearly).
                if last["seconds"] * growth > args.max_seconds or last["extra_bytes"] * growth > free_bytes(device) / 2:
                    print(f"| {length} | {method} | skipped: about {last['seconds'] * growth:.0f} s and "
                          f"{gib(last['extra_bytes'] * growth)} expected | | | |")
                    continue
            try:
                timed = run_in_subprocess(["scan", method, str(length)], args, device)
                result = dict(timed, extra_bytes=run_in_subprocess(["scan", method, str(length)], args, device,
                                                                   memory=True)["extra_bytes"])
            except RuntimeError as error:
                print(f"| {length} | {method} | {failed(f'{method} at L={length}', error)} | | | |")
                continue
            results[method] = previous[method] = (length, result)
        baseline = results.get("materialising")
        for method, (_, result) in results.items():
            ratio = ""
            if baseline and method != "materialising":
                base = baseline[1]
                speed = base["seconds"] / result["seconds"]
                ratio = f"{speed:.1f}x faster" if speed >= 1 else f"{1 / speed:.1f}x slower"
                if min(base["extra_bytes"], result["extra_bytes"]) >= 2 ** 20:  # below 1 MiB, a ratio says nothing
                    memory = base["extra_bytes"] / result["extra_bytes"]
                    ratio += f", {memory:.1f}x less memory" if memory >= 1 else f", {1 / memory:.1f}x more memory"
            operations = "" if result["operations"] is None else f"{result['operations']:,}"
            print(f"| {length} | {method} | {seconds(result['seconds'])} | {gib(result['extra_bytes'])} | "
                  f"{operations} | {ratio} |")
    print()
    print_scan_agreement(device)
    print("Operations of the fast scan, one forward + backward, by device plan (fast_scan.scan_plan):\n")
    print("| L | CPU plan | GPU and MPS plan |")
    print("| --- | --- | --- |")
    for length in args.lengths:
        plans = [fast_scan.scan_plan(length, math.prod(SCAN_SIZE.values()), kind) for kind in ("cpu", "cuda")]
        counts = [f"{scan_operations(length, kind):,} (blocks of {block}, chunks of {chunk})"
                  for kind, (block, chunk) in zip(("cpu", "cuda"), plans)]
        print(f"| {length} | {counts[0]} | {counts[1]} |")
    print()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def print_scan_agreement(device: torch.device):
    """How far each method is from the reference (values and gradients), and whether a stiff long scan overflows."""
    inputs = scan_inputs(300, device, batch=2, inner=64, d_state=16, seed=1)  # 300: a multiple of no plan's block
    grad_y = torch.randn(2, 64, 300, device=device)
    reference = forward_backward(zigma.selective_scan_reference, inputs, grad_y)
    for method, scan in scan_methods(device).items():
        if method != "reference":
            result = forward_backward(scan, inputs, grad_y)
            error = max(relative_error(result[name], reference[name]) for name in reference)
            print(f"- {method} vs reference, L=300, float32: largest relative error {error:.1e} over y and all gradients")
    stiff = scan_inputs(4096, device, batch=1, inner=8, d_state=4, seed=2)
    with torch.no_grad():
        stiff["delta"].fill_(10.0)  # softplus(10 + 0) = 10.00005
        stiff["delta_bias"].zero_()
        stiff["A"].fill_(-100.0)
    result = forward_backward(fast_scan.selective_scan, stiff, torch.randn(1, 8, 4096, device=device))
    finite = all(torch.isfinite(x).all().item() for x in result.values())
    print(f"- fast, delta = 10, A = -100, L = 4096: output and gradients {'finite' if finite else 'NOT FINITE'}\n")


#################################################################################
#                                  Model level                                  #
#################################################################################

class DiTBlock(nn.Module):
    """DiT's block (adaLN-Zero, self-attention, MLP), called like a ZigMaBlock so that it can replace one."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        nn.init.zeros_(self.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.adaLN_modulation[-1].bias)

    def forward(self, x, c, order=None, context=None, context_mask=None):  # (B, T*H*W, D); the order does not matter to attention
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)  # (B, D) each
        q, k, v = rearrange(self.qkv(modulate(self.norm1(x), shift1, scale1)), "b l (three h e) -> three b h l e",
                            three=3, h=self.heads)  # (B, heads, L, D/heads) each
        attention = rearrange(F.scaled_dot_product_attention(q, k, v), "b h l e -> b l (h e)")  # (B, L, D)
        x = x + gate1[:, None] * self.proj(attention)
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))  # (B, L, D)


def dit_like(model: ZigMa) -> ZigMa:
    """The same network with each ZigMa block replaced by a DiT block of the same width."""
    dim = model.config.dim
    model.blocks = nn.ModuleList(DiTBlock(dim, heads=max(1, dim // 64)) for _ in model.blocks)
    return model


MODEL_KINDS = ["ZigMa", "ZigMa, gradient checkpointing", "DiT"]


def build_model(kind: str, args, side: int) -> nn.Module:
    config = preset_config(args.model, input_size=side * PRESETS[args.model]["patch_size"], in_channels=4)
    depth = (args.dit_depth or args.depth) if kind == "DiT" else args.depth
    model = ZigMa(dataclasses.replace(config, depth=depth) if depth else config)
    model.grad_checkpointing = kind == "ZigMa, gradient checkpointing"
    return dit_like(model) if kind == "DiT" else model


def run_model_case(kind: str, side: int, args, device: torch.device) -> dict:
    """One training step's time (median of args.steps after a warm-up step) and extra peak memory (of the first
    step after warm-up, over what the model, its gradients' absence and the optimizer's state hold)."""
    torch.manual_seed(0)
    model = build_model(kind, args, side).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(args.batch_size, 4, model.config.input_size, model.config.input_size, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step():
        with autocast:
            loss = flow_loss(model, x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)

    step()  # warm-up: the optimizer's state exists from here on
    before = memory_mark(device)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
        if len(times) == 1:
            extra = peak_since(device, before)
    return dict(seconds=statistics.median(times), extra_bytes=max(extra, 0),
                parameters=sum(p.numel() for p in model.parameters()))


def model_table(args, device: torch.device):
    depth = args.depth or PRESETS[args.model]["depth"]
    print(f"## Model: one training step, {args.model} at depth {depth} vs DiT of the same width, batch {args.batch_size}, "
          f"4 input channels, on {device_name(device)}\n")
    print("| tokens | model | parameters | step time | images/s | extra memory | vs DiT: time, memory |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for side in args.tokens:
        results = {}
        for kind in MODEL_KINDS:
            try:
                timed = run_in_subprocess(["model", kind, str(side)], args, device)
                results[kind] = dict(timed, extra_bytes=run_in_subprocess(["model", kind, str(side)], args, device,
                                                                          memory=True)["extra_bytes"])
            except RuntimeError as error:
                print(f"| {side} x {side} | {kind} | {failed(f'{kind} at {side} x {side}', error)} | | | | |")
        for kind, result in results.items():
            name = kind if kind != "DiT" else f"DiT, depth {args.dit_depth or depth}"
            versus = ""
            if "DiT" in results and kind != "DiT":
                dit = results["DiT"]
                versus = f"{result['seconds'] / dit['seconds']:.2f}x, {result['extra_bytes'] / dit['extra_bytes']:.2f}x"
            print(f"| {side} x {side} | {name} | {result['parameters'] / 1e6:.1f}M | {seconds(result['seconds'])} | "
                  f"{args.batch_size / result['seconds']:.1f} | {gib(result['extra_bytes'])} | {versus} |")
    print()


#################################################################################
#                                 torch.compile                                 #
#################################################################################

def graph_breaks(plan: str) -> tuple[int, list[str]]:
    """torch._dynamo.explain of one ZigMa block with cross-attention (width 64, 8 x 8 tokens) as the Mamba layer
    runs it on a CPU (plan "cpu") or on a GPU without mamba-ssm (plan "cuda"): its graphs, and each break's cause."""
    torch.manual_seed(0)
    model = ZigMa(zigma.ZigMaConfig(input_size=16, in_channels=4, patch_size=2, dim=64, depth=1, context_dim=32))
    x, c, context = torch.randn(2, 64, 64), torch.randn(2, 64), torch.randn(2, 5, 32)
    planner = fast_scan.scan_plan
    if plan == "cuda":  # the scan a CUDA tensor gets without mamba-ssm: fast_scan under the GPU plan
        fast_scan.scan_plan = lambda length, per_token, _: planner(length, per_token, "cuda")
    try:
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(model.blocks[0])(x, c, context)
    finally:
        fast_scan.scan_plan = planner
    return explanation.graph_count, [str(reason.reason).splitlines()[0] for reason in explanation.break_reasons]


def compile_table():
    print("## torch.compile: the graphs of one ZigMa block (torch._dynamo.explain)\n")
    print("| the scan as it runs | graphs | graph breaks, and their causes |")
    print("| --- | --- | --- |")
    for plan, name in [("cpu", "on a CPU"), ("cuda", "on a GPU without mamba-ssm (the GPU plan)")]:
        graphs, reasons = graph_breaks(plan)
        causes = "; ".join(f"{reasons.count(r)} x {r}" for r in dict.fromkeys(reasons)) or "none"
        print(f"| {name} | {graphs} | {causes} |")
    print()


#################################################################################
#                                 Class labels                                  #
#################################################################################

class Shapes:
    """Four shapes, (3, 32, 32) in [-1, 1], in grey levels only, as digit data sets are: image i shows shape
    i mod 4, light on dark, at a random size, place and pair of grey levels."""

    class_names = ["disc", "square", "triangle", "cross"]

    def __getitem__(self, index):
        g = torch.Generator().manual_seed(index)
        u = lambda low, high: low + (high - low) * torch.rand((), generator=g).item()  # noqa: E731
        y, x = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")  # (32, 32) each
        r = u(0.45, 0.75)
        x, y = (x - u(-0.2, 0.2)) / r, (y - u(-0.2, 0.2)) / r  # the shape's own coordinates: it spans [-1, 1]
        label = index % len(self.class_names)
        inside = [x ** 2 + y ** 2 <= 1,  # disc
                  (x.abs() <= 0.85) & (y.abs() <= 0.85),  # square
                  (y <= 0.8) & (y >= 1.6 * x.abs() - 0.9),  # triangle, point up
                  (x.abs() <= 0.3) | (y.abs() <= 0.3)][label] & (x.abs() <= 1) & (y.abs() <= 1)  # cross
        image = torch.where(inside, u(0.7, 1.0), u(0.0, 0.3)).expand(3, 32, 32)
        return {"x": image * 2 - 1, "y": label}


class Glyphs:
    """The digits 0 to 9 in Pillow's built-in font, (3, 32, 32) in [-1, 1]: strokes one or two pixels wide, the fine
    detail that blurry samples lose. Image i shows digit i mod 10 at a random size, angle, place and pair of colours."""

    class_names = [str(d) for d in range(10)]

    def __getitem__(self, index):
        from PIL import Image, ImageDraw, ImageFont
        from torchvision.transforms.functional import to_tensor
        g = torch.Generator().manual_seed(index)
        u = lambda low, high: low + (high - low) * torch.rand((), generator=g).item()  # noqa: E731
        label = index % 10
        glyph = Image.new("L", (32, 32))
        ImageDraw.Draw(glyph).text((16 + u(-4, 4), 16 + u(-4, 4)), str(label), fill=255, anchor="mm",
                                   font=ImageFont.load_default(size=round(u(16, 26))))
        ink = to_tensor(glyph.rotate(u(-15, 15), resample=Image.BILINEAR))  # (1, 32, 32) in [0, 1]
        background, colour = torch.rand(3, 1, 1, generator=g) * 0.4, torch.rand(3, 1, 1, generator=g) * 0.4 + 0.6
        return {"x": (background + ink * (colour - background)) * 2 - 1, "y": label}


LABEL_DATA = {"shapes": Shapes, "faces": lambda: SmileyFaces(32, class_cond=True, moods=4), "glyphs": Glyphs}


class Classifier(nn.Module):
    """A small convolutional classifier, (B, 3, 32, 32) in [-1, 1] -> (B, classes) logits."""

    def __init__(self, classes: int):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 16 x 16
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 8 x 8
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(64, classes))

    def forward(self, x):
        return self.layers(x)


def train_classifier(data, first: int, steps: int = 300) -> tuple[nn.Module, float]:
    """A classifier trained on images first, first + 1, ... (flipped at random), and its accuracy on 400 others."""
    torch.manual_seed(0)
    classifier, batch = Classifier(len(data.class_names)), 64
    optimizer = torch.optim.Adam(classifier.parameters(), lr=1e-3)
    for step in range(steps):
        indices = range(first + step * batch, first + (step + 1) * batch)
        x = torch.stack([data[i]["x"] for i in indices])  # (64, 3, 32, 32)
        x = torch.where(torch.rand(batch, 1, 1, 1) < 0.5, x, x.flip(-1))
        loss = F.cross_entropy(classifier(x), torch.tensor([data[i]["y"] for i in indices]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    held_out = range(first + steps * batch, first + steps * batch + 400)
    return classifier.eval(), accuracy(classifier, torch.stack([data[i]["x"] for i in held_out]),
                                       torch.tensor([data[i]["y"] for i in held_out]))


@torch.no_grad()
def accuracy(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    return (classifier(images).argmax(-1) == labels).float().mean().item()


#################################################################################
#                                Sample quality                                 #
#################################################################################
# A Frechet distance, as FID's, in the feature space of the label table's small classifier trained on the real
# images (its 64 pooled features), and that classifier's mean confidence in the class it reads. FID's Inception
# network knows nothing of 32 px glyphs or smiley faces; this one was trained on exactly them.

QUALITY_DATA = {"faces": lambda: SmileyFaces(32, class_cond=True), "glyphs": Glyphs}  # what train.py learns in each


@torch.no_grad()
def features_and_confidence(classifier: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The classifier's pooled features (N, 64) of images (N, 3, 32, 32), and its mean top-class probability."""
    features = torch.cat([classifier.layers[:-1](part) for part in images.split(256)])  # (N, 64)
    probabilities = classifier.layers[-1](features).softmax(-1)
    return features, probabilities.max(-1).values.mean().item()


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """plumbing.frechet_distance between the Gaussians fitted to features a and b (N, F)."""
    a, b = a.double(), b.double()
    return plumbing.frechet_distance(a.mean(0), torch.cov(a.T), b.mean(0), torch.cov(b.T))


def blurred(images: torch.Tensor) -> torch.Tensor:
    from torchvision.transforms.functional import gaussian_blur
    return gaussian_blur(images, kernel_size=5, sigma=1.0)


def sample_images(run: Path, count: int, steps: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """count samples (count, 3, 32, 32) in [-1, 1] from the EMA weights of run's checkpoint, and their labels (None for
    a model without classes): all classes in turn, guided at cfg 4."""
    from data import load_checkpoint, networks_from_checkpoint
    checkpoint = load_checkpoint(run / "ckpt.pt")
    model = networks_from_checkpoint(checkpoint, run / "ckpt.pt")["zigma"].eval()
    classes = model.config.num_classes
    generator = torch.Generator().manual_seed(0)
    parts = []
    for start in range(0, count, 64):
        noise = torch.randn(min(64, count - start), *model.config.input_shape, generator=generator)
        y = torch.arange(start, start + len(noise)) % classes if classes else None
        parts.append(zigma.sample(model, noise, steps=steps, y=y, cfg_scale=4.0 if classes else 1.0).clamp(-1, 1))
    return torch.cat(parts), torch.arange(count) % classes if classes else None


def quality_table(args):
    """Train each recipe (--recipes, train.py options) for --quality-minutes in stages, and after each stage measure the
    EMA samples against held-out real images."""
    root = Path(__file__).parent
    data = QUALITY_DATA[args.quality_data]()
    classifier, accuracy_held_out = train_classifier(data, first=200_000, steps=args.classifier_steps)
    real = torch.stack([data[i]["x"] for i in range(300_000, 300_000 + args.quality_samples)])
    other = torch.stack([data[i]["x"] for i in range(400_000, 400_000 + args.quality_samples)])
    real_features, real_confidence = features_and_confidence(classifier, real)
    print(f"## Sample quality on {args.quality_data}: Frechet distance in a classifier's features (lower is better) "
          f"and its confidence, {args.quality_samples} samples, on {device_name(torch.device('cpu'))}\n")
    print(f"The classifier reads {accuracy_held_out:.1%} of 400 held-out real images right. For scale: real against other "
          f"real images {frechet_distance(features_and_confidence(classifier, other)[0], real_features):.2f} "
          f"(confidence {real_confidence:.2f}); blurred real images "
          f"{frechet_distance(features_and_confidence(classifier, blurred(real))[0], real_features):.2f} "
          f"(confidence {features_and_confidence(classifier, blurred(real))[1]:.2f}).\n")
    print("| recipe | minutes | steps | Frechet distance | confidence | read as the class asked for |")
    print("| --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as folder:
        for number, recipe in enumerate(args.recipes):  # by position: two equal recipes are two runs
            run, minutes = (args.keep_runs or Path(folder)) / f"run{number}", 0.0
            data_options = ["--data", str(write_quality_folder(data, Path(folder) / "images", args))] \
                if args.quality_data != "faces" else []
            for stage in range(1, args.quality_stages + 1):
                until = dict(steps=stage * args.quality_steps // args.quality_stages) if args.quality_steps else \
                    dict(minutes=args.quality_minutes / args.quality_stages)
                minutes += train_for(root, [*data_options, "--out", str(run), *recipe.split()], **until)
                drawn, labels = sample_images(run, args.quality_samples, args.quality_sample_steps)
                features, confidence = features_and_confidence(classifier, drawn)
                step = json.loads((run / "log.jsonl").read_text().splitlines()[-1])["step"]
                right = "" if labels is None else f"{accuracy(classifier, drawn, labels):.0%}"
                print(f"| {recipe or 'defaults'} | {minutes:.1f} | {step} | {frechet_distance(features, real_features):.2f} "
                      f"| {confidence:.2f} | {right} |", flush=True)
    print()


def write_quality_folder(data, folder: Path, args) -> Path:
    """The training images of a built-in quality data set as PNGs, in class subfolders; once."""
    if not folder.exists():
        for i in range(args.quality_images):
            item = data[i]
            (folder / data.class_names[item["y"]]).mkdir(parents=True, exist_ok=True)
            save_samples(item["x"][None], folder / data.class_names[item["y"]] / f"{i:06d}.png")
    return folder


def train_for(root: Path, options: list[str], minutes: float | None = None, steps: int | None = None) -> float:
    """Run train.py (resuming) for about `minutes`, then stop it with SIGINT, which saves its checkpoint; or until its
    step `steps`. Returns the minutes it trained, from its first logged step to its last (start-up and saving left
    out). options come last, so that they override the rest."""
    out = Path(options[options.index("--out") + 1])
    first = len((out / "log.jsonl").read_text().splitlines()) if (out / "log.jsonl").exists() else 0
    with tempfile.TemporaryFile("w+") as said:  # not a pipe: a long run's progress bar would fill it, and train.py wait
        run = subprocess.Popen([sys.executable, str(root / "train.py"), "--steps", str(steps or 10_000_000), "--device",
                                "cpu", "--workers", "0", "--log-every", "1", "--sample-every", "10000000", "--ckpt-every",
                                "10000000", *options], stdout=subprocess.DEVNULL, stderr=said, text=True)
        start = end = None
        while run.poll() is None:
            time.sleep(0.2)
            lines = len((out / "log.jsonl").read_text().splitlines()) if (out / "log.jsonl").exists() else 0
            if start is None and lines > first:
                start = time.monotonic()
            if start is not None and steps and lines >= steps:
                end = end or time.monotonic()  # the last step is logged; the checkpoint is being written
            if start is not None and minutes and time.monotonic() - start > minutes * 60:
                run.send_signal(signal.SIGINT)
                break
        run.wait()
        said.seek(0)
        stderr = said.read().strip()
    if not (out / "ckpt.pt").exists() or (steps and run.returncode):
        raise UserError(f"train.py failed: {stderr.splitlines()[-1] if stderr else 'nothing said'}")
    return ((end or time.monotonic()) - (start or time.monotonic())) / 60


def read_images(folder: Path) -> torch.Tensor:
    """The PNGs sample.py wrote, (B, 3, H, W) in [-1, 1]."""
    from PIL import Image
    from torchvision.transforms.functional import to_tensor
    return torch.stack([to_tensor(Image.open(p).convert("RGB")) * 2 - 1 for p in sorted(folder.glob("*.png"))])


def run_child(command: list[str]) -> None:
    """Run train.py or sample.py; where it fails, one sentence that ends with what it said."""
    finished = subprocess.run(command, capture_output=True, text=True)
    if finished.returncode:
        said = finished.stderr.strip().splitlines()
        raise UserError(f"{Path(command[1]).name} failed (exit status {finished.returncode}): {said[-1] if said else 'nothing'}")


def labels_table(args):
    """Train on the same images with the class as a label (--class-cond) and as a caption naming it ("a disc",
    --captions): the rate at which samples read as the class asked for, across training."""
    root = Path(__file__).parent
    data = LABEL_DATA[args.label_data]()
    names = data.class_names
    caption = (lambda name: f"a {name} face") if args.label_data == "faces" else (lambda name: f"a {name}")  # noqa: E731
    print(f"## Class labels{' against captions' if 'captions' in args.label_kinds else ''}: train.py on "
          f"{len(names)} classes of {args.label_data} "
          f"({', '.join(names)}), on {device_name(torch.device('cpu'))}\n")
    with tempfile.TemporaryDirectory() as folder:
        images = Path(folder) / "images"
        for i in range(len(names) * args.label_images):
            item = data[i]
            name = names[item["y"]]
            (images / name).mkdir(parents=True, exist_ok=True)
            save_samples(item["x"][None], images / name / f"{i:05d}.png")
            (images / name / f"{i:05d}.txt").write_text(caption(name))
        classifier, held_out = train_classifier(data, first=len(names) * args.label_images, steps=args.classifier_steps)
        print(f"The classifier reads {held_out:.1%} of 400 held-out real images right. Each cell: samples read as the "
              f"class asked for, of {len(names) * args.label_samples} ({args.label_samples} per class); "
              f"chance is {1 / len(names):.0%}.\n")
        columns = [f"{kind}, cfg {cfg}" for kind in args.label_kinds for cfg in (1, 4)]
        print(f"| training steps | {' | '.join(columns)} |")
        print("|" + " --- |" * (len(columns) + 1))
        for steps in args.label_steps:
            row = []
            for kind in args.label_kinds:
                run = Path(folder) / kind
                option = "--class-cond" if kind == "labels" else "--captions"
                run_child([sys.executable, str(root / "train.py"), "--data", str(images), option, "--out", str(run),
                           "--steps", str(steps), "--device", "cpu"])
                for cfg in (1, 4):
                    right = 0
                    for label, name in enumerate(names):
                        out = Path(folder) / f"samples_{kind}_{steps}_{cfg}_{name}"
                        condition = ["--class", name] if kind == "labels" else ["--prompt", caption(name)]
                        run_child([sys.executable, str(root / "sample.py"), "--ckpt", str(run), *condition,
                                   "--num-samples", str(args.label_samples), "--cfg", str(cfg), "--seed", str(label),
                                   "--grid", str(out / "grid.png"), "--out-dir", str(out / "each"), "--device", "cpu"])
                        drawn = read_images(out / "each")
                        right += round(accuracy(classifier, drawn, torch.full((len(drawn),), label)) * len(drawn))
                        if args.label_grids:
                            args.label_grids.mkdir(parents=True, exist_ok=True)
                            shutil.copy(out / "grid.png", args.label_grids / f"{kind}_{steps}_cfg{cfg}_{name}.png")
                    row.append(f"{right / (len(names) * args.label_samples):.0%}")
            print(f"| {steps} | {' | '.join(row)} |", flush=True)
    print()


#################################################################################
#                                   Busy CPU                                    #
#################################################################################

def training_rate(out: Path) -> float:
    """train.py's default run on the built-in faces, 40 steps on the CPU: its images/s over the last 20 steps."""
    run_child([sys.executable, str(Path(__file__).with_name("train.py")), "--out", str(out), "--steps", "40",
               "--device", "cpu", "--workers", "0", "--log-every", "40", "--sample-every", "1000", "--ckpt-every", "1000"])
    return json.loads((out / "log.jsonl").read_text().splitlines()[-1])["examples_per_s"]


def busy_table():
    print(f"## Training beside a busy CPU: train.py's default run, on {device_name(torch.device('cpu'))}\n")
    with tempfile.TemporaryDirectory() as folder:
        alone = training_rate(Path(folder) / "alone")
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])  # keeps one core busy
        try:
            beside = training_rate(Path(folder) / "beside")
        finally:
            busy.kill()
    print("| run | images/s |")
    print("| --- | --- |")
    print(f"| alone | {alone:.1f} |")
    print(f"| beside one busy process | {beside:.1f} |")
    print(f"\nBeside the busy process, training ran {alone / beside:.2f}x slower than alone.\n")


#################################################################################
#                                   GPU check                                   #
#################################################################################
# Everything a first GPU should show, in one command of about 8 minutes that writes one report: the tests that take
# a device, run on it, the scan and model tables in bf16, two minutes of the README's faces-at-256 training on
# generated faces, and the graphs under torch.compile. Each part has a time budget and reports its time; a part that
# fails is written down while the others go on. --tiny runs the same code at sizes a CPU finishes in seconds (the
# suite does).

GPU_CHECK_SIZES = {  # what each part runs, and its budget in seconds: the full check, and the CPU dry run
    # The full check's budgets add up to 8 minutes, inside the 10 that one command on a lent GPU may run. Its tests
    # took 20 s on 2 CPU cores; 90 s leaves room for CUDA's start and compiling. Scan and model start no case after
    # their budget. Training: train.py gets Ctrl-C at train_seconds, then saving and sample.py have the rest.
    "full": dict(test_filter=None, lengths=[256, 1024, 4096], model="ZigMa-B/2", dit_depth=12, tokens=[16, 32],
                 batch_size=8, steps=5, compile_backend="inductor", faces=256, train_seconds=120,
                 train=["--image-size", "256", "--model", "ZigMa-B/2", "--batch-size", "128", "--steps", "200000"],
                 budgets=dict(tests=90, scan=90, model=75, training=210, compile=15)),
    # On 2 shared CPU cores the dry run's tests took 6-7 s, scan 6-8, model 0.3, training 9-14 and compile 3-5:
    # budgets of seven times that or more, so that a loaded machine (the suite runs this) stays inside them; its 2
    # training steps end by themselves, long before train_seconds.
    "tiny": dict(test_filter="test_training_step_under_bfloat16_autocast", lengths=[16], model="ZigMa-Tiny/4",
                 dit_depth=1, tokens=[2], batch_size=2, steps=1, compile_backend="aot_eager", faces=4, train_seconds=120,
                 train=["--image-size", "8", "--model", "ZigMa-Tiny/2", "--batch-size", "2", "--steps", "2"],
                 budgets=dict(tests=90, scan=60, model=30, training=180, compile=60)),
}


class Report:
    """The GPU check's report: markdown, written and flushed as it goes, so that a cut-off run keeps what it had."""

    def __init__(self, path: Path):
        try:
            self.file = open(path, "w")
        except OSError as error:
            raise UserError(f"--gpu-check {path} cannot be written: {error.strerror or error}")

    def __call__(self, line: str = ""):
        print(line, flush=True)
        self.file.write(line + "\n")
        self.file.flush()


def check_tests(report: Report, device: torch.device, sizes: dict):
    """pytest test_zigma.py --device DEVICE -m device: the tests that take a device (conftest.py marks them), on it.
    The others run on the CPU whatever the device, and the suite's CPU tests take minutes."""
    command = [sys.executable, "-m", "pytest", "test_zigma.py", "-q", "-p", "no:cacheprovider", "--device", str(device),
               "-m", "device"]
    if sizes["test_filter"]:
        command += ["-k", sizes["test_filter"]]
    try:
        finished = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).parent,
                                  timeout=sizes["budgets"]["tests"])
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"pytest ran past the part's budget of {sizes['budgets']['tests']} s and was stopped")
    lines = finished.stdout.strip().splitlines()
    report(f"`{' '.join(['pytest', *command[3:]])}`: {lines[-1] if lines else finished.stderr.strip()[-300:]}\n")
    for line in lines:
        if line.startswith(("FAILED", "ERROR")):
            report(f"- {line}")
    report()
    if finished.returncode:
        raise RuntimeError(f"pytest's exit status was {finished.returncode}")


def check_scan(report: Report, device: torch.device, sizes: dict):
    budget = time.perf_counter() + sizes["budgets"]["scan"]
    report(f"B={SCAN_SIZE['batch']}, E={SCAN_SIZE['inner']}, N={SCAN_SIZE['d_state']}, float32, one forward + backward; "
           f"compiled with {sizes['compile_backend']}, timed after compiling\n")
    report("| L | method | time | extra memory | operations |")
    report("| --- | --- | --- | --- | --- |")
    for length in sizes["lengths"]:
        for method in scan_methods(device, sizes["compile_backend"]):
            if method == "reference" and length > 1024 or time.perf_counter() > budget:
                report(f"| {length} | {method} | skipped: {'one token at a time' if method == 'reference' else 'out of time'} | | |")
                continue
            try:
                result = run_scan_case(method, length, device, max_seconds=10, compile_backend=sizes["compile_backend"])
            except Exception as error:  # one failed case is a finding; the check goes on
                report(f"| {length} | {method} | {failed(f'{method} at L={length}', error)} | | |")
                continue
            operations = "" if result["operations"] is None else f"{result['operations']:,}"
            report(f"| {length} | {method} | {seconds(result['seconds'])} | {gib(result['extra_bytes'])} | {operations} |")
    report()


def check_model(report: Report, device: torch.device, sizes: dict):
    budget = time.perf_counter() + sizes["budgets"]["model"]
    args = argparse.Namespace(model=sizes["model"], depth=None, dit_depth=sizes["dit_depth"], batch_size=sizes["batch_size"],
                              steps=sizes["steps"])
    report(f"{sizes['model']} against DiT of depth {sizes['dit_depth']}, batch {sizes['batch_size']}, 4 input channels, "
           f"bf16 autocast on CUDA, one training step (median of {sizes['steps']})\n")
    report("| tokens | model | parameters | step time | images/s | peak extra memory |")
    report("| --- | --- | --- | --- | --- | --- |")
    for side in sizes["tokens"]:
        for kind in MODEL_KINDS:
            if time.perf_counter() > budget:
                report(f"| {side * side} | {kind} | skipped: out of time | | | |")
                continue
            try:
                result = run_model_case(kind, side, args, device)
            except Exception as error:
                report(f"| {side * side} | {kind} | {failed(f'{kind} at {side * side} tokens', error)} | | | |")
                continue
            report(f"| {side * side} | {kind} | {result['parameters'] / 1e6:.1f}M | {seconds(result['seconds'])} | "
                   f"{args.batch_size / result['seconds']:.1f} | {gib(result['extra_bytes'])} |")
            if device.type == "cuda":
                torch.cuda.empty_cache()
    report()


def sd_vae_like(folder: Path) -> Path | None:
    """A diffusers AutoencoderKL with Stable Diffusion's VAE architecture and random weights (the same work as the
    real one, which cannot be downloaded here), saved in folder; None without diffusers."""
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        return None
    AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
                  scaling_factor=0.18215).save_pretrained(folder)
    return folder


def check_training(report: Report, device: torch.device, sizes: dict):
    """The README's faces-at-256 command on generated faces, stopped by Ctrl-C (SIGINT) after its time; saving and
    sample.py get what is left of the part's budget."""
    root = Path(__file__).parent
    deadline = time.perf_counter() + sizes["budgets"]["training"]
    with tempfile.TemporaryDirectory() as folder:
        images, out = Path(folder) / "faces", Path(folder) / "out"
        images.mkdir()
        side = int(sizes["train"][sizes["train"].index("--image-size") + 1])
        faces = SmileyFaces(side)
        for i in range(sizes["faces"]):
            save_samples(faces[i]["x"][None], images / f"{i:05d}.png")
        options = list(sizes["train"])
        vae = sd_vae_like(Path(folder) / "vae") if side >= 64 else None
        if side >= 64 and vae is None:  # the same 16 x 16 tokens of ZigMa-B/2, in pixels: 32 x 32 x 3
            options[options.index("--image-size") + 1] = "32"
            report("diffusers is not installed: pixels at 32 px stand in for the latents (the same 16 x 16 tokens)\n")
        command = [sys.executable, str(root / "train.py"), "--data", str(images), *options, "--out", str(out),
                   "--device", str(device), "--sample-every", "100000", "--log-every", "1", "--workers", "2"]
        if vae:
            command[command.index("--out"):command.index("--out")] = ["--vae", str(vae)]
        report(f"`train.py {' '.join(command[2:]).replace(folder, 'TMP')}`, {sizes['faces']} generated faces, "
               f"stopped after {sizes['train_seconds']} s\n")
        start = time.perf_counter()
        run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            output, _ = run.communicate(timeout=sizes["train_seconds"])
        except subprocess.TimeoutExpired:
            run.send_signal(signal.SIGINT)  # train.py saves its checkpoint and exits
            try:
                output, _ = run.communicate(timeout=max(deadline - time.perf_counter(), 10))
            except subprocess.TimeoutExpired:
                run.kill()
                run.communicate()
                raise RuntimeError(f"train.py was still saving at the end of the part's budget of "
                                   f"{sizes['budgets']['training']} s")
        wall = time.perf_counter() - start
        logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()] if (out / "log.jsonl").exists() else []
        if logged:
            report(f"- {wall:.0f} s in all (with encoding and start-up); step {logged[-1]['step']}, loss {logged[-1]['loss']}, "
                   f"{logged[-1]['examples_per_s']} images/s over the last 20 steps")
        report(f"- exit status {run.returncode}; its last line: `{output.strip().splitlines()[-1][-200:] if output.strip() else ''}`")
        if (out / "ckpt.pt").exists():
            drawn = subprocess.run([sys.executable, str(root / "sample.py"), "--ckpt", str(out), "--num-samples", "4", "--sample-steps", "10",
                                    "--grid", str(Path(folder) / "samples.png"), "--device", str(device)],
                                   capture_output=True, text=True, timeout=max(deadline - time.perf_counter(), 10))
            said = (drawn.stdout if drawn.returncode == 0 else drawn.stderr).strip().splitlines()
            report(f"- sample.py from its checkpoint: exit status {drawn.returncode}, `{said[-1][-200:] if said else ''}`")
    report()


def check_compile(report: Report, device: torch.device, sizes: dict):
    for plan in ("cpu", "cuda"):
        graphs, reasons = graph_breaks(plan)
        report(f"- as the scan runs {'on a CPU' if plan == 'cpu' else 'on a GPU without mamba-ssm'}: {graphs} graphs; "
               f"breaks: {'; '.join(dict.fromkeys(reasons)) or 'none'}")
    report()


def gpu_check(path: Path, device: torch.device, tiny: bool):
    sizes = GPU_CHECK_SIZES["tiny" if tiny else "full"]
    report = Report(path)
    report(f"# GPU check on {device_name(device)}\n")
    report(f"torch {torch.__version__}, mamba-ssm {'installed' if zigma.fused_selective_scan else 'not installed'}, "
           f"{time.strftime('%Y-%m-%d %H:%M')}\n")
    parts = [("Tests", "tests", check_tests), ("Selective scan", "scan", check_scan),
             ("Training step against DiT", "model", check_model), ("Faces at 256 px, two minutes", "training", check_training),
             ("torch.compile: the graphs of one ZigMa block", "compile", check_compile)]
    for title, budget, part in parts:
        report(f"## {title}\n")
        start = time.perf_counter()
        try:
            part(report, device, sizes)
        except Exception as error:
            report(f"{failed(title, error)}\n")
        took, budget = time.perf_counter() - start, sizes["budgets"][budget]
        report(f"({took:.1f} s {'of its' if took <= budget else 'OVER its'} {budget} s budget)\n")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type}, {torch.get_num_threads()} threads"


def seconds(s: float) -> str:
    return f"{s * 1000:.1f} ms" if s < 1 else f"{s:.2f} s"


def gib(n: float) -> str:
    return f"{n / 2 ** 20:.0f} MiB" if n < 2 ** 30 else f"{n / 2 ** 30:.2f} GiB"


def check_arguments(args: argparse.Namespace) -> argparse.Namespace:
    """One sentence for an option out of range, as train.py gives."""
    for name in ("lengths", "tokens", "label_steps"):
        if min(getattr(args, name)) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be 1 or more, not {min(getattr(args, name))}")
    for name in ("batch_size", "steps", "depth", "dit_depth", "label_images", "label_samples", "classifier_steps",
                 "quality_steps", "quality_stages", "quality_samples", "quality_sample_steps", "quality_images"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be 1 or more, not {getattr(args, name)}")
    if args.quality_steps is not None and args.quality_steps < args.quality_stages:
        raise UserError(f"--quality-steps must be at least --quality-stages ({args.quality_stages}), not {args.quality_steps}")
    for name in ("max_seconds", "quality_minutes"):
        if not getattr(args, name) > 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, not {getattr(args, name)}")
    if args.label_steps != sorted(set(args.label_steps)):
        raise UserError(f"--label-steps must rise, since each stage resumes the last: not {' '.join(map(str, args.label_steps))}")
    if len(set(args.label_kinds)) < len(args.label_kinds):
        raise UserError(f"--label-kinds names a kind twice: {' '.join(args.label_kinds)}")
    if args.tiny and not args.gpu_check:
        raise UserError("--tiny applies to --gpu-check only")
    if args.keep_runs and (args.gpu_check or args.only != "quality"):
        raise UserError("--keep-runs applies to the quality table only: add --only quality, or leave it out")
    if args.label_grids and (args.gpu_check or args.only not in (None, "labels")):
        raise UserError("--label-grids applies to the label table only: add --only labels, or leave it out")
    return args


def refuse_a_file_as_folder(option: str, folder: Path):
    """One sentence where folder, or the first of its parents that exists, is a file."""
    for place in [folder, *folder.parents]:
        if place.exists():
            if not place.is_dir():
                raise UserError(f"{option} {folder} is a file; name a folder" if place == folder else
                                f"{option} {folder}: {place} is a file, not a folder")
            return


def check_paths(args: argparse.Namespace):
    """Every file and folder bench.py writes, checked before any work (and missing folders made): one sentence each."""
    if args.gpu_check:
        if args.gpu_check.is_dir():
            raise UserError(f"--gpu-check {args.gpu_check} is a folder; name the report's file in it, as gpu-check.md")
        refuse_a_file_as_folder("--gpu-check's folder", args.gpu_check.parent)
        check_writable(args.gpu_check.parent, "--gpu-check's folder")
    if args.keep_runs and args.keep_runs.is_dir() and any(args.keep_runs.iterdir()):
        raise UserError(f"--keep-runs {args.keep_runs} is not empty, and train.py would resume the runs in it; "
                        f"name a new or empty folder")
    for option, folder in [("--label-grids", args.label_grids), ("--keep-runs", args.keep_runs)]:
        if folder:
            refuse_a_file_as_folder(option, folder)
            check_writable(folder, option)


def check_recipes(recipes: list[str]):
    """Each --recipes string read as train.py reads its options, so that one it refuses is one sentence before any
    training; bench.py sets --out and --steps of each stage, and its classifier reads 32 x 32 images."""
    import train
    for recipe in recipes:
        try:
            options = train.parse_args(["--out", "bench-run", "--steps", "1", *recipe.split()])
        except UserError as error:
            raise UserError(f"--recipes {recipe!r}: {str(error).replace('(see --help)', '(see train.py --help)')}")
        if options.out != Path("bench-run") or options.steps != 1:
            raise UserError(f"--recipes {recipe!r}: bench.py sets each run's --out and --steps; leave them out")
        if options.image_size != 32 or options.frames or options.vae:
            raise UserError(f"--recipes {recipe!r}: the quality table measures 32 x 32 images; leave out "
                            f"--image-size, --frames and --vae")


def main(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", help="cuda, cpu, ... (default: cuda if available, else cpu)")
    parser.add_argument("--only", choices=["scan", "model", "compile", "busy", "labels", "quality"], help="run one table only")
    parser.add_argument("--gpu-check", type=Path, metavar="REPORT", help="run the GPU check (about 8 minutes on one GPU) "
                        "and write its report here; nothing else runs")
    parser.add_argument("--tiny", action="store_true", help="with --gpu-check: tiny sizes, for a dry run on a CPU")
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096], help="scan lengths L")
    parser.add_argument("--max-seconds", type=float, default=120, help="skip scan cases expected to take longer")
    parser.add_argument("--model", default="ZigMa-B/2", choices=PRESETS, help="preset for the model table")
    parser.add_argument("--depth", type=int, help="layers of the model table's ZigMa (default: the preset's)")
    parser.add_argument("--dit-depth", type=int, help="layers of its DiT (default: the same as ZigMa's)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[32, 64], help="token grid sides for the model table")
    parser.add_argument("--batch-size", type=int, default=8, help="images per training step in the model table")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per model")
    parser.add_argument("--label-data", default="shapes", choices=LABEL_DATA, help="the label table's data (default: shapes)")
    parser.add_argument("--label-kinds", nargs="+", default=["labels", "captions"], choices=["labels", "captions"],
                        help="how the label table's runs take the class (default: both)")
    parser.add_argument("--label-images", type=int, default=1000, help="training images of each class in the label table")
    parser.add_argument("--label-samples", type=int, default=25, help="samples of each class in the label table")
    parser.add_argument("--classifier-steps", type=int, default=300, help="training steps of the label table's classifier")
    parser.add_argument("--label-steps", type=int, nargs="+", default=[500, 1000, 2000],
                        help="training steps after which the label table samples")
    parser.add_argument("--label-grids", type=Path, help="keep the label table's sample grids in this folder (made if need be)")
    parser.add_argument("--quality-data", default="faces", choices=QUALITY_DATA, help="the quality table's data (default: faces, built in)")
    parser.add_argument("--recipes", nargs="+", default=[""], help="train.py options of each recipe the quality table "
                        "tries, one string each (default: train.py's defaults)")
    parser.add_argument("--quality-minutes", type=float, default=20, help="training minutes of each recipe (default: 20)")
    parser.add_argument("--keep-runs", type=Path, metavar="DIR", help="keep each recipe's run (checkpoint, log, and with "
                        "--quality-steps a sample grid at each stage) in DIR/run0, run1, ...; DIR must be new or empty")
    parser.add_argument("--quality-steps", type=int, help="train each recipe for this many steps instead of --quality-minutes: "
                        "equal steps are equal time for recipes of one model, however busy the machine")
    parser.add_argument("--quality-stages", type=int, default=4, help="measurements across those minutes (default: 4)")
    parser.add_argument("--quality-samples", type=int, default=512, help="samples (and real images) per measurement")
    parser.add_argument("--quality-sample-steps", type=int, default=25, help="Euler steps of those samples (default: 25)")
    parser.add_argument("--quality-images", type=int, default=10000, help="training images of the glyphs")
    parser.add_argument("--case", nargs=3, help=argparse.SUPPRESS)  # one case in this process, used internally
    parser.add_argument("--memory-pass", action="store_true", help=argparse.SUPPRESS)  # with --case scan: one pass, untimed
    args = check_arguments(parser.parse_args(argv))
    if args.only == "quality" and not args.gpu_check:
        check_recipes(args.recipes)
    check_paths(args)
    device = pick_device(args.device) if args.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.case:
        table, what, size = args.case
        if table == "scan":
            print(json.dumps(run_scan_case(what, int(size), device, args.max_seconds, memory_pass=args.memory_pass)))
        else:
            print(json.dumps(run_model_case(what, int(size), args, device)))
        return
    if args.gpu_check:
        gpu_check(args.gpu_check, device, args.tiny)
        if FAILED:
            raise UserError(f"{plural(len(FAILED), 'part or case')} of the GPU check failed; {args.gpu_check} says which")
        return
    print(f"torch {torch.__version__}\n")
    if args.only in (None, "scan"):
        scan_table(args, device)
    if args.only in (None, "model"):
        model_table(args, device)
    if args.only in (None, "compile"):
        compile_table()
    if args.only in (None, "busy"):
        busy_table()
    if args.only in (None, "labels"):
        labels_table(args)
    if args.only == "quality":  # an hour or more: only when asked for
        quality_table(args)
    if FAILED:
        raise UserError(f"{plural(len(FAILED), 'case')} failed: {FAILED[0]}" + (", ..." if len(FAILED) > 1 else ""))


if __name__ == "__main__":
    try:
        main()
    except UserError as error:
        sys.exit(f"bench.py: {error}")
