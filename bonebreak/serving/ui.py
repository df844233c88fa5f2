"""The Gradio demo: upload an X-ray, get the top fracture types, what they mean and where the
model looked. Nothing happens at import time; ``build_demo`` wires a loaded classifier (``serving.loader``).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image
from threadpoolctl import threadpool_limits

from ..common.files import write_atomically
from ..common.notices import RESEARCH_DEMO
from ..data.decode import IMAGE_SUFFIXES, ImageLoadError
from .feedback import NOT_XRAY as NOT_AN_XRAY
from .feedback import RIGHT, WRONG, FeedbackFull, FeedbackStore, InvalidFeedback
from .heatmaps import overlay_heatmap
from .loader import Classifier
from .onnx_runtime import OnnxForward
from .predictor import Prediction
from .similar_cases import DEFAULT_CASES, CaseIndex

logger = logging.getLogger(__name__)

INFO_FILE = Path(__file__).with_name("fracture_info.json")
EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "examples"
NOT_XRAY = (
    "**This does not look like a bone X-ray.** It is unlike every radiograph the model was trained on, "
    "so no fracture type is given. Upload a plain X-ray image of a bone."
)
INFO_FIELDS = (("what", "What it is"), ("mechanism", "Typical mechanism"), ("who", "Who gets it"), ("where", "Where it is seen"), ("management", "Usual management"))


@lru_cache(maxsize=1)
def fracture_info() -> dict[str, Any]:
    return json.loads(INFO_FILE.read_text())


def describe(label: str) -> str:
    info = fracture_info().get(label)
    if info is None:
        return f"No background text is available for **{label}**."
    lines = [f"### {label} fracture"] + [f"- **{title}:** {info[key]}" for key, title in INFO_FIELDS]
    if "confused_with" in info:  # only for the type pairs the label audit found models and labels confusing systematically
        lines.append(f"- **Often confused:** {info['confused_with']}")
    lines.append(f"\n<sub>Source: {fracture_info()['_source']}</sub>")
    return "\n".join(lines)


def introduction(labels: list[str]) -> str:
    """The page's first line, naming what this checkpoint can tell apart (not every model knows the ten shipped types)."""
    return f"Upload a bone X-ray to see which of these {len(labels)} types it most resembles: {', '.join(labels)}."


def answer_text(top_label: str, top_probability: float, unsure: bool, threshold: float) -> str:
    if unsure:
        return (
            f"**The model is unsure.** Its best guess, {top_label}, has only {top_probability:.0%} probability "
            f"(below the {threshold:.0%} threshold), so treat the ranking below as a list of possibilities, not an answer."
        )
    return f"**Most likely type: {top_label}** ({top_probability:.0%})."


def unreadable(file: str, error: ImageLoadError) -> gr.Error:
    """The page's message for an upload that cannot be decoded: its name and the decoder's reason, without the path."""
    return gr.Error(f"Could not read '{Path(file).name}': {str(error).split(': ', 1)[-1]}")


OUTPUT_SUFFIX = ".jpg"
PREVIEW_SIZE = 768  # longest side of the upload's preview, in pixels


@dataclass
class OutputImages:
    """Output pictures as files named by their content, written atomically.

    Gradio saves a returned PIL image by overwriting a content-named file in place, so two
    requests producing the same picture (two visitors clicking the same example) can serve
    each other a half-written file. A finished file handed over by path is copied atomically.
    """

    folder: Path = field(default_factory=lambda: Path(tempfile.gettempdir()) / "bonebreak-outputs")
    max_age_seconds: float = 3600.0
    _last_prune: float = 0.0

    def save(self, image: Image.Image) -> str:
        buffer = io.BytesIO()
        # JPEG: a heat map needs no lossless copy, and a 224 px one encodes in 0.15 ms against 2.9 ms as PNG
        image.convert("RGB").save(buffer, format="JPEG", quality=92)
        return self.store(buffer.getvalue())

    def store(self, data: bytes) -> str:
        """Hand out JPEG bytes (a similar case's thumbnail) as a file named by its content."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{hashlib.sha256(data).hexdigest()[:32]}{OUTPUT_SUFFIX}"
        self._prune()  # before saving, so the file handed out now is never the one pruned
        if path.exists():
            os.utime(path)  # handed out again: its age starts over
        else:
            write_atomically(path, data)
        return str(path)

    def _prune(self) -> None:
        now = time.time()
        if now - self._last_prune < 600:
            return
        self._last_prune = now
        for old in self.folder.glob(f"*{OUTPUT_SUFFIX}"):
            if now - old.stat().st_mtime > self.max_age_seconds:
                old.unlink(missing_ok=True)


@dataclass
class RequestHandler:
    """The function behind the UI and the API: one call, one image, every output."""

    predictor: Classifier
    top_k: int = 3
    cases: int = DEFAULT_CASES  # similar training X-rays shown (when the checkpoint has an index)
    outputs: OutputImages = field(default_factory=OutputImages)

    def __call__(self, file: str | None, show_heatmap: bool = True) -> tuple[dict[str, float], str, str, list[tuple[str, str]]]:
        if not file:
            raise gr.Error("Please upload an X-ray image first (JPEG, PNG, TIFF, WebP or DICOM).")
        name = Path(file).name
        try:
            image = self.predictor.load(file)  # decoded once; the predictor does not decode it again
            analysis = self.predictor.analyse(image, heatmap=show_heatmap)  # one forward pass
        except ImageLoadError as error:
            raise unreadable(file, error) from error
        except Exception as error:  # never let one upload take the server down
            logger.exception("prediction failed for %s", file)
            raise gr.Error(f"Could not process '{name}' ({type(error).__name__}). Please try another image.") from error
        prediction = analysis.prediction
        shown = self.outputs.save(overlay_heatmap(analysis.view, analysis.heatmap) if analysis.heatmap is not None else image)
        if prediction.xray_check_passed is False:
            return {}, NOT_XRAY, shown, []
        text = answer_text(prediction.top_label, prediction.top_probability, prediction.unsure, self.predictor.unsure_below)
        text += "\n\n" + describe(prediction.top_label)
        return prediction.top(self.top_k), text, shown, self.similar(prediction)

    def similar(self, prediction: Prediction) -> list[tuple[str, str]]:
        """The nearest labelled training X-rays as (thumbnail file, caption), from the features of the same forward pass."""
        index = self.predictor.similar_cases
        if index is None or prediction.embedding is None or self.cases < 1:
            return []
        return [(self.outputs.store(case.thumbnail), case.caption()) for case in index.nearest(prediction.embedding, self.cases)]

    def preview(self, file: str | None) -> str | None:
        """The chosen file as the model reads it (a DICOM or 16-bit image after windowing), shown before the answer
        comes; None when there is nothing to show or it cannot be read (the answer then says why, once)."""
        if not file:
            return None
        try:
            image = self.predictor.load(file)
        except ImageLoadError:
            return None
        except Exception:  # a preview never takes the page down
            logger.exception("preview failed for %s", file)
            return None
        image.thumbnail((PREVIEW_SIZE, PREVIEW_SIZE))  # a 3000 px scan is shown in a column, not at full size
        return self.outputs.save(image)


FEEDBACK_NOTICE = ("**Feedback is on.** If you flag an answer below, this server stores a copy of that image (as the model "
                   "read it), the model's answer and your verdict, for the people running it to review and retrain the "
                   "model. Nothing else is stored: images you do not flag are not kept.")
VERDICT_CHOICES = [("Right", RIGHT), ("Wrong: the right type is", WRONG), ("Not an X-ray", NOT_AN_XRAY)]


@dataclass
class FeedbackHandler:
    """The function behind the flag button and /feedback: re-classifies the file (cheap) and stores one flag."""

    predictor: Classifier
    store: FeedbackStore

    def __call__(self, file: str | None, verdict: str | None, kind: str | None, pasted: str | None = None) -> str:
        file = pasted or file  # the page passes a pasted image it last classified; the API the uploaded file
        if not file:
            raise gr.Error("Upload the X-ray you want to flag first.")
        try:
            self.store.check(verdict, kind)  # before any work
            image = self.predictor.load(file)
            prediction = self.predictor.analyse(image, heatmap=False).prediction
            self.store.record(image, prediction.top_label, prediction.top_probability, verdict, kind, prediction.xray_check_passed)
        except InvalidFeedback as error:
            raise gr.Error(str(error)) from error
        except ImageLoadError as error:
            raise unreadable(file, error) from error
        except FeedbackFull as error:
            gr.Warning(str(error))
            return str(error)
        except Exception as error:  # a flag never takes the page down
            logger.exception("storing feedback failed for %s", file)
            gr.Warning("Sorry, this flag could not be stored.")
            return f"Sorry, this flag could not be stored ({type(error).__name__})."
        return "Thank you: your feedback is stored for review."


def feedback_section(predictor: Classifier, store: FeedbackStore, upload: gr.File, pasted: gr.Image) -> None:
    """The flag controls under the answer, wired to /feedback (only built when feedback is on)."""
    handler = FeedbackHandler(predictor, store)
    last_pasted = gr.State(None)  # not part of the API: /feedback takes (file, verdict, type)
    with gr.Row(), gr.Column():
        gr.Markdown(FEEDBACK_NOTICE, elem_id="feedback-notice")
        with gr.Row():
            verdict = gr.Radio(VERDICT_CHOICES, label="Was this answer right?", elem_id="verdict")
            kind = gr.Dropdown(list(predictor.labels), value=None, label="The right type (when the answer is wrong)", elem_id="kind")
        send = gr.Button("Send feedback")
        status = gr.Markdown(elem_id="feedback-status")
    send.click(handler, inputs=[upload, verdict, kind, last_pasted], outputs=[status], api_name="feedback")
    pasted.upload(lambda file: file, inputs=[pasted], outputs=[last_pasted], api_name=False)
    upload.change(lambda _: None, inputs=[upload], outputs=[last_pasted], api_name=False)


def example_files(folder: Path = EXAMPLES_DIR) -> list[str]:
    if not folder.is_dir():
        return []
    return [str(p) for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]


def heatmap_label(predictor: Classifier) -> str:
    """The heat map is one model's: an ensemble says whose; a model without one says so."""
    if not predictor.heatmaps_available:
        return "Heat map: not available for this model on this backend (it needs PyTorch: --backend torch)"
    members = getattr(predictor, "members", [])
    if len(members) > 1:
        return f"Show Grad-CAM heat map (where the first of the {len(members)} ensemble models looked)"
    return "Show Grad-CAM heat map (where the model looked)"


def build_demo(predictor: Classifier, examples: list[str] | None = None, feedback: FeedbackStore | None = None) -> gr.Blocks:
    """The page; ``feedback`` (a store, from ``--feedback_dir``) adds the flag controls and says what they store."""
    classify = RequestHandler(predictor)
    examples = example_files() if examples is None else examples
    # Uploads and heat maps are cached on disk per request: drop files older than an hour.
    with gr.Blocks(title="BoneBreak: fracture type from an X-ray", delete_cache=(1800, 3600)) as demo:
        gr.Markdown(f"# BoneBreak\n{introduction(predictor.labels)}")
        gr.Markdown(RESEARCH_DEMO, elem_id="notice")
        with gr.Row():
            with gr.Column():
                upload = gr.File(
                    label="X-ray image (JPEG, PNG, TIFF, WebP, DICOM; drag and drop or click)",
                    file_types=sorted(IMAGE_SUFFIXES),
                    type="filepath",
                    elem_id="upload",
                )
                preview = gr.Image(label="Your X-ray (as the model reads it)", type="filepath", interactive=False, elem_id="preview",
                                   height=320)
                pasted = gr.Image(label="...or paste an image from the clipboard", sources=["clipboard"], type="filepath", height=160)
                show_heatmap = gr.Checkbox(value=True, label=heatmap_label(predictor))
                button = gr.Button("Classify", variant="primary")
                if examples:
                    gr.Examples(examples=[[e] for e in examples], inputs=[upload], label="Example X-rays (CC BY 4.0, see examples/ATTRIBUTION.md)")
            with gr.Column():
                # No big heading: the verdict text says whether the top label is an answer or a guess.
                labels = gr.Label(num_top_classes=classify.top_k, label="Top fracture types (probability)", show_heading=False, elem_id="labels")
                picture = gr.Image(label="Model view / heat map", type="filepath", interactive=False, elem_id="heatmap")
                info = gr.Markdown(elem_id="info")
        index = predictor.similar_cases
        with gr.Row(visible=index is not None):
            with gr.Column():
                cases = gr.Gallery(label="Most similar labelled training X-rays (from the model's own features)", columns=6, height=300,
                                   object_fit="contain", elem_id="cases", interactive=False)
                gr.Markdown(cases_note(index), elem_id="cases-note")
        if feedback is not None:
            feedback_section(predictor, feedback, upload, pasted)
        outputs = [labels, info, picture, cases]
        button.click(classify, inputs=[upload, show_heatmap], outputs=outputs, api_name="predict")
        upload.change(classify.preview, inputs=[upload], outputs=[preview], api_name=False)  # an upload, an example or a clear
        upload.upload(classify, inputs=[upload, show_heatmap], outputs=outputs, api_name=False)
        pasted.upload(classify, inputs=[pasted, show_heatmap], outputs=outputs, api_name=False)
    return demo


def cases_note(index: CaseIndex | None) -> str:
    if index is None:
        return ""
    return ("<sub>These are the training X-rays whose features this model finds closest, with their dataset labels: "
            "a look-alike is not proof of the same fracture type, and some labels are wrong. Similarity runs from 0 to 1 "
            "(1: the model sees no difference); \"label doubted\" marks a case whose label our label audit questions, "
            f"\"has a near-copy\" one that appears twice in the training data. {index.credit}</sub>")


def serving_threads(predictor: Classifier) -> bool:
    """One BLAS thread when ONNX Runtime runs every network (returns whether it did so).

    The BLAS pool is then left with per-request glue only (the X-ray check's nearest-neighbour product), where its
    idle spinning slowed ONNX Runtime's own threads on a busy 2-core CPU (app request p50 47 ms with one thread
    against 109 ms with two; docs/speed.md). On the PyTorch backend the forward pass needs them: left alone.
    """
    members = getattr(predictor, "members", [predictor])
    if all(isinstance(member.forward, OnnxForward) for member in members):
        threadpool_limits(limits=1)
        return True
    return False


DEFAULT_CONCURRENCY = 2  # predictions at once: two suit a 2-core CPU (a free Space has two)
DEFAULT_MAX_UPLOAD_MB = 20


def server_address(host: str | None = None, port: int | None = None) -> tuple[str, int]:
    """Host and port: the given ones, else Gradio's own environment variables (a Space sets them), else local."""
    return host or os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"), port or int(os.environ.get("GRADIO_SERVER_PORT", "7860"))


def launch(demo: gr.Blocks, host: str, port: int, concurrency: int = DEFAULT_CONCURRENCY, max_upload_mb: int = DEFAULT_MAX_UPLOAD_MB) -> None:
    # Two CPU cores: more than two forward passes at once only adds latency to each; the
    # bounded queue turns a flood into "queue full" errors instead of unbounded memory.
    demo.queue(default_concurrency_limit=concurrency, max_size=64)
    demo.launch(server_name=host, server_port=port, max_file_size=f"{max_upload_mb}mb", ssr_mode=False, show_error=True)


def serve(predictor: Classifier, host: str | None = None, port: int | None = None, concurrency: int = DEFAULT_CONCURRENCY,
          max_upload_mb: int = DEFAULT_MAX_UPLOAD_MB, feedback: FeedbackStore | None = None) -> None:
    """Serve a loaded classifier's page until stopped: what `bonebreak app` and an exported Space's app.py run
    (``feedback``: store visitors' flags there; off unless given)."""
    if serving_threads(predictor):
        logger.info("ONNX Runtime serves every network: BLAS kept to one thread")
    if feedback is not None:
        logger.info("feedback is on: flagged images are stored in %s", feedback.folder)
    launch(build_demo(predictor, feedback=feedback), *server_address(host, port), concurrency, max_upload_mb)
