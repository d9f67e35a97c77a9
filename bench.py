"""Benchmark the selective scan and whole-model training, on whatever device runs it.

    python bench.py                                   # both tables on the default device (cuda, else cpu)
    python bench.py --device cpu --model ZigMa-Tiny/2 # a model size a CPU gets through in minutes
    python bench.py --only scan --lengths 256 1024 --chunk 64

Scan level: one forward + backward of a selective scan with B=8, E=768, N=16 and D, z, delta_bias and
softplus, for each sequence length L. Every case runs in fresh processes, so that the peak memory of one
does not hide another's: one for the time (the median of up to five passes after one untimed pass), one
for the memory. "extra memory" is the peak during forward + backward minus what the inputs held before
(CPU: the process's peak resident memory, with glibc told to hand freed blocks back at once; CUDA: torch's
peak allocation). The methods:
    reference      zigma.selective_scan_reference: one token at a time, autograd keeps every state
    materialising  the straightforward scan below: (B, E, L, N) decays and inputs, then a loop
    fast           zigma.selective_scan: the chunked scan with its own backward
    fused          mamba-ssm's CUDA kernel (CUDA with mamba-ssm installed only)
A method is skipped at a length where, extrapolated from the shorter one, it would take longer than
--max-seconds or more than half the free memory.

Model level: training images/s (flow loss, backward, AdamW step; bf16 autocast on CUDA, as train.py) of
a preset at 32 x 32 and 64 x 64 tokens, next to a DiT of the same width and depth whose blocks use
torch's scaled_dot_product_attention, with everything else (embeddings, final layer) shared.
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

import zigma
from zigma import PRESETS, ZigMa, flow_loss, modulate, preset_config

SCAN_SIZE = dict(batch=8, inner=768, d_state=16)  # B, E, N


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


def scan_methods(device: torch.device) -> dict:
    methods = dict(reference=zigma.selective_scan_reference, materialising=selective_scan_materialising,
                   fast=zigma.selective_scan)
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


def run_scan_case(method: str, length: int, device: torch.device, max_seconds: float) -> dict:
    """Time one method at one length, in this (fresh) process; returns seconds per forward+backward and extra bytes."""
    scan = scan_methods(device)[method]
    warm_up = scan_inputs(2 * zigma.CHUNK, device, **SCAN_SIZE)
    forward_backward(scan, warm_up, torch.randn_like(warm_up["u"]))
    inputs = scan_inputs(length, device, **SCAN_SIZE)
    grad_y = torch.randn(SCAN_SIZE["batch"], SCAN_SIZE["inner"], length, device=device)
    synchronize(device)
    # The first pass measures the peak memory.
    if device.type == "cuda":
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_peak_resident()
        before = resident_bytes()
    start = time.perf_counter()
    forward_backward(scan, inputs, grad_y)
    synchronize(device)
    times = [time.perf_counter() - start]
    if device.type == "cuda":
        extra = torch.cuda.max_memory_allocated(device) - before
    else:
        extra = resident_bytes("VmHWM") - before
    # Then up to five timed passes, within the time limit; the first pass counts only when it is the only one.
    timed = []
    while len(timed) < 5 and sum(times) + sum(timed) + times[0] < max_seconds:
        start = time.perf_counter()
        forward_backward(scan, inputs, grad_y)
        synchronize(device)
        timed.append(time.perf_counter() - start)
    return dict(seconds=statistics.median(timed or times), extra_bytes=max(extra, 0))


def run_in_subprocess(method: str, length: int, args, device: torch.device, memory: bool = False) -> dict:
    """One scan case in a fresh process. memory=True: one pass only, with glibc returning every freed block
    over 8 MiB to the system at once (a fixed mmap threshold), so that on the CPU the peak resident memory
    follows what torch holds, not what the allocator keeps for reuse."""
    command = [sys.executable, __file__, "--device", str(device), "--chunk", str(args.chunk),
               "--max-seconds", str(0 if memory else args.max_seconds), "--scan-case", method, str(length)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(8 << 20)) if memory else None
    finished = subprocess.run(command, capture_output=True, text=True, env=env)
    if finished.returncode:
        raise RuntimeError(finished.stderr.strip().splitlines()[-1])
    return json.loads(finished.stdout.splitlines()[-1])


def scan_table(args, device: torch.device):
    print(f"## Scan: forward + backward, B={SCAN_SIZE['batch']}, E={SCAN_SIZE['inner']}, N={SCAN_SIZE['d_state']}, "
          f"float32, on {device_name(device)}\n")
    print("| L | method | time | extra memory | vs materialising |")
    print("| --- | --- | --- | --- | --- |")
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
                          f"{gib(last['extra_bytes'] * growth)} expected | | |")
                    continue
            try:
                result = dict(seconds=run_in_subprocess(method, length, args, device)["seconds"],
                              extra_bytes=run_in_subprocess(method, length, args, device, memory=True)["extra_bytes"])
            except RuntimeError as error:
                print(f"| {length} | {method} | failed: {error} | | |")
                continue
            results[method] = previous[method] = (length, result)
        baseline = results.get("materialising")
        for method, (_, result) in results.items():
            ratio = ""
            if baseline and method != "materialising":
                base = baseline[1]
                ratio = (f"{base['seconds'] / result['seconds']:.1f}x faster, "
                         f"{base['extra_bytes'] / max(result['extra_bytes'], 1):.1f}x less memory")
            print(f"| {length} | {method} | {seconds(result['seconds'])} | {gib(result['extra_bytes'])} | {ratio} |")
    print()
    print_scan_agreement(device)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def print_scan_agreement(device: torch.device):
    """How far each method is from the reference (values and gradients), and whether a stiff long scan overflows."""
    inputs = scan_inputs(300, device, batch=2, inner=64, d_state=16, seed=1)  # 300: not a multiple of CHUNK
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
    result = forward_backward(zigma.selective_scan, stiff, torch.randn(1, 8, 4096, device=device))
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

    def forward(self, x, c, scan=None, context=None):  # (B, L, D); the scan order does not matter to attention
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


def images_per_second(model: nn.Module, args, device: torch.device) -> float:
    config = model.config
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(args.batch_size, config.in_channels, config.input_size, config.input_size, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step():
        with autocast:
            loss = flow_loss(model, x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up
    step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    synchronize(device)
    return args.batch_size * args.steps / (time.perf_counter() - start)


def model_table(args, device: torch.device):
    patch = PRESETS[args.model]["patch_size"]
    print(f"## Model: training images/s, {args.model} vs DiT of the same width and depth, batch {args.batch_size}, "
          f"4 input channels, on {device_name(device)}\n")
    print("| tokens | model | parameters | images/s |")
    print("| --- | --- | --- | --- |")
    for side in (32, 64):
        for name, build in ((args.model, ZigMa), ("DiT, same width and depth", lambda config: dit_like(ZigMa(config)))):
            torch.manual_seed(0)
            model = build(preset_config(args.model, input_size=side * patch, in_channels=4))
            parameters = sum(p.numel() for p in model.parameters())
            try:
                speed = f"{images_per_second(model, args, device):.1f}"
            except torch.OutOfMemoryError:
                speed = "out of memory"
            print(f"| {side} x {side} | {name} | {parameters / 1e6:.1f}M | {speed} |")
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type}, {torch.get_num_threads()} threads"


def seconds(s: float) -> str:
    return f"{s * 1000:.1f} ms" if s < 1 else f"{s:.2f} s"


def gib(n: float) -> str:
    return f"{n / 2 ** 20:.0f} MiB" if n < 2 ** 30 else f"{n / 2 ** 30:.2f} GiB"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", help="cuda, cpu, ... (default: cuda if available, else cpu)")
    parser.add_argument("--only", choices=["scan", "model"], help="run one table only")
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096], help="scan lengths L")
    parser.add_argument("--chunk", type=int, default=zigma.CHUNK, help="tokens per chunk of the fast scan")
    parser.add_argument("--max-seconds", type=float, default=120, help="skip scan cases expected to take longer")
    parser.add_argument("--model", default="ZigMa-B/2", choices=PRESETS, help="preset for the model table")
    parser.add_argument("--batch-size", type=int, default=8, help="images per training step in the model table")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per model")
    parser.add_argument("--scan-case", nargs=2, metavar=("METHOD", "L"), help=argparse.SUPPRESS)  # one case, used internally
    args = parser.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    zigma.CHUNK = args.chunk
    if args.scan_case:
        method, length = args.scan_case
        print(json.dumps(run_scan_case(method, int(length), device, args.max_seconds)))
        return
    print(f"torch {torch.__version__}, fast-scan chunk {args.chunk}\n")
    if args.only != "model":
        scan_table(args, device)
    if args.only != "scan":
        model_table(args, device)


if __name__ == "__main__":
    main()
