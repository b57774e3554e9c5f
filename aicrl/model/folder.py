"""A model folder's files, named in one place (the Hugging Face `save_pretrained` shape).

    config.json          CaptionerConfig (aicrl/config.py)
    vocab.json           the vocabulary
    model.safetensors    decoder weights (fp16), plus `encoder.*` when the encoder was fine-tuned
    metrics.json         evaluation results (optional): {"dev": ..., "epoch": N} from training, and one
                         block per `aicrl evaluate --save-to-model` under `metrics_key(...)`
    train_config.json    the settings of the training run that made the weights (optional; TrainConfig)
    COMMAND.txt          how it was made: the exact commands (optional, for people)
    phrases.json         each style's over-used phrases, penalised when decoding (optional; aicrl/phrases.py)
    onnx.json, *.onnx    the same model for ONNX Runtime (`aicrl export`; aicrl/runtime.py), int8 graphs
                         beside the fp32 ones with `--int8`
    classifier.npz       the encoder's ImageNet head, for tags on ONNX Runtime (aicrl/model/tags.py)
    concepts.json        ImageNet classes as caption words (aicrl/model/concepts.py, build_concepts.py)
    person_head.npz      a grounded model's person probe, and its mix with people.onnx (aicrl/model/concepts.py)
    people.onnx          person and face detectors (MediaPipe; aicrl/model/people.py, build_people.py)
    fluency.onnx         the fluency judge over the model's word ids (optional; aicrl/fluency.py)

`ModelFolder` is the only writer of metrics.json. Plain standard library: serving reads model cards
through it without torch.
"""
from __future__ import annotations

import json
from pathlib import Path

DEFAULT_BEAM = 3  # `aicrl evaluate`'s default beam: its results are a model's headline scores


def metrics_key(split: str, style: str, beam_size: int = DEFAULT_BEAM) -> str:
    """The metrics.json key of one evaluation: "test_factual", "flickrstyle_dev_humorous"; decodings
    other than the default beam get their own key beside it ("test_factual_greedy", "..._beam5")."""
    key = f"{split.replace(' ', '_')}_{style}".lower()
    if beam_size != DEFAULT_BEAM:
        key += "_greedy" if beam_size == 1 else f"_beam{beam_size}"
    return key


class ModelFolder:
    """The files of one model folder. Paths are properties; the json helpers read and write them."""

    CONFIG = "config.json"
    VOCAB = "vocab.json"
    WEIGHTS = "model.safetensors"
    METRICS = "metrics.json"
    TRAIN_CONFIG = "train_config.json"
    COMMAND = "COMMAND.txt"
    PHRASES = "phrases.json"
    ONNX_MANIFEST = "onnx.json"
    ONNX_GRAPHS = {"encoder": "encoder.onnx", "start": "decoder_start.onnx", "step": "decoder_step.onnx"}
    INT8_GRAPHS = {"encoder": "encoder.int8.onnx", "step": "decoder_step.int8.onnx"}  # the start stays fp32
    CLASSIFIER = "classifier.npz"
    CONCEPTS = "concepts.json"
    PERSON_HEAD = "person_head.npz"
    FLUENCY = "fluency.onnx"
    PEOPLE = "people.onnx"

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"ModelFolder({str(self.path)!r})"

    @property
    def config(self) -> Path:
        return self.path / self.CONFIG

    @property
    def vocab(self) -> Path:
        return self.path / self.VOCAB

    @property
    def weights(self) -> Path:
        return self.path / self.WEIGHTS

    @property
    def metrics(self) -> Path:
        return self.path / self.METRICS

    @property
    def train_config(self) -> Path:
        return self.path / self.TRAIN_CONFIG

    @property
    def command(self) -> Path:
        return self.path / self.COMMAND

    @property
    def phrases(self) -> Path:
        return self.path / self.PHRASES

    @property
    def onnx_manifest(self) -> Path:
        return self.path / self.ONNX_MANIFEST

    @property
    def classifier(self) -> Path:
        return self.path / self.CLASSIFIER

    @property
    def concepts(self) -> Path:
        return self.path / self.CONCEPTS

    @property
    def person_head(self) -> Path:
        return self.path / self.PERSON_HEAD

    @property
    def fluency(self) -> Path:
        return self.path / self.FLUENCY

    @property
    def people(self) -> Path:
        return self.path / self.PEOPLE

    def onnx_graphs(self, int8: bool = False) -> dict[str, Path]:
        """The graph files a backend runs: fp32, or int8 where there is an int8 graph."""
        names = self.ONNX_GRAPHS | self.INT8_GRAPHS if int8 else self.ONNX_GRAPHS
        return {part: self.path / name for part, name in names.items()}

    def has_export(self) -> bool:
        """True when the folder has ONNX files (whether they are usable is for `runtime.check_export`)."""
        return self.onnx_manifest.exists() or any(p.exists() for p in self.onnx_graphs().values())

    def made_from_weights(self) -> list[Path]:
        """The files computed from model.safetensors: stale once the weights change."""
        names = [self.ONNX_MANIFEST, *self.ONNX_GRAPHS.values(), *self.INT8_GRAPHS.values(), self.CLASSIFIER,
                 self.PHRASES]
        return [self.path / name for name in names]

    # --- json files ---

    def read_json(self, name: str) -> dict:
        """A json object file of the folder; {} when it is missing. ValueError when it is not an object."""
        path = self.path / name
        if not path.is_file():
            return {}
        try:
            data = json.loads(path.read_text())
        except ValueError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: not a JSON object")
        return data

    def write_json(self, name: str, data: dict) -> None:
        (self.path / name).write_text(json.dumps(data, indent=2) + "\n")

    def read_metrics(self) -> dict:
        return self.read_json(self.METRICS)

    def write_metrics(self, metrics: dict) -> None:
        """A new record: what `save_pretrained` knows about weights it has just written."""
        self.write_json(self.METRICS, metrics)

    def merge_metrics(self, results: dict) -> dict:
        """Add or replace top-level entries (e.g. {metrics_key(...): result}), keeping the others;
        returns the merged metrics."""
        merged = self.read_metrics() | results
        self.write_metrics(merged)
        return merged

    def read_train_config(self) -> dict:
        return self.read_json(self.TRAIN_CONFIG)

    def write_train_config(self, settings: dict) -> None:
        self.write_json(self.TRAIN_CONFIG, settings)

    def read_command(self) -> str | None:
        return self.command.read_text().strip() if self.command.is_file() else None

    def write_command(self, command: str) -> None:
        self.command.write_text(command.strip() + "\n")
