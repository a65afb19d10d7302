"""Real photos shipped inside PyPI packages, preprocessed for an image model (opt-in helper).

Sources: scikit-image's ``skimage.data`` (photos bundled in its wheel: no download) and
matplotlib's ``sample_data/grace_hopper.jpg``.  ``pip install scikit-image matplotlib``
(or ``pip install -e ".[images]"``).

Two disjoint sets of *different photos* (no photo is in both):

* calibration: astronaut, camera(man), chelsea (cat), coffee, rocket, motorcycle_left, coins, brick,
  grass, page — several random crops / flips each;
* held-out: grace_hopper (matplotlib), hubble_deep_field, retina, immunohistochemistry, moon,
  gravel, text, clock, cell, and mosaics of the LFW faces subset — two crops each.

Preprocessing as nudenet (YOLOv8): pad bottom/right to a square with zeros, resize to ``size``,
RGB, scale to [0, 1], NCHW float32.  Gray photos are replicated to three channels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

CALIBRATION = ("astronaut", "camera", "chelsea", "coffee", "rocket", "motorcycle_left", "coins", "brick",
               "grass", "page")
HELD_OUT = ("grace_hopper", "hubble_deep_field", "retina", "immunohistochemistry", "moon", "gravel", "text",
            "clock", "cell", "lfw_mosaic_0", "lfw_mosaic_1")


def _photo(name: str) -> np.ndarray:
    """HxWx3 uint8."""
    if name == "grace_hopper":
        import matplotlib
        from matplotlib.image import imread

        img = imread(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg")
    elif name.startswith("lfw_mosaic_"):
        from skimage import data

        faces = data.lfw_subset()  # 200 x 25 x 25 floats in [0, 1]
        k = int(name.rsplit("_", 1)[1])
        tiles = faces[k * 16:(k + 1) * 16].reshape(4, 4, 25, 25).transpose(0, 2, 1, 3).reshape(100, 100)
        img = (tiles * 255).astype(np.uint8)
    elif name == "motorcycle_left":
        from skimage import data

        img = data.stereo_motorcycle()[0]
    else:
        from skimage import data

        img = getattr(data, name)()
    img = np.asarray(img)
    if img.dtype != np.uint8:
        img = (np.clip(img, 0, 1) * 255).astype(np.uint8) if img.max() <= 1.0 else img.astype(np.uint8)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    return img[:, :, :3]


def letterbox(img: np.ndarray, size: int) -> np.ndarray:
    """nudenet's preprocessing: pad bottom/right to a square, resize, [0, 1], 1x3xSxS float32."""
    from skimage.transform import resize

    h, w = img.shape[:2]
    side = max(h, w)
    square = np.zeros((side, side, 3), dtype=np.float32)
    square[:h, :w] = img.astype(np.float32) / 255.0
    out = resize(square, (size, size), order=1, anti_aliasing=side > size, preserve_range=True)
    return np.ascontiguousarray(out.transpose(2, 0, 1)[None]).astype(np.float32)


def _crops(img: np.ndarray, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    out = [img]
    h, w = img.shape[:2]
    for _ in range(n - 1):
        frac = rng.uniform(0.55, 0.9)
        ch, cw = max(16, int(h * frac)), max(16, int(w * frac))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        crop = img[y:y + ch, x:x + cw]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        out.append(crop)
    return out


def image_set(names, per_photo: int, size: int = 320, seed: int = 0) -> np.ndarray:
    """``[len(names)·per_photo, 1, 3, size, size]``: each photo, then random crops / flips of it."""
    rng = np.random.default_rng(seed)
    samples = [letterbox(c, size) for name in names for c in _crops(_photo(name), per_photo, rng)]
    return np.stack(samples)


def write_sets(out_dir: str | Path, input_name: str = "images", size: int = 320,
               calib_per_photo: int = 4, held_per_photo: int = 2) -> tuple[Path, Path]:
    """Write ``calib.npz`` ([40, 1, 3, S, S]) and ``heldout.npz`` ([22, 3, S, S]: samples stacked on the
    batch axis, the layout ``sepify verify --inputs`` runs in one go)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    calib = image_set(CALIBRATION, calib_per_photo, size, seed=0)
    held = image_set(HELD_OUT, held_per_photo, size, seed=1)
    cpath, hpath = out / "calib.npz", out / "heldout.npz"
    np.savez(cpath, **{input_name: calib})
    np.savez(hpath, **{input_name: held[:, 0]})
    return cpath, hpath


if __name__ == "__main__":
    import sys

    c, h = write_sets(sys.argv[1] if len(sys.argv) > 1 else "/tmp/sepify-photos")
    print(c, h)
