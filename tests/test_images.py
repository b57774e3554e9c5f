import io

import numpy as np
import pytest
import torch
from PIL import Image

from aicrl.data import images as images_mod
from aicrl.data.images import IMAGENET_MEAN, ImageLoadError, load_image, preprocess

from .conftest import SAMPLES


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="TIFF" if image.mode == "CMYK" else "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16", "LA", "1"])
def test_any_mode_becomes_rgb_224(mode):
    image = Image.new("RGB", (300, 200), (200, 40, 40)).convert(mode)
    if mode == "I;16":
        image = Image.fromarray(np.full((200, 300), 40000, dtype=np.uint16))
    out = load_image(_png_bytes(image))
    assert out.mode == "RGB" and out.size == (224, 224)


def test_sixteen_bit_keeps_brightness():
    out = load_image(_png_bytes(Image.fromarray(np.full((50, 50), 65535, dtype=np.uint16))))
    assert np.asarray(out).min() >= 250  # full-scale 16-bit white stays white, not clipped garbage


def test_transparency_is_composited_on_white():
    rgba = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    assert np.asarray(load_image(_png_bytes(rgba))).min() == 255


def test_exif_orientation_is_applied():
    # a wide red|blue image stored with "rotate 90" in EXIF must come out tall (red on top or bottom)
    image = Image.new("RGB", (200, 100), (255, 0, 0))
    image.paste((0, 0, 255), (100, 0, 200, 100))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW on display
    buf = io.BytesIO()
    image.save(buf, format="JPEG", exif=exif, quality=95)
    out = np.asarray(load_image(buf.getvalue())).astype(int)
    top, bottom = out[:50].mean((0, 1)), out[-50:].mean((0, 1))
    assert (top[0] > 200 and bottom[2] > 200) or (top[2] > 200 and bottom[0] > 200)


def test_big_photos_are_decoded_reduced_whatever_the_format():
    """A PNG is shrunk as the JPEG decoder's draft mode shrinks a JPEG: both sides stay at least
    max_side, and a batch of big PNGs does not hold their full-size pixels."""
    from aicrl.data.images import decode_image

    photo = Image.new("RGB", (2000, 1500), (200, 40, 40))
    jpeg = io.BytesIO()
    photo.save(jpeg, format="JPEG")
    sizes = {fmt: decode_image(data, max_side=224).size for fmt, data in (("png", _png_bytes(photo)),
                                                                         ("jpeg", jpeg.getvalue()))}
    assert sizes == {"png": (500, 375), "jpeg": (500, 375)}
    assert decode_image(_png_bytes(photo)).size == (2000, 1500)  # without max_side: as it is
    assert decode_image(_png_bytes(photo.resize((300, 250))), max_side=224).size == (300, 250)


def test_preprocess_normalises_with_imagenet_stats():
    tensor = preprocess(SAMPLES / "chelsea.jpg")
    assert tensor.shape == (3, 224, 224) and tensor.dtype == torch.float32
    grey = preprocess(Image.new("RGB", (10, 10), (124, 116, 104)))
    assert torch.allclose(grey.mean((1, 2)), torch.zeros(3), atol=0.02)  # (124,116,104)/255 ~ mean
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406)


def test_bad_files_raise_the_typed_error(tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "notes.jpg"
    text.write_text("this is not a photo")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes((SAMPLES / "chelsea.jpg").read_bytes()[:3000])
    for path in (empty, text, truncated, tmp_path / "missing.jpg"):
        with pytest.raises(ImageLoadError):
            load_image(path)
    with pytest.raises(ImageLoadError):
        load_image(b"")


def test_huge_dimensions_are_refused_before_decoding(monkeypatch):
    buf = io.BytesIO()
    Image.new("L", (9000, 9000)).save(buf, format="PNG")  # 81 MP of zeros: compresses to ~80 kB
    with pytest.raises(ImageLoadError, match="over the limit"):
        load_image(buf.getvalue())
    monkeypatch.setattr(images_mod, "MAX_PIXELS", 10**12)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL's own bomb check also maps to our error
    with pytest.raises(ImageLoadError):
        load_image(_png_bytes(Image.new("RGB", (100, 100))))
