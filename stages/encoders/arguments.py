"""The checked arguments of the Python API (`AlignedModel.encode_image`, `encode_text`,
`class_embeddings`, `classify`) and of the commands that take the same things: a bad one is an
`ArgumentError` (a ValueError) or `ArgumentTypeError` (a TypeError), both a `UserError` (one
line on the command line), naming the argument.

Images may be PIL images, file paths, numpy arrays (H, W, C) or torch tensors (C, H, W), uint8
0..255 or float 0..1; texts, class names and templates are lists of strings (one string where a
list belongs would be taken letter by letter, so it is refused).
"""

from __future__ import annotations

import string
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from store.errors import UserError

# what a missing value in a table becomes as text (NaN): not a class name ("none" may be one)
MISSING_VALUES = ("nan",)
ImageInput = Image.Image | str | Path | np.ndarray | torch.Tensor


class ArgumentError(UserError, ValueError):
    """A bad argument value given to the Python API (a ValueError) or a command (one line)."""


class ArgumentTypeError(UserError, TypeError):
    """An argument of the wrong type given to the Python API (a TypeError)."""


def string_list(value: Any, name: str, single: bool = False) -> list[str]:
    """A list of strings; `single`: one string is a list of one. Anything else is refused with
    the argument's name (a string where a list belongs would be taken letter by letter)."""
    if isinstance(value, str):
        if single:
            return [value]
        raise ArgumentTypeError(
            f"{name} must be a list of strings, not the string {value!r:.60} "
            f"(write [{value!r:.40}] for one)"
        )
    if value is None or not isinstance(value, Iterable) or isinstance(value, bytes | dict):
        raise ArgumentTypeError(f"{name} must be a list of strings, not {type(value).__name__}")
    items = list(value)
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise ArgumentTypeError(f"{name}[{i}] must be a string, not {type(item).__name__}")
    return items


def checked_class_names(value: Any, name: str = "class_names") -> list[str]:
    """Class names: at least one, none empty, none a missing-value marker (NaN), no two alike."""
    names = [c.strip() for c in string_list(value, name)]
    if not names:
        raise ArgumentError(f"{name}: give at least one class name, and no empty ones")
    for i, class_name in enumerate(names):
        if not class_name:
            raise ArgumentError(f"{name}[{i}] is empty: give at least one class name, and no "
                                "empty ones")  # fmt: skip
        if class_name.lower() in MISSING_VALUES:
            raise ArgumentError(f"{name}[{i}] is {class_name!r}, a missing value, not a class name")
    seen: dict[str, int] = {}
    for i, class_name in enumerate(names):
        if class_name in seen:
            raise ArgumentError(
                f"{name} holds {class_name!r} twice (positions {seen[class_name]} and {i}); "
                "each class once, or its probability is split between the copies"
            )
        seen[class_name] = i
    return names


def checked_templates(value: Any, name: str = "templates") -> list[str]:
    """Prompt templates: at least one, each with exactly one `{c}` (CLIP's and CLIP_benchmark's
    form) or `{}` for the class name."""
    templates = string_list(value, name)
    if not templates:
        raise ArgumentError(f"{name}: give at least one template, each with a {{c}} for the class")
    for i, template in enumerate(templates):
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
        except ValueError as err:  # an unmatched brace
            raise ArgumentError(f"{name}[{i}] {template!r} is not a template: {err}") from err
        if fields not in ([""], ["c"]):
            raise ArgumentError(
                f"{name}[{i}] {template!r} must hold exactly one {{c}} for the class name (and no "
                f"other braces; write {{{{ }}}} for a literal brace), it has {len(fields)} "
                f"field(s) {fields}"
            )
    return templates


def fill_template(template: str, class_name: str) -> str:
    """A checked template with the class name in its `{c}` (or `{}`)."""
    return template.format(class_name, c=class_name)


def clip_form(template: str) -> str:
    """A checked template in CLIP's form, its field `{c}` (what `template.format(c=name)`, as
    CLIP_benchmark fills them, takes); literal braces stay escaped."""
    parts = []
    for literal, field, _, _ in string.Formatter().parse(template):
        parts.append(literal.replace("{", "{{").replace("}", "}}"))
        if field is not None:
            parts.append("{c}")
    return "".join(parts)


def positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ArgumentTypeError(f"{name} must be an integer, not {type(value).__name__}")
    if value < 1:
        raise ArgumentError(f"{name} must be at least 1, not {value}")
    return int(value)


def image_list(images: Any) -> list[Any]:
    """One image or several: a PIL image, a path, an HWC numpy array or a CHW torch tensor, a
    list of those, or a batch (N, H, W, C) array / (N, C, H, W) tensor."""
    if images is None:
        raise ArgumentTypeError("images must be an image or a list of images, not None")
    if isinstance(images, np.ndarray | torch.Tensor):
        return list(images) if images.ndim == 4 else [images]
    if isinstance(images, Image.Image | str | Path):
        return [images]
    if not isinstance(images, Iterable) or isinstance(images, bytes | dict):
        raise ArgumentTypeError(
            f"images must be an image or a list of images, not {type(images).__name__}"
        )
    return list(images)


def missing_image_files(items: list[Any]) -> None:
    """Image paths that are not files, all named at once."""
    paths = [Path(x) for x in items if isinstance(x, str | Path)]
    folders = [str(p) for p in paths if p.is_dir()]
    if folders:
        raise ArgumentError(f"{folders[0]} is a directory, not an image file")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        shown = ", ".join(missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        raise ArgumentError(f"{len(missing)} image file(s) do not exist: {shown}")


# -- images as users hold them ---------------------------------------------------------------------
def checked_size(image: Image.Image, what: str) -> Image.Image:
    if image.width < 1 or image.height < 1:
        raise ArgumentError(f"{what} has no pixels ({image.width}x{image.height})")
    return image


def array_to_image(pixels: np.ndarray, what: str, channels_first: bool) -> Image.Image:
    """An HWC (numpy) or CHW (torch) array, uint8 0..255 or float 0..1, 1, 3 or 4 channels, or
    HW grayscale -> an RGB PIL image."""
    if pixels.ndim == 3 and channels_first:
        pixels = np.moveaxis(pixels, 0, -1)
    layout = "CHW" if channels_first else "HWC"
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    if pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[2] not in (3, 4)):
        shape = tuple(pixels.shape if not channels_first else np.moveaxis(pixels, -1, 0).shape)
        raise ArgumentError(
            f"{what} must be an image array of shape {layout} with 1, 3 or 4 channels "
            f"(or HW grayscale), not shape {shape}"
        )
    if pixels.shape[0] < 1 or pixels.shape[1] < 1:
        raise ArgumentError(f"{what} has no pixels ({pixels.shape[1]}x{pixels.shape[0]})")
    if pixels.dtype == np.uint8:
        values = pixels
    elif np.issubdtype(pixels.dtype, np.floating):
        if not np.isfinite(pixels).all():
            raise ArgumentError(f"{what} has NaN or infinite pixel values")
        if pixels.min() < 0 or pixels.max() > 1:
            raise ArgumentError(
                f"{what}: float pixel values must lie in 0..1 (uint8 arrays hold 0..255), "
                f"got {float(pixels.min()):g}..{float(pixels.max()):g}"
            )
        values = np.round(pixels.astype(np.float64) * 255).astype(np.uint8)
    elif pixels.dtype == np.bool_:
        values = pixels.astype(np.uint8) * 255
    else:
        raise ArgumentTypeError(
            f"{what}: pixels must be uint8 (0..255) or float (0..1), not {pixels.dtype}"
        )
    return Image.fromarray(np.ascontiguousarray(values)).convert("RGB")


def as_image(item: Any, what: str, open_file: Callable[[Path], Image.Image]) -> Image.Image:
    """One image as a user may hold it: a PIL image, a file path, a numpy array (HWC) or a torch
    tensor (CHW) -> a PIL image; anything else a UserError naming `what`."""
    if isinstance(item, Image.Image):
        return checked_size(item, what)
    if isinstance(item, str | Path):
        return checked_size(open_file(Path(item)), f"{what} ({item})")
    if isinstance(item, torch.Tensor):
        return array_to_image(item.detach().cpu().numpy(), what, channels_first=True)
    if isinstance(item, np.ndarray):
        return array_to_image(item, what, channels_first=False)
    raise ArgumentTypeError(
        f"{what} must be a PIL image, an image path, a numpy array (HWC) or a torch tensor "
        f"(CHW), not {type(item).__name__}"
    )
