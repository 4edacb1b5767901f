"""PASCAL VOC segmentation data: the standard folder layout, DeepLab's training transforms, a
deterministic threaded batch loader, and a synthetic data set in the same layout.

Layout (VOC 2012, and what ``make_synthetic_voc`` writes)::

    root/JPEGImages/<id>.jpg                  RGB photographs
    root/SegmentationClass/<id>.png           palette PNG, pixel = class index, 255 = void
    root/ImageSets/Segmentation/<split>.txt   one <id> per line (train, val, trainval)
    root/SegmentationClassAug/<id>.png        optional: the augmented set's masks, with
    root/ImageSets/Segmentation*/train_aug.txt   its list (split="train_aug")
    root/classes.txt                          optional: class names, one per line (else VOC's)

Training transforms (DeepLab v2 §4): random scale in [0.5, 1.5], pad to the crop size (image
with the mean colour, label with 255), random crop, random horizontal flip, subtract the
mean.  Every random choice comes from a generator seeded by (seed, epoch, index), so a batch
is the same whichever thread prepared it and however many threads there are.
"""
import collections
import concurrent.futures
import os

import numpy as np
from PIL import Image, ImageOps

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor")
IGNORE = 255
MEAN_RGB = np.array([122.675, 116.669, 104.008], np.float32)  # DeepLab's (Caffe BGR, reordered)


def voc_colormap(n=256):
    """The VOC palette: class c's colour from the bits of c spread over R, G, B."""
    cmap = np.zeros((n, 3), np.uint8)
    for c in range(n):
        r = g = b = 0
        v = c
        for j in range(8):
            r |= ((v >> 0) & 1) << (7 - j)
            g |= ((v >> 1) & 1) << (7 - j)
            b |= ((v >> 2) & 1) << (7 - j)
            v >>= 3
        cmap[c] = (r, g, b)
    return cmap


def read_image(path):
    """An RGB image as (H, W, 3) uint8, turned upright by its EXIF orientation (as a photo
    viewer shows it); 16-bit images are scaled to 8 bits, not clipped.  A clear error for a
    missing or corrupt file."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                return _gray_to_8_bits(np.array(im), im.mode, path)
            return np.array(im.convert("RGB"))
    except FileNotFoundError:
        raise FileNotFoundError(f"image {path!r} does not exist") from None
    except ValueError:
        raise
    except Exception as e:
        raise ValueError(f"image {path!r} cannot be read ({type(e).__name__}: {e})") from None


def _gray_to_8_bits(a, mode, path):
    """A 16-bit (or 32-bit integer / float) grey image as 8-bit RGB.  PIL's own conversion
    clips every value above 255, which turns a 16-bit photograph all white."""
    if mode == "F":
        raise ValueError(f"image {path!r} is a floating-point image; save it as 8- or 16-bit")
    if a.min() < 0 or a.max() > 65535:
        raise ValueError(f"image {path!r} holds values outside 0..65535; expected an 8- or "
                         "16-bit image")
    g = np.rint(a.astype(np.float64) / 257).astype(np.uint8)  # 65535 -> 255
    return np.repeat(g[..., None], 3, axis=2)


def read_mask(path, num_classes):
    """A label mask as (H, W) uint8 class indices; values must be < num_classes or 255."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L"):
                raise ValueError(f"mode {im.mode!r}, expected a palette ('P') or 'L' PNG")
            mask = np.array(im)
    except FileNotFoundError:
        raise FileNotFoundError(f"mask {path!r} does not exist") from None
    except Exception as e:
        raise ValueError(f"mask {path!r} cannot be read ({e})") from None
    bad = (mask >= num_classes) & (mask != IGNORE)
    if bad.any():
        raise ValueError(f"mask {path!r} holds values {np.unique(mask[bad])[:10].tolist()}, "
                         f"outside 0..{num_classes - 1} and {IGNORE}")
    return mask


def write_mask(path, mask, palette=None):
    """Save class indices as a palette PNG (the format the VOC server takes), atomically."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"{os.fspath(path)!r} is a folder; give a file name (.png)")
    if not os.fspath(path).lower().endswith(".png"):
        raise ValueError(f"{os.fspath(path)!r}: a mask is written as a .png (palette PNG: "
                         "lossless class indices); a .jpg or .bmp would change them")
    im = Image.fromarray(np.asarray(mask, np.uint8), mode="P")
    im.putpalette((voc_colormap() if palette is None else palette).ravel().tolist())
    save_image(im, path)


def save_image(im, path, **kwargs):
    """Save a PIL image as .png or .jpg (by ``path``'s suffix; ``kwargs`` to PIL), atomically."""
    fmt = _format(path)
    from .models import atomic_write  # (models imports this module)

    try:
        with atomic_write(path) as f:
            im.save(f, format=fmt, **kwargs)
    except PermissionError:
        raise PermissionError(f"cannot write to {os.path.dirname(os.path.abspath(path))!r}") \
            from None


def _format(path):
    suffix = os.path.splitext(path)[1].lower()
    formats = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}
    if suffix not in formats:
        raise ValueError(f"{path!r}: masks are written as .png (palette PNG, lossless), "
                         f"pictures as .png or .jpg; not {suffix or 'no suffix'}")
    return formats[suffix]


class VOCSegmentation:
    """``ds[i]`` -> (image (H, W, 3) uint8, label (H, W) uint8) for the ids of ``split``."""

    def __init__(self, root, split="train", subset=None, num_classes=None, require_files=True):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"data set folder {root!r} does not exist")
        self.root, self.split = root, split
        names_file = os.path.join(root, "classes.txt")
        if os.path.isfile(names_file):
            with open(names_file) as f:
                self.class_names = [line.strip() for line in f if line.strip()]
            if not self.class_names:
                raise ValueError(f"{names_file} is empty: it must name the classes, one per "
                                 f"line (or delete it to use VOC's 21)")
        else:
            self.class_names = list(VOC_CLASSES)
        self.num_classes = num_classes or len(self.class_names)
        masks = "SegmentationClassAug" if split == "train_aug" else "SegmentationClass"
        self.mask_dir = os.path.join(root, masks)
        lists = [os.path.join(root, "ImageSets", d, f"{split}.txt")
                 for d in ("Segmentation", "SegmentationAug")]
        list_file = next((p for p in lists if os.path.isfile(p)), None)
        if list_file is None:
            raise FileNotFoundError(f"no list for split {split!r}: looked for {lists}")
        with open(list_file) as f:
            ids = [line.split()[0] for line in f if line.strip()]
        if subset is not None:
            if subset < 1:
                raise ValueError(f"subset must be ≥ 1, got {subset}")
            ids = ids[:subset]
        self.list_file = list_file
        missing = [i for i in ids
                   if not os.path.isfile(self.image_path(i)) or
                   not os.path.isfile(self.mask_path(i))]
        if missing and require_files:
            raise FileNotFoundError(
                f"{len(missing)} listed ids of {list_file!r} lack an image or a mask, e.g. "
                f"{missing[:3]} (expected {self.image_path(missing[0])} and "
                f"{self.mask_path(missing[0])})")
        if not ids:
            raise ValueError(f"split {split!r} lists no images ({list_file})")
        self.ids = ids

    def image_path(self, i):
        return os.path.join(self.root, "JPEGImages", f"{i}.jpg")

    def mask_path(self, i):
        return os.path.join(self.mask_dir, f"{i}.png")

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        i = self.ids[index]
        image = read_image(self.image_path(i))
        label = read_mask(self.mask_path(i), self.num_classes)
        if image.shape[:2] != label.shape:
            raise ValueError(f"{i}: image {image.shape[:2]} and mask {label.shape} sizes differ")
        return image, label


# ---- checking a data set before training on it ---------------------------------------------------
def _check_sample(ds, i):
    """(problems, class pixel counts (256,)) of one listed id: every file read in full."""
    problems, counts = [], np.zeros(256, np.int64)
    image = mask = None
    for path, what in ((ds.image_path(i), "image"), (ds.mask_path(i), "mask")):
        if not os.path.isfile(path):
            problems.append(f"{what} {path} is missing")
    if problems:
        return problems, counts
    try:
        image = read_image(ds.image_path(i))
    except ValueError as e:
        problems.append(str(e))
    try:
        with Image.open(ds.mask_path(i)) as im:
            if im.mode not in ("P", "L"):
                problems.append(f"mask {ds.mask_path(i)} has mode {im.mode!r}; expected a "
                                "palette ('P') or grayscale ('L') PNG of class indices")
            else:
                mask = np.array(im)
    except Exception as e:
        problems.append(f"mask {ds.mask_path(i)} cannot be read ({type(e).__name__}: {e})")
    if mask is not None:
        counts = np.bincount(mask.ravel(), minlength=256)
        bad = np.flatnonzero(counts[ds.num_classes:IGNORE]) + ds.num_classes
        if bad.size:
            problems.append(f"mask {ds.mask_path(i)} holds values {bad[:10].tolist()}, outside "
                            f"0..{ds.num_classes - 1} and {IGNORE} (void)")
        elif counts[:ds.num_classes].sum() == 0:
            problems.append(f"mask {ds.mask_path(i)} has no labelled pixel (all void): it "
                            "would train nothing")
    if image is not None and mask is not None and image.shape[:2] != mask.shape:
        problems.append(f"{i}: image {image.shape[1]}×{image.shape[0]} and mask "
                        f"{mask.shape[1]}×{mask.shape[0]} differ in size (after the "
                        "image's EXIF orientation)")
    return problems, counts


def check_dataset(root, split="train", subset=None, workers=2):
    """Read every listed image and mask of ``split`` once, in ``workers`` threads, and
    report all problems at once: a dict with ``problems`` (a list of messages naming the
    files), ``pixels`` (class name -> labelled pixels, and "void"), ``images``, ``split``,
    ``list_file``."""
    ds = VOCSegmentation(root, split, subset, require_files=False)
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        results = list(pool.map(lambda i: _check_sample(ds, i), ds.ids))
    problems = [p for found, _ in results for p in found]
    total = sum((c for _, c in results), np.zeros(256, np.int64))
    pixels = {name: int(total[c]) for c, name in enumerate(ds.class_names)}
    pixels["void"] = int(total[IGNORE])
    duplicates = sorted(i for i, n in collections.Counter(ds.ids).items() if n > 1)
    problems += [f"{ds.list_file} lists {i} more than once" for i in duplicates]
    absent = [name for c, name in enumerate(ds.class_names) if total[c] == 0]
    return {"split": split, "list_file": ds.list_file, "images": len(ds.ids),
            "pixels": pixels, "absent_classes": absent, "problems": problems}


def require_valid(root, split, subset=None, workers=2):
    """``check_dataset``, raising one ValueError that lists every problem (the first 20
    and how many more) before any training or evaluation time is spent."""
    report = check_dataset(root, split, subset, workers)
    problems = report["problems"]
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ValueError(f"the data of split {split!r} has {len(problems)} problem"
                         f"{'s' if len(problems) > 1 else ''} (tinydeeplab check-data --data "
                         f"{root} --split {split} lists them):\n  {shown}{more}")
    return report


# ---- transforms ---------------------------------------------------------------------------------
def to_input(image):
    """uint8 (H, W, 3) -> float32 (3, H, W), mean subtracted (what the network sees)."""
    return (image.astype(np.float32) - MEAN_RGB).transpose(2, 0, 1).copy()


def train_transform(image, label, rng, crop=321, scale=(0.5, 1.5), flip=True):
    """DeepLab's augmentation; returns (float32 (3, crop, crop), int64 (crop, crop))."""
    s = rng.uniform(*scale) if scale else 1.0
    H, W = label.shape
    h, w = max(1, int(round(H * s))), max(1, int(round(W * s)))
    if (h, w) != (H, W):
        image = np.array(Image.fromarray(image).resize((w, h), Image.BILINEAR))
        label = np.array(Image.fromarray(label).resize((w, h), Image.NEAREST))
    ph, pw = max(crop - h, 0), max(crop - w, 0)
    if ph or pw:
        padded = np.empty((h + ph, w + pw, 3), np.uint8)
        padded[:] = np.round(MEAN_RGB).astype(np.uint8)  # zero after mean subtraction
        padded[:h, :w] = image
        image = padded
        label = np.pad(label, ((0, ph), (0, pw)), constant_values=IGNORE)
    y0 = rng.integers(0, image.shape[0] - crop + 1)
    x0 = rng.integers(0, image.shape[1] - crop + 1)
    image, label = image[y0:y0 + crop, x0:x0 + crop], label[y0:y0 + crop, x0:x0 + crop]
    if flip and rng.random() < 0.5:
        image, label = image[:, ::-1], label[:, ::-1]
    return to_input(image), label.astype(np.int64)


class Loader:
    """Batches of transformed samples, prepared by a thread pool, in a reproducible order.

    Sample ``index`` of epoch ``e`` is transformed with ``default_rng((seed, e, index))``, so
    the batches do not depend on the number of threads or on which thread ran first.
    """

    def __init__(self, dataset, batch_size, transform=train_transform, seed=0, shuffle=True,
                 workers=2, drop_last=True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        self.dataset, self.batch_size, self.transform = dataset, batch_size, transform
        self.seed, self.shuffle, self.workers, self.drop_last = seed, shuffle, workers, drop_last

    def _sample(self, epoch, index):
        image, label = self.dataset[index]
        return self.transform(image, label, np.random.default_rng((self.seed, epoch, index)))

    def batches_per_epoch(self):
        n = len(self.dataset)
        count = n // self.batch_size if self.drop_last else -(-n // self.batch_size)
        if count == 0:
            raise ValueError(f"the data set has {n} samples, fewer than one batch of "
                             f"{self.batch_size}")
        return count

    def epoch(self, e, start_batch=0):
        """Yield (images (B, 3, H, W) float32, labels (B, H, W) int64) for epoch ``e``,
        from batch ``start_batch`` on."""
        order = np.arange(len(self.dataset))
        if self.shuffle:
            order = np.random.default_rng((self.seed, e)).permutation(order)
        stop = min(len(order), self.batches_per_epoch() * self.batch_size)
        with concurrent.futures.ThreadPoolExecutor(max(1, self.workers)) as pool:
            for start in range(start_batch * self.batch_size, stop, self.batch_size):
                idx = order[start:start + self.batch_size]
                samples = list(pool.map(lambda i: self._sample(e, int(i)), idx))
                yield (np.stack([s[0] for s in samples]), np.stack([s[1] for s in samples]))


# ---- a synthetic data set in the VOC layout -------------------------------------------------------
SYNTHETIC_CLASSES = ("background", "striped disc", "dotted square", "checkered triangle",
                     "wavy ring")


def _texture(kind, yy, xx, rng):
    phase = rng.uniform(0, 2 * np.pi)
    period = rng.uniform(3.0, 6.0)
    if kind == 1:  # stripes at a random angle
        a = rng.uniform(0, np.pi)
        return np.sin((np.cos(a) * xx + np.sin(a) * yy) * 2 * np.pi / period + phase) > 0
    if kind == 2:  # dots
        return (np.sin(xx * 2 * np.pi / period + phase) * np.sin(yy * 2 * np.pi / period)) > 0.5
    if kind == 3:  # checkerboard
        return ((xx // (period / 1.5)).astype(int) + (yy // (period / 1.5)).astype(int)) % 2 == 0
    return np.sin(np.hypot(xx, yy) * 2 * np.pi / period + phase) > 0  # concentric waves


def _shape(kind, yy, xx, cy, cx, r, rng):
    dy, dx = yy - cy, xx - cx
    if kind == 1:
        return dy**2 + dx**2 <= r * r
    if kind == 2:
        return (np.abs(dy) <= r) & (np.abs(dx) <= r)
    if kind == 3:  # upward triangle
        return (dy <= r * 0.6) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)
    d = np.hypot(dy, dx)
    return (d <= r) & (d >= r * 0.55)


def synthetic_sample(size=128, rng=None):
    """One image and label: 2-5 textured objects at several scales, overlapping, on a textured
    background, colours drawn independently of the class (shape and texture carry the class),
    and a 2-pixel void border around every object, as in VOC."""
    rng = rng if rng is not None else np.random.default_rng()
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    base = rng.uniform(60, 200, 3)
    bg = _texture(int(rng.integers(1, 5)), yy * 0.5, xx * 0.5, rng)  # coarser background
    image = base + (bg[..., None] - 0.5) * rng.uniform(10, 40) + rng.normal(0, 12, (size, size, 3))
    label = np.zeros((size, size), np.uint8)
    void = np.zeros((size, size), bool)
    for _ in range(int(rng.integers(2, 6))):
        kind = int(rng.integers(1, 5))
        r = rng.uniform(0.08, 0.3) * size  # several scales
        cy, cx = rng.uniform(r * 0.5, size - r * 0.5, 2)
        inside = _shape(kind, yy, xx, cy, cx, r, rng)
        colour_a, colour_b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        tex = _texture(kind, yy, xx, rng)[..., None]
        image = np.where(inside[..., None], np.where(tex, colour_a, colour_b), image)
        label[inside] = kind
        ring = _dilate(inside, 2) & ~_erode(inside, 2)
        void = (void & ~inside) | ring
    label[void] = IGNORE
    image = np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)
    return image, label


def _dilate(mask, k):
    out = mask.copy()
    for dy in range(-k, k + 1):
        for dx in range(-k, k + 1):
            out |= np.roll(np.roll(mask, dy, 0), dx, 1)
    return out


def _erode(mask, k):
    return ~_dilate(~mask, k)


def make_synthetic_voc(root, n_train=200, n_val=50, size=128, seed=0):
    """Write a synthetic segmentation set in the VOC layout under ``root``; returns root.

    Classes: SYNTHETIC_CLASSES (listed in root/classes.txt).  Reproducible from ``seed``.
    """
    for d in ("JPEGImages", "SegmentationClass", os.path.join("ImageSets", "Segmentation")):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    splits = {"train": [f"syn_train_{i:05d}" for i in range(n_train)],
              "val": [f"syn_val_{i:05d}" for i in range(n_val)]}
    for s, ids in splits.items():
        for k, i in enumerate(ids):
            image, label = synthetic_sample(size, np.random.default_rng((seed, s == "val", k)))
            save_image(Image.fromarray(image), os.path.join(root, "JPEGImages", f"{i}.jpg"),
                             quality=95)
            write_mask(os.path.join(root, "SegmentationClass", f"{i}.png"), label)
    for s, ids in {**splits, "trainval": splits["train"] + splits["val"]}.items():
        with open(os.path.join(root, "ImageSets", "Segmentation", f"{s}.txt"), "w") as f:
            f.write("\n".join(ids) + "\n")
    with open(os.path.join(root, "classes.txt"), "w") as f:
        f.write("\n".join(SYNTHETIC_CLASSES) + "\n")
    return root
