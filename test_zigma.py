"""Tests for ZigMa. Run: pytest test_zigma.py (CPU, tiny models, a few minutes on 2 cores)."""

import math
import types
from dataclasses import asdict

import pytest
import torch
from einops import rearrange

import data
import zigma
import fast_scan
from fast_scan import selective_scan
from baselines import hilbert_paths
from zigma import (TokenOrder, ZigMa, ZigMaBlock, ZigMaConfig, flow_loss, guided_velocity, layer_orders, sample,
                   selective_scan_reference, volume_path, zigzag_paths)


def tiny_config(**fields) -> ZigMaConfig:
    defaults = dict(input_size=8, in_channels=3, patch_size=2, dim=32, depth=3, d_state=4)
    return ZigMaConfig(**{**defaults, **fields})


def randomize(model: torch.nn.Module, seed: int = 0, scale: float = 0.3) -> torch.nn.Module:
    """Overwrite the zero-initialised (adaLN-Zero) weights, so that every block really computes something."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * scale)
    return model


def grid_distance(a: int, b: int, w: int) -> int:
    return abs(a // w - b // w) + abs(a % w - b % w)


# ---------------------------------------------------------------------------- scan orders

# square, non-square, odd and power-of-two grids
GRIDS = [(1, 1), (1, 5), (4, 1), (2, 2), (3, 5), (4, 4), (6, 3), (8, 8), (16, 16), (5, 5), (7, 7), (3, 4), (4, 7),
         (6, 9), (5, 8), (12, 5), (9, 10), (32, 18)]


@pytest.mark.parametrize("h, w", [(4, 4), (16, 16), (5, 7), (2, 3), (6, 6), (1, 4)])
def test_paths_0_4_1_and_7_read_every_neighbour_just_before_its_token(h, w):
    # What section 1 of zigma.py says about why there are several paths.
    paths = zigzag_paths(h, w)
    neighbours_before = lambda ks: {(a, b) for k in ks for a, b in zip(paths[k].tolist(), paths[k, 1:].tolist())}  # noqa: E731
    horizontal = {(a, b) for a in range(h * w) for b in range(h * w) if a // w == b // w and abs(a - b) == 1}
    vertical = {(a, b) for a in range(h * w) for b in range(h * w) if abs(a - b) == w}
    assert horizontal <= neighbours_before([0, 4]), "paths 0 and 4 read each row both ways"
    assert vertical <= neighbours_before([1, 7]), "paths 1 and 7 read each column both ways"
    assert not (horizontal | vertical) <= neighbours_before([0, 1]), "K = 2 should miss some pairs"
    if (h, w) == (4, 4):  # the drawing's example: token 5 comes right after 6 on path 0, after 9 on path 1
        before = [paths[k, paths[k].tolist().index(5) - 1].item() for k in (0, 1)]
        assert before == [6, 9]


@pytest.mark.parametrize("family", ["zigzag", "hilbert"])
@pytest.mark.parametrize("h, w", GRIDS)
def test_continuous_paths_are_continuous_permutations(family, h, w):
    paths = zigma.family_paths(family, h, w)
    assert paths.shape == (8, h * w)
    for k, path in enumerate(paths.tolist()):
        assert sorted(path) == list(range(h * w)), f"{family} path {k} of {h}x{w} is not a permutation"
        jumps = [grid_distance(a, b, w) for a, b in zip(path, path[1:])]
        assert all(d == 1 for d in jumps), f"{family} path {k} of {h}x{w} jumps: {jumps}"


def test_zigzag_paths_start_at_four_corners_in_both_directions():
    h, w = 4, 6
    paths = zigzag_paths(h, w)
    corners = {0, w - 1, (h - 1) * w, h * w - 1}
    assert {p[0].item() for p in paths} == corners
    assert len({tuple(p.tolist()) for p in paths}) == 8, "the eight paths must differ"
    # Row-major paths take a horizontal first step, column-major ones a vertical one.
    first_steps = [abs(p[1].item() - p[0].item()) for p in paths]
    assert first_steps == [1, w] * 4


def test_hilbert_paths_start_at_four_corners_in_both_directions_on_square_grids():
    for n in (2, 4, 5, 8):
        paths = hilbert_paths(n, n)
        assert len({tuple(p.tolist()) for p in paths}) == 8, f"the eight orientations on {n}x{n} must differ"
        assert [p[0].item() for p in paths[::2]] == [0, n * n - 1, n - 1, (n - 1) * n], "corners in zigzag_paths' order"
        top_left, top_right, bottom_left, bottom_right = 0, n - 1, (n - 1) * n, n * n - 1
        assert [p[-1].item() for p in paths] == [top_right, bottom_left, bottom_left, top_right,
                                                 top_left, bottom_right, bottom_right, top_left], \
            "each ends at the next corner along the rows, then along the columns"
    # 4 rows of 3: no continuous curve runs along the rows from corner to corner, so those orientations reuse
    # the columns' curves backwards, and only four of the eight differ (as the docstring says).
    assert len({tuple(p.tolist()) for p in hilbert_paths(4, 3)}) == 4
    # The classic curve on 4 x 4: the quadrants top-left, bottom-left, bottom-right, top-right, ending top-right.
    assert hilbert_paths(4, 4)[0].tolist() == [0, 1, 5, 4, 8, 12, 13, 9, 10, 14, 15, 11, 7, 6, 2, 3]


def test_a_hilbert_model_reads_orientation_i_mod_k():
    model = ZigMa(tiny_config(path_family="hilbert", depth=4, num_paths=2))
    orders = [block.order.path for block in model.blocks]
    paths = hilbert_paths(4, 4)
    assert all(torch.equal(order, paths[i % 2]) for i, order in enumerate(orders))
    clips = layer_orders((3, 4, 4), depth=2, family="hilbert", num_paths=8, pattern="v")
    path = clips[0].path.tolist()
    for a, b in zip(path, path[1:]):
        (ta, ra), (tb, rb) = divmod(a, 16), divmod(b, 16)
        assert abs(ta - tb) + grid_distance(ra, rb, 4) == 1, "a Hilbert volume path is continuous through the clip"


def test_sweep_paths_are_raster_permutations():
    h, w = 3, 5
    paths = zigma.family_paths("sweep", h, w)
    for path in paths.tolist():
        assert sorted(path) == list(range(h * w))
    assert paths[0].tolist() == list(range(h * w)), "the first sweep is the plain raster order"
    jumps = [grid_distance(a, b, w) for a, b in zip(paths[0].tolist(), paths[0].tolist()[1:])]
    assert max(jumps) > 1, "a raster scan jumps at the end of each row"
    zigzags = zigzag_paths(h, w)
    assert torch.equal(paths[0::2, :w], zigzags[0::2, :w]) and torch.equal(paths[1::2, :h], zigzags[1::2, :h]), \
        "each sweep reads its first line as the zigzag of its orientation does"


def test_volume_zigzag_is_continuous_in_space_and_time():
    frames, h, w = 4, 3, 5
    for path2d in zigzag_paths(h, w):
        path = volume_path(path2d, frames, reverse_odd_frames=True).tolist()
        assert sorted(path) == list(range(frames * h * w))
        for a, b in zip(path, path[1:]):
            (ta, ra), (tb, rb) = divmod(a, h * w), divmod(b, h * w)
            assert abs(ta - tb) + grid_distance(ra, rb, w) == 1, f"3D path jumps from {a} to {b}"


@pytest.mark.parametrize("axis, order_length", [("space", 12), ("time", 3), ("volume", 36)])
def test_scan_round_trip_restores_token_order(axis, order_length):
    grid = (3, 3, 4)
    scan = TokenOrder(grid, axis, torch.randperm(order_length))
    x = torch.randn(2, 36, 5)
    sequences = scan.to_sequences(x)
    assert sequences.shape[1] == order_length
    assert torch.equal(scan.from_sequences(sequences), x)


def test_scan_sequences_follow_the_path():
    grid = (1, 3, 4)
    path = zigzag_paths(3, 4)[1]
    x = torch.arange(12.0).view(1, 12, 1)  # token i carries the value i
    sequence = TokenOrder(grid, "space", path).to_sequences(x)
    assert sequence.flatten().long().tolist() == path.tolist()


def test_temporal_scans_alternate_direction_and_spatial_layers_cycle_paths():
    scans = layer_orders((4, 3, 3), depth=12, family="zigzag", num_paths=2, pattern="sst")
    spatial = [s for s in scans if s.axis == "space"]
    temporal = [s for s in scans if s.axis == "time"]
    assert len(spatial) == 8 and len(temporal) == 4
    paths = zigzag_paths(3, 3)
    for j, s in enumerate(spatial):
        assert torch.equal(s.path, paths[j % 2]), f"spatial layer {j} should read path {j % 2}"
    assert [s.path.tolist() for s in temporal] == [[0, 1, 2, 3], [3, 2, 1, 0]] * 2


def test_scan_orders_are_buffers_that_checkpoints_need_not_carry():
    model = ZigMa(tiny_config(depth=8))
    for i in range(8):
        assert torch.equal(model.blocks[i].order.path, zigzag_paths(4, 4)[i]), f"layer {i} should read path {i}"
        assert torch.equal(model.blocks[i].order.inverse, torch.argsort(zigzag_paths(4, 4)[i]))
    assert not any(".path" in name or ".inverse" in name for name in model.state_dict()), "they follow from the config"
    model.to(torch.float64)
    assert model.blocks[0].order.path.dtype == torch.long, "orders must stay integer under .to(dtype)"


@pytest.mark.parametrize("old_names", [{"path_family": "scan", "num_paths": "scan_paths", "video_pattern": "video_scan"},
                                       {"path_family": "paths"}], ids=["scan", "paths"])
def test_checkpoints_that_carry_scan_orders_still_load(old_names):
    # Checkpoints written before the orders became non-persistent buffers hold them, under the module's old name
    # (scans), and their configs name the fields scan, scan_paths and video_scan, or later paths.
    config = tiny_config(depth=4, path_family="hilbert", num_paths=2, frames=2, video_pattern="st")
    networks = data.build_networks(config, {"vocabulary": None})
    old = dict(networks.state_dict())
    for i, order in enumerate(block.order for block in networks["zigma"].blocks):
        old[f"zigma.scans.{i}.order"], old[f"zigma.scans.{i}.inverse"] = order.path, order.inverse
    old_config = {old_names.get(name, name): value for name, value in asdict(config).items()}
    checkpoint = {"config": old_config, "conditioning": {"vocabulary": None}, "ema": old}
    loaded = data.networks_from_checkpoint(checkpoint, Path("old.pt"))
    assert loaded["zigma"].config == config
    assert torch.equal(loaded["zigma"].pos_embed, networks["zigma"].pos_embed)


def test_zigma_py_runs_on_its_own_with_the_reference_scan(monkeypatch):
    # Without fast_scan.py beside it, the layers run selective_scan_reference, and compute the same.
    torch.manual_seed(0)
    model = randomize(ZigMa(tiny_config())).double()
    x, t = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.rand(2, dtype=torch.float64)
    fast = model(x, t)
    calls = []

    def reference(*args, **kwargs):
        calls.append(1)
        return selective_scan_reference(*args, **kwargs)

    monkeypatch.setattr(zigma, "fast_scan", None)
    monkeypatch.setattr(zigma, "selective_scan_reference", reference)
    assert relative_error(model(x, t), fast) < 1e-12
    assert len(calls) == model.config.depth, "each layer should have run the reference scan"


# ---------------------------------------------------------------------------- selective scan

def scan_inputs(batch=2, width=5, state=4, length=75, dtype=torch.float64, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    shapes = dict(u=(batch, width, length), delta=(batch, width, length), A=(width, state),
                  B=(batch, state, length), C=(batch, state, length), D=(width,), z=(batch, width, length),
                  delta_bias=(width,))
    inputs = {name: torch.randn(shape, generator=g, dtype=dtype) for name, shape in shapes.items()}
    inputs["A"] = -torch.rand((width, state), generator=g, dtype=dtype) * 2  # Mamba's A is negative
    return {name: x.to(device).requires_grad_() for name, x in inputs.items()}


def values_and_gradients(function, inputs, delta_softplus, optional=("D", "z", "delta_bias")):
    names = ["u", "delta", "A", "B", "C", *optional]
    args = {name: inputs[name] for name in names}
    y = function(**args, delta_softplus=delta_softplus)
    weights = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(y)
    grads = torch.autograd.grad((y * weights).sum(), [args[n] for n in names])
    return y, dict(zip(names, grads))


def relative_error(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# The fast scan cuts the tokens into blocks of chunks (fast_scan.scan_plan), by device: every plan is tested here, on
# the CPU. "cuda" is the plan of GPUs and MPS; (12, 4) is blocks of 12 tokens in 3 chunks of 4, as a big batch gets.
SCAN_PLANS = ["cpu", "cuda", (12, 4)]


def use_scan_plan(monkeypatch, plan):
    planner = fast_scan.scan_plan
    if isinstance(plan, tuple):
        monkeypatch.setattr(fast_scan, "scan_plan", lambda length, per_token, device_type: plan)
    else:
        monkeypatch.setattr(fast_scan, "scan_plan", lambda length, per_token, device_type: planner(length, per_token, plan))


@pytest.mark.parametrize("plan", SCAN_PLANS)
@pytest.mark.parametrize("length", [1, 7, 75, 300, 1025])  # none a multiple of a chunk or block
def test_selective_scan_equals_sequential_reference_for_every_plan(monkeypatch, plan, length, device):
    inputs = scan_inputs(length=length, device=device)
    y_ref, grads_ref = values_and_gradients(selective_scan_reference, inputs, True)
    use_scan_plan(monkeypatch, plan)
    y, grads = values_and_gradients(selective_scan, inputs, True)
    assert relative_error(y, y_ref) < 1e-12, "values differ from the reference"
    for name in grads:
        assert relative_error(grads[name], grads_ref[name]) < 1e-12, f"gradient of {name} differs"


@pytest.mark.parametrize("plan", SCAN_PLANS)
@pytest.mark.parametrize("length", [1, 16, 75])  # shorter than a chunk, one chunk, chunks and a part
@pytest.mark.parametrize("optional, delta_softplus", [
    ((), False), (("D", "z", "delta_bias"), False), (("D", "delta_bias"), True), (("z",), True)])
def test_selective_scan_equals_sequential_reference_without_some_inputs(monkeypatch, plan, length, optional, delta_softplus):
    use_scan_plan(monkeypatch, plan)
    inputs = scan_inputs(length=length)
    y, grads = values_and_gradients(selective_scan, inputs, delta_softplus, optional)
    y_ref, grads_ref = values_and_gradients(selective_scan_reference, inputs, delta_softplus, optional)
    assert relative_error(y, y_ref) < 1e-12, "values differ from the reference"
    for name in grads:
        assert relative_error(grads[name], grads_ref[name]) < 1e-12, f"gradient of {name} differs"


def test_selective_scan_takes_the_mixers_channels_last_views():
    # The Mamba mixer passes (b, e, l) views of (b, l, e) tensors; z is a view of a wider one.
    inputs = scan_inputs(length=75)
    y_ref, grads_ref = values_and_gradients(selective_scan_reference, inputs, True)
    views = {}
    for name, x in inputs.items():
        if x.dim() == 3:
            wide = torch.cat([x.detach().transpose(1, 2), torch.randn_like(x.detach().transpose(1, 2))], dim=-1)
            views[name] = wide.requires_grad_()[..., :x.shape[1]].transpose(1, 2)  # (b, x, l) view of (b, l, 2x)
            assert views[name].stride(1) == 1 and torch.equal(views[name], x)
        else:
            views[name] = x
    y, grads = values_and_gradients(selective_scan, views, True)
    assert relative_error(y, y_ref) < 1e-12
    assert y.stride(1) == 1, "the output comes back in u's layout, so that the mixer's out_proj needs no copy"
    for name in grads:
        assert relative_error(grads[name], grads_ref[name]) < 1e-12, f"gradient of {name} differs"


def test_the_mixer_is_causal_along_its_sequence():
    # Its convolution and its scan read only earlier tokens: output i depends on tokens 0..i, each of them.
    torch.manual_seed(0)
    mixer = randomize(zigma.MambaMixer(8, d_state=4)).double()
    x = torch.randn(2, 9, 8, dtype=torch.float64, requires_grad=True)  # (b, l, d)
    for i in (0, 4, 8):
        grad = torch.autograd.grad(mixer(x)[:, i].sum(), x)[0].abs().sum((0, 2))  # (l,)
        assert (grad[i + 1:] == 0).all(), f"output {i} depends on a later token"
        assert (grad[:i + 1] > 0).all(), f"output {i} should depend on every token up to it"


def test_selective_scan_float32_within_1e5_of_float64_reference(device):
    inputs = scan_inputs(batch=2, width=16, state=8, length=200, device=device)
    as32 = {name: x.detach().float().requires_grad_() for name, x in inputs.items()}
    y, grads = values_and_gradients(selective_scan, as32, True)
    y_ref, grads_ref = values_and_gradients(selective_scan_reference, inputs, True)
    assert y.dtype == torch.float32
    assert relative_error(y.double(), y_ref) < 1e-5
    for name in grads:
        assert relative_error(grads[name].double(), grads_ref[name]) < 1e-5, f"gradient of {name} differs"


def layers_scan(monkeypatch, alone: bool):
    """zigma.selective_scan without mamba-ssm: fast_scan.py's scan, or the reference where zigma.py is alone."""
    monkeypatch.setattr(zigma, "fused_selective_scan", None)
    if alone:
        monkeypatch.setattr(zigma, "fast_scan", None)
    return zigma.selective_scan


@pytest.mark.parametrize("alone", [False, True])
def test_selective_scans_compute_in_float32_under_autocast(monkeypatch, alone):
    # Autocast would run the scan's products in bf16 (relative error about 1e-2); the scan turns it off.
    # The backward pass runs outside autocast, as in train.py.
    scan = layers_scan(monkeypatch, alone)
    inputs = {name: x.detach().float().requires_grad_() for name, x in scan_inputs(width=16, state=8, length=50).items()}
    weights = torch.randn(2, 16, 50, generator=torch.Generator().manual_seed(1))  # (b, e, l), like y
    y = scan(**inputs, delta_softplus=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_autocast = scan(**inputs, delta_softplus=True)
    assert y_autocast.dtype == torch.float32
    assert relative_error(y_autocast, y) < 1e-6
    grads, grads_autocast = (torch.autograd.grad((out * weights).sum(), list(inputs.values())) for out in (y, y_autocast))
    for name, g, g_autocast in zip(inputs, grads, grads_autocast):
        assert relative_error(g_autocast, g) < 1e-6, f"gradient of {name} differs"


@pytest.mark.parametrize("plan", SCAN_PLANS)
def test_selective_scan_stays_finite_with_large_decay(monkeypatch, plan, device):
    use_scan_plan(monkeypatch, plan)
    batch, width, state, length = 1, 2, 4, 4096
    u = torch.randn(batch, width, length, device=device, requires_grad=True)
    delta = torch.full((batch, width, length), 10.0, device=device, requires_grad=True)
    A = torch.full((width, state), -100.0, device=device, requires_grad=True)
    B, C = torch.randn(batch, state, length, device=device), torch.randn(batch, state, length, device=device)
    y = selective_scan(u, delta, A, B, C)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(u.grad).all() and torch.isfinite(A.grad).all()
    assert torch.isfinite(delta.grad).all()
    # exp(-1000) is 0: each state forgets the past, so y_t = C_t . (delta_t B_t u_t).
    expected = 10 * u.detach() * (B * C).sum(1, keepdim=True)
    assert torch.allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_selective_scan_refuses_a_second_derivative():
    inputs = scan_inputs(length=20)
    y = selective_scan(**inputs, delta_softplus=True)
    (grad_u,) = torch.autograd.grad(y.square().sum(), inputs["u"], create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):  # its backward is hand-written: no silent wrong answer
        grad_u.sum().backward()


@pytest.mark.parametrize("alone", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_selective_scan_accepts_half_precision(monkeypatch, dtype, alone, device):
    scan = layers_scan(monkeypatch, alone)
    inputs = scan_inputs(length=40, dtype=torch.float32, device=device)
    low = {name: x.detach().to(dtype).requires_grad_() for name, x in inputs.items()}
    y = scan(**low, delta_softplus=True)
    assert y.dtype == dtype
    y.sum().backward()
    for name, x in low.items():
        assert x.grad.dtype == dtype and torch.isfinite(x.grad).all(), f"the gradient of {name} in {x.grad.dtype}"
    # The state (and the gate's silu) stays in float32, as in mamba-ssm's kernel: y is the float32 scan of the same
    # inputs, rounded once to the 16-bit type (half a unit in the last place, eps / 2). A 16-bit state would be off by
    # many units after 40 tokens.
    y_ref = selective_scan_reference(**{name: x.detach().float() for name, x in low.items()}, delta_softplus=True)
    eps = torch.finfo(dtype).eps
    assert torch.allclose(y.float(), y_ref, rtol=eps, atol=eps * 1e-3 * y_ref.abs().max().item()), \
        f"off by up to {((y.float() - y_ref).abs() / y_ref.abs()).max():.1e} of the value, more than a 16-bit rounding"
    if alone:  # the reference: the same operations as y_ref's, all in float32
        assert torch.equal(y, y_ref.to(dtype)), "the reference rounds once, at the end"


def kernel_contract(u, delta, A, B, C, D, z, delta_bias):
    """What mamba-ssm's selective_scan_fn hands its CUDA kernel, and the checks of the kernel's forward and backward
    (selective_scan_fwd and selective_scan_bwd in csrc/selective_scan/selective_scan.cpp); raises where one fails."""
    # The Python wrapper first copies u, delta, B, C and z (and D) where their last dimension is not contiguous.
    u, delta, B, C, z, D = (x if x is None or x.stride(-1) == 1 else x.contiguous() for x in (u, delta, B, C, z, D))
    halves = (torch.float32, torch.float16, torch.bfloat16)
    assert u.dtype in halves, f"u must be float32, float16 or bfloat16, not {u.dtype}"
    assert A.dtype == torch.float32, f"A must be float32, not {A.dtype}"
    batch, inner, length = u.shape
    state = A.shape[1]
    assert A.shape == (inner, state) and state <= 256, f"A must be (e, n <= 256), not {tuple(A.shape)}"
    for name, x, shape in [("delta", delta, (batch, inner, length)), ("B", B, (batch, state, length)),
                           ("C", C, (batch, state, length)), ("z", z, (batch, inner, length))]:
        if x is not None:
            assert x.dtype == u.dtype, f"{name} must be in u's dtype {u.dtype}, not {x.dtype}"
            assert x.shape == shape, f"{name} must be {shape}, not {tuple(x.shape)}"
    for name, x in [("D", D), ("delta_bias", delta_bias)]:
        if x is not None:
            assert x.dtype == torch.float32, f"{name} must be float32, not {x.dtype}"
            assert x.shape == (inner,) and (x.stride(-1) == 1 or inner == 1), f"{name} must be a contiguous ({inner},)"
    return u, delta, B, C, z, D


class KernelStandIn:
    """mamba-ssm's selective_scan_fn as its kernel sees the call (kernel_contract), computed by the pure-torch scan."""

    def __init__(self):
        self.calls = []

    def __call__(self, u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
        u, delta, B, C, z, D = kernel_contract(u, delta, A, B, C, D, z, delta_bias)
        self.calls.append(u.dtype)
        y = selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        assert y.dtype == u.dtype, "the kernel returns u's dtype"
        if y.requires_grad:
            def check_dout(grad):  # selective_scan_bwd: dout in u's dtype
                assert grad.dtype == u.dtype, f"the gradient reaching the kernel must be {u.dtype}, not {grad.dtype}"
            y.register_hook(check_dout)
        return y


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixer_hands_mamba_ssms_kernel_what_it_accepts_under_autocast(monkeypatch, dtype, device):
    # As train.py and sample.py run on CUDA: the whole model under autocast, with classes, captions and guidance.
    kernel = KernelStandIn()  # in fast_scan's place, so that the layers call it on any device
    monkeypatch.setattr(zigma, "fused_selective_scan", None)
    monkeypatch.setattr(zigma, "fast_scan", types.SimpleNamespace(selective_scan=kernel))
    torch.manual_seed(0)
    model = randomize(ZigMa(tiny_config(num_classes=2, context_dim=8)), scale=0.1).to(device)  # 0.3 overflows float16
    x, y = torch.randn(2, 3, 8, 8, device=device), torch.tensor([0, 1], device=device)
    context, mask = torch.randn(2, 3, 8, device=device), torch.tensor([[True, True, False]] * 2, device=device)
    with torch.autocast(device.type, dtype=dtype):
        loss = flow_loss(model, x, y, context, mask, drop_prob=0.5)
    loss.backward()  # the gradient reaching each scan is checked too
    assert kernel.calls == [dtype] * 3, f"each of the 3 layers should call the kernel once with {dtype}: {kernel.calls}"
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    kernel.calls.clear()
    with torch.autocast(device.type, dtype=dtype):
        samples = sample(model, torch.randn(2, 3, 8, 8, device=device), steps=2, y=y, context=context,
                         context_mask=mask, cfg_scale=4.0, method="heun")
    assert kernel.calls == [dtype] * 3 * 4, "two Heun steps are four guided passes through 3 layers"
    assert torch.isfinite(samples).all()


def test_kernel_contract_refuses_what_the_kernel_refuses():
    # The stand-in must catch what the kernel catches, or the test above proves nothing.
    good = {name: x.detach().float() for name, x in scan_inputs(length=6).items()}
    kernel_contract(**good)
    half = {**good, "u": good["u"].bfloat16(), "delta": good["delta"].bfloat16(), "B": good["B"].bfloat16(),
            "C": good["C"].bfloat16(), "z": good["z"].bfloat16()}
    kernel_contract(**half)
    for change, message in [(dict(u=good["u"].double(), delta=good["delta"].double()), "u must be"),
                            (dict(delta=half["delta"].float()), "delta must be in u's dtype"),
                            (dict(B=half["B"].float()), "B must be in u's dtype"),
                            (dict(z=half["z"].float()), "z must be in u's dtype"),
                            (dict(A=good["A"].bfloat16()), "A must be float32"),
                            (dict(D=good["D"].bfloat16()), "D must be float32"),
                            (dict(delta_bias=torch.randn(5, 2)[:, 0]), "delta_bias must be a contiguous"),
                            (dict(C=half["C"][:, :2]), "C must be")]:
        with pytest.raises(AssertionError, match=message):
            kernel_contract(**{**half, **change})


def test_the_fused_kernel_gets_only_cuda_tensors_in_the_dtypes_it_takes(monkeypatch):
    called = []
    recorder = lambda name: lambda *args, **kwargs: called.append(name)  # noqa: E731
    monkeypatch.setattr(zigma, "fused_selective_scan", recorder("fused"))  # mamba-ssm "installed"
    monkeypatch.setattr(zigma, "fast_scan", types.SimpleNamespace(selective_scan=recorder("fast")))
    for device_type, dtype, expected in [("cuda", torch.float32, "fused"), ("cuda", torch.bfloat16, "fused"),
                                         ("cuda", torch.float16, "fused"), ("cuda", torch.float64, "fast"),
                                         ("mps", torch.float32, "fast"), ("cpu", torch.float32, "fast")]:
        u, A, D = (torch.empty(shape, dtype=dtype, device="meta") for shape in [(1, 2, 3), (2, 4), (2,)])
        with monkeypatch.context() as patched:
            patched.setattr(torch.Tensor, "is_cuda", property(lambda self: device_type == "cuda"))
            patched.setattr(torch.Tensor, "device", property(lambda self: torch.device(device_type)))
            zigma.selective_scan(u, u, A, u, u, D, u, D)
        assert called.pop() == expected, f"a {device_type} {dtype} input should run the {expected} scan"


@pytest.mark.parametrize("scan", ["fast_scan", "reference"])
def test_compiled_on_a_cpu_the_scans_loop_over_the_tokens_stays_out_of_the_graph(monkeypatch, scan):
    # Compiling a loop over the tokens would unroll it, a step a token: the reference's loop (zigma.py on its own),
    # and fast_scan's under the CPU plan.
    if scan == "reference":
        monkeypatch.setattr(zigma, "fast_scan", None)
    torch.manual_seed(0)
    mixer, x = zigma.MambaMixer(16, d_state=4), torch.randn(2, 40, 16)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(mixer)(x)
    assert any("disable" in str(reason.reason) for reason in explanation.break_reasons), explanation.break_reasons
    compiled = torch.compile(mixer, backend="aot_eager")(x)
    assert relative_error(compiled, mixer(x)) < 1e-5, "compiled, the mixer should compute what it computes eager"


def test_a_run_that_compiles_nothing_does_not_import_dynamo():
    # torch._dynamo takes 1.5 s to import; train.py and sample.py on a CPU without --compile need none of it.
    finished = subprocess.run([sys.executable, "-c", "import sys, torch, zigma; from zigma import *; "
                               "m = ZigMa(ZigMaConfig(input_size=4, in_channels=3, dim=8, depth=1, d_state=2)); "
                               "m(torch.randn(1, 3, 4, 4), torch.rand(1)).sum().backward(); "
                               "print('torch._dynamo' in sys.modules)"], capture_output=True, text=True,
                              cwd=Path(__file__).parent)
    assert finished.stdout.strip() == "False", finished.stdout + finished.stderr[-2000:]


@pytest.mark.skipif(not (torch.cuda.is_available() and zigma.fused_selective_scan is not None),
                    reason="needs CUDA and mamba-ssm")
def test_fused_scan_equals_pure_torch_scan():
    inputs = {name: x.detach().float().cuda().requires_grad_() for name, x in scan_inputs(width=64, state=16, length=300).items()}
    y, grads = values_and_gradients(zigma.fused_selective_scan, inputs, True)
    y_ref, grads_ref = values_and_gradients(selective_scan, inputs, True)
    assert relative_error(y, y_ref) < 1e-4
    for name in grads:
        assert relative_error(grads[name], grads_ref[name]) < 1e-3, f"gradient of {name} differs"


# ---------------------------------------------------------------------------- the network

@pytest.mark.parametrize("fields, x_shape, condition", [
    (dict(), (2, 3, 8, 8), {}),
    (dict(in_channels=1, patch_size=4), (2, 1, 8, 8), {}),
    (dict(num_classes=5), (2, 3, 8, 8), dict(y=torch.tensor([0, 4]))),
    (dict(context_dim=12), (2, 3, 8, 8), dict(context=torch.randn(2, 7, 12))),
    (dict(frames=3, num_classes=2, context_dim=12), (2, 3, 3, 8, 8), dict(y=torch.tensor([1, 0]), context=torch.randn(2, 4, 12))),
    (dict(frames=2, video_pattern="v", path_family="sweep"), (2, 2, 3, 8, 8), {}),
])
def test_model_output_has_the_input_shape(fields, x_shape, condition):
    model = randomize(ZigMa(tiny_config(**fields)))
    out = model(torch.randn(x_shape), torch.rand(x_shape[0]), **condition)
    assert out.shape == x_shape and torch.isfinite(out).all()


def test_model_starts_at_zero_velocity():
    model = ZigMa(tiny_config(num_classes=3))
    out = model(torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([0, 1]))
    assert torch.equal(out, torch.zeros_like(out)), "adaLN-Zero and the zero output layer make the first output 0"


def test_labels_and_context_change_the_output():
    model = randomize(ZigMa(tiny_config(num_classes=3, context_dim=8)))
    x, t, context = torch.randn(1, 3, 8, 8), torch.rand(1), torch.randn(1, 2, 8)
    out = model(x, t, torch.tensor([0]), context)
    assert not torch.allclose(out, model(x, t, torch.tensor([1]), context)), "the label is ignored"
    assert not torch.allclose(out, model(x, t, torch.tensor([0]), context + 1)), "the context is ignored"


def video_model_and_input():
    model = randomize(ZigMa(tiny_config(frames=4, video_pattern="st", depth=2)))
    return model, torch.randn(1, 4 * 16, model.config.dim), torch.randn(1, model.config.dim)


def test_spatial_layer_does_not_mix_frames():
    model, tokens, c = video_model_and_input()
    block = model.blocks[0]
    assert block.order.axis == "space"
    changed = tokens.clone()
    changed[:, 2 * 16:3 * 16] += torch.randn(1, 16, tokens.shape[-1])  # frame 2 only
    difference = (block(changed, c) - block(tokens, c)).abs().amax(-1).view(4, 16)  # (T, H*W)
    assert (difference[[0, 1, 3]] == 0).all(), "a spatial layer let frame 2 reach another frame"
    assert (difference[2] > 0).all(), "every token of frame 2 should change"


def test_temporal_layer_mixes_only_the_same_position():
    model, tokens, c = video_model_and_input()
    block = model.blocks[1]
    assert block.order.axis == "time"
    changed = tokens.clone()
    changed[:, 1 * 16 + 5] += torch.randn(tokens.shape[-1])  # position 5 of frame 1
    difference = (block(changed, c) - block(tokens, c)).abs().amax(-1).view(4, 16)  # (T, H*W)
    others = [p for p in range(16) if p != 5]
    assert (difference[:, others] == 0).all(), "a temporal layer mixed different positions"
    # The first temporal layer reads time forwards: frame 1 reaches frames 1, 2, 3 and not frame 0.
    assert difference[0, 5] == 0 and (difference[1:, 5] > 0).all()


def test_block_works_on_its_own():
    dim, h, w = 16, 3, 5
    scan = TokenOrder((1, h, w), "space", zigzag_paths(h, w)[3])
    block = randomize(ZigMaBlock(dim, scan, d_state=4))
    tokens = torch.randn(2, h * w, dim, requires_grad=True)
    out = block(tokens, torch.randn(2, dim))
    out.sum().backward()
    assert out.shape == tokens.shape and torch.isfinite(tokens.grad).all()
    # The scan is causal along its path: the token read first depends on no other token.
    first = scan.path[0].item()
    grad_first = torch.autograd.grad(block(tokens, torch.ones(2, dim))[0, first].sum(), tokens)[0]
    assert (grad_first[0, [i for i in range(h * w) if i != first]] == 0).all()


def test_a_block_and_the_final_layer_start_as_identity_and_zero_on_their_own():
    # adaLN-Zero lives in each module's __init__, not in the model's: a block built alone is the identity.
    torch.manual_seed(0)
    order = TokenOrder((1, 3, 5), "space", zigzag_paths(3, 5)[0])
    block, final = ZigMaBlock(16, order, d_state=4, context_dim=8), zigma.FinalLayer(16, 2, 3)
    tokens, c = torch.randn(2, 15, 16), torch.randn(2, 16)
    assert torch.equal(block(tokens, c, torch.randn(2, 4, 8)), tokens)
    assert not final(tokens, c).any()


def test_python_zigma_py_demonstrates_the_file():
    # 17 s on 2 cores (README); the limit here only stops a hang.
    finished = subprocess.run([sys.executable, "zigma.py"], capture_output=True, text=True, cwd=Path(__file__).parent,
                              timeout=600)
    assert finished.returncode == 0, finished.stderr[-2000:]
    out = finished.stdout
    assert " 0  1  2  3    0  7  8 15   12 13 14 15" in out, "the zigzag paths, as section 1 of zigma.py draws them"
    covered = [int(n) for n in re.findall(r"K = \d: the paths read (\d+) of the 960", out)]
    assert covered[0] == 255 and covered[0] < covered[1] < covered[2] == 960, out
    error, noise = map(float, re.search(r"error of ([0-9.]+) from the image .* was ([0-9.]+) away", out).groups())
    assert error < noise / 10, f"the overfitted model should sample its image back: {out}"


def test_the_paths_drawn_in_zigma_py_are_the_paths_it_builds():
    lines = (Path(__file__).parent / "zigma.py").read_text().splitlines()
    top = lines.index("#     0: rows, top-left      1: columns, top-left   2: rows, bottom-right  3: columns, bottom-right")
    drawn = torch.tensor([[int(n) for n in line[1:].split()] for line in lines[top + 1:top + 5]])  # (4, 16): 4 grids a row
    drawn = rearrange(drawn, "row (path column) -> path (row column)", path=4)  # (4, 16): when each token is read
    assert torch.equal(drawn, zigzag_paths(4, 4)[:4].argsort(dim=1)), drawn


def test_no_line_of_zigma_py_is_over_110_characters():
    long = [i + 1 for i, line in enumerate((Path(__file__).parent / "zigma.py").read_text().splitlines()) if len(line) > 110]
    assert not long, f"zigma.py lines over 110 characters: {long}"


def expected_parameters(dim, depth, patch, channels, tokens, d_state=16, expand=2, frequency_dim=256):
    """Parameter count of a ZigMa from its definition, counted by hand."""
    inner, rank = expand * dim, math.ceil(dim / 16)
    mixer = (dim * 2 * inner  # in_proj
             + inner * 4 + inner  # depthwise conv, kernel 4
             + inner * (rank + 2 * d_state)  # x_proj
             + rank * inner + inner  # dt_proj
             + inner * d_state + inner  # A_log, D
             + inner * dim)  # out_proj
    block = mixer + dim * 3 * dim + 3 * dim  # adaLN: shift, scale, gate
    embeddings = (channels * patch * patch * dim + dim  # patch embedding
                  + frequency_dim * dim + dim + dim * dim + dim  # timestep MLP
                  + tokens * dim)  # learned positions
    final = dim * 2 * dim + 2 * dim + dim * patch * patch * channels + patch * patch * channels
    return embeddings + depth * block + final


@pytest.mark.parametrize("name", sorted(zigma.PRESETS))
def test_preset_parameter_counts(name):
    with torch.device("meta"):
        model = ZigMa(zigma.preset_config(name, input_size=32, in_channels=4))
    preset = zigma.PRESETS[name]
    tokens = (32 // preset["patch_size"]) ** 2
    expected = expected_parameters(preset["dim"], preset["depth"], preset["patch_size"], 4, tokens)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_presets_are_sized_like_dit():
    # DiT-S/2, B/2, L/2, XL/2 have 33M, 130M, 458M and 675M parameters; ZigMa's presets land within 15%.
    for size, dit in [("S", 33e6), ("B", 130e6), ("L", 458e6), ("XL", 675e6)]:
        with torch.device("meta"):
            model = ZigMa(zigma.preset_config(f"ZigMa-{size}/2", input_size=32, in_channels=4))
        count = sum(p.numel() for p in model.parameters())
        assert abs(count / dit - 1) < 0.15, f"ZigMa-{size}/2 has {count / 1e6:.0f}M parameters"


# ---------------------------------------------------------------------------- flow matching

class TrueVelocity(torch.nn.Module):
    """The exact velocity field when the data is one image: v = (data - x_t) / (1 - t)."""

    def __init__(self, data):
        super().__init__()
        self.data = data

    def forward(self, x, t, y=None, context=None, context_mask=None, drop=None):
        return (self.data - x) / (1 - t.view(-1, 1, 1, 1))


def test_flow_loss_follows_the_time_convention():
    torch.manual_seed(0)
    data = torch.randn(1, 3, 8, 8).expand(64, -1, -1, -1)
    assert flow_loss(TrueVelocity(data[:1]), data) < 1e-8, "x_t = (1 - t) noise + t data, v = data - noise"
    reversed_time = lambda x, t, *_: TrueVelocity(data[:1])(x, 1 - t)  # noqa: E731
    assert flow_loss(reversed_time, data) > 0.1


def test_sampler_integrates_from_noise_at_0_to_data_at_1():
    data = torch.randn(1, 3, 8, 8)
    out = sample(TrueVelocity(data), torch.randn(4, 3, 8, 8), steps=10)
    assert torch.allclose(out, data.expand(4, -1, -1, -1), rtol=1e-5, atol=1e-5), "the exact field must land on the data"


def test_heun_is_more_accurate_than_euler():
    decay = lambda x, t: -x  # noqa: E731  dx/dt = -x, solved by x(1) = x(0) / e
    noise = torch.randn(2, 3, 4, 4)
    exact = noise / math.e
    euler_error = (sample(decay, noise, steps=8) - exact).abs().max()
    heun_error = (sample(decay, noise, steps=8, method="heun") - exact).abs().max()
    assert heun_error < euler_error / 5, f"Heun {heun_error:.2e} vs Euler {euler_error:.2e}"


def test_sampler_returns_finite_samples_of_the_right_shape():
    model = randomize(ZigMa(tiny_config(num_classes=2)))
    noise = torch.randn(3, 3, 8, 8)
    out = sample(model, noise, steps=4, y=torch.tensor([0, 1, 1]), cfg_scale=4.0, method="heun")
    assert out.shape == noise.shape and torch.isfinite(out).all()


def test_guidance_at_scale_one_equals_conditional_sampling():
    model = randomize(ZigMa(tiny_config(num_classes=3, context_dim=8)))
    noise, y, context = torch.randn(2, 3, 8, 8), torch.tensor([2, 0]), torch.randn(2, 5, 8)
    guided = sample(model, noise, steps=3, y=y, context=context, cfg_scale=1.0)
    conditional = sample(lambda x, t: model(x, t, y, context), noise, steps=3)
    assert torch.equal(guided, conditional), "at scale 1, guidance is the conditional pass alone"


def test_guidance_extrapolates_from_the_null_condition():
    # float64: the guided pass runs conditional and null halves as one batch of 4, these as batches of 2.
    model = randomize(ZigMa(tiny_config(num_classes=3))).double()
    x, t, y = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.rand(2, dtype=torch.float64), torch.tensor([1, 2])
    v_cond, v_null = model(x, t, y), model(x, t, torch.tensor([3, 3]))  # 3 = the null label
    guided = guided_velocity(model, x, t, y, cfg_scale=4.0)
    assert relative_error(guided, v_null + 4 * (v_cond - v_null)) < 1e-12


class Recorder(torch.nn.Module):
    """Wraps a model and records the labels, and which were dropped (None: none), that it is called with."""

    def __init__(self, model):
        super().__init__()
        self.model, self.labels, self.drops = model, [], []

    def forward(self, x, t, y=None, context=None, context_mask=None, drop=None):
        self.labels.append(y)
        self.drops.append(drop)
        return self.model(x, t, y, context, context_mask, drop)


def test_guidance_at_scale_one_runs_one_pass():
    recorder = Recorder(ZigMa(tiny_config(num_classes=3)))
    y = torch.tensor([0, 2, 1])
    sample(recorder, torch.randn(3, 3, 8, 8), steps=2, y=y, cfg_scale=1.0)
    assert len(recorder.labels) == 2, "one model call per Euler step"
    assert all(torch.equal(labels, y) for labels in recorder.labels), "the conditional pass alone, no null half"
    assert recorder.drops == [None, None], "nothing dropped"


def test_flow_loss_draws_t_uniformly_and_train_py_logit_normal_where_asked():
    # Uniform t puts 10% of the times below 0.1; logit-normal, sigmoid of N(0, 1), puts 1.4% there (a < -2.2).
    times = []
    velocity = lambda x_t, t, *conditions: times.append(t) or torch.zeros_like(x_t)  # noqa: E731
    torch.manual_seed(0)
    flow_loss(velocity, torch.zeros(20000, 1, 1, 1))  # flow_loss's own draw
    times += [plumbing.draw_times(20000, time_sampling, torch.device("cpu")) for time_sampling in plumbing.TIME_SAMPLING]
    below = [(t < 0.1).float().mean().item() for t in times]
    assert plumbing.TIME_SAMPLING == ("uniform", "logit-normal")
    assert abs(below[0] - 0.1) < 0.01 and abs(below[1] - 0.1) < 0.01 and abs(below[2] - 0.014) < 0.005, below


@pytest.mark.parametrize("options, drawn", [([], "logit-normal"), (["--time-sampling", "uniform"], "uniform")])
def test_train_py_draws_t_as_time_sampling_says(tmp_path, monkeypatch, options, drawn):
    asked = []
    draw = plumbing.draw_times
    monkeypatch.setattr(train, "draw_times", lambda *args: asked.append(args[1]) or draw(*args))
    train.main(["--out", str(tmp_path / "out"), "--steps", "2", *TINY_RUN, *options])
    assert asked == [drawn, drawn], asked


def test_labels_are_dropped_in_training_and_not_in_sampling():
    recorder = Recorder(ZigMa(tiny_config(num_classes=3)))
    y = torch.randint(0, 3, (2000,))
    torch.manual_seed(0)
    flow_loss(recorder, torch.randn(2000, 3, 2, 2).repeat(1, 1, 4, 4), y, drop_prob=0.25)
    dropped = recorder.drops[-1].float().mean().item()
    assert abs(dropped - 0.25) < 0.04, f"{dropped:.2f} of the labels were dropped, expected 0.25"
    sample(recorder, torch.randn(4, 3, 8, 8), steps=2, y=y[:4], cfg_scale=2.0)
    for labels, drop in zip(recorder.labels[1:], recorder.drops[1:]):
        assert torch.equal(labels, y[:4].repeat(2)), "both halves carry the labels asked for"
        assert drop.tolist() == [False] * 4 + [True] * 4, "the conditional half keeps them, the other half is null"


def test_dropped_conditions_become_the_null_ones():
    model = randomize(ZigMa(tiny_config(num_classes=3, context_dim=8)))
    y, context = torch.tensor([0, 1, 2, 1]), torch.randn(4, 5, 8)
    mask = torch.tensor([[True] * 5, [True] * 2 + [False] * 3, [True] * 3 + [False] * 2, [True] * 5])
    drop = torch.tensor([False, True, False, True])
    y_seen, context_seen, mask_seen = model.conditions(4, y, context, mask, drop)
    assert y_seen.tolist() == [0, 3, 2, 3], "a dropped label becomes the null label, class num_classes"
    assert torch.equal(context_seen[[0, 2]], context[[0, 2]]) and torch.equal(mask_seen[[0, 2]], mask[[0, 2]])
    assert torch.equal(context_seen[[1, 3]], model.null_context.expand(2, 5, 8)), "a dropped caption becomes the null context"
    assert mask_seen[[1, 3]].all(), "a dropped caption's padding must not hide the null context"
    y_null, context_null, mask_null = model.conditions(2)
    assert y_null.tolist() == [3, 3] and torch.equal(context_null, model.null_context.expand(2, 1, 8)) and mask_null is None
    # The null context needs no mask: attending to S copies of its token is attending to one.
    x, t = torch.randn(1, 3, 8, 8), torch.rand(1)
    v_short = model(x, t, torch.tensor([1]), model.null_context.expand(1, 1, 8))
    v_long = model(x, t, torch.tensor([1]), model.null_context.expand(1, 7, 8))
    assert relative_error(v_long, v_short) < 1e-5, "float32 sums over 1 and 7 keys differ by about 1e-7"


def test_the_label_steers_the_velocity_within_a_few_steps():
    # A property of the conditioning path: on images that only the label decides (class 0 light, class 1 dark),
    # 60 Adam steps at train.py's learning rate make the label move the predicted velocity, and the right way.
    # With DiT's N(0, 0.02) label table the label stays ~1% of the condition vector, and this moves 0.5%.
    torch.manual_seed(0)
    model = ZigMa(tiny_config(dim=64, depth=2, num_classes=2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    for _ in range(60):
        y = torch.randint(0, 2, (16,))
        loss = flow_loss(model, (0.5 - y.float()).view(-1, 1, 1, 1).expand(16, 3, 8, 8), y, drop_prob=0.1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        x_t, t = torch.randn(8, 3, 8, 8), torch.rand(8)
        v_light, v_dark = model(x_t, t, torch.zeros(8, dtype=torch.long)), model(x_t, t, torch.ones(8, dtype=torch.long))
    assert (v_light - v_dark).norm() > 0.2 * v_light.norm(), "the label hardly changes the velocity"
    assert (v_light - v_dark).mean() > 0.1, "the light class's velocity must point to lighter images"


def test_training_step_under_bfloat16_autocast(device):
    # As train.py runs on CUDA: the linear layers in bfloat16, the selective scan in float32 inside.
    model = randomize(ZigMa(tiny_config(context_dim=8))).to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 8, 8, device=device), torch.rand(2, device=device),
                    context=torch.randn(2, 3, 8, device=device))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    out.float().square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is None or (p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()), name


def test_a_bfloat16_model_trains_and_samples(device):
    # model.to(torch.bfloat16), no autocast: every weight and activation bf16, the scan's state float32 inside.
    torch.manual_seed(0)
    model = randomize(ZigMa(tiny_config(num_classes=2, context_dim=8))).to(device, torch.bfloat16)
    x, y = torch.randn(2, 3, 8, 8, device=device, dtype=torch.bfloat16), torch.tensor([0, 1], device=device)
    context = torch.randn(2, 3, 8, device=device, dtype=torch.bfloat16)
    flow_loss(model, x, y, context).backward()
    for name, p in model.named_parameters():
        assert p.grad is None or (p.grad.dtype == torch.bfloat16 and torch.isfinite(p.grad).all()), name
    assert model.blocks[0].mixer.in_proj.weight.grad.abs().sum() > 0, "no gradient reached the Mamba layers"
    samples = sample(model, torch.randn_like(x), steps=2, y=y, context=context, cfg_scale=3.0)
    assert samples.dtype == torch.bfloat16 and torch.isfinite(samples).all()


def test_gradient_checkpointing_changes_no_gradient(device):
    torch.manual_seed(0)
    model = randomize(ZigMa(tiny_config(num_classes=2, context_dim=8))).to(device, torch.float64)
    x, t = torch.randn(2, 3, 8, 8, dtype=torch.float64, device=device), torch.rand(2, dtype=torch.float64, device=device)
    y, context = torch.tensor([0, 1], device=device), torch.randn(2, 3, 8, dtype=torch.float64, device=device)
    gradients = []
    for checkpointing in (False, True):
        model.grad_checkpointing = checkpointing
        model.zero_grad()
        model(x, t, y, context).square().sum().backward()
        gradients.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
    assert gradients[0].keys() == gradients[1].keys()
    for name in gradients[0]:
        assert relative_error(gradients[1][name], gradients[0][name]) < 1e-12, f"gradient of {name} differs"


def test_compiled_model_gives_eager_loss_and_gradients(device):
    # aot_eager traces forward and backward as inductor does, without its minutes of code generation on a CPU.
    torch.manual_seed(0)
    model = randomize(ZigMa(tiny_config(num_classes=2, depth=2)), scale=0.1).to(device)
    x, y = torch.randn(2, 3, 8, 8, device=device), torch.tensor([0, 1], device=device)
    noise, t = torch.randn_like(x), torch.rand(2, device=device)
    results = []
    for network in (model, torch.compile(model, backend="aot_eager")):
        model.zero_grad()
        loss = flow_loss(network, x, y, noise=noise, t=t, drop_prob=0.0)
        loss.backward()
        results.append((loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}))
    (loss, grads), (compiled_loss, compiled_grads) = results
    assert relative_error(compiled_loss, loss) < 1e-5, f"compiled loss {compiled_loss:.6f}, eager {loss:.6f}"
    assert grads.keys() == compiled_grads.keys()
    for name in grads:
        assert relative_error(compiled_grads[name], grads[name]) < 1e-4, f"compiled gradient of {name} differs"


def test_selective_scan_compiles_whole_under_the_gpu_plan(monkeypatch):
    # On a GPU, compiling is what fuses the scan's few hundred operations: it must trace with no graph break.
    use_scan_plan(monkeypatch, "cuda")
    inputs = scan_inputs(length=40)
    explanation = torch._dynamo.explain(selective_scan)(**inputs, delta_softplus=True)
    assert explanation.graph_break_count == 0, f"graph breaks: {[str(r.reason) for r in explanation.break_reasons]}"
    torch._dynamo.reset()
    y, grads = values_and_gradients(torch.compile(selective_scan, backend="aot_eager", fullgraph=True), inputs, True)
    y_ref, grads_ref = values_and_gradients(selective_scan_reference, inputs, True)
    assert relative_error(y, y_ref) < 1e-12, "compiled values differ from the reference"
    for name in grads:
        assert relative_error(grads[name], grads_ref[name]) < 1e-12, f"compiled gradient of {name} differs"


def test_model_overfits_one_batch():
    torch.manual_seed(0)
    model = ZigMa(tiny_config(dim=64, depth=2, d_state=8))
    x = torch.randn(4, 3, 8, 8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    # Fixed noise and times, so that the loss can go to zero on this batch.
    noise, t = torch.randn_like(x), torch.rand(4)
    x_t = (1 - t.view(-1, 1, 1, 1)) * noise + t.view(-1, 1, 1, 1) * x
    losses = []
    for _ in range(200):
        loss = torch.nn.functional.mse_loss(model(x_t, t), x - noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.05 * losses[0], f"loss went from {losses[0]:.3f} to {losses[-1]:.3f}"


# ---------------------------------------------------------------------------- train.py and sample.py

import contextlib  # noqa: E402
import errno  # noqa: E402
import fcntl  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import importlib.util  # noqa: E402
import io  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

import plumbing  # noqa: E402
import sample as sample_script  # noqa: E402
import train  # noqa: E402
from data import UserError  # noqa: E402

TINY_RUN = ["--model", "ZigMa-Tiny/2", "--image-size", "8", "--batch-size", "4", "--workers", "0",
            "--sample-steps", "2", "--sample-every", "2", "--ckpt-every", "2", "--log-every", "1"]


def make_image_folder(folder: Path) -> Path:
    """A few small images in the formats and modes train.py must read, in nested folders, plus non-images."""
    rng = torch.Generator().manual_seed(0)
    pixels = lambda: (torch.rand(12, 10, 3, generator=rng) * 255).byte().numpy()  # noqa: E731
    (folder / "a" / "b").mkdir(parents=True)
    Image.fromarray(pixels()).save(folder / "rgb.png")
    Image.fromarray(pixels()).convert("L").save(folder / "a" / "gray.jpg")
    Image.fromarray(pixels()).convert("RGBA").save(folder / "a" / "alpha.webp")
    Image.fromarray(pixels()).convert("CMYK").save(folder / "a" / "b" / "cmyk.JPEG")
    Image.fromarray(pixels()).convert("P").save(folder / "a" / "b" / "palette.bmp")
    frames = [Image.fromarray(pixels()).convert("P") for _ in range(3)]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:])
    (folder / "notes.txt").write_text("not an image")
    return folder


def run_script(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, script, *args], capture_output=True, text=True, cwd=Path(__file__).parent)


def test_image_folder_reads_every_format_as_rgb(tmp_path):
    dataset = data.ImageFolder(make_image_folder(tmp_path / "data"), image_size=8)
    assert len(dataset) == 6
    for i in range(len(dataset)):
        image = dataset[i]["x"]
        assert image.shape == (3, 8, 8) and image.min() >= -1 and image.max() <= 1


def test_unreadable_images_are_skipped_with_a_one_line_warning(tmp_path, capsys):
    folder = make_image_folder(tmp_path / "data")
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    dataset = data.ImageFolder(folder, image_size=8)
    assert len(dataset) == 6
    assert capsys.readouterr().err == f"warning: skipping {folder / 'broken.png'}: not a readable image\n"


def test_smiley_faces_are_deterministic_images():
    faces = data.SmileyFaces(image_size=16)
    face = faces[3]["x"]
    assert face.shape == (3, 16, 16) and torch.equal(face, faces[3]["x"])
    assert not torch.equal(face, faces[5]["x"]) and face.min() >= -1 and face.max() <= 1


def test_train_resume_and_sample_end_to_end(tmp_path):
    folder, out = make_image_folder(tmp_path / "data"), tmp_path / "out"
    train.main(["--data", str(folder), "--out", str(out), "--steps", "2", *TINY_RUN])
    first = data.load_checkpoint(out / "ckpt.pt")
    assert first["step"] == 2 and first["args"]["data"] == str(folder)
    train.main(["--data", str(folder), "--out", str(out), "--steps", "4", *TINY_RUN])  # resumes
    second = data.load_checkpoint(out / "ckpt.pt")
    assert second["step"] == 4
    assert not torch.equal(first["ema"]["zigma.final_layer.linear.weight"], second["ema"]["zigma.final_layer.linear.weight"])
    assert second["optimizer"]["state"][0]["step"] == 4, "the optimizer state must carry over"
    assert (out / "samples_0000002.png").exists() and (out / "samples_0000004.png").exists()
    assert len((out / "log.jsonl").read_text().splitlines()) >= 1
    sample_script.main(["--ckpt", str(out / "ckpt.pt"), "--n", "3", "--steps", "2", "--batch-size", "2",
                        "--grid", str(tmp_path / "grid.png"), "--out-dir", str(tmp_path / "each")])
    assert Image.open(tmp_path / "grid.png").size[0] > 8
    assert sorted(p.name for p in (tmp_path / "each").iterdir()) == ["000000.png", "000001.png", "000002.png"]
    assert Image.open(tmp_path / "each" / "000002.png").size == (8, 8)


def test_sampling_is_reproducible_with_a_seed(tmp_path):
    out = tmp_path / "out"
    train.main(["--out", str(out), "--steps", "1", *TINY_RUN])
    grids = []
    for name in ("a.png", "b.png"):
        sample_script.main(["--ckpt", str(out / "ckpt.pt"), "--n", "2", "--steps", "2", "--seed", "7", "--grid", str(tmp_path / name)])
        grids.append((tmp_path / name).read_bytes())
    assert grids[0] == grids[1]


@pytest.mark.parametrize("files, message", [
    (None, "does not exist"),
    ("a file", "is not a folder"),
    ({}, "holds no images"),
    ({"x.jpg": "not a jpeg", "y.txt": "text"}, "could be read"),
])
def test_bad_data_folder_is_a_clear_error(tmp_path, files, message):
    folder = tmp_path / "data"
    if files == "a file":
        folder.write_text("not a folder")
    elif files is not None:
        folder.mkdir()
        for name, text in files.items():
            (folder / name).write_text(text)
    with pytest.raises(UserError, match=message):
        train.main(["--data", str(folder), "--out", str(tmp_path / "out"), *TINY_RUN])
    assert not (tmp_path / "out").exists(), "a refused run leaves no folder behind"
    (tmp_path / "earlier").mkdir()  # a folder the user made: it stays, without a lock file
    with pytest.raises(UserError, match=message):
        train.main(["--data", str(folder), "--out", str(tmp_path / "earlier"), *TINY_RUN])
    assert (tmp_path / "earlier").is_dir()


@pytest.mark.parametrize("options, model", [
    ([], "ZigMa-Tiny/4"),  # 32 px: 8 x 8 tokens
    (["--image-size", "16"], "ZigMa-Tiny/2"),  # 8 x 8
    (["--image-size", "64"], "ZigMa-Tiny/8"),  # 8 x 8
    (["--image-size", "48"], "ZigMa-Tiny/4"),  # 12 x 12: patch 8 does not divide 48
    (["--image-size", "8"], "ZigMa-Tiny/2"),  # 4 x 4: no patch leaves 8 x 8
    (["--image-size", "64", "--model", "ZigMa-S/2"], "ZigMa-S/2"),  # asked for
])
def test_the_default_model_leaves_a_grid_of_8_by_8_tokens_where_it_can(options, model):
    # With --vae, train.py picks it once the VAE's factor is known (test_the_default_model_for_latents_...).
    assert train.parse_args(options).model == model


@pytest.mark.parametrize("options, lr", [([], 1e-3), (["--model", "ZigMa-S/2"], 1e-4), (["--model", "ZigMa-S/2", "--lr", "3e-4"], 3e-4)])
def test_the_default_learning_rate_is_the_tiny_models_or_the_official_one(options, lr):
    assert train.parse_args(options).lr == lr


@pytest.mark.parametrize("options, decay", [([], 0.999), (["--model", "ZigMa-B/2"], 0.9999), (["--ema-decay", "0.99"], 0.99)])
def test_the_default_ema_decay_is_the_tiny_models_or_dits(options, decay):
    assert train.parse_args(options).ema_decay == decay


def test_image_size_must_be_a_multiple_of_the_patch(tmp_path):
    with pytest.raises(UserError, match="not a multiple"):
        train.main(["--out", str(tmp_path), "--model", "ZigMa-Tiny/4", "--image-size", "10"])


def test_bad_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(UserError, match="no checkpoint"):
        sample_script.main(["--ckpt", str(tmp_path / "missing.pt")])
    (tmp_path / "corrupt.pt").write_bytes(b"garbage")
    with pytest.raises(UserError, match="not a readable checkpoint"):
        sample_script.main(["--ckpt", str(tmp_path / "corrupt.pt")])
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(UserError, match=r"not a ZigMa checkpoint .*\(it lacks conditioning, config, ema, model, step\)"):
        sample_script.main(["--ckpt", str(tmp_path / "other.pt")])
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(UserError, match=r"not a ZigMa checkpoint .*\(it holds a list, not a dict\)"):
        sample_script.main(["--ckpt", str(tmp_path / "list.pt")])
    train.main(["--out", str(tmp_path / "run"), "--steps", "1", *TINY_RUN])
    checkpoint = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    checkpoint["config"]["dim"] = 64  # weights of one width, config of another
    torch.save(checkpoint, tmp_path / "mismatch.pt")
    with pytest.raises(UserError, match="does not match"):
        sample_script.main(["--ckpt", str(tmp_path / "mismatch.pt")])


def test_user_errors_exit_with_one_line_and_no_traceback(tmp_path):
    (tmp_path / "corrupt.pt").write_bytes(b"garbage")
    for result in (run_script("train.py", "--data", str(tmp_path / "missing")),
                   run_script("train.py", "--scan-paths", "3"),
                   run_script("sample.py", "--ckpt", str(tmp_path / "corrupt.pt"))):
        assert result.returncode != 0
        assert "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.parametrize("options, message", [
    (["--batch-size", "0"], "--batch-size must be 1 or more, not 0"),
    (["--steps", "0"], "--steps must be 1 or more, not 0"),
    (["--steps", "-5"], "--steps must be 1 or more, not -5"),
    (["--image-size", "0"], "--image-size must be 1 or more"),
    (["--image-size", "-8"], "--image-size must be 1 or more"),
    (["--lr", "0"], "--lr must be positive, not 0.0"),
    (["--lr=-1e-4"], "--lr must be positive"),
    (["--lr", "nan"], "--lr must be a finite number, not nan"),
    (["--lr", "inf"], "--lr must be a finite number, not inf"),
    (["--weight-decay", "nan"], "--weight-decay must be a finite number, not nan"),
    (["--class-cond", "--sample-cfg", "nan"], "--sample-cfg must be a finite number, not nan"),
    (["--grad-clip", "inf"], "--grad-clip must be a finite number, not inf"),
    (["--image-size", "10000000"], "--image-size must be 8192 or less, not 10000000"),
    (["--sample-steps", str(10 ** 11)], "--sample-steps must be 10000 or less, not 100000000000"),
    (["--captions", "--cond-drop", "1.5"], "--cond-drop must be between 0 and 1"),
    (["--class-cond", "--cond-drop", "-0.1"], "--cond-drop must be between 0 and 1"),
    (["--cond-drop", "0.2"], "--cond-drop applies to --class-cond and --captions: add one, or leave it out"),
    (["--sample-cfg", "2"], "--sample-cfg applies to --class-cond and --captions"),
    (["--sample-every", "0", "--sample-steps", "20"], "--sample-steps applies to the sample grids, which --sample-every 0 turns off"),
    (["--grad-clip", "-1"], "--grad-clip must be 0 or more"),
    (["--ckpt", "5"], "unrecognized arguments: --ckpt 5"),  # not an abbreviation of --ckpt-every
    (["--weight-decay", "-1"], "--weight-decay must be 0 or more"),
    (["--scan-paths", "3"], "invalid choice: 3"),
    (["--video-scan", "st"], "--video-pattern applies to clips only: add --frames"),
    (["--frame-stride", "2"], "--frame-stride applies to clips only: add --frames"),
    (["--frames", "4", "--frame-stride", "2"], "--frame-stride applies to --data: the built-in clips are drawn"),
    (["--text-encoder", "bert"], "--text-encoder applies to captions only: add --captions"),
    (["--no-flip"], "--no-flip applies to --data: the built-in data is drawn afresh, never flipped"),
    (["--flip"], "--flip applies to --data"),
    (["--device", "gpu"], "gpu is not a device name; use cuda, mps or cpu"),
    (["--class-cond", "--sample-cfg", "-1"], "--sample-cfg must be 0 or more"),
])
def test_bad_training_options_are_one_sentence_before_any_work(tmp_path, options, message):
    with pytest.raises(UserError, match=re.escape(message)):
        train.main(["--out", str(tmp_path / "out"), *options])
    assert not (tmp_path / "out").exists(), "nothing is written for a refused command"


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A 1-step run on the built-in faces with classes; tests copy it before they resume it."""
    out = tmp_path_factory.mktemp("trained") / "out"
    train.main(["--out", str(out), "--class-cond", "--steps", "1", *TINY_RUN])
    return out


@pytest.mark.parametrize("options, message", [
    (["--model", "ZigMa-Tiny/4"], "was trained with --model ZigMa-Tiny/2, but this run has --model ZigMa-Tiny/4"),
    (["--paths", "sweep"], "was trained with --path-family zigzag, but this run has --path-family sweep"),
    (["--image-size", "16"], "was trained with --image-size 8, but this run has --image-size 16"),
    (["--no-class-cond"], "was trained with --class-cond, but this run has no --class-cond"),
])
def test_resuming_with_another_model_names_the_option(tmp_path, trained_run, options, message):
    out = tmp_path / "out"
    shutil.copytree(trained_run, out)
    arguments = ["--out", str(out), "--steps", "2", *TINY_RUN, "--class-cond"]
    if options == ["--no-class-cond"]:
        arguments.remove("--class-cond")
    else:
        arguments += options
    with pytest.raises(UserError, match=re.escape(message)):
        train.main(arguments)


def test_resuming_at_another_image_size_names_it_not_the_default_model_it_implies(tmp_path):
    # Without --model, the preset follows the image size: the option the user changed is the one to name.
    out, without_model = tmp_path / "out", TINY_RUN[2:]
    train.main(["--out", str(out), "--steps", "1", *without_model, "--image-size", "16"])  # ZigMa-Tiny/2: 8 x 8 tokens
    with pytest.raises(UserError, match="was trained with --image-size 16, but this run has --image-size 32"):
        train.main(["--out", str(out), "--steps", "2", *without_model, "--image-size", "32"])  # would be ZigMa-Tiny/4


def test_a_checkpoint_that_names_the_path_family_paths_resumes(tmp_path, trained_run):
    # Checkpoints written before the field was path_family call it paths, in the config and the arguments.
    out = tmp_path / "out"
    shutil.copytree(trained_run, out)
    checkpoint = torch.load(out / "ckpt.pt", weights_only=False)
    for saved in (checkpoint["config"], checkpoint["args"]):
        saved["paths"] = saved.pop("path_family")
    torch.save(checkpoint, out / "ckpt.pt")
    train.main(["--out", str(out), "--steps", "2", *TINY_RUN, "--class-cond"])
    resumed = torch.load(out / "ckpt.pt", weights_only=False)
    assert resumed["step"] == 2 and resumed["config"]["path_family"] == "zigzag"
    with pytest.raises(UserError, match="was trained with --path-family zigzag, but this run has --path-family sweep"):
        train.main(["--out", str(out), "--steps", "3", *TINY_RUN, "--class-cond", "--paths", "sweep"])


def test_resuming_with_a_new_learning_rate_uses_it_and_says_so(tmp_path, trained_run, capsys):
    out, folder = tmp_path / "out", make_class_folder(tmp_path / "data")
    shutil.copytree(trained_run, out)
    train.main(["--out", str(out), "--steps", "2", *TINY_RUN, "--class-cond", "--lr", "0.0003", "--warmup", "0",
                "--weight-decay", "0.1", "--seed", "3"])
    printed = capsys.readouterr().out
    assert "resuming with --lr 0.0003 (the checkpoint was trained with --lr 0.001)" in printed
    assert "resuming with --seed 3 (the checkpoint was trained with --seed 0)" in printed
    assert "resuming with --weight-decay 0.1 (the checkpoint was trained with --weight-decay 0.0)" in printed
    checkpoint = data.load_checkpoint(out / "ckpt.pt")
    assert [group["lr"] for group in checkpoint["optimizer"]["param_groups"]] == [0.0003, 0.0003]  # no warm-up left
    assert [group["weight_decay"] for group in checkpoint["optimizer"]["param_groups"]] == [0.1, 0.0]
    assert checkpoint["args"]["lr"] == 0.0003 and checkpoint["step"] == 2
    with pytest.raises(UserError, match="trained on the classes smiling, frowning, but --data has cats, dogs"):
        train.main(["--out", str(out), "--steps", "3", *TINY_RUN, "--class-cond", "--data", str(folder)])
    assert "resuming" not in capsys.readouterr().out, "a refused resume does not say it resumes"


def test_resuming_on_other_data_says_so(tmp_path, capsys):
    first, second, out = make_image_folder(tmp_path / "a"), make_image_folder(tmp_path / "b"), tmp_path / "out"
    train.main(["--data", str(first), "--out", str(out), "--steps", "1", *TINY_RUN])
    train.main(["--data", str(second), "--out", str(out), "--steps", "2", *TINY_RUN])
    assert f"resuming with --data {second} (the checkpoint was trained with --data {first})" in capsys.readouterr().out


def test_weight_decay_applies_to_weight_matrices_only():
    vocabulary = data.CaptionEncoder.build_vocabulary(["a red ball"])
    networks = data.build_networks(tiny_config(num_classes=2, context_dim=32), {"vocabulary": vocabulary})
    groups = train.parameter_groups(networks, weight_decay=0.5)
    name = {id(p): n for n, p in networks.named_parameters()}
    decayed = {name[id(p)] for p in groups[0]["params"]}
    assert sorted(map(id, groups[0]["params"] + groups[1]["params"])) == sorted(map(id, networks.parameters())), \
        "every parameter is in exactly one group"
    for must in ("zigma.blocks.0.mixer.in_proj.weight", "zigma.blocks.0.mixer.conv1d.weight", "zigma.patch_embed.weight",
                 "zigma.blocks.0.cross_attention.to_kv.weight", "text.transformer.layers.0.self_attn.in_proj_weight"):
        assert must in decayed, f"{must} is a weight matrix: it should decay"
    for never in ("zigma.blocks.0.mixer.A_log", "zigma.blocks.0.mixer.D", "zigma.blocks.0.mixer.dt_proj.bias",
                  "zigma.pos_embed", "zigma.y_embedder.weight", "zigma.null_context", "text.embed.weight", "text.position"):
        assert never not in decayed, f"{never} must not decay"
    # One AdamW step with zero gradients: only the decayed parameters move, by the factor 1 - lr * weight_decay.
    before = {n: p.detach().clone() for n, p in networks.named_parameters()}
    for p in networks.parameters():
        p.grad = torch.zeros_like(p)
    torch.optim.AdamW(groups, lr=0.1).step()
    for n, p in networks.named_parameters():
        expected = before[n] * (1 - 0.1 * 0.5) if n in decayed else before[n]
        assert torch.allclose(p, expected, rtol=1e-6, atol=0), f"{n} moved wrongly"


@pytest.mark.parametrize("most, cores, busy_elsewhere, threads", [
    (2, 2, 0.0, 2), (2, 2, 0.3, 2), (2, 2, 1.0, 1), (2, 2, 2.0, 1), (16, 16, 1.0, 15), (4, 16, 0.0, 4), (16, 16, 3.8, 12)])
def test_spare_threads_leave_busy_cores_alone(most, cores, busy_elsewhere, threads):
    assert data.spare_threads(most, cores, busy_elsewhere) == threads


def test_cpu_threads_follow_the_load_of_other_processes(monkeypatch):
    threads = [2]
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads[-1])
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    readings = iter([(0, 0, 0), (150, 200, 50), (300, 400, 150), (300, 400, 150)])  # (busy, all, ours) ticks
    monkeypatch.setattr(data.CPUThreads, "ticks", lambda self: next(readings))
    counter = data.CPUThreads(every=0)
    counter.cores = [0, 1]
    counter.update()  # 100 of 200 ticks went to another process: one core's worth
    assert threads[-1] == 1
    counter.update()  # all 150 busy ticks were ours
    assert threads[-1] == 2
    counter.update()  # no ticks passed: nothing to judge by
    assert threads == [2, 1, 2]


def test_sixteen_bit_and_transparent_images_are_read_correctly(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    Image.fromarray(np.full((8, 8), 32896, dtype=np.uint16)).save(folder / "grey16.png")  # 32896 / 65535: mid-grey
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(folder / "clear.png")  # fully transparent red
    Image.new("LA", (8, 8), (0, 128)).save(folder / "half.png")  # black at half opacity
    dataset = data.ImageFolder(folder, image_size=8)
    images = {p.name: dataset[i]["x"] * 0.5 + 0.5 for i, p in enumerate(dataset.files)}  # back to [0, 1]
    assert torch.allclose(images["grey16.png"], torch.full((3, 8, 8), 128 / 255)), "16-bit grey must not clip to white"
    assert torch.allclose(images["clear.png"], torch.ones(3, 8, 8)), "transparent pixels show the white background"
    assert torch.allclose(images["half.png"], torch.full((3, 8, 8), 127 / 255), atol=1.5 / 255), "half black over white"


def test_the_model_prints_nothing():
    # What runs where is said once by the scripts, before the progress bar; a forward pass must not write into it.
    model = randomize(ZigMa(tiny_config()))
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()) as err:
        model(torch.randn(1, 3, 8, 8), torch.rand(1))
    assert out.getvalue() == err.getvalue() == ""


def test_bad_sampling_options_are_refused_before_sampling(tmp_path, trained_run, monkeypatch):
    def no_sampling(*args, **kwargs):
        raise AssertionError("sample.py sampled before checking its options")
    monkeypatch.setattr(sample_script, "sample", no_sampling)
    for options, message in [
        (["--grid", str(tmp_path / "grid.mp4")], "ending in .bmp, .jpeg, .jpg, .png, .tif, .tiff, .webp"),
        (["--grid", str(tmp_path / "grid")], "ending in"),
        (["--grid", str(tmp_path)], "--grid {} is a folder".format(tmp_path)),
        (["--out", str(tmp_path)], "--grid {} is a folder".format(tmp_path)),  # the older name of --grid
        (["--cfg", "-1"], "--cfg must be 0 or more"),
        (["--n", "0"], "--num-samples must be 1 or more, not 0"),
        (["--sample-steps", "0"], "--sample-steps must be 1 or more, not 0"),
        (["--batch-size", "-1"], "--batch-size must be 1 or more, not -1"),
        (["--rtol", "1e-4"], "--rtol applies to --method dopri5 only: add it, or leave --rtol out"),
        (["--method", "heun", "--atol", "1e-4"], "--atol applies to --method dopri5 only"),
        (["--method", "dopri5", "--sample-steps", "20"], "--sample-steps applies to --method euler and heun"),
    ]:
        with pytest.raises(UserError, match=re.escape(message)):
            sample_script.main(["--ckpt", str(trained_run / "ckpt.pt"), *options])


def test_sampling_writes_into_new_folders_and_takes_a_run_folder(tmp_path, trained_run):
    grid = tmp_path / "new" / "deeper" / "grid.png"
    sample_script.main(["--ckpt", str(trained_run), "--n", "2", "--steps", "1", "--grid", str(grid)])
    assert Image.open(grid).size[0] > 8


class SmallFeatures(torch.nn.Module):
    """A stand-in for FID's Inception network, made here: uint8 images (B, 3, H, W) -> 6 features (B, 6)."""

    num_features = 6

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 6, 3)

    def forward(self, images):
        return self.conv(images.float() / 255).mean((2, 3)) * 100  # (B, 6)


def fid_printed(capsys) -> float:
    return float(re.search(r"FID (-?[0-9.]+): ", capsys.readouterr().out).group(1))


def test_fid_is_the_frechet_distance_of_the_samples_to_the_folder(tmp_path, trained_run, monkeypatch, capsys):
    pytest.importorskip("torchmetrics")
    import bench
    monkeypatch.setattr(plumbing, "FID_FEATURES", SmallFeatures())
    real = make_image_folder(tmp_path / "real")
    for i in range(12):
        Image.fromarray((torch.rand(12, 10, 3, generator=torch.Generator().manual_seed(i)) * 255).byte().numpy()).save(real / f"{i}.png")
    sample_script.main(["--ckpt", str(trained_run), "--n", "16", "--steps", "2", "--grid", str(tmp_path / "grid.png"),
                        "--out-dir", str(tmp_path / "samples"), "--fid", str(real)])
    fid = fid_printed(capsys)
    # The same distance from the written PNGs and the folder's images as train.py reads them (8 x 8), by bench.py's
    # own Frechet distance.
    network = SmallFeatures()
    to_bytes = lambda x: ((x * 0.5 + 0.5) * 255 + 0.5).clamp(0, 255).byte()  # noqa: E731  [-1, 1] -> 0..255, as PNGs
    samples = torch.stack([torch.from_numpy(np.array(Image.open(p))).permute(2, 0, 1) for p in sorted((tmp_path / "samples").glob("*.png"))])
    folder = data.ImageFolder(real, 8)
    images = to_bytes(torch.cat([folder.unflipped(i) for i in range(len(folder))]))  # (18, 3, 8, 8)
    with torch.no_grad():
        expected = bench.frechet_distance(network(samples), network(images))
    assert len(samples) == 16 and len(images) == 18
    assert fid == pytest.approx(expected, rel=1e-3, abs=0.006)  # printed to 2 decimals
    assert fid > 1, "the untrained model's samples are not the folder's images"


def test_fid_alone_measures_more_samples_than_the_grid_holds(tmp_path, trained_run, monkeypatch, capsys):
    # A user after a number need not write every sample: the grid keeps the first 256, and FID reads them all.
    pytest.importorskip("torchmetrics")
    monkeypatch.setattr(plumbing, "FID_FEATURES", SmallFeatures())
    real = make_image_folder(tmp_path / "real")
    sample_script.main(["--ckpt", str(trained_run), "--num-samples", "300", "--sample-steps", "1", "--batch-size", "100",
                        "--grid", str(tmp_path / "grid.png"), "--fid", str(real)])
    printed = capsys.readouterr().out
    assert re.search(r"FID \d+\.\d+: 300 samples against", printed), printed
    assert (tmp_path / "grid.png").exists()


def test_frechet_distance_of_gaussians_with_shared_axes():
    # Covariances Q diag(a) Q^T and Q diag(b) Q^T commute, and then FID's trace term is sum (sqrt(a) - sqrt(b))^2.
    generator = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=generator, dtype=torch.float64))
    a, b = torch.rand(6, generator=generator, dtype=torch.float64) + 0.1, torch.rand(6, generator=generator, dtype=torch.float64)
    mu1, mu2 = torch.randn(6, generator=generator, dtype=torch.float64), torch.randn(6, generator=generator, dtype=torch.float64)
    expected = (mu1 - mu2).square().sum() + (a.sqrt() - b.sqrt()).square().sum()
    fid = plumbing.frechet_distance(mu1, q @ a.diag() @ q.T, mu2, q @ b.diag() @ q.T)
    assert fid == pytest.approx(expected.item(), rel=1e-9)


def test_fid_says_what_it_lacks_in_one_sentence_before_sampling(tmp_path, trained_run, monkeypatch):
    def no_sampling(*args, **kwargs):
        raise AssertionError("sample.py sampled before it could compute FID")
    monkeypatch.setattr(sample_script, "sample", no_sampling)
    real = make_image_folder(tmp_path / "real")
    (real / "a" / "b" / "c").mkdir()
    run = ["--ckpt", str(trained_run), "--out", str(tmp_path / "grid.png"), "--fid"]
    for options, message in [([str(tmp_path / "none")], "is not a folder of images"),
                             ([str(real / "a" / "b" / "c")], "holds no images"),
                             ([str(real), "--n", "1"], "--fid needs 2 samples or more")]:
        with pytest.raises(UserError, match=re.escape(message)):
            sample_script.main([*run, *options])
    for name in ["torchmetrics", *[name for name in sys.modules if name.startswith("torchmetrics.")]]:
        monkeypatch.setitem(sys.modules, name, None)  # not installed
    with pytest.raises(UserError, match="--fid needs torchmetrics and torch-fidelity .*: pip install torchmetrics torch-fidelity"):
        sample_script.main([*run, str(real)])


def test_fid_without_a_network_is_one_sentence(tmp_path, trained_run, monkeypatch):
    pytest.importorskip("torchmetrics")
    inception = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    import urllib.error

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")
    monkeypatch.setattr(inception, "load_state_dict_from_url", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no weights from an earlier download
    with pytest.raises(UserError, match="the Inception weights could not be fetched .*need the network then"):
        sample_script.main(["--ckpt", str(trained_run), "--grid", str(tmp_path / "grid.png"), "--fid",
                            str(make_image_folder(tmp_path / "real"))])
    assert not (tmp_path / "grid.png").exists()


def test_guidance_is_4_by_default_with_a_class_and_refused_without_one(tmp_path, trained_run, monkeypatch):
    # As train.py's previews and DiT's and SiT's sample.py: guided at 4 unless --cfg says otherwise.
    train.main(["--out", str(tmp_path / "plain"), "--steps", "1", *TINY_RUN])
    with pytest.raises(UserError, match="trained without classes or captions, so --cfg has nothing to guide towards"):
        sample_script.main(["--ckpt", str(tmp_path / "plain"), "--cfg", "4"])
    scales = []
    monkeypatch.setattr(sample_script, "sample", lambda model, noise, **options: scales.append(options["cfg_scale"]) or noise)
    for ckpt, options in ((tmp_path / "plain", []), (trained_run, []), (trained_run, ["--class", "1"]),
                          (trained_run, ["--cfg", "1"]), (trained_run, ["--cfg", "2.5"])):
        sample_script.main(["--ckpt", str(ckpt), "--n", "1", "--grid", str(tmp_path / "s.png"), *options])
    assert scales == [1, 4, 4, 1, 2.5], "no condition: 1; a class: 4, or --cfg"


def test_caption_sampling_says_what_it_does_without_prompts_and_names_unknown_words(tmp_path, capsys):
    out = tmp_path / "out"
    train.main(["--out", str(out), "--captions", "--steps", "1", *TINY_RUN])
    arguments = ["--ckpt", str(out), "--n", "2", "--steps", "1", "--out", str(tmp_path / "s.png")]
    sample_script.main(arguments)
    assert "without --prompt its samples are not conditioned on one" in capsys.readouterr().out
    with pytest.raises(UserError, match="add --prompt, or leave out --cfg"):
        sample_script.main([*arguments, "--cfg", "3"])
    sample_script.main([*arguments, "--prompt", "a green dragon", "--prompt", "a pink dragon face"])
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning")]
    assert warnings == ["warning: the model never saw the words dragon in training; it reads them as 'unknown'"]


# ---------------------------------------------------------------------------- video

def make_clip_folder(folder: Path, frames: int = 5) -> Path:
    """Two clips of a bright column moving right: one GIF, one folder of PNG frames; plus a 2-frame and a 1-frame GIF."""
    def frame(t):
        pixels = torch.zeros(8, 8, 3, dtype=torch.uint8)
        pixels[:, t % 8] = 255
        return Image.fromarray(pixels.numpy())
    folder.mkdir(parents=True)
    images = [frame(t) for t in range(frames)]
    images[0].save(folder / "moving.gif", save_all=True, append_images=images[1:], duration=100)
    (folder / "frames").mkdir()
    for t, image in enumerate(images):
        image.save(folder / "frames" / f"{t:03d}.png")
    images[0].save(folder / "short.gif", save_all=True, append_images=images[1:2], duration=100)
    images[0].save(folder / "still.gif")
    return folder


def column_positions(clip: torch.Tensor) -> list[int]:
    """Where the bright column is in each frame of a (T, 3, H, W) clip."""
    return clip[:, 0].mean(1).argmax(-1).tolist()


def test_clips_load_from_gifs_and_frame_folders(tmp_path, capsys):
    folder = make_clip_folder(tmp_path / "clips")
    dataset = data.ClipFolder(folder, image_size=8, frames=3, stride=2)
    warnings = capsys.readouterr().err
    assert "short.gif: 2 frames, fewer than the 5" in warnings and "still.gif: 1 frame, fewer than the 5" in warnings
    assert len(dataset) == 2, "the GIF and the frame folder are clips; the short GIFs are skipped"
    for index in range(2):
        for _ in range(5):
            positions = column_positions(dataset[index]["x"])
            steps = [b - a for a, b in zip(positions, positions[1:])]
            assert steps in ([2, 2], [-2, -2]), f"frames out of order, or flipped differently: {positions}"


def test_clips_shorter_than_needed_are_refused(tmp_path):
    folder = make_clip_folder(tmp_path / "clips")
    with pytest.raises(UserError, match="no clip has the 9 frames"):
        data.ClipFolder(folder, image_size=8, frames=5, stride=2)


def test_moving_shapes_move():
    clip = data.MovingShapes(image_size=16, frames=4)[0]["x"]
    assert clip.shape == (4, 3, 16, 16)
    assert all((clip[t] != clip[t + 1]).any() for t in range(3)), "consecutive frames should differ"


def test_video_train_resume_and_sample_end_to_end(tmp_path):
    folder, out = make_clip_folder(tmp_path / "clips"), tmp_path / "out"
    video_run = ["--data", str(folder), "--out", str(out), "--frames", "3", "--video-scan", "st", *TINY_RUN]
    train.main([*video_run, "--steps", "2"])
    train.main([*video_run, "--steps", "3"])
    checkpoint = data.load_checkpoint(out / "ckpt.pt")
    assert checkpoint["step"] == 3 and checkpoint["config"]["frames"] == 3 and checkpoint["config"]["video_pattern"] == "st"
    assert (out / "samples_0000002.gif").exists()
    sample_script.main(["--ckpt", str(out / "ckpt.pt"), "--n", "2", "--steps", "2", "--grid", str(tmp_path / "grid.gif"),
                        "--out-dir", str(tmp_path / "each")])
    with Image.open(tmp_path / "grid.gif") as grid:
        assert grid.n_frames == 3
    with Image.open(tmp_path / "each" / "000001.gif") as clip:
        assert clip.n_frames == 3 and clip.size == (8, 8)


def test_builtin_video_data_trains_with_a_3d_zigzag(tmp_path):
    train.main(["--out", str(tmp_path), "--frames", "2", "--video-pattern", "v", "--steps", "1", *TINY_RUN])
    checkpoint = data.load_checkpoint(tmp_path / "ckpt.pt")
    model = data.networks_from_checkpoint(checkpoint, tmp_path / "ckpt.pt")["zigma"]
    assert model.blocks[0].order.path.numel() == 2 * 4 * 4, "a volume scan reads the whole clip"


# ---------------------------------------------------------------------------- conditioning

def make_class_folder(folder: Path) -> Path:
    for name in ("cats", "dogs"):
        (folder / name / "inner").mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8), (200 * (name == "cats"), 100, i * 50)).save(folder / name / "inner" / f"{i}.png")
    return folder


def test_class_conditional_run_keeps_class_names_and_samples_by_name(tmp_path):
    folder, out = make_class_folder(tmp_path / "data"), tmp_path / "out"
    train.main(["--data", str(folder), "--out", str(out), "--class-cond", "--steps", "2", *TINY_RUN])
    checkpoint = data.load_checkpoint(out / "ckpt.pt")
    assert checkpoint["conditioning"]["class_names"] == ["cats", "dogs"]
    assert checkpoint["config"]["num_classes"] == 2
    for chosen in ("dogs", "0", None):
        sample_script.main(["--ckpt", str(out / "ckpt.pt"), "--n", "2", "--steps", "2", "--cfg", "3",
                            "--grid", str(tmp_path / "s.png"), *(["--class", chosen] if chosen else [])])
    with pytest.raises(UserError, match="unknown class 'birds'; the classes are cats, dogs"):
        sample_script.main(["--ckpt", str(out / "ckpt.pt"), "--class", "birds"])
    with pytest.raises(UserError, match="trained without captions; leave out --prompt$"):
        sample_script.main(["--ckpt", str(out / "ckpt.pt"), "--prompt", "a cat"])
    (tmp_path / "prompts.txt").write_text("a cat\n")
    with pytest.raises(UserError, match="trained without captions; leave out --prompts$"):
        sample_script.main(["--ckpt", str(out / "ckpt.pt"), "--prompts", str(tmp_path / "prompts.txt")])


def test_class_cond_needs_class_folders(tmp_path):
    with pytest.raises(UserError, match=r"inside a class subfolder .* but .*anim\.gif lies at its top"):
        train.main(["--data", str(make_image_folder(tmp_path / "data")), "--out", str(tmp_path / "out"), "--class-cond", *TINY_RUN])


def test_captioned_run_keeps_its_vocabulary_and_samples_prompts(tmp_path, capsys):
    folder, out = make_class_folder(tmp_path / "data"), tmp_path / "out"
    for image in folder.rglob("*.png"):
        image.with_suffix(".txt").write_text(f"A photo of {image.parts[-3]}, number {image.stem}")
    (folder / "cats" / "inner" / "1.txt").unlink()
    train.main(["--data", str(folder), "--out", str(out), "--captions", "--steps", "2", *TINY_RUN])
    assert "1 of 4 images have no caption file" in capsys.readouterr().err
    checkpoint = data.load_checkpoint(out / "ckpt.pt")
    vocabulary = checkpoint["conditioning"]["vocabulary"]
    assert {"a", "photo", "of", "cats", "dogs", "number", "0", "1"} <= set(vocabulary)
    networks = data.networks_from_checkpoint(checkpoint, out / "ckpt.pt")
    assert networks["text"].vocabulary == vocabulary, "the encoder is rebuilt with the saved vocabulary"
    (tmp_path / "prompts.txt").write_text("a photo of dogs\n\na photo of unseen words\n")
    sample_script.main(["--ckpt", str(out / "ckpt.pt"), "--n", "3", "--steps", "2", "--cfg", "2", "--prompt", "cats",
                        "--prompts", str(tmp_path / "prompts.txt"), "--grid", str(tmp_path / "s.png")])
    assert (tmp_path / "s.png").exists()


def test_captions_are_refused_when_no_image_has_one(tmp_path):
    with pytest.raises(UserError, match="no image has a caption file"):
        train.main(["--data", str(make_class_folder(tmp_path / "data")), "--out", str(tmp_path / "out"), "--captions", *TINY_RUN])


def test_caption_encoder_gives_context_for_any_caption():
    vocabulary = data.CaptionEncoder.build_vocabulary(["a red ball", "A blue ball!"])
    assert vocabulary == data.CaptionEncoder.special + ["a", "ball", "blue", "red"]
    encoder = data.CaptionEncoder(vocabulary, dim=16).double()
    context, mask = encoder(["a red ball", "", "a green cube"])
    assert context.shape == (3, 4, 16) and torch.isfinite(context).all(), "the empty caption still has its start token"
    assert mask.tolist() == [[True] * 4, [True, False, False, False], [True, True, True, True]]
    (alone, _), (padded, _) = encoder(["a ball"]), encoder(["a ball", "a red red ball"])
    assert relative_error(padded[:1, :3], alone) < 1e-12, "padding must not change a caption's tokens"


def test_a_prompt_samples_the_same_alone_and_beside_a_longer_prompt():
    torch.manual_seed(0)
    short, long = "a red ball", "a big blue ball on a red table"
    encoder = data.CaptionEncoder(data.CaptionEncoder.build_vocabulary([short, long]), dim=16).double()
    model = randomize(ZigMa(tiny_config(context_dim=16))).double()
    noise, t = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.rand(2, dtype=torch.float64)
    alone, beside = encoder([short]), encoder([short, long])
    assert relative_error(model(noise, t, None, *beside)[:1], model(noise[:1], t[:1], None, *alone)) < 1e-12, \
        "the padding of the short prompt reached its velocity"
    for cfg_scale in (1.0, 3.0):  # guidance adds the null context beside the padded one
        sampled_alone = sample(model, noise[:1], steps=2, context=alone[0], context_mask=alone[1], cfg_scale=cfg_scale)
        sampled_beside = sample(model, noise, steps=2, context=beside[0], context_mask=beside[1], cfg_scale=cfg_scale)
        assert relative_error(sampled_beside[:1], sampled_alone) < 1e-12, f"cfg {cfg_scale}: the sample depends on its batch"


def test_preview_grids_show_the_classes_in_order_row_by_row():
    for moods, rows in [(2, [0] * 8 + [1] * 8), (4, [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4)]:
        labels, captions = plumbing.preview_conditions(data.SmileyFaces(8, class_cond=True, moods=moods), 16)
        assert labels.tolist() == rows and captions is None
    labels, _ = plumbing.preview_conditions(data.SmileyFaces(8, class_cond=True, moods=3), 16)
    assert labels.tolist() == sorted(labels.tolist()) and set(labels.tolist()) == {0, 1, 2}


def test_builtin_faces_train_with_classes_and_captions(tmp_path):
    train.main(["--out", str(tmp_path), "--class-cond", "--captions", "--steps", "1", *TINY_RUN])
    conditioning = data.load_checkpoint(tmp_path / "ckpt.pt")["conditioning"]
    assert conditioning["class_names"] == ["smiling", "frowning"] and "frowning" in conditioning["vocabulary"]


def make_tiny_pretrained_text_model(folder: Path) -> Path:
    """A randomly initialised BERT of width 24, saved locally like any pretrained model."""
    transformers = pytest.importorskip("transformers")
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "cats", "dogs"]))
    transformers.BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)
    config = transformers.BertConfig(vocab_size=10, hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    transformers.BertModel(config).save_pretrained(folder)
    return folder


def test_pretrained_text_encoder_loads_from_a_local_folder_and_stays_frozen(tmp_path):
    encoder = data.PretrainedTextEncoder(str(make_tiny_pretrained_text_model(tmp_path / "bert")))
    context, mask = encoder(["a photo of cats", "dogs"])
    assert context.shape[0] == 2 and context.shape[2] == encoder.dim == 24
    assert mask.tolist() == [[True] * 6, [True] * 3 + [False] * 3], "[CLS] words [SEP], then padding"
    assert not any(p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert not encoder.encoder.training, "a frozen encoder stays in eval mode"


def test_captioned_run_with_a_pretrained_encoder(tmp_path):
    bert = make_tiny_pretrained_text_model(tmp_path / "bert")
    folder, out = make_class_folder(tmp_path / "data"), tmp_path / "out"
    for image in folder.rglob("*.png"):
        image.with_suffix(".txt").write_text(f"a photo of {image.parts[-3]}")
    train.main(["--data", str(folder), "--out", str(out), "--captions", "--text-encoder", str(bert), "--steps", "1", *TINY_RUN])
    checkpoint = data.load_checkpoint(out / "ckpt.pt")
    assert checkpoint["conditioning"]["text_encoder"] == str(bert) and checkpoint["config"]["context_dim"] == 24
    assert not any(key.startswith("text.") for key in checkpoint["model"]), "frozen weights stay out of the checkpoint"
    sample_script.main(["--ckpt", str(out / "ckpt.pt"), "--n", "2", "--steps", "2", "--prompt", "a photo of dogs",
                        "--grid", str(tmp_path / "s.png")])
    assert (tmp_path / "s.png").exists()


# ---------------------------------------------------------------------------- latent training with a VAE

def make_tiny_vae(folder: Path, seed: int = 0) -> Path:
    """A randomly initialised diffusers AutoencoderKL (downsampling factor 2, 4 latent channels), saved locally."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                                  layers_per_block=1, norm_num_groups=4, sample_size=16)
    vae.save_pretrained(folder)
    return folder


def test_vae_latents_have_the_vae_shape(tmp_path):
    vae = data.VAE(str(make_tiny_vae(tmp_path / "vae")), torch.device("cpu"))
    assert (vae.channels, vae.factor) == (4, 2)
    mean, std = vae.moments(torch.rand(3, 3, 16, 16) * 2 - 1)
    assert mean.shape == std.shape == (3, 4, 8, 8) and (std > 0).all()
    assert vae.decode(mean).shape == (3, 3, 16, 16), "images"
    clips = vae.decode(torch.randn(2, 5, 4, 8, 8))
    assert clips.shape == (2, 5, 3, 16, 16) and clips.min() >= -1 and clips.max() <= 1, "clips, frame by frame"


def test_latent_training_resume_and_sampling_end_to_end(tmp_path, capsys):
    vae = str(make_tiny_vae(tmp_path / "vae"))
    folder, out = make_class_folder(tmp_path / "data"), tmp_path / "out"
    arguments = ["--data", str(folder), "--out", str(out), "--vae", vae, "--class-cond", *TINY_RUN]
    train.main([*arguments, "--steps", "3"])
    checkpoint = data.load_checkpoint(out / "ckpt.pt")
    assert checkpoint["vae"] == vae and checkpoint["step"] == 3
    assert (checkpoint["config"]["in_channels"], checkpoint["config"]["input_size"]) == (4, 4), "8 px images, 4 x 4 x 4 latents"
    assert Image.open(out / "samples_0000002.png").size[0] > 8, "the preview grid is decoded to 8 px images"
    cache = out / "latents.pt"
    encoded_at = cache.stat().st_mtime_ns
    assert "encoding" in capsys.readouterr().err
    train.main([*arguments, "--steps", "4"])  # resumes from the cache, without encoding
    assert cache.stat().st_mtime_ns == encoded_at and "encoding" not in capsys.readouterr().err
    assert data.load_checkpoint(out / "ckpt.pt")["step"] == 4
    sample_script.main(["--ckpt", str(out), "--n", "3", "--steps", "2", "--class", "cats", "--cfg", "2",
                        "--grid", str(tmp_path / "grid.png"), "--out-dir", str(tmp_path / "each")])
    assert [Image.open(p).size for p in sorted((tmp_path / "each").iterdir())] == [(8, 8)] * 3, "decoded to pixels"
    moved = tmp_path / "moved-vae"
    Path(vae).rename(moved)
    sample_script.main(["--ckpt", str(out), "--n", "1", "--steps", "1", "--vae", str(moved), "--grid", str(tmp_path / "m.png")])
    assert Image.open(tmp_path / "m.png").size == (8, 8)


def test_the_default_model_for_latents_follows_the_vaes_own_factor(tmp_path):
    # The tiny VAE halves each side: 64 px images are 32 x 32 latents, which Tiny/4 reads as 8 x 8 tokens. (Assuming
    # Stable Diffusion's factor of 8 would give 8 x 8 latents, and Tiny/2's 4 x 4 tokens.)
    vae, folder, out = make_tiny_vae(tmp_path / "vae"), make_image_folder(tmp_path / "data"), tmp_path / "out"
    arguments = ["--data", str(folder), "--out", str(out), "--vae", str(vae), "--image-size", "64", "--batch-size", "2",
                 "--workers", "0", "--sample-every", "0"]
    train.main([*arguments, "--steps", "1"])
    checkpoint = data.load_checkpoint(out / "ckpt.pt")
    assert checkpoint["args"]["model"] == "ZigMa-Tiny/4" and ZigMaConfig(**checkpoint["config"]).grid == (1, 8, 8)
    train.main([*arguments, "--steps", "2"])  # the same default again: the run resumes
    assert data.load_checkpoint(out / "ckpt.pt")["step"] == 2


def test_latent_video_is_encoded_and_decoded_frame_by_frame(tmp_path):
    vae = str(make_tiny_vae(tmp_path / "vae"))
    folder, out = make_clip_folder(tmp_path / "clips"), tmp_path / "out"
    train.main(["--data", str(folder), "--out", str(out), "--vae", vae, "--frames", "3", "--video-scan", "st",
                "--steps", "2", *TINY_RUN])
    assert data.load_checkpoint(out / "ckpt.pt")["config"]["in_channels"] == 4
    sample_script.main(["--ckpt", str(out), "--n", "2", "--steps", "2", "--grid", str(tmp_path / "grid.gif"),
                        "--out-dir", str(tmp_path / "each")])
    with Image.open(tmp_path / "each" / "000001.gif") as clip:
        assert clip.n_frames == 3 and clip.size == (8, 8)


def test_latent_cache_is_made_again_when_data_size_or_vae_change(tmp_path, capsys):
    vaes = [data.VAE(str(make_tiny_vae(tmp_path / f"vae{i}", seed=i)), torch.device("cpu")) for i in range(2)]
    folder, cache = make_image_folder(tmp_path / "data"), tmp_path / "latents.pt"

    def latents(vae, size):
        dataset = data.Latents(data.ImageFolder(folder, size), vae, size, cache, torch.device("cpu"))
        return dataset, capsys.readouterr()

    first, _ = latents(vaes[0], 8)
    assert len(first) == 6 and first[0]["x"].shape == (4, 4, 4) and first.mean.shape == (6, 2, 4, 4, 4)
    for change, (vae, size) in [("nothing", (vaes[0], 8)), ("the image size", (vaes[0], 16)), ("the VAE", (vaes[1], 16))]:
        dataset, printed = latents(vae, size)
        assert ("encoding again" in printed.out) == (change != "nothing"), f"after changing {change}"
    Image.new("RGB", (9, 9)).save(folder / "new.png")  # the data changes
    dataset, printed = latents(vaes[1], 16)
    assert "encoding again" in printed.out and len(dataset) == 7
    source = data.ImageFolder(folder, 16)  # the cache holds each image's latent moments, and its mirror image's
    for flip, image in enumerate([source.unflipped(0), source.unflipped(0).flip(-1)]):
        mean, std = vaes[1].moments(image)
        assert torch.allclose(dataset.mean[0, flip].float(), mean[0], rtol=1e-2, atol=1e-3), f"flip {flip}: mean"
        assert torch.allclose(dataset.std[0, flip].float(), std[0], rtol=1e-2, atol=1e-3), f"flip {flip}: std"


@pytest.mark.parametrize("options, message", [
    (["--vae", "VAE"], "--vae needs --data"),
    (["--vae", "./no-such-folder", "--data", "DATA"], "is neither a folder nor a hub name"),
    (["--vae", "NOT_A_VAE", "--data", "DATA"], "could not load the VAE"),
    (["--vae", "VAE", "--data", "DATA", "--image-size", "10"], "--image-size 10 is not a multiple of 4, the VAE's downsampling factor 2"),
])
def test_bad_vae_options_are_one_sentence(tmp_path, options, message):
    vae, folder = make_tiny_vae(tmp_path / "vae"), make_image_folder(tmp_path / "data")
    (tmp_path / "not-a-vae").mkdir()
    values = {"VAE": str(vae), "DATA": str(folder), "NOT_A_VAE": str(tmp_path / "not-a-vae")}
    with pytest.raises(UserError, match=re.escape(message)):
        train.main(["--out", str(tmp_path / "out"), *TINY_RUN, *[values.get(o, o) for o in options]])


def test_vae_without_diffusers_is_one_sentence(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers now raises ImportError
    with pytest.raises(UserError, match=re.escape("needs the diffusers package: pip install diffusers")):
        data.VAE("stabilityai/sd-vae-ft-ema", torch.device("cpu"))


def test_pixel_checkpoints_refuse_a_vae(tmp_path, trained_run):
    with pytest.raises(UserError, match="trained on pixels, not latents; leave out --vae"):
        sample_script.main(["--ckpt", str(trained_run), "--vae", "stabilityai/sd-vae-ft-ema"])


# ---------------------------------------------------------------------------- several processes (torchrun, DDP)

def torchrun(*args: str, cwd: Path = Path(__file__).parent) -> subprocess.CompletedProcess:
    """Two processes on the CPU under torchrun, each with one thread."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    result = subprocess.run(command, capture_output=True, text=True, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


ONE_DDP_STEP = """
import sys
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
sys.path.insert(0, sys.argv[1])
from plumbing import end_processes
from test_zigma import one_training_step
dist.init_process_group("gloo")
share = slice(dist.get_rank() * 2, dist.get_rank() * 2 + 2)  # each of the 2 processes takes half the batch of 4
model = one_training_step(DistributedDataParallel, share)
if dist.get_rank() == 0:
    torch.save(model.state_dict(), sys.argv[2])
end_processes()  # as train.py and sample.py leave the group
"""


def one_training_step(wrap, share: slice) -> torch.nn.Module:
    """One SGD step of a float64 ZigMa with classes, on examples `share` of a fixed batch of 4 with fixed noise and times.
    (SGD: a first AdamW step is lr * sign(gradient), which would turn rounding in a zero gradient into a whole step.)"""
    torch.manual_seed(0)
    model = randomize(ZigMa(tiny_config(num_classes=3))).double()
    g = torch.Generator().manual_seed(1)
    x, noise = torch.randn(2, 4, 3, 8, 8, generator=g, dtype=torch.float64)
    t, y = torch.rand(4, generator=g, dtype=torch.float64), torch.tensor([0, 1, 2, 1])
    optimizer, wrapped = torch.optim.SGD(model.parameters(), lr=0.1), wrap(model)  # DDP must live through backward()
    flow_loss(wrapped, x[share], y[share], drop_prob=0.0, noise=noise[share], t=t[share]).backward()
    optimizer.step()
    return model


def test_a_step_of_two_processes_equals_a_step_on_the_whole_batch(tmp_path):
    (tmp_path / "step.py").write_text(ONE_DDP_STEP)
    torchrun(str(tmp_path / "step.py"), str(Path(__file__).parent), str(tmp_path / "ddp.pt"))
    together = torch.load(tmp_path / "ddp.pt", weights_only=True)
    alone = one_training_step(lambda model: model, slice(0, 4)).state_dict()
    for name, value in alone.items():
        if value.is_floating_point():  # parameters (the scan orders are integer buffers)
            assert relative_error(together[name], value) < 1e-12, f"{name} differs"


def test_torchrun_trains_writes_once_and_resumes(tmp_path):
    out = tmp_path / "out"
    run = ["train.py", "--device", "cpu", "--out", str(out), "--class-cond", "--captions", *TINY_RUN]
    result = torchrun(*run, "--steps", "2")
    assert result.stdout.count("done: step 2") == 1, "one process speaks for all"
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2], "one log line a step"
    assert data.load_checkpoint(out / "ckpt.pt")["step"] == 2 and (out / "samples_0000002.png").exists()
    torchrun(*run, "--steps", "3")
    checkpoint = data.load_checkpoint(out / "ckpt.pt")
    assert checkpoint["step"] == 3 and checkpoint["optimizer"]["state"][0]["step"] == 3, "every process resumed"
    assert any(name.startswith("text.") for name in checkpoint["model"]), "the caption encoder learns under DDP too"


def test_torchrun_encodes_the_latent_cache_once(tmp_path):
    vae, folder, out = make_tiny_vae(tmp_path / "vae"), make_image_folder(tmp_path / "data"), tmp_path / "out"
    torchrun("train.py", "--device", "cpu", "--out", str(out), "--data", str(folder), "--vae", str(vae), "--steps", "1", *TINY_RUN)
    assert sorted(p.name for p in out.glob("latents.pt*")) == ["latents.pt"], "the shares are put together, then removed"
    cache = torch.load(out / "latents.pt", weights_only=True)
    assert cache["mean"].shape == (6, 2, 4, 4, 4) and cache["first"].tolist() == list(range(7))
    alone = data.Latents(data.ImageFolder(folder, 8), data.VAE(str(vae), torch.device("cpu")), 8, tmp_path / "alone.pt",
                         torch.device("cpu"))
    assert torch.allclose(cache["mean"].float(), alone.mean.float(), rtol=1e-2, atol=1e-3), "the folder's order, not the shares'"


def test_batch_that_does_not_split_across_processes_is_refused(tmp_path, monkeypatch):
    # As torchrun starts 2 processes: refused before the process group is made (the test of a busy --out runs torchrun).
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="--batch-size 3 does not split evenly across 2 processes"):
        train.main(["--device", "cpu", "--out", str(tmp_path / "out"), "--batch-size", "3"])
    assert not torch.distributed.is_initialized() and not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- bench.py

def test_gpu_check_runs_every_part_on_a_cpu_at_tiny_sizes(tmp_path):
    # The GPU check must work the first time a GPU runs it: its dry run takes the same code paths, and writes its
    # report into a folder it makes.
    report = tmp_path / "reports" / "check.md"
    finished = run_script("bench.py", "--gpu-check", str(report), "--tiny", "--device", "cpu")
    assert finished.returncode == 0, finished.stderr[-2000:]
    text = report.read_text()
    assert "failed" not in text, text
    for part in ["## Tests", "-m device", "1 passed", "## Selective scan", "| 16 | fast |", "| 16 | compiled |",
                 "## Training step", "| 4 | DiT |", "## Faces at 256 px", "step 2, loss", "## torch.compile", "without mamba-ssm: 1 graphs"]:
        assert part in text, f"the report lacks {part!r}:\n{text}"
    assert text.count("exit status 0") == 2, "training and sampling should both succeed"
    times = re.findall(r"^\(\d+\.\d s (?:of its|OVER its) \d+ s budget\)$", text, flags=re.MULTILINE)
    assert len(times) == 5, f"each of the 5 parts should report its time and its budget:\n{text}"


def test_the_gpu_checks_tests_are_the_ones_that_take_a_device():
    # The GPU check runs pytest -m device, within a budget: conftest.py must mark exactly the tests with a device.
    import inspect
    finished = subprocess.run([sys.executable, "-m", "pytest", "test_zigma.py", "--collect-only", "-q", "-m", "device",
                               "-p", "no:cacheprovider"], capture_output=True, text=True, cwd=Path(__file__).parent)
    assert finished.returncode == 0, finished.stdout[-2000:]
    selected = {line.split("::")[1].split("[")[0] for line in finished.stdout.splitlines() if "::" in line}
    taking = {name for name, test in globals().items() if name.startswith("test_") and callable(test)
              and "device" in inspect.signature(test).parameters}
    assert taking and selected == taking, f"selected but take no device: {selected - taking}; not selected: {taking - selected}"


def test_the_full_gpu_check_fits_in_one_command_on_a_lent_gpu():
    import bench
    for size, parts in bench.GPU_CHECK_SIZES.items():
        budgets = parts["budgets"]
        assert sum(budgets.values()) <= 8 * 60, f"{size}: budgets {budgets} add up to more than 8 of the 10 minutes " \
                                                "one command may run on a lent GPU"
        assert budgets["training"] > parts["train_seconds"], f"{size}: no budget left to save and sample after Ctrl-C"


def markdown_column(text: str, column: str) -> list[str]:
    """The cells under `column` in every markdown table of text that has that column."""
    cells, index = [], None
    for line in text.splitlines():
        if not line.startswith("|"):
            index = None  # between tables
            continue
        row = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if index is None:
            index = row.index(column) if column in row else -1
        elif index >= 0 and set(row[0]) != {"-"}:
            cells.append(row[index])
    return cells


@pytest.mark.parametrize("options, column, value", [
    (["--device", "cpu", "--only", "scan", "--lengths", "16", "--max-seconds", "30"], "time", r"\d+\.\d+ m?s"),
    (["--device", "cpu", "--only", "model", "--model", "ZigMa-Tiny/4", "--depth", "1", "--batch-size", "2", "--tokens", "2",
      "--steps", "1"], "step time", r"\d+\.\d+ m?s"),
    (["--only", "compile"], "graphs", r"[1-9]\d*"),
], ids=["scan", "model", "compile"])
def test_the_readmes_benchmark_commands_fill_every_row(options, column, value):
    # The README's commands at tiny sizes: each case timed and measured in fresh processes, none failed.
    finished = run_script("bench.py", *options)
    assert finished.returncode == 0, finished.stderr[-2000:]
    cells = markdown_column(finished.stdout, column)
    assert cells and all(re.fullmatch(value, cell) for cell in cells), f"column {column!r}:\n{finished.stdout}"
    if "scan" in options:
        # At L=16 each scan's tensors are a few MiB (materialising's (B, E, L, N) ones, 6 MiB each): what the
        # measured pass adds, and not what a first use imports (torch._dynamo's 100 MiB).
        memory = markdown_column(finished.stdout, "extra memory")
        assert all(cell.endswith(" MiB") and int(cell.split()[0]) < 50 for cell in memory), finished.stdout
        # A ratio under 1 reads the other way ("2.0x slower", not "0.5x faster"), and none divides by about nothing.
        rows = [dict(zip(["memory", "ratio"], (memory, ratio))) for memory, ratio in
                zip(memory, markdown_column(finished.stdout, "vs materialising"))]
        ratios = [row for row in rows if row["ratio"]]
        assert ratios and all(re.fullmatch(r"[1-9]\d*\.\dx (faster|slower)(, [1-9]\d*\.\dx (less|more) memory)?", row["ratio"])
                              and ("memory" not in row["ratio"] or row["memory"] != "0 MiB") for row in ratios), finished.stdout


def test_quality_table_measures_every_stage_and_keeps_the_runs(tmp_path):
    recipe = "--batch-size 2 --class-cond --sample-steps 1"
    runs = tmp_path / "runs"
    finished = run_script("bench.py", "--only", "quality", "--quality-steps", "4", "--quality-stages", "2",
                          "--quality-samples", "16", "--quality-sample-steps", "2", "--classifier-steps", "5", "--keep-runs", str(runs),
                          "--recipes", recipe, recipe)
    assert finished.returncode == 0, finished.stderr[-2000:]
    rows = [line.split(" | ") for line in finished.stdout.splitlines() if line.startswith(f"| {recipe} |")]
    assert [row[2] for row in rows] == ["2", "4", "2", "4"], f"two equal recipes are two runs:\n{finished.stdout}"
    assert all(math.isfinite(float(row[3])) and 0 <= float(row[4]) <= 1 and row[5].endswith("% |") for row in rows)
    for run in ("run0", "run1"):
        assert sorted(p.name for p in (runs / run).glob("samples_*.png")) == ["samples_0000002.png", "samples_0000004.png"]


@pytest.mark.parametrize("options, message", [
    (["--only", "labels", "--label-grids", "FILE"], "--label-grids FILE is a file; name a folder"),
    (["--only", "labels", "--label-grids", "FILE/grids"], "--label-grids FILE/grids: FILE is a file, not a folder"),
    (["--only", "labels", "--label-grids", "/sys/zigma-grids"], "--label-grids /sys/zigma-grids cannot be written"),
    (["--only", "quality", "--keep-runs", "FILE"], "--keep-runs FILE is a file; name a folder"),
    (["--only", "quality", "--keep-runs", "EARLIER"], "--keep-runs EARLIER is not empty"),
    (["--only", "quality", "--keep-runs", "/sys/zigma-runs"], "--keep-runs /sys/zigma-runs cannot be written"),
    (["--gpu-check", "FOLDER"], "--gpu-check FOLDER is a folder; name the report's file in it"),
    (["--gpu-check", "FILE/check.md"], "--gpu-check's folder FILE is a file; name a folder"),
    (["--gpu-check", "/sys/zigma-check.md"], "--gpu-check's folder /sys cannot be written"),
    (["--only", "scan", "--label-grids", "NEW"], "--label-grids applies to the label table only"),
    (["--only", "scan", "--keep-runs", "NEW"], "--keep-runs applies to the quality table only"),
    (["--only", "quality", "--recipes=--no-such-option"], "--recipes '--no-such-option': unrecognized arguments"),
    (["--only", "quality", "--recipes", "", "--out elsewhere"], "bench.py sets each run's --out and --steps"),
    (["--only", "quality", "--recipes=--frames 4"], "the quality table measures 32 x 32 images"),
    (["--only", "quality", "--quality-minutes", "0"], "--quality-minutes must be positive"),
    (["--only", "labels", "--label-kinds", "labels", "labels"], "--label-kinds names a kind twice"),
])
def test_bench_py_refuses_bad_paths_and_options_before_any_work(tmp_path, monkeypatch, options, message):
    import bench
    for work in ("scan_table", "model_table", "compile_table", "busy_table", "labels_table", "quality_table", "gpu_check"):
        monkeypatch.setattr(bench, work, lambda *args, work=work: pytest.fail(f"bench.py began {work}"))
    (tmp_path / "file").write_text("")
    (tmp_path / "earlier" / "run0").mkdir(parents=True)  # a run from an earlier call, which train.py would resume
    (tmp_path / "folder").mkdir()
    paths = {"FILE": tmp_path / "file", "EARLIER": tmp_path / "earlier", "FOLDER": tmp_path / "folder", "NEW": tmp_path / "new"}

    def put(text: str) -> str:
        for name, path in paths.items():
            text = text.replace(name, str(path))
        return text

    with pytest.raises(UserError, match=re.escape(put(message))):
        bench.main([put(option) for option in options])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["earlier", "file", "folder"], "nothing was made"


def test_bench_py_makes_missing_output_folders_before_any_work(tmp_path, monkeypatch):
    import bench
    made = []
    monkeypatch.setattr(bench, "labels_table", lambda args: made.append(args.label_grids.is_dir()))
    monkeypatch.setattr(bench, "quality_table", lambda args: made.append(args.keep_runs.is_dir()))
    bench.main(["--only", "labels", "--label-grids", str(tmp_path / "a" / "b" / "grids")])
    bench.main(["--only", "quality", "--keep-runs", str(tmp_path / "c" / "runs")])
    assert made == [True, True], "each table should find its folder made"


# ---------------------------------------------------------------------------- faults: nothing lost, nothing silent

def logged(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]  # every line valid JSON


def test_divergence_stops_the_run_and_keeps_the_good_checkpoint(tmp_path):
    out = tmp_path / "out"
    train.main(["--out", str(out), "--steps", "2", *TINY_RUN])
    good = data.load_checkpoint(out / "ckpt.pt")
    with pytest.raises(UserError, match=r"training diverged at step \d+: the loss was nan.*holds step 2\. "
                                        r"Train with a lower --lr than 1000"):
        train.main(["--out", str(out), "--steps", "40", "--lr", "1e3", "--warmup", "0", "--ckpt-every", "1", *TINY_RUN])
    after = data.load_checkpoint(out / "ckpt.pt")
    assert after["step"] >= 2 and all(torch.isfinite(p).all() for p in after["ema"].values() if p.is_floating_point())
    assert all(math.isfinite(line["loss"]) for line in logged(out)), "a NaN loss must not reach log.jsonl"
    assert good["step"] == 2


def test_a_diverged_checkpoint_is_refused_by_sample_py(tmp_path, trained_run):
    checkpoint = data.load_checkpoint(trained_run / "ckpt.pt")
    checkpoint["ema"]["zigma.pos_embed"] = torch.full_like(checkpoint["ema"]["zigma.pos_embed"], float("nan"))
    torch.save(checkpoint, tmp_path / "nan.pt")
    with pytest.raises(UserError, match="NaN or infinite weights .*zigma.pos_embed first.*diverged"):
        sample_script.main(["--ckpt", str(tmp_path / "nan.pt"), "--grid", str(tmp_path / "s.png"), "--n", "1"])


def test_a_stopped_and_resumed_run_gives_the_losses_of_one_that_never_stopped(tmp_path):
    folder = tmp_path / "data"  # 10 images in batches of 4: two batches an epoch, so the stop at 5 is mid-epoch
    folder.mkdir()
    for i in range(10):
        Image.new("RGB", (8, 8), (25 * i, 100, 255 - 25 * i)).save(folder / f"{i}.png")
    options = [*TINY_RUN, "--data", str(folder), "--ckpt-every", "100", "--sample-every", "100"]
    train.main(["--out", str(tmp_path / "whole"), "--steps", "9", *options])
    train.main(["--out", str(tmp_path / "parts"), "--steps", "5", *options])
    train.main(["--out", str(tmp_path / "parts"), "--steps", "9", *options])
    whole, parts = logged(tmp_path / "whole"), logged(tmp_path / "parts")
    assert [line["step"] for line in parts] == list(range(1, 10)), "each step logged once"
    for a, b in zip(whole, parts):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-3), f"step {a['step']}: {a['loss']} against {b['loss']}"


def test_a_log_line_holds_the_mean_loss_of_the_steps_since_the_line_before(tmp_path):
    options = [*TINY_RUN, "--steps", "6", "--sample-every", "100", "--ckpt-every", "100"]
    train.main([*options, "--out", str(tmp_path / "every")])
    train.main([*options, "--out", str(tmp_path / "third"), "--log-every", "3"])
    every, third = [line["loss"] for line in logged(tmp_path / "every")], logged(tmp_path / "third")
    assert [line["step"] for line in third] == [3, 6]
    for line, losses in zip(third, (every[:3], every[3:])):
        assert math.isclose(line["loss"], sum(losses) / 3, rel_tol=1e-3), f"step {line['step']}: {line['loss']}, {losses}"
    assert not math.isclose(every[2], sum(every[:3]) / 3, rel_tol=1e-3), "the test needs steps of unequal loss"


def test_a_skipped_fp16_steps_nan_loss_never_reaches_the_checkpoint_check_or_the_log():
    meter = plumbing.LossMeter(recent_loss=2.0)
    meter.add(1.0, 4)
    meter.add(float("nan"), 4)  # an overflow that the gradient scaler skipped: no step was taken
    assert list(meter.recent) == [2.0, 1.0], "a NaN reference would call the next checkpoint's weights diverged"
    assert meter.window_mean(1, torch.device("cpu")) == 1.0
    assert math.isnan(meter.window_mean(1, torch.device("cpu"))), "no step since the last line: no mean (null in the log)"


def test_log_jsonl_is_strict_json_where_a_value_is_not_finite(tmp_path):
    log = plumbing.RunLog(tmp_path, 0, tensorboard=False)
    log.scalars(1, {"loss": 0.5, "grad_norm": float("inf")})  # an fp16 step that the scaler skips
    log.scalars(2, {"loss": float("nan"), "grad_norm": 1.0})

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    lines = [json.loads(line, parse_constant=refuse) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert lines == [{"step": 1, "loss": 0.5, "grad_norm": None}, {"step": 2, "loss": None, "grad_norm": 1.0}]


def wait_for_steps(out: Path, steps: int, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not ((out / "log.jsonl").exists() and len((out / "log.jsonl").read_text().splitlines()) >= steps):
        assert process.poll() is None, f"the run ended early: {process.communicate()}"
        assert time.monotonic() < deadline, "the run did not reach its steps in time"
        time.sleep(0.2)


def test_sigterm_saves_a_checkpoint_and_exits_like_ctrl_c(tmp_path):
    out = tmp_path / "out"
    run = subprocess.Popen([sys.executable, "train.py", "--out", str(out), "--steps", "100000", *TINY_RUN,
                            "--ckpt-every", "100000", "--sample-every", "100000"], cwd=Path(__file__).parent,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_steps(out, 3, run)
    run.send_signal(signal.SIGTERM)
    _, stderr = run.communicate(timeout=60)
    step = data.load_checkpoint(out / "ckpt.pt")["step"]
    assert run.returncode != 0 and step >= 3
    assert stderr.count("holds step") == 1, stderr[-2000:]
    assert "SIGTERM: stopping after the step under way, with a checkpoint" in stderr, "said when the signal comes"
    assert f"stopped by SIGTERM at step {step}; {out / 'ckpt.pt'} holds step {step}: re-run" in stderr
    assert "Traceback" not in stderr


def test_a_data_worker_killed_by_the_same_ctrl_c_saves_the_steps_taken(tmp_path, monkeypatch):
    # Ctrl-C reaches the data-loading workers too: one that dies while the next batch loads cuts that step short,
    # so the checkpoint must hold the steps before it, under their number, not the cut step's.
    fetches = []
    next_batch = plumbing.Batches.__next__

    def dying_worker(batches):
        fetches.append(None)
        if len(fetches) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # train.py's handler notes it
            raise RuntimeError("DataLoader worker (pid 1234) is killed by signal: Interrupt.")
        return next_batch(batches)

    monkeypatch.setattr(plumbing.Batches, "__next__", dying_worker)
    out = tmp_path / "out"
    with pytest.raises(UserError, match=f"stopped by SIGINT at step 2; {re.escape(str(out / 'ckpt.pt'))} holds step 2"):
        train.main(["--out", str(out), "--steps", "10", *TINY_RUN, "--ckpt-every", "100", "--sample-every", "100"])
    checkpoint = data.load_checkpoint(out / "ckpt.pt")
    optimizer_steps = {int(state["step"]) for state in checkpoint["optimizer"]["state"].values()}
    assert checkpoint["step"] == 2 and optimizer_steps == {2}, (checkpoint["step"], optimizer_steps)


def test_ctrl_c_is_said_at_once_and_skips_the_sample_grid_then_due(tmp_path, monkeypatch, capsys):
    # A grid can take minutes: one asked for after the signal is not drawn, and the signal is acknowledged at once.
    steps = []

    def interrupted_loss(*args, **kwargs):
        steps.append(None)
        if len(steps) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # during step 2, whose grid is due
        return zigma.flow_loss(*args, **kwargs)

    monkeypatch.setattr(train, "flow_loss", interrupted_loss)
    out = tmp_path / "out"
    with pytest.raises(UserError, match=f"stopped by SIGINT at step 2; {re.escape(str(out / 'ckpt.pt'))} holds step 2"):
        train.main(["--out", str(out), "--steps", "10", *TINY_RUN, "--sample-every", "2"])
    assert "SIGINT: stopping after the step under way, with a checkpoint" in capsys.readouterr().err
    assert not list(out.glob("samples_*")) and data.load_checkpoint(out / "ckpt.pt")["step"] == 2


def test_ctrl_c_to_the_whole_process_group_keeps_the_steps_taken_with_real_workers(tmp_path):
    # The twin of the test above with real data-loading workers: a terminal's Ctrl-C reaches every process of the
    # group, the workers included. Wherever it lands, the checkpoint's step is the number of steps taken.
    out = tmp_path / "out"
    run = subprocess.Popen([sys.executable, "train.py", "--out", str(out), "--steps", "100000", *TINY_RUN, "--workers", "2",
                            "--ckpt-every", "100000", "--sample-every", "100000"], cwd=Path(__file__).parent,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for_steps(out, 3, run)
    os.killpg(run.pid, signal.SIGINT)
    _, stderr = run.communicate(timeout=60)
    checkpoint = data.load_checkpoint(out / "ckpt.pt")
    optimizer_steps = {int(state["step"]) for state in checkpoint["optimizer"]["state"].values()}
    assert run.returncode != 0 and checkpoint["step"] >= 3 and optimizer_steps == {checkpoint["step"]}, stderr[-2000:]
    assert f"stopped by SIGINT at step {checkpoint['step']}" in stderr and "Traceback" not in stderr, stderr[-2000:]


def test_a_closed_terminal_stops_training_with_a_checkpoint(tmp_path):
    # The terminal goes away: its pipe closes, so writes to stderr fail, and the session's SIGHUP follows.
    out = tmp_path / "out"
    run = subprocess.Popen([sys.executable, "train.py", "--out", str(out), "--steps", "100000", *TINY_RUN,
                            "--ckpt-every", "100000", "--sample-every", "100000"], cwd=Path(__file__).parent,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for_steps(out, 3, run)
    run.stderr.close()
    wait_for_steps(out, len(logged(out)) + 3, run)  # training goes on without its progress bar
    run.send_signal(signal.SIGHUP)
    run.wait(timeout=60)
    step = data.load_checkpoint(out / "ckpt.pt")["step"]
    assert run.returncode != 0 and step >= 6 and logged(out)[-1]["step"] == step


def test_sigterm_under_torchrun_saves_once(tmp_path):
    out = tmp_path / "out"
    run = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            "train.py", "--device", "cpu", "--out", str(out), "--steps", "100000", *TINY_RUN,
                            "--ckpt-every", "100000", "--sample-every", "100000"], cwd=Path(__file__).parent,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_steps(out, 2, run)
    run.send_signal(signal.SIGTERM)  # torchrun's agent passes it on to its workers
    _, stderr = run.communicate(timeout=90)
    step = data.load_checkpoint(out / "ckpt.pt")["step"]
    assert step >= 2 and stderr.count(f"stopped by SIGTERM at step {step}; {out / 'ckpt.pt'} holds step") == 1, stderr[-3000:]
    assert stderr.count("SIGTERM: stopping after the step under way") == 1, "said once, by the first process"


def test_symlinked_folders_are_followed_once_and_loops_are_not(tmp_path):
    real = make_class_folder(tmp_path / "real")
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "cats").symlink_to(real / "cats")  # a linked class folder
    (folder / "dogs").mkdir()
    (folder / "dogs" / "inner").symlink_to(real / "dogs" / "inner")  # a linked folder inside one
    (folder / "dogs" / "loop").symlink_to(folder)  # a link back up the tree
    dataset = data.ImageFolder(folder, 8, class_cond=True)
    assert len(dataset) == 4, f"expected the 4 images, each once: {dataset.files}"
    assert dataset.class_names == ["cats", "dogs"] and sorted(dataset.labels) == [0, 0, 1, 1]


def test_captions_and_prompts_in_any_script_are_words():
    words = data.CaptionEncoder.words
    assert words("ÉCOLE") == ["école"] and words("e\u0301cole") == ["école"], "accents are kept, in one form"
    assert words("猫 🐱") == ["猫", "🐱"] and words("a cat, 🐱!") == ["a", "cat", "🐱"]
    vocabulary = data.CaptionEncoder.build_vocabulary(["猫 🐱", "a dog"])
    encoder = data.CaptionEncoder(vocabulary, dim=16)
    cat, emoji = (vocabulary.index(w) for w in ("猫", "🐱"))
    assert cat > 2 and emoji > 2 and cat != emoji, "each is a known word, not <unknown>"
    torch.manual_seed(0)
    (a, _), (b, _) = encoder(["猫"]), encoder(["🐱"])
    assert not torch.allclose(a, b), "two prompts in other scripts must give other contexts"


def test_the_vocabulary_holds_only_the_words_the_encoder_reads(capsys):
    huge = " ".join(f"word{i}" for i in range(10_000))
    vocabulary = data.CaptionEncoder.build_vocabulary([huge, "a face"])
    assert len(vocabulary) == 3 + data.CaptionEncoder.max_words + 2
    assert "word31" in vocabulary and "word32" not in vocabulary
    assert "1 caption of more than 32 words: the model reads the first 32" in capsys.readouterr().err


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary_one(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    data.save_atomically({"step": 1}, path)

    def full_disk(contents, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(data.torch, "save", full_disk)
    with pytest.raises(UserError, match="could not write .*ckpt.pt: No space left on device; the one there before is kept"):
        data.save_atomically({"step": 2}, path)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"] and torch.load(path)["step"] == 1


def test_sample_py_on_a_full_disk_leaves_no_empty_image(tmp_path, trained_run, monkeypatch):
    def full_disk(tensor, fp, **kwargs):
        Path(fp).write_bytes(b"")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(data, "save_image", full_disk)
    with pytest.raises(UserError, match="could not write .*s.png: No space left on device"):
        sample_script.main(["--ckpt", str(trained_run), "--grid", str(tmp_path / "s.png"), "--n", "1", "--steps", "1"])
    assert not any(p.suffix == ".png" for p in tmp_path.iterdir()), "no PNG, empty or not, is left behind"


def read_only(monkeypatch):
    def refuse(dir=None, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.setattr(data.tempfile, "TemporaryFile", refuse)


def test_an_unwritable_out_is_refused_before_any_work(tmp_path, trained_run, monkeypatch):
    monkeypatch.setattr(train, "train", lambda *args: pytest.fail("train.py began to train"))
    monkeypatch.setattr(sample_script, "sample", lambda *args, **kwargs: pytest.fail("sample.py began to sample"))
    read_only(monkeypatch)
    with pytest.raises(UserError, match="--out .* cannot be written: Permission denied"):
        train.main(["--out", str(tmp_path / "out"), *TINY_RUN])
    with pytest.raises(UserError, match="--grid's folder .* cannot be written: Permission denied"):
        sample_script.main(["--ckpt", str(trained_run), "--grid", str(tmp_path / "s.png"), "--n", "1"])


def test_a_truncated_latent_cache_is_encoded_again(tmp_path, capsys):
    vae = data.VAE(str(make_tiny_vae(tmp_path / "vae")), torch.device("cpu"))
    folder, cache = make_image_folder(tmp_path / "data"), tmp_path / "latents.pt"
    first = data.Latents(data.ImageFolder(folder, 8), vae, 8, cache, torch.device("cpu")).mean.clone()  # not the mapped file
    cache.write_bytes(cache.read_bytes()[:cache.stat().st_size // 2])  # a full disk or a killed run
    again = data.Latents(data.ImageFolder(folder, 8), vae, 8, cache, torch.device("cpu"))
    assert "cannot be read (cut short" in capsys.readouterr().out
    assert torch.equal(again.mean, first)


def test_text_that_is_not_utf8_is_one_sentence_naming_the_file(tmp_path, trained_run):
    folder = tmp_path / "data"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    (folder / "a.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(UserError, match=re.escape(f"{folder / 'a.txt'} is not UTF-8 text")):
        data.ImageFolder(folder, 8, captions=True)
    (tmp_path / "prompts.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(UserError, match="prompts.txt is not UTF-8 text"):
        sample_script.main(["--ckpt", str(trained_run), "--prompts", str(tmp_path / "prompts.txt"), "--grid", str(tmp_path / "s.png")])


def test_more_sampling_mistakes_are_one_sentence(tmp_path, trained_run, monkeypatch):
    run = ["--ckpt", str(trained_run), "--out", str(tmp_path / "s.png")]
    for options, message in [(["--seed", str(2 ** 64)], "--seed must be between 0 and 2^63 - 1"),
                             (["--seed", "-1"], "--seed must be between 0 and 2^63 - 1"),
                             (["--class", "²"], "unknown class '²'"),
                             (["--n", str(10 ** 11)], "--num-samples 100000000000: the grid holds the first 256 samples")]:
        with pytest.raises(UserError, match=re.escape(message)):
            sample_script.main([*run, *options])
    with pytest.raises(UserError, match=re.escape("--seed must be between 0 and 2^63 - 1")):
        train.main(["--out", str(tmp_path / "out"), "--seed", str(2 ** 63), *TINY_RUN])
    # 10^11 samples are drawn batch by batch: the labels of one batch at a time, not 800 GB of them at once
    first_batch = []

    def stop_after_one_batch(model, noise, **kwargs):
        first_batch.append(kwargs["y"])
        raise KeyboardInterrupt

    monkeypatch.setattr(sample_script, "sample", stop_after_one_batch)
    with pytest.raises(KeyboardInterrupt):
        sample_script.main([*run, "--n", str(10 ** 11), "--out-dir", str(tmp_path / "each"), "--batch-size", "4"])
    assert first_batch[0].tolist() == [0, 1, 0, 1], "every class in turn"


def test_bench_py_checks_its_arguments(monkeypatch):
    import bench
    for options, message in [(["--device", "gpu"], "--device gpu is not a device name"),
                             (["--lengths", "0"], "--lengths must be 1 or more, not 0"),
                             (["--lengths", "256", "-4"], "--lengths must be 1 or more, not -4"),
                             (["--tokens", "0"], "--tokens must be 1 or more"), (["--steps", "0"], "--steps must be 1 or more"),
                             (["--batch-size", "0"], "--batch-size must be 1 or more"),
                             (["--depth", "-2"], "--depth must be 1 or more"), (["--depth", "0"], "--depth must be 1 or more"),
                             (["--label-steps", "2", "1"], "--label-steps must rise")]:
        with pytest.raises(UserError, match=re.escape(message)):
            bench.main(options)
    monkeypatch.setattr(bench, "run_in_subprocess", lambda *args, **kwargs: (_ for _ in ()).throw(RuntimeError("out of memory")))
    monkeypatch.setattr(bench, "FAILED", [])
    with pytest.raises(UserError, match="3 cases failed"):
        bench.main(["--only", "model", "--device", "cpu", "--tokens", "2"])
    with pytest.raises(UserError, match=r"sample.py failed \(exit status 1\): sample.py: no checkpoint at nowhere"):
        bench.run_child([sys.executable, "sample.py", "--ckpt", "nowhere"])


def test_an_unreachable_hub_vae_names_the_network_and_the_cache(monkeypatch):
    diffusers = pytest.importorskip("diffusers")

    def offline(name, **kwargs):
        raise OSError(f"{name} does not appear to have a file named config.json.")

    monkeypatch.setattr(diffusers.AutoencoderKL, "from_pretrained", offline)
    with pytest.raises(UserError, match="not in the Hugging Face cache .* could not be downloaded; connect to the network"):
        data.VAE("nobody/no-such-vae", torch.device("cpu"))


def test_a_moved_vae_names_the_flag_to_pass(tmp_path):
    vae, folder = make_tiny_vae(tmp_path / "vae"), make_image_folder(tmp_path / "data")
    train.main(["--out", str(tmp_path / "out"), "--data", str(folder), "--vae", str(vae), "--steps", "1", *TINY_RUN])
    shutil.move(vae, tmp_path / "moved")
    with pytest.raises(UserError, match=r"neither a folder .*; .*ckpt.pt was trained with it: where it has moved, pass --vae PATH"):
        sample_script.main(["--ckpt", str(tmp_path / "out"), "--grid", str(tmp_path / "s.png"), "--n", "1"])


def test_a_resumed_run_logs_each_step_once(tmp_path):
    out = tmp_path / "out"
    train.main(["--out", str(out), "--steps", "3", *TINY_RUN])
    with open(out / "log.jsonl", "a") as log:  # steps 4 and 5 were logged, then the run died before its next checkpoint
        log.write('{"step": 4, "loss": 1.0, "examples_per_s": 1.0}\n{"step": 5, "loss": 1.0, "examples_per_s": 1.0}\n{"st')
    train.main(["--out", str(out), "--steps", "6", *TINY_RUN])
    assert [line["step"] for line in logged(out)] == [1, 2, 3, 4, 5, 6]
    assert logged(out)[3]["loss"] != 1.0, "step 4 is the resumed run's"


def test_a_second_run_on_the_same_out_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with open(out / "train.lock", "w") as lock:  # as a run in another process holds it
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held = subprocess.run([sys.executable, "train.py", "--out", str(out), *TINY_RUN], capture_output=True, text=True,
                              cwd=Path(__file__).parent)
    assert held.returncode != 0
    assert held.stderr.strip() == f"train.py: another train.py is writing to {out}; wait for it to finish, or pass another --out"


def test_data_that_teaches_little_is_said(tmp_path, capsys):
    folder = make_class_folder(tmp_path / "data")
    shutil.rmtree(folder / "dogs")
    data.ImageFolder(folder, 8, class_cond=True)
    assert "one class only (cats)" in capsys.readouterr().err
    (folder / "birds" / "empty").mkdir(parents=True)  # a class folder with no image in it
    (folder / ".cache").mkdir()  # hidden: no class
    data.ImageFolder(folder, 8, class_cond=True)
    assert f"--class-cond: birds in {folder} holds no images, so is not a class" in capsys.readouterr().err
    for p in data.image_files(folder):
        p.with_suffix(".txt").write_text(" , ")
    data.ImageFolder(folder, 8, captions=True)
    assert "no caption has a word in it" in capsys.readouterr().err
    train.main(["--out", str(tmp_path / "out"), "--data", str(folder), "--steps", "1", *TINY_RUN, "--batch-size", "8"])
    assert "--batch-size 8 is more than the 2 examples" in capsys.readouterr().err


def test_ctrl_c_while_sampling_is_one_sentence(trained_run, tmp_path):
    # SIGINT as a terminal has it: a shell's background job (nohup ... &) starts with it ignored, and Python keeps that.
    run = subprocess.Popen([sys.executable, "sample.py", "--ckpt", str(trained_run), "--grid", str(tmp_path / "s.png"),
                            "--steps", "10000"], cwd=Path(__file__).parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"),
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert "samples" in run.stdout.readline(), "sample.py should say what it samples before it starts"
    run.send_signal(signal.SIGINT)
    _, stderr = run.communicate(timeout=60)
    assert run.returncode != 0 and "Traceback" not in stderr, stderr[-2000:]
    assert stderr.strip().splitlines()[-1] == "sample.py: interrupted; the files written so far are kept"


def test_a_full_disk_while_logging_is_one_sentence(tmp_path, monkeypatch):
    real_open = open

    def full_disk(path, mode="r", *args, **kwargs):
        if str(path).endswith("log.jsonl") and "a" in mode:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", full_disk)
    with pytest.raises(UserError, match="could not write .*log.jsonl: No space left on device"):
        train.main(["--out", str(tmp_path / "out"), "--steps", "2", *TINY_RUN])


# ---------------------------------------------------------------------------- faults under real conditions

@pytest.fixture
def small_disk(tmp_path):
    """A real 4 MiB tmpfs, too small for a checkpoint: a disk that fills up. Needs root (tests and CI run as root)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"a tmpfs cannot be mounted here ({mounted.stderr.strip()})")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


def test_a_real_full_disk_is_one_sentence_and_leaves_no_temporary_file(small_disk, tmp_path, trained_run):
    out = small_disk / "out"
    with pytest.raises(UserError, match=f"could not write {re.escape(str(out / 'ckpt.pt'))}: No space left on device$"):
        train.main(["--out", str(out), "--steps", "2", *TINY_RUN])
    assert sorted(p.name for p in out.iterdir()) == ["log.jsonl", "train.lock"], "no partial checkpoint is left"
    (small_disk / "filler").write_bytes(b"\0" * (shutil.disk_usage(small_disk).free - 512))  # what is left: 512 bytes
    with pytest.raises(UserError, match=r"could not write .*s\.png: No space left on device"):
        sample_script.main(["--ckpt", str(trained_run), "--grid", str(small_disk / "s.png"), "--n", "64", "--steps", "1"])
    assert not list(small_disk.glob("*.png")) and not list(small_disk.glob(".*.tmp")), "no image, whole or partial"


def test_a_read_only_disk_is_refused_before_any_work(tmp_path, trained_run):
    disk = tmp_path / "read-only"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("a tmpfs cannot be mounted here")
    try:
        with pytest.raises(UserError, match="--out .* cannot be written: Read-only file system"):
            train.main(["--out", str(disk / "out"), *TINY_RUN])
        with pytest.raises(UserError, match="--grid's folder .* cannot be written: Read-only file system"):
            sample_script.main(["--ckpt", str(trained_run), "--grid", str(disk / "s.png"), "--n", "1"])
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)


def test_a_step_that_ruins_the_weights_never_replaces_the_checkpoint(tmp_path):
    out = tmp_path / "out"
    train.main(["--out", str(out), "--steps", "5", *TINY_RUN, "--ckpt-every", "5", "--sample-every", "100"])
    good = data.load_checkpoint(out / "ckpt.pt")
    # One step at lr 1e3 multiplies the weights without making the loss or the gradients NaN first.
    with pytest.raises(UserError, match=r"training diverged at step 6: the loss of its weights is .* against .* over the "
                                        r"last steps; .*ckpt.pt holds step 5\. Train with a lower --lr"):
        train.main(["--out", str(out), "--steps", "12", *TINY_RUN, "--lr", "1e3", "--warmup", "0", "--ckpt-every", "6"])
    kept = data.load_checkpoint(out / "ckpt.pt")
    assert kept["step"] == 5 and all(torch.equal(kept["model"][k], v) for k, v in good["model"].items())


def test_weights_that_are_not_finite_are_never_saved():
    networks = data.build_networks(tiny_config(), {})
    batch = {"x": torch.randn(2, 3, 8, 8)}
    with torch.no_grad():
        networks["zigma"].final_layer.linear.bias[0] = float("nan")
    with pytest.raises(UserError, match="training diverged at step 3: .*some weights are NaN or infinite; kept"):
        plumbing.check_weights_are_sane(networks, None, batch, [1.0], 3, 1, torch.device("cpu"), contextlib.nullcontext(),
                                     "kept", "uniform")


def test_samples_that_are_not_finite_write_nothing(tmp_path, trained_run):
    checkpoint = data.load_checkpoint(trained_run / "ckpt.pt")
    checkpoint["ema"]["zigma.final_layer.linear.weight"] = torch.full_like(checkpoint["ema"]["zigma.final_layer.linear.weight"], 3e38)
    torch.save(checkpoint, tmp_path / "overflows.pt")  # finite weights whose velocities are not
    with pytest.raises(UserError, match="samples 0 to 3 are NaN or infinite: .*overflows.pt comes from a run that diverged"):
        sample_script.main(["--ckpt", str(tmp_path / "overflows.pt"), "--grid", str(tmp_path / "s.png"), "--n", "4", "--steps", "2"])
    assert not (tmp_path / "s.png").exists()


def truncated_png(path: Path, seed: int = 0) -> Path:
    """A PNG cut short: its header reads, its pixels do not decode."""
    pixels = (torch.rand(16, 16, 3, generator=torch.Generator().manual_seed(seed)) * 255).byte().numpy()
    Image.fromarray(pixels).save(path)
    path.write_bytes(path.read_bytes()[:100])
    return path


def test_files_that_do_not_decode_are_skipped_once_each_and_training_goes_on(tmp_path, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    broken = [truncated_png(folder / f"a{i:03d}.png", i) for i in range(30)]  # sorted before the good ones
    for i in range(3):
        Image.new("RGB", (8, 8), (80 * i, 100, 200)).save(folder / f"z{i}.png")
    out = tmp_path / "out"
    train.main(["--data", str(folder), "--out", str(out), "--steps", "4", *TINY_RUN, "--sample-every", "4"])
    err = capsys.readouterr().err
    for p in broken:
        assert err.count(f"skipping {p}:") == 1, f"{p.name} should be warned about once"
    assert (out / "samples_0000004.png").exists() and data.load_checkpoint(out / "ckpt.pt")["step"] == 4
    for p in folder.glob("z*.png"):
        p.unlink()
    with pytest.raises(UserError, match=f"none of the 30 files in {re.escape(str(folder))} decodes"):
        train.main(["--data", str(folder), "--out", str(tmp_path / "again"), *TINY_RUN])


def test_latent_encoding_skips_what_does_not_decode_and_resumes_where_it_stopped(tmp_path, monkeypatch, capsys):
    vae = data.VAE(str(make_tiny_vae(tmp_path / "vae")), torch.device("cpu"))
    folder, cache = make_class_folder(tmp_path / "data"), tmp_path / "latents.pt"
    truncated_png(folder / "dogs" / "inner" / "0.png")
    monkeypatch.setattr(data.Latents, "chunk", 1)  # one image a chunk

    class StopsAtThirdImage(data.ImageFolder):
        def unflipped(self, index):
            if index == 2:
                raise KeyboardInterrupt  # Ctrl-C, two chunks in
            return super().unflipped(index)

    with pytest.raises(KeyboardInterrupt):
        data.Latents(StopsAtThirdImage(folder, 8, class_cond=True), vae, 8, cache, torch.device("cpu"))
    assert sorted(p.name for p in cache.with_name("latents.pt.parts").iterdir()) == ["000000.pt", "000001.pt"]
    decoded = []
    monkeypatch.setattr(data.ImageFolder, "unflipped", lambda self, i, read=data.ImageFolder.unflipped: decoded.append(i) or read(self, i))
    latents = data.Latents(data.ImageFolder(folder, 8, class_cond=True), vae, 8, cache, torch.device("cpu"))
    assert decoded.count(0) <= 1 and 1 not in decoded, "the chunks encoded before the stop are not encoded again"
    assert f"skipping {folder / 'dogs' / 'inner' / '0.png'}" in capsys.readouterr().err
    assert len(latents) == 3 and latents.labels == [0, 0, 1], "the broken dog is left out, and the labels follow"
    assert not cache.with_name("latents.pt.parts").exists()


def test_the_latent_cache_is_keyed_on_names_and_sizes_inside_the_folder(tmp_path, capsys):
    vae = data.VAE(str(make_tiny_vae(tmp_path / "vae")), torch.device("cpu"))
    folder, cache = make_image_folder(tmp_path / "data"), tmp_path / "latents.pt"
    data.Latents(data.ImageFolder(folder, 8), vae, 8, cache, torch.device("cpu"))
    copy = tmp_path / "copy"  # another machine's copy of the data: other times, the same names and sizes
    shutil.copytree(folder, copy)
    for p in data.image_files(copy):
        os.utime(p, (1, 1))
    capsys.readouterr()
    data.Latents(data.ImageFolder(copy, 8), vae, 8, cache, torch.device("cpu"))
    assert "encoding again" not in capsys.readouterr().out
    data.Latents(data.ImageFolder(copy, 8, flip=False), vae, 8, cache, torch.device("cpu"))
    assert "encoding again" in capsys.readouterr().out, "without flips the cache holds one view of each image"


def test_a_broken_log_line_does_not_block_a_resume_and_a_fresh_run_starts_a_new_log(tmp_path):
    out = tmp_path / "out"
    train.main(["--out", str(out), "--steps", "3", *TINY_RUN])
    lines = (out / "log.jsonl").read_text().splitlines()
    (out / "log.jsonl").write_text(lines[0] + "\n" + lines[1][:7] + "\n" + lines[2] + "\n" + '{"step": 4, "lo')  # a full disk
    train.main(["--out", str(out), "--steps", "5", *TINY_RUN])
    assert [line["step"] for line in logged(out)] == [1, 3, 4, 5]
    (out / "ckpt.pt").unlink()  # a new run in the old run's folder
    train.main(["--out", str(out), "--steps", "2", *TINY_RUN])
    assert [line["step"] for line in logged(out)] == [1, 2]


def test_closed_stderr_is_a_closed_terminal(tmp_path):
    out = tmp_path / "out"
    closed = subprocess.run(["bash", "-c", f"{sys.executable} train.py --out {out} --steps 2 {' '.join(TINY_RUN)} 2>&- && "
                             f"{sys.executable} sample.py --ckpt {out} --grid {tmp_path / 's.png'} --n 2 --steps 1 2>&-"],
                            cwd=Path(__file__).parent, capture_output=True, text=True)
    assert closed.returncode == 0, closed.stdout
    assert data.load_checkpoint(out / "ckpt.pt")["step"] == 2 and (tmp_path / "s.png").exists()


def test_checkpoints_with_parts_missing_are_named_in_one_sentence(tmp_path, capsys):
    out = tmp_path / "out"
    train.main(["--out", str(out), "--steps", "1", *TINY_RUN])
    checkpoint = data.load_checkpoint(out / "ckpt.pt")
    released = {k: v for k, v in checkpoint.items() if k != "optimizer"}
    released["conditioning"] = {}
    torch.save(released, out / "ckpt.pt")  # stripped for release
    sample_script.main(["--ckpt", str(out), "--grid", str(tmp_path / "s.png"), "--n", "1", "--steps", "1"])
    train.main(["--out", str(out), "--steps", "2", *TINY_RUN])
    assert "holds no optimizer state; AdamW's moments start afresh" in capsys.readouterr().err
    resumed = data.load_checkpoint(out / "ckpt.pt")
    assert resumed["step"] == 2
    for change, message in [(lambda w: w.pop("zigma.pos_embed"), "its ema weights lack zigma.pos_embed"),
                            (lambda w: w.update({"zigma.pos_embed": w["zigma.pos_embed"][:, :3]}),
                             r"its ema weights hold zigma.pos_embed of shape \(1, 3, \d+\), where the model has \(1, 16, \d+\)")]:
        broken = {**resumed, "ema": dict(resumed["ema"])}
        change(broken["ema"])
        torch.save(broken, tmp_path / "broken.pt")
        with pytest.raises(UserError, match="broken.pt does not match the model its config describes: " + message):
            sample_script.main(["--ckpt", str(tmp_path / "broken.pt"), "--grid", str(tmp_path / "s.png")])
        shutil.copy(tmp_path / "broken.pt", out / "ckpt.pt")
        with pytest.raises(UserError, match="ckpt.pt does not match the model its config describes: " + message):
            train.main(["--out", str(out), "--steps", "3", *TINY_RUN])


UNREADABLE = """
import sys
sys.path.insert(0, sys.argv[1])
import data
for folder, options in [(sys.argv[2], {"class_cond": True}), (sys.argv[3], {"captions": True})]:
    try:
        data.ImageFolder(data.Path(folder), 8, **options)
        print("read")
    except data.UserError as error:
        print(error)
"""


def test_unreadable_folders_and_captions_are_named(tmp_path):
    classes, captioned = make_class_folder(tmp_path / "classes"), make_class_folder(tmp_path / "captioned")
    (classes / "dogs").chmod(0)
    caption = captioned / "cats" / "inner" / "0.txt"
    caption.write_text("a cat")
    caption.chmod(0)
    # Root reads every file, so as root the check runs without the capabilities that let it.
    drop = ["setpriv", "--inh-caps=-dac_override,-dac_read_search", "--bounding-set=-dac_override,-dac_read_search"]
    if os.geteuid() == 0 and not shutil.which("setpriv"):
        pytest.skip("as root, the check needs setpriv (util-linux) to drop the capability to read every file")
    try:
        said = subprocess.run([*(drop if os.geteuid() == 0 else []), sys.executable, "-c", UNREADABLE,
                               str(Path(__file__).parent), str(classes), str(captioned)], capture_output=True, text=True)
    finally:
        (classes / "dogs").chmod(0o755)
    assert said.stdout.splitlines() == [
        f"cannot read the folder {classes / 'dogs'} (Permission denied): its images would be left out; make it "
        f"readable, or move it out of {classes}",
        f"cannot read {caption}: Permission denied"], said.stdout + said.stderr[-2000:]


def test_a_busy_out_stops_every_torchrun_process(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with open(out / "train.lock", "w") as lock:  # as a run in another process holds it
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               "train.py", "--device", "cpu", "--out", str(out), *TINY_RUN], capture_output=True, text=True,
                              cwd=Path(__file__).parent)
    # torchrun prints a traceback of its own when a process exits non-zero; the processes print none.
    assert held.returncode != 0 and 'train.py", line' not in held.stderr, held.stderr[-3000:]
    assert held.stderr.count(f"train.py: another train.py is writing to {out}") == 1
    (out / "train.lock").unlink()
    (out / "train.lock").mkdir()
    with pytest.raises(UserError, match="cannot open the lock file .*train.lock \\(Is a directory\\); remove what is there"):
        train.main(["--out", str(out), *TINY_RUN])


def two_processes(script: Path, *args: str, exit_status: int = 1) -> list[str]:
    """Run `script` in two processes of a group, started as torchrun starts them but without torchrun (which would
    kill the second once the first has stopped); returns what each wrote to stderr once both have ended with
    `exit_status`."""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    group = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", OMP_NUM_THREADS="1")
    processes = [subprocess.Popen([sys.executable, str(script), str(Path(__file__).parent), *args], cwd=Path(__file__).parent,
                                  env=dict(group, RANK=str(rank), LOCAL_RANK=str(rank)), stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    try:
        said = [process.communicate(timeout=120)[1] for process in processes]
    finally:  # a process that hangs is killed, not left behind
        for process in processes:
            process.kill()
    assert [process.returncode for process in processes] == [exit_status] * 2, said
    assert "Traceback" not in said[0] + said[1] and "Error" not in said[1], said
    return said


RUN_TRAIN_PY = """
try:
    train.main(sys.argv[2:])
except train.UserError as error:
    sys.exit(train.exit_message(f"train.py: {error}"))
"""  # the end of the scripts below, which change train.py's world first

RUN_SAMPLE_PY = """
try:
    sample.main(sys.argv[2:])
except sample.UserError as error:
    sys.exit(sample.exit_message(f"sample.py: {error}"))
finally:
    sample.end_processes()
"""  # as sample.py's own ending

NAN_PREVIEW = """
import sys
import torch
sys.path.insert(0, sys.argv[1])
import train
train.sample = lambda model, noise, **options: torch.full_like(noise, float("nan"))  # as a run that diverged draws
""" + RUN_TRAIN_PY


def test_a_nan_preview_stops_every_process_by_itself(tmp_path):
    # The first process draws the preview alone; the other must stop with it. Before, the second waited for the first
    # at the end of the step until the group broke, and raised.
    (tmp_path / "nan_preview.py").write_text(NAN_PREVIEW)
    out = tmp_path / "out"
    said = two_processes(tmp_path / "nan_preview.py", "--device", "cpu", "--out", str(out), "--steps", "4", *TINY_RUN)
    assert said[0].strip().splitlines()[-1] == (f"train.py: the samples of step 2 are NaN or infinite; {out / 'ckpt.pt'} "
                                                f"holds step 2"), said[0][-2000:]
    assert not (out / "samples_0000002.png").exists() and data.load_checkpoint(out / "ckpt.pt")["step"] == 2
    assert "train.py:" not in said[1], "the first process speaks for all"


def test_a_refusal_before_the_process_group_is_said_once(tmp_path):
    # Each process refuses a batch that does not split, before there is a group; only the first says so.
    script = tmp_path / "as_main.py"  # train.py itself, run as __main__, as torchrun runs it
    script.write_text("import runpy, sys\nsys.path.insert(0, sys.argv[1])\nsys.argv = [sys.argv[1] + '/train.py', *sys.argv[2:]]\n"
                      "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    said = two_processes(script, "--device", "cpu", "--out", str(tmp_path / "out"), "--batch-size", "3")
    assert said[0].strip() == "train.py: --batch-size 3 does not split evenly across 2 processes" and not said[1].strip(), said


FID_PROBE = """
import sys
import torch.distributed as dist
sys.path.insert(0, sys.argv[1])
import sample

class GroupProbe:  # FID's stand-in, which notes whether the process group is still there when FID is computed
    used, size = "the images in", 8

    def __init__(self, source, device):
        pass

    def add_samples(self, samples):
        pass

    def compute(self):
        print(f"the process group at FID: {dist.is_initialized()}", file=sys.stderr)
        return 0.0

sample.FID = GroupProbe
sample.main(sys.argv[2:])
"""


def test_fid_is_computed_after_every_process_has_left_the_group(tmp_path, trained_run):
    # The real images' statistics can take the first process longer than the group's timeout: before, the others
    # waited on it in the group, and a timeout would stop the run before it printed FID.
    (tmp_path / "fid_probe.py").write_text(FID_PROBE)
    said = two_processes(tmp_path / "fid_probe.py", "--ckpt", str(trained_run), "--num-samples", "4", "--sample-steps", "1",
                         "--device", "cpu", "--grid", str(tmp_path / "s.png"), "--fid", str(tmp_path), exit_status=0)
    assert "the process group at FID: False" in said[0] and "the process group" not in said[1], said


def test_an_fid_folder_refused_under_torchrun_stops_every_process_with_one_sentence(tmp_path, trained_run):
    # The first process builds FID alone. Before, the others went on to sample and broke when it stopped.
    real = tmp_path / "real"
    real.mkdir()
    Image.new("RGB", (8, 8)).save(real / "only.png")
    script = tmp_path / "run_sample.py"
    script.write_text("import sys\nsys.path.insert(0, sys.argv[1])\nimport sample\n" + RUN_SAMPLE_PY)
    said = two_processes(script, "--ckpt", str(trained_run), "--num-samples", "4", "--sample-steps", "1", "--device", "cpu",
                         "--grid", str(tmp_path / "s.png"), "--fid", str(real))
    assert said[0].strip().splitlines()[-1] == f"sample.py: --fid {real} holds one image; FID needs two or more, and " \
                                               f"thousands to mean much", said[0][-2000:]
    assert "sample.py:" not in said[1], "the first process speaks for all"


WORKER_DIES_IN_THE_SECOND_PROCESS = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
import plumbing, train
fetches, next_batch = [], plumbing.Batches.__next__

def dying_worker(batches):  # Ctrl-C kills a data-loading worker as the third batch loads
    fetches.append(None)
    if len(fetches) == 3:
        os.kill(os.getpid(), signal.SIGINT)
        raise RuntimeError("DataLoader worker (pid 1234) is killed by signal: Interrupt.")
    return next_batch(batches)

if os.environ["RANK"] == "1":  # the first process has its batch, and would go on to the step
    plumbing.Batches.__next__ = dying_worker
""" + RUN_TRAIN_PY


DIVERGENCE_CHECK = """
import contextlib, datetime, sys
sys.path.insert(0, sys.argv[1])
import torch
import torch.distributed as dist
import data, plumbing
from zigma import ZigMaConfig
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
torch.manual_seed(0)
networks = data.build_networks(ZigMaConfig(input_size=8, in_channels=3, patch_size=2, dim=32, depth=2, d_state=4), {})
recent_losses = [1e-6] if dist.get_rank() == 1 else [1e6]  # alone, the second process would call the weights diverged
plumbing.check_weights_are_sane(networks, None, {"x": torch.randn(2, 3, 8, 8)}, recent_losses, 3, 2, torch.device("cpu"),
                                contextlib.nullcontext(), "kept", "uniform")
dist.barrier()
print("both processes found the weights sane", file=sys.stderr)
dist.destroy_process_group()
"""


def test_every_process_judges_a_checkpoints_weights_on_the_same_numbers(tmp_path):
    # Before, each compared the mean loss of all processes with its own recent losses: one could stop alone, while the
    # others went on to write the checkpoint.
    (tmp_path / "divergence_check.py").write_text(DIVERGENCE_CHECK)
    said = two_processes(tmp_path / "divergence_check.py", exit_status=0)
    assert all("both processes found the weights sane" in one for one in said), said


NAN_IN_THE_SECOND_PROCESS = """
import os, sys
import torch
sys.path.insert(0, sys.argv[1])
import sample
draw = sample.sample
if os.environ["RANK"] == "1":  # the second process alone draws NaN
    sample.sample = lambda model, noise, **options: torch.full_like(noise, float("nan"))
""" + RUN_SAMPLE_PY


def test_nan_samples_in_one_process_stop_every_process_with_one_sentence(tmp_path, trained_run):
    # Before, the second process stopped alone, and the first waited for its samples until the group broke.
    (tmp_path / "nan_second.py").write_text(NAN_IN_THE_SECOND_PROCESS)
    said = two_processes(tmp_path / "nan_second.py", "--ckpt", str(trained_run), "--num-samples", "4", "--batch-size", "4",
                         "--sample-steps", "1", "--device", "cpu", "--grid", str(tmp_path / "s.png"))
    assert said[0].strip().splitlines()[-1].startswith("sample.py: samples 0 to 3 are NaN or infinite:"), said[0][-2000:]
    assert not (tmp_path / "s.png").exists()


def test_a_worker_killed_in_one_process_stops_every_process_after_the_same_step(tmp_path):
    # Before, the second process went on to save a checkpoint while the first took a step: their collectives crossed.
    (tmp_path / "dying_worker.py").write_text(WORKER_DIES_IN_THE_SECOND_PROCESS)
    out = tmp_path / "out"
    said = two_processes(tmp_path / "dying_worker.py", "--device", "cpu", "--out", str(out), "--steps", "10", *TINY_RUN,
                         "--ckpt-every", "100", "--sample-every", "100")
    assert said[0].strip().splitlines()[-1] == (f"train.py: stopped by a signal to another process at step 2; "
                                                f"{out / 'ckpt.pt'} holds step 2: re-run the same command "
                                                f"to resume"), said[0][-2000:]
    checkpoint = data.load_checkpoint(out / "ckpt.pt")
    optimizer_steps = {int(state["step"]) for state in checkpoint["optimizer"]["state"].values()}
    assert checkpoint["step"] == 2 and optimizer_steps == {2}, (checkpoint["step"], optimizer_steps)
    assert tuple(checkpoint["data_position"]) == (0, 8), "2 steps of 4 examples, not the batch fetched after them"


def test_temporary_files_are_hidden_and_links_are_written_through(tmp_path):
    seen = []
    data.written_atomically(tmp_path / "000230.png", lambda temporary: seen.append(temporary) or temporary.write_bytes(b"x"))
    assert seen[0].parent == tmp_path and seen[0].name.startswith(".") and not seen[0].name.endswith(".png")
    real = tmp_path / "elsewhere" / "real.pt"
    real.parent.mkdir()
    data.save_atomically({"step": 1}, real)
    (tmp_path / "ckpt.pt").symlink_to(real)
    data.save_atomically({"step": 2}, tmp_path / "ckpt.pt")
    assert (tmp_path / "ckpt.pt").is_symlink() and torch.load(real)["step"] == 2


def test_float_images_and_decompression_bombs(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    Image.fromarray(np.full((8, 8), 0.8, dtype=np.float32), mode="F").save(folder / "grey.tif")
    Image.new("RGB", (64, 64)).save(folder / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 64 is more than twice this: refused as a bomb
    dataset = data.ImageFolder(folder, 8)
    assert len(dataset) == 1 and torch.allclose(dataset[0]["x"], torch.full((3, 8, 8), 0.6), atol=0.01), "0.8 grey, not black"
    assert "huge.png: image size (4096 pixels), more than PIL's limit against decompression bombs" in capsys.readouterr().err


def test_nonsense_guidance_is_refused(tmp_path, trained_run):
    for cfg in ("inf", "nan"):
        with pytest.raises(UserError, match=rf"--cfg must be 0 or more \(1 is no guidance\) and finite, not {cfg}"):
            sample_script.main(["--ckpt", str(trained_run), "--grid", str(tmp_path / "s.png"), "--class", "0", "--cfg", cfg])


@pytest.mark.parametrize("script", ["train.py", "sample.py"])
def test_ctrl_c_while_torch_imports_is_one_sentence(script):
    # -X importtime reports each import as it finishes: the first line about torch means torch is being imported.
    run = subprocess.Popen([sys.executable, "-X", "importtime", script], cwd=Path(__file__).parent, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in run.stderr:
        if "torch" in line:
            break
    run.send_signal(signal.SIGINT)
    _, stderr = run.communicate(timeout=60)
    assert run.returncode != 0 and "Traceback" not in stderr, stderr[-2000:]
    assert stderr.strip().splitlines()[-1].startswith(f"{script}: interrupted"), stderr[-2000:]


def test_outputs_inside_the_data_they_learn_from_are_refused(tmp_path, trained_run):
    folder = make_image_folder(tmp_path / "data")
    with pytest.raises(UserError, match="--out .* is inside --data .*: its sample grids would become training images"):
        train.main(["--data", str(folder), "--out", str(folder / "out"), *TINY_RUN])
    with pytest.raises(UserError, match="--out-dir .* is inside --fid .*: the samples would count as real images"):
        sample_script.main(["--ckpt", str(trained_run), "--grid", str(tmp_path / "s.png"), "--fid", str(folder),
                            "--out-dir", str(folder / "a" / "samples")])
    assert not (folder / "out").exists() and not (folder / "a" / "samples").exists()


def test_an_out_dir_that_holds_samples_an_npz_that_exists_or_a_file_are_refused_before_sampling(tmp_path, trained_run, monkeypatch):
    # A second run into the same folder would overwrite the first files and leave the rest: two models mixed.
    monkeypatch.setattr(sample_script, "sample", lambda *args, **kwargs: pytest.fail("sample.py began to sample"))
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    for i in range(3):
        (earlier / f"{i:06d}.png").write_bytes(b"an earlier sample")
    (tmp_path / "notes.txt").write_text("")
    run = ["--ckpt", str(trained_run), "--grid", str(tmp_path / "s.png"), "--n", "2"]
    with pytest.raises(UserError, match=r"--out-dir .*earlier already holds 3 samples \(000000.png first\)"):
        sample_script.main([*run, "--out-dir", str(earlier)])
    with pytest.raises(UserError, match=r"--out-dir .*notes.txt is a file; name a folder"):
        sample_script.main([*run, "--out-dir", str(tmp_path / "notes.txt")])
    with pytest.raises(UserError, match=r"--out .*notes.txt is a file; name a folder"):  # the same check, in train.py
        train.main(["--out", str(tmp_path / "notes.txt"), *TINY_RUN])
    (tmp_path / "earlier.npz").write_bytes(b"50,000 samples of another run")
    with pytest.raises(UserError, match=r"--npz .*earlier.npz already exists; name a new file, or remove it"):
        sample_script.main([*run, "--npz", str(tmp_path / "earlier.npz")])
    assert (tmp_path / "earlier.npz").read_bytes() == b"50,000 samples of another run"
    assert all((earlier / f"{i:06d}.png").read_bytes() == b"an earlier sample" for i in range(3))


# ---------------------------------------------------------------------------- conventions of DiT, SiT and nanoGPT

def test_no_flip_never_shows_a_mirrored_image_and_a_changed_setting_is_said(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(4):  # light on the left, dark on the right: a mirrored image is dark on the left
        pixels = np.zeros((8, 8, 3), dtype=np.uint8)
        pixels[:, :4] = 60 * i + 50
        Image.fromarray(pixels).save(folder / f"{i}.png")
    seen = []
    monkeypatch.setattr(train, "flow_loss", lambda model, x, *args, **kwargs: seen.append(x.clone()) or flow_loss(model, x, *args, **kwargs))
    out = tmp_path / "out"
    train.main(["--data", str(folder), "--out", str(out), "--steps", "6", "--no-flip", *TINY_RUN])
    images = torch.cat(seen)  # (24, 3, 8, 8)
    assert len(images) == 24 and (images[..., :4].mean((1, 2, 3)) > images[..., 4:].mean((1, 2, 3))).all(), "never mirrored"
    seen.clear()
    train.main(["--data", str(folder), "--out", str(out), "--steps", "12", *TINY_RUN])  # flips on again
    assert "resuming with --flip (the checkpoint was trained with no --flip)" in capsys.readouterr().out
    mirrored = torch.cat(seen)[..., :4].mean((1, 2, 3)) < torch.cat(seen)[..., 4:].mean((1, 2, 3))
    assert 0 < mirrored.sum() < len(mirrored), "with --flip, some images are mirrored and some are not"


@pytest.mark.parametrize("n, batch_size, world", [(10, 4, 2), (7, 3, 2), (5, 4, 3), (3, 8, 4), (6, 1, 2)])
def test_the_processes_shares_draw_every_sample_once_in_order(n, batch_size, world):
    shares = [list(plumbing.process_shares(n, batch_size, rank, world)) for rank in range(world)]
    firsts = [[first for first, _ in mine] for mine in shares]
    assert all(f == list(range(0, n, batch_size)) for f in firsts), "every process walks the same batches"
    drawn = [i for batch in zip(*shares) for _, indices in batch for i in indices]  # batch by batch, rank by rank
    assert drawn == list(range(n)), drawn
    assert all(len(indices) <= math.ceil(batch_size / world) for mine in shares for _, indices in mine)


def test_sampling_under_torchrun_draws_the_samples_of_one_process(tmp_path, trained_run):
    # Batches of 3 across 2 processes: 2 samples and 1 of the first batch, 2 and none of the second.
    options = ["--ckpt", str(trained_run), "--num-samples", "5", "--batch-size", "3", "--sample-steps", "2", "--device", "cpu"]
    torchrun("sample.py", *options, "--grid", str(tmp_path / "two.png"), "--out-dir", str(tmp_path / "two"),
             "--npz", str(tmp_path / "two.npz"))
    sample_script.main([*options, "--grid", str(tmp_path / "one.png"), "--npz", str(tmp_path / "one.npz")])
    with np.load(tmp_path / "two.npz") as two, np.load(tmp_path / "one.npz") as one:
        assert list(two) == ["arr_0"] and two["arr_0"].dtype == np.uint8 and two["arr_0"].shape == (5, 8, 8, 3)
        difference = np.abs(two["arr_0"].astype(int) - one["arr_0"].astype(int))
        assert difference.max() <= 1, "two processes draw the samples that one draws (up to rounding)"
        files = sorted((tmp_path / "two").iterdir())
        assert [p.name for p in files] == [f"{i:06d}.png" for i in range(5)], "the first process writes every file"
        assert all(np.array_equal(np.asarray(Image.open(p)), two["arr_0"][i]) for i, p in enumerate(files))


def test_fid_statistics_of_a_folder_are_cached_and_can_be_passed_as_npz(tmp_path, trained_run, monkeypatch, capsys):
    pytest.importorskip("torchmetrics")
    monkeypatch.setattr(plumbing, "FID_FEATURES", SmallFeatures())
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    real = make_image_folder(tmp_path / "real")
    run = ["--ckpt", str(trained_run), "--n", "8", "--sample-steps", "2", "--out", str(tmp_path / "grid.png")]
    sample_script.main([*run, "--fid", str(real)])
    first = fid_printed(capsys)
    [cache] = (tmp_path / "cache" / "zigma" / "fid").glob("*.npz")
    measured, features = [], plumbing.FID.features
    monkeypatch.setattr(plumbing.FID, "features", lambda self, images: measured.append(len(images)) or features(self, images))
    sample_script.main([*run, "--fid", str(real)])
    printed = capsys.readouterr().out
    assert measured == [8] and "statistics cached in" in printed, "the second call measures the samples alone"
    assert float(re.search(r"FID (-?[0-9.]+): ", printed).group(1)) == first
    sample_script.main([*run, "--fid", str(cache)])
    assert fid_printed(capsys) == first, "the statistics file gives the same FID"


class ScaledByTime(torch.nn.Module):
    """A velocity field with a known flow: dx/dt = t x, so x(1) = x(0) e^(1/2)."""

    def forward(self, x_t, t, *conditions):
        return t.view(-1, 1, 1, 1) * x_t


def test_dopri5_reaches_the_exact_end_point_to_its_tolerance():
    pytest.importorskip("torchdiffeq")
    noise = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = noise * math.exp(0.5)
    for rtol in (1e-3, 1e-6):
        end, calls = plumbing.sample_adaptive(ScaledByTime(), noise, rtol=rtol, atol=rtol * 1e-3)
        error = ((end - exact).abs() / exact.abs().clamp(min=1e-3)).max().item()
        assert error <= 10 * rtol and calls > 0, f"rtol {rtol}: relative error {error:.2e} in {calls} calls"
    euler = sample(ScaledByTime(), noise, steps=calls)  # as many calls, in equal steps
    assert ((euler - exact).abs() / exact.abs().clamp(min=1e-3)).max() > 10 * error


def test_sample_py_solves_with_dopri5_and_counts_ode_steps(tmp_path, trained_run, capsys, monkeypatch):
    run = ["--ckpt", str(trained_run), "--n", "4", "--batch-size", "2", "--out", str(tmp_path / "s.png")]
    sample_script.main([*run, "--sample-steps", "3", "--method", "heun"])
    assert "6/6" in capsys.readouterr().err, "two batches of 3 Heun steps: 6 ODE steps, not 2 batches"
    if importlib.util.find_spec("torchdiffeq"):
        sample_script.main([*run, "--method", "dopri5"])
        assert re.search(r"dopri5 took \d+ model calls a batch", capsys.readouterr().out)
    monkeypatch.setitem(sys.modules, "torchdiffeq", None)  # not installed
    with pytest.raises(UserError, match="--method dopri5 needs the torchdiffeq package: pip install torchdiffeq"):
        sample_script.main([*run, "--method", "dopri5"])


def test_grad_clip_0_turns_clipping_off(tmp_path):
    for name, clip in (("off", "0"), ("loose", "1e9"), ("tight", "1e-6")):
        train.main(["--out", str(tmp_path / name), "--steps", "2", *TINY_RUN, "--grad-clip", clip])
    weights = {name: data.load_checkpoint(tmp_path / name / "ckpt.pt")["model"] for name in ("off", "loose", "tight")}
    assert all(torch.equal(weights["off"][name], weights["loose"][name]) for name in weights["off"]), "as if never clipped"
    assert not all(torch.equal(weights["off"][name], weights["tight"][name]) for name in weights["off"]), "clipping acts"


def test_latent_runs_default_to_256_px_and_pixel_runs_to_32():
    assert train.parse_args(["--vae", "v", "--data", "d"]).image_size == 256 and train.parse_args([]).image_size == 32


def test_numbered_checkpoints_logged_lr_and_gradient_norm_and_no_preview(tmp_path):
    out = tmp_path / "out"
    cut = TINY_RUN.index("--sample-steps")
    tiny_run = TINY_RUN[:cut] + TINY_RUN[cut + 2:]  # no grids: no ODE steps for them
    train.main(["--out", str(out), "--steps", "6", *tiny_run, "--keep-checkpoints", "2", "--sample-every", "0",
                "--warmup", "4"])
    assert sorted(p.name for p in out.glob("ckpt*.pt")) == ["ckpt.pt", "ckpt_0000004.pt", "ckpt_0000006.pt"]
    assert data.load_checkpoint(out / "ckpt_0000004.pt")["step"] == 4 and not list(out.glob("samples_*"))
    lines = logged(out)
    assert [line["lr"] for line in lines] == pytest.approx([1e-3 * min(1, s / 5) for s in range(1, 7)]), "the warm-up"
    assert all(math.isfinite(line["grad_norm"]) and line["grad_norm"] > 0 for line in lines)


def test_numbered_checkpoints_are_pruned_by_step_and_an_earlier_runs_stay(tmp_path):
    # An earlier, longer run left ckpt_0009000.pt and ckpt_0010000.pt, and its ckpt.pt was removed to start over.
    for step in (9000, 10000):
        torch.save({"step": step}, tmp_path / f"ckpt_{step:07d}.pt")
    for step in (500, 1000, 1500):
        plumbing.save_checkpoint({"step": step}, tmp_path / "ckpt.pt", keep=2)
    assert sorted(p.name for p in tmp_path.glob("ckpt_*.pt")) == [
        "ckpt_0001000.pt", "ckpt_0001500.pt", "ckpt_0009000.pt", "ckpt_0010000.pt"]
    # Past step 9,999,999 the names get an eighth digit: the order is still by step.
    for step in (9_999_999, 10_000_000, 10_000_001):
        plumbing.save_checkpoint({"step": step}, tmp_path / "ckpt.pt", keep=2)
    assert sorted(p.name for p in tmp_path.glob("ckpt_*.pt")) == ["ckpt_10000000.pt", "ckpt_10000001.pt"]
    assert torch.load(tmp_path / "ckpt_10000001.pt")["step"] == 10_000_001


def test_tensorboard_gets_the_scalars_and_the_sample_grids(tmp_path, monkeypatch):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    out = tmp_path / "out"
    train.main(["--out", str(out), "--steps", "2", *TINY_RUN, "--tensorboard"])
    events = event_accumulator.EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert {"loss", "lr", "grad_norm", "examples_per_s"} <= set(events.Tags()["scalars"])
    assert [event.step for event in events.Scalars("loss")] == [1, 2] and [e.step for e in events.Images("samples")] == [2]
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # not installed
    with pytest.raises(UserError, match="--tensorboard needs the tensorboard package: pip install tensorboard"):
        train.main(["--out", str(tmp_path / "again"), *TINY_RUN, "--tensorboard"])


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", None)])
def test_precision_picks_autocast(precision, dtype):
    assert plumbing.autocast_dtype(precision, torch.device("cuda")) == dtype
    assert plumbing.autocast_dtype("auto", torch.device("cpu")) is None, "auto is float32 on a CPU"


def test_fp16_training_scales_the_gradients(tmp_path, capsys):
    train.main(["--out", str(tmp_path / "out"), "--steps", "2", *TINY_RUN, "--precision", "fp16"])
    assert "fp16 autocast" in capsys.readouterr().out.splitlines()[0], "the first line names the precision"
    assert data.load_checkpoint(tmp_path / "out" / "ckpt.pt")["step"] == 2


def test_an_fp16_runs_loss_scale_survives_a_resume(tmp_path):
    out = tmp_path / "out"
    train.main(["--out", str(out), "--steps", "2", *TINY_RUN, "--precision", "fp16"])
    checkpoint = data.load_checkpoint(out / "ckpt.pt")
    assert checkpoint["scaler"]["scale"] == 2.0 ** 16, "the scale starts at 65536 and no step overflowed"
    checkpoint["scaler"]["scale"] = 1024.0  # as a run whose gradients overflowed six times
    torch.save(checkpoint, out / "ckpt.pt")
    train.main(["--out", str(out), "--steps", "3", *TINY_RUN, "--precision", "fp16", "--ckpt-every", "1"])
    assert data.load_checkpoint(out / "ckpt.pt")["scaler"]["scale"] == 1024.0, "a resumed run starts from the run's scale"


@contextlib.contextmanager
def cuda_autocast(dtype):
    """CUDA's autocast rules, without a GPU: what torch.autocast("cuda") switches on, below its check for a device."""
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", dtype)
    torch.autocast_increment_nesting()
    try:
        yield
    finally:
        torch.autocast_decrement_nesting()
        torch.set_autocast_enabled("cuda", False)
        torch.clear_autocast_cache()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fault", [None, "u in float32"])
def test_a_b2_model_hands_the_kernel_its_contract_under_cudas_autocast_rules(monkeypatch, dtype, fault):
    # Fake CUDA tensors (shapes and dtypes, no values) under CUDA's own cast lists, which differ from the CPU's.
    from torch._subclasses.fake_tensor import FakeTensorMode
    kernel_calls = []

    def fused(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
        if fault:
            u = u.float()  # what the test must catch
        u, delta, B, C, z, D = kernel_contract(u, delta, A, B, C, D, z, delta_bias)
        kernel_calls.append((u.dtype, u.device.type))
        return u.new_empty(u.shape)

    monkeypatch.setattr(zigma, "fused_selective_scan", fused)
    model = ZigMa(zigma.preset_config("ZigMa-B/2", input_size=32, in_channels=4, num_classes=10, context_dim=64))
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = model.to("cuda")
        x, t, y = torch.randn(2, 4, 32, 32, device="cuda"), torch.rand(2, device="cuda"), torch.tensor([1, 2], device="cuda")
        context, mask = torch.randn(2, 5, 64, device="cuda"), torch.ones(2, 5, dtype=torch.bool, device="cuda")
        with cuda_autocast(dtype):
            if fault:
                with pytest.raises(AssertionError, match="delta must be in u's dtype torch.float32"):
                    model(x, t, y, context, mask)
                return
            v = model(x, t, y, context, mask)
    assert kernel_calls == [(dtype, "cuda")] * model.config.depth and v.shape == x.shape
