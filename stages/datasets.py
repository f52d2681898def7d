"""Data sources: each turns (source spec, split) into a manifest table and an image loader.

Sources (`--source`, default: the dataset name):
  digits                 scikit-learn's bundled 1,797 handwritten 8x8 digits, templated captions,
                         a fixed seeded train/test split (the offline default)
  pairs:FILE             a Parquet or CSV table with an image path column and a caption column
                         (paths relative to the file; several rows may share an image; optional
                         `label`, `split` columns): how users bring their own pairs
  coco:ROOT              COCO captions: ROOT/annotations/captions_{split}2017.json and
                         images in ROOT/{split}2017/
  imagefolder:ROOT       one folder per class (ROOT/{split}/<class>/ or ROOT/<class>/),
                         for zero-shot evaluation
  torchvision:NAME       a torchvision classification set (CIFAR10, STL10, Food101, ...), downloaded
                         to ~/.cache/structure-align on the user's machine

Every labelled source also has the text-only split `prompts`: each class name in every template,
for zero-shot classification (by default the labels' names in the five `PROMPT_TEMPLATES`;
`stages.prompts` makes them by protocol, e.g. CLIP's templates and curated names; a pairs file's
classes are those of the whole file, so it needs no `train` rows). Empty and NaN labels are no
class; class names that are the same but for case or surrounding spaces are refused, as their
prompts would split one class's probability between them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from stages.prompts import PromptSpec, is_prompts_split, prompt_texts
from store.errors import UserError

PROMPT_TEMPLATES = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a close-up photo of a {}.",
    "a drawing of a {}.",
    "a photo of the {}.",
)
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_CAPTIONS = (
    "a handwritten digit {word}.",
    "the number {digit} written by hand.",
    "a photo of the number {word}.",
    "a small scanned image of a {word}.",
    "handwriting that shows a {digit}.",
)
DIGITS_TEST_FRACTION = 0.2
DIGITS_SEED = 0
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
NO_LABEL = ("", "nan")  # label cells (stripped, lower-cased) that are no class, as NaN is


@dataclass
class Source:
    """A split of a data source: its manifest and how to load image `image_row`."""

    manifest: pd.DataFrame
    load_image: Callable[[int], Image.Image] | None
    label_names: list[str]
    prompts: dict | None = None  # the prompts split's record (stages.prompts.prompt_record)


# -- digits ---------------------------------------------------------------------------------------
DIGITS_SCHEME = "sklearn://digits/"  # the image_path the digits source records: + the index


@cache
def sklearn_digits():
    """scikit-learn's digits, read once per process (extraction and `serve` read it often)."""
    from sklearn.datasets import load_digits

    return load_digits()


def digits_split(split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indices into sklearn's digits, 8x8 images, labels) of the fixed seeded split."""
    digits = sklearn_digits()
    order = np.random.default_rng(DIGITS_SEED).permutation(len(digits.target))
    n_test = round(len(order) * DIGITS_TEST_FRACTION)
    chosen = {"test": order[:n_test], "train": order[n_test:]}.get(split)
    if chosen is None:
        raise UserError(f"digits has splits train, test and prompts, not {split!r}")
    chosen = np.sort(chosen)
    return chosen, digits.images[chosen], digits.target[chosen]


def digits_source(split: str) -> Source:
    index, images, labels = digits_split(split)
    rng = np.random.default_rng(DIGITS_SEED + 1)
    templates = rng.integers(len(DIGIT_CAPTIONS), size=len(index))
    captions = [
        DIGIT_CAPTIONS[t].format(word=DIGIT_WORDS[y], digit=y) for t, y in zip(templates, labels)
    ]
    manifest = pd.DataFrame(
        {
            "image_row": np.arange(len(index)),
            "sample_id": [f"digits-{i}" for i in index],
            "image_path": [f"{DIGITS_SCHEME}{i}" for i in index],
            "caption": captions,
            "label": labels,
            "label_name": [DIGIT_WORDS[y] for y in labels],
        }
    )

    return Source(manifest, lambda row: digit_image(images[row]), list(DIGIT_WORDS))


def digit_image(pixels: np.ndarray) -> Image.Image:
    """One of scikit-learn's 8x8 digits (values 0..16) as an RGB image."""
    return Image.fromarray(np.uint8(np.round(pixels * (255 / 16))), mode="L").convert("RGB")


# -- files on disk ------------------------------------------------------------------------
HIGH_BIT_MODES = ("I", "F")  # PIL's 32-bit integer and float modes; "I;16*" are 16-bit


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB image. 16-bit, 32-bit and float grayscale (microscopy, radiology) would clip
    at 255 with convert("RGB"): their actual range [min, max] is scaled linearly to 0..255
    instead, as image viewers (ImageJ/Fiji's auto display range) show them; a constant image is
    black."""
    if image.mode.startswith("I;16") or image.mode in HIGH_BIT_MODES:
        pixels = np.asarray(image, dtype=np.float64)
        low, high = np.nanmin(pixels), np.nanmax(pixels)
        scaled = (pixels - low) * (255 / (high - low)) if high > low else np.zeros_like(pixels)
        image = Image.fromarray(np.uint8(np.round(np.nan_to_num(scaled))), mode="L")
    return image.convert("RGB")


def open_image(path: str | Path) -> Image.Image:
    with Image.open(path) as image:
        return to_rgb(image)


def read_table(path: Path) -> pd.DataFrame:
    if path.is_dir():
        raise UserError(f"pairs file {path} is a directory; give a .csv or .parquet file")
    if not path.is_file():
        raise UserError(f"pairs file {path} does not exist")
    try:
        if path.suffix.lower() == ".csv":
            return pd.read_csv(path, keep_default_na=False)  # a caption "NA" is text
        if path.suffix.lower() in {".parquet", ".pq"}:
            return pd.read_parquet(path)
    except Exception as err:  # pandas and pyarrow raise many types for a bad file
        raise UserError(f"cannot read {path}: {str(err).splitlines()[0]}") from err
    raise UserError(f"pairs file {path} must be .csv or .parquet")


def pick_column(table: pd.DataFrame, candidates: tuple[str, ...], what: str, path: Path) -> str:
    for name in candidates:
        if name in table.columns:
            return name
    raise UserError(
        f"{path} has no {what} column (looked for {', '.join(candidates)}; "
        f"it has {', '.join(map(str, table.columns))})"
    )


def check_class_names(names: list[str], where: str) -> None:
    """Refuse class names that are one name but for case or surrounding spaces (`cat`, `Cat `):
    two classes with one prompt would share its probability."""
    seen: dict[str, str] = {}
    for name in names:
        key = str(name).strip().casefold()
        if key in seen:
            raise UserError(
                f"{where} has the class names {seen[key]!r} and {name!r}, one name twice; "
                "give each class one name"
            )
        seen[key] = str(name)


def class_numbers(table: pd.DataFrame, path: Path) -> tuple[np.ndarray, list[str]]:
    """(class number per row, class names) of a pairs table's `label` column, numbered over
    the whole file (every split agrees on them, even one lacking some); empty and NaN cells
    are no class (-1), and a label's surrounding spaces are not part of its name."""
    if "label" not in table.columns:
        return np.full(len(table), -1), []
    text = table["label"].astype(str).str.strip()
    none = table["label"].isna() | text.str.lower().isin(NO_LABEL)
    numbers, names = pd.factorize(text.where(~none), sort=True)
    names = [str(n) for n in names]
    check_class_names(names, str(path))
    return np.asarray(numbers), names


def read_pairs(file: str) -> tuple[Path, pd.DataFrame, str, str, list[str]]:
    """A pairs file: (its path, the table with `label_number`, the image and caption columns,
    the class names)."""
    path = Path(file).expanduser()
    table = read_table(path)
    image_col = pick_column(table, ("image_path", "image", "path", "file"), "image path", path)
    caption_col = pick_column(table, ("caption", "text", "captions"), "caption", path)
    labels, names = class_numbers(table, path)
    return path, table.assign(label_number=labels), image_col, caption_col, names


def pairs_source(file: str, split: str) -> Source:
    path, table, image_col, caption_col, names = read_pairs(file)
    if "split" in table.columns:
        table = table[table["split"].astype(str) == split]
        if table.empty:
            raise UserError(f"{path} has no rows with split == {split!r}")
    elif split not in ("train", "all"):
        raise UserError(f"{path} has no `split` column, so it only has the split `train`")
    empty = table[caption_col].isna() | (table[caption_col].astype(str).str.strip() == "")
    if empty.any():
        raise UserError(f"{path} has empty captions in rows {list(table.index[empty][:5])}")
    no_image = table[image_col].isna() | (table[image_col].astype(str).str.strip() == "")
    if no_image.any():
        raise UserError(f"{path} has empty image paths in rows {list(table.index[no_image][:5])}")
    images = [str((path.parent / p).resolve()) for p in table[image_col].astype(str)]
    image_row, unique = pd.factorize(pd.Series(images))
    labels = table["label_number"].to_numpy()
    manifest = pd.DataFrame(
        {
            "image_row": image_row,
            "sample_id": [Path(p).stem for p in unique[image_row]],
            "image_path": images,
            "caption": table[caption_col].astype(str).to_numpy(),
            "label": labels,
            "label_name": [names[y] if y >= 0 else "" for y in labels],
        }
    )
    return file_source(manifest, list(unique), list(names))


def coco_source(root: str, split: str) -> Source:
    base = Path(root).expanduser()
    annotations = base / "annotations" / f"captions_{split}2017.json"
    if not annotations.is_file():
        what = "is a directory" if annotations.is_dir() else "does not exist"
        raise UserError(f"COCO captions file {annotations} {what}")
    try:
        data = json.loads(annotations.read_text(encoding="utf-8"))
        files = {img["id"]: str(base / f"{split}2017" / img["file_name"]) for img in data["images"]}
        captions = list(data["annotations"])
        unknown = sorted({a["image_id"] for a in captions} - set(files), key=str)
        texts = [a["caption"] for a in captions]
    except (ValueError, KeyError, TypeError) as err:  # invalid JSON, a missing key, odd types
        what = f"lacks {err}" if isinstance(err, KeyError) else str(err).splitlines()[0]
        raise UserError(f"{annotations} is not a COCO captions file ({what})") from err
    if unknown:
        raise UserError(f"{annotations} has captions of unknown image ids, e.g. {unknown[0]}")
    if not all(isinstance(t, str) for t in texts):
        raise UserError(f"{annotations} has a caption that is not text")
    # images without a caption cannot be paired: they are left out
    ids = sorted({a["image_id"] for a in captions})
    row_of = {image_id: row for row, image_id in enumerate(ids)}
    captions = sorted(enumerate(captions), key=lambda c: (row_of[c[1]["image_id"]], c[0]))
    captions = [a for _, a in captions]
    manifest = pd.DataFrame(
        {
            "image_row": [row_of[a["image_id"]] for a in captions],
            "sample_id": [str(a["image_id"]) for a in captions],
            "image_path": [files[a["image_id"]] for a in captions],
            "caption": [a["caption"].strip() for a in captions],
        }
    )
    return file_source(manifest, [files[i] for i in ids], [])


def imagefolder_source(root: str, split: str) -> Source:
    base = Path(root).expanduser()
    if not base.is_dir():
        what = "is a file, not a folder" if base.exists() else "does not exist"
        raise UserError(f"image folder {base} {what}")
    if (base / split).is_dir():
        base = base / split
    classes = sorted(d.name for d in base.iterdir() if d.is_dir())
    if not classes:
        raise UserError(f"{base} has no class folders")
    files = [
        (str(f), label)
        for label, name in enumerate(classes)
        for f in sorted((base / name).iterdir())
        if f.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not files:
        raise UserError(f"{base} has no images in its class folders")
    manifest = pd.DataFrame(
        {
            "image_row": np.arange(len(files)),
            "sample_id": [Path(f).stem for f, _ in files],
            "image_path": [f for f, _ in files],
            "caption": "",
            "label": [y for _, y in files],
            "label_name": [classes[y] for _, y in files],
        }
    )
    return file_source(manifest, [f for f, _ in files], classes)


def file_source(manifest: pd.DataFrame, image_files: list[str], label_names: list[str]) -> Source:
    """A source whose images are files; missing files (and folders where an image should be)
    are reported together, up front."""
    folders = [f for f in image_files if Path(f).is_dir()]
    if folders:
        more = f" and {len(folders) - 3} more" if len(folders) > 3 else ""
        raise UserError(f"image paths that are directories: {', '.join(folders[:3])}{more}")
    missing = [f for f in image_files if not Path(f).is_file()]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise UserError(f"missing image files: {', '.join(missing[:3])}{more}")
    return Source(manifest, lambda row: open_image(image_files[row]), label_names)


def torchvision_source(name: str, split: str) -> Source:
    """A torchvision classification set; `split` maps to `train=` or `split=` as the class takes
    it (sets without either, such as Caltech101, are one split: use any name)."""
    import inspect

    import torchvision.datasets as tvd

    cls = getattr(tvd, name, None)
    if cls is None:
        raise UserError(f"torchvision has no dataset {name!r}")
    root = Path("~/.cache/structure-align/torchvision").expanduser()
    params = inspect.signature(cls).parameters
    kwargs = {"train": split == "train"} if "train" in params else {}
    if "split" in params:
        kwargs = {"split": split}
    try:
        data = cls(root, download=True, **kwargs)
    except (OSError, RuntimeError, ValueError) as err:
        raise UserError(
            f"cannot get torchvision {name} ({split}): {str(err).splitlines()[0]}"
        ) from err
    names = list(getattr(data, "classes", []) or getattr(data, "categories", []))
    targets = next(
        (getattr(data, a) for a in ("targets", "labels", "_labels", "y") if hasattr(data, a)), None
    )
    labels = np.asarray(targets if targets is not None else [data[i][1] for i in range(len(data))])
    n = len(data)
    manifest = pd.DataFrame(
        {
            "image_row": np.arange(n),
            "sample_id": [f"{name}-{split}-{i}" for i in range(n)],
            "image_path": [f"torchvision://{name}/{split}/{i}" for i in range(n)],
            "caption": "",
            "label": labels,
            "label_name": [names[y] if names else str(y) for y in labels],
        }
    )
    return Source(
        manifest,
        lambda row: to_rgb(data[row][0]),
        names or sorted({str(y) for y in labels}, key=int),
    )


def prompts_source(label_names: list[str], record: dict) -> Source:
    """Text-only split: every class in every template of the record (zero-shot classifier
    prompts). `label_name` stays the label's own name (what the image splits call the class);
    the prompts use the record's class names."""
    rows = prompt_texts(record)
    manifest = pd.DataFrame(
        {
            "image_row": -1,
            "sample_id": [f"class-{y}" for y, _ in rows],
            "image_path": "",
            "caption": [text for _, text in rows],
            "label": [y for y, _ in rows],
            "label_name": [label_names[y] for y, _ in rows],
        }
    )
    return Source(manifest, None, list(label_names), record)


def prompt_labels(spec: str) -> list[str]:
    """The class names of a source's labels: a pairs file's whole file's; an image folder's
    from its first split folder of test, val, train (ROOT/val/<class>/: ImageNet's layout),
    else its own class folders; other sources' from their test split."""
    kind, _, arg = spec.partition(":")
    if kind == "pairs" and arg:
        names = read_pairs(arg)[4]
    elif kind == "imagefolder" and arg:
        root = Path(arg).expanduser()
        split = next((s for s in ("test", "val", "train") if (root / s).is_dir()), "test")
        names = load_source(spec, split).label_names
    else:
        names = load_source(spec, "test").label_names
    if not names:
        raise UserError("this source has no class labels, so it has no `prompts` split")
    check_class_names(list(names), "this source")
    return list(names)


def load_source(spec: str, split: str, prompts: PromptSpec | None = None) -> Source:
    """Resolve `--source` (see the module docstring) for one split; the `prompts` split (and
    any `prompts-NAME`) is made as `prompts` says (default: the simple templates over the
    labels' names)."""
    kind, _, arg = spec.partition(":")
    if is_prompts_split(split):
        names = prompt_labels(spec)
        return prompts_source(names, (prompts or PromptSpec()).record(names, spec))
    if kind == "digits":
        return digits_source(split)
    if not arg:
        raise UserError(
            f"unknown source {spec!r}; use digits, pairs:FILE, coco:ROOT, imagefolder:ROOT "
            "or torchvision:NAME"
        )
    builders = {
        "pairs": pairs_source,
        "coco": coco_source,
        "imagefolder": imagefolder_source,
        "torchvision": torchvision_source,
    }
    if kind not in builders:
        raise UserError(f"unknown source kind {kind!r}; use one of digits, {', '.join(builders)}")
    return builders[kind](arg, split)
