"""`aicrl export`: write a model folder's ONNX files (see aicrl/runtime.py for what they hold).

    export_onnx(model_dir, int8=False, calibration=None) -> manifest dict

The three graphs come from the torch modules as they are: the encoder with its fine-tuned layers
(if any), the decoder's `start()` and `step()`, its recurrent state as inputs and outputs named
after `decoder.state_names`. Weights are stored
as fp16 (the decoder's are fp16 in model.safetensors already, so that is lossless) and cast to fp32
once when ONNX Runtime loads them. With `int8`, int8 copies of the encoder and the decoder step are
written beside them (`ModelFolder.INT8_GRAPHS`): the step's matrix products quantized dynamically (int8
weights, activations quantized per call), the encoder statically (int8 weights per channel,
activation ranges measured on `calibration` photos). Every fp32 graph is checked against torch
on the same inputs before the manifest is written; the manifest records the SHA-256 of
model.safetensors, so a later change of weights makes the export stale (`runtime.check_export`).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .model.folder import ModelFolder
from .model.tags import save_head
from .runtime import STATE_OUT, OnnxModel, file_sha256

ONNX_FILES, INT8_FILES, MANIFEST = ModelFolder.ONNX_GRAPHS, ModelFolder.INT8_GRAPHS, ModelFolder.ONNX_MANIFEST


OPSET = 17
FP16_MIN_ELEMENTS = 1024  # smaller tensors (biases, norms) stay fp32: no size to win


class _Encoder(nn.Module):
    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images)


class _Start(nn.Module):
    """`start()` with loose inputs: (features[, styles][, concept_ids, concept_probs])."""

    def __init__(self, decoder: nn.Module, styled: bool):
        super().__init__()
        self.decoder, self.styled = decoder, styled

    def forward(self, features: torch.Tensor, *rest: torch.Tensor):
        styles = rest[0] if self.styled else None
        concepts = tuple(rest[int(self.styled):]) or None
        feats, projected, style, state = self.decoder.start(features, styles, concepts)
        return (feats, projected, *state) + ((style,) if self.styled else ())


class _Step(nn.Module):
    """`step()` with the recurrent state as loose tensors: (words, *state, features, projected[, style])."""

    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.decoder = decoder

    def forward(self, words, *tensors):
        n = len(self.decoder.state_names)
        features, projected, *style = tensors[n:]
        logits, state, alpha = self.decoder.step(words, tuple(tensors[:n]), features, projected,
                                                 style[0] if style else None)
        return (logits, *state, alpha)


# tensors with a regions axis (1): a grid and its concept regions, or the concepts alone (no grid)
REGION_AXIS = {"features", "features_norm", "projected", "alpha"}


def _export(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str]) -> None:
    module.eval()
    with warnings.catch_warnings():  # the TorchScript exporter: deprecated, but exact and quick here
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), dynamo=False, opset_version=OPSET, input_names=inputs,
                          output_names=outputs, dynamic_axes={n: {0: "batch", **({1: "regions"} if n in REGION_AXIS else {})}
                                                              for n in inputs + outputs},
                          do_constant_folding=True)
    module.eval()  # the exporter puts back the mode it found, which was train() for a fresh wrapper


def _store_fp16(path: Path) -> None:
    """Float weights -> fp16 initializers, each cast back to fp32 by a Cast node that ONNX Runtime
    folds when it loads the graph: half the file, fp32 arithmetic."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    kept, casts = [], []
    for init in graph.initializer:
        if init.data_type == TensorProto.FLOAT and int(np.prod(init.dims)) >= FP16_MIN_ELEMENTS:
            half = numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name + "__fp16")
            kept.append(half)
            casts.append(helper.make_node("Cast", [half.name], [init.name], to=TensorProto.FLOAT))
        else:
            kept.append(init)
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = casts + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.save(model, str(path))


def _quantize_int8(path: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "q.onnx"
        quantize_dynamic(str(path), str(out), op_types_to_quantize=["MatMul", "Gemm"],
                         weight_type=QuantType.QInt8, per_channel=True)
        os.replace(out, path)


def calibration_batch(folder: str | Path, limit: int = 64) -> np.ndarray:
    """Up to `limit` photos of `folder`, preprocessed, each also mirrored: the activations whose
    ranges the int8 encoder is calibrated on."""
    from .data.images import image_files, load_image, preprocess_array

    files = image_files(folder)[:limit]
    if not files:
        raise ValueError(f"--calibration {folder}: no photos there (jpg, png, ...)")
    batch = np.stack([preprocess_array(load_image(f)) for f in files]).astype(np.float32)
    return np.ascontiguousarray(np.concatenate([batch, batch[..., ::-1]]))


def _quantize_encoder_int8(path: Path, images: np.ndarray) -> None:
    """Static int8 (QDQ, per-channel weights, MinMax activation ranges): EfficientNet-Lite was made
    for it (ReLU6, no squeeze-excitation). ONNX Runtime fuses the pairs into int8 convolutions."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(np.array_split(images, max(1, len(images) // 16)))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {"images": np.ascontiguousarray(batch)}

    with tempfile.TemporaryDirectory() as tmp:
        prepared, out = Path(tmp) / "prepared.onnx", Path(tmp) / "q.onnx"
        quant_pre_process(str(path), str(prepared))
        quantize_static(str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        os.replace(out, path)


def _max_diff(a: list[np.ndarray], b: list[torch.Tensor]) -> float:
    return max(float(np.abs(x - y.detach().float().numpy()).max()) for x, y in zip(a, b))


def export_onnx(model_dir: str | Path | None = None, int8: bool = False, command: str | None = None,
                calibration: str | Path | None = None) -> dict:
    """Export the model folder `model_dir` (default: the shipped model) into ONNX files beside its
    weights; returns the manifest (also written as onnx.json). `int8` needs `calibration`, a folder
    of photos (a few dozen like the ones to caption are plenty)."""
    if int8 and not calibration:
        raise ValueError("--int8 needs --calibration DIR: photos to measure the encoder's activation ranges on")
    calibration_images = calibration_batch(calibration) if int8 else None
    from .model.captioner import Captioner, default_model_dir

    model_dir = Path(model_dir) if model_dir else default_model_dir()
    started = time.perf_counter()
    model = Captioner.from_pretrained(model_dir, backend="torch")
    cfg, decoder, encoder = model.config, model.decoder.float().eval(), model.encoder.float().eval()
    styled = decoder.style_embed is not None
    torch.manual_seed(0)
    images = torch.randn(2, 3, 224, 224)
    features = encoder(images).detach()
    styles = torch.tensor([0, len(cfg.styles) - 1])
    grounded = decoder.concept_embed is not None
    concepts = (torch.randint(0, cfg.num_concepts + 1, (2, cfg.concept_tokens)), torch.rand(2, cfg.concept_tokens))
    start_inputs = ["features"] + (["styles"] if styled else []) + (["concept_ids", "concept_probs"] if grounded else [])
    state_names = list(decoder.state_names)
    start_outputs = ["features_norm", "projected", *state_names] + (["style"] if styled else [])
    step_inputs = ["words", *state_names, "features", "projected"] + (["style"] if styled else [])
    step_outputs = ["logits", *(n + STATE_OUT for n in state_names), "alpha"]

    with tempfile.TemporaryDirectory(dir=model_dir) as tmp:
        tmp = Path(tmp)
        _export(_Encoder(encoder), (images,), tmp / ONNX_FILES["encoder"], ["images"], ["features"])
        start = _Start(decoder, styled)
        start_args = (features, *([styles] if styled else []), *(concepts if grounded else ()))
        _export(start, start_args, tmp / ONNX_FILES["start"], start_inputs, start_outputs)
        with torch.no_grad():
            start_out = start(*start_args)
        feats, projected, *rest = start_out
        words = torch.tensor([model.vocab.start, 4])
        step_args = (words, *rest[:len(state_names)], feats, projected, *rest[len(state_names):])
        _export(_Step(decoder), step_args, tmp / ONNX_FILES["step"], step_inputs, step_outputs)
        if int8:
            shutil.copy(tmp / ONNX_FILES["step"], tmp / INT8_FILES["step"])
            _quantize_int8(tmp / INT8_FILES["step"])
            shutil.copy(tmp / ONNX_FILES["encoder"], tmp / INT8_FILES["encoder"])
            _quantize_encoder_int8(tmp / INT8_FILES["encoder"], calibration_images)
        files = [*ONNX_FILES.values(), *(INT8_FILES.values() if int8 else [])]
        for name in files:
            _store_fp16(tmp / name)
        weights = ModelFolder(model_dir).weights
        manifest = {
            "format": 1,
            "weights_sha256": file_sha256(weights),
            "encoder": cfg.encoder,
            "encoder_finetuned": model.encoder_finetuned,
            "int8": int8,
            **({"calibration_images": len(calibration_images)} if int8 else {}),
            "opset": OPSET,
            "torch": torch.__version__,
            "parameters": {"encoder": int(sum(p.numel() for p in encoder.parameters())),
                           "decoder": int(sum(p.numel() for p in decoder.parameters()))},
            "files": {name: file_sha256(tmp / name) for name in files},
            "command": command or f"aicrl export --model {model_dir}"
                       + (f" --int8 --calibration {calibration}" if int8 else ""),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        # Check the ONNX graphs against torch on the same inputs before they replace anything.
        onnx_model = OnnxModel(tmp, cfg.encoder)
        with torch.no_grad():
            step_ref = _Step(decoder)(*step_args)
        feed = {n: a.numpy() for n, a in zip(step_inputs, step_args)}
        state = onnx_model.steps.start(features.numpy(), styles.numpy() if styled else None, 1,
                                       tuple(c.numpy() for c in concepts) if grounded else None)
        checks = {
            "encoder_max_abs_diff": _max_diff([onnx_model.encode(images.numpy())], [features]),
            "start_max_abs_diff": max(float(np.abs(state[k.replace("_norm", "")] - v.numpy()).max())
                                      for k, v in zip(start_outputs, start_out)),
            "step_logits_max_abs_diff": _max_diff(onnx_model.sessions["step"].run(None, feed)[:1], step_ref[:1]),
        }
        del onnx_model
        manifest["checks"] = {k: round(v, 6) for k, v in checks.items()}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        (model_dir / MANIFEST).unlink(missing_ok=True)  # no valid export while files are replaced
        tags = [ModelFolder.CLASSIFIER] if save_head(encoder, tmp) else []  # the ImageNet head, for tags
        for name in INT8_FILES.values():  # an earlier export's int8 graphs are stale now
            (model_dir / name).unlink(missing_ok=True)
        for name in [*files, *tags, MANIFEST]:  # the manifest last: it makes the export valid
            os.replace(tmp / name, model_dir / name)
    manifest["seconds"] = round(time.perf_counter() - started, 1)
    manifest["bytes"] = {name: (model_dir / name).stat().st_size for name in files}
    return manifest
