"""ZigMa: a DiT-style diffusion backbone built on Mamba, with zigzag scans.

Paper: "ZigMa: A DiT-style Zigzag Mamba Diffusion Model", Hu et al., ECCV 2024 (arXiv 2403.13802).
It builds on Mamba (Gu and Dao, arXiv 2312.00752), DiT (Peebles and Xie, arXiv 2212.09748), SiT (Ma et
al., arXiv 2401.08740) and stochastic interpolants (Albergo and Vanden-Eijnden, arXiv 2209.15571).

Mamba reads its input as a 1D sequence, so the order of the patch tokens matters. Before each layer's
scan, ZigMa reorders the tokens along one of eight continuous zigzag paths over the token grid. Neighbours
in the sequence are then neighbours in the image. After the scan the tokens go back to their order. The
reordering has no parameters. For video the scan is factorized: spatial layers zigzag within each frame,
and temporal layers read each spatial position through time.

The file reads top to bottom:
    1. scan orders      zigzag_paths and the other paths, ScanOrder, layer_orders
    2. selective scan   selective_scan_reference: Mamba's SSM, one token at a time
    3. Mamba mixer      MambaMixer (Mamba-1)
    4. ZigMa block      ZigMaBlock: adaLN-Zero around a Mamba branch and an optional cross-attention
    5. the model        embeddings, ZigMaConfig, ZigMa, presets
    6. flow matching    flow_loss, guided_velocity, sample
    fast_scan.py        selective_scan, the same scan fast and exact. Skip it at first: the layers run it,
                        or mamba-ssm's fused kernel on CUDA where that is installed (selective_scan_for).

Shape letters:
    B  batch              T  frames (1 for images)      C  image (or latent) channels
    P  patch size         H, W  the token grid: an image is H*P x W*P pixels
    L  tokens in one Mamba sequence: H*W in a spatial layer, T in a temporal one, T*H*W in a volume one
    D  model width        E  Mamba's inner width, expand * D
    N  SSM state size     R  rank of the delta projection
    K  paths the layers cycle through (1, 2 or 8: the paper's Zigzag-1, -2 and -8)
    S  context (text) tokens
In einops patterns the same letters are lowercase. In the Mamba sections A, B, C and D are the SSM's
matrices, as in the paper and mamba-ssm. So the shapes there are lowercase (b, l, e, n, r), and h is the
SSM's state. Everywhere else c is DiT's condition vector.

Numbers: the weights are float32, and training runs under autocast (bf16 on CUDA, as train.py does).
Every selective scan here turns autocast off and computes in float32 (float64 for a float64 model).
A model.to(torch.bfloat16) trains and samples too.

Time convention (SiT's linear interpolant, with velocity prediction):
    x_t = (1 - t) noise + t data, t in [0, 1]: t = 0 is noise, t = 1 is data.
    The network predicts the velocity v = dx_t/dt = data - noise.
    Sampling integrates dx/dt = v(x, t) from t = 0 to t = 1.
minRF and SD3 put data at t = 0 instead: the same path, mirrored.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint

try:
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as fused_selective_scan
except Exception:  # mamba-ssm 2.x raises more than ImportError where its CUDA extension is missing
    fused_selective_scan = None
try:
    import fast_scan  # the fast exact selective scan, beside this file
except ImportError:  # zigma.py on its own: the layers run selective_scan_reference
    fast_scan = None


#################################################################################
#                                  Scan orders                                  #
#################################################################################
# The paper's zigzag paths, its Hilbert and sweep baselines, and the factorized video scan (its Fig. 5c).

# Where a path starts: whether the grid's rows and columns are flipped. The official code takes the corners
# in another order (top-left, top-right, bottom-left, bottom-right); this one is kept so that the models trained
# so far read the same paths. At K = 1, 2 and 8 both orders cover the same neighbours.
CORNERS = {"top-left": (False, False), "bottom-right": (True, True), "top-right": (False, True),
           "bottom-left": (True, False)}


def grid_paths(height: int, width: int, snake: bool) -> torch.Tensor:
    """The eight line-by-line scans of a grid, (8, H*W): from each corner, row by row, then column by column.

    Each row of the result is a permutation of the row-major token indices: path[i] is the token read i-th.
    With snake=True every other line is read backwards, so the path is continuous (ZigMa's zigzag).
    With snake=False every line starts at the same side (the raster "sweep"). On a 4 x 4 grid, the
    zigzags (each number is the step at which that token is read):

        0: rows, top-left      1: columns, top-left   2: rows, bottom-right  3: columns, bottom-right
         0  1  2  3             0  7  8 15            12 13 14 15            12 11  4  3
         7  6  5  4             1  6  9 14            11 10  9  8            13 10  5  2
         8  9 10 11             2  5 10 13             4  5  6  7            14  9  6  1
        15 14 13 12             3  4 11 12             3  2  1  0            15  8  7  0

        4: rows, top-right     5: columns, top-right  6: rows, bottom-left   7: columns, bottom-left
         3  2  1  0            15  8  7  0            15 14 13 12             3  4 11 12
         4  5  6  7            14  9  6  1             8  9 10 11             2  5 10 13
        11 10  9  8            13 10  5  2             7  6  5  4             1  6  9 14
        12 13 14 15            12 11  4  3             0  1  2  3             0  7  8 15
    """
    grid = torch.arange(height * width, device="cpu").view(height, width)  # (H, W) row-major token indices
    paths = []
    for flip_rows, flip_cols in CORNERS.values():
        from_corner = grid.flip([d for d, flip in ((0, flip_rows), (1, flip_cols)) if flip])  # the corner at [0, 0]
        for lines in (from_corner, from_corner.t()):  # read row by row, then column by column
            lines = lines.clone()
            if snake:
                lines[1::2] = lines[1::2].flip(1)  # every other line backwards
            paths.append(lines.reshape(-1))
    return torch.stack(paths)  # (8, H*W)


def zigzag_paths(height: int, width: int) -> torch.Tensor:
    """ZigMa's eight continuous zigzag paths over the token grid, (8, H*W)."""
    return grid_paths(height, width, snake=True)


def sweep_paths(height: int, width: int) -> torch.Tensor:
    """Raster scans, every line read in the same direction, (8, H*W). The paper's sweep baseline is Vim's
    raster read forwards and backwards; here K = 2 reads rows, then columns."""
    return grid_paths(height, width, snake=False)


def gilbert(x: int, y: int, ax: int, ay: int, bx: int, by: int) -> list[tuple[int, int]]:
    """J. Cerveny's generalized Hilbert ("gilbert") curve over the rectangle at (x, y) spanned by the major
    axis (ax, ay) and the minor axis (bx, by), as (x, y) points, from (x, y) to the far end of the major axis.

    It halves the rectangle recursively, rounding halves to even lengths. So it stays continuous for any size,
    except a major side of odd length with a minor side of even length, where no such path exists.
    """
    w, h = abs(ax + ay), abs(bx + by)  # the sides along the major and the minor axis
    (dax, day), (dbx, dby) = ((ax > 0) - (ax < 0), (ay > 0) - (ay < 0)), ((bx > 0) - (bx < 0), (by > 0) - (by < 0))
    if h == 1 or w == 1:  # a line along whichever axis is longer than 1
        dx, dy, n = (dax, day, w) if h == 1 else (dbx, dby, h)
        return [(x + i * dx, y + i * dy) for i in range(n)]
    ax2, ay2, bx2, by2 = ax // 2, ay // 2, bx // 2, by // 2
    if 2 * w > 3 * h:  # long and thin: two halves along the major axis
        if abs(ax2 + ay2) % 2 and w > 2:
            ax2, ay2 = ax2 + dax, ay2 + day
        return gilbert(x, y, ax2, ay2, bx, by) + gilbert(x + ax2, y + ay2, ax - ax2, ay - ay2, bx, by)
    if abs(bx2 + by2) % 2 and h > 2:
        bx2, by2 = bx2 + dbx, by2 + dby
    return (gilbert(x, y, bx2, by2, ax2, ay2)  # up the first half of the minor axis, across, and back down
            + gilbert(x + bx2, y + by2, ax, ay, bx - bx2, by - by2)
            + gilbert(x + ax - dax + bx2 - dbx, y + ay - day + by2 - dby, -bx2, -by2, -(ax - ax2), -(ay - ay2)))


def hilbert_paths(height: int, width: int) -> torch.Tensor:
    """Eight continuous generalized Hilbert curves over the grid, (8, H*W), in grid_paths' order: from each
    corner, first along the rows, then along the columns.

    Where one side is odd and the other even, no continuous curve runs along the odd side from corner to
    corner. That orientation reads the other one backwards, so some of the eight may repeat: a 4 x 5 grid
    has four distinct paths, a 3 x 6 grid eight. The model's grids are square, where all eight differ.
    """
    along = {"rows": gilbert(0, 0, width, 0, 0, height), "columns": gilbert(0, 0, 0, height, width, 0)}  # (x, y)
    joins = {"rows": width % 2 == 0 or height % 2 == 1, "columns": height % 2 == 0 or width % 2 == 1}
    paths = []
    for flip_rows, flip_cols in CORNERS.values():
        for axis, other in (("rows", "columns"), ("columns", "rows")):
            points = along[axis if joins[axis] else other]
            path = torch.tensor([((height - 1 - y) if flip_rows else y) * width + ((width - 1 - x) if flip_cols else x)
                                 for x, y in points])
            paths.append(path if joins[axis] else path.flip(0))
    return torch.stack(paths)  # (8, H*W)


PATHS = {"zigzag": zigzag_paths, "sweep": sweep_paths, "hilbert": hilbert_paths}  # ZigMaConfig.paths


def volume_path(path: torch.Tensor, frames: int, snake: bool) -> torch.Tensor:
    """A 2D path extended through a clip: frame after frame, and with snake=True every other frame backwards.

    Tokens of a clip are indexed (t, h, w) row-major, so frame f holds indices f*H*W .. (f+1)*H*W - 1.
    A zigzag path ends where the backwards path of the next frame starts: the 3D path stays continuous.
    """
    frame_size = path.numel()
    parts = [f * frame_size + (path.flip(0) if snake and f % 2 else path) for f in range(frames)]
    return torch.cat(parts)  # (T*H*W,)


class ScanOrder(nn.Module):
    """One layer's token order: how the tokens of a (T, H, W) grid form Mamba sequences, and in what order.

    axis "space":  every frame is one sequence of H*W tokens (images are clips with T = 1);
    axis "time":   every spatial position is one sequence of T tokens;
    axis "volume": the whole clip is one sequence of T*H*W tokens.
    `order` is a permutation of the L tokens of a sequence. It and its inverse are buffers, so they follow
    .to(). They are not saved in the state_dict: the config gives them.
    """

    def __init__(self, grid: tuple[int, int, int], axis: str, order: torch.Tensor):
        super().__init__()
        frames, height, width = grid
        length = {"space": height * width, "time": frames, "volume": frames * height * width}[axis]
        assert sorted(order.tolist()) == list(range(length)), f"a {axis} order needs a permutation of {length}"
        self.grid, self.axis = grid, axis
        self.register_buffer("order", order.long(), persistent=False)
        self.register_buffer("inverse", torch.argsort(order).long(), persistent=False)

    def to_sequences(self, x: torch.Tensor) -> torch.Tensor:
        if self.axis == "space":
            x = rearrange(x, "b (t l) d -> (b t) l d", t=self.grid[0])  # (B*T, H*W, D): one sequence per frame
        elif self.axis == "time":
            x = rearrange(x, "b (t l) d -> (b l) t d", t=self.grid[0])  # (B*H*W, T, D): one per position
        # "volume": the tokens of a clip, (B, T*H*W, D), are one sequence already
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


def layer_orders(grid: tuple[int, int, int], depth: int, paths: str, num_paths: int, pattern: str) -> list[ScanOrder]:
    """The token order of every layer. paths names the 2D paths (PATHS); num_paths is K.

    pattern is repeated over the depth, one letter per layer: s spatial, t temporal, v volume. Images use
    "s". The official code knows only s and t; volume layers are this project's. Each kind has its rule:
    - the j-th spatial layer reads 2D path j mod K, so layers see the grid from other corners and directions.
      How many neighbour pairs (a token, and a neighbour read just before it in some layer) the K paths
      cover, of 960 on a 16 x 16 grid: zigzag K = 1: 255, K = 2: 496, K = 8: all; Hilbert K = 8: 848.
    - the j-th temporal layer reads time forwards when j is even, backwards when j is odd. A causal scan
      needs both directions for every frame to see every other.
    - the j-th volume layer reads the 3D extension of 2D path (j // 2) mod K, forwards when j is even and
      backwards when j is odd: both directions through the clip, then the next path.
    """
    frames, height, width = grid
    snake = paths != "sweep"  # continuous paths stay continuous through a clip (volume_path)
    path = PATHS[paths](height, width)[:num_paths]  # (K, H*W)
    seen = {"s": 0, "t": 0, "v": 0}  # how many layers of each kind came before
    orders = []
    for layer in range(depth):
        kind = pattern[layer % len(pattern)]
        j = seen[kind]
        seen[kind] += 1
        if kind == "s":
            orders.append(ScanOrder(grid, "space", path[j % num_paths]))
        elif kind == "t":
            forwards = torch.arange(frames, device="cpu")
            orders.append(ScanOrder(grid, "time", forwards.flip(0) if j % 2 else forwards))
        else:
            forwards = volume_path(path[(j // 2) % num_paths], frames, snake)
            orders.append(ScanOrder(grid, "volume", forwards.flip(0) if j % 2 else forwards))
    return orders


#################################################################################
#                                Selective scan                                 #
#################################################################################
# Mamba's selective state-space model (its Alg. 2), in mamba-ssm's layout, so that the fused kernel drops in:
#     u, delta, z: (b, e, l)    A: (e, n)    B, C: (b, n, l)    D, delta_bias: (e,)
#     h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t        (h: (b, e, n), zero before the first token)
#     y_t = C_t . h_t + D u_t,  then gated: y_t * silu(z_t)
# The continuous system h' = A h + B u is discretised with the step delta_t. Mamba's Eq. 4 is the zero-order
# hold for both A and B; its code, and this file, keep the hold for A, exp(delta_t A), and simplify B's to the
# Euler step delta_t B_t, which it equals to first order in delta_t.

def selective_scan_reference(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """The selective scan one token at a time: the definition, against which the fast scans are tested.
    Computes in float32 (float64 for float64 inputs) with autocast off, and returns u's dtype."""
    dtype = u.dtype
    compute = torch.promote_types(dtype, torch.float32)
    with torch.autocast(u.device.type, enabled=False):  # else the einsum would run in bf16 under autocast
        u, delta, A, B, C = (x.to(compute) for x in (u, delta, A, B, C))
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
    return y.to(dtype)


FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # the dtypes of u that mamba-ssm's kernel takes


def selective_scan_for(u: torch.Tensor):
    """The scan for the Mamba layers' input u: mamba-ssm's fused kernel for a CUDA tensor in a dtype it takes,
    where mamba-ssm is installed; else fast_scan's pure-torch scan, which torch.compile leaves uncompiled on a
    CPU; else, without fast_scan.py, the reference."""
    if fused_selective_scan is not None and u.is_cuda and u.dtype in FUSED_DTYPES:
        return fused_selective_scan
    if fast_scan is None:
        return selective_scan_reference
    return fast_scan.selective_scan_eager if u.device.type == "cpu" else fast_scan.selective_scan


#################################################################################
#                                  Mamba mixer                                  #
#################################################################################

def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Mamba's causal depthwise convolution along the tokens of x (b, l, e), with nn.Conv1d's weight (e, 1, k):
    out_l = bias + sum_j weight[:, 0, k-1-j] x_{l-j}, zero before the first token. Channels last: no transposes.
    It returns x's dtype, as causal-conv1d's kernel does: under autocast, float32 weights would promote a bf16 x."""
    kernel = weight.shape[-1]
    weight, bias = weight.to(x.dtype), bias.to(x.dtype)
    out = torch.addcmul(bias, x, weight[:, 0, -1])  # (b, l, e): the current token's tap
    for j in range(1, kernel):  # the tap j tokens back
        out[:, j:] += x[:, :-j] * weight[:, 0, -1 - j]
    return out


class MambaMixer(nn.Module):
    """Mamba-1's mixer: in_proj, causal depthwise conv, SiLU, input-dependent (delta, B, C), selective scan, gate."""

    def __init__(self, dim: int, d_state: int = 16, expand: int = 2, d_conv: int = 4,
                 dt_min: float = 0.001, dt_max: float = 0.1, dt_init_floor: float = 1e-4):
        super().__init__()
        inner = expand * dim  # e
        self.dt_rank = math.ceil(dim / 16)  # r
        self.d_state = d_state
        self.in_proj = nn.Linear(dim, 2 * inner, bias=False)
        # Only its weight and bias are used (by causal_conv1d), in nn.Conv1d's layout, as mamba-ssm's checkpoints keep them.
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
        # ... and A = -[1, 2, ..., N] in every channel (S4D-Real). A is kept as A_log, A = -exp(A_log), so that
        # it stays negative, and each state decays, whatever the optimizer does.
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(inner, 1))
        self.D = nn.Parameter(torch.ones(inner))  # the skip connection D u_t

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (b, l, d)
        # Everything stays (b, l, channels), the layout of the linear layers; the scan takes (b, e, l) views of it.
        x, z = self.in_proj(x).chunk(2, dim=-1)  # (b, l, e) each
        x = F.silu(causal_conv1d(x, self.conv1d.weight, self.conv1d.bias))  # (b, l, e)
        delta, B, C = torch.split(self.x_proj(x), [self.dt_rank, self.d_state, self.d_state], dim=-1)  # (b, l, r or n)
        delta = delta @ self.dt_proj.weight.t()  # (b, l, e); the bias is added inside the scan
        ssm_dtype = torch.promote_types(self.A_log.dtype, torch.float32)  # the SSM's own parameters: float32 or more
        A = -torch.exp(self.A_log.to(ssm_dtype))  # (e, n)
        # Under autocast, u = x, delta, B, C and z are all bf16 (or fp16) here, and A, D and delta_bias float32:
        # mamba-ssm's kernel demands exactly that. The scan takes channels-first views: u, delta, z (b, e, l) and
        # B, C (b, n, l).
        y = selective_scan_for(x)(x.transpose(1, 2), delta.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2),
                                  self.D.to(ssm_dtype), z.transpose(1, 2), delta_bias=self.dt_proj.bias.to(ssm_dtype),
                                  delta_softplus=True)  # (b, e, l)
        return self.out_proj(y.transpose(1, 2))  # (b, l, d)


#################################################################################
#                                  ZigMa block                                  #
#################################################################################

def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]  # (B, T*H*W, D)


class CrossAttention(nn.Module):
    """Multi-head attention from the tokens (queries) to context tokens (keys and values)."""

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim)
        self.to_kv = nn.Linear(context_dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, T*H*W, D); context: (B, S, context_dim); context_mask: (B, S), True for real tokens, False for
        padding. Every row needs one real token: a row of padding alone has nothing to attend to (NaN)."""
        q = rearrange(self.to_q(x), "b l (heads d) -> b heads l d", heads=self.heads)  # (B, heads, T*H*W, D/heads)
        k, v = rearrange(self.to_kv(context), "b s (two heads d) -> two b heads s d", two=2, heads=self.heads)  # (B, heads, S, D/heads) each
        # Padding must not be attended to, or a caption's result would depend on the others in its batch.
        attn_mask = None if context_mask is None else context_mask[:, None, None, :]  # (B, 1, 1, S)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, heads, T*H*W, D/heads)
        return self.proj(rearrange(out, "b heads l d -> b l (heads d)"))  # (B, T*H*W, D)


class ZigMaBlock(nn.Module):
    """A Mamba layer that reads the tokens in its layer's order, with DiT's adaLN-Zero conditioning.

    Usable on its own: tokens (B, T*H*W, D) in row-major (t, h, w) order, a condition vector c (B, D), the
    layer's ScanOrder, and optionally context tokens (B, S, context_dim) for cross-attention with their mask
    (B, S) (True for real tokens; None: all are).

    There is no MLP, as in Mamba and the official ZigMa: the mixer's in_proj and out_proj (expand 2) play its
    part, which is why the presets stack twice DiT's depth. The official block also runs Mamba's fused
    add + RMSNorm residual stream and drop-path; this one is DiT's plain pre-LayerNorm residual.
    """

    def __init__(self, dim: int, d_state: int = 16, expand: int = 2, context_dim: int = 0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mixer = MambaMixer(dim, d_state, expand)
        self.cross_attention = None
        if context_dim:
            self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            # Heads of width 64, dim // 64 of them (one head where 64 does not divide dim). The official ZigMa has
            # 8 heads of 64 at every width.
            self.cross_attention = CrossAttention(dim, context_dim, heads=dim // 64 if dim % 64 == 0 else 1)
        branches = 2 if context_dim else 1
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 3 * branches * dim))  # shift, scale, gate

    def forward(self, x: torch.Tensor, c: torch.Tensor, order: ScanOrder, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        has_text = self.cross_attention is not None
        modulation = self.adaLN_modulation(c).chunk(6 if has_text else 3, dim=1)  # (B, D) each
        shift, scale, gate = modulation[:3]
        mixed = order.to_sequences(modulate(self.norm1(x), shift, scale))  # (sequences, L, D) in scan order
        mixed = order.from_sequences(self.mixer(mixed), batch=x.shape[0])  # (B, T*H*W, D) in token order
        x = x + gate[:, None] * mixed
        if has_text:
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


class FinalLayer(nn.Module):
    """adaLN, then a linear map from each token to its patch of pixels, as DiT's. The official ZigMa's final
    layer is not modulated by the condition."""

    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:  # (B, T*H*W, D), (B, D)
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # (B, D) each
        return self.linear(modulate(self.norm(x), shift, scale))  # (B, T*H*W, P*P*C)


#################################################################################
#                                  ZigMa model                                  #
#################################################################################

@dataclass
class ZigMaConfig:
    """The defaults are ZigMa-S/2 on the 32 x 32 x 4 latents of a 256 px image (the presets below)."""
    input_size: int = 32  # image side in pixels, or in latent cells; square
    in_channels: int = 4  # C: 3 for pixels, the VAE's channels for latents
    patch_size: int = 2  # P
    dim: int = 384  # D
    depth: int = 24
    paths: str = "zigzag"  # the 2D paths (PATHS): "zigzag" (the paper's), "sweep" or "hilbert" (its baselines)
    num_paths: int = 8  # K, 1, 2 or 8: the i-th spatial layer reads path i mod K. The paper's best is Zigzag-8
    frames: int = 0  # 0 = images; T > 0 = clips of T frames
    video_pattern: str = "sst"  # for clips, a letter a layer: s spatial, t temporal, v volume. "sst", two spatial
    #                             layers to each temporal one, is the official video configuration (3d_zigzag8sst)
    num_classes: int = 0  # 0 = unconditional; class num_classes is the "null" label for guidance
    context_dim: int = 0  # 0 = no cross-attention; else the width of the context tokens
    d_state: int = 16  # N, as in Mamba
    expand: int = 2  # E = expand * D, as in Mamba

    def __post_init__(self):
        assert self.input_size % self.patch_size == 0, f"patch size {self.patch_size} must divide input size {self.input_size}"
        assert self.paths in PATHS and self.num_paths in (1, 2, 8), f"paths: one of {', '.join(PATHS)}; num_paths: 1, 2 or 8"
        assert self.video_pattern and set(self.video_pattern) <= set("stv"), f"video_pattern takes s, t and v: {self.video_pattern!r}"

    @property
    def grid(self) -> tuple[int, int, int]:
        side = self.input_size // self.patch_size
        return (max(self.frames, 1), side, side)  # (T, H, W) tokens

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one input, without the batch: (C, H*P, W*P) for images, (T, C, H*P, W*P) for clips."""
        image = (self.in_channels, self.input_size, self.input_size)
        return (self.frames, *image) if self.frames else image


class ZigMa(nn.Module):
    """ZigMa: patchify, add positions, a stack of ZigMaBlocks with their token orders, then unpatchify."""

    def __init__(self, config: ZigMaConfig):
        super().__init__()
        self.config = config
        dim, grid = config.dim, config.grid
        self.patch_embed = nn.Conv2d(config.in_channels, dim, config.patch_size, stride=config.patch_size)
        self.t_embedder = TimestepEmbedder(dim)
        self.y_embedder = nn.Embedding(config.num_classes + 1, dim) if config.num_classes else None  # +1: null label
        # The "no text" context for guidance: one learned token, broadcast over the context length.
        self.null_context = nn.Parameter(torch.zeros(1, 1, config.context_dim)) if config.context_dim else None
        # A learned position per token, as the official models (use_pe=2): one table serves images and clips.
        # DiT's is a fixed 2D sin-cos table.
        self.pos_embed = nn.Parameter(torch.zeros(1, math.prod(grid), dim))
        pattern = config.video_pattern if config.frames else "s"
        self.orders = nn.ModuleList(layer_orders(grid, config.depth, config.paths, config.num_paths, pattern))
        self.blocks = nn.ModuleList(
            ZigMaBlock(dim, config.d_state, config.expand, config.context_dim) for _ in range(config.depth))
        self.final_layer = FinalLayer(dim, config.patch_size, config.in_channels)
        # True: keep only each block's input in training and recompute the block in the backward pass. Less
        # memory, about a third more time (train.py --grad-checkpointing), the same results.
        self.grad_checkpointing = False
        self.initialize_weights()

    def initialize_weights(self):
        # Patch embedding like a linear layer (DiT).
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        # Small normal: the timestep MLP as DiT, and the positions (the official learned table starts at zeros,
        # a choice not measured here).
        nn.init.normal_(self.pos_embed, std=0.02)
        for layer in self.t_embedder.mlp[0], self.t_embedder.mlp[2]:
            nn.init.normal_(layer.weight, std=0.02)
        if self.y_embedder is not None:
            # N(0, 1), as ADM; from DiT's N(0, 0.02) labels did not take hold in 2,000 steps (the README says why).
            nn.init.normal_(self.y_embedder.weight, std=1.0)
        if self.null_context is not None:
            nn.init.normal_(self.null_context, std=0.02)
        # adaLN-Zero: the gates start at zero, so every block starts as the identity. The other linear layers keep
        # PyTorch's defaults, a choice not measured here: DiT uses xavier, and the official ZigMa rescales out_proj
        # by 1/sqrt(depth). Zero gates fix the function at the start, not the branches' scale once they open.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        # The output starts at zero.
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)
        # The mixers keep Mamba's initialisation of dt_proj, A_log and D (MambaMixer.__init__).

    def conditions(self, batch: int, y=None, context=None, context_mask=None, drop=None):
        """The label (B,), context (B, S, context_dim) and context mask (B, S) the blocks see: the null ones where
        y or context is missing, or where drop (B,) is True. None where the model has no such condition.

        The null label is row num_classes of the label table. The null context is one learned token repeated.
        It needs no mask: attending to S copies of one token gives the same result as attending to one.
        """
        if self.y_embedder is not None:
            null_y = torch.full((batch,), self.config.num_classes, device=self.y_embedder.weight.device)
            if y is None:
                y = null_y
            elif drop is not None:
                y = torch.where(drop, null_y, y)
        if self.null_context is not None and context is None:
            context = self.null_context.expand(batch, 1, -1)
        elif self.null_context is not None and drop is not None:
            context = torch.where(drop[:, None, None], self.null_context, context)
            context_mask = None if context_mask is None else context_mask | drop[:, None]
        return y, context, context_mask

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None, drop: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C, H*P, W*P) images or (B, T, C, H*P, W*P) clips; t: (B,) in [0, 1]; y: (B,) labels;
        context: (B, S, context_dim) text tokens; context_mask: (B, S), False where the context is padding.

        A missing y or context means the null condition, and so does drop (B,) where it is True. For
        classifier-free guidance, training drops conditions at random, and sampling runs a null half.
        Returns the velocity, shaped like x.
        """
        config = self.config
        frames, height, width = config.grid
        video = config.frames > 0
        expected = config.input_shape
        assert tuple(x.shape[1:]) == expected, f"expected {'clips' if video else 'images'} (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}"
        assert y is None or self.y_embedder is not None, "this model has no classes: leave y out"
        assert context is None or self.null_context is not None, "this model has no cross-attention: leave context out"
        assert context_mask is None or context is not None, "a context mask needs its context"
        batch = x.shape[0]
        y, context, context_mask = self.conditions(batch, y, context, context_mask, drop)

        pixels = x.flatten(0, 1) if video else x  # (B*T, C, H*P, W*P)
        tokens = rearrange(self.patch_embed(pixels), "(b t) d h w -> b (t h w) d", b=batch)  # (B, T*H*W, D)
        tokens = tokens + self.pos_embed
        c = self.t_embedder(t)  # (B, D)
        if y is not None:
            c = c + self.y_embedder(y)  # (B, D)
        # Text reaches the blocks through cross-attention only; the official code also adds its mean into c.
        for block, order in zip(self.blocks, self.orders):
            if self.grad_checkpointing and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, c, order, context, context_mask, use_reentrant=False)
            else:
                tokens = block(tokens, c, order, context, context_mask)  # (B, T*H*W, D)
        out = self.final_layer(tokens, c)  # (B, T*H*W, P*P*C)
        out = rearrange(out, "b (t h w) (p1 p2 ch) -> b t ch (h p1) (w p2)", t=frames, h=height, w=width,
                        p1=config.patch_size, p2=config.patch_size)  # (B, T, C, H*P, W*P)
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
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; the presets are {', '.join(PRESETS)}")
    return ZigMaConfig(**PRESETS[name], **fields)


#################################################################################
#                     Flow matching: the loss and the sampler                   #
#################################################################################
# SiT's linear interpolant between noise and data, a stochastic interpolant without noise (Albergo and
# Vanden-Eijnden): the velocity it learns is data - noise, and its ODE carries noise to data.

TIME_SAMPLING = ("uniform", "logit-normal")


def flow_loss(model: ZigMa, x: torch.Tensor, y=None, context=None, context_mask=None, drop_prob: float = 0.1,
              noise: torch.Tensor | None = None, t: torch.Tensor | None = None, time_sampling: str = "logit-normal") -> torch.Tensor:
    """Velocity-matching loss for data x on the linear path x_t = (1 - t) noise + t x, one t per example.

    t is logit-normal, t = sigmoid(n) with n ~ N(0, 1), which trains more on the middle of the path (SD3's
    choice; symmetric, so it does not matter which end is data), or uniform on [0, 1] (SiT's). On a CPU budget
    logit-normal t sampled better (README, Sample quality).
    For classifier-free guidance, each example's label and context (where the model gets them) become the null
    ones with probability drop_prob. noise (like x) and t (B,) are drawn unless given.
    """
    assert time_sampling in TIME_SAMPLING, f"time_sampling must be one of {', '.join(TIME_SAMPLING)}, not {time_sampling!r}"
    batch = x.shape[0]
    noise = torch.randn_like(x) if noise is None else noise
    if t is None:
        t = torch.rand(batch, device=x.device) if time_sampling == "uniform" else torch.randn(batch, device=x.device).sigmoid()
    t_x = t.view(batch, *[1] * (x.dim() - 1)).to(x.dtype)  # (B, 1, 1, 1), or (B, 1, 1, 1, 1) for clips: t over x
    x_t = (1 - t_x) * noise + t_x * x  # in x's dtype: a bf16 model takes bf16
    drop = None
    if y is not None or context is not None:
        drop = torch.rand(batch, device=x.device) < drop_prob  # (B,)
    v = model(x_t, t, y, context, context_mask, drop)
    return F.mse_loss(v.float(), (x - noise).float())


def guided_velocity(model: ZigMa, x_t, t, y=None, context=None, context_mask=None, cfg_scale: float = 1.0) -> torch.Tensor:
    """The velocity at (x_t, t). With a label or context and cfg_scale != 1, classifier-free guided:
    v = v_null + cfg_scale * (v_cond - v_null), both passes in one batch.
    """
    if y is None and context is None:
        return model(x_t, t)
    if cfg_scale == 1:  # no guidance: v = v_cond, one pass
        return model(x_t, t, y, context, context_mask)
    twice = lambda a: None if a is None else torch.cat([a, a])  # noqa: E731
    null_half = torch.arange(2 * x_t.shape[0], device=x_t.device) >= x_t.shape[0]  # (2B,): the second half is null
    v_cond, v_null = model(twice(x_t), twice(t), twice(y), twice(context), twice(context_mask), null_half).chunk(2)
    return v_null + cfg_scale * (v_cond - v_null)


@torch.no_grad()
def sample(model: ZigMa, noise: torch.Tensor, steps: int = 50, y=None, context=None, context_mask=None,
           cfg_scale: float = 1.0, method: str = "euler") -> torch.Tensor:
    """Integrate dx/dt = v(x, t) from noise at t = 0 to data at t = 1, in `steps` equal steps.

    Euler takes one model call a step. Heun averages the slopes at both ends of a step: two calls, and a
    second-order error. With guidance each call is one pass of twice the batch.
    """
    assert method in ("euler", "heun"), f"method must be 'euler' or 'heun', not {method!r}"
    x_t = noise
    times = torch.linspace(0, 1, steps + 1, device=noise.device)
    for t, t_next in zip(times[:-1], times[1:]):
        dt = t_next - t
        v = guided_velocity(model, x_t, t.expand(x_t.shape[0]), y, context, context_mask, cfg_scale)
        if method == "heun":
            v_next = guided_velocity(model, x_t + dt * v, t_next.expand(x_t.shape[0]), y, context, context_mask, cfg_scale)
            v = (v + v_next) / 2
        x_t = x_t + dt * v
    return x_t
