"""ZigMa: a DiT-style diffusion backbone built on Mamba, with zigzag scans.

Paper: "ZigMa: A DiT-style Zigzag Mamba Diffusion Model", Hu et al., ECCV 2024 (arXiv 2403.13802).

Mamba reads its input as a 1D sequence, so the order of the patch tokens matters. Before each layer's
scan, ZigMa reorders the tokens along one of eight continuous zigzag ("snake") paths over the token
grid, so that neighbours in the sequence are neighbours in the image; after the scan it restores the
order. The reordering has no parameters. For video the scan is factorized: spatial layers zigzag within
each frame, temporal layers read each spatial position through time.

The file reads top to bottom:
    1. scan orders           zigzag_paths, sweep_paths, hilbert_paths, volume_path, Scan, layer_scans
    2. selective scan        selective_scan_reference (the definition), selective_scan (the fast one)
    3. Mamba mixer           MambaMixer (Mamba-1), using mamba-ssm's fused CUDA kernel when installed
    4. ZigMa block           ZigMaBlock: adaLN-Zero around a Mamba branch and an optional cross-attention
    5. embeddings, model     ZigMaConfig, ZigMa, presets
    6. flow matching         flow_loss, guided_velocity, sample

Shape letters:
    B  batch                 T  frames of a clip (1 for images)     C  image (or latent) channels
    H, W  token grid (image side / patch_size)
    L  tokens in one Mamba sequence (H*W for a spatial layer, T for a temporal one, T*H*W for a volume one)
    D  model width (dim)     E  Mamba inner width, expand * D
    N  SSM state size (d_state)
    R  rank of the delta projection (dt_rank)
    K  number of scan paths the layers cycle through (1, 2 or 8: the paper's Zigzag-1/2/8)
    S  context tokens (text) for cross-attention
In the two Mamba sections (selective scan, Mamba mixer), A, B, C and D are the SSM's matrices, named as in
the paper and mamba-ssm, so the shapes there are lowercase: b, l, e, n, r for B, L, E, N, R.

Numbers: the weights are float32, and training runs under autocast (bfloat16 on CUDA, as train.py does);
the selective scan always computes in float32 (float64 for a float64 model). A model.to(torch.bfloat16)
trains and samples too: the timestep features and the SSM's own parameters are cast where they enter.

Time convention (the linear stochastic interpolant with velocity prediction):
    x_t = (1 - t) * noise + t * data,  t in [0, 1]:  t = 0 is pure noise, t = 1 is data.
    The network predicts the velocity v = dx_t/dt = data - noise.
    Sampling integrates dx/dt = v(x, t) from t = 0 to t = 1.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

try:
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as fused_selective_scan
except Exception:  # mamba-ssm 2.x raises more than ImportError where its CUDA extension is missing
    fused_selective_scan = None


#################################################################################
#                                  Scan orders                                  #
#################################################################################

CORNERS = {"top-left": (False, False), "bottom-right": (True, True), "top-right": (False, True),
           "bottom-left": (True, False)}  # where a path starts: whether the grid's rows and columns are flipped


def grid_paths(h: int, w: int, snake: bool) -> torch.Tensor:
    """The eight line-by-line scans of an h x w grid, (8, h*w): from each corner, row by row, then column by column.

    Each row of the result is a permutation of the row-major token indices: path[i] is the token read i-th.
    With snake=True, every other line is read backwards, so that the path is continuous (ZigMa's zigzag);
    with snake=False every line starts at the same side (the raster "sweep"). The official code cycles through
    the same eight in another order (the same first two). On a 4 x 4 grid, the zigzags (each number is the step
    at which that token is read):

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
    grid = torch.arange(h * w, device="cpu").view(h, w)  # (H, W) row-major token indices; built on the CPU
    paths = []
    for flip_rows, flip_cols in CORNERS.values():
        from_corner = grid.flip([d for d, flip in ((0, flip_rows), (1, flip_cols)) if flip])  # the corner at [0, 0]
        for lines in (from_corner, from_corner.t()):  # read row by row, then column by column
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


def gilbert(x: int, y: int, ax: int, ay: int, bx: int, by: int) -> list[tuple[int, int]]:
    """The generalized Hilbert ("gilbert") curve of J. Cerveny over the rectangle at (x, y) spanned by the major
    axis (ax, ay) and the minor axis (bx, by), as (x, y) points: from (x, y) to the far end of the major axis.

    It halves the rectangle recursively, rounding halves to even lengths, so that it stays continuous for any
    size except a major side of odd length with a minor side of even length (then no such path exists).
    """
    w, h = abs(ax + ay), abs(bx + by)
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


def hilbert_paths(h: int, w: int) -> torch.Tensor:
    """Eight continuous generalized Hilbert curves over an h x w grid, (8, h*w), in grid_paths' order: from each
    corner, first along the rows, then along the columns. Where one side is odd and the other even, no
    continuous curve runs along the odd side from corner to corner: that orientation reads the other one
    backwards (so the eight hold only four paths there)."""
    along = {"rows": gilbert(0, 0, w, 0, 0, h), "columns": gilbert(0, 0, 0, h, w, 0)}  # (x, y) points from (0, 0)
    joins = {"rows": w % 2 == 0 or h % 2 == 1, "columns": h % 2 == 0 or w % 2 == 1}  # its two corners, continuously
    paths = []
    for flip_rows, flip_cols in CORNERS.values():
        for axis, other in (("rows", "columns"), ("columns", "rows")):
            points = along[axis if joins[axis] else other]
            path = torch.tensor([((h - 1 - y) if flip_rows else y) * w + ((w - 1 - x) if flip_cols else x) for x, y in points])
            paths.append(path if joins[axis] else path.flip(0))
    return torch.stack(paths)  # (8, H*W)


PATHS = {"zigzag": zigzag_paths, "sweep": sweep_paths, "hilbert": hilbert_paths}  # ZigMaConfig.scan: the 2D paths


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
    `order` is a permutation of the L tokens of a sequence. It and its inverse are buffers, so they follow
    .to(); they are not saved in the state_dict, since the config gives them.
    """

    def __init__(self, grid: tuple[int, int, int], axis: str, order: torch.Tensor):
        super().__init__()
        assert axis in ("space", "time", "volume"), f"unknown scan axis {axis!r}"
        frames, h, w = grid
        length = {"space": h * w, "time": frames, "volume": frames * h * w}[axis]
        assert sorted(order.tolist()) == list(range(length)), f"a {axis} scan needs a permutation of {length}"
        self.grid, self.axis = grid, axis
        self.register_buffer("order", order.long(), persistent=False)
        self.register_buffer("inverse", torch.argsort(order).long(), persistent=False)

    def to_sequences(self, x: torch.Tensor) -> torch.Tensor:
        frames = self.grid[0]
        if self.axis == "space":
            x = rearrange(x, "b (t l) d -> (b t) l d", t=frames)  # (B*T, H*W, D): one sequence per frame
        elif self.axis == "time":
            x = rearrange(x, "b (t l) d -> (b l) t d", t=frames)  # (B*H*W, T, D): one per position
        # "volume" needs no reshape: the tokens of a clip, (B, T*H*W, D), are already one sequence each
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


def layer_scans(grid: tuple[int, int, int], depth: int, family: str, scan_paths: int, pattern: str) -> list[Scan]:
    """The scan of every layer. family names the 2D paths: "zigzag", "sweep" or "hilbert" (PATHS).

    pattern is repeated over the depth, one letter per layer: s = spatial, t = temporal, v = volume (images
    use "s"; the official code knows only s and t: volume layers are this project's). Each kind has its rule:
    - the j-th spatial layer reads 2D path j mod K: each layer sees the grid from another corner or
      direction, so that over K layers every token follows each of its neighbours (the paper's Zigzag-K);
    - the j-th temporal layer reads time forwards when j is even, backwards when j is odd: time has one
      axis, and a causal scan needs both directions for every frame to see every other;
    - the j-th volume layer reads the 3D extension of 2D path (j // 2) mod K, forwards when j is even and
      backwards when j is odd: both directions through the clip, as for time, then the next path.
    """
    frames, h, w = grid
    snake = family != "sweep"  # continuous paths stay continuous through a clip (volume_path)
    paths = PATHS[family](h, w)[:scan_paths]  # (K, H*W)
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
#     u, delta, z: (b, e, l)    A: (e, n)    B, C: (b, n, l)    D, delta_bias: (e,)
#     h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t        (h: (b, e, n), zero before the first token)
#     y_t = C_t . h_t + D u_t,  then gated: y_t * silu(z_t)
# The continuous system h' = A h + B u is discretised with the step delta_t as mamba-ssm does: A by a zero-order
# hold, exp(delta_t A), and B by a simplified Euler step, delta_t B_t.

def selective_scan_reference(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """The selective scan one token at a time: the definition selective_scan is tested against."""
    dtype = u.dtype
    compute = torch.promote_types(dtype, torch.float32)
    u, delta, A, B, C = (x.to(compute) for x in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])  # (b, e, n)
    ys = []
    for t in range(u.shape[2]):
        decay = torch.exp(delta[:, :, t, None] * A)  # (b, e, n)
        h = decay * h + delta[:, :, t, None] * B[:, None, :, t] * u[:, :, t, None]  # (b, e, n)
        ys.append(torch.einsum("ben,bn->be", h, C[:, :, t]))  # (b, e)
    y = torch.stack(ys, dim=-1)  # (b, e, l)
    if D is not None:
        y = y + D[:, None] * u
    if z is not None:
        y = y * F.silu(z)
    return y.to(dtype)


# The fast scan below computes the same function in few, large tensor operations, so that a GPU is not
# bound by kernel launches (a loop over tokens costs ~20 launches a token). Exact, by products and sums only:
#
# 1. Blocks. The tokens are cut into blocks of m tokens, run one after another; the state leaving a block enters
#    the next. m is chosen so that a block's (m, b, e, n) tensors fit a memory budget (SCAN_BLOCK_ELEMENTS).
# 2. Chunks. A block is read as q chunks of c tokens (c ~ sqrt(m)), laid out (c, q): token i*c + t at [t, i].
#    a. All chunks run the recurrence at once, c steps over (q, b, e, n) slices: the first chunk from the state
#       entering the block, which makes it exact, the others from a zero state, which gives their local states.
#    b. The state entering chunk i+1 is the one entering chunk i, carried across it: q steps over (b, e, n),
#           entering[i+1] = h_local[last, i] + P_i entering[i],   P_i = prod_t exp(delta_t A) = exp(A sum_t delta_t).
#    c. Linearity makes the rest exact: h_t = h_local_t + exp(A sum_{s<=t} delta_s) entering[i], one operation.
#    A block's forward and backward passes take about 3 (c + q) + 330 torch operations, where a loop over its
#    tokens takes about 17 m: 526 against 17,000 at m = 1024. Nothing is divided by a decay (which underflows
#    to 0), nor is a logarithm taken. With q = 1 (the CPU's plan) it is the plain loop over tokens.
# 3. Backward. The adjoint runs the same recurrence backwards, dh_t = C_t dy_t + exp(delta_{t+1} A) dh_{t+1},
#    and the same two-level scheme computes it. From the states h and the adjoints dh:
#        dB_t = sum_e dh_t (delta_t u_t)     d(delta_t u_t) = dh_t . B_t     dC_t = h_t^T dy_t
#        d(delta_t A) = dh_t exp(delta_t A) h_{t-1}   ->  dA = sum_t d(delta_t A) delta_t,  d(delta_t) += d(delta_t A) . A
#    Only the inputs and the state entering each block are saved; the backward pass recomputes a block's states.

SCAN_BLOCK_ELEMENTS = 2 ** 27  # GPUs and MPS: the most numbers in one of a block's (m, b, e, n) tensors (512 MiB in float32)
CPU_BLOCK_ELEMENTS = 3 * 2 ** 19  # CPUs: 6 MiB, measured fastest on 2 cores at b * e = 1536 to 6144


def scan_plan(length: int, per_token: int, device_type: str) -> tuple[int, int]:
    """Tokens per block m, and per chunk c, for a scan of `length` tokens with per_token = b * e * n state numbers."""
    if device_type == "cpu":
        # One chunk per block (q = 1): the plain loop, in blocks that stay in the cache. On a CPU an operation
        # costs little beyond its work, and the chunked scheme's extra passes would cost 1.5-4x the time.
        tokens = min(length, max(16, CPU_BLOCK_ELEMENTS // per_token))
        return tokens, tokens
    tokens = max(1, min(length, SCAN_BLOCK_ELEMENTS // per_token))
    chunk = math.isqrt(tokens - 1) + 1  # c = ceil(sqrt(tokens)): q ~ c makes c + q smallest
    return chunk * -(-tokens // chunk), chunk  # m = q c >= tokens, so that only the last block is padded


def _chunked(x: torch.Tensor, chunk: int) -> torch.Tensor:
    """A block (b, x, m) as (c, q, b, x): q chunks of c tokens, token i*c + t at [t, i]; zero-padded to whole chunks.

    Zero padding is exact: a padded token has delta = 0, so its decay is 1 and its input 0; its outputs are dropped.
    """
    if x.shape[-1] % chunk:
        x = F.pad(x, (0, -x.shape[-1] % chunk))  # (b, x, q*c)
    return rearrange(x, "b x (q c) -> c q b x", c=chunk).contiguous()


def _unchunked(x: torch.Tensor, length: int) -> torch.Tensor:
    """(c, q, b, x) back to (b, x, m), without the padding."""
    return rearrange(x, "c q b x -> b x (q c)")[..., :length]


def _block_inputs(start, stop, chunk, compute, u, delta, B, C, z, delta_bias, delta_softplus):
    """Tokens start..stop-1 of the scan's inputs in the compute dtype, by chunks: (c, q, b, e) or (c, q, b, n)."""
    span = slice(start, stop)
    delta = delta[:, :, span].to(compute)  # (b, e, m)
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    by_chunks = lambda x: None if x is None else _chunked(x[:, :, span].to(compute), chunk)  # noqa: E731
    return by_chunks(u), _chunked(delta, chunk), by_chunks(B), by_chunks(C), by_chunks(z)


def _block_states(u, delta, A, B, h_in):
    """The states of one block, by chunks (step 2 above). u, delta: (c, q, b, e); B: (c, q, b, n); h_in: (b, e, n).

    Returns the decays exp(delta_t A), (c, q, b, e, n), and the states, (c + 1, q, b, e, n): [0, i] is the state
    entering chunk i and [t + 1, i] the state after its token t, so that [:-1] are the states before each token.
    With q = 1 this is the plain loop over the block's tokens.
    """
    decay = (delta[..., None] * A).exp_()  # (c, q, b, e, n)
    h = decay.new_empty(decay.shape[0] + 1, *decay.shape[1:])  # (c + 1, q, b, e, n)
    torch.mul((delta * u)[..., None], B[:, :, :, None, :], out=h[1:])  # delta_t B_t u_t
    h[0] = 0
    h[0, 0] = h_in  # a. the first chunk from the state entering the block, the others from zero
    steps, decays = h.unbind(0), decay.unbind(0)  # (q, b, e, n) each
    for t in range(len(decays)):
        steps[t + 1].addcmul_(decays[t], steps[t])
    if h.shape[1] > 1:  # more than one chunk: all but the first ran from zero
        so_far = (delta[:, 1:].cumsum(0)[..., None] * A).exp_()  # (c, q - 1, b, e, n): exp(A sum_{s<=t} delta_s)
        ends, starts, across = h[-1].unbind(0), h[0].unbind(0), so_far[-1].unbind(0)  # across[i - 1] is P_i
        starts[1].copy_(ends[0])
        for i in range(1, len(starts) - 1):  # b. entering[i + 1] = h_local[last, i] + P_i entering[i]
            torch.addcmul(ends[i], across[i - 1], starts[i], out=starts[i + 1])
        h[1:, 1:].addcmul_(so_far, h[0, 1:])  # c. h_t = h_local_t + exp(A sum_{s<=t} delta_s) entering[i]
    return decay, h


def _block_adjoints(grad_h, decay, delta, A, after):
    """The adjoints dh_t = C_t dy_t + exp(delta_{t+1} A) dh_{t+1} of one block, in place of grad_h (c, q, b, e, n),
    which holds C_t dy_t; after (b, e, n) is what reaches the block's last state from later blocks. The same
    scheme as _block_states, backwards. Returns what reaches the state before the block."""
    grad_h[-1, -1] += after  # a. the last chunk from what reaches it, the others from zero
    steps, decays = grad_h.unbind(0), decay.unbind(0)
    for t in range(len(steps) - 2, -1, -1):
        steps[t].addcmul_(decays[t + 1], steps[t + 1])
    if grad_h.shape[1] > 1:  # more than one chunk: all but the last ran from zero
        # b. reaching[i]: what reaches chunk i's last state from chunk i + 1 on; the last chunk's is in grad_h already
        first = decay[0, 1:] * grad_h[0, 1:]  # (q - 1, b, e, n): exp(delta A) dh at each chunk's first token
        across = torch.exp(delta[:, 1:].sum(0)[..., None] * A).unbind(0)  # P_i for chunks 1 .. q - 1
        reaching = torch.zeros_like(grad_h[0])  # (q, b, e, n)
        carried = reaching.unbind(0)
        for i in range(len(carried) - 2, -1, -1):  # reaching[i] = first[i + 1] + P_{i + 1} reaching[i + 1]
            torch.addcmul(first[i], across[i], carried[i + 1], out=carried[i])
        # c. dh_t = dh_local_t + exp(A sum_{s>t} delta_s) reaching[i], for the chunks that started from zero
        later = delta[1:, :-1].flip(0).cumsum(0).flip(0)  # (c - 1, q - 1, b, e): sum_{s>t} delta_s, for t < c - 1
        grad_h[:-1, :-1].addcmul_((later[..., None] * A).exp_(), reaching[:-1])
        grad_h[-1, :-1] += reaching[:-1]  # at a chunk's last token, sum_{s>t} is empty: exp(0) = 1
    return decay[0, 0] * grad_h[0, 0]


def _block_output(h, C, D, u):
    """y_t = C_t . h_t + D u_t over a block, (c, q, b, e), from the states (c, q, b, e, n); the z gate comes after."""
    y = torch.matmul(h, C[..., None]).squeeze(-1)  # (c, q, b, e)
    return y if D is None else y + D * u


class _SelectiveScan(torch.autograd.Function):
    """The selective scan by blocks and chunks (see above), with a hand-written backward pass.

    It saves its inputs as they were given (no copies: the Mamba mixer's other layers keep them anyway) and
    the state entering each block; a block is cast to the compute dtype and laid out by chunks only while it
    is worked on. The softplus, the D skip and the z gate are differentiated here too.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        batch, inner, length = u.shape
        compute = A.dtype
        block, chunk = scan_plan(length, batch * inner * A.shape[1], u.device.type)
        starts = range(0, length, block)
        entering = u.new_empty(len(starts), batch, inner, A.shape[1], dtype=compute)  # (blocks, b, e, n): the state entering each
        h = torch.zeros_like(entering[0])  # (b, e, n)
        out = torch.empty_like(u, dtype=compute)  # (b, e, l), in u's memory layout
        for index, start in enumerate(starts):
            entering[index] = h
            u_, delta_, B_, C_, z_ = _block_inputs(start, start + block, chunk, compute, u, delta, B, C, z,
                                                   delta_bias, delta_softplus)  # (c, q, b, e) or (c, q, b, n)
            _, states = _block_states(u_, delta_, A, B_, h)  # (c + 1, q, b, e, n)
            y = _block_output(states[1:], C_, D, u_)  # (c, q, b, e)
            if z_ is not None:
                y = y * F.silu(z_)
            out[:, :, start:start + block] = _unchunked(y, min(block, length - start))
            h = states[-1, -1]  # (b, e, n): the state leaving the block
        ctx.plan, ctx.delta_softplus = (block, chunk), delta_softplus
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, entering)
        return out  # (b, e, l)

    @staticmethod
    @once_differentiable  # the backward pass is written by hand from saved tensors: a second derivative through it would be wrong
    def backward(ctx, grad_out):  # (b, e, l)
        u, delta, A, B, C, D, z, delta_bias, entering = ctx.saved_tensors
        (block, chunk), compute, length = ctx.plan, A.dtype, u.shape[-1]
        grads = {name: torch.empty_like(x, dtype=compute)  # (b, e, l), each in its input's memory layout
                 for name, x in dict(u=u, delta=delta, z=z).items() if x is not None}
        grad_B, grad_C = torch.empty_like(B), torch.empty_like(C)  # (b, n, l)
        grad_A = torch.zeros_like(A)
        grad_D = None if D is None else torch.zeros_like(D)
        after = torch.zeros_like(entering[0])  # (b, e, n): the gradient reaching the block's last state from later blocks
        for index in reversed(range(entering.shape[0])):
            start = index * block
            stop = min(start + block, length)
            u_, delta_, B_, C_, z_ = _block_inputs(start, stop, chunk, compute, u, delta, B, C, z,
                                                   delta_bias, delta_softplus=ctx.delta_softplus)
            grad_y = _chunked(grad_out[:, :, start:stop].to(compute), chunk)  # (c, q, b, e)
            decay, states = _block_states(u_, delta_, A, B_, entering[index])  # (c + 1, q, b, e, n)
            before, states = states[:-1], states[1:]  # the states before and after each token
            if z_ is not None:  # back through the gate: out_t = (y_t + D u_t) silu(z_t)
                y = _block_output(states, C_, D, u_)  # (c, q, b, e)
                sigmoid = torch.sigmoid(z_)
                grads["z"][:, :, start:stop] = _unchunked(grad_y * y * sigmoid * (1 + z_ * (1 - sigmoid)), stop - start)  # silu'
                grad_y = grad_y * z_ * sigmoid  # times silu(z_t)
            grad_C[:, :, start:stop] = _unchunked(torch.matmul(states.transpose(-1, -2), grad_y[..., None]).squeeze(-1), stop - start)
            grad_h = grad_y[..., None] * C_[:, :, :, None, :]  # (c, q, b, e, n): C_t dy_t
            after = _block_adjoints(grad_h, decay, delta_, A, after)  # grad_h now holds dh_t
            # Through the input delta_t B_t u_t ...
            grad_delta_u = torch.matmul(grad_h, B_[..., None]).squeeze(-1)  # (c, q, b, e)
            grad_B[:, :, start:stop] = _unchunked(
                torch.matmul(grad_h.transpose(-1, -2), (delta_ * u_)[..., None]).squeeze(-1), stop - start)  # (b, n, m)
            grad_u = grad_delta_u * delta_
            if D is not None:  # ... through the skip D u_t ...
                grad_u += grad_y * D
                grad_D += (grad_y * u_).sum((0, 1, 2))
            grads["u"][:, :, start:stop] = _unchunked(grad_u, stop - start)
            # ... and through the decay: d(delta_t A) = dh_t exp(delta_t A) h_{t-1}, in grad_h's memory
            grad_log_decay = grad_h.mul_(decay).mul_(before)  # (c, q, b, e, n)
            grad_A += (grad_log_decay * delta_[..., None]).sum((0, 1, 2))
            grad_delta = grad_delta_u * u_ + (grad_log_decay * A).sum(-1)  # (c, q, b, e)
            if ctx.delta_softplus:  # softplus'(x) = sigmoid(x) = 1 - exp(-softplus(x))
                grad_delta *= -torch.expm1(-delta_)
            grads["delta"][:, :, start:stop] = _unchunked(grad_delta, stop - start)
        grad_delta_bias = None if delta_bias is None else grads["delta"].sum((0, 2))
        grad_u, grad_delta, grad_z = (None if x is None else grads[name].to(x.dtype)  # each in its input's dtype
                                      for name, x in dict(u=u, delta=delta, z=z).items())
        return grad_u, grad_delta, grad_A, grad_B, grad_C, grad_D, grad_z, grad_delta_bias, None


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """The selective scan in pure torch, in few operations and little memory; same arguments as mamba-ssm's selective_scan_fn.

    Computes in float32 (float64 for float64 inputs) with autocast off, and returns u's dtype.
    """
    compute = torch.promote_types(u.dtype, torch.float32)
    with torch.autocast(u.device.type, enabled=False):
        # The small inputs are cast here; u, delta and z block by block inside, so that no cast copy of them is kept.
        A, B, C, D, delta_bias = (None if x is None else x.to(compute) for x in (A, B, C, D, delta_bias))
        y = _SelectiveScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus)  # (b, e, l)
    return y.to(u.dtype)


# torch.compile traces selective_scan whole, with no graph break, and unrolls its Python loops. Under the GPU plan
# that is about 3 (c + q) steps, which it fuses into a few kernels; under the CPU plan it would be a step per token.
selective_scan_eager = torch.compiler.disable(selective_scan)
FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what mamba-ssm's kernel takes for u


def selective_scan_for(u: torch.Tensor):
    """The scan the Mamba layers run on their input u: mamba-ssm's fused kernel for a CUDA tensor in a dtype it takes,
    where mamba-ssm is installed; else selective_scan, which torch.compile leaves uncompiled on a CPU."""
    if fused_selective_scan is not None and u.is_cuda and u.dtype in FUSED_DTYPES:
        return fused_selective_scan
    return selective_scan_eager if u.device.type == "cpu" else selective_scan


#################################################################################
#                                  Mamba mixer                                  #
#################################################################################

def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Mamba's causal depthwise convolution along the tokens of x (b, l, e), with nn.Conv1d's weight (e, 1, k):
    out_l = bias + sum_j weight[:, 0, k-1-j] x_{l-j}, zero before the first token. Channels last: no transposes.
    In x's dtype, as causal-conv1d's kernel returns it: under autocast the float32 weights would promote a bf16 x."""
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (b, l, d)
        # Everything stays (b, l, channels), the layout of the linear layers; the scan takes (b, e, l) views of it.
        # So nothing is transposed, and autograd keeps no copies: the scan keeps x, delta and z as they are.
        x, z = self.in_proj(x).chunk(2, dim=-1)  # (b, l, e) each
        x = F.silu(causal_conv1d(x, self.conv1d.weight, self.conv1d.bias))  # (b, l, e)
        delta, B, C = torch.split(self.x_proj(x), [self.dt_rank, self.d_state, self.d_state], dim=-1)  # (b, l, r or n)
        delta = delta @ self.dt_proj.weight.t()  # (b, l, e); the bias is added inside the scan
        ssm = torch.promote_types(self.A_log.dtype, torch.float32)  # the SSM's own parameters in float32 or more
        A = -torch.exp(self.A_log.to(ssm))  # (e, n)
        # Under autocast, u = x, delta, B, C and z are all bf16 (or fp16) here, and A, D and delta_bias float32:
        # mamba-ssm's kernel demands exactly that.
        y = selective_scan_for(x)(x.transpose(1, 2), delta.transpose(1, 2), A, B.transpose(1, 2),
                                         C.transpose(1, 2), self.D.to(ssm), z.transpose(1, 2),
                                         delta_bias=self.dt_proj.bias.to(ssm), delta_softplus=True)  # (b, e, l)
        return self.out_proj(y.transpose(1, 2))  # (b, l, d)


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
            self.cross_attention = CrossAttention(dim, context_dim, heads=max(1, dim // 64))  # heads of width 64, as DiT's
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


class FinalLayer(nn.Module):
    """adaLN, then a linear map from each token to its patch of pixels. As DiT's; the official ZigMa's final
    layer is not modulated by the condition."""

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
    """The defaults are ZigMa-S/2 on the 32 x 32 x 4 latents of a 256 px image (the presets below)."""
    input_size: int = 32  # image side in pixels, or in latent cells; square
    in_channels: int = 4  # C: 3 for pixels, the VAE's channels for latents
    patch_size: int = 2
    dim: int = 384  # D
    depth: int = 24
    scan: str = "zigzag"  # the 2D paths: "zigzag" (the paper's), "sweep" (raster, its baseline) or "hilbert" (PATHS)
    scan_paths: int = 8  # K: layer i reads path i mod K; the paper's best is Zigzag-8
    frames: int = 0  # 0 = images; T > 0 = clips of T frames
    video_scan: str = "sst"  # for clips: per-layer letters, s spatial, t temporal, v volume; "sst", two spatial
    #                          layers to each temporal one, is the official video configuration (3d_zigzag8sst)
    num_classes: int = 0  # 0 = unconditional; class num_classes is the "null" label for guidance
    context_dim: int = 0  # 0 = no cross-attention; else the width of the context tokens
    d_state: int = 16  # N, as in Mamba
    expand: int = 2  # E = expand * D, as in Mamba

    def __post_init__(self):
        assert self.input_size % self.patch_size == 0, f"patch size {self.patch_size} must divide input size {self.input_size}"
        assert self.scan in PATHS, f"scan must be one of {', '.join(PATHS)}, not {self.scan!r}"
        assert 1 <= self.scan_paths <= 8, f"scan_paths must be between 1 and 8, not {self.scan_paths}"
        assert self.video_scan and set(self.video_scan) <= set("stv"), f"video_scan takes letters s, t and v, not {self.video_scan!r}"

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
        # A learned position per token, as the official models (use_pe=2): one table serves images and clips
        # alike, with no hand-made 3D sin-cos table (DiT's is a fixed 2D one).
        self.pos_embed = nn.Parameter(torch.zeros(1, math.prod(grid), dim))
        pattern = config.video_scan if config.frames else "s"
        self.scans = nn.ModuleList(layer_scans(grid, config.depth, config.scan, config.scan_paths, pattern))
        self.blocks = nn.ModuleList(
            ZigMaBlock(dim, config.d_state, config.expand, config.context_dim) for _ in range(config.depth))
        self.final_layer = FinalLayer(dim, config.patch_size, config.in_channels)
        # True: keep only each block's input in training and recompute the block in the backward pass, for
        # less memory at about a third more time (train.py --grad-checkpointing). It changes no result.
        self.grad_checkpointing = False
        self.initialize_weights()

    def initialize_weights(self):
        # Patch embedding like a linear layer (DiT).
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        # Embeddings: small normal, as DiT, but for the label table.
        nn.init.normal_(self.pos_embed, std=0.02)
        for layer in self.t_embedder.mlp[0], self.t_embedder.mlp[2]:
            nn.init.normal_(layer.weight, std=0.02)
        if self.y_embedder is not None:
            # N(0, 1), as ADM, not DiT's N(0, 0.02). The label is added to the timestep embedding, whose MLP
            # grows to a norm of ~20 within a few hundred steps, while Adam moves a table entry by about the
            # learning rate a step: from 0.02 the labels stayed ~1% of c, and 2,000 steps on the faces in four
            # moods did not teach the model one (bench.py --only labels). From N(0, 1) they are as large as the time.
            nn.init.normal_(self.y_embedder.weight, std=1.0)
        if self.null_context is not None:
            nn.init.normal_(self.null_context, std=0.02)
        # adaLN-Zero: every block starts as the identity. Because of that, DiT's xavier init of every linear layer
        # and Mamba's out_proj / sqrt(depth) rescaling (which the official ZigMa applies) are left out: the zero
        # gates already start each residual branch at zero, so the other linear layers keep PyTorch's defaults.
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

        The null label is row num_classes of the label table. The null context is one learned token repeated:
        it needs no mask, since attending to S copies of one token gives the same result as attending to one.
        """
        if self.y_embedder is not None:
            null_y = torch.full((batch,), self.config.num_classes, device=self.y_embedder.weight.device)
            y = null_y if y is None else y if drop is None else torch.where(drop, null_y, y)
        if self.null_context is not None and context is None:
            context = self.null_context.expand(batch, 1, -1)
        elif self.null_context is not None and drop is not None:
            context = torch.where(drop[:, None, None], self.null_context, context)
            context_mask = None if context_mask is None else context_mask | drop[:, None]
        return y, context, context_mask

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None, drop: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C, H, W) images or (B, T, C, H, W) clips; t: (B,) in [0, 1]; y: (B,) labels;
        context: (B, S, context_dim) text tokens; context_mask: (B, S), False where the context is padding.

        A missing y or context means the null condition, and so does drop (B,) where it is True: for
        classifier-free guidance, training drops conditions at random, and sampling runs a null half.
        Returns the velocity, shaped like x.
        """
        config = self.config
        frames, h, w = config.grid
        video = x.dim() == 5
        assert video == (config.frames > 0), f"expected {'clips (B, T, C, H, W)' if config.frames else 'images (B, C, H, W)'}, got {tuple(x.shape)}"
        assert y is None or self.y_embedder is not None, "this model has no classes: leave y out"
        assert context is None or self.null_context is not None, "this model has no cross-attention: leave context out"
        assert context_mask is None or context is not None, "a context mask needs its context"
        batch = x.shape[0]
        y, context, context_mask = self.conditions(batch, y, context, context_mask, drop)

        pixels = x.flatten(0, 1) if video else x  # (B*T, C, H*p, W*p)
        tokens = rearrange(self.patch_embed(pixels), "(b t) d h w -> b (t h w) d", b=batch)  # (B, T*H*W, D)
        tokens = tokens + self.pos_embed
        c = self.t_embedder(t)  # (B, D)
        if y is not None:
            c = c + self.y_embedder(y)  # (B, D)
        # Text reaches the blocks through cross-attention only; the official code also adds its mean into c.
        for block, scan in zip(self.blocks, self.scans):
            if self.grad_checkpointing and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, c, scan, context, context_mask, use_reentrant=False)
            else:
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

def flow_loss(model: ZigMa, x: torch.Tensor, y=None, context=None, context_mask=None, drop_prob: float = 0.1,
              noise: torch.Tensor | None = None, t: torch.Tensor | None = None) -> torch.Tensor:
    """Velocity-matching loss on the linear path x_t = (1 - t) noise + t x, t ~ U[0, 1] per example.

    For classifier-free guidance, each example's label and context are replaced by the null condition
    with probability drop_prob (when given). noise (like x) and t (B,) are drawn unless given.
    """
    batch = x.shape[0]
    noise = torch.randn_like(x) if noise is None else noise
    t = torch.rand(batch, device=x.device) if t is None else t  # (B,)
    t_ = t.view(batch, *[1] * (x.dim() - 1)).to(x.dtype)  # broadcastable over x, in its dtype (a bf16 model takes bf16)
    x_t = (1 - t_) * noise + t_ * x
    drop = None
    if y is not None or context is not None:
        drop = torch.rand(batch, device=x.device) < drop_prob  # (B,)
    v = model(x_t, t, y, context, context_mask, drop)
    return F.mse_loss(v.float(), (x - noise).float())


def guided_velocity(model: ZigMa, x, t, y=None, context=None, context_mask=None, cfg_scale: float = 1.0) -> torch.Tensor:
    """The velocity at (x, t); with a label or context and cfg_scale != 1, classifier-free guided:
    v = v_null + cfg_scale * (v_cond - v_null), both passes in one batch.
    """
    if y is None and context is None:
        return model(x, t)
    if cfg_scale == 1:  # no guidance: v = v_cond, one pass
        return model(x, t, y, context, context_mask)
    twice = lambda a: None if a is None else torch.cat([a, a])  # noqa: E731
    null_half = torch.arange(2 * x.shape[0], device=x.device) >= x.shape[0]  # (2B,): drop the second half's conditions
    v_cond, v_null = model(twice(x), twice(t), twice(y), twice(context), twice(context_mask), null_half).chunk(2)
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
