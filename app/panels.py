"""The sections of the page, top to bottom. Each reads its widgets, calls `state`, and draws."""
from __future__ import annotations

import math
import re
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import streamlit as st
import torch

import sdnet
from sdnet import attribution, images

from . import plots, state

OTHER_PATH = "Other path..."
RESIDUAL = "||x - A(z)|| / ||x||"  # the relative residual, on its charts' axes
# every chart saves itself as a PNG from its camera icon: at twice the screen's pixels, named by its key. Its toolbar
# keeps that icon and Streamlit's fullscreen, no zoom buttons: a drag still zooms (not on tile charts: plots._tiled)
# and a double click resets, and eight icons ran over the charts' titles and legends (plots.TOOLBAR keeps a strip)
PLOTLY_CONFIG = {"displaylogo": False, "toImageButtonOptions": {"format": "png", "scale": 2},
                 "modeBarButtonsToRemove": ["zoom2d", "pan2d", "select2d", "lasso2d", "zoomIn2d", "zoomOut2d",
                                            "autoScale2d", "resetScale2d"]}


@dataclass
class Context:
    """What the full page run hands to the live (lambda) fragment."""
    loaded: state.Loaded
    baseline: state.Loaded | None
    clean: np.ndarray
    image: np.ndarray
    image_info: dict[str, Any]
    corruption: dict[str, Any]
    device: str


# what makes Markdown inside a line (the value is one line: no lists, headings or tables), and Streamlit's own
# :color[...], :emoji: and $maths$
_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>!~$:])")


def _md_plain(value: Any, limit: int = 80) -> str:
    """A value from a checkpoint or its card as plain text in Markdown: one line, at most `limit` characters, its
    Markdown escaped. A card's dataset with a newline, a table row and an image link added a forged row to the
    model card and had the browser fetch the image."""
    text = " ".join(str(value).split())
    text = text if len(text) <= limit else text[:limit - 1] + "…"
    return _MD_SPECIAL.sub(r"\\\1", text)


def _chart(fig, key: str | None = None, name: str | None = None) -> None:
    """A plotly chart whose camera saves `name`.png (default: its key's stem), a layer's name in it where the chart
    is one layer's (the Export tab's names): every layer's code maps were saved as 'codes.png'."""
    filename = state.file_stem(name or (key or "chart").removesuffix("_chart"))
    css = plots.fitted_css(fig)
    image = {**PLOTLY_CONFIG["toImageButtonOptions"], "filename": filename}
    if css:  # the picture the figure's title sizes were made for, at any window's width
        image.update(width=css["png_width"], height=css["png_height"])
    config = {**PLOTLY_CONFIG, "toImageButtonOptions": image}
    if not (css and key):
        st.plotly_chart(fig, config=config, key=key)
        return
    # A tile chart, as large as its tiles at the width it gets: a box around it is the container its CSS sizes are
    # lengths of, and the chart stretches to them. No fullscreen: at the screen's shape its square pixels stretched
    # (plotly's own way of keeping them square broke the chart after fullscreen: plots._tiled)
    with st.container(key=f"{key}_box"):
        st.html(f"<style>.st-key-{key}_box {{container-type: inline-size}} "
                f".st-key-{key} {{height: {css['fitted_height']}; width: {css['fitted_width']}}} "
                f'.st-key-{key} .modebar-btn[data-title="Fullscreen"] {{display: none}} '
                f".st-key-{key} .textpoint text {{font-size: {css['title_size']} !important; "
                # plotly set them above their tiles for its own size: larger, their descenders ('(') reached in
                f"translate: 0 -2px}} {_long_titles_css(key, css)}</style>")
        st.plotly_chart(fig, config=config, key=key, height="stretch")


def _long_titles_css(key: str, css: dict) -> str:
    """A tile chart with titles in two lengths (plots._tiled: a text trace each, the short one first): the long ones
    from the container's width where they fit, at their own size; each shown one opaque (the figure shows only the
    ones for its own width, for the camera's PNG)."""
    if "title_switch" not in css:
        return ""
    # the last two scatter traces (the titles follow the pictures, whatever traces those are)
    short, long = (f".st-key-{key} .scatterlayer .trace:nth-last-child({i})" for i in (2, 1))

    def show(hidden: str, shown: str) -> str:  # !important: plotly writes the traces' display and opacity inline
        return f"{{{hidden} {{display: none !important}} {shown} {{opacity: 1 !important}}}}"
    return (f"{long} .textpoint text {{font-size: {css['long_title_size']} !important}} "
            f"@container (width < {css['title_switch']}px) {show(long, short)} "
            f"@container (width >= {css['title_switch']}px) {show(short, long)}")


def _picture_columns(key: str, spec: int | list[int]) -> list:
    """st.columns for a row of pictures, in a box keyed `key`: under 640 px (a phone's window) Streamlit stacks
    columns one to a row, so the clean image and the model input were a screen apart and each layer's 160 px picture
    sat alone in a row; there these keep two to a row (a wider column's text below them)."""
    with st.container(key=key):
        st.html(f"<style>@media (max-width: 640px) {{.st-key-{key} [data-testid=stColumn] "
                f"{{min-width: calc(50% - 0.5rem)}}}}</style>")  # two and the columns' 1rem gap: the row's width
        return st.columns(spec)


def _command_lines(command: str) -> str:
    """A stored shell command with each long option on a line of its own (bash continuations), as it is shown in a
    narrow box: on one wrapped line it broke inside options ('--no-' over 'shortcut') and left '--' at a line's
    end. It runs as it is when pasted. One that is not shell words (an unbalanced quote) is shown as it is."""
    try:
        words = shlex.split(command)
    except ValueError:
        return command
    lines: list[list[str]] = []
    for word in words:
        if word.startswith("--") or not lines:
            lines.append([])
        lines[-1].append(shlex.quote(word))
    return " \\\n  ".join(" ".join(line) for line in lines)


def _code(text: str) -> str:
    """A user's file name or path inside markdown, as a code span: 'red.png' is not a colour directive there, nor
    ':smile:' an emoji, nor '*x*' emphasis."""
    return "`" + str(text).replace("`", "'") + "`"


# PIL's mode names, in words where they are not ('Uploaded 640x480 1 image' was a 1-bit one)
_MODE_NAMES = {"1": "1-bit", "L": "grayscale", "LA": "grayscale+alpha", "P": "palette", "PA": "palette+alpha",
               "I": "32-bit integer", "F": "32-bit float", "I;16": "16-bit grayscale", "I;16B": "16-bit grayscale",
               "I;16L": "16-bit grayscale", "I;16N": "16-bit grayscale"}


def _wrappable(name: str) -> str:
    """A file or layer name for a picture's narrow caption: a zero-width space after each '.', ':', '/', '_' or '-'
    lets it wrap there ('layer1.1.' over 'conv2'), where it broke mid-word ('layer1.1.c' over 'onv2') at 800 px."""
    return re.sub(r"(?<=[.:/_-])(?=[^\s.:/_-])", "\u200b", name)


def _enlarge(x: np.ndarray, side: int = 224) -> np.ndarray:
    """(3, H, W) in [0, 1] -> uint8 (side, side, 3) with nearest neighbours: pixels stay pixels."""
    img = images.to_uint8(x)
    return images.enlarge(img, max(1, side // img.shape[0]))


# A transparent upload, composited onto white as the model takes it, merged with the white page: its picture shows
# the transparent parts on a checkerboard (images.on_checkerboard), and every picture has a thin grey frame.
FRAME = 0.8  # about the grey of the page's widget borders


def framed_picture(x: np.ndarray, alpha: np.ndarray | None = None, side: int = 224) -> np.ndarray:
    """An image as the page shows it: enlarged (`_enlarge`) in a thin grey frame, and where `alpha` (H, W) says
    the upload was transparent, on a checkerboard instead of the white that `x`, like the model, has there."""
    img = _enlarge(x, side).astype(np.float32) / 255
    h = img.shape[0]
    if alpha is not None:
        img = images.on_checkerboard(img, _enlarge(alpha, side).astype(np.float32) / 255, max(2, h // 16))
    edge = max(1, h // 112)  # 2 pixels at 224: one on the page, where the column shrinks the picture to half
    return images.to_uint8(np.pad(img, ((edge, edge), (edge, edge), (0, 0)), constant_values=FRAME))


# --- sidebar: model ----------------------------------------------------------------------------

def _show_card(loaded: state.Loaded) -> None:
    card, cfg = loaded.card, loaded.meta["config"]
    sb = st.sidebar
    if loaded.card_problems:
        sb.warning("The model card has fields of the wrong kind, left out: " + "; ".join(loaded.card_problems))
    if card is None:
        sb.warning("No model card beside this checkpoint (expected "
                   f"`{loaded.path.with_suffix('.json').name}`); showing what the file itself says.")
        card = {}
    training = card.get("training") or {}
    acc = card.get("test_accuracy")
    if acc is not None:
        acc_text = f"{acc:.2f}%" + (f" on {card['test_images']} test images" if card.get("test_images") else "")
    elif training.get("test_acc_during_training") is not None:  # written by sdnet.train, before an evaluation
        n = training.get("test_subset_during_training")
        acc_text = (f"{training['test_acc_during_training']:.2f}% at the end of training"
                    + (f" (on {n} test images)" if n else ""))
    else:
        acc_text = "not measured"
    name = str(card.get("name", loaded.path.stem))
    stem = loaded.path.stem
    shown = _md_plain(name)
    if name != stem and not name.startswith(f"{stem} ("):  # the run's, not the file's: sdnet18_all-w16.pt's card said -e3
        file = " ".join(loaded.path.name.replace("`", "'").split())
        shown += f"; file `{file}`"  # (a code span: no Markdown in it)
    rows = [("name", shown),
            ("architecture", f"{card.get('architecture', cfg['name'])}, width {card.get('width', cfg['width'])}, "
                             f"{'with' if card.get('shortcut', cfg.get('shortcut')) else 'no'} shortcuts"),
            ("test accuracy", acc_text),
            ("lambda / FISTA steps", f"{card.get('lam', cfg.get('lam'))} / {card.get('n_steps', cfg.get('n_steps'))}"
             if loaded.layer_names else "- (no CSC layer)"),
            ("data", card.get("data") or card.get("dataset") or loaded.meta.get("dataset", "?")),
            ("epochs", card.get("epochs", loaded.meta.get("epochs", "?"))),
            ("CSC layers", len(loaded.layer_names))]
    sb.markdown("\n".join(f"- **{k}**: {v if k == 'name' else _md_plain(v)}" for k, v in rows))
    if acc_text == "not measured":
        sb.warning("This checkpoint has no measured accuracy: it may be an untrained stand-in.")
    if training or card.get("evaluation") or card.get("robust_fit"):
        with sb.expander("How it was made", key="how_made"):
            # the sidebar's commands in a smaller type: at the page's 0.875rem a line held 20 characters
            st.html("<style>.st-key-how_made [data-testid=stCode] code {font-size: 0.75rem}</style>")
            if training.get("command"):
                # wrapped, as every command on the page: the fit's was cut at the popover's edge, scrolled sideways
                st.code(_command_lines(training["command"]), language="bash", wrap_lines=True)
                secs, where = training.get("seconds"), training.get("machine") or training.get("device")
                st.caption(" ".join(filter(None, ["Trained", f"in {secs / 60:.0f} min" if secs else None,
                                                  f"on {where}" if where else None])) + ".")
            if (card.get("evaluation") or {}).get("command"):
                st.code(_command_lines(card["evaluation"]["command"]), language="bash", wrap_lines=True)
            if card.get("robust_fit"):
                st.caption("Algorithm 1 fits for: " + ", ".join(card["robust_fit"]))


def model_sidebar(device: torch.device) -> tuple[state.Loaded, state.Loaded | None]:
    """Pick and load a checkpoint (stops the page with a message when there is none or it fails)."""
    sb = st.sidebar
    sb.header("Model")
    folder = state.checkpoint_dir()
    files = state.list_checkpoints(folder)
    labels = {p.name: state.checkpoint_label(p) for p in files}
    choice = sb.selectbox("Checkpoint", [*labels, OTHER_PATH], key="ckpt", format_func=lambda n: labels.get(n, n),
                          help=f"The checkpoints in {folder}, SDNet-All models first, each group most accurate first, "
                               "with their test accuracy and "
                               f"epochs from their cards (set ${state.CHECKPOINTS_ENV} for another folder).")
    if choice == OTHER_PATH:
        text = sb.text_input("Path to a checkpoint (.pt)", key="ckpt_path").strip()
        sb.caption("Not kept by a reload or a link of this page: its address names checkpoints in the folder only.")
        if not text:
            _address_names_model(None)
            if not files:
                st.warning(f"No checkpoints found in `{folder}`. Train one (then reload this page):")
                st.code(state.train_hint(folder), language="bash", wrap_lines=True)
                st.info("Or enter the path to a checkpoint in the sidebar.")
            else:
                st.info("Enter the path to a checkpoint in the sidebar.")
            st.stop()
        path = Path(text)
    else:
        path = folder / choice
    try:
        loaded = state.load(path, device)
    except sdnet.CheckpointError as e:
        _address_names_model(None if choice == OTHER_PATH else choice)
        st.error(f"Cannot load the checkpoint: {e}")
        st.caption("Pick another checkpoint in the sidebar, or give the path to a file written by "
                   "`python -m sdnet.train` / `sdnet.save_checkpoint`.")
        st.stop()
    _show_card(loaded)
    baseline = None
    base_path = state.baseline_path(loaded, folder) if loaded.layer_names else None
    if base_path is not None:
        _default("compare", True)  # (set in the session, as the address may: no value= beside it)
        if sb.toggle(f"Compare with the ResNet baseline ({base_path.name})", key="compare"):
            try:
                baseline = state.load(base_path, device)
            except sdnet.CheckpointError as e:
                sb.error(f"Cannot load the baseline: {e}")
    else:  # no toggle: no 'off' to keep (address_out writes baseline=0 from it alone)
        st.session_state.pop("compare", None)
        if loaded.layer_names:
            sb.caption("No ResNet baseline found beside this checkpoint.")
    return loaded, baseline


# --- sidebar: image and corruption ---------------------------------------------------------------

def image_sidebar(size: int) -> tuple[np.ndarray | None, dict[str, Any], images.PreparedImage | None]:
    """The clean model input (3, size, size), where it came from and, for an upload, how it was prepared (its
    opacity and a preview of the whole file, for display; else None); None (the message said) when there is no
    usable upload: the caller draws the rest of the sidebar, then stops."""
    sb = st.sidebar
    sb.header("Image")
    source = sb.radio("Source", ["Sample", "Upload"], horizontal=True, key="source")
    ss = st.session_state
    if source == "Sample":
        if "upload_kept" in ss:  # the file box forgets its file once not drawn: the page keeps it (below)
            ss["upload_away"] = True
        samples = state.list_samples()
        if not samples:
            st.error(f"No sample images in {state.SAMPLES}; upload an image instead.")
            st.stop()
        names = list(samples)
        default = state.DEFAULT_SAMPLE
        if _default("sample", default if default in names else names[0]) not in names:
            st.session_state["sample"] = names[0]
        name = sb.selectbox("CIFAR-10 test image", names, key="sample")
        clean = state.sample_image(str(samples[name]), size)
        return clean, dict(source=f"sample:{name}", path=str(samples[name].relative_to(state.ROOT)), notes=[],
                           label=name.rsplit("_", 1)[0]), None
    up = sb.file_uploader("Image file", type=list(images.SUFFIXES), key="upload",
                          help="Any size and mode; converted to RGB, resized and centre-cropped to the model's input.")
    if up is not None:
        name, data = up.name, up.getvalue()
        ss["upload_away"] = False
    elif ss.get("upload_away") and "upload_kept" in ss:
        # a look at a sample and back emptied the box, and the upload was gone (uploaded again by hand); a file
        # removed from the box (its x) is forgotten
        name, data = ss["upload_kept"]
        sb.caption(f"Using {_code(name)}, uploaded earlier (the box forgets its file while a sample is shown); "
                   "upload another to replace it.")
    else:
        ss.pop("upload_kept", None)
        st.info("Upload an image in the sidebar (PNG, JPEG, WebP, BMP, GIF, TIFF), or pick a sample.")
        return None, {}, None
    try:
        prep = state.upload_image(data, size)
    except images.ImageError as e:
        st.error(f"Cannot use {_code(name)}: {e}")
        st.caption("Upload another file, or pick a sample image in the sidebar.")
        return None, {}, None
    if up is not None:  # kept once usable: a file that could not be used replaced the good one kept before it
        ss["upload_kept"] = (name, data)
    return prep.tensor.numpy(), dict(source=f"upload:{name}", file_sha256=prep.file_sha256,
                                     original_size=list(prep.original_size), original_mode=prep.original_mode,
                                     notes=prep.notes), prep


def corruption_sidebar() -> dict[str, Any]:
    sb = st.sidebar
    sb.header("Corruption")
    kind = sb.selectbox("Noise (CIFAR-10-C)", state.CORRUPTIONS, key="noise")
    if kind == "none":
        return dict(kind="none", severity=None, seed=None)
    mode = sb.radio("Strength", STRENGTHS, horizontal=True, key="noise_mode", on_change=_carry_strength, args=(kind,))
    if mode == "Severity 1-5":
        _default("severity", 3)
        severity: int | float = sb.slider("Severity", 1, 5, key="severity")
    else:
        lo, hi, default, step = state.LEVELS[kind]
        _default(f"level_{kind}", default)
        severity = sb.slider("Level c" + (" (smaller is noisier)" if kind == "shot" else ""), lo, hi, step=step,
                             key=f"level_{kind}", format="%g")
    # no bounds on the widget: it showed a typed -3 while the page went on with the last seed in range, unsaid. A
    # float box ('%g': 7, not 7.00), so that a typed 1.5 reaches the page to be said: the integer box's browser side
    # cut it to 1 (and '1e3' to 1) before the page saw it
    _default("seed", 0)
    value = sb.number_input("Seed", step=1.0, format="%g", key="seed")
    typed = int(value)  # toward zero, as the integer box did
    seed = min(max(typed, 0), 2 ** 31 - 1)
    if typed != value:
        sb.warning(f"Seed {value} is not a whole number: using {seed}.")
    elif seed != typed:
        shown = typed if abs(typed) < 10 ** 12 else f"{value:g}"  # a typed 1e300 is not quoted in 301 digits
        sb.warning(f"Seed {shown} is outside 0 to 2147483647: using {seed}.")
    return dict(kind=kind, severity=severity, seed=seed, level=sdnet.corruptions.level(kind, severity))


STRENGTHS = state.STRENGTHS


def _carry_strength(kind: str) -> None:
    """Switching between a severity and a continuous level keeps the noise as strong as it was (impulse 5 turned
    into the level slider's default, severity 3's 0.03): the level of the severity, or the nearest severity."""
    levels = sdnet.corruptions.SEVERITY[kind]
    if st.session_state["noise_mode"] == STRENGTHS[1]:
        lo, hi, _, step = state.LEVELS[kind]
        c = levels[_default("severity", 3) - 1]
        st.session_state[f"level_{kind}"] = float(f"{min(max(round(c / step) * step, lo), hi):.6g}")
    elif f"level_{kind}" in st.session_state:
        c = st.session_state[f"level_{kind}"]
        st.session_state["severity"] = 1 + min(range(5), key=lambda i: abs(math.log(levels[i] / c)))


def show_inputs(clean: np.ndarray, image: np.ndarray, info: dict, corruption: dict,
                upload: images.PreparedImage | None = None) -> None:
    """The clean image (an upload's transparent parts on a checkerboard) and the model input (white there); of an
    upload that was cropped, the whole file too."""
    alpha = upload.alpha if upload is not None else None
    cols = _picture_columns("inputs", [1, 1, 2])
    cols[0].image(framed_picture(clean, alpha), caption=f"clean ({_code(_wrappable(info['source']))})")
    if corruption["kind"] == "none":
        cols[1].image(framed_picture(image), caption="model input (no corruption)")
    else:
        cols[1].image(framed_picture(image), caption=state.noise_text(corruption))
    with cols[2]:
        if info.get("label"):
            article = "an" if info["label"][:1].lower() in "aeiou" else "a"
            st.markdown(f"A CIFAR-10 test image of {article} **{info['label']}** (`{info['path']}`).")
        if info.get("original_size"):  # an upload (a 32x32 RGB one has no notes: said too, not left blank)
            w, h = info["original_size"]
            st.caption(f"Uploaded {w}x{h} {_MODE_NAMES.get(info['original_mode'], info['original_mode'])} image; "
                       + ("; ".join(info["notes"]) if info.get("notes") else "used as it is") + "."
                       + (" Its transparent parts are shown on a checkerboard; the model sees them white."
                          if alpha is not None else "")
                       + " A reload or a link of this page opens on a sample: an upload is not kept in its address.")
            if min(w, h) < max(w, h) / 2:  # the caption alone said it, in grey, of a crop shown as "clean"
                st.warning(f"Only the middle {min(w, h)}x{min(w, h)} of this {w}x{h} image is used "
                           f"({min(w, h) / max(w, h):.0%} of it): the model takes a square. Crop the image to the "
                           "part you want before uploading it.")
            side, size = min(w, h), clean.shape[-1]
            if side < size / 2:  # a 1x1 upload became a flat 32x32 square, with predictions and Auto λ as usual, unsaid
                st.warning(f"This image is smaller than the model's {size}x{size} input: its {side}x{side} "
                           f"{'square' if w == h else 'middle'} is enlarged {size / side:.3g}x, so the model sees a "
                           "blurred picture with little of the detail it was trained on.")
            if upload.preview is not None:  # the pictures on the left are the crop: what it left out
                ph, pw = upload.preview.shape[:2]  # no taller than the inputs' 224 px (a tall one filled a phone)
                st.image(upload.preview, width=max(1, min(pw, round(224 * pw / ph))))
                # (not the picture's caption: that is as wide as the picture, a word a line under a tall one)
                st.caption("The whole upload: the model is given the bright square.")
        psnr = _psnr(clean, image)
        if corruption["kind"] != "none":
            st.caption(f"Noise: c = {corruption['level']:g}, PSNR {psnr:.1f} dB against the clean image.")


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


# --- the live part: lambda controls and everything they change ----------------------------------

# The live part's widgets whose values must survive runs that do not draw them (a closed tab, a run
# stopped while no file is uploaded yet): Streamlit drops the state of an undrawn widget unless it
# is set again. So these widgets never take a default argument: `_default` sets their first value.
STICKY = ("lam", "n_steps", "steps_first", "lam_layers", "fit_noise", "topk", "tab", "layer", "n_codes", "atoms_layer", "n_atoms",
          "sees_layers", "sees_mode", "attr_which", "attr_class", "attr_methods", "attr_atom_method", "attr_live")
# The sidebar's, kept by the full run only (a fragment's run may not set a widget drawn outside it): a run stopped
# by a bad upload, or an image source or noise switched away and back, dropped the corruption and the sample.
SIDEBAR_STICKY = ("sample", "ckpt_path", "compare", "noise", "noise_mode", "severity", "seed")
SIDEBAR_PREFIX = "level_"  # each noise's continuous level
# ...of which these depend on the checkpoint (its layers, widths, classes) and start afresh with it.
PER_MODEL = ("lam_layers", "fit_noise", "fit_noise_for", "layer", "n_codes", "atoms_layer", "n_atoms", "sees_layers",
             "attr_class", "attr_result", "auto_lam")
VIEW_KEPT = ("layer", "n_codes", "atoms_layer", "n_atoms", "sees_layers")  # ...but for a model of the same layers
TABS = ("Layers", "λ path", "Atoms", "Attribution", "Export")
SEES_MODES = ("the code's own contribution (stretched)", "absolute pixels (with BatchNorm offsets)")


def _per_layer_key(name: str) -> str:
    return state.PER_LAYER_KEY + name


def keep_state(sidebar: bool = True) -> None:
    """Set the sticky widgets' values again, so that this run keeps them even if it does not draw them (the
    sidebar's too, unless this is the live fragment's own run)."""
    for k in list(st.session_state):
        if (k in STICKY or str(k).startswith(_per_layer_key(""))
                or (sidebar and (k in SIDEBAR_STICKY or str(k).startswith(SIDEBAR_PREFIX)))):
            st.session_state[k] = st.session_state[k]


def _shown_count(key: str, limit: int) -> int:
    """How many of a layer's channels its slider `key` shows: the count asked for (by the slider or the address),
    within this layer's `limit`. The asked one is kept for a wider layer: 40 atoms shown, a look at a layer of 16
    and back, and it was 16."""
    ss = st.session_state
    if key not in ss or ss[key] != ss.get(f"{key}_clamped"):  # set by the user or the address, not by a clamp here
        ss[f"{key}_asked"] = _default(key, state.SHOWN)
    ss[key] = ss[f"{key}_clamped"] = min(ss.get(f"{key}_asked", state.SHOWN), limit)
    return ss[key]


def _default(key: str, value: Any) -> Any:
    if key not in st.session_state:
        st.session_state[key] = value
    return st.session_state[key]


def reset_on_model_change(loaded: state.Loaded) -> None:
    """A new checkpoint starts at its own trained lambda and FISTA steps, with its own layers (the view's choices
    kept where they are the same layers); where the previous one's λ had been moved, a toast says so (a switch to
    the ResNet and back lost a λ of 1 without a word)."""
    if st.session_state.get("lam_model") == loaded.key:
        return
    ss = st.session_state
    moved = (ss.get("lam_model") is not None and "address_pending" not in ss and "lam" in ss and "n_steps" in ss
             and (ss.get("lam_trained") != (ss["lam"], ss["n_steps"]) or bool(ss.get("lam_layers"))))
    if moved:  # what was set, in words, before it goes
        own = {n: ss[_per_layer_key(n)] for n in ss.get("lam_layers", []) if _per_layer_key(n) in ss}
        was = state.setting_text(ss["lam"], own, ss["n_steps"],
                                 n_layers=len(ss.get("lam_model_shape", ((),))[0]) or None)  # (the previous model's)
    # what is looked at carries over to a model of the same layers (e30 against e40 on one layer): the Layers tab's
    # layer and count, the Atoms tab's; λ does not (each starts at its own trained λ)
    shape = (tuple(loaded.code_channels.items()), loaded.meta["config"].get("shortcut", True))
    kept = {k: ss[k] for k in VIEW_KEPT if k in ss} if ss.get("lam_model_shape") == shape and loaded.layer_names else {}
    for k in list(st.session_state):
        if k in PER_MODEL or str(k).startswith(_per_layer_key("")):
            del st.session_state[k]
    st.session_state.update(kept, lam_model_shape=shape)
    st.session_state["lam_model"] = loaded.key
    st.session_state["lam"] = float(next(iter(loaded.trained_lams.values()), 0.1))
    st.session_state["n_steps"] = loaded.trained_steps
    st.session_state["lam_trained"] = (st.session_state["lam"], st.session_state["n_steps"])
    st.session_state["lam_extra"] = []
    if moved:  # short: Streamlit cuts a toast's third line behind 'view more'
        st.toast(f"{was} reset: {loaded.path.name} starts at its trained {trained_text(loaded)}."
                 if loaded.layer_names else f"{was} dropped: {loaded.path.name} has no CSC layer.",
                 icon=":material/restart_alt:")


def address_in(loaded: state.Loaded | None = None) -> None:
    """The address's settings (a reload, a shared link, the browser's Back and Forward) into the widgets' state, on a
    session's first run and whenever the address is not the one this session last wrote: the sidebar's before the
    checkpoint loads, then (with `loaded`) λ, FISTA steps and the layer over its trained ones. What it cannot use is
    said, on the page. (Streamlit adds a history entry per address written: Back read nothing and so seemed dead.)"""
    ss = st.session_state
    if loaded is None:
        ours = {k: v for k, v in st.query_params.to_dict().items() if state.is_address_key(k)}
        back = "address_read" in ss  # not the first run: Back or Forward to another address of this session
        if back and ours == ss.get("address_written", ours):
            return
        ss["address_read"] = True
        ss["address_pending"] = ours, back  # for the view's part, once the checkpoint is loaded
        values, left_out = state.read_address(ours, [p.name for p in state.list_checkpoints(state.checkpoint_dir())],
                                              list(state.list_samples()), TABS)
        if back:  # an address without noise had none (on a first run it is none anyway), nor the baseline off
            values.setdefault("noise", "none")
            values.setdefault("compare", True)
        ss["address_left_out"] = left_out
        ss.update(values)
        return
    if "address_pending" not in ss:
        return
    ours, back = ss.pop("address_pending")
    left_out = ss.pop("address_left_out", [])
    if loaded.layer_names:
        deep = _deep_atoms(loaded)
        if not deep:  # the Atoms tab's deeper layers are for models without shortcuts
            shown = [k for k in ("atoms", "atoms_shown", "sees") if k in ours]
            if shown:
                left_out.append(f"{', '.join(shown)}: {loaded.path.name} has shortcuts (its Atoms tab shows the "
                                "first layer's alone)")
            ours = {k: v for k, v in ours.items() if k not in shown}
        values, view_left_out = state.read_address(ours, layers=loaded.layer_names,
                                                   max_steps=max(20, loaded.trained_steps),
                                                   classes=len(loaded.classes),
                                                   channels=max(loaded.code_channels.values()))
        left_out += view_left_out
        if back:  # ...nor 'in conv1 only', layers with their own λ, other counts shown or layers seen than the
            # defaults (the panels show at most the layer's channels)
            values = {"steps_first": False, "lam_layers": [], "topk": min(state.TOP_K, len(loaded.classes)),
                      "n_codes": state.SHOWN, **({"sees_layers": _spread(loaded.layer_names, 5),
                                                  "n_atoms": state.SHOWN} if deep else {}), **values}
        options = state.lam_options(loaded.trained_lams)
        # a λ from the address may be an Auto λ's: _auto_lam says so where it is the one the button sets
        ss["lam_from_address"] = any(k == "lam" or k.startswith(_per_layer_key("")) for k in values)
        # the sliders offer a λ off their grid, as they do an Auto λ
        ss["lam_extra"] = sorted({v for k, v in values.items() if (k == "lam" or k.startswith(_per_layer_key("")))
                                  and v not in options})
        ss.update(values)
    else:  # a ResNet: a link made on an SDNet, its model then switched, or edited; its one setting is top-k
        view = [k for k in ours if k in (*state.ADDRESS_VIEW, "tab") and k != "topk" or k.startswith(state.PER_LAYER)]
        if view:  # (no tabs)
            left_out.append(f"{', '.join(view)}: {loaded.path.name} has no CSC layer")
        values, top_left_out = state.read_address({k: v for k, v in ours.items() if k == "topk"}, layers=[],
                                                  classes=len(loaded.classes))
        left_out += top_left_out
        ss.update(values if values or not back else {"topk": min(state.TOP_K, len(loaded.classes))})
    if left_out:
        st.warning("Not used from the page's address (the page's own settings instead): " + "; ".join(left_out) + ".")


def _address_names_model(name: str | None) -> None:
    """The address with `name` as its checkpoint (None: none, a path), the rest as it is, for a page about to stop
    at the checkpoint (no path yet, or one that does not load) before address_out: the previous checkpoint's name
    stayed in the address, and a reload or a link opened that model under the error. Written only then: a
    write on a run that goes on is a history entry of its own, and Back landed on a half-made address."""
    ss = st.session_state
    wanted = {k: v for k, v in st.query_params.to_dict().items() if k != "model"}
    if name is not None:
        wanted = {"model": name, **wanted}
    if wanted != st.query_params.to_dict():
        ss["address_written"] = {k: v for k, v in wanted.items() if state.is_address_key(k)}  # ours: not a Back
        st.query_params.from_dict(wanted)


def address_out(ctx: Context) -> None:
    """The settings a reload or a link keeps (state.read_address) into the address bar, as they stand."""
    ss = st.session_state
    values = {k: ss[k] for k in ("tab", "ckpt", "sample") if k in ss and (k != "tab" or ctx.loaded.layer_names)}
    if ss.get("ckpt") == OTHER_PATH:  # a checkpoint given by its path is not kept (the sidebar says so)
        del values["ckpt"]
    if ss.get("source") != "Sample":  # nor is an upload
        values.pop("sample", None)
    if ss.get("compare") is False:  # the ResNet baseline switched off (a reload brought it back)
        values["compare"] = False
    kind = ctx.corruption["kind"]
    if kind != "none":  # the strength and seed used, not as typed (a seed of 1e10 is used as 2147483647)
        values.update(noise=kind, seed=ctx.corruption["seed"])
        if isinstance(ctx.corruption["severity"], int):
            values["severity"] = ctx.corruption["severity"]
        else:
            values.update(noise_mode=STRENGTHS[1], **{f"level_{kind}": ctx.corruption["severity"]})
    # how many are shown, where it is not the default (state.SHOWN, TOP_K, or all where there are fewer): a shorter
    # address
    channels = ctx.loaded.code_channels
    defaults = dict(topk=min(state.TOP_K, len(ctx.loaded.classes)),
                    n_codes=min(state.SHOWN, channels.get(ss.get("layer"), 0)),
                    n_atoms=min(state.SHOWN, channels.get(ss.get("atoms_layer"), 0)))
    values.update({k: ss[k] for k in ("topk",) if k in ss})
    if ctx.loaded.layer_names:
        values.update({k: ss[k] for k in ("lam", "n_steps", "steps_first", "layer", "lam_layers", "n_codes") if k in ss})
        values.update({_per_layer_key(name): ss[_per_layer_key(name)] for name in ss.get("lam_layers", [])
                       if _per_layer_key(name) in ss})
    if _deep_atoms(ctx.loaded):
        values.update({k: ss[k] for k in ("atoms_layer", "n_atoms", "sees_layers") if k in ss})
        if values.get("sees_layers") == _spread(ctx.loaded.layer_names, 5):  # the default: a shorter address
            del values["sees_layers"]
    for k, default in defaults.items():
        if values.get(k) == default:
            del values[k]
    wanted = state.address(values)
    ss["address_written"] = wanted
    if st.query_params.to_dict() != wanted:
        st.query_params.from_dict(wanted)


def _set_lam(value: float, note: str, layers: list[str] | None = None, trained: float | None = None,
             image: str | None = None) -> None:
    """Auto λ's button: λ for every CSC layer, or (a fit made in some layers) per-layer λ in those, with
    the slider for all layers back at the trained λ, as the fit measured it."""
    extra = st.session_state.get("lam_extra", [])
    st.session_state["lam_extra"] = extra if value in extra else [*extra, value]  # the sliders offer it from now on
    if layers:
        st.session_state["lam"] = trained
        st.session_state["lam_layers"] = list(dict.fromkeys([*st.session_state.get("lam_layers", []), *layers]))
        for name in layers:
            st.session_state[_per_layer_key(name)] = value
    else:
        st.session_state["lam"] = value
    st.session_state["auto_lam"] = (note, value, list(layers or []), trained, image)


def _auto_lam_held(image: str) -> str | None:
    """Is λ still where Auto λ set it? "current" for the same model input (its note, which quotes that image's
    residual, still describes it), "earlier image" for another one, None when λ has moved since."""
    note, value, layers, trained, for_image = st.session_state.get("auto_lam") or (None, None, [], None, None)
    if note is None:
        return None
    if not layers:
        held = st.session_state.get("lam") == value
    else:
        held = st.session_state.get("lam") == trained and all(
            n in st.session_state.get("lam_layers", []) and st.session_state.get(_per_layer_key(n)) == value
            for n in layers)
    return None if not held else "current" if for_image == image else "earlier image"


def lam_controls(ctx: Context, trained_probe: dict) -> tuple[state.LamSpec, state.StepsSpec, dict]:
    """The lambda slider, per-layer overrides, FISTA steps and Algorithm 1's auto lambda."""
    loaded = ctx.loaded
    options = state.lam_options(loaded.trained_lams, st.session_state.get("lam_extra", []))
    c1, c2, c3 = st.columns([3, 2, 2])
    lam_all = c1.select_slider("λ for all CSC layers (log scale)", options=options, key="lam",
                               format_func=lambda v: f"{v:g}",
                               help="The sparsity weight of every CSC layer, at inference only: the model is "
                                    "not retrained or changed (sdnet.override).")
    # up to 20, or the model's own count if it was trained with more
    first = loaded.layer_names[0] if len(loaded.layer_names) > 1 else None
    n_steps = c2.slider("FISTA steps", 1, max(20, loaded.trained_steps), key="n_steps",
                        help="Unrolled FISTA iterations per CSC layer" + (
                            "." if first is None else f"; with 'in {first} only' on, in the first CSC layer only, "
                            "where the image (and its noise) enters: the others keep the trained count."))
    first_only = False
    if first is not None:  # as sdnet.robust fista does by default: the image's layer only
        _default("steps_first", False)
        # no help= on the toggle (its ? is the slider's, above): Streamlit keeps a label with a tooltip to one line
        # and cut it to "in conv..." in an 800 px window; without one, the label wraps
        first_only = c2.toggle(f"in {first} only", key="steps_first")
    if n_steps != loaded.trained_steps and not first_only:
        c2.caption(f"In every CSC layer; trained with {loaded.trained_steps}. The deep layers learnt from "
                   f"{loaded.trained_steps}-step codes: other counts can swing the prediction to any class, "
                   "confidently (reports/robust-fista-all-layers.md; in the first layer only: "
                   "reports/robust-fista.md).")
    elif n_steps != loaded.trained_steps:  # 10 steps in conv1 turned the sample cat into a 99% truck, unsaid
        c2.caption(f"In {first} only; the others keep the trained {loaded.trained_steps}. The layers after it learnt "
                   f"from {loaded.trained_steps}-step codes of {first}: other counts can swing the prediction too "
                   "(reports/robust-fista.md: accuracy falls as the count grows).")
    with c3:
        _auto_lam(ctx, trained_probe)
    # open once some layer has had its own λ: a link with one (Auto λ writes them) showed its slider folded away.
    # Kept open from then on: the browser folds it when this turns false, under the hand that took the last layer off
    opened = st.session_state["per_layer_opened"] = bool(st.session_state.get("per_layer_opened")
                                                          or st.session_state.get("lam_layers"))
    with st.expander("Per-layer λ", expanded=opened):
        # in the network's order, as the Layers tab lists them (they came in the order they were added)
        depth = {n: i for i, n in enumerate(loaded.layer_names)}
        st.session_state["lam_layers"] = sorted(_default("lam_layers", []), key=lambda n: depth.get(n, len(depth)))
        chosen = st.multiselect("Layers with their own λ", loaded.layer_names, key="lam_layers")
        for key in [k for k in st.session_state if str(k).startswith(_per_layer_key(""))
                    and str(k).removeprefix(_per_layer_key("")) not in chosen]:
            del st.session_state[key]  # a layer taken off and added back starts at λ for all (it came back at its
            # old λ, unseen: at 10 it cut the image off again)
        per_layer = {}
        for name in chosen:
            _default(_per_layer_key(name), lam_all)
            per_layer[name] = st.select_slider(f"λ for {name}", options=options, key=_per_layer_key(name),
                                               format_func=lambda v: f"{v:g}")
    spec = state.lam_spec(loaded.layer_names, lam_all, per_layer)
    steps = state.steps_spec(loaded.layer_names, int(n_steps), first_only, loaded.trained_steps)
    return spec, steps, dict(all=lam_all, per_layer=per_layer)


def _recognise_auto_lam(pressed: tuple) -> None:
    """A link made with Auto λ kept λ but not the button's note, so its 0.431 in conv1 looked set by hand: where the
    address's λ is just what the button sets for this image (`pressed`: _set_lam's record), the note is back."""
    ss = st.session_state
    before = ss.get("auto_lam")
    ss["auto_lam"] = pressed
    if _auto_lam_held(pressed[4]) is None:  # some other λ: what was there stays
        ss["auto_lam"] = before


def _auto_lam(ctx: Context, trained_probe: dict) -> None:
    loaded = ctx.loaded
    from_address = st.session_state.pop("lam_from_address", False)  # once, on the run the address was read
    fits = (loaded.card or {}).get("robust_fit") or {}
    if not fits:
        st.button("Auto λ (Algorithm 1)", disabled=True, key="auto_lam_btn")
        st.caption("Needs the λ-vs-residual fit of Algorithm 1 on the model card; make it with "
                   f"`{state.fit_hint(loaded.path)}`")
        return
    kinds = list(fits)
    _default("fit_noise", ctx.corruption["kind"] if ctx.corruption["kind"] in kinds else kinds[0])
    # the fit follows the noise picked in the sidebar (it stayed on its first value: impulse noise got the Gaussian
    # fit's λ); picked here by hand, it holds until the sidebar's noise changes again
    if ctx.corruption["kind"] in kinds and st.session_state.get("fit_noise_for") != ctx.corruption["kind"]:
        st.session_state["fit_noise"] = ctx.corruption["kind"]
    st.session_state["fit_noise_for"] = ctx.corruption["kind"]
    noise = st.selectbox("Fit for noise", kinds, key="fit_noise")
    fit = fits[noise]
    steps = fit.get("n_steps")  # the residual is measured as the fit measured it: trained λ, its FISTA steps
    probe = trained_probe if steps in (None, loaded.trained_steps) else \
        state.probe(loaded.model, loaded.key, ctx.image, None, int(steps))
    layers = fit.get("layers") or None
    try:
        r = sdnet.fit_residual(fit, {rec["name"]: rec["rel_residual"] for rec in probe["layers"]})
    except KeyError as err:  # a stale or hand-edited card
        st.button("Auto λ (Algorithm 1)", disabled=True, key="auto_lam_btn")
        st.caption(f"The {noise} fit on the model card does not match this model ({err.args[0]}); refit it with "
                   f"`{state.fit_hint(loaded.path)}`")
        return
    except ValueError as err:  # every layer the fit reads was fed zeros
        st.button("Auto λ (Algorithm 1)", disabled=True, key="auto_lam_btn")
        st.caption(f"Auto λ needs this image's residual at the trained λ: {err}.")
        return
    lam = float(f"{sdnet.adaptive_lam(fit, r):.3g}")  # 0.502, not a slider reading 0.502475
    where = f"in {', '.join(layers)}" if layers else "in every CSC layer"
    note = f"Algorithm 1 ({noise} fit): residual r = {r:.4f} at the trained λ gives λ = {lam:.4g} {where}" + (
        " (the other layers at the trained λ)." if layers else ".")
    trained = float(next(iter(loaded.trained_lams.values()), 0.1))
    image = images.image_hash(ctx.image)
    flat = fit["slope"] <= 0  # Algorithm 1 rests on a best λ that grows with the noise (and so with r)
    why_flat = (f"This fit's λ does not grow with the residual (slope {fit['slope']:.3g}): on its training data the "
                f"best λ did not rise with {noise} noise, so it is no recommendation for more noise.")
    # a flat fit said right under the button, as a warning: said last, in grey, after the other notes, the button's
    # 'Auto λ = 0.163' looked like a recommendation (the walk-through's find; a mark on the button itself was cut in
    # an 800 px window). In a few words: the whole sentence was 15 lines in this narrow column at 800 px, on the
    # first screen of the default model, and pushed the predictions below it; it is in the button's help
    st.button(f"Auto λ = {lam:.3g}", key="auto_lam_btn", on_click=_set_lam, args=(lam, note, layers, trained, image),
              help=f"Sets λ {where} from this image's relative residual there at the trained λ "
                   "(paper, Algorithm 1)." + (f" {why_flat}" if flat else ""))
    if flat:
        st.warning(f"Flat fit (slope {fit['slope']:.3g}): λ does not rise with the noise.")
    if from_address:
        _recognise_auto_lam((note, lam, list(layers or []), trained, image))
    held = _auto_lam_held(image)
    if held == "current":
        st.caption(st.session_state["auto_lam"][0])
    elif held == "earlier image":  # the per-layer λ stayed, its explanation went, unsaid (a review)
        _, value, layers, _, _ = st.session_state["auto_lam"]
        in_layers = f" in {', '.join(layers)}" if layers else ""
        st.caption(f"λ{in_layers} is still Auto λ's {value:g} for an earlier image; press Auto λ for this one.")
    seen = [p["residual"] for p in fit.get("points", []) if isinstance(p.get("residual"), (int, float))]
    if ctx.corruption["kind"] != noise:
        st.caption(f"The image has {'no' if ctx.corruption['kind'] == 'none' else ctx.corruption['kind']} noise; "
                   f"this fit was made on {noise} noise.")
    elif seen and not min(seen) <= r <= max(seen):
        st.caption(f"r = {r:.3f} is outside the residuals the fit was made on ({min(seen):.3f}-{max(seen):.3f}): "
                   "λ is extrapolated (then clipped to the fit's λ range).")
    with st.popover("The fit"):
        if flat:
            st.caption(why_flat)
        _chart(plots.lam_fit(fit, r, lam, noise), key="fit_chart")
        if fit.get("command"):
            st.code(_command_lines(fit["command"]), language="bash", wrap_lines=True)


def _probe_timed(loaded: state.Loaded, x: np.ndarray, spec: state.LamSpec,
                 n_steps: state.StepsSpec) -> tuple[dict, float]:
    t0 = time.perf_counter()
    result = state.probe(loaded.model, loaded.key, x, spec, n_steps)
    return result, (time.perf_counter() - t0) * 1000


def trained_text(loaded: state.Loaded) -> str:
    """The trained λ and FISTA steps, as the current ones are said ('λ=0.1, 2 steps'): the 'trained' series run at
    both, and 'trained λ=0.1' beside 'λ=0.1, 10 steps' read as the same setting with two results."""
    lams = loaded.trained_lams
    first = next(iter(lams.values()))
    return state.setting_text(first, lams, loaded.trained_steps)


LOGITS_GROWN = 10  # a logit this many times the trained settings' largest: the prediction means little


FAINT = 0.05  # a code whose largest |z| is under this share of its largest at the trained settings


def _image_hardly_counts(ctx: Context, probed: dict, spec: state.LamSpec, n_steps: state.StepsSpec,
                         trained: dict) -> bool:
    """Whether the prediction `probed` (of ctx.image at these settings) is, every class within NEARLY_CUT, what a
    plain image and noise get too: the image hardly counts. Asked only where some
    code is FAINT against the trained settings' (the image can only fade out through one), so that the usual λ
    move runs no forward pass more."""
    faint = any(np.abs(r["z"]).max() < FAINT * np.abs(t["z"]).max() for r, t in zip(probed["layers"], trained["layers"]))
    if not faint:
        return False
    refs = state.reference_probs(ctx.loaded.model, ctx.loaded.key, tuple(ctx.image.shape), spec, n_steps)
    return bool(np.abs(refs - probed["probs"]).max() <= NEARLY_CUT)


def _silent(probed: dict) -> list[str]:
    """The CSC layers whose code is all zeros, in forward order."""
    return [r["name"] for r in probed["layers"] if not np.any(r["z"])]


def _classifies_when_trained(ctx: Context, trained: dict) -> bool:
    """Whether at its trained settings the model's prediction depends on this image."""
    return not _cuts_off(ctx.loaded, _silent(trained))  # (no code there is faint against its own)


def predictions_panel(ctx: Context, cur: dict, trained: dict, resnet: dict | None, lam_text: str,
                      spec: state.LamSpec = None, n_steps: state.StepsSpec = None) -> None:
    classes = ctx.loaded.classes
    if ctx.loaded.layer_names:
        series = [(f"SDNet at {lam_text}", "current", cur["probs"]),
                  (f"SDNet as trained ({trained_text(ctx.loaded)})", "trained", trained["probs"])]
    else:  # a ResNet: no λ, one prediction
        series = [(f"{ctx.loaded.meta['config']['name']} ({ctx.loaded.path.name})", "current", cur["probs"])]
    if resnet is not None:
        series.append((f"ResNet baseline ({ctx.baseline.path.name})", "resnet", resnet["probs"]))
    left, right = st.columns([3, 2])
    with right:
        # (at most the classes there are: a 3-class model after a 10-class one at top-5)
        st.session_state["topk"] = min(_default("topk", min(state.TOP_K, len(classes))), len(classes))
        k = st.slider("Top-k classes of each prediction", 1, len(classes), key="topk",
                      help="The chart shows the k most likely classes of every prediction compared, so it can list "
                           "more than k classes.")
    with right, st.container(key="prediction_summary"):
        # a list, not a table: the column is two fifths of the page, and at 800 px a table's probability column
        # was cut off however short its headers; a list wraps at any width
        lines = []
        for label, color, p in series:
            i = int(np.argmax(p))
            # the baseline's file is in the chart's legend
            lines.append(f"- {'ResNet baseline' if color == 'resnet' else label}: **{classes[i]}** {p[i]:.1%}")
        st.markdown("\n".join(lines))
        if cur["layers"]:
            dead = sum(r["input_zero"] for r in cur["layers"])
            fmt = lambda v: "undefined" if v is None else f"{v:.4f}"  # noqa: E731
            st.markdown(f"Mean relative residual over the CSC layers: **{fmt(cur['mean_rel_residual'])}** "
                        f"(as trained: {fmt(trained['mean_rel_residual'])})"
                        + (f"; {dead} layer(s) fed all zeros left out" if dead else ""))
    with left:
        _chart(plots.predictions(classes, series, k), key="pred_chart", name="predictions")
    silent = _silent(cur)

    def advice() -> str:  # where to see it classify: 'Lower λ' was said at 1 FISTA step too, where no λ helps
        return (f" At its trained settings ({trained_text(ctx.loaded)}) the model classifies this image."
                if lam_text != trained_text(ctx.loaded) and _classifies_when_trained(ctx, trained) else "")
    if silent:
        if _cuts_off(ctx.loaded, silent):
            effect = (f"from {silent[0]} on nothing depends on the image, so this prediction is the same for any "
                      "input")
        else:
            effect = "past them only the shortcuts carry the image"
        st.warning(f"{len(silent)} CSC layer(s) output an all-zero code at these settings "
                   f"({', '.join(silent[:4])}{', ...' if len(silent) > 4 else ''}): {effect}.{advice()}")
    elif _image_hardly_counts(ctx, cur, spec, n_steps, trained):  # codes near zero, not all: said nothing, 'cat' for any image
        st.warning(f"At these settings the prediction hardly depends on the image: the training images' mean colour "
                   f"and random noise get the same, every class within {NEARLY_CUT * 100:g} point.{advice()}")
    # more FISTA steps than trained make deep activations grow about tenfold a layer (the shipped SDNet-18-All's
    # largest logit: 3x at 3 steps, 1e4x at 5, 1e9x at 8; moving λ alone stays within about 1.2x): say so, as
    # softmax then shows 100% for some class and attributions of 1e15 look like findings
    big, usual = float(np.abs(cur["logits"]).max()), float(np.abs(trained["logits"]).max())
    if big > LOGITS_GROWN * usual:
        st.warning(f"The logits reach {big:.3g} (at the trained settings at most {usual:.3g}): the deeper layers get "
                   "activations far beyond those they were trained on, so this prediction's confidence, and any "
                   "attribution, says little about the image.")


def unnormalizer(loaded: state.Loaded):
    """Network-space (normalised) RGB -> displayable (H, W, 3) in [0, 1], with the model's own mean/std."""
    norm = loaded.model.normalize

    def f(a: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(np.ascontiguousarray(a)).unsqueeze(0).to(norm.mean.device)
        return norm.inverse(t)[0].clamp(0, 1).cpu().numpy().transpose(1, 2, 0)
    return f


def _ranked(z: np.ndarray, k: int | None = None) -> tuple[np.ndarray, list[int]]:
    """A code's channel activity and its channels, most active first (the first k)."""
    activity = images.channel_activity(z)
    return activity, [int(c) for c in np.argsort(-activity, kind="stable")[:k]]


def _attr_target(ctx: Context, cur: dict) -> int:
    classes, pred = ctx.loaded.classes, int(np.argmax(cur["probs"]))
    _default("attr_which", "predicted class")
    if st.session_state["attr_which"] == "predicted class":
        return pred
    return classes.index(_default("attr_class", classes[pred]))


def _attr_signature(ctx: Context, spec: state.LamSpec, n_steps: state.StepsSpec, target: int) -> tuple:
    methods = tuple(_default("attr_methods", ["integrated_gradients", "saliency"]))
    atom_method = _default("attr_atom_method", next(iter(attribution.LAYER_METHODS)))
    return (ctx.loaded.key, images.image_hash(ctx.image), spec, n_steps, target, methods, atom_method)


def build_view(ctx: Context, cur: dict, trained: dict, spec: state.LamSpec, n_steps: state.StepsSpec,
               lam: dict | None) -> state.View:
    """What the page shows for these settings, from the widgets' values (drawn or not: closed tabs too). A model
    without CSC layers (a ResNet: `lam` None) has no layer, atoms, codes or λ path: its view is the inputs, the
    prediction and the attribution, enough to export them."""
    loaded = ctx.loaded
    names = loaded.layer_names
    if names and _default("layer", names[0]) not in names:
        st.session_state["layer"] = names[0]
    layer = st.session_state["layer"] if names else None
    result = st.session_state.get("attr_result")
    target = _attr_target(ctx, cur)
    # an attribution computed for other settings is left out of the export (the Attribution panel says so)
    fresh = result is not None and result["signature"] == _attr_signature(ctx, spec, n_steps, target)
    attrs = dict(result["attributions"]) if fresh else {}
    atom_scores = result["atoms"] if fresh else None
    settings = settings_of(ctx, lam, spec, n_steps, layer, attrs, result["atom_method"] if fresh else None,
                           target if fresh else None)
    if not names:
        return state.View(settings=settings, classes=loaded.classes, clean=ctx.clean, image=ctx.image, probe=cur,
                          trained=trained, attributions=attrs)
    rec = state.layer_record(cur, layer)
    channels = rec["z"].shape[0]
    _shown_count("n_codes", channels)
    _, top = _ranked(rec["z"], st.session_state["n_codes"])
    first_name, first = sdnet.csc_layers(loaded.model)[0]
    _, order = _ranked(state.layer_record(cur, first_name)["z"])
    tiles = images.atom_tiles(first.weight.detach())[order]
    sees, stretch, more, offsets = None, None, {}, False
    if not loaded.meta["config"].get("shortcut", True):
        offsets = _default("sees_mode", SEES_MODES[0]) == SEES_MODES[1]
        sees = state.layer_sees(loaded.model, loaded.key, ctx.image, spec, n_steps, layer, offsets)
        stretch = None if offsets else state.sees_stretch(loaded.model, loaded.key, ctx.image, spec, n_steps, layer)
        more = _atoms_tab_pngs(ctx, cur, spec, n_steps, offsets, settings)
    held = _held(lam)
    extra = tuple(st.session_state.get("lam_extra", []))
    path_csv = None if len(held) == len(names) else (
        lambda: state.lam_path_csv(state.lam_path(loaded.model, loaded.key, ctx.image, held, n_steps, extra),
                                   loaded.classes))
    return state.View(settings=settings, classes=loaded.classes, clean=ctx.clean, image=ctx.image, probe=cur,
                      trained=trained, layer=layer, top_channels=top, atom_tiles=tiles, atom_order=order, sees=sees,
                      sees_offsets=offsets, sees_stretch=stretch, attributions=attrs, atom_scores=atom_scores,
                      more_pngs=more, lam_path_csv=path_csv)


def _held(lam: dict) -> tuple[tuple[str, float], ...]:
    """The layers with their own λ (Per-layer λ), which the λ path keeps while the slider's λ moves."""
    return tuple(sorted((name, float(v)) for name, v in lam["per_layer"].items()))


def _atoms_tab_pngs(ctx: Context, cur: dict, spec: state.LamSpec, n_steps: state.StepsSpec, offsets: bool,
                    settings: dict) -> dict:
    """Export makers of the Atoms tab's pictures as its widgets stand (drawn or not): what each chosen layer sees
    and the deeper atoms shown; each computed only when downloaded."""
    loaded, names = ctx.loaded, ctx.loaded.layer_names
    makers = {}
    for name in _default("sees_layers", _spread(names, 5)):
        if name in names:
            makers[f"{state.file_stem('sees', name)}.png"] = lambda n=name: state.sees_png(
                state.layer_sees(loaded.model, loaded.key, ctx.image, spec, n_steps, n, offsets), n, offsets, settings,
                zero=not np.any(state.layer_record(cur, n)["z"]),
                stretch=None if offsets else state.sees_stretch(loaded.model, loaded.key, ctx.image, spec, n_steps, n))
    deep = _default("atoms_layer", (names[1:] or names)[0])
    drec = state.layer_record(cur, deep)
    if drec is not None:
        usage, order = _ranked(drec["z"], st.session_state.get("n_atoms", state.SHOWN))
        makers[f"{state.file_stem('atoms', deep)}.png"] = lambda: state.deep_atoms_png(
            loaded.model, loaded.key, deep, tuple(drec["z"].shape), order, usage, settings)
    return makers


def layers_panel(ctx: Context, view: state.View, lam_text: str) -> None:
    cur, trained = view.probe, view.trained
    names = [r["name"] for r in cur["layers"]]

    def values(probe: dict, k: str) -> np.ndarray:  # a layer fed all zeros has no relative residual
        return np.array([np.nan if k == "rel_residual" and r["input_zero"] else r[k] for r in probe["layers"]])
    as_trained = f"as trained ({trained_text(ctx.loaded)})"
    series = lambda k: [(lam_text, "current", values(cur, k)),  # noqa: E731
                        (as_trained, "trained", values(trained, k))]
    dead = [r["name"] for r in cur["layers"] if r["input_zero"]]
    if dead:
        # not "every code upstream was thresholded to 0": after an all-zero code, BatchNorm's offsets still reach
        # the next layer unless ReLU cuts them all (at λ 10 every code was 0 and only 2 inputs were)
        st.warning(f"{len(dead)} layer(s) get an all-zero input at this λ: {', '.join(dead)}. What the layer before "
                   "passes on was all cut to 0 (its code by the threshold, then BatchNorm's offsets by ReLU), so "
                   "their relative residual is undefined and left out of the chart.")
    c1, c2 = st.columns(2)
    with c1:
        # short titles, the definitions on the axes: in half of an 800 px window a long one ran under the toolbar
        _chart(plots.across_depth(names, series("rel_residual"), "Relative residual", RESIDUAL), key="residual_chart")
    with c2:
        _chart(plots.across_depth(names, series("sparsity"), "Sparsity of z", "fraction of zeros", percent=True),
               key="sparsity_chart")
    table = pd.DataFrame({"layer": names, "λ": [r["lam"] for r in cur["layers"]],
                          # text, right-aligned as the numbers: a layer fed all zeros has none, and a NaN cell
                          # read "None" in the browser, whatever the style's na_rep
                          "relative residual": ["undefined" if r["input_zero"] else f"{r['rel_residual']:.5f}"
                                                for r in cur["layers"]],
                          "sparsity": [round(r["sparsity"], 4) for r in cur["layers"]],
                          # what FISTA minimises: more steps in conv1 lower its objective (334 -> 97 at 10) while the
                          # mean residual rises; deeper layers' inputs change with the steps before them, so theirs
                          # compare only at one input
                          "Lasso objective": [r["objective"] for r in cur["layers"]],
                          "code shape": [str(r["z"].shape) for r in cur["layers"]]})
    st.dataframe(table.style.format({"λ": "{:g}", "sparsity": "{:.1%}", "Lasso objective": "{:.4g}"}),
                 column_config={"relative residual": st.column_config.TextColumn(
                     alignment="right", help=f"{RESIDUAL}: undefined where the layer's input is all zeros"),
                     "Lasso objective": st.column_config.NumberColumn(
                     help="λ·||z||₁ + ½·||x − A(z)||², what the layer's FISTA steps minimise for its input x: "
                          "summed over the whole layer, so it grows with the layer's size; it compares two settings "
                          "only where the layer's input is the same in both (the first layer's is the image).")},
                 hide_index=True, height=min(35 * (len(table) + 1) + 3, 650))  # every layer (35 px rows), not 5 of 17
    c1, c2 = st.columns([2, 1])
    c1.selectbox("Layer", names, key="layer")
    rec = state.layer_record(cur, view.layer)
    c2.slider("Code channels shown (most active first)", 1, rec["z"].shape[0], key="n_codes")
    activity, _ = _ranked(rec["z"])
    rel = "undefined (all-zero input)" if rec["input_zero"] else f"{rec['rel_residual']:.4f}"
    counts = view.settings["n_steps"]  # every layer's, or {first layer: count} with the others at the trained one
    steps = counts if isinstance(counts, int) else counts.get(view.layer, ctx.loaded.trained_steps)
    st.caption(f"{view.layer}: input {rec['x'].shape}, code {rec['z'].shape}, λ = {rec['lam']:g}, {steps} FISTA "
               f"step{'s' if steps != 1 else ''}, relative residual "
               f"{rel}, {rec['sparsity']:.1%} zeros; {int((activity > 0).sum())} of "
               f"{len(activity)} code channels active for this image. Its code maps below: the most active channels "
               "first, each titled #channel (Σ|z|), the Σ|z| on hover where a tile is too narrow for it.")
    panels, rgb = state.recon_panels(rec, unnormalizer(ctx.loaded))
    shrunk = float(np.linalg.norm(rec["recon"]) / max(float(np.linalg.norm(rec["x"])), 1e-12))
    if rgb and shrunk < 0.9:  # a grey-green A(z) of a brown cat read as a colour-mapping bug (the walk-through)
        st.caption(f"A(z) is x shrunk toward zero by the threshold (||A(z)|| = {shrunk:.2f} ||x|| here, in the model's "
                   "normalised input): in pixels its colours are pulled toward the training images' mean colour, "
                   "each channel by its own amount, which can tint it.")
    # a short colour-bar title: a deep layer's chart is short, and 'l2 norm over channels' lost its 'l2' below it
    _chart(plots.layer_maps(panels, rgb, "l2 norm"), key="maps_chart",
           name=f"reconstruction_{view.layer}")
    _chart(plots.code_grid(rec["z"], view.top_channels, activity), key="codes_chart", name=f"codes_{view.layer}")


def _cuts_off(loaded: state.Loaded, silent: list[str]) -> bool:
    """Whether all-zero codes in the CSC layers `silent` (in forward order) cut the image off from the prediction:
    the first layer (the stem) has no shortcut around it, and without shortcuts any all-zero code cuts it off."""
    return bool(silent) and (silent[0] == loaded.layer_names[0] or not loaded.meta["config"].get("shortcut", True))


def _cut_off_from(ctx: Context, path: dict) -> float | None:
    """The smallest λ of the path from which the prediction no longer depends on the image at every larger λ."""
    names = path["layer_names"]
    cut = np.array([_cuts_off(ctx.loaded, [n for n, zero in zip(names, row) if zero]) for row in path["sparsity"] >= 1.0])
    if not cut[-1]:
        return None
    i = len(cut) - 1
    while i > 0 and cut[i - 1]:
        i -= 1
    return float(path["lams"][i])


def _run_texts(runs: list[tuple[int, float, float]], classes: list[str], opens: bool, closes: bool) -> list[str]:
    """'**cat** up to 0.15', '**deer** 0.2-0.25', '**cat** from 0.4' for runs of one class along λ; the first run says
    'up to' only where it `opens` the grid and the last 'from' only where it `closes` it (else both ends are named)."""
    last = len(runs) - 1
    return [f"**{classes[c]}** " + ("throughout" if opens and closes and last == 0 else
                                     f"up to {b:g}" if opens and i == 0 else f"from {a:g}" if closes and i == last
                                     else f"{a:g}" if a == b else f"{a:g}-{b:g}")
            for i, (c, a, b) in enumerate(runs)]


NEARLY_CUT = 0.01  # a λ's output within a point (every class) of the cut-off one: the image hardly counts there


def _path_headline(lams: np.ndarray, probs: np.ndarray, classes: list[str], cut: float | None) -> str:
    """'Prediction along λ: **frog** up to 0.15 · **deer** 0.2-0.25 · already at the cut-off output: **cat** 0.3
    (...) · from 0.4 the image is cut off (**cat** for any input)'. The λ just under the cut where this image's
    output is already within NEARLY_CUT of the cut-off one are said to be so: named as a run of their own, 'cat 0.3'
    read as the image recovering its class where its output was the cut-off one to a tenth of a point."""
    top = probs.argmax(1)
    live = lams < cut if cut is not None else np.ones(len(lams), dtype=bool)  # where the image still counts
    near = np.zeros(len(lams), dtype=bool)
    if cut is not None:
        at = int(np.argmax(~live))
        i = at
        while i > 0 and np.abs(probs[i - 1] - probs[at]).max() <= NEARLY_CUT:
            i -= 1
        near[i:at] = True
    spans = _run_texts(state.path_segments(lams[live & ~near], top[live & ~near]), classes, opens=True,
                       closes=cut is None)
    if near.any():
        # (this image's output, not the image cut off: at 0.3 other images still got other classes, so 'nearly cut
        # off ... the output for any input' claimed what held only from the cut on)
        spans.append("already at the cut-off output: " + ", ".join(_run_texts(
            state.path_segments(lams[near], top[near]), classes, opens=False, closes=False))
            + f" (every class within {NEARLY_CUT * 100:g} point of what any input gets from {cut:g})")
    if cut is not None:
        # cut off, the output is the same for any input, yet it can still move with the other layers' λ (a held
        # first layer cuts the whole path off): its runs are listed too, not only the class at the largest λ
        after = state.path_segments(lams[~live], top[~live])
        spans.append(f"from {cut:g} the image is cut off (**{classes[after[0][0]]}** for any input)" if len(after) == 1
                     else f"from {cut:g} the image is cut off, the same for any input: "
                     + ", ".join(_run_texts(after, classes, opens=False, closes=True)))
    return "Prediction along λ: " + " · ".join(spans)


def path_panel(ctx: Context, view: state.View, lam: dict, n_steps: state.StepsSpec) -> None:
    loaded, cur = ctx.loaded, view.probe
    held = _held(lam)
    with st.spinner("Following λ..."):  # on the slider's values, an Auto λ it offers among them
        path = state.lam_path(loaded.model, loaded.key, ctx.image, held, n_steps,
                              tuple(st.session_state.get("lam_extra", [])))
    if path is None:
        st.info("Every CSC layer has its own λ (Per-layer λ), so the slider moves none and there is no path to "
                "follow: take a layer out of that list.")
        return
    lams, probs, classes = path["lams"], path["probs"], loaded.classes
    top = probs.argmax(1)
    trained = next(iter(loaded.trained_lams.values()))
    cut = _cut_off_from(ctx, path)
    order = {name: i for i, name in enumerate(path["layer_names"])}
    own = [f"{name} {v:g}" for name, v in sorted(held, key=lambda h: order[h[0]])]  # named: which ones, at what λ
    where = ("every CSC layer" if not held else
             f"{len(path['swept'])} of {len(path['layer_names'])} CSC layers (the others keep their own λ: "
             + ", ".join(own[:3]) + (f" and {len(own) - 3} more" if len(own) > 3 else "") + ")")
    st.caption(f"The slider's λ in {where}, at each of its {len(lams)} values from {lams[0]:g} to {lams[-1]:g}, "
               "FISTA steps as set above: one forward per λ, for this image. The dashed line is the slider, the "
               "dotted one the trained λ.")
    st.markdown(_path_headline(lams, probs, classes, cut))
    if cut is not None:
        st.caption(f"Shaded, from λ={cut:g}: a CSC code is all zero, cutting the image off, so the prediction there is "
                   "the same for any input at each λ (the other layers' λ can still move it).")
    shown = list(dict.fromkeys([int(c) for c in top] + [int(c) for c in np.argsort(-cur["probs"])[:3]]))
    shown = sorted(shown, key=lambda c: -probs[:, c].max())[:len(plots.CLASS_COLORS)]
    _chart(plots.lam_path_probs(lams, probs, classes, shown, lam["all"], trained, cut), key="path_probs_chart")
    first = path["layer_names"][0]
    c1, c2 = st.columns(2)
    with c1:
        _chart(plots.lam_path_layers(lams, [("mean over layers", "mean", path["mean_rel_residual"]),
                                            (first, "first", path["rel_residual"][:, 0])],
                                     "Relative residual", RESIDUAL, lam["all"], trained, cut),
               key="path_residual_chart")
    with c2:
        _chart(plots.lam_path_layers(lams, [("mean over layers", "mean", path["sparsity"].mean(1)),
                                            (first, "first", path["sparsity"][:, 0])],
                                     "Sparsity of z", "fraction of zeros", lam["all"], trained, cut, percent=True),
               key="path_sparsity_chart")
    st.download_button("lam_path.csv", data=lambda: state.lam_path_csv(path, classes), file_name="lam_path.csv",
                       mime="text/csv", key="dl_lam_path", on_click="ignore",
                       help="Every class's probability and every layer's residual and sparsity at each λ of the path")


def atoms_panel(ctx: Context, view: state.View, spec: state.LamSpec, n_steps: state.StepsSpec) -> None:
    loaded, cur = ctx.loaded, view.probe
    names = loaded.layer_names
    usage, _ = _ranked(state.layer_record(cur, names[0])["z"])
    st.subheader(f"First-layer atoms ({names[0]}), most used by this image first")
    st.caption("Each tile is one atom (3 x k x k, unit norm); grey is 0. Usage is Σ|z| of its code channel.")
    _chart(plots.tiles(view.atom_tiles, plots.usage_titles(view.atom_order, usage),
                       ncols=8 if len(view.atom_order) <= 32 else 16, height_per_row=160),
           key="atoms_chart", name="atoms_first_layer")
    if not _deep_atoms(loaded):
        st.info("Deeper atoms and 'what a layer sees' need a model without shortcuts (SDNet-All, --no-shortcut): "
                "with shortcuts a layer's input is not the previous layer's reconstruction alone.")
        return
    st.subheader("Deeper atoms in pixel space")
    c1, c2 = st.columns([2, 1])
    deep = c1.selectbox("Layer", names[1:] or names, key="atoms_layer")
    drec = state.layer_record(cur, deep)
    channels = drec["z"].shape[0]
    _shown_count("n_atoms", channels)
    n = c2.slider("Atoms shown (most used first)", 1, channels, key="n_atoms")
    pix = state.pixel_atoms(loaded.model, loaded.key, deep, tuple(drec["z"].shape))
    dusage, dorder = _ranked(drec["z"], n)
    crop = images.crop_to_support(pix[dorder])
    st.caption(f"A unit code at the centre of one channel, pushed back to pixels through the chain of A's and "
               f"inverted BatchNorms (sdnet.decode_to_input, paper appendix B); shown in the "
               f"{crop.shape[-2]}x{crop.shape[-1]} window around the pixels they reach (their receptive field) "
               f"with a 1-pixel grey border. Grey is 0. Each title is #atom (usage: Σ|z| of its code channel for "
               "this image), as above.")  # the number in '#88 (0.647)' was said for the first layer's tiles only
    _chart(plots.tiles(images.atom_tiles(crop), plots.usage_titles(dorder, dusage), ncols=8,
                       height_per_row=120), key="deep_atoms_chart", name=f"atoms_{deep}")
    st.subheader("What each layer sees")
    st.caption("The layer's sparse code for this image decoded back to an image (no shortcuts, so the chain "
               "of A's and inverted BatchNorms reaches the pixels): what the layer keeps of the input. "
               "Deep layers' BatchNorm offsets swamp their codes in absolute pixels; the code's own "
               "contribution (offsets left out, contrast stretched) shows what the code carries, stretched by the "
               "factor under it: a large one means the code moves the pixels too little to see.")
    _default("sees_layers", _spread(names, 5))
    # in the network's order, whatever the order picked (as the layers with their own λ; the address keeps it)
    picks = st.multiselect("Layers", names, key="sees_layers", on_change=_in_network_order, args=(names,))
    offsets = st.radio("Show", SEES_MODES, key="sees_mode", horizontal=True) == SEES_MODES[1]
    if picks:
        # rows of SEES_PER_ROW pictures, the model input first: all 17 layers in one row were 45 px each, their
        # captions broken mid-word
        width = min(len(picks) + 1, SEES_PER_ROW)
        shown = [None, *picks]
        cols = [col for i in range(0, len(shown), width)
                for col in _picture_columns("sees_pictures" + (f"_{i // width + 1}" if i else ""), width)]
        cols[0].image(framed_picture(ctx.image, side=160), caption="model input")
        for col, name in zip(cols[1:], picks):
            img = state.layer_sees(loaded.model, loaded.key, ctx.image, spec, n_steps, name, offsets)
            zero = not np.any(state.layer_record(cur, name)["z"])  # stretched, an all-zero code is just black
            # stretched, a deep layer's contribution of 1e-10 of a pixel looked as vivid as the first layer's
            gain = None if offsets or zero else state.sees_stretch(loaded.model, loaded.key, ctx.image, spec,
                                                                   n_steps, name)
            col.image(framed_picture(img, side=160),
                      caption=_wrappable(name) + ((" (all-zero code: BatchNorm's offsets alone)" if offsets else
                                                   " (all-zero code: sees nothing)") if zero else
                                                  f" (×{state.factor_text(gain)})" if gain is not None else ""))


SEES_PER_ROW = 6  # 'what each layer sees' pictures a row (the model input and the five layers picked at first)


def _in_network_order(names: list[str]) -> None:
    """The layers picked for 'what each layer sees', in the network's order."""
    picked = set(st.session_state.get("sees_layers", []))
    st.session_state["sees_layers"] = [n for n in names if n in picked]


def _deep_atoms(loaded: state.Loaded) -> bool:
    """Whether the Atoms tab shows deeper layers (decoded to pixels: a model without shortcuts)."""
    return bool(loaded.layer_names) and not loaded.meta["config"].get("shortcut", True)


def _spread(names: list[str], n: int) -> list[str]:
    if len(names) <= n:
        return list(names)
    idx = np.linspace(0, len(names) - 1, n).round().astype(int)
    return [names[i] for i in dict.fromkeys(idx)]


def attribution_panel(ctx: Context, cur: dict, view: state.View, spec: state.LamSpec,
                      n_steps: state.StepsSpec) -> None:
    """Attribution widgets; computes on request (or live) and updates `view` with the result. A model without CSC
    layers (a ResNet) gets its input attribution only: it has no atoms."""
    loaded, classes = ctx.loaded, ctx.loaded.classes
    atoms_too = bool(loaded.layer_names)
    target = _attr_target(ctx, cur)
    signature = _attr_signature(ctx, spec, n_steps, target)
    # the methods on a row of their own: in a 700 px window three columns cut their chips and labels, and in 800 px
    # two chips (240 px) were still cut beside "Explain"
    methods = st.multiselect("Methods", list(attribution.METHODS), format_func=attribution.METHODS.get,
                             key="attr_methods")
    c1, c2 = st.columns([2, 3])
    which = c1.radio("Explain", ["predicted class", "another class"], key="attr_which", horizontal=True)
    if which == "another class":
        c1.selectbox("Class", classes, key="attr_class")
    # the methods' short names: "Layer Integrated Gradients" was cut in an 800 px window; the tooltip has the rest
    atom_method = None if not atoms_too else c2.selectbox(
        "Atom attribution", list(attribution.LAYER_METHODS), key="attr_atom_method",
        format_func=lambda m: attribution.LAYER_METHODS[m].removeprefix("Layer "),
        help=f"Which of {loaded.layer_names[0]}'s atoms drove the decision: "
             f"{' or '.join(attribution.LAYER_METHODS.values())} on its code, summed per channel (atom).")
    c3, c4 = st.columns([2, 3], vertical_alignment="center")
    run = c3.button("Compute attribution", type="primary", key="attr_run")
    live = c4.toggle("Recompute on every change", key="attr_live",
                     help="Attribution costs tens of forward passes; off, it runs when you press the button.")
    run = run or live
    result = st.session_state.get("attr_result")
    if run and (result is None or result["signature"] != signature):
        progress = st.progress(0.0, text="Attribution...")
        attrs, parts = {}, len(methods) + atoms_too
        for i, m in enumerate(methods):
            progress.progress(i / parts, text=f"{attribution.METHODS[m]}...")
            attrs[m] = state.explain(loaded.model, loaded.key, ctx.image, spec, n_steps, target, m)
        atoms = None
        if atoms_too:
            progress.progress(len(methods) / parts, text=f"{attribution.LAYER_METHODS[atom_method]}...")
            atoms = state.explain_atoms(loaded.model, loaded.key, ctx.image, spec, n_steps, target, atom_method)[1]
        progress.empty()
        first = cur["layers"][0] if cur["layers"] else None
        result = dict(signature=signature, attributions=attrs, atoms=atoms, target=target, atom_method=atom_method,
                      first_code=None if first is None else (first["name"], bool(np.any(first["z"])), first["lam"]),
                      hardly=_image_hardly_counts(ctx, cur, spec, n_steps,
                                                  state.probe(loaded.model, loaded.key, ctx.image, None, None)))
        st.session_state["attr_result"] = result
        view.attributions, view.atom_scores = attrs, atoms
        view.settings["attribution"] = dict(methods=list(attrs), atom_method=atom_method, target=target)
    if result is None:
        st.info("Press 'Compute attribution' to explain the decision (Integrated Gradients, Saliency, Occlusion)"
                + (", and to see which first-layer atoms drove it." if atoms_too else "."))
        return
    if result["signature"] != signature:
        st.warning("The settings changed since this attribution was computed (it is left out of the export); "
                   "press the button to update it.")
    st.caption(f"Explaining class **{classes[result['target']]}**; red pushed towards it, blue against "
               "(Saliency: magnitude only). Integrated Gradients starts from a black image.")
    shown = result["attributions"]
    if shown and not any(np.any(attr) for attr in shown.values()) and (result["atoms"] is None
                                                                          or not np.any(result["atoms"])):
        first = result.get("first_code")  # as it was when the attribution was computed
        why = (f"{first[0]}'s code was all zeros at λ = {first[2]:g}, so the prediction did not depend on the image"
               if first and not first[1] else "the prediction did not depend on the image")
        # (where the trained settings classify this image, these are not they: here it was cut off)
        trained = state.probe(loaded.model, loaded.key, ctx.image, None, None)
        advice = (f"; compute it again at the trained settings ({trained_text(loaded)}) to see what drives the "
                  "decision" if result["signature"] == signature and _classifies_when_trained(ctx, trained) else "")
        st.info(f"Every attribution is exactly zero: {why}{advice}.")
        return  # nothing to draw: blank maps and bars would only look like a failure
    if result.get("hardly"):  # maps of 4e-9 drawn at full colour looked like findings
        peak = max(float(np.abs(a).max()) for a in shown.values()) if shown else 0.0
        st.warning(f"At the settings of this attribution the prediction hardly depends on the image (a mean-colour "
                   f"image and noise get the same, every class within {NEARLY_CUT * 100:g} point): these maps, at most "
                   f"{peak:.2g}, show how little of the image gets through, not what the decision rests on.")
    methods = list(shown.items())
    for row in range(0, len(methods), 2):  # two a row: three in an 800 px window left each picture 51 px wide
        for col, (m, attr) in zip(st.columns(min(2, len(methods))), methods[row:row + 2]):
            amap = attribution.attribution_map(torch.from_numpy(attr), m).numpy()
            with col:
                _chart(plots.overlay(ctx.image.transpose(1, 2, 0), amap, attribution.SIGNED[m],
                                     attribution.METHODS[m]), key=f"attr_{m}", name=f"attribution_{m}")
    scores = result["atoms"]
    if scores is None:  # a model without CSC layers: no atoms
        return
    top, tiles, labels = state.strongest_atoms(scores, view.atom_tiles, view.atom_order)
    # a short title (a long one was cut at 700 px, and under the toolbar in a phone's window); the layer and what was
    # summed go in the caption
    _chart(plots.atom_scores(scores[top], [f"atom {c}" for c in top], "Atoms that drove the decision"),
           key="atom_attr_chart", name="attribution_atoms_bars")
    strongest = f"all {len(scores)} atoms" if len(scores) <= len(top) else f"the {len(top)} strongest atoms"
    st.caption(f"{attribution.LAYER_METHODS[result['atom_method']]} on {loaded.layer_names[0]}'s code, summed per "
               f"channel; {strongest}, strongest first by |score| (a negative one counts against the class).")
    # 8 a row: 16 labels ran together at 700 px
    _chart(plots.tiles(tiles, labels, ncols=8, height_per_row=90), key="atom_attr_tiles", name="attribution_atoms")


def export_panel(view: state.View, unnormalize) -> None:
    if view.probe["layers"]:
        st.caption("PNGs of what is on the page (the Atoms tab's as its settings stand), each titled with its layer, "
                   "the image, the noise and λ, and where colours stand for values, with its colour scale (the inputs "
                   "as plain images), and one ZIP with all of them, "
                   "the raw arrays (arrays.npz: x, z, A(z) and residual per layer), "
                   + ("the λ path (lam_path.csv), " if view.lam_path_csv is not None else "")  # (none: no layer
                   # follows the slider, every one has its own λ)
                   + "settings.json and reproduce.py, which recomputes this view from those two. Each chart saves "
                   "itself as a PNG from the camera icon in its top-right corner.")
    else:  # a model without CSC layers (a ResNet): no layers, atoms, λ or λ path to speak of
        st.caption("PNGs of the inputs (as plain images) and of the attribution maps computed above (each titled "
                   "with the model, the image and the noise, with its colour scale), and one ZIP with all of them, "
                   "the raw arrays (arrays.npz: the inputs, logits, probabilities and attributions), settings.json "
                   "and reproduce.py, which recomputes the logits from those two. Each chart saves itself as a PNG "
                   "from the camera icon in its top-right corner.")
    # side by side as many as fit, each as wide as its name: in two columns at 800 px a deep layer's
    # "reconstruction_layer4_1_conv2.png" was cut (and three columns cut shorter names at 700 px)
    with st.container(horizontal=True, key="export_buttons"):
        for name, make in state.export_png_makers(view, unnormalize).items():
            st.download_button(name, data=make, file_name=name, mime="image/png", key=f"dl_{name}",
                               on_click="ignore", help=f"Save {name}")
        if view.lam_path_csv is not None:
            st.download_button("lam_path.csv", data=view.lam_path_csv, file_name="lam_path.csv", mime="text/csv",
                               key="dl_path_csv", on_click="ignore", help="The λ path tab's table")
    stem = state.export_stem(view.settings)
    st.download_button("Download everything (ZIP)", data=lambda: state.export_zip(view, unnormalize),
                       file_name=f"{stem}.zip", mime="application/zip", key="dl_zip", type="primary",
                       on_click="ignore")
    with st.expander("settings.json"):
        st.code(state.settings_json(view.settings), language="json", wrap_lines=True)
    with st.expander("Reproduce in Python (reproduce.py in the ZIP)"):
        st.code(state.reproduce_snippet(view.settings), language="python", wrap_lines=True)  # none cut at 800 px


def settings_of(ctx: Context, lam: dict | None, spec: state.LamSpec, n_steps: state.StepsSpec, layer: str | None,
                attrs: dict, atom_method: str | None, target: int | None) -> dict[str, Any]:
    """settings.json: what the view was made from. λ and FISTA steps are None for a model without CSC layers (a
    ResNet), where they do not apply, as `layer` and `baseline` are None where there is none."""
    loaded = ctx.loaded
    path = loaded.path.resolve()
    shown = str(path.relative_to(state.ROOT)) if path.is_relative_to(state.ROOT) else str(path)
    severity = ctx.corruption.get("severity")
    return {
        "checkpoint": dict(path=shown, sha256=state.checkpoint_sha256(loaded.key, str(path)), model=loaded.title),
        "device": ctx.device,
        "image": dict(ctx.image_info, sha256=images.image_hash(ctx.clean), size=int(ctx.clean.shape[-1]),
                      model_input_sha256=images.image_hash(ctx.image)),
        # a severity 1..5, or None at a continuous level: that level read as 'severity 5.0' (shot's severity 5 is
        # c = 50, not 5); the level c either way
        "corruption": {"kind": ctx.corruption["kind"], "severity": severity if isinstance(severity, int) else None,
                       "seed": ctx.corruption.get("seed"), "level": ctx.corruption.get("level")},
        "lam": None if lam is None else dict(all=lam["all"], per_layer=lam["per_layer"],
                                             override=[list(p) for p in spec] if isinstance(spec, tuple) else spec,
                                             trained=loaded.trained_lams),
        "n_steps": state.as_override(n_steps),  # a count for every layer, or {first layer: count} (None: a ResNet)
        "layer": layer,
        "baseline": str(ctx.baseline.path.name) if ctx.baseline else None,
        "attribution": dict(methods=list(attrs), atom_method=atom_method, target=target),
        "sdnet_version": sdnet.__version__,
    }


@st.fragment
def explore(ctx: Context) -> None:
    """Everything that depends on lambda: rerun alone when a control inside it moves; of the tabs,
    only the open one is drawn."""
    keep_state(sidebar=False)
    loaded = ctx.loaded
    trained, _ = _probe_timed(loaded, ctx.image, None, None)
    resnet = state.probe(ctx.baseline.model, ctx.baseline.key, ctx.image, None, None) if ctx.baseline else None
    if not loaded.layer_names:
        st.info("This model has no CSC layers (a ResNet): λ has no effect, and there are no atoms or codes to show. "
                "Below: its predictions, what in the image drove them, and their export.")
        st.subheader("Predictions")
        predictions_panel(ctx, trained, trained, resnet, "trained")
        view = build_view(ctx, trained, trained, None, None, None)
        st.session_state["view"] = view
        st.subheader("Attribution")
        attribution_panel(ctx, trained, view, None, None)
        st.subheader("Export")  # after the attribution: one computed in this run is in it
        export_panel(view, unnormalizer(loaded))
        address_out(ctx)
        return
    st.subheader("Sparse coding: λ")
    spec, n_steps, lam = lam_controls(ctx, trained)
    cur, ms = _probe_timed(loaded, ctx.image, spec, n_steps)
    lam_text = state.setting_text(lam["all"], lam["per_layer"], state.as_override(n_steps),
                                  n_layers=len(loaded.layer_names))
    st.caption(f"Trace of all {len(cur['layers'])} CSC layers: {ms:.0f} ms on {ctx.device} (cached results are instant).")
    st.subheader("Predictions")
    predictions_panel(ctx, cur, trained, resnet, lam_text, spec, n_steps)
    view = build_view(ctx, cur, trained, spec, n_steps, lam)
    st.session_state["view"] = view
    _default("tab", TABS[0])
    layers_tab, path_tab, atoms_tab, attr_tab, export_tab = st.tabs(TABS, key="tab", on_change="rerun")
    if layers_tab.open:
        with layers_tab:
            layers_panel(ctx, view, lam_text)
    if path_tab.open:
        with path_tab:
            path_panel(ctx, view, lam, n_steps)
    if atoms_tab.open:
        with atoms_tab:
            atoms_panel(ctx, view, spec, n_steps)
    if attr_tab.open:
        with attr_tab:
            attribution_panel(ctx, cur, view, spec, n_steps)
    if export_tab.open:
        with export_tab:
            export_panel(view, unnormalizer(loaded))
    address_out(ctx)  # here, not in the full run only: this fragment's own runs move λ
