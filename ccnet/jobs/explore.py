"""job=explore checkpoint=RUN_OR_FILE [input=IMAGE_OR_DIR]: the attention explorer, a local web page.

Pick an image (the checkpoint's val split, or input=), see the prediction over it, click a pixel: its attention
map after each loop (R=1 its row and column, R=2 the whole image, R=3 where the model has it), the class
probabilities there and, where labels exist, its true class. Arrow keys move the point by one feature cell (the
stride of the attention). "save PNG" writes attention_<image>_y<y>_x<x>.png into the run folder: the picture
job=visualize writes for that point.

Per image the model runs once: the attention weights of every loop (engine/attention.attention_weights) and the
class probabilities (this run's eval protocol) are cached; a click only composes the loops for one pixel from them
(engine/attention.maps_at, which job=visualize also calls). The page is Gradio's (the optional extra
`pip install -e ".[explore]"`): its front end ships inside the wheel, so the page needs no network, no CDN and no
build step; analytics are off, and the default theme's fonts ship in the wheel too.
The page shows JPEGs (fast to encode); "save PNG" writes the lossless picture.
Served on 127.0.0.1 unless explore.public=true; Ctrl-C stops the server and the job.
"""

from __future__ import annotations

import functools
import html
import logging
import math
import os
import signal
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from ccnet.data.datasets import DataError, build_dataset, read_image, unlabelled
from ccnet.data.transforms import eval_transform
from ccnet.engine.attention import attention_weights, maps_at
from ccnet.engine.checkpoint import atomic_write_bytes
from ccnet.engine.inference import predict_image
from ccnet.registry import JOBS

from .predict import image_files
from .restore import restore_model
from .visualize import attention_figure, default_point, heat_overlay

log = logging.getLogger(__name__)
DISPLAY = (256, 1024)  # the page shows an image at least 256 px high (enlarged by a whole factor), at most 1024 wide
KEEP = 2  # images whose features stay cached (a 1024x2048 Cityscapes image: ~170 MB of probabilities)


class ExploreError(ValueError):
    """Bad input on the page (a point outside the image, an image that does not decode): said there and logged."""


@dataclass
class Picture:
    """One image with everything a click needs, computed once."""

    name: str
    image: np.ndarray  # H x W x 3 uint8 RGB
    label: np.ndarray | None  # H x W class ids (ignore_index where unlabelled); None without labels
    probs: np.ndarray  # classes x H x W float32, softmax of the eval protocol's logits
    attentions: list[np.ndarray]  # per loop, (h, w, h + w) float32 weights at the feature size
    pred: np.ndarray  # H x W predicted class ids
    pred_colours: np.ndarray  # H x W x 3 uint8: the prediction in the data set's colours

    @property
    def cell(self) -> tuple[int, int]:
        """Image pixels per feature position (the arrow keys' step)."""
        (h, w), (fh, fw) = self.image.shape[:2], self.attentions[0].shape[:2]
        return max(1, math.ceil(h / fh)), max(1, math.ceil(w / fw))


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(0, keepdims=True))
    return e / e.sum(0, keepdims=True)


class Explorer:
    """The page's logic without the page: images, their cached features, and what a click shows."""

    def __init__(self, model, cfg, run_dir: Path, keep: int = KEEP):
        self.model, self.cfg, self.run_dir, self.keep = model, cfg, run_dir, keep
        try:  # the data set's classes and colours; without its files, numbered classes and the VOC colour map
            self.dataset = build_dataset(cfg.dataset, cfg.dataset.val_split)
        except DataError as err:
            if not cfg.input:
                raise DataError(
                    f"{err} (job=explore shows the val split; input=IMAGE_OR_DIR shows other images)"
                ) from None
            self.dataset = unlabelled(cfg.dataset, "explore")
        self.sources: dict[str, Callable[[], tuple]] = {}
        if cfg.input:
            for file in image_files(cfg.input):
                self.add_file(str(file))
        else:
            for index, (image_path, _) in enumerate(self.dataset.pairs):
                self.sources[Path(image_path).stem] = lambda i=index: self.dataset.read(i)
        self.cache: OrderedDict[str, Picture] = OrderedDict()
        self.lock = threading.Lock()  # one model call at a time (Gradio answers events on several threads)

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.dataset.class_names

    def add_file(self, path: str) -> str:
        name = Path(path).stem
        while name in self.sources and self.sources[name].__name__ != path:  # same stem in two folders
            name += "_"
        source = lambda: (read_image(path), None)  # noqa: E731
        source.__name__ = path
        self.sources[name] = source
        return name

    def picture(self, name: str) -> Picture:
        """The image, its probabilities and attention weights: computed on first use, then from the cache."""
        if name not in self.sources:
            raise ExploreError(f"no image named {name!r} here")
        with self.lock:
            if name in self.cache:
                self.cache.move_to_end(name)
                return self.cache[name]
            try:
                image, label = self.sources[name]()
            except DataError as err:
                raise ExploreError(str(err)) from err
            started = time.perf_counter()
            attentions = attention_weights(self.model, eval_transform(image, self.cfg.dataset))
            probs = softmax(predict_image(self.model, image, self.cfg.dataset, self.cfg.eval))
            log.info("%s: %dx%d, features computed in %.2f s", name, *image.shape[1::-1], time.perf_counter() - started)
            pred = probs.argmax(0)
            self.cache[name] = Picture(name, image, label, probs, attentions, pred, self.dataset.color(pred))
            while len(self.cache) > self.keep:
                self.cache.popitem(last=False)
            return self.cache[name]

    @staticmethod
    def check_point(picture: Picture, point) -> tuple[int, int]:
        h, w = picture.image.shape[:2]
        try:
            y, x = (int(c) for c in point)
        except (TypeError, ValueError):
            raise ExploreError(f"point {point!r}: expected two whole numbers y, x") from None
        if not (0 <= y < h and 0 <= x < w):
            raise ExploreError(
                f"point (y={y}, x={x}) lies outside the {h}x{w} image (y in 0..{h - 1}, x in 0..{w - 1})"
            )
        return y, x

    def maps(self, picture: Picture, point) -> list[np.ndarray]:
        """Per loop, the (H, W) attention map of the image pixel point = (y, x): job=visualize's maps."""
        return maps_at(picture.attentions, picture.image.shape[:2], self.check_point(picture, point))

    def figure(self, picture: Picture, point) -> np.ndarray:
        """job=visualize's picture for this point (RGB uint8)."""
        return attention_figure(picture.image, self.check_point(picture, point), self.maps(picture, point))

    def save(self, picture: Picture, point) -> Path:
        """Writes job=visualize's file for this point into the run folder (atomically)."""
        y, x = self.check_point(picture, point)
        ok, png = cv2.imencode(".png", self.figure(picture, (y, x))[:, :, ::-1])
        out = self.run_dir / f"attention_{picture.name}_y{y}_x{x}.png"
        atomic_write_bytes(out, png.tobytes())
        log.info("attention of pixel (y=%d, x=%d) of %s -> %s", y, x, picture.name, out)
        return out

    def pixel(self, picture: Picture, point) -> dict:
        """Class probabilities at the point, the predicted class and the true one (None without a label)."""
        y, x = self.check_point(picture, point)
        probs = {name: float(p) for name, p in zip(self.class_names, picture.probs[:, y, x])}
        truth = None
        if picture.label is not None:
            t = int(picture.label[y, x])
            truth = self.class_names[t] if 0 <= t < len(self.class_names) else "ignored (no label)"
        return {"probs": probs, "predicted": self.class_names[int(picture.pred[y, x])], "truth": truth}

    def overlays(self, picture: Picture) -> list[str]:
        loops = [f"loop {r}" for r in range(1, len(picture.attentions) + 1)]
        return ["prediction", *loops, *(["ground truth"] if picture.label is not None else []), "none"]

    def view(self, picture: Picture, point, overlay: str, opacity: float, maps=None) -> tuple[np.ndarray, float]:
        """What the page shows: the image with the chosen overlay and the point marked, at display size; and the
        display scale (display pixels per image pixel), by which a click's coordinates are divided."""
        y, x = self.check_point(picture, point)
        image = picture.image
        if overlay.startswith("loop "):
            maps = maps if maps is not None else self.maps(picture, (y, x))
            r = int(overlay.split()[1])
            if not 1 <= r <= len(maps):
                raise ExploreError(f"overlay {overlay!r}: this model has {len(maps)} loop(s)")
            shown = heat_overlay(image, maps[r - 1], opacity)
        elif overlay in ("prediction", "ground truth"):
            colours = picture.pred_colours if overlay == "prediction" else self.dataset.color(picture.label)
            shown = ((1 - opacity) * image + opacity * colours).astype(np.uint8)
        else:
            shown = image
        h, w = image.shape[:2]
        if h < DISPLAY[0]:  # small: enlarged by a whole factor (sharp pixels), at most twice the width bound
            scale = float(max(1, min(-(-DISPLAY[0] // h), 2 * DISPLAY[1] // w)))
        else:
            scale = min(1.0, DISPLAY[1] / w)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        big = cv2.resize(shown, size, interpolation=cv2.INTER_NEAREST if scale >= 1 else cv2.INTER_AREA)
        centre = (int((x + 0.5) * scale), int((y + 0.5) * scale))
        cv2.drawMarker(big, centre, (0, 255, 0), cv2.MARKER_CROSS, 16, 2)
        return big, scale

    def legend_html(self) -> str:
        palette = [self.dataset.color(np.array([i]))[0] for i in range(len(self.class_names))]
        items = "".join(
            f'<span style="display:inline-block;margin:2px 8px 2px 0"><span style="display:inline-block;width:12px;'
            f'height:12px;background:rgb({r},{g},{b});border:1px solid #888;vertical-align:middle"></span> '
            f"{html.escape(name)}</span>"
            for name, (r, g, b) in zip(self.class_names, palette)
        )
        return f'<div id="legend">{items}</div>'

    def describe(self, picture: Picture, point, maps: list[np.ndarray]) -> str:
        """The status line: the point, its classes, and where each loop's map peaks (the browser test reads it)."""
        y, x = point
        info = self.pixel(picture, point)
        peaks = "; ".join(
            f"loop {r} peaks at (y={py}, x={px})"
            for r, m in enumerate(maps, 1)
            for py, px in [np.unravel_index(int(np.argmax(m)), m.shape)]
        )
        truth = f", true class **{html.escape(info['truth'])}**" if info["truth"] is not None else ""
        predicted = html.escape(info["predicted"])
        return f"**{html.escape(picture.name)}**, point (y={y}, x={x}): predicted **{predicted}**{truth}. {peaks}."

    def answer(self, name: str, point, overlay: str, opacity: float) -> dict:
        """Everything the page shows for a point of an image (a click): from the cache after the image's first use."""
        picture = self.picture(name)
        point = self.check_point(picture, point)
        choices = self.overlays(picture)
        overlay = overlay if overlay in choices else "prediction"
        maps = self.maps(picture, point)
        view, scale = self.view(picture, point, overlay, opacity, maps)
        return {
            "point": point,
            "overlays": choices,
            "overlay": overlay,
            "view": view,
            "scale": scale,
            "figure": attention_figure(picture.image, point, maps),
            "probs": self.pixel(picture, point)["probs"],
            "status": self.describe(picture, point, maps),
        }


KEYS_JS = """
<script>
// Arrow keys move the point: they press the page's move buttons (not while typing in a field).
document.addEventListener("keydown", (event) => {
  const names = {ArrowUp: "up", ArrowDown: "down", ArrowLeft: "left", ArrowRight: "right"};
  const tag = (event.target.tagName || "").toLowerCase();
  if (!(event.key in names) || tag === "input" || tag === "textarea" || tag === "select") return;
  const button = document.getElementById("move-" + names[event.key]);
  if (button) { event.preventDefault(); button.click(); }
});
</script>
"""


def build_page(explorer: Explorer, first_point=None):
    """The Gradio page over an Explorer. Every handler reports bad input in the status line and leaves the rest
    of the page as it was."""
    import gradio as gr

    names = list(explorer.sources)
    moves = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}
    keep = gr.update()  # "leave this component as it is"

    def guarded(fn, count=8, status_at=7):
        """fn, with any error said in the status line (and the log) and the other outputs left as they were."""

        @functools.wraps(fn)
        def handler(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as err:
                if isinstance(err, (ExploreError, DataError)):
                    log.warning("explore: %s", err)
                else:  # a bug of ours: the whole story in the log, the page stays alive
                    log.exception("explore: %s failed", fn.__name__)
                out = [keep] * count
                out[status_at] = f"**error:** {html.escape(str(err))}"
                return out

        return handler

    def show(name, y, x, overlay, opacity):
        """-> view, figure, probabilities, y, x, overlay choices, scale, status."""
        a = explorer.answer(name, (y, x), overlay, float(opacity))
        overlay = gr.update(choices=a["overlays"], value=a["overlay"])
        return a["view"], a["figure"], a["probs"], *a["point"], overlay, a["scale"], a["status"]

    def open_image(name, overlay, opacity):
        picture = explorer.picture(name)
        y, x = default_point(picture.label, picture.image.shape)
        return show(name, y, x, overlay, opacity)

    def open_file(path, overlay, opacity):
        if not str(path or "").strip():
            raise ExploreError("type the path of an image file")
        name = explorer.add_file(str(Path(str(path).strip()).expanduser()))
        try:
            picture = explorer.picture(name)
        except ExploreError:
            del explorer.sources[name]
            raise
        y, x = default_point(picture.label, picture.image.shape)
        return (*show(name, y, x, overlay, opacity), gr.update(choices=list(explorer.sources), value=name))

    def click(name, overlay, opacity, scale, evt: gr.SelectData):
        dx, dy = evt.index  # display pixels, x first
        return show(name, int(dy / scale), int(dx / scale), overlay, opacity)

    click.__annotations__["evt"] = gr.SelectData  # Gradio finds the event data by this type (a string here)

    def move(direction):
        def handler(name, y, x, overlay, opacity):
            picture = explorer.picture(name)
            y, x = explorer.check_point(picture, (y, x))
            (dy, dx), (ch, cw) = moves[direction], picture.cell
            h, w = picture.image.shape[:2]
            return show(name, min(max(y + dy * ch, 0), h - 1), min(max(x + dx * cw, 0), w - 1), overlay, opacity)

        handler.__name__ = f"move_{direction}"
        return handler

    def save(name, y, x):
        picture = explorer.picture(name)
        out = explorer.save(picture, (y, x))
        return str(out), f"saved {html.escape(str(out))}"

    theme = gr.themes.Default()  # its fonts ship with Gradio 6 (LocalFont): nothing is fetched from the web
    with gr.Blocks(title="ccnet attention explorer", analytics_enabled=False) as page:
        gr.Markdown(
            "### Criss-cross attention explorer\nClick a pixel: its attention after each loop (loop 1: its row and "
            "column; loop 2: the whole image). Arrow keys move the point by one feature cell."
        )
        with gr.Row():
            choice = gr.Dropdown(names, value=names[0] if names else None, label="image", elem_id="choice")
            path = gr.Textbox(label="or open an image file", placeholder="/path/to/image.png", elem_id="path")
        with gr.Row():
            overlay = gr.Radio(["prediction"], value="prediction", label="overlay", elem_id="overlay")
            opacity = gr.Slider(0, 1, value=0.55, step=0.05, label="opacity", elem_id="opacity")
        with gr.Row():
            y = gr.Number(label="y", precision=0, elem_id="y")
            x = gr.Number(label="x", precision=0, elem_id="x")
            buttons = {d: gr.Button(a, elem_id=f"move-{d}", min_width=40) for d, a in zip(moves, "↑↓←→")}
            save_button = gr.Button("save PNG", elem_id="save")
        status = gr.Markdown(elem_id="status")
        scale = gr.State(1.0)
        # JPEG on the page: ~20x faster to encode than PNG at 512x1024 (the lossless picture is "save PNG")
        with gr.Row():
            view = gr.Image(label="click a pixel", interactive=False, format="jpeg", elem_id="view", scale=3)
            with gr.Column(scale=1):
                probs = gr.Label(num_top_classes=5, label="class probabilities at the point", elem_id="probs")
                gr.HTML(explorer.legend_html())
        figure = gr.Image(
            label="attention maps (what job=visualize saves)", interactive=False, format="jpeg", elem_id="figure"
        )
        saved = gr.File(label="saved picture", elem_id="saved")

        outputs = [view, figure, probs, y, x, overlay, scale, status]
        controls = [choice, y, x, overlay, opacity]
        first = (
            (lambda o, a: show(names[0], *first_point, o, a))
            if first_point
            else (lambda o, a: open_image(names[0], o, a))
        )
        if names:
            page.load(guarded(first), [overlay, opacity], outputs)
        choice.input(guarded(open_image), [choice, overlay, opacity], outputs)
        path.submit(guarded(open_file, 9, 7), [path, overlay, opacity], [*outputs, choice])
        view.select(guarded(click), [choice, overlay, opacity, scale], outputs)
        for direction, button in buttons.items():
            button.click(guarded(move(direction)), controls, outputs)
        for box in (y, x):
            box.submit(guarded(show), controls, outputs)
        overlay.input(guarded(show), controls, outputs)
        opacity.release(guarded(show), controls, outputs)
        save_button.click(guarded(save, 2, 1), [choice, y, x], [saved, status])
    return page, theme


def serve(page, theme, host: str, port: int, stop: threading.Event | None = None) -> None:
    """Serves until Ctrl-C or SIGTERM (or `stop` is set), then closes the server: nothing is left running."""
    stop = stop or threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():  # Jittor's own handler would end us at once
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda signum, frame: stop.set())
    try:
        page.launch(
            server_name=host,
            server_port=port,
            prevent_thread_lock=True,
            quiet=True,
            ssr_mode=False,  # no Node server beside ours
            footer_links=[],
            theme=theme,
            head=KEYS_JS,
        )
        log.info("attention explorer at http://%s:%d (Ctrl-C stops it)", host, port)
        while not stop.wait(0.2):
            pass
        log.info("stopping the attention explorer")
    finally:
        page.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("the attention explorer has stopped")


@JOBS.register("explore")
def run(cfg, run_dir: Path, stop: threading.Event | None = None) -> None:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no calls home
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise DataError('job=explore needs Gradio, the optional extra: pip install -e ".[explore]"') from None
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's requests to itself at start-up
    model, _, path = restore_model(cfg, run_dir, adopt_dataset=True)
    if model.head.recurrence < 1:
        raise DataError(f"{path}: the model has recurrence 0 (no attention): there is no attention map to explore")
    explorer = Explorer(model, cfg, run_dir)
    page, theme = build_page(explorer, list(cfg.point) if cfg.point else None)
    serve(page, theme, cfg.explore.host, cfg.explore.port, stop)
