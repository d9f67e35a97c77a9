"""The fast selective scan: zigma.selective_scan_reference's function, exactly, in few and large operations.

A first reading of zigma.py can skip this file. The Mamba layers run selective_scan from here, and the tests
compare it with the reference, values and gradients, under every device's plan. Its arguments and shapes
are the reference's (and mamba-ssm's): u, delta, z (b, e, l); A (e, n); B, C (b, n, l); D, delta_bias (e,).
Few operations, so that a GPU is not bound by kernel launches; by products and sums only:

1. Blocks. The tokens are cut into blocks of m tokens, run one after another. The state leaving a block
   enters the next. m is chosen so that a block's (m, b, e, n) tensors fit a memory budget.
2. Chunks. A block is read as `chunks` chunks of `chunk_len` tokens, laid out (chunk_len, chunks):
   token i * chunk_len + t sits at [t, i].
   a. All chunks run the recurrence at once, chunk_len steps over (chunks, b, e, n) slices. The first chunk
      starts from the state entering the block, so it is exact; the others start from zero, which gives
      their states as if nothing came before (local_t).
   b. The state that starts chunk i + 1 is the one that starts chunk i, carried across it, one step a chunk
      (in _block_states: starts[i], ends[i] the chunk's last local state, across[i - 1] = P_i):
          starts[i + 1] = ends[i] + P_i starts[i],   P_i = prod_t exp(delta_t A) = exp(A sum_t delta_t).
   c. By linearity the rest is one operation: h_t = local_t + exp(A sum_{s<=t} delta_s) starts[i].
   For one forward and backward pass at 1,024 tokens (bench.py counts them): 526 operations under the GPU
   plan (one block, 32 chunks of 32 tokens), 17,110 under the CPU plan (one chunk a block: a loop over
   tokens, about 17 a token). Nothing is divided by a decay (which underflows to 0), and no logarithm is taken.
3. Backward. The adjoint runs the same recurrence backwards, dh_t = C_t dy_t + exp(delta_{t+1} A) dh_{t+1},
   and the same two-level scheme computes it. From the states h and the adjoints dh:
       dB_t = sum_e dh_t (delta_t u_t)     d(delta_t u_t) = dh_t . B_t     dC_t = h_t^T dy_t
       d(delta_t A) = dh_t exp(delta_t A) h_{t-1}   ->  dA = sum_t d(delta_t A) delta_t,  d(delta_t) += d(delta_t A) . A
   Only the inputs and the state entering each block are saved; the backward pass recomputes a block's states.
The loops write into unbind() views of one tensor: each step's in-place write lands in the whole tensor.
"""

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch.autograd.function import once_differentiable

SCAN_BLOCK_ELEMENTS = 2 ** 27  # GPUs and MPS: the most numbers in one of a block's (m, b, e, n) tensors (512 MiB in float32)
CPU_BLOCK_ELEMENTS = 3 * 2 ** 19  # CPUs: 6 MiB, measured fastest on 2 cores at b * e = 1536 to 6144


def scan_plan(length: int, per_token: int, device_type: str) -> tuple[int, int]:
    """Tokens per block m, and per chunk, for a scan of `length` tokens with per_token = b * e * n state numbers."""
    if device_type == "cpu":
        # One chunk a block: the plain loop, in blocks that stay in the cache. On a CPU an operation costs little
        # beyond its work, and the chunked scheme's extra passes cost 1.5-4x the time.
        tokens = min(length, max(16, CPU_BLOCK_ELEMENTS // per_token))
        return tokens, tokens
    tokens = max(1, min(length, SCAN_BLOCK_ELEMENTS // per_token))
    chunk_len = math.isqrt(tokens - 1) + 1  # ceil(sqrt(tokens)): as many chunks as steps a chunk, the fewest steps in all
    return chunk_len * -(-tokens // chunk_len), chunk_len  # m = a whole number of chunks, so only the last block is padded


def _chunked(x: torch.Tensor, chunk_len: int) -> torch.Tensor:
    """A block (b, x, m) as (chunk_len, chunks, b, x), zero-padded to whole chunks.

    Zero padding is exact: a padded token has delta = 0, so its decay is 1 and its input 0. Its outputs are dropped.
    """
    if x.shape[-1] % chunk_len:
        x = F.pad(x, (0, -x.shape[-1] % chunk_len))  # (b, x, chunks * chunk_len)
    return rearrange(x, "b x (chunks len) -> len chunks b x", len=chunk_len).contiguous()


def _unchunked(x: torch.Tensor, length: int) -> torch.Tensor:
    """(chunk_len, chunks, b, x) back to (b, x, m), without the padding."""
    return rearrange(x, "len chunks b x -> b x (chunks len)")[..., :length]


def _block_inputs(span: slice, chunk_len: int, compute: torch.dtype, inputs: dict, delta_softplus: bool):
    """The tokens in span of the scan's inputs (u, delta, B, C, z, delta_bias), in the compute dtype and by chunks:
    u, delta and z (chunk_len, chunks, b, e); B and C (chunk_len, chunks, b, n)."""
    delta = inputs["delta"][:, :, span].to(compute)  # (b, e, m)
    if inputs["delta_bias"] is not None:
        delta = delta + inputs["delta_bias"][:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    by_chunks = lambda x: None if x is None else _chunked(x[:, :, span].to(compute), chunk_len)  # noqa: E731
    return by_chunks(inputs["u"]), _chunked(delta, chunk_len), by_chunks(inputs["B"]), by_chunks(inputs["C"]), by_chunks(inputs["z"])


def _block_states(u, delta, A, B, h_in):
    """The states of one block, by chunks (step 2 above). u, delta: (chunk_len, chunks, b, e); B: (chunk_len,
    chunks, b, n); h_in: (b, e, n).

    Returns the decays exp(delta_t A), (chunk_len, chunks, b, e, n), and the states, (chunk_len + 1, chunks, b,
    e, n): [0, i] is the state entering chunk i, [t + 1, i] the state after its token t. So [:-1] are the
    states before each token. With one chunk this is the plain loop over the block's tokens.
    """
    decay = (delta[..., None] * A).exp_()  # (chunk_len, chunks, b, e, n)
    h = decay.new_empty(decay.shape[0] + 1, *decay.shape[1:])  # (chunk_len + 1, chunks, b, e, n)
    torch.mul((delta * u)[..., None], B[:, :, :, None, :], out=h[1:])  # delta_t B_t u_t
    h[0] = 0
    h[0, 0] = h_in  # a. the first chunk from the state entering the block, the others from zero
    steps, decays = h.unbind(0), decay.unbind(0)  # (chunks, b, e, n) each, views of h and decay
    for t in range(len(decays)):
        steps[t + 1].addcmul_(decays[t], steps[t])
    if h.shape[1] > 1:  # more than one chunk: all but the first ran from zero
        so_far = (delta[:, 1:].cumsum(0)[..., None] * A).exp_()  # (chunk_len, chunks - 1, b, e, n): exp(A sum_{s<=t} delta_s)
        ends, starts, across = h[-1].unbind(0), h[0].unbind(0), so_far[-1].unbind(0)  # across[i - 1] is P_i
        starts[1].copy_(ends[0])
        for i in range(1, len(starts) - 1):  # b. starts[i + 1] = ends[i] + P_i starts[i]
            torch.addcmul(ends[i], across[i - 1], starts[i], out=starts[i + 1])
        h[1:, 1:].addcmul_(so_far, h[0, 1:])  # c. h_t = local_t + exp(A sum_{s<=t} delta_s) starts[i]
    return decay, h


def _block_adjoints(grad_h, decay, delta, A, after):
    """The adjoints dh_t = C_t dy_t + exp(delta_{t+1} A) dh_{t+1} of one block, in place of grad_h (chunk_len,
    chunks, b, e, n), which holds C_t dy_t. after (b, e, n) is what reaches the block's last state from later
    blocks. The same scheme as _block_states, backwards. Returns what reaches the state before the block."""
    grad_h[-1, -1] += after  # a. the last chunk from what reaches it, the others from zero
    steps, decays = grad_h.unbind(0), decay.unbind(0)
    for t in range(len(steps) - 2, -1, -1):
        steps[t].addcmul_(decays[t + 1], steps[t + 1])
    if grad_h.shape[1] > 1:  # more than one chunk: all but the last ran from zero
        # b. reaching[i]: what reaches chunk i's last state from chunk i + 1 on; the last chunk's is in grad_h already.
        # first[i] is exp(delta A) dh at the first token of chunk i + 1, and across[i] its P_{i + 1}.
        first = decay[0, 1:] * grad_h[0, 1:]  # (chunks - 1, b, e, n)
        across = torch.exp(delta[:, 1:].sum(0)[..., None] * A).unbind(0)
        reaching = torch.zeros_like(grad_h[0])  # (chunks, b, e, n)
        carried = reaching.unbind(0)
        for i in range(len(carried) - 2, -1, -1):  # reaching[i] = first[i] + P_{i + 1} reaching[i + 1]
            torch.addcmul(first[i], across[i], carried[i + 1], out=carried[i])
        # c. dh_t = local dh_t + exp(A sum_{s>t} delta_s) reaching[i], for the chunks that started from zero
        later = delta[1:, :-1].flip(0).cumsum(0).flip(0)  # (chunk_len - 1, chunks - 1, b, e): sum_{s>t} delta_s
        grad_h[:-1, :-1].addcmul_((later[..., None] * A).exp_(), reaching[:-1])
        grad_h[-1, :-1] += reaching[:-1]  # at a chunk's last token, sum_{s>t} is empty: exp(0) = 1
    return decay[0, 0] * grad_h[0, 0]


def _block_output(h, C, D, u):
    """y_t = C_t . h_t + D u_t over a block, (chunk_len, chunks, b, e), from the states; the z gate comes after."""
    y = torch.matmul(h, C[..., None]).squeeze(-1)  # (chunk_len, chunks, b, e)
    return y if D is None else y + D * u


class _SelectiveScan(torch.autograd.Function):
    """The selective scan by blocks and chunks (above), with a hand-written backward pass.

    It saves its inputs as given, not cast copies (the mixer's x_proj keeps u for its own backward anyway),
    and the state entering each block. A block is cast to the compute dtype and laid out by chunks only while
    it is worked on. The softplus, the D skip and the z gate are differentiated here too.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        batch, inner, length = u.shape
        compute = A.dtype
        block, chunk_len = scan_plan(length, batch * inner * A.shape[1], u.device.type)
        inputs = dict(u=u, delta=delta, B=B, C=C, z=z, delta_bias=delta_bias)
        starts = range(0, length, block)
        entering = u.new_empty(len(starts), batch, inner, A.shape[1], dtype=compute)  # (blocks, b, e, n)
        h = torch.zeros_like(entering[0])  # (b, e, n)
        out = torch.empty_like(u, dtype=compute)  # (b, e, l), in u's memory layout
        for index, start in enumerate(starts):
            entering[index] = h
            u_, delta_, B_, C_, z_ = _block_inputs(slice(start, start + block), chunk_len, compute, inputs, delta_softplus)
            _, states = _block_states(u_, delta_, A, B_, h)  # (chunk_len + 1, chunks, b, e, n)
            y = _block_output(states[1:], C_, D, u_)  # (chunk_len, chunks, b, e)
            if z_ is not None:
                y = y * F.silu(z_)
            out[:, :, start:start + block] = _unchunked(y, min(block, length - start))
            h = states[-1, -1]  # (b, e, n): the state leaving the block
        ctx.plan, ctx.delta_softplus = (block, chunk_len), delta_softplus
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, entering)
        return out  # (b, e, l)

    @staticmethod
    @once_differentiable  # the backward pass is written by hand from saved tensors: a second derivative through it would be wrong
    def backward(ctx, grad_out):  # (b, e, l)
        u, delta, A, B, C, D, z, delta_bias, entering = ctx.saved_tensors
        (block, chunk_len), compute, length = ctx.plan, A.dtype, u.shape[-1]
        inputs = dict(u=u, delta=delta, B=B, C=C, z=z, delta_bias=delta_bias)
        grads = {name: torch.empty_like(x, dtype=compute)  # (b, e, l), each in its input's memory layout
                 for name, x in dict(u=u, delta=delta, z=z).items() if x is not None}
        grad_B, grad_C = torch.empty_like(B), torch.empty_like(C)  # (b, n, l)
        grad_A = torch.zeros_like(A)
        grad_D = None if D is None else torch.zeros_like(D)
        after = torch.zeros_like(entering[0])  # (b, e, n): the gradient reaching the block's last state from later blocks
        for index in reversed(range(entering.shape[0])):
            start = index * block
            stop = min(start + block, length)
            u_, delta_, B_, C_, z_ = _block_inputs(slice(start, stop), chunk_len, compute, inputs, ctx.delta_softplus)
            grad_y = _chunked(grad_out[:, :, start:stop].to(compute), chunk_len)  # (chunk_len, chunks, b, e)
            decay, states = _block_states(u_, delta_, A, B_, entering[index])  # (chunk_len + 1, chunks, b, e, n)
            before, states = states[:-1], states[1:]  # the states before and after each token
            if z_ is not None:  # back through the gate: out_t = (y_t + D u_t) silu(z_t)
                y = _block_output(states, C_, D, u_)  # (chunk_len, chunks, b, e)
                sigmoid = torch.sigmoid(z_)
                grads["z"][:, :, start:stop] = _unchunked(grad_y * y * sigmoid * (1 + z_ * (1 - sigmoid)), stop - start)  # silu'
                grad_y = grad_y * z_ * sigmoid  # times silu(z_t)
            grad_C[:, :, start:stop] = _unchunked(torch.matmul(states.transpose(-1, -2), grad_y[..., None]).squeeze(-1), stop - start)
            grad_h = grad_y[..., None] * C_[:, :, :, None, :]  # (chunk_len, chunks, b, e, n): C_t dy_t
            after = _block_adjoints(grad_h, decay, delta_, A, after)  # grad_h now holds dh_t
            # Through the input delta_t B_t u_t ...
            grad_delta_u = torch.matmul(grad_h, B_[..., None]).squeeze(-1)  # (chunk_len, chunks, b, e)
            grad_B[:, :, start:stop] = _unchunked(
                torch.matmul(grad_h.transpose(-1, -2), (delta_ * u_)[..., None]).squeeze(-1), stop - start)  # (b, n, m)
            grad_u = grad_delta_u * delta_
            if D is not None:  # ... through the skip D u_t ...
                grad_u += grad_y * D
                grad_D += (grad_y * u_).sum((0, 1, 2))
            grads["u"][:, :, start:stop] = _unchunked(grad_u, stop - start)
            # ... and through the decay: d(delta_t A) = dh_t exp(delta_t A) h_{t-1}, in grad_h's memory
            grad_log_decay = grad_h.mul_(decay).mul_(before)  # (chunk_len, chunks, b, e, n)
            grad_A += (grad_log_decay * delta_[..., None]).sum((0, 1, 2))
            grad_delta = grad_delta_u * u_ + (grad_log_decay * A).sum(-1)  # (chunk_len, chunks, b, e)
            if ctx.delta_softplus:  # softplus'(x) = sigmoid(x) = 1 - exp(-softplus(x))
                grad_delta *= -torch.expm1(-delta_)
            grads["delta"][:, :, start:stop] = _unchunked(grad_delta, stop - start)
        grad_delta_bias = None if delta_bias is None else grads["delta"].sum((0, 2))
        grad_u, grad_delta, grad_z = (None if x is None else grads[name].to(x.dtype)  # each in its input's dtype
                                      for name, x in dict(u=u, delta=delta, z=z).items())
        return grad_u, grad_delta, grad_A, grad_B, grad_C, grad_D, grad_z, grad_delta_bias, None


def _selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    compute = torch.promote_types(u.dtype, torch.float32)
    with torch.autocast(u.device.type, enabled=False):
        # The small inputs are cast here; u, delta and z block by block inside, so that no cast copy of them is kept.
        A, B, C, D, delta_bias = (None if x is None else x.to(compute) for x in (A, B, C, D, delta_bias))
        y = _SelectiveScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus)  # (b, e, l)
    return y.to(u.dtype)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """The selective scan in pure torch, in few operations and little memory; mamba-ssm's selective_scan_fn's arguments.

    Computes in float32 (float64 for float64 inputs) with autocast off, and returns u's dtype. Under torch.compile a
    plan of one chunk a block (the CPU's) is left out of the graph: it steps through the tokens one at a time, which
    compiling would unroll, a step a token. The other plans trace whole, and unroll into about 3 * (chunks +
    chunk_len) steps, which the compiler fuses into a few kernels.
    """
    if torch.compiler.is_compiling():  # the plan is made again inside; eager calls need it only there
        block, chunk_len = scan_plan(u.shape[2], u.shape[0] * u.shape[1] * A.shape[1], u.device.type)
        if block == chunk_len:
            # The work is in a function of its own: disabling this one, which is being compiled, made a 3-step
            # `train.py --compile` run take 72 s, not 16 s.
            return torch.compiler.disable(_selective_scan)(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return _selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
