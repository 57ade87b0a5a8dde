"""Plotly figures for the app: each function takes plain numpy arrays and returns a figure."""
from __future__ import annotations

import math

import numpy as np
import plotly.graph_objects as go

from sdnet import images

# One colour per compared setting, the same in every chart of the page.
COLORS = {"current": "#d62728", "trained": "#1f77b4", "resnet": "#7f7f7f"}
MARGIN = dict(l=10, r=10, t=40, b=10)


def _tidy(fig: go.Figure, height: int, title: str | None = None) -> go.Figure:
    fig.update_layout(height=height, margin=MARGIN, title=title,
                      legend=dict(orientation="h", yanchor="bottom", y=1.0, xanchor="right", x=1.0))
    return fig


def predictions(classes: list[str], series: list[tuple[str, str, np.ndarray]], k: int) -> go.Figure:
    """Grouped horizontal bars of class probabilities: the top-k classes of the first series,
    plus any class another series puts in its top-k. `series` is [(label, colour key, probs)]."""
    order = list(np.argsort(-series[0][2])[:k])
    for _, _, p in series[1:]:
        order += [int(i) for i in np.argsort(-p)[:k] if i not in order]
    order = order[::-1]  # highest at the top
    fig = go.Figure()
    for label, color, p in series:
        fig.add_bar(y=[classes[i] for i in order], x=[float(p[i]) for i in order], name=label, orientation="h",
                    marker_color=COLORS.get(color, color), text=[f"{p[i]:.1%}" for i in order],
                    textposition="outside", hovertemplate="%{y}: %{x:.2%}<extra>" + label + "</extra>")
    top = max(float(p[i]) for _, _, p in series for i in order)
    fig.update_layout(barmode="group", xaxis=dict(range=[0, min(1.0, top) * 1.2 + 0.02], tickformat=".0%",
                                                   title="probability"))
    return _tidy(fig, 90 + 12 * len(order) * len(series) + 8 * len(order))


def across_depth(names: list[str], series: list[tuple[str, str, np.ndarray]], title: str, ytitle: str,
                 percent: bool = False) -> go.Figure:
    """One line per setting of a per-layer quantity, layers in forward order on the x axis."""
    fig = go.Figure()
    for label, color, values in series:
        fig.add_scatter(x=names, y=values, mode="lines+markers", name=label, line=dict(color=COLORS.get(color, color)),
                        hovertemplate="%{x}: %{y:" + (".1%" if percent else ".4f") + "}<extra>" + label + "</extra>")
    fig.update_yaxes(title=ytitle, tickformat=".0%" if percent else None, rangemode="tozero")
    fig.update_xaxes(tickangle=-45)
    return _tidy(fig, 300, title)


def _image_trace(img: np.ndarray, name: str) -> go.Image:
    return go.Image(z=np.clip(img, 0, 1) * 255, name=name, hovertemplate="x=%{x} y=%{y}<br>rgb=%{z}<extra></extra>")


def _square(fig: go.Figure) -> None:
    """Pixels are square and rows go down; no axes."""
    fig.update_xaxes(visible=False, constrain="domain")
    fig.update_yaxes(visible=False, autorange="reversed", constrain="domain", scaleanchor="x")


def layer_maps(maps: list[tuple[str, np.ndarray]], rgb: bool, colorbar_title: str = "") -> go.Figure:
    """Side-by-side panels (input, A(z), residual): RGB images, or heatmaps on one shared colour scale."""
    n = len(maps)
    h, w = maps[0][1].shape[:2]
    pad = max(2, w // 10)
    titles = [t for t, _ in maps]
    if rgb:
        grid = images.tile_grid(np.stack([m for _, m in maps]), n, (pad, pad), fill=1.0)
        fig = go.Figure(go.Image(z=np.clip(grid, 0, 1) * 255,
                                 hovertemplate="x=%{x} y=%{y}<br>rgb=%{z}<extra></extra>"))
    else:
        stack = np.stack([m for _, m in maps])
        grid = images.tile_grid(stack, n, (pad, pad), fill=np.nan)
        which = images.tile_grid(np.stack([np.full((h, w), float(i)) for i in range(n)]), n, (pad, pad), fill=np.nan)
        names = np.array(titles, dtype=object)
        label = np.where(np.isnan(which), "", names[np.nan_to_num(which).astype(int)])
        fig = go.Figure(go.Heatmap(z=grid, customdata=label, zmin=0, zmax=float(np.nanmax(stack)), colorscale="Viridis",
                                   hoverongaps=False, colorbar=dict(title=colorbar_title, thickness=12),
                                   hovertemplate="%{customdata}<br>x=%{x} y=%{y}<br>value=%{z:.4f}<extra></extra>"))
    return _grid_layout(fig, n, n, h, w, pad, pad, titles, 260 / (h + pad))


def _grid_layout(fig: go.Figure, n: int, ncols: int, h: int, w: int, py: int, px: int,
                 titles: list[str], px_per_cell: float) -> go.Figure:
    """Titles above the tiles of a tile_grid image, pixels square, no axes."""
    nrows = math.ceil(n / ncols)
    notes = [dict(x=(i % ncols) * (w + px) + (w - 1) / 2, y=(i // ncols) * (h + py) - 0.6, text=t, showarrow=False,
                  xanchor="center", yanchor="bottom", font=dict(size=10)) for i, t in enumerate(titles)]
    fig.update_layout(annotations=notes)
    fig.update_xaxes(visible=False, constrain="domain")
    fig.update_yaxes(visible=False, autorange="reversed", scaleanchor="x", constrain="domain",
                     range=[nrows * (h + py) - py - 0.5, -py - 0.5])
    return _tidy(fig, int(60 + nrows * (h + py) * px_per_cell))


def code_grid(z: np.ndarray, channels: list[int], activity: np.ndarray, ncols: int = 8) -> go.Figure:
    """Heatmaps of the code's most active channels, on one colour scale, values on hover.

    One heatmap trace of the tiled channels (fast to build and to draw, however many tiles)."""
    n, (h, w) = len(channels), z.shape[1:]
    ncols = min(ncols, n)
    py, px = max(3, h // 3), max(1, w // 16)
    grid = images.tile_grid(z[channels], ncols, (py, px), fill=np.nan)
    ys, xs = np.indices((h, w))
    info = np.stack([np.broadcast_to(np.float64(c), (h, w)) for c in channels])
    chan = images.tile_grid(info, ncols, (py, px), fill=np.nan)
    xg = images.tile_grid(np.broadcast_to(xs, (n, h, w)), ncols, (py, px), fill=np.nan)
    yg = images.tile_grid(np.broadcast_to(ys, (n, h, w)), ncols, (py, px), fill=np.nan)
    vmax = max(float(np.abs(z[channels]).max()), 1e-12)
    fig = go.Figure(go.Heatmap(z=grid, customdata=np.stack([chan, xg, yg], -1), zmin=0 if z.min() >= 0 else -vmax,
                               zmax=vmax, colorscale="Viridis", hoverongaps=False, colorbar=dict(title="z", thickness=12),
                               hovertemplate="channel %{customdata[0]} (x=%{customdata[1]}, y=%{customdata[2]})"
                                             "<br>z=%{z:.4f}<extra></extra>"))
    titles = [f"ch {c} (Σ|z|={activity[c]:.2g})" for c in channels]
    return _grid_layout(fig, n, ncols, h, w, py, px, titles, 110 / (h + py))


def tiles(pictures: np.ndarray, titles: list[str], ncols: int = 8, height_per_row: int = 110) -> go.Figure:
    """A grid of small RGB images (N, h, w, 3) in [0, 1], each with a title, as one image trace."""
    n, h, w = pictures.shape[:3]
    ncols = min(ncols, n)
    py, px = max(3, h // 2), max(1, w // 8)
    grid = images.tile_grid(pictures, ncols, (py, px), fill=1.0)
    fig = go.Figure(go.Image(z=np.clip(grid, 0, 1) * 255, hoverinfo="skip"))
    return _grid_layout(fig, n, ncols, h, w, py, px, titles, height_per_row / (h + py))


def overlay(image: np.ndarray, amap: np.ndarray, signed: bool, title: str) -> go.Figure:
    """An attribution map over its image: red/blue for signed maps (for/against), hot for magnitudes."""
    fig = go.Figure(_image_trace(image, "image"))
    peak = max(float(np.abs(amap).max()), 1e-12)
    fig.add_heatmap(z=amap, opacity=0.6, zmin=-peak if signed else 0, zmax=peak,
                    colorscale="RdBu_r" if signed else "Hot", reversescale=not signed,
                    colorbar=dict(thickness=12), hovertemplate="x=%{x} y=%{y}<br>attribution=%{z:.3g}<extra></extra>")
    _square(fig)
    return _tidy(fig, 320, title)


def atom_scores(scores: np.ndarray, labels: list[str], title: str) -> go.Figure:
    """Bars of per-atom attribution, strongest (by |score|) first; red pushed towards the class."""
    fig = go.Figure(go.Bar(x=labels, y=scores, marker_color=["#d62728" if s >= 0 else "#1f77b4" for s in scores],
                           hovertemplate="%{x}: %{y:.4g}<extra></extra>"))
    fig.update_xaxes(type="category")  # labels like "#4" would otherwise be parsed as numbers
    fig.update_yaxes(title="attribution (summed over positions)")
    return _tidy(fig, 280, title)
