import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from recon3d.images import BackgroundRemover, ImageError, load_image, prepare_image


def rgba_object(size=(200, 160), box=(40, 30, 120, 90), colour=(200, 30, 30, 255)):
    """Transparent canvas (w, h) with an opaque rectangle (left, top, right, bottom)."""
    array = np.zeros((size[1], size[0], 4), np.uint8)
    left, top, right, bottom = box
    array[top:bottom, left:right] = colour
    return Image.fromarray(array, "RGBA")


def test_alpha_object_is_recentred_to_the_foreground_ratio_on_white():
    prepared = prepare_image(rgba_object(), size=100, foreground_ratio=0.8)
    rgb = np.asarray(prepared.image).astype(int)
    assert prepared.image.size == (100, 100) and prepared.had_alpha
    red = (rgb[..., 0] > 150) & (rgb[..., 1] < 100)
    rows, cols = np.nonzero(red)
    assert cols.max() - cols.min() + 1 == pytest.approx(80, abs=2)  # longer side (80 px wide) -> 80% of 100
    assert (cols.min() + cols.max()) / 2 == pytest.approx(49.5, abs=1.5)
    assert (rows.min() + rows.max()) / 2 == pytest.approx(49.5, abs=1.5)
    assert (rgb[0, 0] == 255).all()  # background composited on white


def test_image_without_alpha_and_without_remover_is_used_whole():
    image = Image.new("RGB", (120, 60), (10, 200, 10))
    prepared = prepare_image(image, size=64, remove_background=None)
    assert prepared.image.size == (64, 64) and not prepared.background_removed
    assert any("whole image" in note for note in prepared.notes)
    rgb = np.asarray(prepared.image)
    assert (rgb[32, 32] == [10, 200, 10]).all() and (rgb[2, 32] == 255).all()  # letterboxed on white


def test_background_remover_without_weights_offline_says_so_and_continues(tmp_path, monkeypatch):
    monkeypatch.setenv("U2NET_HOME", str(tmp_path))
    remover = BackgroundRemover(offline=True)
    prepared = prepare_image(Image.new("RGB", (64, 64), (0, 0, 255)), size=32, remove_background=remover)
    assert not prepared.background_removed
    assert "not downloaded" in remover.unavailable_reason and remover.unavailable_reason in prepared.notes


def write(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def png_bytes(image):
    import io

    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def test_refusals_have_clear_messages(tmp_path):
    noise = Image.effect_noise((256, 256), 50).convert("RGB")
    bmp = tmp_path / "old.bmp"
    Image.new("RGB", (64, 64)).save(bmp)
    cases = {
        "not an image": write(tmp_path, "notes.png", b"hello, I am text"),
        "truncated or corrupt": write(tmp_path, "cut.png", png_bytes(noise)[:400]),
        "at least 32 px": write(tmp_path, "tiny.png", png_bytes(Image.new("RGB", (16, 40)))),
        "BMP images are not supported": bmp,
        "no such file": tmp_path / "missing.png",
    }
    for message, path in cases.items():
        with pytest.raises(ImageError, match=message):
            load_image(path)


def test_decompression_bomb_is_refused_from_the_header(tmp_path):
    data = bytearray(png_bytes(Image.new("L", (64, 64))))
    ihdr = struct.pack(">II", 100_000, 100_000) + bytes(data[24:29])  # claim 100k x 100k pixels
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    with pytest.raises(ImageError, match="too many pixels|limit is"):
        load_image(write(tmp_path, "bomb.png", bytes(data)))
    with pytest.raises(ImageError, match="limit is"):
        load_image(png_bytes(Image.new("RGB", (100, 100))), max_pixels=5000)


def test_fully_transparent_image_is_refused():
    with pytest.raises(ImageError, match="fully transparent"):
        prepare_image(Image.new("RGBA", (64, 64), (255, 0, 0, 0)), size=32)


def test_arrays_and_bytes_are_accepted():
    array = np.zeros((40, 50, 3), np.float32) + 0.5
    assert load_image(array).size == (50, 40)
    assert load_image(png_bytes(Image.new("RGB", (33, 34)))).mode == "RGBA"


def test_background_remover_output_is_used_when_the_model_loads(monkeypatch):
    """The wiring around rembg: its cut-out (a fake one here) becomes the alpha that is cropped and recentred."""
    import rembg

    def fake_remove(image, session):
        array = np.asarray(image.convert("RGBA")).copy()
        array[..., 3] = 0
        array[10:30, 20:60, 3] = 255  # the "object": 40 x 20 px
        return Image.fromarray(array)

    monkeypatch.setattr(rembg, "new_session", lambda name: object())
    monkeypatch.setattr(rembg, "remove", fake_remove)
    prepared = prepare_image(Image.new("RGB", (100, 100), (0, 90, 0)), size=50, foreground_ratio=0.5,
                             remove_background=BackgroundRemover(offline=False))
    assert prepared.background_removed and not prepared.notes
    mask = np.asarray(prepared.foreground_mask) > 128
    cols = np.nonzero(mask.any(0))[0]
    assert cols.max() - cols.min() + 1 == pytest.approx(25, abs=2)  # the longer side fills half of 50 px


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (80, 40), (255, 0, 0))
    exif = image.getexif()
    exif[0x0112] = 6  # rotated 90 degrees: the photo is really 40 wide and 80 high
    path = tmp_path / "phone.jpg"
    image.save(path, exif=exif)
    assert load_image(path).size == (40, 80)


def test_background_removal_that_finds_nothing_says_so(monkeypatch):
    import rembg

    monkeypatch.setattr(rembg, "new_session", lambda name: object())
    monkeypatch.setattr(rembg, "remove", lambda image, session: Image.new("RGBA", image.size, (0, 0, 0, 0)))
    with pytest.raises(ImageError, match="background removal found no object"):
        prepare_image(Image.new("RGB", (64, 64), (9, 9, 9)), size=32, remove_background=BackgroundRemover())


PEAK_MEMORY_OF_PREPARING = """
import resource, sys
import numpy as np
from PIL import Image
from recon3d.images import prepare_image
image = Image.new("RGB", (20000, 32), (200, 0, 0))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
prepared = prepare_image(image, size=64)
grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
np.save(sys.argv[1], np.asarray(prepared.image))
print(grown_kib)
"""


def test_long_thin_images_stay_small_in_memory(tmp_path):
    """Measured in a fresh process: ru_maxrss is a process-wide peak, which earlier tests would hide."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    out = tmp_path / "prepared.npy"
    proc = subprocess.run([sys.executable, "-c", PEAK_MEMORY_OF_PREPARING, str(out)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    grown_mib = int(proc.stdout.split()[-1]) / 1024
    assert grown_mib < 100  # a square of 20000 px a side would take 1.1 GiB
    prepared = np.load(out)
    assert prepared.shape == (64, 64, 3)
    reddish_rows = np.nonzero((prepared[..., 1] < 250).all(axis=1))[0]
    assert 1 <= len(reddish_rows) <= 2 and abs(reddish_rows.mean() - 31.5) <= 1  # a thin strip across the middle


def test_high_bit_depth_and_array_inputs_keep_their_values(tmp_path):
    grey16 = Image.fromarray(np.full((40, 40), 20000, np.uint16))
    grey16.save(tmp_path / "g16.png")
    assert np.asarray(load_image(tmp_path / "g16.png"))[0, 0, 0] == pytest.approx(78, abs=1)
    cases = {np.uint16: (np.full((40, 40, 3), 65535 // 2, np.uint16), 127), bool: (np.ones((40, 40), bool), 255),
             np.float32: (np.full((40, 40, 3), 0.25, np.float32), 64)}
    for array, expected in cases.values():
        assert np.asarray(load_image(array))[5, 5, 0] == pytest.approx(expected, abs=1)
    for bad in (np.full((40, 40, 3), 200.0), np.full((40, 40, 3), np.nan)):
        with pytest.raises(ImageError, match="finite values in \\[0, 1\\]"):
            load_image(bad)


def test_a_failing_background_model_is_skipped_with_a_note(monkeypatch):
    import rembg

    def broken(image, session):
        raise RuntimeError("onnxruntime exploded")

    monkeypatch.setattr(rembg, "new_session", lambda name: object())
    monkeypatch.setattr(rembg, "remove", broken)
    prepared = prepare_image(Image.new("RGB", (64, 64), (1, 2, 3)), size=32, remove_background=BackgroundRemover())
    assert not prepared.background_removed
    assert any("onnxruntime exploded" in note for note in prepared.notes)
