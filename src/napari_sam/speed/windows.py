"""Window partitioning in one copy each way, padding included.

The exact encoders pad the ``B x H x W x C`` grid (one copy), then cut it into windows (a
second copy), and on the way back reassemble (a copy) and crop (a fourth). Here the grid is
written straight into the window layout and read straight back, as at most four rectangular
blocks (full windows, the bottom strip, the right strip, the corner). On a CPU every avoided
copy of a ViT-B activation is 12-45 MB of memory traffic, and every avoided fresh allocation of
that size saves its page faults.
"""

from __future__ import annotations

import torch

__all__ = ["from_windows", "to_windows"]


def _blocks(h: int, w: int, ws: int) -> tuple[list[tuple], list[tuple]]:
    """``(grid rows, grid cols, window-row index, row-in-window, ...)`` of the four blocks."""
    fh, fw = h // ws, w // ws
    rh, rw = h - fh * ws, w - fw * ws
    rows = [(slice(0, fh * ws), slice(0, fh), slice(None), fh)] if fh else []
    if rh:
        rows.append((slice(fh * ws, h), fh, slice(0, rh), None))
    cols = [(slice(0, fw * ws), slice(0, fw), slice(None), fw)] if fw else []
    if rw:
        cols.append((slice(fw * ws, w), fw, slice(0, rw), None))
    return rows, cols


def _grid_view(x: torch.Tensor, rows: tuple, cols: tuple, ws: int) -> torch.Tensor:
    """The part of ``x`` (``B x H x W x C``) in block ``rows x cols``, split like the windows."""
    b, c = x.shape[0], x.shape[-1]
    part = x[:, rows[0], cols[0]]
    shape = [b]
    shape += [rows[3], ws] if rows[3] is not None else [part.shape[1]]
    shape += [cols[3], ws] if cols[3] is not None else [part.shape[2]]
    return part.view(*shape, c)  # splitting axes never needs a copy: this is a view


def to_windows(
    x: torch.Tensor, ws: int, fill: torch.Tensor | float = 0.0
) -> tuple[torch.Tensor, int, int]:
    """``B x H x W x C`` -> ``(B * nh * nw) x ws^2 x C`` windows, padding tokens set to ``fill``.

    Returns the windows and the number of windows down (``nh``) and across (``nw``).
    """
    b, h, w, c = x.shape
    nh, nw = -(-h // ws), -(-w // ws)
    out = x.new_empty(b, nh, nw, ws, ws, c)
    # The padded grid as a view of the window layout: B x nh x ws x nw x ws x C.
    grid = out.permute(0, 1, 3, 2, 4, 5)
    rows, cols = _blocks(h, w, ws)
    for r in rows:
        for col in cols:
            grid[:, r[1], r[2], col[1], col[2]] = _grid_view(x, r, col, ws)
    if h % ws:
        grid[:, h // ws, h % ws :] = fill
    if w % ws:
        grid[:, :, :, w // ws, w % ws :] = fill
    return out.view(b * nh * nw, ws * ws, c), nh, nw


def from_windows(windows: torch.Tensor, ws: int, nh: int, nw: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`to_windows`: ``B x H x W x C`` (contiguous), padding dropped."""
    c = windows.shape[-1]
    grid = windows.reshape(-1, nh, nw, ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    out = windows.new_empty(grid.shape[0], h, w, c)
    rows, cols = _blocks(h, w, ws)
    for r in rows:
        for col in cols:
            _grid_view(out, r, col, ws).copy_(grid[:, r[1], r[2], col[1], col[2]])
    return out
