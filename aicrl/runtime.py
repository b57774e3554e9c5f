"""The model on ONNX Runtime: encoder and decoder steps with no torch (onnxruntime + numpy).

`aicrl export` (aicrl/export.py) writes these files into a model folder:
    encoder.onnx         images (B, 3, 224, 224) -> grid features (B, 49, F)
    decoder_start.onnx   features (B, R, F), styles (B,) -> normalised features, their attention
                         projection, the decoder's initial recurrent state (the attention LSTM's
                         h, c), style vector
    decoder_step.onnx    one word for N rows: words, recurrent state, features, projection, style
                         -> logits (N, V), the new state (h_out, c_out), attention (N, R)
    encoder.int8.onnx, decoder_step.int8.onnx
                         with `aicrl export --int8`: the same graphs in int8, beside the fp32 ones
                         (`--backend onnx-int8` runs them)
    onnx.json            the export's manifest: the SHA-256 of the model.safetensors it was made from
                         (a changed model makes the export stale), file hashes, int8 or not, checks
`OnnxSteps` is the `decoding.StepDecoder` over the two decoder graphs, so ONNX Runtime and torch
share one beam search.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from .model.folder import ModelFolder

STATE_OUT = "_out"  # the step graph's output "h_out" is its input "h" at the next step


class OnnxModelError(RuntimeError):
    """A model folder's ONNX export is missing, unreadable or stale."""


class BackendUnavailable(ImportError):
    """The chosen backend's packages are not installed (torch, or onnxruntime)."""


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_export(model_dir: str | Path, encoder: str | None = None, int8: bool = False) -> dict:
    """The manifest of a complete export (with its int8 graphs if `int8`) that matches the folder's
    weights; OnnxModelError naming the file otherwise."""
    folder = ModelFolder(model_dir)
    model_dir, manifest_file = folder.path, folder.onnx_manifest
    try:
        manifest = json.loads(manifest_file.read_text())
    except FileNotFoundError:
        raise OnnxModelError(f"{manifest_file}: missing; run `aicrl export --model {model_dir}`") from None
    except (OSError, ValueError) as e:
        raise OnnxModelError(f"{manifest_file}: unreadable ({e}); run `aicrl export --model {model_dir}`") from e
    if int8 and not manifest.get("int8"):
        raise OnnxModelError(f"{manifest_file}: the export has no int8 graphs; run `aicrl export --model "
                             f"{model_dir} --int8 --calibration PHOTOS`")
    for graph in folder.onnx_graphs(int8).values():
        if not graph.is_file():
            raise OnnxModelError(f"{graph}: missing; run `aicrl export --model {model_dir}"
                                 + (" --int8 --calibration PHOTOS`" if int8 else "`"))
    weights = folder.weights
    if weights.is_file() and manifest.get("weights_sha256") != file_sha256(weights):
        raise OnnxModelError(f"{manifest_file}: stale, exported from other weights than {weights}; "
                             f"run `aicrl export --model {model_dir}`")
    if encoder and manifest.get("encoder") != encoder:
        raise OnnxModelError(f"{manifest_file}: exported for encoder {manifest.get('encoder')!r}, the model "
                             f"uses {encoder!r}; run `aicrl export --model {model_dir}`")
    return manifest


def _session(path: Path, threads: int | None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle worker threads sleep instead of spinning: between the decoder's small step calls the
    # spinning threads took the cores from numpy's beam bookkeeping (one image took twice as long on
    # 2 cores; batches are as fast either way).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types for bad files
        raise OnnxModelError(f"{path}: cannot be loaded by ONNX Runtime ({str(e).strip()[:300]}); "
                             f"run `aicrl export --model {path.parent}`") from e


class OnnxSteps:
    """`decoding.StepDecoder` over decoder_start.onnx and decoder_step.onnx. State: a dict of arrays
    (features, projected, style: the image context, one row per beam; the decoder's recurrent state,
    e.g. h and c, which the step graph returns as h_out and c_out between its logits and attention)."""

    def __init__(self, start_session, step_session):
        self.start_session, self.step_session = start_session, step_session
        self._start_inputs = {i.name for i in start_session.get_inputs()}
        self._start_outputs = [o.name for o in start_session.get_outputs()]
        self._step_inputs = [i.name for i in step_session.get_inputs()]
        self._recurrent = [o.name.removesuffix(STATE_OUT) for o in step_session.get_outputs()[1:-1]]

    def start(self, features: np.ndarray, styles: np.ndarray | None, repeat: int = 1,
              concepts: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
        feed = {"features": np.ascontiguousarray(features, dtype=np.float32)}
        if "styles" in self._start_inputs:  # models with one style have no style input
            feed["styles"] = (np.zeros(len(features), dtype=np.int64) if styles is None
                              else np.asarray(styles, dtype=np.int64))
        if "concept_ids" in self._start_inputs:  # grounded models (config.concept_tokens)
            if concepts is None:
                raise ValueError("this model reads the photo's concepts: give GenerationOptions.concepts")
            feed["concept_ids"] = np.asarray(concepts[0], dtype=np.int64)
            feed["concept_probs"] = np.asarray(concepts[1], dtype=np.float32)
        out = dict(zip(self._start_outputs, self.start_session.run(None, feed)))
        out["features"] = out.pop("features_norm")  # a graph output cannot reuse its input's name
        if repeat > 1:
            out = {k: np.repeat(v, repeat, 0) for k, v in out.items()}
        return out

    def step(self, words: np.ndarray, state: dict) -> tuple[np.ndarray, dict, np.ndarray]:
        feed = {"words": np.asarray(words, dtype=np.int64)} | {k: state[k] for k in self._step_inputs if k != "words"}
        logits, *recurrent, alpha = self.step_session.run(None, feed)
        return logits, state | dict(zip(self._recurrent, recurrent)), alpha

    def reorder(self, state: dict, rows: np.ndarray) -> dict:
        # Beams move only within their image: its context rows are all the same, only the recurrent state moves.
        return state | {k: state[k][rows] for k in self._recurrent}

    def select(self, state: dict, rows: np.ndarray) -> dict:
        return {k: v[rows] for k, v in state.items()}


class OnnxModel:
    """The three ONNX graphs of a model folder, loaded once: fp32, or the int8 encoder and decoder
    step with `int8`. `threads`: ONNX Runtime's intra-op threads (default: one per physical core)."""

    backend = "onnx"

    def __init__(self, model_dir: str | Path, encoder: str | None = None, threads: int | None = None,
                 int8: bool = False):
        self.model_dir, self.int8 = Path(model_dir), int8
        self.manifest = check_export(self.model_dir, encoder, int8)
        graphs = ModelFolder(self.model_dir).onnx_graphs(int8)
        self.sessions = {part: _session(path, threads) for part, path in graphs.items()}
        self.steps = OnnxSteps(self.sessions["start"], self.sessions["step"])

    def encode(self, batch: np.ndarray) -> np.ndarray:
        """(B, 3, 224, 224) normalised images -> (B, regions, dim) float32 grids."""
        return self.sessions["encoder"].run(None, {"images": np.ascontiguousarray(batch, dtype=np.float32)})[0]

    def parameter_counts(self) -> dict[str, Any]:
        return dict(self.manifest.get("parameters", {}))
