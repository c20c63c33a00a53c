"""Access to H&E images of any size, and tissue detection.

Spatial transcriptomics comes with very different images: a 600 px Space Ranger PNG, a
10,000 px legacy-ST JPEG, a 100,000 px pyramidal whole-slide image. :func:`open_image` puts
them behind one small interface, :class:`SlideImage`, whose :meth:`~SlideImage.read_region`
takes level-0 coordinates and reads only what it needs:

* OpenSlide formats (``.svs``, ``.ndpi``, ``.mrxs``, ...) go through OpenSlide;
* TIFF (pyramidal or not) goes through tifffile's zarr store, which decodes only the tiles
  or strips a region touches, from the coarsest pyramid level that still gives the requested
  output resolution, so a whole-slide image is never loaded into memory;
* JPEG / PNG are decoded once with Pillow and the decoded image is kept (these formats cannot
  be read by region, and the files users bring in them are small enough); regions are
  resampled straight from it, and images open on the same unchanged file at the same time
  share that one decode.

Microns per pixel come from the file when it states them credibly (OpenSlide's mpp
properties, TIFF resolution tags, OME or Aperio descriptions), else from the caller. JPEG and
PNG density fields are ignored: they almost always hold a screen default (72 or 96 dpi), not
the scanner's resolution.

Tissue detection (:func:`tissue_mask`) thresholds colour saturation: glass is bright and grey
whatever its brightness or tint, while haematoxylin and eosin are saturated. The threshold is
Otsu's on the image given (normally a slide thumbnail), so slides with tinted glass or grey
backgrounds still separate; crops of that slide should reuse the slide's threshold
(:func:`tissue_threshold`) because a crop that is all tissue or all glass has no second class
for Otsu to find.
"""

from __future__ import annotations

import abc
import contextlib
import math
import re
import threading
import warnings
import weakref
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from stmdit.errors import InputFileError
from stmdit.stain import otsu_threshold

__all__ = [
    "OPENSLIDE_SUFFIXES",
    "SlideImage",
    "open_image",
    "saturation",
    "tissue_fraction",
    "tissue_fractions",
    "tissue_mask",
    "tissue_threshold",
    "unusable_reason",
]

OPENSLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".svslide", ".bif", ".vms", ".vmu")
TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8")
PIL_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")

# A pixel size outside this range is not a microscope's: TIFF writers put 72 or 300 dpi
# (352.8 or 84.7 um/px) in files that never saw a scanner.
_MPP_RANGE = (0.05, 20.0)

# Saturation below which a pixel is never tissue, whatever Otsu says: H&E stain, even pale
# stroma, is above it; clean glass (and black padding) is below.
_MIN_TISSUE_SATURATION = 0.07
# When the lower Otsu class is itself this saturated, the image holds no glass at all (a
# tile cut from inside tissue), and Otsu would only split stained tissue into two halves.
_NO_GLASS_CLASS_MEAN = 0.1

# Pillow's reducing_gap: large reductions first average whole pixel blocks (fast), then Lanczos
# over the remaining factor. A tile (the model's input) keeps a factor of at least 3 for
# Lanczos, indistinguishable from a fair Lanczos; a thumbnail (an overview, the slide's tissue
# threshold) reduces by blocks down to within 2x of its size, 5x faster on a 10,000 px slide.
_TILE_REDUCING_GAP = 3.0
_THUMBNAIL_REDUCING_GAP = 1.0


class SlideImage(abc.ABC):
    """A read-only image addressed in level-0 pixels.

    ``width`` and ``height`` are level-0 sizes; ``mpp`` is microns per level-0 pixel or None
    when neither the file nor the caller knows it (callers decide whether that is an error;
    the attribute may be set to override a wrong value from the file). Subclasses provide the
    pyramid levels and a reader for an in-bounds box of one level; everything else (padding,
    level choice, resampling) is shared.
    """

    path: Path
    mpp: float | None
    # Whether reads may run on several threads at once (pixels held in memory after the first read).
    concurrent_reads: bool = False

    def __init__(
        self, path: Path, size: tuple[int, int], level_sizes: list[tuple[int, int]], mpp: float | None
    ):
        self.path = path
        self.width, self.height = int(size[0]), int(size[1])
        self.level_sizes = level_sizes
        self.mpp = mpp

    def __repr__(self) -> str:
        mpp = f"{self.mpp:.4g} um/px" if self.mpp else "unknown pixel size"
        return f"{type(self).__name__}({str(self.path)!r}, {self.width}x{self.height}, {len(self.level_sizes)} levels, {mpp})"

    def __enter__(self) -> SlideImage:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:  # noqa: B027 (a no-op unless the backend keeps a file open)
        """Release the open file, where the backend keeps one (TIFF, OpenSlide)."""

    @abc.abstractmethod
    def _read_level(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """RGB uint8 pixels of ``[y0:y1, x0:x1]`` of ``level``; the box lies inside the level."""

    def level_downsample(self, level: int) -> tuple[float, float]:
        """Level-0 pixels per pixel of ``level`` along x and y."""
        w, h = self.level_sizes[level]
        return self.width / w, self.height / h

    def contains(self, x: float, y: float, w: float, h: float) -> bool:
        """Whether the box with top-left ``(x, y)`` and size ``w`` x ``h`` lies fully inside the image."""
        return x >= 0 and y >= 0 and x + w <= self.width and y + h <= self.height

    def read_region(self, x: float, y: float, w: float, h: float, out_size: int | None = None) -> np.ndarray:
        """Pixels of the level-0 box ``(x, y, w, h)`` as uint8 ``(H, W, 3)``.

        Coordinates may be fractional. Parts outside the image are white (255), as glass
        would be. With ``out_size`` the box is resampled (antialiased) to
        ``out_size`` x ``out_size``, read from the coarsest pyramid level whose resolution
        still suffices; without it the output has the box's level-0 size.
        """
        if w <= 0 or h <= 0:
            raise ValueError(f"{self.path}: region size must be positive; got {w} x {h}")
        if out_size is None:
            return self._read(x, y, w, h, max(1, round(w)), max(1, round(h)))
        if out_size <= 0:
            raise ValueError(f"{self.path}: out_size must be positive; got {out_size}")
        return self._read(x, y, w, h, int(out_size), int(out_size))

    def thumbnail(self, max_side: int) -> tuple[np.ndarray, float]:
        """The whole image with its longer side at most ``max_side`` px, and its scale
        (thumbnail pixels per level-0 pixel, at most 1)."""
        scale = min(1.0, max_side / max(self.width, self.height))
        out_w, out_h = max(1, round(self.width * scale)), max(1, round(self.height * scale))
        whole = self._read(0, 0, self.width, self.height, out_w, out_h, _THUMBNAIL_REDUCING_GAP)
        return whole, out_w / self.width

    def choose_level(self, downsample: float) -> int:
        """The coarsest level with at most ``downsample`` level-0 pixels per pixel (1 % slack,
        since level sizes are rounded)."""
        factors = [max(self.level_downsample(level)) for level in range(len(self.level_sizes))]
        usable = [level for level, f in enumerate(factors) if f <= downsample * 1.01]
        return max(usable, key=lambda level: factors[level], default=0)

    def _level_image(self, level: int) -> Image.Image | None:
        """The whole of ``level`` as a Pillow image when the backend holds it in memory (regions
        are then resampled from it in place, without first copying them out), else None."""
        return None

    def _read(
        self,
        x: float,
        y: float,
        w: float,
        h: float,
        out_w: int,
        out_h: int,
        reducing_gap: float = _TILE_REDUCING_GAP,
    ) -> np.ndarray:
        level = self.choose_level(min(w / out_w, h / out_h))
        dx, dy = self.level_downsample(level)
        lx0, ly0, lx1, ly1 = x / dx, y / dy, (x + w) / dx, (y + h) / dy
        exact = (
            level == 0
            and (out_w, out_h) == (round(w), round(h))
            and all(float(v).is_integer() for v in (x, y, w, h))
        )
        if exact:  # a copy: the backend may hand out a view of its cached pixels
            return np.array(self._read_padded(level, int(x), int(y), int(x + w), int(y + h)))
        lw, lh = self.level_sizes[level]
        whole = self._level_image(level)
        if whole is not None and lx0 >= 0 and ly0 >= 0 and lx1 <= lw and ly1 <= lh:
            # Pillow's filters stop at the image's edges, as they do at a patch cut below.
            resized = whole.resize(
                (out_w, out_h), Image.Resampling.LANCZOS, box=(lx0, ly0, lx1, ly1), reducing_gap=reducing_gap
            )
            return np.array(resized)
        # Resampling filters reach a few source pixels past the box: read a margin of real
        # pixels (never of padding) so that edges are computed from their true neighbours.
        margin = math.ceil(3 * max(1.0, (lx1 - lx0) / out_w, (ly1 - ly0) / out_h)) + 1
        ix0 = min(math.floor(lx0), max(math.floor(lx0) - margin, 0))
        iy0 = min(math.floor(ly0), max(math.floor(ly0) - margin, 0))
        ix1 = max(math.ceil(lx1), min(math.ceil(lx1) + margin, lw))
        iy1 = max(math.ceil(ly1), min(math.ceil(ly1) + margin, lh))
        patch = self._read_padded(level, ix0, iy0, ix1, iy1)
        box = (lx0 - ix0, ly0 - iy0, lx1 - ix0, ly1 - iy0)
        resized = Image.fromarray(patch).resize(
            (out_w, out_h), Image.Resampling.LANCZOS, box=box, reducing_gap=reducing_gap
        )
        return np.array(resized)

    def _read_padded(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        lw, lh = self.level_sizes[level]
        if x0 >= 0 and y0 >= 0 and x1 <= lw and y1 <= lh:
            return self._read_level(level, x0, y0, x1, y1)
        out = np.full((y1 - y0, x1 - x0, 3), 255, dtype=np.uint8)
        cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, lw), min(y1, lh)
        if cx0 < cx1 and cy0 < cy1:
            out[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0] = self._read_level(level, cx0, cy0, cx1, cy1)
        return out


class _Decoded:
    """The decoded pixels of one image file (RGB), shared by every image open on it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.image: Image.Image | None = None


# Decodes in use, by (file, modification time, size): while one image of a file is open (say
# prepare's tiler), another opened on it (the reader's scanpy thumbnail) waits for and reuses
# its decode instead of decoding the file again. Entries go when their last image does.
_DECODED: weakref.WeakValueDictionary[tuple, _Decoded] = weakref.WeakValueDictionary()
_DECODED_LOCK = threading.Lock()


def _shared_decode(path: Path) -> _Decoded:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    with _DECODED_LOCK:
        decoded = _DECODED.get(key)
        if decoded is None:
            decoded = _DECODED[key] = _Decoded()
    return decoded


class _ArrayImage(SlideImage):
    """JPEG / PNG: decoded on the first read, then kept in memory (opening only reads the
    header, so a reader that just checks sizes does not pay for a 100-megapixel decode).
    The decoded Pillow image is kept as it is: converting it to an array would copy it whole,
    while Pillow crops and resamples regions of it directly (and releases the GIL doing so)."""

    concurrent_reads = True

    def __init__(self, path: Path, mpp: float | None):
        with _decode_errors_name(path), _allow_large_images(), Image.open(path) as im:
            w, h = im.size
        self._decoded = _shared_decode(path)
        super().__init__(path, (w, h), [(w, h)], mpp)

    def _level_image(self, level: int) -> Image.Image:
        decoded = self._decoded
        with decoded.lock:
            if decoded.image is None:
                with _decode_errors_name(self.path), _allow_large_images(), Image.open(self.path) as im:
                    decoded.image = _rgb_image(im)
        return decoded.image

    def _read_level(self, level, x0, y0, x1, y1):
        return np.asarray(self._level_image(level).crop((x0, y0, x1, y1)))


class _TiffImage(SlideImage):
    """TIFF through tifffile's zarr store: only the touched tiles/strips are decoded."""

    def __init__(self, path: Path, mpp: float | None):
        import tifffile

        with _decode_errors_name(path):
            self._tif = tifffile.TiffFile(path)
        series = self._series = self._tif.series[0]
        self._axes = series.axes
        if not (set("YX") <= set(self._axes)):
            raise ValueError(
                f"{path}: the first image series has axes {self._axes!r}; expected a 2-D image (Y, X)"
            )
        x_axis, y_axis = self._axes.index("X"), self._axes.index("Y")
        sizes = [(lv.shape[x_axis], lv.shape[y_axis]) for lv in series.levels]
        self._arrays: dict[int, object] = {}
        file_mpp = _tiff_mpp(series.levels[0].keyframe)
        super().__init__(path, sizes[0], sizes, _pick_mpp(path, file_mpp, mpp))

    def _array(self, level: int):
        if level not in self._arrays:
            import zarr

            self._arrays[level] = zarr.open(self._series.aszarr(level=level), mode="r")
        return self._arrays[level]

    def _read_level(self, level, x0, y0, x1, y1):
        index = []
        for ax in self._axes:
            index.append(slice(y0, y1) if ax == "Y" else slice(x0, x1) if ax == "X" else slice(None))
        try:
            block = np.asarray(self._array(level)[tuple(index)])
        except ValueError as err:  # e.g. JPEG-compressed tiles without imagecodecs
            raise RuntimeError(
                f"{self.path}: cannot decode its tiles ({err}); `pip install imagecodecs` (or, for a tiled "
                "pyramid, open it with backend='openslide')"
            ) from err
        # Bring the array to (Y, X, samples) whatever the order of the file's axes.
        kept = [ax for ax in self._axes if ax in "YXSC"]
        extra = [i for i, ax in enumerate(self._axes) if ax not in "YXSC"]
        if extra:
            block = block[tuple(0 if i in extra else slice(None) for i in range(block.ndim))]
        order = [kept.index("Y"), kept.index("X")] + [i for i, ax in enumerate(kept) if ax in "SC"]
        block = np.transpose(block, order)
        if block.ndim == 2:
            block = block[..., None]
        return _samples_to_rgb(block, self.path)

    def close(self) -> None:
        self._tif.close()


class _OpenSlideImage(SlideImage):
    """Vendor whole-slide formats through OpenSlide."""

    def __init__(self, path: Path, mpp: float | None):
        try:
            import openslide
        except (ImportError, OSError) as err:  # OSError: the Python package without the library
            raise ImportError(
                f"reading {path} needs OpenSlide: `pip install openslide-python openslide-bin`"
            ) from err
        self._slide = openslide.OpenSlide(str(path))
        props = self._slide.properties
        try:
            values = [float(props[k]) for k in (openslide.PROPERTY_NAME_MPP_X, openslide.PROPERTY_NAME_MPP_Y)]
            file_mpp = _plausible_mpp(sum(values) / 2)
        except (KeyError, ValueError):
            file_mpp = None
        sizes = [tuple(map(int, s)) for s in self._slide.level_dimensions]
        super().__init__(path, sizes[0], sizes, _pick_mpp(path, file_mpp, mpp))

    def _read_level(self, level, x0, y0, x1, y1):
        dx, dy = self.level_downsample(level)
        # OpenSlide takes the top-left in level-0 coordinates and the size in level pixels.
        region = self._slide.read_region((round(x0 * dx), round(y0 * dy)), level, (x1 - x0, y1 - y0))
        return _to_rgb(region)

    def close(self) -> None:
        self._slide.close()


def open_image(path: str | Path, mpp: float | None = None, backend: str | None = None) -> SlideImage:
    """Open an image for region reads.

    ``backend`` (``"openslide"``, ``"tifffile"`` or ``"pil"``) overrides the choice by file
    suffix, e.g. to read a JPEG-compressed generic TIFF with OpenSlide. ``mpp`` is used when
    the file states no credible pixel size.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} does not exist")
    suffix = path.suffix.lower()
    if backend is None:
        if suffix in OPENSLIDE_SUFFIXES:
            backend = "openslide"
        elif suffix in TIFF_SUFFIXES:
            backend = "tifffile"
        elif suffix in PIL_SUFFIXES:
            backend = "pil"
        else:
            raise ValueError(
                f"{path}: unsupported image type {suffix!r}; expected one of "
                f"{sorted(OPENSLIDE_SUFFIXES + TIFF_SUFFIXES + PIL_SUFFIXES)}"
            )
    if backend == "openslide":
        return _OpenSlideImage(path, mpp)
    if backend == "tifffile":
        return _TiffImage(path, mpp)
    if backend == "pil":
        return _ArrayImage(path, mpp)
    raise ValueError(f"unknown image backend {backend!r}; use 'openslide', 'tifffile' or 'pil'")


@contextlib.contextmanager
def _decode_errors_name(path: Path) -> Iterator[None]:
    """Decoders' errors ("image file is truncated", "not a TIFF file") do not say which file;
    this names it. (SyntaxError: what Pillow raises for some malformed headers.)"""
    try:
        yield
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        if isinstance(err, InputFileError):
            raise
        raise InputFileError(path, f"cannot decode it as an image ({type(err).__name__}: {err})") from err


@contextlib.contextmanager
def _allow_large_images() -> Iterator[None]:
    """Lift Pillow's decompression-bomb limit while decoding a file the user chose: a legacy
    ST full-resolution JPEG (e.g. 20,000 px square) is legitimately above it."""
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def _rgb_image(im: Image.Image) -> Image.Image:
    """The image decoded, in RGB; transparency is composited onto white (transparent = no tissue)."""
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = np.asarray(im.convert("RGBA"), dtype=np.float32)
        alpha = rgba[..., 3:] / 255.0
        return Image.fromarray((rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)).round().astype(np.uint8))
    im.load()
    return im if im.mode == "RGB" else im.convert("RGB")  # convert() would copy an RGB image


def _to_rgb(im: Image.Image) -> np.ndarray:
    """RGB uint8 array (see :func:`_rgb_image`)."""
    return np.asarray(_rgb_image(im))


def _samples_to_rgb(block: np.ndarray, path: Path) -> np.ndarray:
    if block.dtype == np.uint16:
        block = (block // 257).astype(np.uint8)
    elif block.dtype != np.uint8:
        raise ValueError(f"{path}: pixel type {block.dtype} is not supported; expected 8- or 16-bit RGB")
    n = block.shape[-1]
    if n == 1:
        return np.repeat(block, 3, axis=-1)
    if n == 4:
        alpha = block[..., 3:].astype(np.float32) / 255.0
        return (block[..., :3] * alpha + 255.0 * (1.0 - alpha)).round().astype(np.uint8)
    if n == 3:
        return np.ascontiguousarray(block)
    raise ValueError(f"{path}: {n} samples per pixel; expected RGB, RGBA or greyscale")


def _plausible_mpp(value: float | None) -> float | None:
    if value is None or not math.isfinite(value) or not (_MPP_RANGE[0] <= value <= _MPP_RANGE[1]):
        return None
    return float(value)


def _tiff_mpp(page) -> float | None:
    """Microns per pixel from an Aperio or OME description, else the resolution tags."""
    description = page.description or ""
    match = re.search(r"\bMPP\s*=\s*([0-9.eE+-]+)", description)
    if match:
        return _plausible_mpp(float(match.group(1)))
    match = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', description)
    if match:
        unit = re.search(r'PhysicalSizeXUnit="([^"]+)"', description)
        factor = {"nm": 1e-3, "mm": 1e3, "cm": 1e4}.get(unit.group(1) if unit else "µm", 1.0)
        return _plausible_mpp(float(match.group(1)) * factor)
    tags = page.tags
    if "XResolution" not in tags or "ResolutionUnit" not in tags:
        return None
    unit = int(tags["ResolutionUnit"].value)
    microns_per_unit = {2: 25400.0, 3: 10000.0}.get(unit)  # 1 = no unit: meaningless
    if microns_per_unit is None:
        return None
    num, den = tags["XResolution"].value
    if num <= 0 or den <= 0:
        return None
    return _plausible_mpp(microns_per_unit / (num / den))


def _pick_mpp(path: Path, file_mpp: float | None, given: float | None) -> float | None:
    if given is not None and (not math.isfinite(given) or given <= 0):
        raise ValueError(f"{path}: mpp must be a positive number of microns per pixel; got {given}")
    if file_mpp is None:
        return given
    if given is not None and abs(given - file_mpp) > 0.1 * file_mpp:
        warnings.warn(
            f"{path}: the file states {file_mpp:.4g} um/px but mpp={given:.4g} was given; using the file's "
            "value (set SlideImage.mpp to override)",
            stacklevel=3,
        )
    return file_mpp


# ---------------------------------------------------------------------------------------------
# Tissue detection


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation in [0, 1]; black pixels count as unsaturated."""
    rgb = np.asarray(rgb)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    # Extremes first, in the pixels' own type (a third of the values to convert to float), and
    # element-wise over the channels: numpy's max over a length-3 axis is 10x slower.
    hi, lo = np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)
    hi, spread = hi.astype(np.float32), (hi - lo).astype(np.float32)
    return np.divide(spread, hi, out=np.zeros_like(hi), where=hi > 0)


def _otsu(values: np.ndarray, bins: int = 256) -> tuple[float, float]:
    """Otsu's threshold on values in [0, 1] (:func:`stmdit.stain.otsu_threshold`), and the mean
    of the histogram class at or below it."""
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    centres = (edges[:-1] + edges[1:]) / 2
    t = otsu_threshold(values, bins=bins, value_range=(0.0, 1.0))
    t = t if np.isfinite(t) else float(centres[0])  # one populated bin: nothing to split
    below = centres <= t
    return t, float((hist[below] * centres[below]).sum() / max(hist[below].sum(), 1))


def tissue_threshold(rgb: np.ndarray) -> float:
    """The saturation above which a pixel of this image is tissue.

    Otsu's threshold on the saturation histogram, never below a floor that clean glass stays
    under. When the lower Otsu class is itself stained (no glass in the image), the floor is
    used instead, so an all-tissue tile is not split into two halves.
    """
    s = saturation(rgb)
    if s.size == 0:
        return _MIN_TISSUE_SATURATION
    t, mean_lo = _otsu(s.ravel())
    if mean_lo >= _NO_GLASS_CLASS_MEAN:
        return _MIN_TISSUE_SATURATION
    return max(t, _MIN_TISSUE_SATURATION)


def tissue_mask(
    rgb: np.ndarray, threshold: float | None = None, min_object_fraction: float = 1e-4
) -> np.ndarray:
    """Boolean (H, W) mask of tissue in an RGB image (normally a slide thumbnail).

    Saturation is median-filtered (3 x 3) against JPEG and sensor noise, thresholded
    (``threshold``, default :func:`tissue_threshold` of this image), opened and closed with a
    3 x 3 element to drop isolated pixels and bridge one-pixel gaps, and components smaller
    than ``min_object_fraction`` of the image (at least 4 px) are removed as dust and debris.
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[-1] < 3:
        raise ValueError(f"tissue_mask expects an (H, W, 3) RGB array; got shape {rgb.shape}")
    if threshold is None:
        threshold = tissue_threshold(rgb)
    return _tissue_masks(rgb[None], threshold, min_object_fraction)[0]


def tissue_fraction(rgb: np.ndarray, threshold: float | None = None) -> float:
    """Fraction of the image's pixels that are tissue (see :func:`tissue_mask`)."""
    mask = tissue_mask(rgb, threshold)
    return float(mask.mean()) if mask.size else 0.0


def tissue_fractions(rgbs: np.ndarray, threshold: float) -> np.ndarray:
    """:func:`tissue_fraction` of each image of an (N, H, W, 3) stack, against one threshold
    (a slide's), computed for the whole stack at once (tiles are small: per-call overheads
    would cost more than the pixels)."""
    rgbs = np.asarray(rgbs)
    if rgbs.ndim != 4 or rgbs.shape[-1] < 3:
        raise ValueError(f"tissue_fractions expects an (N, H, W, 3) RGB stack; got shape {rgbs.shape}")
    if rgbs[0, ..., 0].size == 0:
        return np.zeros(len(rgbs))
    return _tissue_masks(rgbs, threshold).mean(axis=(1, 2))


def _per_image(element: np.ndarray) -> np.ndarray:
    """A 2-D structuring element for a stack of images: flat along the stack's axis."""
    return np.stack([np.zeros_like(element), element, np.zeros_like(element)])


def _tissue_masks(rgbs: np.ndarray, threshold: float, min_object_fraction: float = 1e-4) -> np.ndarray:
    """:func:`tissue_mask` of each image of an (N, H, W, 3) stack: every filter works within
    one image (its structuring element is flat along the first axis)."""
    mask = saturation(rgbs) > threshold
    if min(mask.shape[1:]) < 3:
        return mask
    # The 3 x 3 median is above the threshold where at least 5 of the 9 values are: the same
    # mask as thresholding the median-filtered saturation (scipy's reflected edges alike),
    # from an integer count, 3x faster.
    square = np.ones((3, 3), np.uint8)
    mask = ndimage.correlate(mask.astype(np.uint8), _per_image(square), mode="reflect") >= 5
    # Edge padding, so that tissue running off the image edge is not eroded there.
    padded = np.pad(mask, ((0, 0), (1, 1), (1, 1)), mode="edge")
    mask = ndimage.binary_closing(ndimage.binary_opening(padded, _per_image(square)), _per_image(square))[
        :, 1:-1, 1:-1
    ]
    labels, n = ndimage.label(mask, _per_image(ndimage.generate_binary_structure(2, 1)))
    if n:
        sizes = np.bincount(labels.ravel())
        min_size = max(4, int(min_object_fraction * mask[0].size))
        keep = sizes >= min_size
        keep[0] = False
        mask = keep[labels]
    return mask


def unusable_reason(rgb: np.ndarray) -> str | None:
    """Why an image cannot be an H&E image of tissue (all black, one colour, no tissue), or
    None when it looks usable. Space Ranger writes an all-black placeholder PNG when it had
    no image to downscale; such a file must not be mistaken for a section."""
    rgb = np.asarray(rgb)[..., :3]
    if rgb.size == 0:
        return "the image is empty"
    grey = rgb.mean(axis=-1)
    if (grey < 10).mean() > 0.99:
        return "the image is all black"
    spread = float(rgb.reshape(-1, 3).astype(np.float32).std(axis=0).max())
    if spread < 2.0:
        colour = tuple(int(v) for v in np.median(rgb.reshape(-1, 3), axis=0))
        return f"the image is a single colour {colour}"
    if not tissue_mask(rgb).any():
        return "no tissue was detected in the image"
    return None
