"""The app in a real browser: `streamlit run app/main.py`, driven by headless Chromium (Playwright).

Uploads an image, moves the lambda slider with the keyboard, checks that the predictions change, that
a second browser session keeps its own lambda, that a seed typed with a fraction is said and that
the training command fits the sidebar, and saves screenshots
to tests/artifacts/ (set SDNET_SCREENSHOT=path to also copy the main one there, e.g. assets/screenshot.png). In a
390 px (a phone's), an 800 px and a 1400 px window, checks that Streamlit's toolbar covers none of the page's first
lines, rows of pictures keep two side by side, no label is cut, no tile titles run together, the charts' toolbar
covers no title or legend, tile charts have no blank bands and the pictures' captions wrap names at their separators.
"""
from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from app import plots  # noqa: E402
from app.serve import (CHROMIUM, CHROMIUM_ARGS, IDLE, SUMMARY, choose_option, current_lam_row,  # noqa: E402
                       move_lam_to, serve, shown_lam, wait_for_lam)

ARTIFACTS = ROOT / "tests" / "artifacts"

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                 reason=f"Chromium not found at {CHROMIUM} (apt-get install chromium)")]


@pytest.fixture(scope="module")
def server(checkpoint_dir):
    """The app on a free local port, pointed at the test checkpoints; yields its URL (one server for the module:
    each test's browser sessions are their own)."""
    with serve(ARTIFACTS / "streamlit.log", env={"SDNET_CHECKPOINTS": str(checkpoint_dir), "OMP_NUM_THREADS": "1"}) as url:
        yield url


def upload_file(tmp_path: Path) -> Path:
    """A real CIFAR-10 test image, enlarged to 128x96 with an alpha channel: the app must convert it."""
    sample = Image.open(ROOT / "assets" / "samples" / "ship_1.png").convert("RGB").resize((128, 96), Image.BICUBIC)
    rgba = sample.convert("RGBA")
    rgba.putalpha(Image.fromarray(np.full((96, 128), 255, np.uint8)))
    path = tmp_path / "ship_photo.png"
    rgba.save(path)
    return path


def numbers(summary: str) -> tuple[list[str], float]:
    """SDNet's prediction and probability at the current λ, and the mean relative residual."""
    row = list(current_lam_row(summary)[1:])
    return row, float(re.search(r"Mean relative residual over the CSC layers: ([0-9.]+)", summary).group(1))


def test_upload_move_lambda_and_see_predictions_change(server, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1900})
            page.set_default_timeout(90_000)
            page.goto(server)
            summary = page.locator(SUMMARY)
            wait_for_lam(page, "λ=0.1,")
            initial = summary.inner_text()  # the default sample at the trained λ
            assert "CPU" in page.content() or "CUDA" in page.content()
            # a local tool: no "Deploy" to Community Cloud in its toolbar (.streamlit/config.toml)
            assert page.locator("[data-testid=stToolbarActions]").count() == 1
            assert page.locator("[data-testid=stAppDeployButton]").count() == 0
            # how the model was trained, in the sidebar's narrow box: one long option to a line, and in a type small
            # enough that only long values wrap (as one wrapped line, '--no-shortcut' broke after '--no-')
            page.locator("[data-testid=stSidebar]").get_by_text("How it was made").click()
            box = page.locator(".st-key-how_made [data-testid=stCode] code").first
            box.wait_for()
            text_lines = len(box.inner_text().strip().splitlines())
            shown_lines = box.evaluate("e => Math.round(e.getBoundingClientRect().height"
                                       " / parseFloat(getComputedStyle(e).lineHeight))")
            assert "  --no-shortcut \\" in box.inner_text().splitlines() and shown_lines <= text_lines + 4, (
                text_lines, shown_lines)
            page.locator("[data-testid=stSidebar]").get_by_text("How it was made").click()

            page.locator("[data-testid=stSidebar]").get_by_text("Upload", exact=True).click()
            page.locator("[data-testid=stSidebar] input[type=file]").set_input_files(str(upload_file(tmp_path)))
            page.get_by_text("Uploaded 128x96 RGBA image").wait_for()
            # the whole upload beside its crop, no taller than the input pictures (a tall one filled a phone)
            pictures = page.locator("[data-testid=stMain] [data-testid=stImage] img")
            page.get_by_text("The whole upload: the model is given the bright square.").wait_for()
            heights = [pictures.nth(i).bounding_box()["height"] for i in range(3)]
            assert pictures.count() == 3 and heights[2] <= heights[0] + 1, heights
            wait_for_lam(page, "λ=0.1,")
            before = summary.inner_text()
            page.screenshot(path=str(ARTIFACTS / "app-upload.png"))

            move_lam_to(page, 1.0)  # 0.1 -> 1 with the arrow keys, as a user would
            wait_for_lam(page, "λ=1,")
            after = summary.inner_text()
            # the numbers changed, not only the label: SDNet's probabilities and the mean residual
            (row_before, r_before), (row_after, r_after) = numbers(before), numbers(after)
            assert row_after != row_before and r_after != r_before, (before, after)
            page.wait_for_timeout(1500)  # let the charts finish drawing for the screenshot
            shot = ARTIFACTS / "app.png"
            page.screenshot(path=str(shot))

            # a second session on the same server (the same cached model) sees its own λ and image, and the
            # first keeps its own: each gets exactly what a lone session gets
            other = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
            other.set_default_timeout(90_000)
            other.goto(server)
            wait_for_lam(other, "λ=0.1,")
            move_lam_to(page, 0.8)  # one step left: the first session reruns at λ=0.8 with its own upload
            wait_for_lam(page, "λ=0.8,")
            assert other.locator(SUMMARY).inner_text() == initial
            at_08 = page.locator(SUMMARY).inner_text()
            assert "SDNet at λ=0.8," in at_08 and numbers(at_08)[1] not in (r_after, r_before)

            # the λ path tab draws its three charts for this image, the slider's λ marked on them
            page.get_by_role("tab", name="λ path").click()
            page.get_by_text("Prediction along λ:").wait_for()
            for key in ("path_probs_chart", "path_residual_chart", "path_sparsity_chart"):
                page.locator(f".st-key-{key} .main-svg").first.wait_for()
            probs = page.locator(".st-key-path_probs_chart")
            assert probs.get_by_text("λ=0.8").count() == 1  # the slider's line is labelled
            page.screenshot(path=str(ARTIFACTS / "app-lam-path.png"))
            # the address holds the view: λ moved in the live part (a fragment's own run) and the tab; a reload of
            # the other session opens on its settings, and a link of this one on this λ and tab
            address = parse_qs(urlparse(page.url).query)
            assert address["lam"] == ["0.8"] and address["tab"] == ["λ path"] and "image" not in address, page.url
            other.reload()
            wait_for_lam(other, "λ=0.1,")
            assert other.locator(SUMMARY).inner_text() == initial
            other.goto(page.url)
            wait_for_lam(other, "λ=0.8,")
            other.get_by_text("Prediction along λ:").wait_for()  # the λ path tab, open
            # the browser's Back steps back through this session's settings (it seemed dead: the page kept its own
            # and wrote them straight back): the tab, then λ 0.8 -> 1
            for _ in range(3):  # (each step waits for the address to change, not for a λ that step may not show)
                was = page.url
                page.go_back()
                page.wait_for_function("was => location.href !== was", arg=was, timeout=15_000)
                if parse_qs(urlparse(page.url).query).get("lam") == ["1"]:
                    wait_for_lam(page, "λ=1,")
                    break
            assert shown_lam(page) == 1.0 and parse_qs(urlparse(page.url).query)["tab"] == ["Layers"], page.url
            assert "Uploaded 128x96 RGBA image" in page.content()  # the upload kept (no image in the address)

            # a seed typed with a fraction reaches the page and is said: the integer box's browser side cut 1.5 to 1
            # (and '1e3' to 1) before the page saw it, and the noise changed with no word
            choose_option(page, "noise", "shot")
            seed = page.locator(".st-key-seed input")
            seed.fill("1.5")
            seed.press("Enter")
            page.locator("[data-testid=stSidebar]").get_by_text("Seed 1.5 is not a whole number: using 1.").wait_for()
            assert seed.input_value() == "1.5"
        finally:
            browser.close()
    if os.environ.get("SDNET_SCREENSHOT"):
        shutil.copy(shot, os.environ["SDNET_SCREENSHOT"])


# Text on the page (charts aside) that its box cuts: an ellipsis, or a field too narrow for its value
CUT_TEXT = """() => [...document.querySelectorAll('[data-testid=stMain] *')].filter(e => {
    if (e instanceof SVGElement || !(e.tagName === 'INPUT' ? e.type === 'text' && e.value : e.textContent.trim())) {
        return false;
    }
    const style = getComputedStyle(e);
    return e.scrollWidth > e.clientWidth + 1
        && (e.tagName === 'INPUT' || style.overflowX !== 'visible' || style.textOverflow !== 'clip');
}).map(e => e.value || e.textContent)"""
# A tile chart's titles on screen (plotly text points; of its two lengths, the one its width shows): [text, font size
# in px, width drawn in px, box] each
SHOWN = ("e => { const trace = e.closest('.trace');"  # (checkVisibility says yes under a display: none <g>)
         " return e.getBoundingClientRect().width > 0 && !(trace && getComputedStyle(trace).opacity === '0'); }")
TILE_TITLES = f"""(key) => [...document.querySelectorAll(`.st-key-${{key}} .textpoint text`)].filter({SHOWN}).map(
    e => [e.textContent, parseFloat(getComputedStyle(e).fontSize), e.getBBox().width, e.getBoundingClientRect().toJSON()])"""
# how many tiles a chart has, and the container's width from which it shows its long titles (none: one length)
TILE_COUNT = """(key) => { const g = document.querySelector(`.st-key-${key} .js-plotly-plot`);
    return [g.data.filter(t => t.type === 'scatter')[0].text.length, g.layout.meta.title_switch || null,
            document.querySelector(`.st-key-${key}_box`).getBoundingClientRect().width]; }"""


# A chart's toolbar buttons, what they must leave uncovered (its title, legend and tiles' titles), and its picture
CHART_BOXES = """(key) => {
    const SHOWN = """ + SHOWN + """;
    const root = document.querySelector(`.st-key-${key}`), box = e => e.getBoundingClientRect().toJSON();
    return {toolbar: [...root.querySelectorAll('.modebar-btn')].filter(e => e.getBoundingClientRect().width > 0)
                        .map(e => [e.dataset.title, box(e)]),
            labels: [...root.querySelectorAll('.gtitle, .legend, .textpoint text')].filter(SHOWN)
                        .map(e => [e.textContent, box(e)]),
            titles: [...root.querySelectorAll('.gtitle, .g-xtitle text, .g-ytitle text, .cbtitle text')]
                        .filter(e => e.textContent).map(e => [e.textContent, box(e)]),
            chart: box(root.querySelector('.main-svg')),
            picture: [...root.querySelectorAll('.imagelayer image, .hm image')].map(box)}; }"""
# Where the pictures' captions wrap: [caption, the character before the break, the one after] for each break
CAPTION_BREAKS = """() => [...document.querySelectorAll('[data-testid=stImageCaption]')].flatMap(caption => {
    const chars = [], walk = document.createTreeWalker(caption, NodeFilter.SHOW_TEXT);
    for (let node; (node = walk.nextNode());) {
        for (let i = 0; i < node.length; i++) {
            const range = document.createRange();
            range.setStart(node, i);
            range.setEnd(node, i + 1);
            const rect = range.getClientRects()[0];
            if (rect) chars.push([node.data[i], rect.top, rect.bottom]);
        }
    }
    // a character below the one before it (code spans' smaller letters sit lower on the same line) starts a line
    return chars.flatMap(([c, top], i) => i && top >= chars[i - 1][2] - 1
                                          ? [[caption.textContent, chars[i - 1][0], c]] : []);
})"""
WRAPS_AFTER = " \u200b:./_-"  # a caption may wrap after a space or a separator, not inside a name
# Streamlit's own toolbar at the page's top (the ⋮ menu; in a narrow window the sidebar's button) and the page's text
# it must leave uncovered at the top of the page: the title, its caption, the model line
TOP_BOXES = """() => {
    const box = e => e.getBoundingClientRect().toJSON(), shown = e => e.getBoundingClientRect().width > 0;
    return {toolbar: [...document.querySelectorAll('[data-testid=stHeader] :is(button, a)')].filter(shown)
                        .map(e => [e.dataset.testid || e.textContent, box(e)]),
            text: [...document.querySelectorAll('[data-testid=stMain] :is(h1, p, code)')].filter(shown)
                        .map(e => [e.textContent.slice(0, 40), box(e)])}; }"""
# A row of pictures' boxes (panels._picture_columns): [left, top, right] each, once `n` or more are drawn (they come
# after the rest of the run: a picture not loaded yet is 0 px high, and the one below it would seem beside it)
PICTURES = """([key, n]) => {
    const pictures = [...document.querySelectorAll(`.st-key-${key} [data-testid=stImage] img`)];
    return pictures.length >= n && pictures.every(e => e.complete && e.naturalWidth > 0) && pictures.map(e => {
        const r = e.getBoundingClientRect(); return [r.left, r.top, r.right]; }); }"""


def pictures(page, key: str, n: int) -> list[list[float]]:
    return page.wait_for_function(PICTURES, arg=[key, n]).json_value()


def overlapping(titles: list) -> list[tuple[str, str]]:
    boxes = [(text, box) for text, _, _, box in titles]
    return [(a, b) for i, (a, r) in enumerate(boxes) for b, q in boxes[i + 1:] if meet(r, q)]


def meet(r: dict, q: dict) -> bool:
    return r["left"] < q["right"] and q["left"] < r["right"] and r["top"] < q["bottom"] and q["top"] < r["bottom"]


# A tile chart's colour bar's tick labels, and for each shown title below the first row [text, its top, the bottom of
# the tiles above it] in px. The tiles' rows are found from the titles' trace (a row's step) and the picture's height
# (rows times the step less one gap: the y axis's range); a title's y is its tile's top in data units.
TILE_GAPS = """(key) => {
    const SHOWN = """ + SHOWN + """;
    const root = document.querySelector(`.st-key-${key}`), g = root.querySelector('.js-plotly-plot');
    const titles = g.data.filter(t => t.type === 'scatter')[0], ys = titles.y;
    const ya = g._fullLayout.yaxis, step = ys.find(y => y > ys[0]) - ys[0], rows = new Set(ys).size;
    const gap = rows * step - (ya.range[0] + 0.5), svg = root.querySelector('.main-svg');
    const top = svg.getBoundingClientRect().top + g._fullLayout._size.t;
    return {ticks: [...root.querySelectorAll('.cbaxis text')].map(e => [e.textContent, e.getBoundingClientRect().toJSON()]),
            below: rows < 2 ? [] : [...root.querySelectorAll('.textpoint text')].filter(SHOWN).flatMap(e => {
                const y = ys[[...e.closest('.trace').querySelectorAll('.textpoint text')].indexOf(e)];
                return y > ys[0] ? [[e.textContent, e.getBoundingClientRect().top, top + ya.l2p(y - gap)]] : []; })}; }"""


def check_chart(page, key: str, tiles: bool = False) -> None:
    """The toolbar (the camera and fullscreen only; a tile chart, whose square pixels the screen's shape would
    stretch, the camera) covers none of the chart's labels, its titles are whole and apart, and a tile chart's picture
    fills it but for its margins: no blank band above or below its tiles."""
    boxes = page.evaluate(CHART_BOXES, key)
    assert [title for title, _ in boxes["toolbar"]] == ["Download plot as a PNG"] + ([] if tiles else ["Fullscreen"]), key
    if tiles:  # square pixels by the chart's size, no scaleanchor (plotly's default for an image trace) to widen ranges
        layout = page.evaluate("(key) => document.querySelector(`.st-key-${key} .js-plotly-plot`)._fullLayout.yaxis",
                               key)
        assert not layout.get("scaleanchor") and layout.get("fixedrange"), (key, layout.get("scaleanchor"))
    covered = [text for text, label in boxes["labels"] for _, button in boxes["toolbar"] if meet(label, button)]
    assert covered == [], (key, covered)
    chart = boxes["chart"]
    # the chart's, its axes' and its colour bar's titles whole and apart: in a short chart the colour bar's 'l2 norm
    # over channels' lost its 'l2' below the picture, the bars' y title ran into the chart's title
    titles = boxes["titles"]
    cut = [text for text, r in titles if r["top"] < chart["top"] - 0.5 or r["bottom"] > chart["bottom"] + 0.5
           or r["left"] < chart["left"] - 0.5 or r["right"] > chart["right"] + 0.5]
    together = [(a, b) for i, (a, r) in enumerate(titles) for b, q in titles[i + 1:] if meet(r, q)]
    assert cut == [] and together == [], (key, cut, together)
    for picture in boxes["picture"]:
        above, below = picture["top"] - chart["top"], chart["bottom"] - picture["bottom"]
        assert above <= plots.TOOLBAR + plots.TITLE_ROOM + 1.5 and below <= plots.MARGIN["b"] + 1.5, (key, above, below)
        # ...nor left or right of them: the chart is as wide as its tiles (their pixels square by its size alone)
        left, right = picture["left"] - chart["left"], chart["right"] - picture["right"]
        assert left <= plots.MARGIN["l"] + 1.5 and right <= plots.COLORBAR + 1.5, (key, left, right)
    if tiles:  # in a phone's window a code map's colour bar wrote 0, 0.05, ..., 0.2 into each other, and the second
        # row's titles sat on the tiles above them
        gaps = page.evaluate(TILE_GAPS, key)
        ticks = [(a, b) for i, (a, r) in enumerate(gaps["ticks"]) for b, q in gaps["ticks"][i + 1:]
                 if r["top"] < q["bottom"] + 2 and q["top"] < r["bottom"] + 2]
        # (a title's box is its font's line: its glyphs start lower, so it may reach 1 px into the tiles above; at
        # 390 px the old code maps' reached 2.3 px, their glyphs on the tiles)
        crowded = [(text, round(above - top, 1)) for text, top, above in gaps["below"] if top < above - 1]
        assert ticks == [] and crowded == [], (key, ticks, crowded)


def camera_png(page, key: str) -> tuple[str, np.ndarray]:
    """What a chart's camera button saves: its file name and its picture in grey levels."""
    chart = page.locator(f".st-key-{key}")
    chart.hover()
    with page.expect_download() as download:
        chart.locator('.modebar-btn[data-title="Download plot as a PNG"]').click()
    return download.value.suggested_filename, np.asarray(Image.open(download.value.path()).convert("L"))


@pytest.mark.parametrize("width", [390, 800, 1400])  # a phone's window, and the narrowest the page is laid out for
def test_no_label_is_cut_and_no_tile_titles_run_together(server, width):
    """In an 800 px window the toggle 'in conv1 only' read 'in conv...', the atom attribution method 'Layer Integrated
    Gradi', the second attribution method's chip 'Salienc', and the code maps' titles ran into each other; then the
    charts' toolbar covered the predictions' legend and the half-width charts' titles, the tile charts had blank bands
    above and below their tiles, and captions broke names mid-word ('layer1.1.c' over 'onv2'). In a phone's window
    the clean image and the model input were stacked a screen apart, as were what each layer sees."""
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": 1000})
            page.set_default_timeout(90_000)
            page.goto(server)
            wait_for_lam(page, "λ=0.1,")
            # Streamlit's toolbar covers none of the page's first lines (the title, its caption, the model line)
            top = page.evaluate(TOP_BOXES)
            covered = [(name, text) for name, button in top["toolbar"] for text, box in top["text"]
                       if meet(button, box)]
            assert top["toolbar"] and covered == [], (width, top["toolbar"], covered)
            # the clean image and the model input side by side at every width (in a phone's window Streamlit
            # stacked their columns, a screen apart), both on the page
            inputs = pictures(page, "inputs", 2)
            assert len(inputs) == 2 and abs(inputs[0][1] - inputs[1][1]) < 1 and inputs[1][2] <= width, (
                width, inputs)
            charts = {"Layers": ["codes_chart", "maps_chart"], "λ path": [], "Atoms": ["atoms_chart", "deep_atoms_chart"],
                      "Attribution": ["attr_integrated_gradients", "attr_saliency", "atom_attr_tiles"]}
            others = {"Layers": ["pred_chart", "residual_chart", "sparsity_chart"],
                      "λ path": ["path_probs_chart", "path_residual_chart", "path_sparsity_chart"],
                      "Attribution": ["atom_attr_chart"]}
            for tab, keys in charts.items():
                page.get_by_role("tab", name=tab).click()
                if tab == "Attribution":
                    page.locator(".st-key-attr_run button").click()
                for key in keys:
                    page.locator(f".st-key-{key} .textpoint >> visible=true").first.wait_for()
                for key in others.get(tab, []):
                    page.locator(f".st-key-{key} .main-svg").first.wait_for()
                page.wait_for_function(IDLE)
                assert page.evaluate(CUT_TEXT) == [], tab
                for key in keys:
                    titles = page.evaluate(TILE_TITLES, key)
                    assert titles and overlapping(titles) == [], key
                    # one length shown, the long one ('#3 (12.3)') from its switch on: in a phone's window the long
                    # titles were 6 px, 64 atoms in 16 columns had the short ones in any window
                    n, switch, box = page.evaluate(TILE_COUNT, key)
                    long = switch is not None and box >= switch
                    assert len(titles) == n and all(("(" in t) == long for t, *_ in titles if t.startswith("#")), (
                        key, titles, switch, box)
                    # the font was picked by this estimate of the titles' width: it must not fall short (by more than
                    # the ~0.3 px of side bearings a 2-character '#4' at 7.8 px has over it)
                    wider = [(text, size, drawn) for text, size, drawn, _ in titles
                             if drawn > plots.text_width(text, size) + 0.5]
                    assert wider == [], (key, wider)
                for key in keys + others.get(tab, []):
                    check_chart(page, key, tiles=key in keys)
                if tab == "Layers":  # its camera names the layer: every layer's code maps were 'codes.png'
                    name, png = camera_png(page, "codes_chart")
                    assert name == "codes_conv1.png"
                    # ...and draws the figure's own size (its titles' size was made for it) at any window's width
                    own = page.evaluate("() => document.querySelector('.st-key-codes_chart .js-plotly-plot')"
                                        ".layout.meta")
                    assert png.shape == (2 * own["png_height"], 2 * own["png_width"]), (png.shape, own)
                if tab == "Atoms":  # what each layer sees: its first two pictures side by side at any width too
                    sees = pictures(page, "sees_pictures", 2)
                    assert abs(sees[0][1] - sees[1][1]) < 1 and max(r for _, _, r in sees) <= width, (width, sees)
                breaks = page.evaluate(CAPTION_BREAKS)  # the inputs' and, in Atoms, what each layer sees
                assert all(before in WRAPS_AFTER for _, before, _ in breaks), breaks
            page.screenshot(path=str(ARTIFACTS / f"app-{width}px-attribution.png"))
            # the Export tab's buttons with a deep layer's long file names (cut in two columns at 800 px)
            page.get_by_role("tab", name="Layers").click()
            choose_option(page, "layer", "layer4.1.conv2")
            page.wait_for_function("() => (document.querySelector('.st-key-maps_chart .cbtitle') || {}).textContent")
            page.wait_for_function(IDLE)
            check_chart(page, "maps_chart", tiles=True)  # a deep layer's: shorter, its colour bar's title was cut
            page.get_by_role("tab", name="Export").click()
            page.get_by_role("button", name="reconstruction_layer4_1_conv2").first.wait_for()
            page.wait_for_function(IDLE)
            assert page.evaluate(CUT_TEXT) == [], "Export"
            # the predictions' camera PNG keeps its legend whole: drawn from the chart's SVG in the system's font
            # (not the page's web font), it ran off the picture's right edge ('SDNet at trained λ=0.:')
            name, png = camera_png(page, "pred_chart")
            assert name == "predictions.png"
            legend = png[: png.shape[0] // 5] < 128  # the legend's text, above the bars (the PNG is at scale 2)
            # its box ends at the plot's right edge: a clipped text ran up to it (1 px short), a whole one ends
            # short of it by the box's padding (13 px at either width)
            right = int(np.nonzero(legend.any(0))[0].max())
            assert right <= png.shape[1] - 2 * plots.MARGIN["r"] - 8, (width, right, png.shape)
        finally:
            browser.close()
