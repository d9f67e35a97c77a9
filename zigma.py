"""ZigMa: a DiT-style diffusion backbone built on Mamba, with zigzag token orders.

Paper: "ZigMa: A DiT-style Zigzag Mamba Diffusion Model", Hu et al., ECCV 2024 (arXiv 2403.13802).
It builds on Mamba (arXiv 2312.00752), DiT (arXiv 2212.09748), SiT (arXiv 2401.08740) and stochastic
interpolants (Albergo and Vanden-Eijnden, arXiv 2209.15571).

Mamba reads a 1D sequence in order, in time linear in its length (attention's is quadratic), and each token
sees only itself and the tokens before it. So the order of the patch tokens matters. Before each Mamba layer,
ZigMa reorders the tokens along one of eight continuous zigzag paths over the token grid. After the layer, it
puts them back. Neighbours in the sequence are then neighbours in the image. For video, spatial layers zigzag
within each frame and temporal layers read each position through time. Volume layers, the paper's unfactorized
alternative (not in the official code), read a whole clip as one sequence.

Sections: 1. token orders, 2. the selective scan, 3. the Mamba mixer, 4. the ZigMa block, 5. the model,
6. flow matching. Appendices: the scan the layers run, DiT's parts, the paper's baselines (built in
baselines.py), the presets, a demo (`python zigma.py`). The idea itself is two lines marked in
ZigMaBlock.forward.
docs/official-code.md lists every difference from the official code (github.com/CompVis/zigma), with the
reasons; a few comments here ("Official:") mark those a reader of that code would trip on.

Shapes:
    B  batch             T  frames (1 for an image)     C  image (or latent) channels    P  patch size
    H, W  the token grid: an image is H*P x W*P pixels   D  model width    S  context (text) tokens
    L  tokens in one Mamba sequence: H*W in a spatial layer, T in a temporal one, T*H*W in a volume one
    K  paths the layers take turns over (1, 2 or 8, the paper's Zigzag-1, -2 and -8)
A shape comment on a def line is the input's shape; on any other line, the shape of what that line makes.
Sections 2 and 3 use lowercase shapes, since A, B, C and D there name the SSM's parameters:
    b  sequences (B*T, B*H*W or B)    l  tokens    d  model width    e = expand * d  inner width
    n  state size    r  rank of delta's projection
    h is the SSM's state and y the scan's output (from section 5 on, y is a class label)

Terms. The paper calls the token orders scans ("zigzag scan"). Here they are paths: a path is the order (a
permutation) in which a layer reads a sequence's tokens. "Scan" means only the SSM's selective scan.

Time. x_t = (1 - t) noise + t data. So t = 0 is noise and t = 1 is data, as in SiT's code (SiT's paper puts
data at 0). The network regresses the velocity dx_t/dt = data - noise, so it learns that velocity's mean
given x_t: the field whose ODE carries noise to data. Sampling integrates that ODE from t = 0 to 1.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint


# 1. Token orders: the paper's zigzag scans ------------------------------------------------------------------
# A path is a permutation of a grid's tokens: path[i] is the row-major index of the token read i-th. ZigMa's
# eight zigzag paths go line by line, every other line backwards, so that each step moves to a neighbour. On a
# 4 x 4 grid, path 1 is [0, 4, 8, 12, 13, 9, 5, 1, 2, 6, 10, 14, 15, 11, 7, 3]: column 0 down, column 1 up...
# Below, the first four paths on that grid. Each cell holds the step at which its token is read, which is
# argsort(path), the inverse permutation; TokenOrder keeps it too.
#
#     0: rows, top-left      1: columns, top-left   2: rows, bottom-right  3: columns, bottom-right
#      0  1  2  3             0  7  8 15            12 13 14 15            12 11  4  3
#      7  6  5  4             1  6  9 14            11 10  9  8            13 10  5  2
#      8  9 10 11             2  5 10 13             4  5  6  7            14  9  6  1
#     15 14 13 12             3  4 11 12             3  2  1  0            15  8  7  0
#
# Paths 4 to 7 do the same from the top-right and bottom-left corners.
#
# Why several paths:
# - Mamba is causal, and its convolution's window and its state's decay favour the tokens read just before.
#   Along one path, a token comes right after only one of its neighbours (token 5 after 6 on path 0, after 9
#   on path 1). Paths 0 and 4, by rows from the two top corners, read each row once each way: each token comes
#   right after its left neighbour on one and after its right one on the other. Paths 1 and 7, by columns from
#   the two left corners, do the same above and below (`python zigma.py` counts the pairs that K paths cover).
# - The token a path starts from sees no other token in that layer. With K = 1 or 2, every layer starts
#   top-left, so that token never sees another. At K = 8, the paper's best, layers 0 to 7 start from all four
#   corners.
# - layer_orders, at the end of this section, gives each layer its TokenOrder: spatial layer j reads path
#   j mod K.

# Where the paths start, as (rows flipped, columns flipped): top-left, bottom-right, top-right, bottom-left.
# Path k starts at CORNERS[k // 2], by rows for even k. Opposite corners come first, so that at K = 8 spatial
# layers 2 and 3 start from the corner facing that of layers 0 and 1.
# Official: top-left, top-right, bottom-left, bottom-right; at K = 8, the same eight paths in another order.
CORNERS = [(False, False), (True, True), (False, True), (True, False)]


def from_each_corner(height: int, width: int) -> list[torch.Tensor]:
    """The grid's row-major token indices, (H, W), flipped to put each corner in turn at [0, 0]."""
    # On the CPU whatever the default device: the paths become buffers, which move with the model.
    indices = torch.arange(height * width, device="cpu").view(height, width)  # (H, W)
    flipped = []
    for flip_rows, flip_cols in CORNERS:
        from_corner = indices.flip(0) if flip_rows else indices
        flipped.append(from_corner.flip(1) if flip_cols else from_corner)  # (H, W), the corner now at [0, 0]
    return flipped


def zigzag_paths(height: int, width: int) -> torch.Tensor:
    """ZigMa's eight zigzag paths over a grid, (8, H*W), drawn above: from each corner, by rows, then by
    columns, every other line backwards."""
    paths = []
    for from_corner in from_each_corner(height, width):
        for lines in (from_corner, from_corner.t()):  # by rows, then by columns (the transpose's rows)
            lines = lines.clone()  # else the write below would change from_corner
            lines[1::2] = lines[1::2].flip(1)  # every other line backwards
            paths.append(lines.reshape(-1))
    return torch.stack(paths)  # (8, H*W); paths 4 to 7 start at the other two corners


class TokenOrder(nn.Module):
    """One layer's token order: how the tokens of a (T, H, W) grid form Mamba sequences, and their path.

    The axis decides the sequences. "space": each frame is a sequence of H*W tokens (an image is a clip of
    one frame). "time": each position is a sequence of T tokens. "volume": the clip is one sequence. `path`
    permutes a sequence's L tokens. (The official code permutes them inside its Mamba layer: mamba_simple.py's
    zigzagN branch.)
    """

    def __init__(self, grid: tuple[int, int, int], axis: str, path: torch.Tensor):
        super().__init__()
        frames, height, width = grid
        length = {"space": height * width, "time": frames, "volume": frames * height * width}[axis]
        assert sorted(path.tolist()) == list(range(length)), f"a {axis} path permutes {length} tokens"
        self.grid, self.axis = grid, axis
        self.register_buffer("path", path.long(), persistent=False)  # not saved: rebuilt from the config
        # argsort(path)[token] is the step at which path reads token: the inverse permutation
        self.register_buffer("inverse", torch.argsort(path).long(), persistent=False)

    def to_sequences(self, x: torch.Tensor) -> torch.Tensor:  # (B, T*H*W, D)
        if self.axis == "space":
            x = rearrange(x, "b (frames hw) d -> (b frames) hw d", frames=self.grid[0])  # (B*T, H*W, D)
        elif self.axis == "time":
            x = rearrange(x, "b (frames hw) d -> (b hw) frames d", frames=self.grid[0])  # (B*H*W, T, D)
        # "volume": the clip is already one sequence, (B, T*H*W, D)
        return x[:, self.path]  # (sequences, L, D), in path order

    def from_sequences(self, x: torch.Tensor) -> torch.Tensor:  # (sequences, L, D)
        x = x[:, self.inverse]  # (sequences, L, D), back in the grid's (frame, row, column) order
        if self.axis == "space":
            x = rearrange(x, "(b frames) hw d -> b (frames hw) d", frames=self.grid[0])
        elif self.axis == "time":
            x = rearrange(x, "(b hw) frames d -> b (frames hw) d", hw=math.prod(self.grid[1:]))
        return x  # (B, T*H*W, D)


def volume_path(path: torch.Tensor, frames: int, reverse_odd_frames: bool) -> torch.Tensor:
    """A 2D path extended through a clip, (T*H*W,): frame f reads f*H*W + path, backwards in odd frames if
    reverse_odd_frames.

    With reverse_odd_frames, each frame starts where the one before ended. Path 0 through two 2 x 2 frames
    (when each is read):
        frame 0:  0 1    frame 1:  7 6
                  3 2              4 5
    """
    frame_size = path.numel()
    parts = [f * frame_size + (path.flip(0) if reverse_odd_frames and f % 2 else path) for f in range(frames)]
    return torch.cat(parts)  # (T*H*W,)


def layer_orders(grid: tuple[int, int, int], depth: int, family: str, num_paths: int,
                 pattern: str) -> list[TokenOrder]:
    """The token order of every layer.

    `family` names the 2D paths: zigzag, or a baseline (family_paths, an appendix). `num_paths` is K.
    `pattern` has one letter per layer and repeats over the depth (images use "s"). j counts the layers of
    each kind from 0.
    - s, spatial: the j-th spatial layer reads 2D path j mod K.
    - t, temporal: the j-th temporal layer reads time forwards if j is even, backwards if j is odd.
    - v, volume: the layers come in pairs. Pair p reads 2D path p mod K carried through the frames, first
      forwards, then backwards, so that together they let every token see every other.
    For example, "sst" at K = 8 reads path 0, path 1, time forwards, path 2, path 3, time backwards, path 4...
    """
    frames, height, width = grid
    paths_2d = family_paths(family, height, width)[:num_paths]  # (K, H*W)
    # For volume layers: odd frames backwards, so that each frame starts where the last ended. The sweep
    # baseline jumps from frame to frame, as it jumps from line to line.
    reverse_odd_frames = family != "sweep"
    count = {"s": 0, "t": 0, "v": 0}  # the layers of each kind so far
    orders = []
    for layer in range(depth):
        kind = pattern[layer % len(pattern)]
        j = count[kind]
        count[kind] += 1
        if kind == "s":
            orders.append(TokenOrder(grid, "space", paths_2d[j % num_paths]))
        elif kind == "t":
            path = torch.arange(frames, device="cpu")
            orders.append(TokenOrder(grid, "time", path.flip(0) if j % 2 else path))
        else:
            path = volume_path(paths_2d[(j // 2) % num_paths], frames, reverse_odd_frames)
            orders.append(TokenOrder(grid, "volume", path.flip(0) if j % 2 else path))
    return orders


# 2. Selective scan ------------------------------------------------------------------------------------------
# Mamba's selective state-space model (Mamba, Alg. 2, Eq. 2 and 4), in the layout of mamba-ssm's kernel.
# (mamba-ssm's Mamba module calls delta dt. Hence the names dt_proj, dt_rank and dt_min below.)
#     u, delta, z: (b, e, l)    A: (e, n)    B, C: (b, n, l)    D, delta_bias: (e,)
#     delta = delta + delta_bias, then softplus(delta)      (the softplus if delta_softplus)
#     h_i = exp(delta_i A) h_{i-1} + delta_i B_i u_i        (h: (b, e, n), zero before token 0)
#     y_i = C_i . h_i + D u_i,  then gated: y_i * silu(z_i)
# Mamba's Eq. 4 discretises h' = A h + B u by the zero-order hold, which holds u fixed over a step of length
# delta. A becomes exp(delta A), and B becomes (delta A)^-1 (exp(delta A) - I) delta B. Mamba's code and this
# file use delta B instead. The two agree to first order in delta.

def selective_scan_reference(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """The selective scan, one token at a time: the definition. The layers call selective_scan (the first
    appendix), which computes the same function faster; test_zigma.py checks that the two agree."""
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])  # (b, e, n)
    ys = []
    for i in range(u.shape[2]):  # token i
        decay = torch.exp(delta[:, :, i, None] * A)  # (b, e, n)
        h = decay * h + delta[:, :, i, None] * B[:, None, :, i] * u[:, :, i, None]  # (b, e, n)
        ys.append(torch.einsum("ben,bn->be", h, C[:, :, i]))  # (b, e)
    y = torch.stack(ys, dim=-1)  # (b, e, l)
    if D is not None:
        y = y + D[:, None] * u
    if z is not None:
        y = y * F.silu(z)
    return y


# 3. Mamba mixer ---------------------------------------------------------------------------------------------

class MambaMixer(nn.Module):
    """Mamba-1's mixer (Mamba, Fig. 3): in_proj, causal depthwise conv, SiLU, input-dependent delta, B and C,
    the selective scan, the gate, out_proj."""

    def __init__(self, dim: int, d_state: int = 16, expand: int = 2, d_conv: int = 4,
                 dt_min: float = 0.001, dt_max: float = 0.1, dt_init_floor: float = 1e-4):
        super().__init__()
        inner = expand * dim  # e
        self.dt_rank = math.ceil(dim / 16)  # r: Mamba's dt_rank="auto"
        self.d_state = d_state
        self.in_proj = nn.Linear(dim, 2 * inner, bias=False)
        # Depthwise along the tokens. It pads d_conv - 1 on both sides and is causal once cut to the first l.
        self.conv1d = nn.Conv1d(inner, inner, d_conv, groups=inner, padding=d_conv - 1)
        self.x_proj = nn.Linear(inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, inner)
        self.out_proj = nn.Linear(inner, dim, bias=False)
        # Mamba's initialisation of delta: dt_proj's weight uniform in +-r^-1/2 (Mamba's dt_init="random"),
        # and delta log-uniform in [dt_min, dt_max], through softplus(bias).
        nn.init.uniform_(self.dt_proj.weight, -self.dt_rank ** -0.5, self.dt_rank ** -0.5)
        delta_0 = torch.exp(torch.rand(inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        delta_0 = delta_0.clamp(min=dt_init_floor)  # (e,), the initial delta
        with torch.no_grad():
            self.dt_proj.bias.copy_(delta_0 + torch.log(-torch.expm1(-delta_0)))  # the inverse of softplus
        # Mamba's initialisation of A: -[1, 2, ..., n] in every channel (S4D-Real), kept as A_log = log(-A).
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(inner, 1)  # (e, n)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(inner))  # the skip connection D u_i

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (b, l, d)
        length = x.shape[1]
        x_inner, z = self.in_proj(x).chunk(2, dim=-1)  # (b, l, e) each: the branch to scan, and z, its gate
        u = F.silu(self.conv1d(x_inner.transpose(1, 2))[..., :length])  # (b, e, l), causal: the first l
        # delta_r (b, l, r), B and C (b, l, n)
        delta_r, B, C = self.x_proj(u.transpose(1, 2)).split([self.dt_rank, self.d_state, self.d_state], -1)
        # delta = softplus(dt_proj(delta_r)), with the bias and the softplus left to the scan, which applies
        # them in float32 (so does mamba-ssm's Mamba)
        delta = delta_r @ self.dt_proj.weight.t()  # (b, l, e)
        A = -torch.exp(self.A_log)  # (e, n), negative
        delta, B, C, z = (a.transpose(1, 2) for a in (delta, B, C, z))  # delta, z (b, e, l); B, C (b, n, l)
        y = selective_scan(u, delta, A, B, C, self.D, z, delta_bias=self.dt_proj.bias, delta_softplus=True)
        return self.out_proj(y.transpose(1, 2))  # (b, l, d)


# 4. ZigMa block: the paper's Zigzag Mamba block ------------------------------------------------------------

def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]  # (B, T*H*W, D)


class ZigMaBlock(nn.Module):
    """The paper's Zigzag Mamba block: a Mamba layer that reads the tokens in its layer's token order, with
    DiT's adaLN-Zero conditioning and optional cross-attention to text.

    x + gate * mixer(modulate(LayerNorm(x))) is DiT's pre-LayerNorm residual, with the mixer in place of
    attention. The mixer reads the tokens in path order:
        (B, T*H*W, D) -> to_sequences -> (sequences, L, D) -> mixer -> from_sequences -> (B, T*H*W, D)
    The adaLN gates start at zero, so the block is the identity until it trains. As in Mamba, there is no MLP:
    the mixer's in_proj and out_proj, expand * D wide, play the MLP's part.
    """
    # Official: model_zigma.py's Block.forward is Mamba's pre-norm block. With r the residual stream and o
    # the last block's output:
    #     official:  r = r + o;  n = RMSNorm(r);  o = n + gate * mixer(modulate(n))
    #     here:      x = x + gate * mixer(modulate(LayerNorm(x)))
    # So each official layer adds its normalised input n to the stream, whatever its gate. DiT's residual,
    # kept here, makes a block with zero gates the identity, so that the whole stack starts as the identity.

    def __init__(self, dim: int, order: TokenOrder, d_state: int = 16, expand: int = 2, context_dim: int = 0):
        super().__init__()
        self.order = order
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mixer = MambaMixer(dim, d_state, expand)
        self.cross_attention = None
        if context_dim:
            self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            # Heads of width 64, or one head where 64 does not divide dim.
            self.cross_attention = CrossAttention(dim, context_dim, heads=dim // 64 if dim % 64 == 0 else 1)
        # The branches: the mixer, and cross-attention if any. Each takes a shift, a scale and a gate from c.
        self.branches = 2 if context_dim else 1
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 3 * self.branches * dim))
        nn.init.zeros_(self.adaLN_modulation[-1].weight)  # adaLN-Zero: the gates start at zero
        nn.init.zeros_(self.adaLN_modulation[-1].bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor, context=None, context_mask=None):
        """x (B, T*H*W, D) in row-major (frame, row, column) order, and c (B, D). With cross-attention, also
        context (B, S, context_dim) and context_mask (B, S), True for real tokens."""
        modulation = self.adaLN_modulation(c).chunk(3 * self.branches, dim=1)  # (B, D) each
        shift, scale, gate = modulation[:3]
        # ZigMa's idea: the mixer reads the tokens in the layer's path order.
        sequences = self.order.to_sequences(modulate(self.norm1(x), shift, scale))  # (sequences, L, D)
        mixed = self.order.from_sequences(self.mixer(sequences))  # (B, T*H*W, D)
        x = x + gate[:, None] * mixed
        if self.cross_attention is not None:
            assert context is not None, "this block has cross-attention: pass context tokens"
            shift, scale, gate = modulation[3:]  # the cross-attention branch's own
            attended = self.cross_attention(modulate(self.norm2(x), shift, scale), context, context_mask)
            x = x + gate[:, None] * attended
        return x  # (B, T*H*W, D)


# 5. ZigMa model ---------------------------------------------------------------------------------------------

@dataclass
class ZigMaConfig:
    """The defaults are ZigMa-S/2 (a preset of this file, DiT-S's width at twice its depth: see the presets)
    on the 4 x 32 x 32 latents of a 256 px image."""
    input_size: int = 32  # the side of the square input, in pixels or latent cells
    in_channels: int = 4  # C: 3 for pixels, the VAE's channels for latents
    patch_size: int = 2  # P
    dim: int = 384  # D
    depth: int = 24
    path_family: str = "zigzag"  # the 2D paths (PATH_FAMILIES): zigzag, or a baseline
    num_paths: int = 8  # K: 1, 2 or 8 (the paper's best, Zigzag-8). The j-th spatial layer reads path j mod K
    frames: int = 0  # 0: images (C, H*P, W*P), read as one frame. T >= 1: clips (T, C, H*P, W*P)
    video_pattern: str = "sst"  # clips: one letter per layer, s spatial, t temporal, v volume (official: sst)
    num_classes: int = 0  # 0: unconditional. Label num_classes is the null label, for guidance
    context_dim: int = 0  # 0: no cross-attention. Else the width of the context tokens
    d_state: int = 16  # n, the SSM's state size, as in Mamba
    expand: int = 2  # the mixer's inner width is e = expand * D, as in Mamba

    def __post_init__(self):
        side, patch, family, pattern = self.input_size, self.patch_size, self.path_family, self.video_pattern
        assert side % patch == 0, f"the patch size {patch} must divide the input size {side}"
        assert family in PATH_FAMILIES, f"path_family: one of {', '.join(PATH_FAMILIES)}, not {family!r}"
        assert self.num_paths in (1, 2, 8), f"num_paths: 1, 2 or 8, not {self.num_paths}"
        assert pattern and set(pattern) <= set("stv"), f"video_pattern takes s, t and v, not {pattern!r}"

    @property
    def grid(self) -> tuple[int, int, int]:
        side = self.input_size // self.patch_size
        return (max(self.frames, 1), side, side)  # (T, H, W) tokens

    @property
    def input_shape(self) -> tuple[int, ...]:  # one input's shape, without the batch
        image = (self.in_channels, self.input_size, self.input_size)
        return (self.frames, *image) if self.frames else image


class ZigMa(nn.Module):
    """DiT's outline: patchify, add positions, run the ZigMaBlocks (each in its token order), unpatchify."""

    def __init__(self, config: ZigMaConfig):
        super().__init__()
        self.config = config
        dim, grid = config.dim, config.grid
        # No global xavier init, unlike DiT: each module sets what it needs, other layers keep PyTorch's.
        self.patch_embed = nn.Conv2d(config.in_channels, dim, config.patch_size, stride=config.patch_size)
        nn.init.xavier_uniform_(self.patch_embed.weight.view(dim, -1))  # like a linear layer, as DiT's
        nn.init.zeros_(self.patch_embed.bias)
        self.t_embedder = TimestepEmbedder(dim)
        self.y_embedder = None
        if config.num_classes:  # num_classes + 1 rows, the last for the null label
            self.y_embedder = nn.Embedding(config.num_classes + 1, dim)
            # N(0, 1), as ADM's, not DiT's N(0, 0.02): a label must still weigh in c once the timestep's
            # embedding has grown in training (docs/official-code.md).
            nn.init.normal_(self.y_embedder.weight, std=1.0)
        self.null_context = None  # the "no text" context, for guidance: one learned token
        if config.context_dim:
            self.null_context = nn.Parameter(torch.randn(1, 1, config.context_dim) * 0.02)
        # A learned position per token, in one table for images and clips. The official code learns them too,
        # from zeros; DiT uses a fixed 2D sin-cos table.
        self.pos_embed = nn.Parameter(torch.randn(1, math.prod(grid), dim) * 0.02)
        pattern = config.video_pattern if config.frames else "s"
        orders = layer_orders(grid, config.depth, config.path_family, config.num_paths, pattern)
        self.blocks = nn.ModuleList(
            ZigMaBlock(dim, order, config.d_state, config.expand, config.context_dim) for order in orders)
        self.final_layer = FinalLayer(dim, config.patch_size, config.in_channels)
        self.grad_checkpointing = False  # True: recompute each block in the backward pass, to save memory

    def conditions(self, batch: int, y=None, context=None, context_mask=None, drop=None):
        """y (B,), context (B, S, context_dim) and context_mask (B, S) as forward takes them. A missing or
        dropped condition becomes the null one. drop (B,) is True in the rows to drop: random rows in
        training, and guidance's null half. Conditions the model does not take stay None."""
        if self.y_embedder is not None:  # labels: the null label is num_classes
            null_y = torch.full((batch,), self.config.num_classes, device=self.y_embedder.weight.device)
            y = null_y if y is None else y
            y = y if drop is None else torch.where(drop, null_y, y)  # (B,)
        if self.null_context is not None:  # text: the null context is one learned token
            if context is None:
                context = self.null_context.expand(batch, 1, -1)  # (B, 1, context_dim)
            elif drop is not None:
                # A dropped row's context becomes the null token, repeated S times and all unmasked.
                # Attention over equal tokens returns that token, as over the one null token of no context.
                context = torch.where(drop[:, None, None], self.null_context, context)  # (B, S, context_dim)
                context_mask = None if context_mask is None else context_mask | drop[:, None]  # (B, S)
        return y, context, context_mask

    def forward(self, x: torch.Tensor, t: torch.Tensor, y=None, context=None, context_mask=None,
                drop=None) -> torch.Tensor:
        """Returns the velocity, shaped like x. x: (B, C, H*P, W*P) images or (B, T, C, H*P, W*P) clips.
        t: (B,) in [0, 1]. y: (B,) labels. context: (B, S, context_dim) text tokens. context_mask: (B, S),
        False on padding. drop: (B,), the rows whose conditions are dropped (see conditions)."""
        config = self.config
        frames, height, width = config.grid
        assert x.shape[1:] == config.input_shape, f"x is {tuple(x.shape)}, not (B, {config.input_shape})"
        assert y is None or self.y_embedder is not None, "this model has no classes: leave y out"
        assert context is None or self.null_context is not None, "this model takes no context: leave it out"
        assert context is not None or context_mask is None, "a context_mask needs its context"
        batch = x.shape[0]
        y, context, context_mask = self.conditions(batch, y, context, context_mask, drop)
        pixels = x.reshape(-1, *x.shape[-3:])  # (B*T, C, H*P, W*P), T = 1 for images
        tokens = rearrange(self.patch_embed(pixels), "(b frames) d height width -> b (frames height width) d",
                           b=batch)  # (B, T*H*W, D)
        tokens = tokens + self.pos_embed
        c = self.t_embedder(t)  # (B, D)
        if y is not None:
            c = c + self.y_embedder(y)  # (B, D)
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, c, context, context_mask, use_reentrant=False)
            else:
                tokens = block(tokens, c, context, context_mask)  # (B, T*H*W, D)
        out = self.final_layer(tokens, c)  # (B, T*H*W, P*P*C)
        out = rearrange(out, "b (frames height width) (p1 p2 ch) -> b frames ch (height p1) (width p2)",
                        frames=frames, height=height, width=width, p1=config.patch_size,
                        p2=config.patch_size)  # (B, T, C, H*P, W*P)
        return out.reshape(x.shape)  # an image drops its frame axis, T = 1


# 6. Flow matching: the loss and the sampler -----------------------------------------------------------------
# SiT's linear interpolant between noise and data (one of Albergo and Vanden-Eijnden's stochastic
# interpolants), its velocity loss, classifier-free guidance, and the ODE sampler.


def flow_loss(model: ZigMa, x: torch.Tensor, y=None, context=None, context_mask=None, drop_prob: float = 0.1,
              noise: torch.Tensor | None = None, t: torch.Tensor | None = None) -> torch.Tensor:
    """SiT's velocity loss for data x, on the interpolant x_t = (1 - t) noise + t x, with one t per example.

    noise (like x) and t (B,) are drawn unless given: t uniform on [0, 1], as in SiT and the paper (train.py
    passes its own t, logit-normal by default: --time-sampling). For guidance, each example's label and
    context are dropped together with probability drop_prob.
    """
    batch = x.shape[0]
    noise = torch.randn_like(x) if noise is None else noise
    t = torch.rand(batch, device=x.device) if t is None else t
    t_broadcast = t.view(batch, *([1] * (x.dim() - 1))).to(x.dtype)  # (B, 1, 1, 1), or (B, 1, 1, 1, 1)
    x_t = (1 - t_broadcast) * noise + t_broadcast * x
    drop = None
    if y is not None or context is not None:
        drop = torch.rand(batch, device=x.device) < drop_prob  # (B,)
    v = model(x_t, t, y, context, context_mask, drop)
    return F.mse_loss(v.float(), (x - noise).float())


def guided_velocity(model: ZigMa, x_t, t, y=None, context=None, context_mask=None, cfg_scale: float = 1.0):
    """The velocity at (x_t, t). With a label or context and cfg_scale != 1, it is classifier-free guided (Ho
    and Salimans, arXiv 2207.12598), both passes in one batch: v = v_null + cfg_scale * (v_cond - v_null)."""
    if y is None and context is None:
        return model(x_t, t)
    if cfg_scale == 1:  # no guidance, v = v_cond, one pass
        return model(x_t, t, y, context, context_mask)
    null_half = torch.tensor([False] * len(x_t) + [True] * len(x_t), device=x_t.device)  # (2B,)
    x_t, t, y, context, context_mask = (None if a is None else torch.cat([a, a])  # 2B rows each
                                        for a in (x_t, t, y, context, context_mask))
    v_cond, v_null = model(x_t, t, y, context, context_mask, drop=null_half).chunk(2)  # the second half: null
    return v_null + cfg_scale * (v_cond - v_null)


@torch.no_grad()
def sample(model: ZigMa, noise: torch.Tensor, steps: int = 50, y=None, context=None, context_mask=None,
           cfg_scale: float = 1.0, method: str = "euler") -> torch.Tensor:
    """Integrate dx/dt = v(x, t) from noise at t = 0 to data at t = 1, in `steps` equal steps: by Euler (one
    model call a step) or by Heun (two: the mean of the slopes at both ends of the step)."""
    assert method in ("euler", "heun"), f"method must be 'euler' or 'heun', not {method!r}"
    x_t = noise
    times = torch.linspace(0, 1, steps + 1, device=noise.device)
    for t, t_next in zip(times[:-1], times[1:]):
        step_size = t_next - t
        v = guided_velocity(model, x_t, t.expand(x_t.shape[0]), y, context, context_mask, cfg_scale)
        if method == "heun":
            x_next = x_t + step_size * v  # Euler's end of the step
            v_next = guided_velocity(model, x_next, t_next.expand(x_t.shape[0]), y, context, context_mask,
                                     cfg_scale)
            v = (v + v_next) / 2
        x_t = x_t + step_size * v
    return x_t


# Appendix: the scan the layers run -------------------------------------------------------------------------

try:
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as fused_selective_scan
except Exception:  # mamba-ssm 2.x raises more than ImportError where its CUDA extension is missing
    fused_selective_scan = None
try:
    import fast_scan  # the same scan in chunks of tokens, in fewer operations and less memory (fast_scan.py)
except ImportError:  # zigma.py on its own: the layers run selective_scan_reference
    fast_scan = None


def selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus=False):
    """The scan the layers run: selective_scan_reference's function, by the fastest implementation at hand.
    Each agrees with the reference to rounding, computes in float32 (float64 for float64 inputs), autocast or
    not, and returns u's dtype."""
    precision = torch.promote_types(A.dtype, torch.float32)  # the kernel takes A, D and delta_bias in float32
    A, D, delta_bias = A.to(precision), D.to(precision), delta_bias.to(precision)
    if fused_selective_scan is not None and u.is_cuda and u.dtype != torch.float64:  # mamba-ssm's kernel
        return fused_selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    if fast_scan is not None:  # fast_scan.py's: by chunks of tokens, in few operations
        return fast_scan.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    # zigma.py on its own: the reference
    reference = selective_scan_reference
    if torch.compiler.is_compiling():  # its loop runs eager: compiled, it would unroll, a step a token
        reference = torch.compiler.disable(reference)
    compute = torch.promote_types(u.dtype, torch.float32)
    with torch.autocast(u.device.type, enabled=False):  # else the einsum would run in bf16 under autocast
        y = reference(*(x.to(compute) for x in (u, delta, A, B, C, D, z, delta_bias)), delta_softplus)
    return y.to(u.dtype)  # (b, e, l)


# Appendix: DiT's parts, and cross-attention -----------------------------------------------------------------

class TimestepEmbedder(nn.Module):
    """Embeds t in [0, 1] as DiT embeds its timesteps in [0, 1000]: sinusoids of 1000 t, then an MLP, with
    weights from N(0, 0.02). SiT and the official code embed t itself, at which scale most sinusoids barely
    change from t = 0 to 1 (docs/official-code.md)."""

    def __init__(self, dim: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        for layer in self.mlp[0], self.mlp[2]:
            nn.init.normal_(layer.weight, std=0.02)

    def forward(self, t: torch.Tensor) -> torch.Tensor:  # (B,)
        half = self.frequency_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / half)  # (half,)
        t = t.to(torch.promote_types(t.dtype, torch.float32))  # at least float32
        angles = 1000 * t[:, None] * freqs  # (B, half)
        t_freq = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)  # (B, frequency_dim)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))  # (B, D)


class FinalLayer(nn.Module):
    """adaLN, then a linear map from each token to its patch, as DiT's. Its output starts at zero."""

    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        for layer in self.adaLN_modulation[-1], self.linear:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:  # (B, T*H*W, D), (B, D)
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # (B, D) each
        return self.linear(modulate(self.norm(x), shift, scale))  # (B, T*H*W, P*P*C)


class CrossAttention(nn.Module):
    """Multi-head attention from the tokens (queries) to the context tokens (keys and values)."""

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim)
        self.to_kv = nn.Linear(context_dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None = None):
        """x (B, T*H*W, D), context (B, S, context_dim), and context_mask (B, S), True for real tokens and
        False for padding. Each row needs a real token, since padding alone has nothing to attend to."""
        q = rearrange(self.to_q(x), "b tokens (heads head_dim) -> b heads tokens head_dim", heads=self.heads)
        k, v = rearrange(self.to_kv(context), "b s (two heads head_dim) -> two b heads s head_dim", two=2,
                         heads=self.heads)  # (B, heads, S, D / heads) each
        # Padding is not attended to, or a caption's result would depend on how far its batch pads it.
        attn_mask = None if context_mask is None else context_mask[:, None, None, :]  # (B, 1, 1, S)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, heads, T*H*W, D / heads)
        out = rearrange(out, "b heads tokens head_dim -> b tokens (heads head_dim)")  # (B, T*H*W, D)
        return self.proj(out)


# Appendix: the paper's baselines ---------------------------------------------------------------------------

PATH_FAMILIES = ("zigzag", "sweep", "hilbert")  # the names ZigMaConfig.path_family takes


def family_paths(family: str, height: int, width: int) -> torch.Tensor:
    """The eight 2D paths of a family, (8, H*W): the zigzags, or one of the paper's two baselines, raster
    sweeps or Hilbert curves, which baselines.py builds (a first reading can skip it)."""
    if family == "zigzag":
        return zigzag_paths(height, width)
    import baselines  # here, not at the top: baselines.py builds on from_each_corner, in this file
    build = baselines.sweep_paths if family == "sweep" else baselines.hilbert_paths
    return build(height, width)


# Appendix: the presets --------------------------------------------------------------------------------------
# DiT's widths, at twice DiT's depth. A ZigMa layer has about 9.25 D^2 parameters (in_proj 4, out_proj 2,
# x_proj and dt_proj 0.25, adaLN 3), about half a DiT block's 18 D^2 (attention 4, MLP 8, adaLN 6). So,
# without cross-attention, the sizes come close to DiT's.
PRESET_SHAPES = {
    "Tiny": dict(dim=128, depth=8),  # small enough to train on a CPU
    "S": dict(dim=384, depth=24),
    "B": dict(dim=768, depth=24),
    "L": dict(dim=1024, depth=48),
    "XL": dict(dim=1152, depth=56),
}
PRESETS = {f"ZigMa-{size}/{p}": dict(shape, patch_size=p) for size, shape in PRESET_SHAPES.items()
           for p in (2, 4, 8)}


def preset_config(name: str, **fields) -> ZigMaConfig:
    """The config of a named preset ("ZigMa-B/2"), with other fields (input_size, frames, ...) by keyword."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; the presets are {', '.join(PRESETS)}")
    return ZigMaConfig(**PRESETS[name], **fields)


# Appendix: python zigma.py ----------------------------------------------------------------------------------

def neighbour_pairs_covered(paths: torch.Tensor, height: int, width: int) -> int:
    """How many of the grid's (neighbour, token) pairs some path reads consecutively, the neighbour just
    before the token. A neighbour is above, below, left or right, so each adjacent pair counts twice."""
    covered = set()
    for path in paths.tolist():
        covered |= {(a, b) for a, b in zip(path, path[1:])}
    return sum(1 for a, b in covered if abs(a // width - b // width) + abs(a % width - b % width) == 1)


def demonstrate(steps: int = 200) -> None:
    """Print the eight zigzag paths and what K of them cover, then overfit one image and sample it back."""
    print("The eight zigzag paths on a 4 x 4 grid (each number: the step at which that token is read):")
    paths = zigzag_paths(4, 4)
    for row in range(4):
        when = [paths[k].argsort().view(4, 4)[row] for k in range(8)]  # row `row` of each path's grid
        print("   ".join(" ".join(f"{int(step):2d}" for step in path_row) for path_row in when))
    pairs = 2 * (2 * 16 * 15)  # a 16 x 16 grid: 2 * 16 * 15 adjacent pairs, counted in both directions
    for k in (1, 2, 8):
        covered = neighbour_pairs_covered(zigzag_paths(16, 16)[:k], 16, 16)
        print(f"K = {k}: the paths read {covered} of the {pairs} (neighbour, token) pairs of a 16 x 16 grid "
              f"consecutively")
    torch.manual_seed(0)
    config = ZigMaConfig(input_size=16, in_channels=3, patch_size=2, dim=64, depth=4)
    model = ZigMa(config)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"Overfitting one 16 x 16 image: {parameters / 1e3:.0f}k parameters, {config.depth} layers, 8 x 8 "
          f"tokens")
    side = torch.linspace(-1, 1, 16)
    rows, cols = torch.meshgrid(side, side, indexing="ij")  # (16, 16) each
    image = torch.stack([rows, cols, -rows * cols])[None]  # (1, 3, 16, 16): 2 gradients, minus their product
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(1, steps + 1):
        loss = flow_loss(model, image.expand(8, -1, -1, -1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0:
            print(f"  step {step}: loss {loss.item():.4f}")
    noise = torch.randn(4, *config.input_shape)
    error = (sample(model, noise, steps=20) - image).abs().mean().item()
    noise_error = (noise - image).abs().mean().item()
    print(f"4 samples from noise, 20 Euler steps: a mean absolute error of {error:.3f} from the image "
          f"(its pixels span 2; the noise was {noise_error:.2f} away)")


if __name__ == "__main__":
    demonstrate()
