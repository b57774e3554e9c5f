"""Build people.onnx (model/people.py) from MediaPipe's person and face detectors.

    pip download --no-deps mediapipe==0.10.14     # its wheel carries the detectors (Apache-2.0);
                                                  # later wheels download them at run time instead
    pip install tensorflow-cpu tf2onnx            # for this conversion only, in a scratch venv
    python -m aicrl.model.build_people --wheel mediapipe-0.10.14-*.whl --out aicrl/pretrained/people.onnx

The .tflite files keep their weights sparse (DENSIFY ops), which tf2onnx cannot read: TensorFlow
Lite's own interpreter densifies them once, the dense weights replace the DENSIFY ops, and tf2onnx
converts the result. Each detector's graph then ends in the score of its most confident anchor
(max over anchors, then a sigmoid), and the two graphs become one with inputs "pose_image" and
"face_image" and outputs "pose" and "face". The conversion is checked against TensorFlow Lite on random inputs.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from .people import INPUTS

MEMBERS = {"pose": "mediapipe/modules/pose_detection/pose_detection.tflite",
           "face": "mediapipe/modules/face_detection/face_detection_full_range_sparse.tflite"}
OPSET = 17


def densify(tflite: bytes) -> bytes:
    """The model with its sparse weights stored dense and its DENSIFY ops gone."""
    import flatbuffers
    import tensorflow as tf
    from tensorflow.lite.python import schema_py_generated as schema

    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(tflite, 0))
    # without the XNNPACK delegate, which would fold the DENSIFY ops away before they can be read
    interpreter = tf.lite.Interpreter(model_content=tflite, experimental_preserve_all_tensors=True,
                                      experimental_op_resolver_type=tf.lite.experimental.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    interpreter.allocate_tensors()
    interpreter.invoke()  # constant subgraphs like DENSIFY run whatever the input
    graph = model.subgraphs[0]
    codes = [max(c.builtinCode, c.deprecatedBuiltinCode) for c in model.operatorCodes]
    kept = []
    for op in graph.operators:
        if codes[op.opcodeIndex] != schema.BuiltinOperator.DENSIFY:
            kept.append(op)
            continue
        buffer = schema.BufferT()
        buffer.data = np.frombuffer(interpreter.get_tensor(op.outputs[0]).tobytes(), np.uint8)
        model.buffers.append(buffer)
        for tensor in (graph.tensors[op.outputs[0]], graph.tensors[op.inputs[0]]):
            tensor.buffer, tensor.sparsity = len(model.buffers) - 1, None
    graph.operators = kept
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def to_onnx(tflite: bytes, name: str):
    """One detector as ONNX: input `name`_image (1, size, size, 3), output `name`: its best anchor's score."""
    import onnx
    import tf2onnx
    from onnx import helper

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.tflite"
        path.write_bytes(tflite)
        model, _ = tf2onnx.convert.from_tflite(str(path), opset=OPSET)
    graph = model.graph
    scores = next(o.name for o in graph.output if o.type.tensor_type.shape.dim[-1].dim_value == 1)
    graph.node.extend([helper.make_node("ReduceMax", [scores], [f"{name}_best"], keepdims=0),
                       helper.make_node("Sigmoid", [f"{name}_best"], [name])])
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, []))
    old, graph.input[0].name = graph.input[0].name, f"{name}_image"
    for node in graph.node:
        node.input[:] = [f"{name}_image" if i == old else i for i in node.input]
    return onnx.compose.add_prefix(model, f"{name}_", rename_inputs=False, rename_outputs=False)


def as_fp16(initializers: list) -> tuple[list, list]:
    """Large fp32 weights stored as fp16 with a Cast back (the .tflite weights were fp16: nothing is
    lost, and the file is half the size; ONNX Runtime folds the casts when it loads the graph)."""
    import onnx
    from onnx import helper, numpy_helper

    kept, casts = [], []
    for tensor in initializers:
        if tensor.data_type != onnx.TensorProto.FLOAT or np.prod(tensor.dims) < 1024:
            kept.append(tensor)
            continue
        kept.append(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float16), f"{tensor.name}_fp16"))
        casts.append(helper.make_node("Cast", [f"{tensor.name}_fp16"], [tensor.name], to=onnx.TensorProto.FLOAT))
    return kept, casts


def merge(models: dict):
    import onnx
    from onnx import helper

    graphs = [m.graph for m in models.values()]
    weights, casts = as_fp16([t for g in graphs for t in g.initializer])
    graph = helper.make_graph(casts + [n for g in graphs for n in g.node], "people",
                              [i for g in graphs for i in g.input], [o for g in graphs for o in g.output], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="aicrl build_people (MediaPipe 0.10.14 detectors, Apache-2.0)")
    onnx.checker.check_model(model)
    return model


def check(tflite: dict[str, bytes], path: Path) -> float:
    """Largest difference between TensorFlow Lite and people.onnx on random photos."""
    import onnxruntime as ort
    import tensorflow as tf

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng, worst = np.random.default_rng(0), 0.0
    for _ in range(3):
        feed = {f"{n}_image": rng.uniform(-1, 1, (1, s, s, 3)).astype(np.float32) for n, s in INPUTS.items()}
        got = dict(zip(INPUTS, session.run(list(INPUTS), feed)))
        for name, content in tflite.items():
            interpreter = tf.lite.Interpreter(model_content=content)
            interpreter.allocate_tensors()
            interpreter.set_tensor(interpreter.get_input_details()[0]["index"], feed[f"{name}_image"])
            interpreter.invoke()
            out = next(d for d in interpreter.get_output_details() if d["shape"][-1] == 1)
            best = 1 / (1 + np.exp(-interpreter.get_tensor(out["index"]).max()))
            worst = max(worst, abs(float(best) - float(got[name])))
    return worst


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheel", type=Path, required=True, help="mediapipe-0.10.14-*.whl")
    parser.add_argument("--out", type=Path, required=True, help="people.onnx in a model folder")
    args = parser.parse_args(argv)
    import onnx

    with zipfile.ZipFile(args.wheel) as wheel:
        missing = [m for m in MEMBERS.values() if m not in wheel.namelist()]
        if missing:
            sys.exit(f"error: {args.wheel} has no {missing[0]} (MediaPipe 0.10.14 has it)")
        tflite = {name: wheel.read(member) for name, member in MEMBERS.items()}
    model = merge({name: to_onnx(densify(content), name) for name, content in tflite.items()})
    onnx.save(model, str(args.out))
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB); largest difference from "
          f"TensorFlow Lite on random inputs: {check(tflite, args.out):.2e}")


if __name__ == "__main__":
    main()
