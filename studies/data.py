"""Data for training: a built-in synthetic task and a loader for image folders.

``SyntheticRelations`` draws two shapes far apart on a noisy background, a
filled square (A) and a hollow square (B), in one random colour; the label is
where A lies relative to B: 2 * (A left of B) + (A above B), four classes. The
shapes are at least a quarter of the image apart on both axes, so the label
depends on a long-range spatial relation that a model must see across the map.
Images are generated deterministically from (seed, split, index) at any
resolution and size; nothing is stored or downloaded.

``Cifar`` reads CIFAR-10 or CIFAR-100 from the python version's pickled batches at a path the user gives
(``cifar10:PATH``, ``cifar100:PATH``; PATH the extracted ``cifar-10-batches-py`` or
``cifar-100-python`` folder or the folder that holds it); nothing is downloaded. The pickles are read
with a restricted unpickler that builds only dicts, lists, strings, bytes and numbers.

``imagenet:PATH`` is an image folder that must hold ``train/`` and ``val/`` of class folders (ImageNet's
layout once its validation images are sorted into class folders).

``ImageFolder`` reads ``ROOT/<class>/<image>`` (or ``ROOT/train/<class>/...`` and
``ROOT/val/<class>/...``) with PIL; every file is checked up front, so an empty
folder or a non-image fails before a run starts.
"""

from __future__ import annotations

import pickle
import random
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from attnbench.errors import AttnbenchError

SPLITS = ("train", "val")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


class DataError(AttnbenchError, ValueError):
    """The data cannot be used as given."""


def _normalise(img: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> roughly zero mean, unit range."""
    return (img - 0.5) / 0.5


class SyntheticRelations(Dataset):
    classes = ("A right of and below B", "A right of and above B", "A left of and below B", "A left of and above B")

    def __init__(self, size: int, resolution: int, split: str = "train", seed: int = 0):
        if split not in SPLITS:
            raise DataError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        if resolution < 16:
            raise DataError(f"the synthetic task needs images of at least 16 px, got {resolution}")
        if size < 1:
            raise DataError(f"the synthetic dataset needs at least one image, got size={size}")
        self.size = size
        self.resolution = resolution
        self.split = split
        self.seed = seed
        self.shape = max(3, resolution // 8)  # side of each square

    def __len__(self) -> int:
        return self.size

    def _rng(self, index: int) -> np.random.Generator:
        # One independent stream per (seed, split, index) (numpy's SeedSequence uses every bit of all three):
        # the held-out images are never training images.
        return np.random.default_rng([self.seed, SPLITS.index(self.split), index])

    def _layout(self, rng: np.random.Generator) -> tuple[int, int, int, int]:
        r, s = self.resolution, self.shape
        gap = r // 4
        while True:  # rejection sampling: the two squares far apart on both axes
            ya, xa, yb, xb = (int(v) for v in rng.integers(0, r - s + 1, size=4))
            if abs(xa - xb) >= gap and abs(ya - yb) >= gap:
                return ya, xa, yb, xb

    def layout(self, index: int) -> tuple[int, int, int, int]:
        """Top-left corners (y_A, x_A, y_B, x_B) of the two squares of image ``index``."""
        return self._layout(self._rng(index))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.size:
            raise IndexError(index)
        rng = self._rng(index)
        r, s = self.resolution, self.shape
        ya, xa, yb, xb = self._layout(rng)
        background = rng.random((3, 1, 1), dtype=np.float32) * 0.4
        img = background + 0.08 * rng.standard_normal((3, r, r), dtype=np.float32)  # (3, R, R)
        colour = 0.6 + 0.4 * rng.random((3, 1, 1), dtype=np.float32)
        img[:, ya : ya + s, xa : xa + s] = colour  # A: filled
        t = max(1, s // 4)
        img[:, yb : yb + s, xb : xb + s] = colour  # B: hollow
        img[:, yb + t : yb + s - t, xb + t : xb + s - t] = background
        label = 2 * int(xa < xb) + int(ya < yb)
        return _normalise(torch.from_numpy(img).clamp(0, 1)), label


class SyntheticDetail(SyntheticRelations):
    """The same images; the label is the quadrant of the hollow square B: 2 * (B in the right half) + (B in
    the lower half). Telling B from the filled square A of the same colour takes the fine detail of its
    one-pixel-wide (at 32 px) outline; where it lies takes the position of that detail in the whole image."""

    classes = ("B upper left", "B lower left", "B upper right", "B lower right")

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img, _ = super().__getitem__(index)
        _, _, yb, xb = self.layout(index)
        half = (self.resolution - self.shape) / 2  # the square's corner past this puts its centre past the middle
        return img, 2 * int(xb > half) + int(yb > half)


class SyntheticSame(SyntheticRelations):
    """Two large squares (side 5/16 of the image, ten pixels at 32 px), one in each half of the image (left
    and right), each in one of six colours on a dark noisy background; the label is whether
    they have the same colour, two classes, half of the images each (else the second colour is one of the
    other five). Neither square's colour nor place says anything about the label alone, and it cannot be
    read off the mean of tokens that never saw each other: with a score s(c) per token summed over tokens
    that do not mix, a pair of different colours scores between the two same-colour pairs, so no threshold
    tells them all: the best found is 65% (three of the six colours singled out; every integer score 0 to 5
    per colour and every threshold searched). One block of any global mixing (even the uniform weights of
    an untrained attention) hands every token the other square's colour: full attention learns the task
    within a few hundred steps on every seed tried, and attention that sees only its own token cannot.
    """

    classes = ("different colours", "the same colour")
    COLOURS = np.array(
        [[1, 0.1, 0.1], [0.1, 1, 0.1], [0.1, 0.1, 1], [1, 1, 0.1], [0.1, 1, 1], [1, 0.1, 1]], dtype=np.float32
    )

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.size:
            raise IndexError(index)
        rng = self._rng(index)
        r = self.resolution
        s = max(3, (5 * r) // 16)
        half = r // 2
        xa = int(rng.integers(0, half - s + 1))  # A in the left half, B in the right one
        xb = half + int(rng.integers(0, half - s + 1))
        ya, yb = (int(v) for v in rng.integers(0, r - s + 1, size=2))
        if rng.integers(0, 2):  # or the other way round
            ya, yb = yb, ya
        same = int(rng.integers(0, 2))
        k = len(self.COLOURS)
        ca = int(rng.integers(0, k))
        cb = ca if same else (ca + int(rng.integers(1, k))) % k
        img = 0.2 + 0.05 * rng.standard_normal((3, r, r), dtype=np.float32)  # (3, R, R)
        img[:, ya : ya + s, xa : xa + s] = self.COLOURS[ca][:, None, None]
        img[:, yb : yb + s, xb : xb + s] = self.COLOURS[cb][:, None, None]
        return _normalise(torch.from_numpy(img).clamp(0, 1)), same


class ImageFolder(Dataset):
    """Images in one folder per class, resized to ``resolution`` x ``resolution``."""

    def __init__(
        self,
        root: str | Path,
        resolution: int,
        split: str = "train",
        holdout: float = 0.1,
        seed: int = 0,
        verify: bool = True,
    ):
        if split not in SPLITS:
            raise DataError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"image folder {root} does not exist or is not a directory")
        self.resolution = resolution
        if (root / "train").is_dir() and (root / "val").is_dir():
            self.classes, items = _scan(root / "train", verify)
            val_classes, val_items = _scan(root / "val", verify)
            if val_classes != self.classes:
                raise DataError(
                    f"{root}/train and {root}/val hold different class folders "
                    f"({', '.join(self.classes)} against {', '.join(val_classes)}); give both the same classes"
                )
            self.items = items if split == "train" else val_items
        else:
            self.classes, items = _scan(root, verify)
            self.items = _split(items, split, holdout, seed)
        if not self.items:
            raise DataError(f"{root} leaves no images for the {split} split; add images or use ROOT/train and ROOT/val")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        path, label = self.items[index]
        with Image.open(path) as im:
            im = im.convert("RGB").resize((self.resolution, self.resolution), Image.Resampling.BILINEAR)
            data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
        img = data.view(self.resolution, self.resolution, 3).permute(2, 0, 1).float() / 255.0  # (3, R, R)
        return _normalise(img), label


def _scan(root: Path, verify: bool = True) -> tuple[list[str], list[tuple[Path, int]]]:
    """Class folders and their images; every file must open as an image (``verify=False``: a training rank
    other than 0, whose rank 0 checks the same files, takes them as listed)."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{root} holds no class folders; expected {root}/<class name>/<image files>")
    items: list[tuple[Path, int]] = []
    bad: list[str] = []
    empty: list[str] = []
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).rglob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            empty.append(name)
        for f in files:
            if verify and not is_image(f):
                bad.append(str(f.relative_to(root)))
                continue
            items.append((f, label))
    refuse_unreadable(root, bad)
    if empty:
        raise DataError(f"class folder(s) {', '.join(empty)} in {root} hold no images; add images or remove them")
    return classes, items


def is_image(path: Path) -> bool:
    """Whether PIL can read the file as an image; one over PIL's pixel limit is a DataError naming it."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # PIL only warns between its limit and twice it, and would then decode the whole image
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.verify()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError(
            f"{path} is over PIL's limit of {Image.MAX_IMAGE_PIXELS:,} pixels per image ({exc}); "
            "shrink it or move it out of the folder"
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return False
    return True


def refuse_unreadable(root: Path, bad: list[str]) -> None:
    """Raise DataError naming the files under ``root`` that are not images (none: return)."""
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise DataError(f"{root} holds files that are not images PIL can read: {shown}; remove or move them")


def _split(items: list[tuple[Path, int]], split: str, holdout: float, seed: int) -> list[tuple[Path, int]]:
    """A deterministic per-class hold-out: ``holdout`` of each class (at least one image if it has two)."""
    if not 0 < holdout < 1:
        raise DataError(f"holdout must be between 0 and 1, got {holdout}")
    out = []
    labels = sorted({label for _, label in items})
    for label in labels:
        mine = [it for it in items if it[1] == label]
        random.Random(seed * 1009 + label).shuffle(mine)
        n_val = max(1, round(len(mine) * holdout)) if len(mine) >= 2 else 0
        out += mine[:n_val] if split == "val" else mine[n_val:]
    return out


CIFAR_LAYOUT = {
    "cifar10": (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        "batches.meta",
        b"label_names",
        b"labels",
    ),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "meta", b"fine_label_names", b"fine_labels"),
}


class _Pickles(pickle.Unpickler):
    """The CIFAR batches hold plain containers and a numpy array; refuse anything that could run code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):  # noqa: ANN201
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise DataError(f"a CIFAR batch may not hold {module}.{name}")


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return _Pickles(f, encoding="bytes").load()


class Cifar(Dataset):
    """CIFAR-10 or CIFAR-100 (fine labels) from the python batches; 32 px images, resized (bilinear) to
    ``resolution`` when it differs; the ``val`` split is the test batch."""

    def __init__(self, kind: str, root: str | Path, resolution: int, split: str = "train"):
        if split not in SPLITS:
            raise DataError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        folder_name, train_files, test_files, meta, names_key, labels_key = CIFAR_LAYOUT[kind]
        root = Path(root).expanduser()
        folder = root / folder_name if (root / folder_name).is_dir() else root
        files = train_files if split == "train" else test_files
        needed = [*files, meta]
        if not all((folder / f).is_file() for f in needed):
            listing = "data_batch_1..5, test_batch, batches.meta" if kind == "cifar10" else "train, test, meta"
            raise DataError(
                f"{kind}:{root} is not the python version of {kind.upper()}: expected {root}/{folder_name}/ "
                f"holding {listing} (the extracted {kind[:5]}-{kind[5:]}-python.tar.gz); nothing is downloaded"
            )
        try:
            self.classes = [n.decode() for n in _unpickle(folder / meta)[names_key]]
            images, labels = [], []
            for f in files:
                batch = _unpickle(folder / f)
                images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                labels += [int(v) for v in batch[labels_key]]
        except (OSError, KeyError, ValueError, EOFError, pickle.UnpicklingError) as exc:
            raise DataError(f"{kind}:{root}: {folder} holds a batch that cannot be read ({exc})") from None
        self.images = torch.from_numpy(np.concatenate(images))  # (N, 3, 32, 32) uint8
        self.labels = torch.tensor(labels)
        if len(self.labels) != len(self.images):
            raise DataError(f"{kind}:{root}: {len(self.images)} images but {len(self.labels)} labels in {folder}")
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img = self.images[index].float() / 255.0
        if self.resolution != img.shape[-1]:
            img = torch.nn.functional.interpolate(
                img[None], size=(self.resolution, self.resolution), mode="bilinear", align_corners=False
            )[0]  # fmt: skip
        return _normalise(img), int(self.labels[index])


def build(
    data: str, resolution: int, split: str, *, size: int | None = None, seed: int = 0, verify: bool = True
) -> Dataset:
    """``"synthetic"``, ``"synthetic-detail"`` or ``"synthetic-same"`` (``size`` images), ``cifar10:PATH``,
    ``cifar100:PATH``, ``imagenet:PATH`` (PATH/train and PATH/val of class folders) or an image folder's path."""
    kind, sep, path = data.partition(":")
    if sep and kind in CIFAR_LAYOUT:
        return Cifar(kind, path, resolution, split)
    if sep and kind == "imagenet":
        root = Path(path).expanduser()
        if not ((root / "train").is_dir() and (root / "val").is_dir()):
            raise DataError(
                f"imagenet:{path} lacks train/ or val/: expected {root}/train/<class>/<images> and "
                f"{root}/val/<class>/<images> (the validation images sorted into class folders)"
            )
        return ImageFolder(root, resolution, split, seed=seed, verify=verify)
    if data == "synthetic-same":
        return SyntheticSame(size or (2048 if split == "train" else 512), resolution, split, seed)
    if data == "synthetic-detail":
        return SyntheticDetail(size or (2048 if split == "train" else 512), resolution, split, seed)
    if data == "synthetic":
        default = 2048 if split == "train" else 512
        return SyntheticRelations(size or default, resolution, split, seed)
    return ImageFolder(data, resolution, split, seed=seed, verify=verify)


def classes_of(dataset: Dataset) -> list[str]:
    return list(dataset.classes)  # type: ignore[attr-defined]
