"""Plotly figures for the app: each function takes plain numpy arrays and returns a figure.

Each figure is written as one plain spec (traces and layout as dicts) and validated once by
`go.Figure(spec)`: several times faster than building it with add_trace / update_layout calls,
which matters because the lambda fragment redraws its figures on every slider move.
"""
from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import plotly.graph_objects as go

from sdnet import images

# One colour per compared setting, the same in every chart of the page.
COLORS = {"current": "#d62728", "trained": "#1f77b4", "resnet": "#7f7f7f"}
MARGIN = dict(l=10, r=10, t=40, b=10)
# Plotly's toolbar (on hover: the camera and Streamlit's fullscreen, panels.PLOTLY_CONFIG drops the rest) sits in a
# strip this tall at the top right of every chart. Nothing but a title at its left goes there: over the legend, the
# titles or the tiles, it hid them. A legend starts under it and grows downwards (plotly then pushes the plot down).
TOOLBAR = 30
LEGEND = dict(orientation="h", xanchor="right", x=1.0, yref="container", yanchor="top")
TITLE = dict(y=1.0, yref="container", yanchor="top", pad=dict(t=7))
NO_AXIS = dict(visible=False, constrain="domain")
WIDTH = 900  # about the width of a chart in the page's main column, in CSS pixels
NARROW = 468  # ...and in an 800 px window, the narrowest the page is laid out for
# A tile chart's colour bar in a right margin of its own, its title along it: plotly widened the margin for a title
# on top ('l2 norm over channels'), narrowing the tiles below the width their chart's height was fitted to
COLORBAR = 84
TILE_COLORBAR = dict(thickness=12, x=1.0, xanchor="left", xpad=4)
# The charts' text in fonts the system has, not the page's web font (Source Sans): a chart's camera PNG is drawn from
# its SVG where web fonts are not loaded, in the system's sans-serif, wider than the layout measured in Source Sans,
# and the predictions' legend ran off the picture ("SDNet at trained λ=0.:"). The same font on both sides.
FONT = dict(family="Arial, 'Liberation Sans', Helvetica, sans-serif")
# px: a tile's titles are as large as fit their tiles' width and the gap above at the width the chart gets, up to
# TITLE_MAX, down to TITLE_FLOOR (in a phone's window, held at 8, they ran together); where titles with a
# parenthetical (a usage '#63 (12.3)', a key '(grey = 0)') would be under LONG_TITLE_MIN, they drop it ('#63')
TITLE_MAX = 12
TITLE_FLOOR = 5
LONG_TITLE_MIN = 8
TITLE_ROOM = 16  # px above a tile chart's first row, for its titles


def scale_ticks(lo: float, hi: float, n: int = 4) -> list[float]:
    """Round values for a colour bar from `lo` to `hi`: at most n + 1 and at least two inside it. Plotly's own
    (nticks=4) spaced ±4.4 at 5, leaving the bar a lone '0': about one range in ten had no scale to read."""
    span = hi - lo
    if not (span > 0 and math.isfinite(span)):
        return [lo]
    mag = 10.0 ** math.floor(math.log10(span / n))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if span / (m * mag) <= n * (1 + 1e-9))
    first = math.ceil(lo / step - 1e-9)
    ticks = [(first + i) * step for i in range(int((hi - first * step) / step + 1e-9) + 1)]
    return [0.0 if abs(t) < step * 1e-9 else float(f"{t:.12g}") for t in ticks]


def colorbar(title: str, lo: float, hi: float) -> dict[str, Any]:
    """A tile chart's colour bar from `lo` to `hi`, titled along it, labelled at `scale_ticks`."""
    ticks = scale_ticks(lo, hi)
    return dict(TILE_COLORBAR, title=dict(text=title, side="right"), tickmode="array", tickvals=ticks,
                ticktext=[f"{t:.3g}" for t in ticks])


def short_number(v: float) -> str:
    """A usage or score label, the same in every tab: 90.5 and 290, not 2.9e+02 (nor 91 in one tab, 90.5 in another)."""
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"


def usage_titles(channels: list[int], usage: np.ndarray) -> list[str]:
    """Tile titles of code channels (or the atoms they code): '#channel (usage)', the same in every tab."""
    return [f"#{c} ({short_number(usage[c])})" for c in channels]


def text_width(text: str, size: float) -> float:
    """About how wide `text` is, in pixels at font `size`, in the charts' font (FONT): 0.58 em a character, 0.34 em
    for the narrow ones, 0.68 for capitals (erring wide: in Arial digits are 0.56 em, '(', ')', '-' and 'r' 0.33,
    'A' 0.67; 'A(z)' at 11 px was wider than 0.58 em a letter)."""
    narrow = sum(ch in " .,:;|()'!-ijlrtI" for ch in text)
    capitals = sum(ch.isupper() and ch != "I" for ch in text)
    return size * (0.58 * (len(text) - narrow - capitals) + 0.34 * narrow + 0.68 * capitals)


LEGEND_LINE = 30  # characters: about 170 px, so an entry fits a half-width chart in an 800 px window
LEGEND_LINE_PX = 16  # the height of a further line of a legend entry


def legend_name(name: str) -> str:
    """A legend entry in lines of at most LEGEND_LINE characters, broken at spaces: plotly does not wrap them, and
    at 800 px 'λ=0.1 (layer2.0.conv1 0.15, layer3.1.conv2 0.15), 5 steps in conv1' ran off the chart's left edge,
    taking the other entries with it. A layer's λ stays beside its name: '(layer2.0.conv1' over '2)' read as two
    things."""
    number = r"[-+]?[\d.]+(e[-+]?\d+)?"
    words: list[str] = []
    for word in name.split(" "):
        # a number is one unit with the name before it ('layer2.0.conv1 2),'), a count with the noun after it
        # ('2 steps')
        if words and (re.fullmatch(number + r"[),]*", word) and not words[-1].endswith(",")
                      or re.fullmatch(r"\(?" + number, words[-1])):  # ('(3 layers with their own)')
            words[-1] += " " + word
        else:
            words.append(word)
    units: list[str] = []  # a bracket that fits a line is one unit: 'as trained' over '(λ=0.1, 2 steps)', not
    i = 0                  # '(λ=0.1,' over '2 steps)'
    while i < len(words):
        j = i
        while words[i].startswith("(") and j < len(words) - 1 and ")" not in words[j] and "(" not in words[j + 1]:
            j += 1
        group = " ".join(words[i:j + 1])
        if j > i and ")" in words[j] and len(group) <= LEGEND_LINE:
            units.append(group)
            i = j + 1
        else:
            units.append(words[i])
            i += 1
    lines: list[str] = []
    for word in units:
        if lines and len(lines[-1]) + 1 + len(word) <= LEGEND_LINE:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return "<br>".join(lines)


def _figure(data: list[dict[str, Any]], height: int, title: str | None = None, **layout: Any) -> go.Figure:
    base = dict(height=height, margin=MARGIN, title=dict(TITLE, text=title), legend=LEGEND, font=FONT)
    if sum(1 for trace in data if trace.get("name") and trace.get("showlegend", True)) > 1:
        # an em space after each entry: side by side, one entry's text ran into the next one's ('2 steps—trained')
        data = [dict(trace, name=legend_name(trace["name"]) + "\u2003") if trace.get("name") else trace
                for trace in data]
        # the legend's rows under the toolbar's strip (and the title in it) push the plot down: room for one row,
        # and for each further line of its tallest entry (with a two-line entry a one-class bar chart kept 15 px
        # for its three bars, and their labels overprinted)
        lines = max(trace["name"].count("<br>") + 1 for trace in data if trace.get("name"))
        legend = 24 + LEGEND_LINE_PX * (lines - 1)
        base.update(height=height + legend, legend=dict(LEGEND, y=1 - TOOLBAR / (height + legend)))
    return go.Figure(dict(data=data, layout=dict(base, **layout)))


def predictions(classes: list[str], series: list[tuple[str, str, np.ndarray]], k: int) -> go.Figure:
    """Grouped horizontal bars of class probabilities: the top-k classes of the first series,
    plus any class another series puts in its top-k. `series` is [(label, colour key, probs)]."""
    order = [int(i) for i in np.argsort(-series[0][2])[:k]]
    for _, _, p in series[1:]:
        order += [int(i) for i in np.argsort(-p)[:k] if i not in order]
    bars = [dict(type="bar", y=[classes[i] for i in order], x=[float(p[i]) for i in order], name=label,
                 orientation="h", marker_color=COLORS.get(color, color), text=[f"{p[i]:.1%}" for i in order],
                 # plotly shrinks an outside label to its bar's thickness (thin grouped bars: ~6 px text)
                 textposition="outside", textfont=dict(size=11), constraintext="none",
                 hovertemplate="%{y}: %{x:.2%}<extra>" + label + "</extra>")
            for label, color, p in series]
    top = max(float(p[i]) for _, _, p in series for i in order)
    end = min(1.0, top) * 1.2 + 0.02  # room for the labels outside the bars; no tick past 100% in it
    step = next(s for s in (0.01, 0.02, 0.05, 0.1, 0.2, 0.25) if end / s <= 6)
    ticks = [round(t * step, 2) for t in range(int(min(end, 1.0) / step + 1e-9) + 1)]
    # 14 px a bar and 8 a class, but at least 16 px a bar: the outside labels are 11 px text, and one class's bars
    # overprinted theirs
    bars_px = max(14 * len(order) * len(series) + 8 * len(order), 16 * len(series) + 8)
    # the category axis top down: plotly stacks a group's horizontal bars from the bottom, so each class's bars read
    # up in the legend's order (grey, blue, red under a legend of red, blue, grey); reversed, they read down in it
    return _figure(bars, 90 + bars_px, barmode="group", yaxis=dict(autorange="reversed"),
                   xaxis=dict(range=[0, end], tickvals=ticks, tickformat=".0%", title="probability"))


def across_depth(names: list[str], series: list[tuple[str, str, np.ndarray]], title: str, ytitle: str,
                 percent: bool = False) -> go.Figure:
    """One line per setting of a per-layer quantity, layers in forward order on the x axis."""
    # the trained λ dashed: at the trained λ the two lines coincide and the current one hid under it
    lines = [dict(type="scatter", x=list(names), y=np.asarray(values, dtype=float), mode="lines+markers", name=label,
                  line=dict(color=COLORS.get(color, color), dash="dash" if color == "trained" else "solid"),
                  hovertemplate="%{x}: %{y:" + (".1%" if percent else ".4f") + "}<extra>" + label + "</extra>")
             for label, color, values in series]
    return _figure(lines, 300, title, xaxis=dict(tickangle=-90),
                   yaxis=dict(title=ytitle, tickformat=".0%" if percent else None, rangemode="tozero"))


# Class lines of the λ path: a qualitative palette apart from the three setting colours above; its layer lines
# (the mean over layers, the first layer) in colours of their own too, since red and blue mean λ settings here.
# One a class (by its index: a class kept its colour as λ reordered the ones shown; cat went green to purple).
CLASS_COLORS = ("#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#393b79", "#637939",
                "#7b4173")
PATH_COLORS = {"mean": "#222222", "first": "#8c6d31"}  # (a class's colour on the chart beside them was confusing)


# One tick a decade on every λ axis: left to plotly, the wide chart labelled 2 and 5 between decades and the
# narrow ones some of them or none
LAM_AXIS = dict(type="log", title="λ (log scale)", dtick=1)


def _lam_marks(current: float, trained: float, silent_from: float | None, top: float) -> tuple[list, list]:
    """Vertical lines at the current and the trained λ, and a grey band from the λ where a code goes all zero."""
    # a λ of 0 (a model trained without sparsity, or the slider at it) is off the log axis: not marked
    shapes = [dict(type="line", x0=v, x1=v, y0=0, y1=1, yref="paper", line=dict(color=COLORS[key], dash=dash, width=2))
              for v, key, dash in ((trained, "trained", "dot"), (current, "current", "dash")) if v > 0]
    # each mark labelled on the chart (a camera PNG has no caption to say what the dotted line and the band are),
    # on the side of its line away from the other one: in a narrow chart a label ran over the other line
    notes = [dict(x=math.log10(v), y=y, yref="paper", text=text, showarrow=False, yanchor="top",
                  xanchor="left" if v >= other else "right", font=dict(color=COLORS[key], size=11))
             for v, other, y, text, key in ((current, trained, 1.0, f"λ={current:g}", "current"),
                                            (trained, current, 0.92, f"trained λ={trained:g}", "trained"))
             if v > 0 and (key == "current" or v != current)]
    if silent_from is not None:
        shapes.insert(0, dict(type="rect", x0=silent_from, x1=top, y0=0, y1=1, yref="paper", line_width=0,
                              fillcolor="rgba(127,127,127,0.15)", layer="below"))
        notes.append(dict(x=math.log10(silent_from), y=0.0, yref="paper", text="a code all 0", showarrow=False,
                          xanchor="left", yanchor="bottom", font=dict(color=COLORS["resnet"], size=10)))
    return shapes, notes


def lam_path_probs(lams: np.ndarray, probs: np.ndarray, classes: list[str], shown: list[int], current: float,
                   trained: float, silent_from: float | None) -> go.Figure:
    """Class probabilities along λ (log axis), one line per class in `shown`; the current and trained λ marked,
    and the λ from which some CSC code is all zero (the prediction no longer depends on the image) shaded."""
    lines = [dict(type="scatter", x=lams, y=probs[:, c], mode="lines+markers", name=classes[c], marker=dict(size=4),
                  line=dict(color=CLASS_COLORS[c % len(CLASS_COLORS)]),
                  hovertemplate="λ=%{x:g}: %{y:.1%}<extra>" + classes[c] + "</extra>")
             for c in shown]
    shapes, notes = _lam_marks(current, trained, silent_from, float(lams[-1]))
    return _figure(lines, 340, "Class probability along λ", shapes=shapes, annotations=notes,
                   xaxis=LAM_AXIS, yaxis=dict(title="probability", tickformat=".0%", range=[0, 1.02]))


def lam_path_layers(lams: np.ndarray, series: list[tuple[str, str, np.ndarray]], title: str, ytitle: str,
                    current: float, trained: float, silent_from: float | None, percent: bool = False) -> go.Figure:
    """Per-layer quantities along λ: one line per (label, colour, values)."""
    lines = [dict(type="scatter", x=lams, y=np.asarray(v, dtype=float), mode="lines", name=label,
                  line=dict(color=PATH_COLORS.get(color, color)),
                  hovertemplate="λ=%{x:g}: %{y:" + (".1%" if percent else ".4f") + "}<extra>" + label + "</extra>")
             for label, color, v in series]
    shapes, notes = _lam_marks(current, trained, silent_from, float(lams[-1]))
    return _figure(lines, 300, title, shapes=shapes, annotations=notes, xaxis=LAM_AXIS,
                   yaxis=dict(title=ytitle, tickformat=".0%" if percent else None, rangemode="tozero"))


def _rgb_trace(img: np.ndarray, hover: bool = True) -> dict[str, Any]:
    # 8-bit, as the screen shows it: the hover read 'rgb=[154.33871984481812, ...]'
    trace = dict(type="image", z=np.rint(np.clip(img, 0, 1) * 255).astype(np.uint8))
    if hover:
        trace["hovertemplate"] = "x=%{x} y=%{y}<br>rgb=%{z}<extra></extra>"
    else:
        trace["hoverinfo"] = "skip"
    return trace


def _tile_index(n: int, ncols: int, h: int, w: int, pad: tuple[int, int]) -> np.ndarray:
    """Each pixel's tile number in a tile_grid of n (h, w) tiles, NaN between tiles: for hover texts."""
    return images.tile_grid(np.stack([np.full((h, w), float(i)) for i in range(n)]), ncols, pad, fill=np.nan)


def _tile_text(texts: list[str], ncols: int, h: int, w: int, pad: tuple[int, int]) -> np.ndarray:
    """Each pixel's tile's text in a tile_grid of len(texts) (h, w) tiles, "" between tiles (no hover there)."""
    which = _tile_index(len(texts), ncols, h, w, pad)
    return np.where(np.isnan(which), "", np.array(list(texts) + [""], dtype=object)[
        np.nan_to_num(which, nan=len(texts)).astype(int)])


def _tiled(data: list[dict[str, Any]], n: int, ncols: int, h: int, w: int, py: int, px: int,
           titles: list[str], scale: float) -> go.Figure:
    """A figure of tile_grid pictures with a title above each tile (one or two text traces), pixels square, no axes;
    `scale` is the wanted screen pixels per picture pixel, less where the chart's width limits it. Its height follows
    the width the page gives it (`fitted_css`): a height fixed for one width left blank bands at another."""
    nrows = math.ceil(n / ncols)
    width, height = ncols * (w + px) - px, nrows * (h + py) - py  # the grid, in picture pixels
    # the first row's titles under the toolbar's strip; a colour bar in a right margin of its own
    bar = any(trace.get("colorbar") for trace in data)
    margin = dict(MARGIN, t=TOOLBAR + TITLE_ROOM, r=COLORBAR if bar else MARGIN["r"])
    sides, ends = margin["l"] + margin["r"], margin["t"] + margin["b"]  # screen pixels around the plot
    # the height at the wanted scale, or where the chart's width (100cqw) limits the scale, the height it gives;
    # the figure's own height (where no CSS applies) is the one at about the main column's width
    across = f"(100cqw - {sides}px)"  # the plot's width on the page
    fit = f"min({ends + height * scale:.1f}px, calc({across} * {height / width:.5f} + {ends}px))"
    own = min(scale, (WIDTH - sides) / width)  # the figure's own scale (see png below)
    # The titles' font is in screen pixels while the tiles shrink with the chart: in an 800 px window 16-character
    # titles ran into each other, and in a 1400 px window they stayed at the 8 px that fitted 800 px. So they are as
    # large as fit their tiles' width (4 px between titles) and the gap above them at the width the chart gets
    # (the first row's have TITLE_ROOM), up to TITLE_MAX, down to TITLE_FLOOR.
    def sizes(text: list[str]) -> tuple[str, int]:
        """The CSS size of these titles at the page's width, and their size at the figure's own width."""
        longest = max((text_width(t, 1) for t in text), default=0) or 1  # no titles (or empty ones): any size fits
        gap = f", {py * scale - 2:.2f}px, calc({across} * {py / width:.6f} - 2px)" if nrows > 1 else ""
        css = (f"clamp({TITLE_FLOOR}px, min({((w + px) * scale - 4) / longest:.2f}px, "
               f"calc({across} * {(w + px) / (width * longest):.6f} - {4 / longest:.3f}px){gap}), {TITLE_MAX}px)")
        fits = min(((w + px) * own - 4) / longest, py * own - 2 if nrows > 1 else TITLE_MAX)
        return css, max(TITLE_FLOOR, min(TITLE_MAX, math.floor(fits)))

    # no hover on titles: plotly hovers from the data, so a hidden one did too, and a text point within ~20 px beat
    # the tile's own hover (its values; the whole title there)
    def trace(text: list[str], size: int, shown: bool) -> dict[str, Any]:
        return dict(type="scatter", mode="text", text=text, textposition="top center", textfont=dict(size=size),
                    x=[(i % ncols) * (w + px) + (w - 1) / 2 for i in range(n)],
                    y=[(i // ncols) * (h + py) - 0.5 for i in range(n)], cliponaxis=False, hoverinfo="skip",
                    showlegend=False, opacity=1 if shown else 0)
    # Titles with a parenthetical ('#12 (57.6)') where they fit at LONG_TITLE_MIN or more, else without ('#12'; the
    # tile's hover says it): two text traces, the page's CSS showing the one for the chart's width (in a phone's
    # window the long ones were 6 px; 64 atoms in 16 columns had the short ones in any window). From `switch` px on
    # the long ones fit.
    short = [t.split(" (")[0] for t in titles]
    longest = max((text_width(t, 1) for t in titles), default=0)
    need = max((LONG_TITLE_MIN * longest + 4) / (w + px), (LONG_TITLE_MIN + 2) / max(py, 1e-9) if nrows > 1 else 0)
    switch = sides + width * need if short != titles and need <= scale else None
    (short_css, short_own), (long_css, long_own) = sizes(short), sizes(titles)
    css = dict(title_size=long_css)
    if short == titles:  # nothing to shorten
        labels = [trace(titles, long_own, True)]
    elif switch is None:  # the long ones never fit
        labels, css = [trace(short, short_own, True)], dict(title_size=short_css)
    else:  # the figure itself (its camera PNG, no CSS) shows the ones for its own width
        long_in_png = sides + width * own >= switch
        labels = [trace(short, short_own, not long_in_png), trace(titles, long_own, long_in_png)]
        css = dict(title_size=short_css, long_title_size=long_css, title_switch=math.ceil(switch))
    # Pixels are square by the chart's size alone (as wide as its tiles at the wanted scale, or the column), not by
    # plotly's scaleanchor (off, though plotly sets it for an image trace): plotly wrote the ranges it widened to keep
    # them square back into the figure, so after fullscreen or a resize (another shape) the tiles came back a quarter
    # as large, smaller at each round trip. So no zoom either (a drag's box of any shape would stretch them), and
    # Streamlit's fullscreen, which would, is hidden for these charts (panels._chart); values show on hover.
    fitted_width = f"min(100cqw, {sides + width * scale:.1f}px)"
    # The camera's PNG is drawn at one size, the figure's own (the chart at about the main column's width), whatever
    # the window: from the figure, where the page's CSS title size does not apply, so its titles were the narrow
    # chart's 8-9 px on 80 px tiles. The figure's titles are the size the CSS gives at that width.
    fixed = dict(NO_AXIS, scaleanchor=False, fixedrange=True)
    png = dict(png_width=round(sides + width * own), png_height=round(ends + height * own))
    return _figure(data + labels, png["png_height"], margin=margin,
                   meta=dict(fitted_height=fit, fitted_width=fitted_width, **css, **png),
                   xaxis=dict(fixed, range=[-0.5, width - 0.5]), yaxis=dict(fixed, range=[height - 0.5, -0.5]))


def fitted_css(fig: go.Figure) -> dict[str, Any] | None:
    """A tile chart's CSS lengths of its container's width (fitted_height, fitted_width, title_size; with titles in
    two lengths, long_title_size and title_switch, the container's width in px from which the long ones show) and its
    camera PNG's size in CSS pixels (png_width, png_height): None for the other charts."""
    meta = fig.layout.meta
    return dict(meta) if isinstance(meta, dict) and "fitted_height" in meta else None


def layer_maps(maps: list[tuple[str, np.ndarray]], rgb: bool, colorbar_title: str = "") -> go.Figure:
    """Side-by-side panels (input, A(z), residual): RGB images, or heatmaps on one shared colour scale."""
    n = len(maps)
    h, w = maps[0][1].shape[:2]
    pad = max(2, w // 10)
    titles = [t for t, _ in maps]
    stack = np.stack([m for _, m in maps])
    if rgb:
        trace = _rgb_trace(images.tile_grid(stack, n, (pad, pad), fill=1.0))
    else:
        grid = images.tile_grid(stack, n, (pad, pad), fill=np.nan)
        label = _tile_text(titles, n, h, w, (pad, pad))
        peak = float(images.finite_peak(stack))
        # all zero (a layer fed zeros): plotly's own scale then ran -0.5 to 0.5 in mid-teal, for a norm; as the code
        # maps do, 0 to 1 titled so
        title = colorbar_title if peak > 0 else f"{colorbar_title} (all 0)".strip()
        trace = dict(type="heatmap", z=grid, customdata=label, zmin=0, zmax=peak if peak > 0 else 1.0,
                     colorscale="Viridis", hoverongaps=False, colorbar=colorbar(title, 0, peak if peak > 0 else 1.0),
                     hovertemplate="%{customdata}<br>x=%{x} y=%{y}<br>value=%{z:.4f}<extra></extra>")
    return _tiled([trace], n, n, h, w, pad, pad, titles, 260 / (h + pad))


def code_grid(z: np.ndarray, channels: list[int], activity: np.ndarray, ncols: int = 8) -> go.Figure:
    """Heatmaps of the code's most active channels, on one colour scale, values on hover.

    One heatmap trace of the tiled channels (fast to build and to draw, however many tiles)."""
    n, (h, w) = len(channels), z.shape[1:]
    ncols = min(ncols, n)
    py, px = max(3, h // 2), max(1, w // 16)

    def tiled(a: np.ndarray) -> np.ndarray:
        return images.tile_grid(a, ncols, (py, px), fill=np.nan)
    ys, xs = np.indices((h, w))
    tile = np.nan_to_num(_tile_index(n, ncols, h, w, (py, px)), nan=0).astype(int)  # (between tiles: no hover)
    # the channel and its usage as its title rounds it (the title may be the short one; d3 cannot write 1,234 and
    # 91.2 with one format, so the rounding is short_number's and the format prints what it is given)
    usage = np.array([float(short_number(activity[c]).replace(",", "")) for c in channels])
    info = np.stack([np.asarray(channels, float)[tile], usage[tile],
                     tiled(np.broadcast_to(xs, (n, h, w))), tiled(np.broadcast_to(ys, (n, h, w)))], -1)
    vmax = images.finite_peak(z[channels])
    zero = not vmax > 0  # all zero (or NaN): a 0-to-1 scale saying so, not '0, 0.5p, 1p' (a scale up to 1e-12)
    low, high = 0 if zero or np.nanmin(z) >= 0 else -vmax, 1.0 if zero else vmax
    heat = dict(type="heatmap", z=tiled(z[channels]), customdata=info, zmin=low, zmax=high, colorscale="Viridis",
                hoverongaps=False, colorbar=colorbar("z (all 0)" if zero else "z", low, high),
                hovertemplate="channel %{customdata[0]} (Σ|z| %{customdata[1]:,.12~g}; x=%{customdata[2]}, "
                              "y=%{customdata[3]})<br>z=%{z:.4f}<extra></extra>")
    # "#channel (Σ|z|)" as in the Atoms tab: "ch 2 (Σ|z|=91.2)" overlapped its neighbours in an 800 px window
    return _tiled([heat], n, ncols, h, w, py, px, usage_titles(channels, activity), 126 / (h + py))


def tiles(pictures: np.ndarray, titles: list[str], ncols: int = 8, height_per_row: int = 110) -> go.Figure:
    """A grid of small RGB images (N, h, w, 3) in [0, 1], each with a title, as one image trace."""
    n, h, w = pictures.shape[:3]
    ncols = min(ncols, n)
    py, px = max(3, h // 2), max(2, (w + 1) // 2)  # room for each title
    grid = images.tile_grid(pictures, ncols, (py, px), fill=1.0)
    # each tile's whole title on hover (its title may be the short one), none between tiles
    picture = dict(_rgb_trace(grid, hover=False), hovertext=_tile_text(titles, ncols, h, w, (py, px)), hoverinfo="text")
    return _tiled([picture], n, ncols, h, w, py, px, titles, height_per_row / (h + py))


def overlay(image: np.ndarray, amap: np.ndarray, signed: bool, title: str) -> go.Figure:
    """An attribution map over its image: red/blue for signed maps (for/against), hot for magnitudes; a tile chart
    of one tile, titled above it (with plotly's scaleanchor each fullscreen round trip shrank it by a third)."""
    peak = max(images.finite_peak(amap), 1e-12)
    heat = dict(type="heatmap", z=amap, opacity=0.6, zmin=-peak if signed else 0, zmax=peak,
                colorscale="RdBu_r" if signed else "Hot", reversescale=not signed,
                colorbar=colorbar("attribution", -peak if signed else 0, peak),
                hovertemplate="x=%{x} y=%{y}<br>attribution=%{z:.3g}<extra></extra>")
    h, w = amap.shape
    return _tiled([_rgb_trace(image), heat], 1, 1, h, w, 0, 0, [title], 260 / h)


def atom_scores(scores: np.ndarray, labels: list[str], title: str) -> go.Figure:
    """Bars of per-atom attribution, strongest (by |score|) first; red pushed towards the class."""
    bars = dict(type="bar", x=labels, y=np.asarray(scores, dtype=float),
                marker_color=[COLORS["current"] if s >= 0 else COLORS["trained"] for s in scores],
                hovertemplate="%{x}: %{y:.4g}<extra></extra>")
    # category: labels like "#4" would otherwise be parsed as numbers; a short y title, summed over positions as the
    # caption says ('attribution (summed over positions)' ran past the plot's top into the title at 800 px)
    return _figure([bars], 280, title, xaxis=dict(type="category"), yaxis=dict(title="summed attribution"))


def lam_fit(fit: dict, residual: float, lam: float, noise: str) -> go.Figure:
    """Algorithm 1's fit: the (residual, best lambda) points of the training data, the clipped line
    through them, and where this image lands on it."""
    pts = fit.get("points") or []
    lo, hi = fit.get("lam_range", (0.0, float("inf")))
    rs = [p["residual"] for p in pts] + [residual]
    grid = np.linspace(min(rs) * 0.9, max(rs) * 1.1, 50)
    data = []
    if pts:
        data.append(dict(type="scatter", x=[p["residual"] for p in pts], y=[p["lam"] for p in pts], mode="markers",
                         name="training", marker=dict(color=COLORS["trained"], size=9),
                         customdata=[p.get("level") for p in pts],
                         hovertemplate="level %{customdata}<br>r=%{x:.4f}, best λ=%{y:g}<extra></extra>"))
    data.append(dict(type="scatter", x=grid, y=np.clip(fit["slope"] * grid + fit["intercept"], lo, hi), mode="lines",
                     name="fit", line=dict(color=COLORS["resnet"], dash="dash"), hoverinfo="skip"))
    data.append(dict(type="scatter", x=[residual], y=[lam], mode="markers", name="this image",
                     marker=dict(color=COLORS["current"], size=13, symbol="star"),
                     hovertemplate="r=%{x:.4f} -> λ=%{y:.4g}<extra></extra>"))
    where = f"of {', '.join(fit['layers'])}" if fit.get("layers") else "over the CSC layers"
    return _figure(data, 320, f"λ(r), {noise} noise", xaxis=dict(title=f"relative residual r {where} at the trained λ"),
                   yaxis=dict(title="best λ"))  # (a lone 'λ' turned on its side read as '<')
