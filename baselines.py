"""The paper's two baselines for the zigzag paths: raster sweeps and Hilbert curves (`--path-family sweep` and
`--path-family hilbert`). zigma.family_paths imports this file when a model asks for one; a first reading of zigma.py
can skip it. Each family has eight paths in the zigzags' orientations, and a layer reads one of them, as it does a
zigzag.
"""

import torch

from zigma import from_each_corner


# Official: its sweep baseline, Sweep-2, reads the raster forwards and backwards in every layer (Vim's bidirectional
# Mamba), with a second set of weights; these are one path a layer.
def sweep_paths(height: int, width: int) -> torch.Tensor:
    """Eight raster sweeps over the grid, (8, H*W): from each corner, by rows, then by columns, every line
    starting at the same side. So a sweep jumps at the end of each line, where a zigzag turns."""
    paths = []
    for from_corner in from_each_corner(height, width):
        paths += [from_corner.reshape(-1), from_corner.t().reshape(-1)]  # by rows, then by columns
    return torch.stack(paths)  # (8, H*W)


# Hilbert curves: J. Cerveny's generalized Hilbert ("gilbert") curves, for any rectangle, and continuous on the
# square grids the model builds.
# Official: utils/utils_zigzag.py's hilbert_path gives paths that jump between cells that are not neighbours.
def hilbert_paths(height: int, width: int) -> torch.Tensor:
    """Eight generalized Hilbert curves over the grid, (8, H*W), in the zigzags' orientations: from each
    corner, the curve whose major side runs along the rows, then the one along the columns.

    No continuous curve runs from corner to corner along an odd side when the other side is even. There the
    orientation reuses the other side's curve, read backwards (from another corner). On the model's square
    grids all eight curves differ.
    """
    curves = {"rows": gilbert(0, 0, width, 0, 0, height), "columns": gilbert(0, 0, 0, height, width, 0)}
    odd_by_even = {"rows": width % 2 == 1 and height % 2 == 0, "columns": height % 2 == 1 and width % 2 == 0}
    paths = []
    for from_corner in from_each_corner(height, width):
        for axis, other in (("rows", "columns"), ("columns", "rows")):
            cells = curves[other][::-1] if odd_by_even[axis] else curves[axis]  # (column, row) pairs
            columns, rows = zip(*cells)
            paths.append(from_corner[list(rows), list(columns)])  # (H*W,)
    return torch.stack(paths)  # (8, H*W)


def _sign(v: int) -> int:
    return (v > 0) - (v < 0)


def gilbert(x: int, y: int, ax: int, ay: int, bx: int, by: int) -> list[tuple[int, int]]:
    """The cells of a generalized Hilbert curve over a rectangle, in order, as (column, row).

    The rectangle's first cell is (x, y). Its sides are the vectors (ax, ay), the major side, and (bx, by),
    the minor one. Each runs along the rows or the columns, and its sign gives the direction. The curve starts
    at (x, y). It ends at the far end of the major side, continuously, unless the major side is odd and the
    minor side even. Then no continuous curve ends there, and this one jumps or ends elsewhere.
    """
    major_length, minor_length = abs(ax + ay), abs(bx + by)  # in cells (each side has one coordinate 0)
    (ux, uy), (vx, vy) = (_sign(ax), _sign(ay)), (_sign(bx), _sign(by))  # one cell along each side
    if minor_length == 1:  # one line along the major side
        return [(x + i * ux, y + i * uy) for i in range(major_length)]
    if major_length == 1:  # one line along the minor side
        return [(x + i * vx, y + i * vy) for i in range(minor_length)]
    # The rectangle is cut into parts, each traced by this function. A half side is made even where it can be,
    # since a part whose major side is odd and minor side even would have no continuous curve.
    half_ax, half_ay, half_bx, half_by = ax // 2, ay // 2, bx // 2, by // 2
    if 2 * major_length > 3 * minor_length:  # over 1.5 times as long as wide: two halves, one after the other
        if abs(half_ax + half_ay) % 2 and major_length > 2:
            half_ax, half_ay = half_ax + ux, half_ay + uy
        return (gilbert(x, y, half_ax, half_ay, bx, by)
                + gilbert(x + half_ax, y + half_ay, ax - half_ax, ay - half_ay, bx, by))
    # Else three parts in a U, as in Hilbert's curve. With the major side along the top, left to right, and
    # the minor side down the left, the parts cover:
    #     1 1 3 3     1: the top-left block, from (x, y), down the minor side's first half
    #     1 1 3 3     2: the bottom part, across the whole major side
    #     2 2 2 2     3: the top-right block, back up, to the major side's far end
    #     2 2 2 2
    # The third part starts at the last cell of the major side, in the last line of the minor side's first
    # half, and runs both sides backwards.
    if abs(half_bx + half_by) % 2 and minor_length > 2:
        half_bx, half_by = half_bx + vx, half_by + vy
    return (gilbert(x, y, half_bx, half_by, half_ax, half_ay)
            + gilbert(x + half_bx, y + half_by, ax, ay, bx - half_bx, by - half_by)
            + gilbert(x + (ax - ux) + (half_bx - vx), y + (ay - uy) + (half_by - vy), -half_bx, -half_by,
                      -(ax - half_ax), -(ay - half_ay)))
