"""The ONNX Runtime path: export, agreement with torch, stale and broken exports, no torch needed."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from aicrl.model.captioner import Captioner, default_model_dir
from aicrl.model.folder import ModelFolder
from aicrl.runtime import OnnxModelError, check_export

from .conftest import SAMPLES

MANIFEST, ONNX_FILES, INT8_FILES = ModelFolder.ONNX_MANIFEST, ModelFolder.ONNX_GRAPHS, ModelFolder.INT8_GRAPHS

REPO = Path(__file__).resolve().parent.parent
BLOCK_TORCH = "import sys; sys.modules.update(dict.fromkeys(['torch', 'torchvision'])); "


@pytest.fixture(scope="session")
def exported(web_model_dir, tmp_path_factory) -> Path:
    from aicrl.export import export_onnx

    folder = tmp_path_factory.mktemp("exported") / "model"
    shutil.copytree(web_model_dir, folder)
    export_onnx(folder)
    return folder


def _copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "copy"))


def test_shipped_export_matches_shipped_weights():
    """Fails when model.safetensors changed without `aicrl export` (or the export is broken)."""
    model_dir = default_model_dir()
    manifest = check_export(model_dir, json.loads((model_dir / "config.json").read_text())["encoder"])
    assert sum((model_dir / f).stat().st_size for f in ONNX_FILES.values()) < 80 * 2**20
    onnx, torch_model = Captioner.from_pretrained(backend="onnx"), Captioner.from_pretrained(backend="torch")
    rng = np.random.default_rng(0)
    features = rng.uniform(0, 4, (2, 49, onnx.config.feature_dim)).astype(np.float32)
    a, b = onnx.steps(), torch_model.steps()
    b.dtype = None  # fp32, like ONNX
    words = np.array([onnx.vocab.start, onnx.vocab.start])
    concepts = onnx.concepts(onnx.seen(features))  # None for a model without concept regions
    logits_a, _, alpha_a = a.step(words, a.start(features, np.array([0, 1]), 1, concepts))
    logits_b, _, alpha_b = b.step(words, b.start(features, np.array([0, 1]), 1, concepts))
    assert np.abs(logits_a - logits_b).max() < (0.5 if manifest["int8"] else 1e-3)
    assert np.abs(alpha_a - alpha_b).max() < 1e-3


def test_onnx_and_torch_agree(exported):
    onnx = Captioner.from_pretrained(exported)
    torch_model = Captioner.from_pretrained(exported, backend="torch")
    torch_model.config.precision = "fp32"
    assert (onnx.backend, torch_model.backend) == ("onnx", "torch")
    photos = sorted(SAMPLES.glob("*.jpg"))
    fa, fb = onnx.encode(photos), torch_model.encode(photos)
    cosine = (fa * fb).sum((1, 2)) / np.linalg.norm(fa, axis=(1, 2)) / np.linalg.norm(fb, axis=(1, 2))
    assert fa.shape == fb.shape == (4, 49, 1280) and cosine.min() > 0.9999
    for style in onnx.styles:
        for beam in (1, 3):
            x = onnx.decode(fb, beam_size=beam, n_best=beam, style=style)
            y = torch_model.decode(fb, beam_size=beam, n_best=beam, style=style)
            assert [[h.tokens for h in r] for r in x] == [[h.tokens for h in r] for r in y]
            assert all(abs(h.logprob - g.logprob) < 1e-3 for r, q in zip(x, y) for h, g in zip(r, q))
            assert all(np.abs(h.attention - g.attention).max() < 1e-4 for r, q in zip(x, y) for h, g in zip(r, q))
    result = onnx.caption([SAMPLES / "chelsea.jpg"], n_best=2)[0]
    assert len(result.captions) == 2 and result.captions[0].text


def test_stale_export_falls_back_to_torch_once_or_is_refused(exported, tmp_path, capsys):
    from safetensors.numpy import load_file, save_file

    folder = _copy(exported, tmp_path)
    tensors = load_file(folder / "model.safetensors")
    tensors["out_words.bias"] = tensors["out_words.bias"] + np.float16(0.5)  # "trained further"
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(OnnxModelError, match="stale.*aicrl export"):
        check_export(folder)
    assert Captioner.from_pretrained(folder).backend == "torch"
    assert Captioner.from_pretrained(folder).backend == "torch"
    err = capsys.readouterr().err
    assert err.count("using torch instead") == 1 and ": stale, exported from other weights" in err
    with pytest.raises(OnnxModelError, match=str(folder / MANIFEST)):
        Captioner.from_pretrained(folder, backend="onnx")


def test_broken_or_missing_onnx_files_are_named(exported, tmp_path):
    folder = _copy(exported, tmp_path)
    (folder / "decoder_step.onnx").write_bytes(b"not an onnx file")
    with pytest.raises(OnnxModelError, match="decoder_step.onnx"):
        Captioner.from_pretrained(folder, backend="onnx")
    (folder / "encoder.onnx").unlink()
    with pytest.raises(OnnxModelError, match="encoder.onnx: missing"):
        Captioner.from_pretrained(folder, backend="onnx")
    assert Captioner.from_pretrained(folder).backend == "torch"  # auto: torch is here


def test_saving_new_weights_removes_the_old_export(exported, tmp_path):
    folder = _copy(exported, tmp_path)
    Captioner.from_pretrained(folder, backend="torch").save_pretrained(folder)
    assert not any((folder / f).exists() for f in [MANIFEST, *ONNX_FILES.values()])


def _python(code: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, cwd=REPO)


def test_captioning_needs_no_torch(exported):
    code = (BLOCK_TORCH + "from aicrl.cli import main; "
            f"code = main(['caption', '--model', {str(exported)!r}, {str(SAMPLES / 'chelsea.jpg')!r}, '--json']); "
            "assert 'torch' not in sys.modules or sys.modules['torch'] is None; sys.exit(code)")
    run = _python(code)
    assert run.returncode == 0, run.stderr[-2000:]
    line = json.loads(run.stdout)
    assert line["captions"][0]["text"]


def test_without_torch_a_stale_export_is_a_clear_error(exported, tmp_path):
    folder = _copy(exported, tmp_path)
    (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes() + b" ")
    run = _python(BLOCK_TORCH + "from aicrl.cli import main; "
                  f"main(['caption', '--model', {str(folder)!r}, {str(SAMPLES / 'chelsea.jpg')!r}])")
    assert run.returncode == 1 and "onnx.json: stale" in run.stderr and "Traceback" not in run.stderr


def test_help_imports_no_torch():
    for command in ([], ["caption"], ["serve"], ["index"], ["evaluate"], ["export"], ["extract-features"]):
        run = _python("import sys; from aicrl.cli import main\ntry:\n    main([*%r, '--help'])\n"
                      "except SystemExit:\n    pass\nprint('torch' in sys.modules)" % (command,))
        assert run.returncode == 0 and run.stdout.strip().endswith("False"), (command, run.stderr[-500:])


def test_the_app_serves_on_onnx_and_says_so(exported, tmp_path):
    from fastapi.testclient import TestClient

    from aicrl.serving.app import create_app

    with TestClient(create_app(model_dir=exported, db_path=tmp_path / "g.db")) as client:
        info = client.get("/api/info").json()
        assert info["backend"] == "onnx" and info["architecture"]["decoder_parameters"] > 0
        r = client.post("/api/captions", files={"image": ("c.jpg", (SAMPLES / "chelsea.jpg").read_bytes(), "image/jpeg")})
        assert r.status_code == 200 and r.json()["captions"][0]["text"]
        assert len(r.json()["attention"]["weights"][0]) == 49


def test_torch_backend_without_torch_is_a_clear_error(exported):
    run = _python(BLOCK_TORCH + "from aicrl.cli import main; "
                  f"main(['caption', '--backend', 'torch', {str(SAMPLES / 'chelsea.jpg')!r}])")
    assert run.returncode == 1 and "needs torch" in run.stderr and "Traceback" not in run.stderr


def test_training_starts_from_an_exported_model_folder(exported, tiny_flickr, tiny_cache, tmp_path):
    """--init-from a folder with an ONNX export still trains the torch weights."""
    from aicrl.training import TrainConfig, train

    from .test_training import SMALL

    cfg = TrainConfig(data_dir=str(tiny_flickr), features=str(tiny_cache), style_file=str(tiny_flickr / "styles.jsonl"),
                      init_from=str(exported), objective="self-critical", scst_samples=2, scst_max_words=4,
                      epochs=1, out=str(tmp_path / "run"), **(SMALL | {"early_stop": 99}))
    assert train(cfg)["epochs_run"] == 1


def test_int8_export_adds_int8_graphs_that_caption(web_model_dir, tmp_path):
    import onnx

    from aicrl.export import export_onnx

    folder = Path(shutil.copytree(web_model_dir, tmp_path / "int8"))
    with pytest.raises(ValueError, match="--calibration"):
        export_onnx(folder, int8=True)
    export_onnx(folder)
    with pytest.raises(OnnxModelError, match="no int8 graphs.*--int8 --calibration"):
        Captioner.from_pretrained(folder, backend="onnx-int8")
    manifest = export_onnx(folder, int8=True, calibration=SAMPLES)
    assert manifest["int8"] and manifest["calibration_images"] == 8  # 4 photos, each mirrored
    assert set(manifest["files"]) == {*ONNX_FILES.values(), *INT8_FILES.values()}
    ops = {name: {n.op_type for n in onnx.load(str(folder / f)).graph.node} for name, f in INT8_FILES.items()}
    assert "QuantizeLinear" in ops["encoder"] and "DynamicQuantizeLinear" in ops["step"]
    int8, fp32 = Captioner.from_pretrained(folder, backend="onnx-int8"), Captioner.from_pretrained(folder)
    reference = Captioner.from_pretrained(web_model_dir, backend="torch")
    reference.config.precision = "fp32"
    photos = sorted(SAMPLES.glob("*.jpg"))

    def cosine(a, b):
        return (a * b).sum((1, 2)) / np.linalg.norm(a, axis=(1, 2)) / np.linalg.norm(b, axis=(1, 2))

    ref = reference.encode(photos)
    assert cosine(fp32.encode(photos), ref).min() > 0.9999  # the fp32 graphs are as they were
    assert 0.9 < cosine(int8.encode(photos), ref).min() < 0.9999  # close, not equal: int8
    assert all(r.captions[0].text for r in int8.caption(photos))
    assert (int8.runtime.int8, fp32.runtime.int8) == (True, False)
    export_onnx(folder)  # a later fp32 export removes the int8 graphs it did not make
    assert not any((folder / f).exists() for f in INT8_FILES.values())
