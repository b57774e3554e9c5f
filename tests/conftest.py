"""Shared fixtures. The web fixtures (prefix `web_`) build a tiny captioning model: the real
EfficientNet-Lite2 encoder with a small random decoder, saved as a model folder."""
from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

SAMPLES = Path(__file__).parent / "samples"

WEB_METRICS = {
    "dataset": "tiny random test model (not trained)",
    "test": {"BLEU-1": 0.6123, "BLEU-4": 0.2071, "CIDEr": 0.5432, "images": 1000},
    "beam_size": 3,
}


def make_tiny_model(path: Path) -> Path:
    """A deterministic tiny model whose captions are never empty: <end> and <unk> are made very
    unlikely, so every caption runs to `max_length` words of the vocabulary."""
    import torch

    from aicrl.config import CaptionerConfig
    from aicrl.data.vocab import Vocabulary
    from aicrl.model.captioner import Captioner
    from aicrl.model.decoder import AttentionLSTMDecoder

    vocab = Vocabulary.build(["a man riding a horse", "a dog runs on grass"] * 5, min_freq=1)
    cfg = CaptionerConfig(vocab_size=len(vocab), styles=["factual", "humorous", "romantic"], embed_dim=32,
                          hidden_dim=32, attention_dim=32, style_dim=8, max_length=5)
    state = torch.random.get_rng_state()
    torch.manual_seed(3)
    decoder = AttentionLSTMDecoder(cfg)
    torch.random.set_rng_state(state)
    with torch.no_grad():
        decoder.out_words.bias[vocab.end] = -30.0
        decoder.out_words.bias[vocab.unk] = -30.0
    Captioner(cfg, vocab, decoder).save_pretrained(path, metrics=WEB_METRICS, command="aicrl train --tiny (tests)")
    return path


def serve(app):
    """Run `app` with uvicorn in a background thread on a free 127.0.0.1 port; returns (url, stop)."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)

    def stop():
        server.should_exit = True
        thread.join(10)
        sock.close()

    return f"http://127.0.0.1:{port}", stop


@pytest.fixture(scope="session")
def web_model_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def web_captioner(web_model_dir):
    from aicrl.model.captioner import Captioner

    return Captioner.from_pretrained(web_model_dir)


@pytest.fixture(scope="session")
def web_samples() -> Path:
    return SAMPLES


# --- tiny generated Flickr8k-shaped data and its feature cache (model and data tests) ---

@pytest.fixture(scope="session")
def tiny_flickr(tmp_path_factory) -> Path:
    from .tiny_data import write_flickr8k

    return write_flickr8k(tmp_path_factory.mktemp("flickr8k"), styles=True)


@pytest.fixture(scope="session")
def lite2():
    from aicrl.model.encoders import build_encoder

    return build_encoder("efficientnet-lite2")


def _tiny_cache(tiny_flickr: Path, encoder, folder: Path, **options) -> Path:
    """A feature cache of every tiny photo (options: extract_features's stage, mirror), encoded in
    fp32 so that the features, and what the tiny models learn from them, do not hang on the CPU's
    bf16 (none, AVX512-bf16 or AMX)."""
    from aicrl.data.datasets import read_flickr8k
    from aicrl.data.features import extract_features

    data = read_flickr8k(tiny_flickr)
    extract_features(encoder, data.image_dir, data.images(), folder, batch_size=8, num_workers=0,
                     precision="fp32", **options)
    return folder


@pytest.fixture(scope="session")
def tiny_cache(tiny_flickr, lite2, tmp_path_factory) -> Path:
    return _tiny_cache(tiny_flickr, lite2, tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def tiny_mirrored_cache(tiny_flickr, lite2, tmp_path_factory) -> Path:
    """The tiny photos flipped left to right (training augmentation)."""
    return _tiny_cache(tiny_flickr, lite2, tmp_path_factory.mktemp("mirrored_cache"), mirror=True)


@pytest.fixture(scope="session")
def tiny_last_stage_cache(tiny_flickr, lite2, tmp_path_factory) -> Path:
    """What enters Lite2's last stage, for fine-tuning it."""
    from aicrl.data.features import LAST_STAGE_INPUT

    return _tiny_cache(tiny_flickr, lite2, tmp_path_factory.mktemp("last_stage_cache"), stage=LAST_STAGE_INPUT)
