"""ZigMa: a DiT-style diffusion backbone built on Mamba, with zigzag scans.

Paper: "ZigMa: A DiT-style Zigzag Mamba Diffusion Model", Hu et al., ECCV 2024 (arXiv 2403.13802).

Mamba reads its input as a 1D sequence, so the order of the patch tokens matters. Before each layer's
scan, ZigMa reorders the tokens along one of eight continuous zigzag ("snake") paths over the token
grid, so that neighbours in the sequence are neighbours in the image; after the scan it restores the
order. The reordering has no parameters. For video the scan is factorized: spatial layers zigzag within
each frame, temporal layers read each spatial position through time.

The file reads top to bottom:
    1. scan orders           zigzag_paths, sweep_paths, volume_path, Scan, layer_scans
    2. selective scan        selective_scan_reference (the definition), selective_scan (the fast one)
    3. Mamba mixer           MambaMixer (Mamba-1), using mamba-ssm's fused CUDA kernel when installed
    4. ZigMa block           ZigMaBlock: adaLN-Zero around a Mamba branch and an optional cross-attention
    5. embeddings, model     ZigMaConfig, ZigMa, presets
    6. flow matching         flow_loss, guided_velocity, sample
    7. text encoders         CaptionEncoder (built in, learned), PretrainedTextEncoder (transformers, frozen)

Shape letters:
    B  batch                 T  frames of a clip (1 for images)
    H, W  token grid (image side / patch_size)
    L  tokens in one Mamba sequence (H*W for a spatial layer, T for a temporal one, T*H*W for a volume one)
    D  model width (dim)     E  Mamba inner width, expand * D
    N  SSM state size (d_state)
    R  rank of the delta projection (dt_rank)
    K  number of scan paths the layers cycle through (1, 2 or 8: the paper's Zigzag-1/2/8)
    S  context tokens (text) for cross-attention

Time convention (the linear stochastic interpolant with velocity prediction):
    x_t = (1 - t) * noise + t * data,  t in [0, 1]:  t = 0 is pure noise, t = 1 is data.
    The network predicts the velocity v = dx_t/dt = data - noise.
    Sampling integrates dx/dt = v(x, t) from t = 0 to t = 1.
"""

import math
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.autograd.function import once_differentiable

try:
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as fused_selective_scan
except Exception:  # mamba-ssm 2.x raises more than ImportError where its CUDA extension is missing
    fused_selective_scan = None


#################################################################################
#                                  Scan orders                                  #
#################################################################################

def grid_paths(h: int, w: int, snake: bool) -> torch.Tensor:
    """The eight scans of an h x w grid (4 start corners x row- or column-major), as (8, h*w) indices.

    Each row of the result is a permutation of the row-major token indices: path[i] is the token read
    i-th. With snake=True, every other row (or column) is read backwards, so the path is continuous.
    Order: for each start corner (top-left, bottom-right, top-right, bottom-left), rows then columns.
    """
    grid = torch.arange(h * w, device="cpu").view(h, w)  # (H, W) row-major token indices; built on the CPU
    paths = []
    for flip_rows, flip_cols in [(False, False), (True, True), (False, True), (True, False)]:
        corner = grid
        if flip_rows:
            corner = corner.flip(0)
        if flip_cols:
            corner = corner.flip(1)
        for lines in (corner, corner.t()):  # read row by row, then column by column
            lines = lines.clone()
            if snake:
                lines[1::2] = lines[1::2].flip(1)  # every other line backwards
            paths.append(lines.reshape(-1))
    return torch.stack(paths)  # (8, H*W)


def zigzag_paths(h: int, w: int) -> torch.Tensor:
    """ZigMa's eight continuous zigzag paths over an h x w token grid, (8, h*w)."""
    return grid_paths(h, w, snake=True)


def sweep_paths(h: int, w: int) -> torch.Tensor:
    """The raster ("sweep") scans of plain Mamba vision models, the paper's ablation baseline, (8, h*w)."""
    return grid_paths(h, w, snake=False)


def volume_path(path: torch.Tensor, frames: int, snake: bool) -> torch.Tensor:
    """A 2D path extended through a clip: frame after frame; with snake=True every other frame backwards.

    Tokens of a clip are indexed (t, h, w) row-major, so frame f holds indices f*H*W .. (f+1)*H*W - 1.
    A zigzag path ends where the backwards path of the next frame starts: the 3D path stays continuous.
    """
    frame_size = path.numel()
    parts = [f * frame_size + (path.flip(0) if snake and f % 2 else path) for f in range(frames)]
    return torch.cat(parts)  # (T*H*W,)


class Scan(nn.Module):
    """One layer's reading order: how tokens on a (T, H, W) grid form Mamba sequences, and their order.

    axis "space":  every frame is one sequence of H*W tokens (images are clips with T = 1);
    axis "time":   every spatial position is one sequence of T tokens;
    axis "volume": the whole clip is one sequence of T*H*W tokens.
    `order` is a permutation of the L tokens of a sequence. It and its inverse are buffers, so they
    follow .to() and are saved in the state_dict.
    """

    def __init__(self, grid: tuple[int, int, int], axis: str, order: torch.Tensor):
        super().__init__()
        assert axis in ("space", "time", "volume"), f"unknown scan axis {axis!r}"
        frames, h, w = grid
        length = {"space": h * w, "time": frames, "volume": frames * h * w}[axis]
        assert sorted(order.tolist()) == list(range(length)), f"a {axis} scan needs a permutation of {length}"
        self.grid, self.axis = grid, axis
        self.register_buffer("order", order.long())
        self.register_buffer("inverse", torch.argsort(order).long())

    def to_sequences(self, x: torch.Tensor) -> torch.Tensor:
        frames = self.grid[0]
        if self.axis == "space":
            x = rearrange(x, "b (t l) d -> (b t) l d", t=frames)  # (B*T, H*W, D): one sequence per frame
        elif self.axis == "time":
            x = rearrange(x, "b (t l) d -> (b l) t d", t=frames)  # (B*H*W, T, D): one per position
        return x[:, self.order]  # (sequences, L, D) in scan order

    def from_sequences(self, x: torch.Tensor, batch: int) -> torch.Tensor:
        x = x[:, self.inverse]  # (sequences, L, D) back in token order
        if self.axis == "space":
            x = rearrange(x, "(b t) l d -> b (t l) d", b=batch)  # (B, T*H*W, D)
        elif self.axis == "time":
            x = rearrange(x, "(b l) t d -> b (t l) d", b=batch)  # (B, T*H*W, D)
        return x

    def extra_repr(self) -> str:
        return f"grid={self.grid}, axis={self.axis!r}"


def layer_scans(grid: tuple[int, int, int], depth: int, scan: str, scan_paths: int, pattern: str) -> list[Scan]:
    """The scan of every layer.

    pattern is repeated over the depth, one letter per layer: s = spatial, t = temporal, v = volume
    (images use "s"). The j-th spatial layer reads 2D path j mod K. The j-th temporal layer reads time
    forwards when j is even and backwards when j is odd; the j-th volume layer reads the 3D extension
    of 2D path (j // 2) mod K, forwards or backwards likewise. scan is "zigzag" or "sweep".
    """
    frames, h, w = grid
    snake = scan == "zigzag"
    paths = grid_paths(h, w, snake)[:scan_paths]  # (K, H*W)
    seen = {"s": 0, "t": 0, "v": 0}  # how many layers of each kind came before
    scans = []
    for layer in range(depth):
        kind = pattern[layer % len(pattern)]
        j = seen[kind]
        seen[kind] += 1
        if kind == "s":
            scans.append(Scan(grid, "space", paths[j % scan_paths]))
        elif kind == "t":
            forwards = torch.arange(frames, device="cpu")
            scans.append(Scan(grid, "time", forwards.flip(0) if j % 2 else forwards))
        else:
            forwards = volume_path(paths[(j // 2) % scan_paths], frames, snake)
            scans.append(Scan(grid, "volume", forwards.flip(0) if j % 2 else forwards))
    return scans


#################################################################################
#                                Selective scan                                 #
#################################################################################
# Mamba's selective state-space model, in mamba-ssm's layout so that the fused kernel is a drop-in:
#     u, delta, z: (B, E, L)    A: (E, N)    B, C: (B, N, L)    D, delta_bias: (E,)
#     h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t        (h: (B, E, N), zero before the first token)
#     y_t = C_t . h_t + D u_t,  then gated: y_t * silu(z_t)

def selective_scan_reference(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """The selective scan one token at a time: the definition selective_scan is tested against."""
    dtype = u.dtype
    compute = torch.promote_types(dtype, torch.float32)
    u, delta, A, B, C = (x.to(compute) for x in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])  # (B, E, N)
    ys = []
    for t in range(u.shape[2]):
        decay = torch.exp(delta[:, :, t, None] * A)  # (B, E, N)
        h = decay * h + delta[:, :, t, None] * B[:, None, :, t] * u[:, :, t, None]  # (B, E, N)
        ys.append(torch.einsum("ben,bn->be", h, C[:, :, t]))  # (B, E)
    y = torch.stack(ys, dim=-1)  # (B, E, L)
    if D is not None:
        y = y + D[:, None] * u
    if z is not None:
        y = y * F.silu(z)
    return y.to(dtype)


CHUNK = 16  # tokens per chunk of the fast scan; it keeps L / CHUNK states for the backward pass


def _time_major(x: torch.Tensor | None) -> torch.Tensor | None:
    """(B, E, L) or (B, N, L) as a contiguous (L, B, E) or (L, B, N) tensor, so that every token's slice is contiguous."""
    return None if x is None else x.permute(2, 0, 1).contiguous()


def _chunk_states(u, delta, A, B, h):
    """Run the recurrence over one chunk from state h (B, E, N); inputs are time-major: u, delta (c, B, E), B (c, B, N).

    Returns the decays exp(delta_t A) and the states h_t, (c, B, E, N) each, contiguous so every step's slice is too.
    """
    decay = torch.exp(delta[..., None] * A)  # (c, B, E, N)
    states = (delta * u)[..., None] * B[:, :, None, :]  # (c, B, E, N): delta_t B_t u_t
    states[0].addcmul_(decay[0], h)  # h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t, in place
    for t in range(1, states.shape[0]):
        states[t].addcmul_(decay[t], states[t - 1])
    return decay, states


def _chunk_output(states, C, D, u):
    """y_t = C_t . h_t + D u_t over one chunk, (c, B, E), from states (c, B, E, N); the z gate comes after."""
    y = torch.matmul(states, C[..., None]).squeeze(-1)  # (c, B, E)
    return y if D is None else y + D * u


class _ChunkedSelectiveScan(torch.autograd.Function):
    """The selective scan with a hand-written backward that keeps one state per chunk, not one per token.

    The forward pass loops over tokens, storing only the state that enters each chunk. The backward pass
    recomputes a chunk's states from there and runs the recurrence in reverse:
        dh_t = C_t dy_t + exp(delta_{t+1} A) dh_{t+1}
    so (L, B, E, N) never exists; the largest tensors are (CHUNK, B, E, N). Inside, tensors are time-major
    (L first), so that a chunk and a step are contiguous slices. The softplus, the D skip and the z gate
    are differentiated here too, chunk by chunk: the backward pass keeps only the inputs (u, delta, z in
    time-major copies) and the chunk-entering states.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        u, delta, B, C, z = (_time_major(x) for x in (u, delta, B, C, z))  # (L, B, E) or (L, B, N)
        if delta_bias is not None:
            delta = delta + delta_bias
        h = u.new_zeros(u.shape[1], u.shape[2], A.shape[1])  # (B, E, N)
        out = torch.empty_like(u)  # (L, B, E)
        entering = []  # the state entering each chunk
        for start in range(0, u.shape[0], CHUNK):
            chunk = slice(start, start + CHUNK)
            entering.append(h)
            delta_c = F.softplus(delta[chunk]) if delta_softplus else delta[chunk]  # (c, B, E)
            _, states = _chunk_states(u[chunk], delta_c, A, B[chunk], h)  # (c, B, E, N)
            y_c = _chunk_output(states, C[chunk], D, u[chunk])  # (c, B, E)
            out[chunk] = y_c if z is None else y_c * F.silu(z[chunk])
            h = states[-1].clone()  # a copy: a view would keep the whole chunk alive
        ctx.delta_softplus, ctx.has_delta_bias = delta_softplus, delta_bias is not None
        ctx.save_for_backward(u, delta, A, B, C, D, z, torch.stack(entering))
        return out.permute(1, 2, 0)  # (B, E, L)

    @staticmethod
    @once_differentiable  # the backward pass is written by hand from saved tensors: a second derivative through it would be wrong
    def backward(ctx, grad_out):  # (B, E, L)
        u, delta, A, B, C, D, z, entering = ctx.saved_tensors  # time-major, as in forward; delta before softplus
        grad_out = _time_major(grad_out)  # (L, B, E)
        grad_u, grad_delta, grad_B, grad_C = (torch.empty_like(x) for x in (u, delta, B, C))
        grad_z = None if z is None else torch.empty_like(z)
        grad_A = torch.zeros_like(A)
        grad_D = None if D is None else torch.zeros_like(D)
        carry = torch.zeros_like(entering[0])  # (B, E, N): gradient reaching the chunk's last state from later ones
        starts = list(range(0, u.shape[0], CHUNK))
        for i in reversed(range(len(starts))):
            chunk = slice(starts[i], starts[i] + CHUNK)
            u_c, B_c, C_c, grad_y_c = u[chunk], B[chunk], C[chunk], grad_out[chunk]
            delta_c = F.softplus(delta[chunk]) if ctx.delta_softplus else delta[chunk]  # (c, B, E)
            decay, states = _chunk_states(u_c, delta_c, A, B_c, entering[i])  # (c, B, E, N) each
            if z is not None:  # back through the gate: out_t = (y_t + D u_t) silu(z_t)
                y_c = _chunk_output(states, C_c, D, u_c)  # (c, B, E)
                z_c, sigmoid = z[chunk], torch.sigmoid(z[chunk])
                grad_z[chunk] = grad_y_c * y_c * sigmoid * (1 + z_c * (1 - sigmoid))  # silu' = sigmoid (1 + z (1 - sigmoid))
                grad_y_c = grad_y_c * z_c * sigmoid  # times silu(z_t)
            grad_C[chunk] = torch.matmul(states.transpose(-1, -2), grad_y_c[..., None]).squeeze(-1)  # (c, B, N)
            # dh_t: directly from y_t = C_t . h_t, and through h_{t+1} = exp(delta_{t+1} A) h_t + ...
            grad_h = grad_y_c[..., None] * C_c[:, :, None, :]  # (c, B, E, N)
            grad_h[-1] += carry
            for t in range(grad_h.shape[0] - 1, 0, -1):
                grad_h[t - 1].addcmul_(decay[t], grad_h[t])
            carry = decay[0] * grad_h[0]
            # d loss / d (delta_t u_t) and d loss / d B_t, through the input term delta_t B_t u_t
            grad_delta_u = torch.matmul(grad_h, B_c[..., None]).squeeze(-1)  # (c, B, E)
            grad_B[chunk] = torch.matmul(grad_h.transpose(-1, -2), (delta_c * u_c)[..., None]).squeeze(-1)  # (c, B, N)
            grad_u[chunk] = grad_delta_u * delta_c
            if D is not None:  # through the skip D u_t
                grad_u[chunk] += grad_y_c * D
                grad_D += (grad_y_c * u_c).sum((0, 1))
            # d loss / d (delta_t A) = dh_t * exp(delta_t A) * h_{t-1}, in grad_h's memory
            grad_log_decay = grad_h.mul_(decay)  # (c, B, E, N)
            grad_log_decay[1:] *= states[:-1]
            grad_log_decay[0] *= entering[i]
            grad_A += (grad_log_decay * delta_c[..., None]).sum((0, 1))  # (E, N)
            grad_delta[chunk] = grad_delta_u * u_c + (grad_log_decay * A).sum(-1)  # (c, B, E)
            if ctx.delta_softplus:
                grad_delta[chunk] *= torch.sigmoid(delta[chunk])  # softplus' = sigmoid
        grad_delta_bias = grad_delta.sum((0, 1)) if ctx.has_delta_bias else None
        grad_u, grad_delta, grad_B, grad_C, grad_z = (
            None if g is None else g.permute(1, 2, 0) for g in (grad_u, grad_delta, grad_B, grad_C, grad_z))  # (B, E, L) or (B, N, L)
        return grad_u, grad_delta, grad_A, grad_B, grad_C, grad_D, grad_z, grad_delta_bias, None


@torch.compiler.disable  # a Python loop over tokens: torch.compile would unroll it
def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """The selective scan in pure torch, fast and lean in memory; same arguments as mamba-ssm's selective_scan_fn.

    Computes in float32 (float64 for float64 inputs) with autocast off, and returns u's dtype.
    """
    dtype = u.dtype
    compute = torch.promote_types(dtype, torch.float32)
    with torch.autocast(u.device.type, enabled=False):
        inputs = (None if x is None else x.to(compute) for x in (u, delta, A, B, C, D, z, delta_bias))
        y = _ChunkedSelectiveScan.apply(*inputs, delta_softplus)  # (B, E, L)
    return y.to(dtype)


def selective_scan_for(device: torch.device):
    """The scan the Mamba layers run on a device: mamba-ssm's fused kernel on CUDA where it is installed, else selective_scan."""
    return fused_selective_scan if fused_selective_scan is not None and device.type == "cuda" else selective_scan


#################################################################################
#                                  Mamba mixer                                  #
#################################################################################

class MambaMixer(nn.Module):
    """Mamba-1's mixer: in_proj, causal depthwise conv, SiLU, input-dependent (delta, B, C), selective scan, gate."""

    def __init__(self, dim: int, d_state: int = 16, expand: int = 2, d_conv: int = 4,
                 dt_min: float = 0.001, dt_max: float = 0.1, dt_init_floor: float = 1e-4):
        super().__init__()
        inner = expand * dim  # E
        self.dt_rank = math.ceil(dim / 16)  # R
        self.d_state = d_state
        self.in_proj = nn.Linear(dim, 2 * inner, bias=False)
        self.conv1d = nn.Conv1d(inner, inner, d_conv, groups=inner, padding=d_conv - 1)
        self.x_proj = nn.Linear(inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, inner)
        self.out_proj = nn.Linear(inner, dim, bias=False)

        # Mamba's initialisation: delta starts log-uniform in [dt_min, dt_max], through softplus(bias) ...
        nn.init.uniform_(self.dt_proj.weight, -self.dt_rank ** -0.5, self.dt_rank ** -0.5)
        dt = torch.exp(torch.rand(inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus
        # ... and A = -exp(A_log) = -[1, 2, ..., N] in every channel (S4D-Real).
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(inner, 1))
        self.D = nn.Parameter(torch.ones(inner))  # the skip connection D u_t

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, D)
        length = x.shape[1]
        x, z = rearrange(self.in_proj(x), "b l (two e) -> two b e l", two=2)  # (B, E, L) each
        x = F.silu(self.conv1d(x)[..., :length])  # (B, E, L), causal: padded on the left only
        delta, B, C = torch.split(self.x_proj(x.transpose(1, 2)), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = self.dt_proj.weight @ delta.transpose(1, 2)  # (B, E, L); the bias is added inside the scan
        B, C = B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous()  # (B, N, L) each
        A = -torch.exp(self.A_log.float())  # (E, N)
        y = selective_scan_for(x.device)(x.contiguous(), delta.contiguous(), A, B, C, self.D.float(), z.contiguous(),
                 delta_bias=self.dt_proj.bias.float(), delta_softplus=True)  # (B, E, L)
        return self.out_proj(y.transpose(1, 2))  # (B, L, D)


#################################################################################
#                                  ZigMa block                                  #
#################################################################################

def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]  # (B, L, D)


class CrossAttention(nn.Module):
    """Multi-head attention from the tokens (queries) to context tokens (keys and values)."""

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim)
        self.to_kv = nn.Linear(context_dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, L, D); context: (B, S, context_dim); context_mask: (B, S), True for real tokens, False for padding."""
        q = rearrange(self.to_q(x), "b l (h e) -> b h l e", h=self.heads)  # (B, heads, L, D/heads)
        k, v = rearrange(self.to_kv(context), "b s (two h e) -> two b h s e", two=2, h=self.heads)  # (B, heads, S, D/heads)
        # Padding must not be attended to, or a caption's result would depend on the others in its batch.
        attn_mask = None if context_mask is None else context_mask[:, None, None, :]  # (B, 1, 1, S)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, heads, L, D/heads)
        return self.proj(rearrange(out, "b h l e -> b l (h e)"))  # (B, L, D)


class ZigMaBlock(nn.Module):
    """A Mamba layer that reads the tokens in its scan's order, with DiT's adaLN-Zero conditioning.

    Usable on its own: tokens (B, T*H*W, D) in row-major (t, h, w) order, a condition vector (B, D),
    the layer's Scan, and optionally context tokens (B, S, context_dim) for cross-attention with their
    mask (B, S) (True for real tokens; None: all are).
    """

    def __init__(self, dim: int, d_state: int = 16, expand: int = 2, context_dim: int = 0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mixer = MambaMixer(dim, d_state, expand)
        self.cross_attention = None
        if context_dim:
            self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.cross_attention = CrossAttention(dim, context_dim, heads=max(1, dim // 64))
        branches = 2 if context_dim else 1
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 3 * branches * dim))  # shift, scale, gate

    def forward(self, x: torch.Tensor, c: torch.Tensor, scan: Scan, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        modulation = self.adaLN_modulation(c).chunk(6 if self.cross_attention else 3, dim=1)  # (B, D) each
        shift, scale, gate = modulation[:3]
        h = scan.to_sequences(modulate(self.norm1(x), shift, scale))  # (sequences, L, D) in scan order
        h = scan.from_sequences(self.mixer(h), batch=x.shape[0])  # (B, T*H*W, D) in token order
        x = x + gate[:, None] * h
        if self.cross_attention is not None:
            assert context is not None, "this block has cross-attention: pass context tokens"
            shift, scale, gate = modulation[3:]
            x = x + gate[:, None] * self.cross_attention(modulate(self.norm2(x), shift, scale), context, context_mask)
        return x  # (B, T*H*W, D)


#################################################################################
#                       Embedding layers and the final layer                    #
#################################################################################

class TimestepEmbedder(nn.Module):
    """Embeds t in [0, 1] with sinusoids of t * 1000 (DiT's frequency range), then an MLP."""

    def __init__(self, dim: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:  # (B,)
        half = self.frequency_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / half)  # (half,)
        angles = 1000 * t.to(torch.promote_types(t.dtype, torch.float32))[:, None] * freqs  # (B, half), float32 or more
        frequencies = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)  # (B, frequency_dim)
        return self.mlp(frequencies.to(self.mlp[0].weight.dtype))  # (B, D)


def sincos_1d(positions: torch.Tensor, dim: int) -> torch.Tensor:
    freqs = 1.0 / 10000 ** (torch.arange(dim // 2) / (dim // 2))  # (dim/2,)
    angles = positions.float()[:, None] * freqs  # (P, dim/2)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)  # (P, dim)


def sincos_position_embedding(grid: tuple[int, int, int], dim: int) -> torch.Tensor:
    """Fixed sin-cos embedding of a (T, H, W) grid: rows and columns in half the channels each, plus time."""
    frames, h, w = grid
    rows = sincos_1d(torch.arange(h), dim // 2)[:, None].expand(h, w, dim // 2)  # (H, W, D/2)
    cols = sincos_1d(torch.arange(w), dim // 2)[None].expand(h, w, dim // 2)  # (H, W, D/2)
    space = torch.cat([rows, cols], dim=-1)  # (H, W, D)
    time = sincos_1d(torch.arange(frames), dim) if frames > 1 else torch.zeros(1, dim)  # (T, D)
    return (time[:, None, None] + space[None]).reshape(1, frames * h * w, dim)  # (1, T*H*W, D)


class FinalLayer(nn.Module):
    """adaLN, then a linear map from each token to its patch of pixels."""

    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:  # (B, L, D), (B, D)
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # (B, D) each
        return self.linear(modulate(self.norm(x), shift, scale))  # (B, L, p*p*C)


#################################################################################
#                                  ZigMa model                                  #
#################################################################################

@dataclass
class ZigMaConfig:
    input_size: int = 32  # image side in pixels (or latent cells); square
    in_channels: int = 3
    patch_size: int = 2
    dim: int = 384  # D
    depth: int = 12
    scan: str = "zigzag"  # "zigzag" (continuous snake paths) or "sweep" (raster, the paper's baseline)
    scan_paths: int = 8  # K: layer i reads path i mod K; the paper's best is Zigzag-8
    frames: int = 0  # 0 = images; T > 0 = clips of T frames
    video_scan: str = "sst"  # for clips: per-layer letters, s spatial, t temporal, v volume; "sst" is the paper's
    num_classes: int = 0  # 0 = unconditional; class num_classes is the "null" label for guidance
    context_dim: int = 0  # 0 = no cross-attention; else the width of the context tokens
    d_state: int = 16  # N, as in Mamba
    expand: int = 2  # E = expand * D, as in Mamba
    pos_embed: str = "learned"  # "learned", "sincos" (fixed) or "none"

    def __post_init__(self):
        assert self.input_size % self.patch_size == 0, f"patch size {self.patch_size} must divide input size {self.input_size}"
        assert self.scan in ("zigzag", "sweep"), f"scan must be 'zigzag' or 'sweep', not {self.scan!r}"
        assert 1 <= self.scan_paths <= 8, f"scan_paths must be between 1 and 8, not {self.scan_paths}"
        assert self.video_scan and set(self.video_scan) <= set("stv"), f"video_scan takes letters s, t and v, not {self.video_scan!r}"
        assert self.pos_embed in ("learned", "sincos", "none"), f"unknown pos_embed {self.pos_embed!r}"
        assert self.dim % 4 == 0, "dim must be a multiple of 4 (the sin-cos embedding splits it)"

    @property
    def grid(self) -> tuple[int, int, int]:
        side = self.input_size // self.patch_size
        return (max(self.frames, 1), side, side)  # (T, H, W) tokens


class ZigMa(nn.Module):
    """ZigMa: patchify, add positions, a stack of ZigMaBlocks with their scans, then unpatchify."""

    def __init__(self, config: ZigMaConfig):
        super().__init__()
        self.config = config
        dim, grid = config.dim, config.grid
        self.patch_embed = nn.Conv2d(config.in_channels, dim, config.patch_size, stride=config.patch_size)
        self.t_embedder = TimestepEmbedder(dim)
        self.y_embedder = nn.Embedding(config.num_classes + 1, dim) if config.num_classes else None  # +1: null label
        # The "no text" context for guidance: one learned token, broadcast over the context length.
        self.null_context = nn.Parameter(torch.zeros(1, 1, config.context_dim)) if config.context_dim else None
        if config.pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, math.prod(grid), dim))
        elif config.pos_embed == "sincos":
            self.register_buffer("pos_embed", sincos_position_embedding(grid, dim))
        else:
            self.pos_embed = None
        pattern = config.video_scan if config.frames else "s"
        self.scans = nn.ModuleList(layer_scans(grid, config.depth, config.scan, config.scan_paths, pattern))
        self.blocks = nn.ModuleList(
            ZigMaBlock(dim, config.d_state, config.expand, config.context_dim) for _ in range(config.depth))
        self.final_layer = FinalLayer(dim, config.patch_size, config.in_channels)
        self.initialize_weights()

    def initialize_weights(self):
        # Patch embedding like a linear layer (DiT).
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        # Embeddings: small normal.
        if isinstance(self.pos_embed, nn.Parameter):
            nn.init.normal_(self.pos_embed, std=0.02)
        for layer in self.t_embedder.mlp[0], self.t_embedder.mlp[2]:
            nn.init.normal_(layer.weight, std=0.02)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.weight, std=0.02)
        if self.null_context is not None:
            nn.init.normal_(self.null_context, std=0.02)
        # adaLN-Zero: every block starts as the identity.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        # The output starts at zero.
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)
        # The Mamba mixers keep Mamba's own initialisation (MambaMixer.__init__).

    def null_conditions(self, batch: int, context_length: int = 1):
        """The "no label" labels (B,) and "no text" context (B, S, context_dim) used for guidance; None where unused.

        The null context is one learned token repeated S times. It needs no mask: attending to S copies of
        one token gives the same result as attending to one.
        """
        y = None
        if self.y_embedder is not None:
            y = torch.full((batch,), self.config.num_classes, device=self.y_embedder.weight.device)
        context = None
        if self.null_context is not None:
            context = self.null_context.expand(batch, context_length, -1)
        return y, context

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C, H, W) images or (B, T, C, H, W) clips; t: (B,) in [0, 1]; y: (B,) labels;
        context: (B, S, context_dim) text tokens; context_mask: (B, S), False where the context is padding.

        A missing y or context means the null condition. Returns the velocity, shaped like x.
        """
        config = self.config
        frames, h, w = config.grid
        video = x.dim() == 5
        assert video == (config.frames > 0), f"expected {'clips (B, T, C, H, W)' if config.frames else 'images (B, C, H, W)'}, got {tuple(x.shape)}"
        assert y is None or self.y_embedder is not None, "this model has no classes: leave y out"
        assert context is None or self.null_context is not None, "this model has no cross-attention: leave context out"
        assert context_mask is None or context is not None, "a context mask needs its context"
        batch = x.shape[0]
        null_y, null_context = self.null_conditions(batch)
        y = null_y if y is None else y
        context = null_context if context is None else context

        pixels = x.flatten(0, 1) if video else x  # (B*T, C, H*p, W*p)
        tokens = rearrange(self.patch_embed(pixels), "(b t) d h w -> b (t h w) d", b=batch)  # (B, T*H*W, D)
        if self.pos_embed is not None:
            tokens = tokens + self.pos_embed
        c = self.t_embedder(t)  # (B, D)
        if y is not None:
            c = c + self.y_embedder(y)  # (B, D)
        for block, scan in zip(self.blocks, self.scans):
            tokens = block(tokens, c, scan, context, context_mask)  # (B, T*H*W, D)
        out = self.final_layer(tokens, c)  # (B, T*H*W, p*p*C)
        p = config.patch_size
        out = rearrange(out, "b (t h w) (p q c) -> b t c (h p) (w q)", t=frames, h=h, w=w, p=p, q=p)  # (B, T, C, H*p, W*p)
        return out if video else out[:, 0]


#################################################################################
#                                    Presets                                    #
#################################################################################
# DiT's widths. A ZigMa layer (Mamba mixer + adaLN, about 9.25 D^2 parameters) is half a DiT block
# (attention + MLP + adaLN, 18 D^2), so the presets stack twice DiT's depth and match its sizes.

PRESET_SHAPES = {
    "Tiny": dict(dim=128, depth=8),  # trains on a laptop CPU
    "S": dict(dim=384, depth=24),
    "B": dict(dim=768, depth=24),
    "L": dict(dim=1024, depth=48),
    "XL": dict(dim=1152, depth=56),
}
PRESETS = {f"ZigMa-{size}/{p}": dict(shape, patch_size=p) for size, shape in PRESET_SHAPES.items() for p in (2, 4, 8)}


def preset_config(name: str, **fields) -> ZigMaConfig:
    """The config of a named preset ("ZigMa-B/2"), with other fields (input_size, frames, ...) set by keyword."""
    return ZigMaConfig(**PRESETS[name], **fields)


#################################################################################
#                     Flow matching: the loss and the sampler                   #
#################################################################################

def flow_loss(model: ZigMa, x: torch.Tensor, y=None, context=None, context_mask=None, drop_prob: float = 0.1) -> torch.Tensor:
    """Velocity-matching loss on the linear path x_t = (1 - t) noise + t x, t ~ U[0, 1] per example.

    For classifier-free guidance, each example's label and context are replaced by the null condition
    with probability drop_prob (when given).
    """
    batch = x.shape[0]
    noise = torch.randn_like(x)
    t = torch.rand(batch, device=x.device)  # (B,)
    t_ = t.view(batch, *[1] * (x.dim() - 1))  # broadcastable over x
    x_t = (1 - t_) * noise + t_ * x
    if y is not None or context is not None:
        drop = torch.rand(batch, device=x.device) < drop_prob  # (B,)
        null_y, null_context = model.null_conditions(batch, context.shape[1] if context is not None else 1)
        if y is not None:
            y = torch.where(drop, null_y, y)
        if context is not None:
            context = torch.where(drop[:, None, None], null_context, context)
            if context_mask is not None:
                context_mask = context_mask | drop[:, None]  # the null context has no padding
    v = model(x_t, t, y, context, context_mask)
    return F.mse_loss(v.float(), (x - noise).float())


def guided_velocity(model: ZigMa, x, t, y=None, context=None, context_mask=None, cfg_scale: float = 1.0) -> torch.Tensor:
    """The velocity at (x, t); with a label or context and cfg_scale != 1, classifier-free guided:
    v = v_null + cfg_scale * (v_cond - v_null), both passes in one batch.
    """
    if y is None and context is None:
        return model(x, t)
    if cfg_scale == 1:  # no guidance: v = v_cond, one pass
        return model(x, t, y, context, context_mask)
    batch = x.shape[0]
    null_y, null_context = model.null_conditions(batch, context.shape[1] if context is not None else 1)
    both_y = torch.cat([y, null_y]) if y is not None else None
    both_context = torch.cat([context, null_context]) if context is not None else None
    both_mask = torch.cat([context_mask, torch.ones_like(context_mask)]) if context_mask is not None else None
    v_cond, v_null = model(torch.cat([x, x]), torch.cat([t, t]), both_y, both_context, both_mask).chunk(2)
    return v_null + cfg_scale * (v_cond - v_null)


@torch.no_grad()
def sample(model: ZigMa, noise: torch.Tensor, steps: int = 50, y=None, context=None, context_mask=None,
           cfg_scale: float = 1.0, method: str = "euler") -> torch.Tensor:
    """Integrate dx/dt = v(x, t) from noise at t = 0 to data at t = 1 with `steps` Euler or Heun steps."""
    assert method in ("euler", "heun"), f"method must be 'euler' or 'heun', not {method!r}"
    x = noise
    times = torch.linspace(0, 1, steps + 1, device=noise.device)
    for t, t_next in zip(times[:-1], times[1:]):
        dt = t_next - t
        v = guided_velocity(model, x, t.expand(x.shape[0]), y, context, context_mask, cfg_scale)
        if method == "heun":  # average the slopes at both ends of the step
            v_next = guided_velocity(model, x + dt * v, t_next.expand(x.shape[0]), y, context, context_mask, cfg_scale)
            v = (v + v_next) / 2
        x = x + dt * v
    return x


#################################################################################
#                          Text encoders for cross-attention                    #
#################################################################################

class CaptionEncoder(nn.Module):
    """The built-in text encoder, learned with the model: word embeddings and a small transformer.

    It needs no download. Its vocabulary, the words of the training captions, is saved with the model;
    index 0 pads, 1 stands for an unknown word, 2 starts every caption (so that "" still has a token).
    """

    special = ["<pad>", "<unknown>", "<start>"]

    def __init__(self, vocabulary: list[str], dim: int, max_words: int = 32, depth: int = 2):
        super().__init__()
        assert vocabulary[:3] == self.special, "the vocabulary starts with the special tokens"
        self.vocabulary, self.max_words = vocabulary, max_words
        self.index = {word: i for i, word in enumerate(vocabulary)}
        self.embed = nn.Embedding(len(vocabulary), dim)
        self.position = nn.Parameter(torch.randn(1, max_words + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, max(1, dim // 64), 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)

    @staticmethod
    def words(caption: str) -> list[str]:
        return re.findall(r"[a-z0-9']+", caption.lower())

    @classmethod
    def build_vocabulary(cls, captions: list[str]) -> list[str]:
        return cls.special + sorted({word for caption in captions for word in cls.words(caption)})

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
