"""Zero-shot prompts by protocol: which templates and which class names make a dataset's classifier.

`--templates`:  `simple` (five generic templates, the default), `clip` (CLIP's per-dataset set as
                LAION's CLIP_benchmark carries it: 80 for ImageNet, 18 for CIFAR-10, ...) or
                FILE (one template per line, each with one `{c}` for the class name).
`--classnames`: `source` (the dataset's own label names, the default), `clip` (CLIP_benchmark's
                names for the dataset) or FILE (one class name per line, in label order).

The `clip` data are read from the installed `clip-benchmark` package's data files
(`clip_benchmark/datasets/en_classnames.json`, `en_zeroshot_classification_templates.json`, and
the ImageNet WordNet-id order in its `builder.py`), without importing the package (importing
its datasets would pull in open_clip and more). Its class names follow its own dataset builder:
curated names where it has them (ImageNet, Caltech101, Pets, MNIST, ...), underscores as spaces
for Food101 and SUN397, and the dataset's own names otherwise (CIFAR, STL10). Our dataset names
map to its names (`imagenet` -> `imagenet1k`, torchvision's `OxfordIIITPet` -> `pets`, ...).

An image folder of WordNet ids (`n01440764`, ...) gets the curated ImageNet names whatever
`--classnames` says unless a FILE is given: "a photo of a n01440764." would measure nothing.

What was used is one JSON-able record (`prompt_record`): the protocol names, the CLIP_benchmark
dataset and version, and the exact template and class-name lists; extraction stores it with the
prompts' features and `evaluate` copies it into metrics.json.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

from stages.encoders.arguments import (
    checked_class_names,
    checked_templates,
    clip_form,
    fill_template,
)
from store.errors import UserError

SIMPLE = "simple"
CLIP = "clip"
SOURCE = "source"
TEMPLATE_PROTOCOLS = (SIMPLE, CLIP)
CLASSNAME_PROTOCOLS = (SOURCE, CLIP)
PACKAGE = "clip-benchmark"  # the PyPI distribution; its data live in clip_benchmark/datasets/
INSTALL_HINT = "install the `protocol` extra (pip install clip-benchmark)"

# our names (a store dataset name or a torchvision class, lower-cased, `-` as `_`) that differ
# from CLIP_benchmark's; a name it uses itself maps to itself
CLIP_BENCHMARK_NAMES = {
    "imagenet": "imagenet1k",
    "imagenet_1k": "imagenet1k",
    "ilsvrc2012": "imagenet1k",
    "oxfordiiitpet": "pets",
    "oxford_pets": "pets",
    "flowers102": "flowers",
    "stanfordcars": "cars",
    "fgvcaircraft": "fgvc_aircraft",
    "voc": "voc2007",
}
# the builder's renaming of the datasets whose own names it keeps
UNDERSCORED = {"food101": ("_",), "sun397": ("_", "/")}
WORDNET_ID = re.compile(r"n\d{8}")
# CLIP_benchmark's Caltech101 keeps the background class (102 names, `background` first);
# torchvision's drops it (101 classes in the same order)
WITH_BACKGROUND = {"caltech101": "BACKGROUND_Google"}


def is_prompts_split(split: str) -> bool:
    """`prompts`, or `prompts-NAME`: several prompt sets of one dataset side by side (e.g.
    `prompts-clip` next to `prompts`), each evaluated with `evaluate --prompts-split`."""
    return split == "prompts" or split.startswith("prompts-")


# -- CLIP_benchmark's data files ----------------------------------------------------------------
@cache
def clip_benchmark_dir() -> Path:
    """The installed package's `datasets` folder, found without importing the package."""
    try:
        dist = metadata.distribution(PACKAGE)
    except metadata.PackageNotFoundError:
        needs = "the `clip` protocol needs CLIP_benchmark's data"
        raise UserError(f"{needs}: {INSTALL_HINT}") from None
    folder = Path(dist.locate_file("clip_benchmark/datasets"))
    if not (folder / "en_classnames.json").is_file():
        raise UserError(f"the installed {PACKAGE} has no datasets/en_classnames.json ({folder})")
    return folder


def clip_benchmark_version() -> str:
    clip_benchmark_dir()
    return metadata.version(PACKAGE)


@cache
def clip_data(kind: str) -> dict[str, Any]:
    """CLIP_benchmark's English `classnames` or `templates` (dataset name -> list)."""
    name = {"classnames": "en_classnames.json",
            "templates": "en_zeroshot_classification_templates.json"}[kind]  # fmt: skip
    return json.loads((clip_benchmark_dir() / name).read_text(encoding="utf-8"))


@cache
def imagenet_wordnet_ids() -> tuple[str, ...]:
    """The 1,000 ImageNet WordNet ids in class order: the literal list `all_imagenet_wordnet_ids`
    of CLIP_benchmark's builder.py, read as a literal, never executed."""
    tree = ast.parse((clip_benchmark_dir() / "builder.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "all_imagenet_wordnet_ids" for t in node.targets
        ):
            ids = tuple(ast.literal_eval(node.value))
            if len(ids) == 1000:
                return ids
    raise UserError(f"cannot find ImageNet's WordNet ids in the installed {PACKAGE}")


def protocol_datasets() -> list[str]:
    """The CLIP_benchmark datasets that have zero-shot templates."""
    return sorted(k for k in clip_data("templates") if k != "dummy")


def protocol_dataset(name: str, *fallbacks: str) -> str:
    """CLIP_benchmark's name for our dataset `name` (or the first of `fallbacks`, e.g. the
    torchvision class of the source, that it knows); an unknown one is a UserError."""
    known = set(protocol_datasets())
    for candidate in (name, *fallbacks):
        key = candidate.strip().lower().replace("-", "_")
        key = CLIP_BENCHMARK_NAMES.get(key, key)
        if key in known:
            return key
    raise UserError(
        f"CLIP_benchmark has no zero-shot protocol for dataset {name!r}; pass "
        f"--protocol-dataset NAME, one of {', '.join(protocol_datasets())}"
    )


# -- templates and class names --------------------------------------------------------------------
def read_lines(path: str | Path, option: str, hint: str = "") -> list[str]:
    """The non-blank lines of a UTF-8 text file given to `option`, stripped; anything that is
    not a readable regular file of UTF-8 text is one line, with `hint` after it."""
    file = Path(path).expanduser()
    hint = f"; {hint}" if hint else ""
    if file.is_dir():
        raise UserError(f"{option} {file} is a directory, not a file{hint}")
    if not file.exists():
        raise UserError(f"{option} {file} does not exist{hint}")
    if not file.is_file():  # a device or a pipe (/dev/urandom never ends)
        raise UserError(f"{option} {file} is not a regular file{hint}")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{option} {file} is not UTF-8 text (byte {err.start}){hint}") from err
    except OSError as err:
        raise UserError(f"cannot read {option} {file}: {err.strerror}{hint}") from err
    return [line.strip() for line in text.splitlines() if line.strip()]


def resolve_templates(spec: str, dataset: str | None) -> list[str]:
    """`simple`, `clip` (of the CLIP_benchmark `dataset`) or a FILE of templates, in CLIP's
    form (`{c}`, as CLIP_benchmark fills them)."""
    from stages.datasets import PROMPT_TEMPLATES

    if spec == SIMPLE:
        templates = checked_templates(list(PROMPT_TEMPLATES))
    elif spec == CLIP:
        if dataset is None:
            raise UserError("--templates clip needs the dataset's CLIP_benchmark name")
        templates = checked_templates(clip_data("templates")[dataset], f"CLIP's {dataset}")
    else:
        lines = read_lines(spec, "--templates", f"give {SIMPLE}, {CLIP} or a text file")
        templates = checked_templates(lines, f"--templates {spec}")
    return [clip_form(t) for t in templates]  # one form in records: {c}


def clip_class_names(dataset: str, label_names: Sequence[str]) -> list[str]:
    """CLIP_benchmark's class names for `dataset`, one per label of the source, in its order."""
    curated = clip_data("classnames").get(dataset)
    if dataset in UNDERSCORED or curated is None:
        names = list(label_names)
        for char in UNDERSCORED.get(dataset, ()):
            names = [n.replace(char, " ") for n in names]
        return names
    if dataset == "imagenet1k" and is_wordnet(label_names):
        return wordnet_names(label_names)
    background = WITH_BACKGROUND.get(dataset)
    if background and len(label_names) == len(curated) - 1 and background not in label_names:
        curated = curated[1:]
    if len(curated) != len(label_names):
        raise UserError(
            f"CLIP_benchmark's {dataset} has {len(curated)} class names but this source has "
            f"{len(label_names)} labels; give --classnames FILE (one name per label)"
        )
    return list(curated)


def is_wordnet(label_names: Sequence[str]) -> bool:
    """Whether every label is a WordNet id (an ImageNet image folder's class folders)."""
    return bool(label_names) and all(WORDNET_ID.fullmatch(str(n)) for n in label_names)


def wordnet_names(label_names: Sequence[str]) -> list[str]:
    """ImageNet's curated names of WordNet-id folder names (any subset of the 1,000)."""
    position = {wnid: i for i, wnid in enumerate(imagenet_wordnet_ids())}
    unknown = [n for n in label_names if n not in position]
    if unknown:
        raise UserError(f"{unknown[0]} is not one of ImageNet-1k's 1,000 WordNet ids")
    curated = clip_data("classnames")["imagenet1k"]
    return [curated[position[n]] for n in label_names]


def resolve_class_names(spec: str, label_names: Sequence[str], dataset: str | None) -> list[str]:
    """The names the prompts use, one per label in label order."""
    if spec == CLIP:
        if dataset is None:
            raise UserError("--classnames clip needs the dataset's CLIP_benchmark name")
        names = clip_class_names(dataset, label_names)
    elif spec == SOURCE:
        names = wordnet_names(label_names) if is_wordnet(label_names) else list(label_names)
    else:
        names = read_lines(spec, "--classnames", f"give {SOURCE}, {CLIP} or a text file")
        if len(names) != len(label_names):
            raise UserError(
                f"--classnames {spec} has {len(names)} names but the dataset has "
                f"{len(label_names)} labels; give one name per label, in label order"
            )
    return checked_class_names(names, f"class names ({spec})")


def prompt_record(
    label_names: Sequence[str],
    templates: str = SIMPLE,
    classnames: str = SOURCE,
    dataset: str | None = None,
) -> dict[str, Any]:
    """What makes a dataset's prompts: the protocol names, CLIP_benchmark's dataset and
    version (when a `clip` protocol is used), the template list and one class name per label.
    `dataset` is CLIP_benchmark's name (see `protocol_dataset`); FILE specs are read here."""
    wordnet = classnames == SOURCE and is_wordnet(label_names)
    uses_clip = CLIP in (templates, classnames) or wordnet
    names = classnames if classnames in CLASSNAME_PROTOCOLS else f"file:{classnames}"
    record: dict[str, Any] = {
        "templates": templates if templates in TEMPLATE_PROTOCOLS else f"file:{templates}",
        "classnames": "wordnet" if wordnet else names,
        "protocol_dataset": dataset if uses_clip else None,
        "clip_benchmark": clip_benchmark_version() if uses_clip else None,
        "template_list": resolve_templates(templates, dataset),
        "class_names": resolve_class_names(classnames, label_names, dataset),
    }
    return record


@dataclass(frozen=True)
class PromptSpec:
    """How to make a dataset's prompts (extract's --templates, --classnames, --protocol-dataset)."""

    templates: str = SIMPLE
    classnames: str = SOURCE
    protocol_dataset: str = ""  # CLIP_benchmark's name; empty: from the dataset's or source's
    dataset: str = ""  # the store's dataset name (a hint for CLIP_benchmark's name)

    def uses_clip(self) -> bool:
        return CLIP in (self.templates, self.classnames)

    def record(self, label_names: Sequence[str], source_spec: str) -> dict[str, Any]:
        """The prompt record of a source's labels. CLIP_benchmark's dataset is
        `protocol_dataset`, else the first of the store's dataset name and the source's
        (`torchvision:NAME`, `imagefolder:ROOT`'s folder) that it knows."""
        name = None
        if self.protocol_dataset:
            name = protocol_dataset(self.protocol_dataset)
        elif self.uses_clip():
            kind, _, arg = source_spec.partition(":")
            hints = [Path(arg).name] if kind in ("torchvision", "imagefolder") and arg else []
            name = protocol_dataset(self.dataset or source_spec, *hints)
        return prompt_record(label_names, self.templates, self.classnames, name)


def prompt_texts(record: dict[str, Any]) -> list[tuple[int, str]]:
    """(label, prompt) for every class in every template, class by class."""
    return [
        (label, fill_template(template, name))
        for label, name in enumerate(record["class_names"])
        for template in record["template_list"]
    ]


def protocol_summary(record: dict[str, Any] | None) -> str:
    """One short label of a record, for tables: `clip/clip (cifar10)`, `simple/source`."""
    if not record:
        return "unrecorded"
    where = f" ({record['protocol_dataset']})" if record.get("protocol_dataset") else ""
    return f"{record['templates']}/{record['classnames']}{where}"
