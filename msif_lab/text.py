"""Real English text for the NLP lesson: corpora, tokeniser, vocabulary, tensors, losses and the two stages.

Taught in notebook ``07_nlp_contextual_embeddings.ipynb``.

Data (all real, all obtainable from package registries, see ``data/README.md``):

* **Pretraining corpus** (the z_i): plain sentences from the Wikipedia extract
  ``enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2`` (106 articles, CC BY-SA) and the
  news documents ``lee_background.cor`` (300 documents), both shipped in the ``gensim==4.4.0`` wheel under
  ``gensim/test/test_data/``. Wikitext markup is stripped to prose (:func:`wikitext_to_paragraphs`).
* **Finetuning task** (the x_j): ``movieReviewSnippets_GroundTruth.txt`` from
  ``additional_resources/hutto_ICWSM_2014.tar.gz`` in the ``vaderSentiment==3.3.2`` source distribution
  (Hutto & Gilbert, ICWSM 2014; MIT): 10,605 movie-review sentences, tab-separated ``id, mean sentiment in
  [-4, 4], sentence``. Label 1 (positive) if the mean is > 0, 0 (negative) if < 0; the 37 exact zeros are dropped.

Acquisition (:func:`prepare_text`) is what a user does by hand: ``pip download`` the two distributions into a
temporary folder, read them with ``zipfile``/``tarfile`` (the packages are never imported or installed), and
write only the three files above to ``<data dir>/text/`` together with ``SOURCES.json`` (sha256, byte size and
origin of each file). Pinned sha256 sums of the real files are checked; loaders re-check the recorded sums
and the record counts, and raise :class:`MissingTextDataError` naming the folder and the fetching command when
the files are absent. All writes are atomic (temporary file + ``os.replace``).

Choices (documented here and in notebook 07):

* **A pretraining example is one sentence**, with ``<bos>`` and ``<eos>`` added; its loss f(z; W, U) is the mean
  token negative log-likelihood (nats) of the forward and the backward language model over that sentence
  (:func:`lm_loss`). Sentences are kept when they have ``min_tokens``..``max_tokens`` tokens.
* **Tokeniser**: Unicode NFKC, typographic quotes/dashes folded to ASCII, ``''`` read as ``"``, lower case, then
  a word is a run of letters/digits with inner apostrophes (``don't``, ``century's``) and every other non-space
  character is a token of its own. ``detokenise(tokenise(s)) == normalise(s)``: tokens joined by single spaces.
* **Vocabulary** from the selected pretraining sentences only (words with count ≥ ``min_count``, at most
  ``max_size`` of them by decreasing count, ties alphabetical), ids 0..3 = ``<pad> <unk> <bos> <eos>``.
  Review words outside it map to ``<unk>``. The corpora are encyclopaedic and news prose, the task is movie
  reviews: with the defaults about 31% of review tokens are ``<unk>`` (``movie``, ``funny``, ``bad`` are rare in
  the pretraining text), which bounds what transfers through a fixed embedding (see :meth:`TextTask.stats`).
* **Cost**: the LM softmax dominates; one Hessian-vector product over 2,000 pretraining sentences with a
  3,000-word vocabulary and the default model (208k parameters) takes about 35 CPU-seconds, ∝ vocabulary size.
"""
from __future__ import annotations

import bz2
import hashlib
import html
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import unicodedata
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence
from xml.etree import ElementTree

import torch
import torch.nn.functional as F
from torch import Tensor

from .models import BiLMHead, MiniELMo, SentimentHead, TextModel
from .paths import atomic_path, data_dir
from .stages import Stage, TwoStage

# ----------------------------------------------------------------------------------------------- sources
WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
NEWS_FILE = "lee_background.cor"
REVIEWS_FILE = "movieReviewSnippets_GroundTruth.txt"

GENSIM_SPEC = "gensim==4.4.0"
VADER_SPEC = "vaderSentiment==3.3.2"
_GENSIM_MEMBER_DIR = "gensim/test/test_data/"
_VADER_INNER_ARCHIVE = "additional_resources/hutto_ICWSM_2014.tar.gz"
_VADER_INNER_MEMBER = "hutto_ICWSM_2014/" + REVIEWS_FILE

PINNED_SHA256 = {
    WIKI_FILE: "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d",
    NEWS_FILE: "5d78d6dafd953bbf65797bef09a9ffb9ec430583381be705f8fd460000f370fb",
    REVIEWS_FILE: "c8293b0d942e90e223ea2c0955d969040d1a1be514a978b9af0698940bd13350",
}
"""sha256 of the three files as shipped in gensim 4.4.0 and vaderSentiment 3.3.2."""

PINNED_COUNTS = {WIKI_FILE: 106, NEWS_FILE: 300, REVIEWS_FILE: 10_605}
"""Records in the pinned files: articles (main namespace, not redirects), news documents, review lines."""

PIP_COMMANDS = (
    f"pip download --no-deps --only-binary=:all: --platform manylinux_2_28_x86_64 --python-version 3.11 "
    f"--implementation cp -d ARCHIVES {GENSIM_SPEC}",
    f"pip download --no-deps --no-binary=:all: -d ARCHIVES {VADER_SPEC}",
)
"""The manual acquisition commands (any wheel of gensim 4.4.0 carries the same test data)."""

_PREPARE_HINT = (
    'python -c "import msif_lab.text as t; t.prepare_text()"   (needs PyPI; the data folder is $MSIF_DATA_DIR, '
    'else <repo>/data), or offline: run\n  '
    + "\n  ".join(PIP_COMMANDS)
    + '\non a connected machine, copy the folder ARCHIVES here, and run\n  '
    'python -c "import msif_lab.text as t; t.prepare_text(archives=\'ARCHIVES\')"'
)

MANIFEST = "SOURCES.json"
CACHE_VERSION = 1
"""Bump when the cleaning, sentence splitting or tokenising rules change: it is part of every cache key."""


class MissingTextDataError(FileNotFoundError):
    """The text files are not in the data folder (the message says where it looked and how to fetch them)."""


class TextDataError(ValueError):
    """A text file is there but is not what it should be (checksum, count or format)."""


def text_dir(root: str | os.PathLike | None = None) -> Path:
    """``<root>/text``; ``root`` defaults to the project's data folder (:func:`msif_lab.paths.data_dir`)."""
    return Path(data_dir() if root is None else root) / "text"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (:func:`msif_lab.paths.atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


# ------------------------------------------------------------------------------------------- acquisition
def _read_gensim_member(archive: Path, name: str) -> bytes:
    """``gensim/test/test_data/<name>`` from a gensim wheel (zip) or source distribution (tar.gz)."""
    suffix = _GENSIM_MEMBER_DIR + name
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            hits = [n for n in zf.namelist() if n == suffix or n.endswith("/" + suffix)]
            if hits:
                return zf.read(hits[0])
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            hits = [m for m in tf.getmembers() if m.isfile() and (m.name == suffix or m.name.endswith("/" + suffix))]
            if hits:
                return tf.extractfile(hits[0]).read()
    else:
        raise TextDataError(f"{archive} is neither a zip (wheel) nor a tar archive. Fix: pass the file that "
                            f"`pip download {GENSIM_SPEC}` saved.")
    raise TextDataError(f"{archive} holds no member ending in {suffix!r}. Fix: pass the {GENSIM_SPEC} archive.")


def _read_reviews_member(archive: Path) -> bytes:
    """The review ground truth from the vaderSentiment sdist (tar.gz holding another tar.gz)."""
    if not tarfile.is_tarfile(archive):
        raise TextDataError(f"{archive} is not a tar archive. Fix: pass the source distribution that "
                            f"`pip download --no-binary=:all: {VADER_SPEC}` saved (not a wheel).")
    with tarfile.open(archive) as tf:
        hits = [m for m in tf.getmembers() if m.isfile() and m.name.endswith("/" + _VADER_INNER_ARCHIVE)]
        if not hits:
            raise TextDataError(f"{archive} holds no {_VADER_INNER_ARCHIVE!r}. Fix: pass the {VADER_SPEC} sdist.")
        inner = tf.extractfile(hits[0]).read()
    with tarfile.open(fileobj=io.BytesIO(inner)) as tf:
        hits = [m for m in tf.getmembers() if m.isfile() and m.name.endswith(_VADER_INNER_MEMBER)]
        if not hits:
            raise TextDataError(f"{_VADER_INNER_ARCHIVE} in {archive} holds no {_VADER_INNER_MEMBER!r}.")
        return tf.extractfile(hits[0]).read()


def extract_text_sources(gensim_archive: str | os.PathLike, vader_archive: str | os.PathLike,
                         root: str | os.PathLike | None = None, *, pinned: bool = True) -> dict:
    """Copy the three text files out of the two downloaded archives into ``<root>/text/`` and write ``SOURCES.json``.

    Args:
        gensim_archive: the ``gensim==4.4.0`` wheel (or sdist).
        vader_archive: the ``vaderSentiment==3.3.2`` source distribution (``.tar.gz``).
        root: data folder (default :func:`msif_lab.paths.data_dir`).
        pinned: check the files against :data:`PINNED_SHA256` and later the loaders against
            :data:`PINNED_COUNTS`. ``False`` is for other (e.g. test-fixture) archives in the same format.

    Returns the manifest: ``{"files": {name: {"sha256", "bytes", "source", "member", "expected_count"}}}``.
    """
    gensim_archive, vader_archive = Path(gensim_archive), Path(vader_archive)
    for a in (gensim_archive, vader_archive):
        if not a.is_file():
            raise MissingTextDataError(f"Archive {a} does not exist. Fix: download it with\n  "
                                       + "\n  ".join(PIP_COMMANDS))
    contents = {
        WIKI_FILE: (_read_gensim_member(gensim_archive, WIKI_FILE), GENSIM_SPEC, _GENSIM_MEMBER_DIR + WIKI_FILE),
        NEWS_FILE: (_read_gensim_member(gensim_archive, NEWS_FILE), GENSIM_SPEC, _GENSIM_MEMBER_DIR + NEWS_FILE),
        REVIEWS_FILE: (_read_reviews_member(vader_archive), VADER_SPEC,
                       f"{_VADER_INNER_ARCHIVE} -> {_VADER_INNER_MEMBER}"),
    }
    files = {}
    for name, (data, source, member) in contents.items():
        digest = sha256_bytes(data)
        if pinned and digest != PINNED_SHA256[name]:
            raise TextDataError(
                f"{name} read from {source} has sha256 {digest}, expected {PINNED_SHA256[name]}. Fix: download exactly "
                f"{source} again (a different version ships different data), or pass pinned=False for other data."
            )
        files[name] = {"sha256": digest, "bytes": len(data), "source": source, "member": member,
                       "expected_count": PINNED_COUNTS[name] if pinned else None}
    folder = text_dir(root)
    for name, (data, _, _) in contents.items():
        _atomic_write(folder / name, data)
    manifest = {"files": files}
    _atomic_write(folder / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
    return manifest


def download_text_archives(dest: str | os.PathLike,
                           pip: Sequence[str] = (sys.executable, "-m", "pip")) -> tuple[Path, Path]:
    """``pip download`` the gensim wheel and the vaderSentiment sdist into ``dest``; returns their paths."""
    dest = Path(dest)
    for cmd in PIP_COMMANDS:
        args = [*pip, *cmd.split()[1:]]
        args[args.index("ARCHIVES")] = str(dest)
        done = subprocess.run([*args, "--disable-pip-version-check"], capture_output=True, text=True)
        if done.returncode != 0:
            raise MissingTextDataError(
                f"`{' '.join(args)}` failed (exit {done.returncode}); is PyPI reachable?\n{done.stderr[-1500:]}\n"
                f"Fix: {_PREPARE_HINT}"
            )
    gensim = sorted(dest.glob("gensim-4.4.0*"))
    vader = sorted(dest.glob("vaderSentiment-3.3.2*.tar.gz"))
    if not gensim or not vader:
        raise MissingTextDataError(f"pip download left {sorted(p.name for p in dest.iterdir())} in {dest}; "
                                   "expected gensim-4.4.0*.whl and vaderSentiment-3.3.2.tar.gz.")
    return gensim[0], vader[0]


def read_manifest(root: str | os.PathLike | None = None) -> dict:
    """The ``SOURCES.json`` of ``<root>/text``; :class:`MissingTextDataError` with the fix if there is none."""
    path = text_dir(root) / MANIFEST
    if not path.is_file():
        raise MissingTextDataError(f"No prepared text data: {path} does not exist. Fix: {_PREPARE_HINT}")
    return json.loads(path.read_text())


def _read_checked(name: str, root) -> tuple[bytes, dict]:
    """Bytes of a prepared file after checking its sha256 against the manifest."""
    entry = read_manifest(root)["files"].get(name)
    path = text_dir(root) / name
    if entry is None or not path.is_file():
        raise MissingTextDataError(f"{path} is missing (or not in {MANIFEST}). Fix: {_PREPARE_HINT}")
    data = path.read_bytes()
    if sha256_bytes(data) != entry["sha256"]:
        raise TextDataError(f"{path} has changed since it was prepared (sha256 differs from {MANIFEST}). "
                            f"Fix: delete {path.parent} and prepare again: {_PREPARE_HINT}")
    return data, entry


def _check_count(name: str, entry: dict, found: int) -> None:
    if entry["expected_count"] is not None and found != entry["expected_count"]:
        raise TextDataError(f"{name}: read {found} records, expected {entry['expected_count']}. Fix: prepare the "
                            f"data again: {_PREPARE_HINT}")


def _text_problems(root: str | os.PathLike | None = None) -> dict[str, str]:
    """What is wrong with the prepared text files, ``{file name: problem}``; empty when the three files have
    their pinned sha256 and ``SOURCES.json`` is readable and records those sums."""
    folder, problems = text_dir(root), {}
    for name, digest in PINNED_SHA256.items():
        path = folder / name
        if not path.is_file():
            problems[name] = "missing"
        elif (actual := sha256_bytes(path.read_bytes())) != digest:
            problems[name] = f"damaged (sha256 {actual[:12]}…, expected {digest[:12]}…)"
    try:
        recorded = {n: e["sha256"] for n, e in json.loads((folder / MANIFEST).read_text())["files"].items()}
        if recorded != PINNED_SHA256:
            problems[MANIFEST] = "records other sha256 sums than the pinned ones"
    except FileNotFoundError:
        problems[MANIFEST] = "missing"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        problems[MANIFEST] = f"unreadable ({type(exc).__name__}: {exc})"
    return problems


def prepare_text(root: str | os.PathLike | None = None, *, archives: str | os.PathLike | None = None) -> dict:
    """Fetch (if needed), extract, check and pre-process the text data; the data-preparation command calls this.

    Already prepared and intact data (:func:`_text_problems`) is left alone. Otherwise it prints which files are
    missing or damaged, takes the two archives from the folder ``archives`` (offline path) or ``pip download``-s
    them into a temporary folder, rewrites the three files and ``SOURCES.json``, and prints what it rewrote. Then
    the sentence pool is built and cached. Returns :func:`text_stats` of the prepared data.
    """
    problems = _text_problems(root)
    if problems:
        where = f"from {archives}" if archives is not None else "with pip download"
        print(f"text: in {text_dir(root)}: " + "; ".join(f"{n} {p}" for n, p in problems.items())
              + f". Fetching {GENSIM_SPEC} and {VADER_SPEC} {where} to extract them.")
        if archives is not None:
            folder = Path(archives)
            gensim = sorted(folder.glob("gensim-4.4.0*"))
            vader = sorted(folder.glob("vaderSentiment-3.3.2*.tar.gz"))
            if not gensim or not vader:
                raise MissingTextDataError(f"{folder} lacks gensim-4.4.0*.whl or vaderSentiment-3.3.2.tar.gz. "
                                           f"Fix: {_PREPARE_HINT}")
            extract_text_sources(gensim[0], vader[0], root)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                extract_text_sources(*download_text_archives(tmp), root)
        print(f"text: wrote the three files and {MANIFEST} to {text_dir(root)}, extracted from the archives "
              "(sha256 checked)")
    return text_stats(root)


# ------------------------------------------------------------------------------------------ raw readers
@dataclass(frozen=True)
class Review:
    """One movie-review sentence: ``score`` is the mean rating in [-4, 4]; ``label`` 1 = positive, 0 = negative."""

    id: int
    score: float
    text: str

    @property
    def label(self) -> int:
        return int(self.score > 0)


def load_reviews(root: str | os.PathLike | None = None) -> list[Review]:
    """All review lines (zeros included) in file order; checks format, ranges, unique ids and the count."""
    data, entry = _read_checked(REVIEWS_FILE, root)
    reviews, seen = [], set()
    for lineno, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        try:
            rid, score, text = int(parts[0]), float(parts[1]), parts[2].strip()
            if len(parts) != 3 or not -4 <= score <= 4 or not text or rid in seen:
                raise ValueError
        except (ValueError, IndexError):
            raise TextDataError(f"{REVIEWS_FILE} line {lineno} is not `id<TAB>score in [-4,4]<TAB>sentence` with a "
                                f"new id: {line[:80]!r}. Fix: prepare the data again: {_PREPARE_HINT}") from None
        seen.add(rid)
        reviews.append(Review(rid, score, text))
    _check_count(REVIEWS_FILE, entry, len(reviews))
    return reviews


def load_wiki_articles(root: str | os.PathLike | None = None) -> list[tuple[str, str]]:
    """(title, wikitext) of every main-namespace, non-redirect page of the Wikipedia extract, in file order."""
    data, entry = _read_checked(WIKI_FILE, root)
    try:
        tree = ElementTree.fromstring(bz2.decompress(data))
    except (OSError, ElementTree.ParseError) as exc:
        raise TextDataError(f"{WIKI_FILE} is not bz2-compressed MediaWiki XML ({exc}). Fix: {_PREPARE_HINT}") from None

    def local(tag: str) -> str:
        return tag.rsplit("}", 1)[-1]

    articles = []
    for page in tree:
        if local(page.tag) != "page":
            continue
        fields = {local(c.tag): c for c in page}
        if fields["ns"].text != "0" or "redirect" in fields:
            continue
        revision = {local(c.tag): c for c in fields["revision"]}
        articles.append((fields["title"].text, revision["text"].text or ""))
    _check_count(WIKI_FILE, entry, len(articles))
    return articles


def load_news_documents(root: str | os.PathLike | None = None) -> list[str]:
    """The news documents of ``lee_background.cor`` (one per line, UTF-8), in file order."""
    data, entry = _read_checked(NEWS_FILE, root)
    docs = [line.strip() for line in data.decode("utf-8").splitlines() if line.strip()]
    _check_count(NEWS_FILE, entry, len(docs))
    return docs


# ------------------------------------------------------------------------------ wikitext and sentences
def _strip_nested(text: str, open_: str, close: str) -> str:
    """Remove every (possibly nested) ``open_ ... close`` span, e.g. templates ``{{...}}``."""
    out, depth, i = [], 0, 0
    while i < len(text):
        if text.startswith(open_, i):
            depth, i = depth + 1, i + len(open_)
        elif depth and text.startswith(close, i):
            depth, i = depth - 1, i + len(close)
        else:
            if not depth:
                out.append(text[i])
            i += 1
    return "".join(out)


_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")


def _link_text(m: re.Match) -> str:
    target, *label = m.group(1).split("|")
    return "" if ":" in target else (label[-1] if label else target)  # File:, Category:, interwiki: dropped


def wikitext_to_paragraphs(wikitext: str) -> list[str]:
    """Prose paragraphs of a wikitext article: comments, references, templates, tables, files, categories,
    headings, lists and HTML removed; ``[[target|label]]`` -> label; ``[url label]`` -> label; entities decoded."""
    w = re.sub(r"<!--.*?-->", "", wikitext, flags=re.S)
    w = re.sub(r"<ref[^>]*/>", "", w)
    w = re.sub(r"<ref[^>]*>.*?</ref>", "", w, flags=re.S)
    w = _strip_nested(w, "{{", "}}")
    w = _strip_nested(w, "{|", "|}")
    previous = None
    while previous != w:  # innermost links first, so links nested in file captions go with them
        previous, w = w, _LINK.sub(_link_text, w)
    w = re.sub(r"\[https?://\S+\s+([^\]]*)\]", r"\1", w)
    w = re.sub(r"\[https?://[^\]]*\]", "", w)
    w = re.sub(r"'{2,}", "", w)
    w = html.unescape(re.sub(r"<[^>]+>", "", w))
    lines = (line.strip() for line in w.split("\n"))
    return [" ".join(line.split()) for line in lines if line and line[0] not in "=*#:;|!{}[<"]


_ABBREVIATION = re.compile(
    r"(?:\b(?:Mr|Mrs|Ms|Dr|Prof|St|Jr|Sr|vs|etc|e\.g|i\.e|c|ca|No|Vol|pp|p|Gen|Col|Lt|Sgt|U\.S|Inc|Ltd|Co|Mt|Ft)"
    r"|\b[A-Z])\.$")


def split_sentences(paragraph: str) -> list[str]:
    """Split after ``. ! ?`` followed by space and an upper-case letter, quote or bracket; a piece ending in a
    known abbreviation or a single initial (``Mr.``, ``e.g.``, ``J.``) is joined with the next one."""
    sentences: list[str] = []
    for piece in re.split(r"(?<=[.!?])\s+(?=[A-Z\"'(])", paragraph.strip()):
        if sentences and _ABBREVIATION.search(sentences[-1]):
            sentences[-1] += " " + piece
        elif piece:
            sentences.append(piece)
    return sentences


# ------------------------------------------------------------------------------------------- tokeniser
_FOLD = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'", "\u2032": "'", "`": "'",
                       "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u2033": '"',
                       "\u2010": "-", "\u2011": "-", "\u2012": "-", "\u2013": "-", "\u2014": "-", "\u2212": "-"})
_TOKEN = re.compile(r"[^\W_]+(?:'[^\W_]+)*|\S")


def fold(text: str) -> str:
    """NFKC, typographic quotes and dashes to ASCII, ``''`` to ``"``, lower case (whitespace kept)."""
    return unicodedata.normalize("NFKC", text).translate(_FOLD).replace("''", '"').lower()


def tokenise(text: str) -> list[str]:
    """Deterministic word/punctuation tokens of :func:`fold` (text): ``"Don't panic!"`` -> ``["don't", "panic", "!"]``.
    No non-space character is lost: ``"".join(tokenise(s)) == "".join(fold(s).split())``."""
    return _TOKEN.findall(fold(text))


def detokenise(tokens: Iterable[str]) -> str:
    """Tokens joined by single spaces: ``detokenise(tokenise(s)) == normalise(s)``."""
    return " ".join(tokens)


def normalise(text: str) -> str:
    """The canonical text the tokeniser sees: folded, one space between tokens."""
    return detokenise(tokenise(text))


# ------------------------------------------------------------------------------------------ vocabulary
SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>")
PAD, UNK, BOS, EOS = range(4)
IGNORE = -100
"""Target id of positions that carry no loss (as ``ignore_index`` in ``torch.nn.functional.cross_entropy``)."""


class Vocab:
    """Token <-> id. Ids 0..3 are ``<pad> <unk> <bos> <eos>`` (:data:`PAD`, :data:`UNK`, :data:`BOS`, :data:`EOS`)."""

    def __init__(self, tokens: Sequence[str]):
        tokens = list(tokens)
        if tuple(tokens[:4]) != SPECIALS or len(set(tokens)) != len(tokens):
            raise ValueError(f"A vocabulary must start with {SPECIALS} and hold no duplicates; got {tokens[:6]}...")
        self.tokens = tokens
        self.index = {t: i for i, t in enumerate(tokens)}

    def __len__(self) -> int:
        return len(self.tokens)

    def __eq__(self, other) -> bool:
        return isinstance(other, Vocab) and self.tokens == other.tokens

    def ids(self, tokens: Iterable[str]) -> list[int]:
        """Token ids, ``<unk>`` for unknown tokens (no ``<bos>``/``<eos>`` added)."""
        return [self.index.get(t, UNK) for t in tokens]

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Tokens of ids, ``<pad>`` positions dropped."""
        return [self.tokens[i] for i in ids if i != PAD]


def build_vocab(sentences: Sequence[Sequence[str]], min_count: int = 2, max_size: int = 3000) -> Vocab:
    """Vocabulary of tokenised sentences: words with count ≥ ``min_count``, the ``max_size`` most frequent (ties in
    alphabetical order), after the four specials; ``len(vocab) ≤ max_size + 4``."""
    if min_count < 1 or max_size < 1:
        raise ValueError(f"min_count and max_size must be ≥ 1, got {min_count}, {max_size}.")
    counts = Counter(t for s in sentences for t in s)
    words = sorted((t for t, c in counts.items() if c >= min_count and t not in SPECIALS),
                   key=lambda t: (-counts[t], t))
    return Vocab(SPECIALS + tuple(words[:max_size]))


def _cache_key(*parts) -> str:
    return sha256_bytes(json.dumps([CACHE_VERSION, *parts], ensure_ascii=False).encode())[:16]


def _cached_json(path: Path, compute):
    """Load ``path`` (JSON) or compute, write atomically and return the value."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        value = compute()
        _atomic_write(path, json.dumps(value, ensure_ascii=False).encode())
        return value


def cached_vocab(sentences: Sequence[Sequence[str]], min_count: int, max_size: int,
                 cache_dir: str | os.PathLike) -> Vocab:
    """:func:`build_vocab`, cached in ``cache_dir/vocab-<key>.json`` keyed by the sentences and the settings."""
    key = _cache_key([list(s) for s in sentences], min_count, max_size)
    return Vocab(_cached_json(Path(cache_dir) / f"vocab-{key}.json",
                              lambda: build_vocab(sentences, min_count, max_size).tokens))


# ------------------------------------------------------------------------------------------ sentences
def pretraining_pool(root: str | os.PathLike | None = None, min_tokens: int = 5, max_tokens: int = 30) -> list[dict]:
    """Every usable pretraining sentence, Wikipedia articles first then news, in corpus order, as
    ``{"text", "tokens", "source"}`` (source ``"wiki"`` or ``"news"``). Kept: ``min_tokens``..``max_tokens``
    tokens, ending in ``. ! ?``, no leftover markup ``[ ] { } | = < >``; exact duplicates dropped. Cached in
    ``<root>/text/cache/`` keyed by the files' sha256 and the settings."""
    files = read_manifest(root)["files"]
    key = _cache_key(files[WIKI_FILE]["sha256"], files[NEWS_FILE]["sha256"], min_tokens, max_tokens)

    def compute():
        pieces = [("wiki", s) for _, w in load_wiki_articles(root) for p in wikitext_to_paragraphs(w)
                  for s in split_sentences(p)]
        pieces += [("news", s) for d in load_news_documents(root) for s in split_sentences(d)]
        pool, seen = [], set()
        for source, s in pieces:
            tokens = tokenise(s)
            if (min_tokens <= len(tokens) <= max_tokens and s[-1] in ".!?" and not re.search(r"[\[\]{}|=<>]", s)
                    and s not in seen):
                seen.add(s)
                pool.append({"text": s, "tokens": tokens, "source": source})
        return pool

    return _cached_json(text_dir(root) / "cache" / f"pool-{key}.json", compute)


def balanced_subsample(labels: Tensor, n: int, seed: int = 0) -> Tensor:
    """Indices [n] (sorted) with ``n // k`` examples of each of the k classes in ``labels`` [N], drawn with ``seed``."""
    classes = torch.unique(labels)
    per = n // len(classes)
    if per * len(classes) != n:
        raise ValueError(f"n={n} is not a multiple of the {len(classes)} classes; pick a multiple.")
    g = torch.Generator().manual_seed(seed)
    chosen = []
    for c in classes:
        members = torch.nonzero(labels == c).flatten()
        if len(members) < per:
            raise ValueError(f"Class {int(c)} has {len(members)} examples, fewer than the {per} asked for.")
        chosen.append(members[torch.randperm(len(members), generator=g)[:per]])
    return torch.cat(chosen).sort().values


# -------------------------------------------------------------------------------------------- tensors
def encode(sentences: Sequence[Sequence[str]], vocab: Vocab, length: int | None = None) -> tuple[Tensor, Tensor]:
    """Token lists -> ``(ids [N, L] long, lengths [N] long)``: ``<bos> w_1 .. w_n <eos>`` then ``<pad>`` (id 0).

    ``lengths`` count ``<bos>`` and ``<eos>``; L = ``length`` or the longest sentence + 2.
    """
    rows = [[BOS, *vocab.ids(s), EOS] for s in sentences]
    if not rows:
        raise ValueError("encode needs at least one sentence.")
    longest = max(len(r) for r in rows)
    L = longest if length is None else length
    if longest > L:
        raise ValueError(f"A sentence needs {longest} positions (with <bos>/<eos>) but length={L}. "
                         "Fix: raise length or drop long sentences.")
    ids = torch.full((len(rows), L), PAD, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
    return ids, torch.tensor([len(r) for r in rows])


def lm_targets(ids: Tensor) -> Tensor:
    """Targets [N, L, 2] of the bidirectional language model for padded ids [N, L] from :func:`encode`.

    ``[..., 0]``: the next token (forward LM; position t predicts t+1), ``[..., 1]``: the previous token (backward
    LM; t predicts t−1). Positions without a target (``<eos>`` forward, ``<bos>`` backward, padding) hold
    :data:`IGNORE`. A sentence of n words gets n+1 targets in each direction.
    """
    if ids.dim() != 2:
        raise ValueError(f"ids must be [N, L], got shape {tuple(ids.shape)}.")
    valid = ids != PAD
    nxt = torch.full_like(ids, IGNORE)
    prv = torch.full_like(ids, IGNORE)
    nxt[:, :-1] = torch.where(valid[:, 1:], ids[:, 1:], IGNORE)
    prv[:, 1:] = torch.where(valid[:, :-1] & valid[:, 1:], ids[:, :-1], IGNORE)
    return torch.stack([nxt, prv], dim=-1)


# --------------------------------------------------------------------------------------------- losses
def lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-sentence pretraining loss f(z) [B] (nats): mean NLL over the valid targets of both directions.

    ``logits`` [B, L, 2, V] from :class:`msif_lab.models.BiLMHead`, ``targets`` [B, L, 2] from :func:`lm_targets`
    (:data:`IGNORE` = no loss). Both directions have the same number of targets per sentence, so this is also the
    mean of the forward and the backward LM loss. No batch reduction; padding contributes nothing.
    """
    if logits.shape[:-1] != targets.shape or logits.dim() != 4 or logits.shape[2] != 2:
        raise ValueError(f"lm_loss expects logits [B, L, 2, V] and targets [B, L, 2]; got {tuple(logits.shape)} and "
                         f"{tuple(targets.shape)}. Fix: targets = lm_targets(ids) for the same ids.")
    valid = targets != IGNORE
    nll = -logits.log_softmax(-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (nll * valid).sum((1, 2)) / valid.sum((1, 2)).clamp(min=1)


def sentiment_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-sentence finetuning loss g(x) [B] (nats): cross-entropy of logits [B, 2] and labels [B] (1 = positive)."""
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"sentiment_loss expects logits [B, C] and labels [B]; got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}.")
    return F.cross_entropy(logits, labels, reduction="none")


# ---------------------------------------------------------------------------------------- task and stages
@dataclass
class TextTask:
    """Everything notebook 07 needs. ``*_ids`` [N, L] long (:func:`encode`), ``*_lengths`` [N] (with bos/eos),
    ``pretrain_targets`` [m, L, 2] (:func:`lm_targets`), ``*_labels`` [n] long (1 = positive); the
    ``*_sentences`` are the original texts in the same order (for tables of influential examples)."""

    vocab: Vocab
    pretrain_sentences: list[str]
    pretrain_ids: Tensor
    pretrain_lengths: Tensor
    pretrain_targets: Tensor
    train_sentences: list[str]
    train_ids: Tensor
    train_lengths: Tensor
    train_labels: Tensor
    test_sentences: list[str]
    test_ids: Tensor
    test_lengths: Tensor
    test_labels: Tensor

    def stats(self) -> dict:
        """Sizes, token counts, ``<unk>`` rates and label balance."""
        def words(ids):  # tokens without bos/eos/pad
            return ids[(ids != PAD) & (ids != BOS) & (ids != EOS)]

        out = {"vocab_size": len(self.vocab)}
        for part in ("pretrain", "train", "test"):
            ids = getattr(self, f"{part}_ids")
            w = words(ids)
            out[part] = {"sentences": len(ids), "length": ids.shape[1], "tokens": len(w),
                         "unk_rate": round(float((w == UNK).float().mean()), 4)}
            if part != "pretrain":
                out[part]["positive"] = int(getattr(self, f"{part}_labels").sum())
        return out


def load_text_task(root: str | os.PathLike | None = None, *, n_pretrain: int = 2000, n_train: int = 400,
                   n_test: int = 100, min_tokens: int = 5, max_tokens: int = 30, min_count: int = 2,
                   max_vocab: int = 3000, seed: int = 0) -> TextTask:
    """The default NLP task from prepared data (see :func:`prepare_text`).

    Pretraining: ``n_pretrain`` sentences drawn with ``seed`` from :func:`pretraining_pool` (kept in corpus order).
    Vocabulary from them (:func:`cached_vocab`). Finetuning: reviews with a non-zero score and at most
    ``max_tokens`` tokens; ``n_train`` and ``n_test`` disjoint, class-balanced, drawn with ``seed``. All id
    tensors share one length L = ``max_tokens`` + 2.
    """
    pool = pretraining_pool(root, min_tokens, max_tokens)
    if n_pretrain > len(pool):
        raise ValueError(f"n_pretrain={n_pretrain} exceeds the {len(pool)} usable pretraining sentences.")
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(pool), generator=g)[:n_pretrain].sort().values.tolist()
    pre = [pool[i] for i in pick]
    vocab = cached_vocab([p["tokens"] for p in pre], min_count, max_vocab, text_dir(root) / "cache")
    L = max_tokens + 2
    pre_ids, pre_len = encode([p["tokens"] for p in pre], vocab, L)

    reviews = [(r, tokenise(r.text)) for r in load_reviews(root) if r.score != 0]
    reviews = [(r, t) for r, t in reviews if 1 <= len(t) <= max_tokens]
    labels = torch.tensor([r.label for r, _ in reviews])
    test = balanced_subsample(labels, n_test, seed)
    rest = torch.ones(len(labels), dtype=torch.bool)
    rest[test] = False
    rest = torch.nonzero(rest).flatten()
    train = rest[balanced_subsample(labels[rest], n_train, seed + 1)]
    parts = {}
    for name, idx in (("train", train), ("test", test)):
        chosen = [reviews[i] for i in idx.tolist()]
        ids, lengths = encode([t for _, t in chosen], vocab, L)
        parts[name] = ([r.text for r, _ in chosen], ids, lengths, labels[idx])
    return TextTask(vocab, [p["text"] for p in pre], pre_ids, pre_len, lm_targets(pre_ids),
                    *parts["train"], *parts["test"])


def text_stats(root: str | os.PathLike | None = None) -> dict:
    """Counts of the prepared data: articles, news documents, pretraining sentences and tokens, reviews by label."""
    pool = pretraining_pool(root)
    reviews = load_reviews(root)
    return {
        "wiki_articles": len(load_wiki_articles(root)),
        "news_documents": len(load_news_documents(root)),
        "pretraining_sentences": {s: sum(p["source"] == s for p in pool) for s in ("wiki", "news")},
        "pretraining_tokens": sum(len(p["tokens"]) for p in pool),
        "reviews": {"total": len(reviews), "positive": sum(r.score > 0 for r in reviews),
                    "negative": sum(r.score < 0 for r in reviews), "zero": sum(r.score == 0 for r in reviews)},
    }


def text_models(vocab_size: int, *, dim: int = 32, hidden: int = 32, encoder: str = "gru", window: int = 3,
                seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[TextModel, TextModel]:
    """(pretraining model = MiniELMo + :class:`BiLMHead`, finetuning model = the same MiniELMo instance +
    :class:`SentimentHead`), initialised from ``seed``. Sub-modules ``embed`` (W) and ``head`` (U or Θ).
    ``encoder``/``window``: see :class:`msif_lab.models.MiniELMo`."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        embed = MiniELMo(vocab_size, dim=dim, hidden=hidden, encoder=encoder, window=window)
        pre = TextModel(embed, BiLMHead(hidden, vocab_size)).to(dtype)
        ft = TextModel(embed, SentimentHead(embed.out_features)).to(dtype)
    return pre, ft


def text_two_stage(pretrain_ids: Tensor, pretrain_targets: Tensor, finetune_ids: Tensor, finetune_labels: Tensor,
                   vocab_size: int, *, alpha: float | None = None, dim: int = 32, hidden: int = 32,
                   encoder: str = "gru", window: int = 3, pretrain_weight_decay: float = 1e-4,
                   finetune_weight_decay: float = 1e-3, seed: int = 0, dtype: torch.dtype = torch.float32) -> TwoStage:
    """The NLP :class:`~msif_lab.stages.TwoStage`: pretraining on (ids [m, L], LM targets [m, L, 2]) with
    :func:`lm_loss`, finetuning on (ids [n, L], labels [n]) with :func:`sentiment_loss`; W = ``embed``.
    ``alpha=None``: case A (embedding fixed); ``alpha > 0``: case B (proximal term (α/2)·||W − W*||²)."""
    pre, ft = text_models(vocab_size, dim=dim, hidden=hidden, encoder=encoder, window=window, seed=seed, dtype=dtype)
    return TwoStage(
        Stage(pre, lm_loss, pretrain_ids, pretrain_targets, weight_decay=pretrain_weight_decay),
        Stage(ft, sentiment_loss, finetune_ids, finetune_labels, weight_decay=finetune_weight_decay),
        alpha=alpha,
    )
