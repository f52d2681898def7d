"""Images in and out of the server: uploads decoded under caps, and thumbnails of the images an
index records (by row number only: no path ever comes from a request).

A thumbnail is always re-encoded pixels (PNG) of an image PIL could decode, so no file's bytes
pass through unchanged: a recorded path that now holds something else (a text file, a key) is
a 404, not a leak. A recorded path that is, or passes through, a symbolic link is refused, as
is anything but a regular file; the last component is opened with O_NOFOLLOW, so a link swapped
in after the check is refused too.
"""

from __future__ import annotations

import io
import os
import stat
import warnings

from PIL import Image, UnidentifiedImageError

from stages.datasets import DIGITS_SCHEME, digit_image, sklearn_digits, to_rgb

THUMBNAIL_PX = 256  # the longest side of a thumbnail


class ImageProblem(ValueError):
    """An upload or a recorded image that cannot be used: the message is for the client."""


class NoImage(LookupError):
    """The index records no image that can be shown for this row: the message says why."""


def decode_upload(data: bytes, max_pixels: int, field: str = "image") -> Image.Image:
    """An uploaded file as an RGB image; anything else (empty, not an image, truncated, more
    than `max_pixels` pixels: a decompression bomb) is an ImageProblem."""
    if not data:
        raise ImageProblem(f"the upload `{field}` is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                if image.width * image.height > max_pixels:
                    raise ImageProblem(
                        f"the upload `{field}` has {image.width}x{image.height} pixels; the "
                        f"server takes at most {max_pixels:,}"
                    )
                image.load()
                rgb = to_rgb(image)
    except ImageProblem:
        raise
    except UnidentifiedImageError as err:
        raise ImageProblem(f"the upload `{field}` is not an image (no format PIL reads)") from err
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombWarning) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ImageProblem(f"the upload `{field}` is not an image PIL can read ({first})") from err
    if rgb.width < 1 or rgb.height < 1:
        raise ImageProblem(f"the upload `{field}` has no pixels")
    return rgb


def _digit(path: str) -> Image.Image:
    number = path[len(DIGITS_SCHEME) :]
    images = sklearn_digits().images
    if not number.isdigit() or int(number) >= len(images):
        raise NoImage(f"{path} is not one of scikit-learn's {len(images)} digits")
    return digit_image(images[int(number)])


def _read_recorded_file(path: str) -> bytes:
    """The bytes of the regular file at a recorded path that involves no symbolic link."""
    absolute = os.path.abspath(path)
    if os.path.realpath(absolute) != absolute:
        raise NoImage(f"{path} is, or passes through, a symbolic link: not served")
    try:
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
        fd = os.open(absolute, flags)  # NONBLOCK: a FIFO swapped in does not hang the request
    except OSError as err:  # gone, unreadable, or a link swapped in (ELOOP)
        raise NoImage(f"{path} cannot be opened ({err.strerror})") from err
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise NoImage(f"{path} is not a regular file")
        return handle.read()


def recorded_image(path: str, max_pixels: int) -> Image.Image:
    """The image at a path an index records: a file, or one of scikit-learn's digits."""
    if path.startswith(DIGITS_SCHEME):
        return _digit(path)
    if not path or "://" in path:  # torchvision://... and other in-memory sources
        raise NoImage(f"the index records no image file here ({path or 'no path'})")
    try:
        return decode_upload(_read_recorded_file(path), max_pixels, field=path)
    except ImageProblem as err:
        raise NoImage(f"{path} is no longer an image PIL can read") from err


def thumbnail_png(image: Image.Image, size: int = THUMBNAIL_PX) -> bytes:
    """A PNG at most `size` pixels on its longer side (small images are not enlarged: the page
    scales them up without smoothing)."""
    image = image.copy()
    image.thumbnail((size, size))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()
