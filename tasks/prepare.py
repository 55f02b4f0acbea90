"""Preparation: source images and masks become exactly what the model accepts, in memory.

Users hold phone JPEGs rotated by EXIF, CMYK product shots, palette and 16-bit PNGs,
6000x4000 photos and masks painted black-and-white in an editor. Instead of refusing them,
every source is turned into what the model's rules (`input_rules`, from the registry) ask
for: EXIF orientation applied, mode converted, made square by crop or pad where the model
needs it, resized to the requested size where the model needs it, encoded in an accepted
format under the byte limit. A mask goes through exactly the same geometry as the first
image, so the two stay aligned pixel for pixel.

Validation calls `resolve_source` and `inspect_source` (one full decode per file, with the
decompression-bomb guard), `square_plan` and `check_mask_shape`, so anything preparation
could not do is an invalid row before anything is sent. The dispatcher calls
`prepare_inputs` just before sending; it re-reads the files, refuses ones that changed
since validation, and holds at most one decoded bitmap per file while it works.
"""

from __future__ import annotations

import io
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, ImageCms, ImageColor, UnidentifiedImageError

from imagebatch.configs.registry import ModelSpec, parse_size
from imagebatch.tasks.errors import OutputError
from imagebatch.tasks.files import file_sha256, sha256_hex, write_atomic

if TYPE_CHECKING:
    from imagebatch.tasks.validate import ValidJob

FITS = ("crop", "pad", "error")
REPAINT = ("white", "black")
PIL_FORMATS = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp", "MPO": "jpeg"}
MIME = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}
PREPARED_DIR = "prepared"
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
ORIENTATION_TAG = 0x0112
# EXIF orientation -> (Pillow transpose, what it means to a person).
ORIENTATIONS: dict[int, tuple[Image.Transpose, str]] = {
    2: (Image.Transpose.FLIP_LEFT_RIGHT, "mirrored"),
    3: (Image.Transpose.ROTATE_180, "rotated 180"),
    4: (Image.Transpose.FLIP_TOP_BOTTOM, "flipped vertically"),
    5: (Image.Transpose.TRANSPOSE, "rotated 90 and mirrored"),
    6: (Image.Transpose.ROTATE_270, "rotated 90"),
    7: (Image.Transpose.TRANSVERSE, "rotated 270 and mirrored"),
    8: (Image.Transpose.ROTATE_90, "rotated 270"),
}
# Decoded bitmaps alive at once: a 6000x4000 photo is ~100 MB decoded, so preparations
# queue here rather than all run together when many requests are in flight.
_SLOTS = threading.BoundedSemaphore(2)


class SourceError(ValueError):
    """A source image or mask that cannot be used; the message names the file and the rule."""


@dataclass(frozen=True)
class SourceImage:
    """A source file as validation found it: fully decoded once, never kept decoded."""

    path: Path
    sha256: str
    format: str  # png / jpeg / webp / tiff / ... (lower case)
    width: int  # as stored
    height: int
    size_bytes: int
    mode: str = "RGB"
    orientation: int = 1  # EXIF orientation, 1 = as stored
    has_alpha: bool = False

    @property
    def display_size(self) -> tuple[int, int]:
        """The size a person sees: EXIF orientations 5-8 swap width and height."""
        if self.orientation in (5, 6, 7, 8):
            return self.height, self.width
        return self.width, self.height


@dataclass(frozen=True)
class InputRules:
    """What one model accepts as source images for one operation (data from the registry)."""

    formats: tuple[str, ...]
    modes: tuple[str, ...]
    square: bool
    max_bytes: int  # each file must be strictly smaller
    mask_max_bytes: int
    resize_to_size: bool
    max_images: int


def input_rules(model: ModelSpec, operation: str) -> InputRules:
    return InputRules(
        formats=model.edit_image_formats,
        modes=(model.edit_image_modes if operation == "edit" else ()) or ("RGB", "RGBA"),
        square=model.edit_square_png,
        max_bytes=model.edit_image_max_bytes,
        mask_max_bytes=model.mask_max_bytes,
        resize_to_size=model.input_resize_to_size,
        max_images=1 if operation == "variation" else model.edit_images_max,
    )


@dataclass(frozen=True)
class PrepOptions:
    """How to prepare one row's inputs; every field changes the bytes sent, so all are in the key."""

    fit: str  # crop | pad | error (used only where the model needs a square)
    pad_color: str = "white"  # a colour name, #rrggbb, or "transparent"
    mask_repaint: str = "white"  # in a black-and-white mask, this colour means "repaint here"
    size: str = ""  # the requested output size; inputs are resized to it where the model needs

    def key(self) -> dict[str, str]:
        return {
            "fit": self.fit,
            "pad": self.pad_color.lower(),
            "repaint": self.mask_repaint,
            "size": self.size,
        }


@dataclass(frozen=True)
class PreparedFile:
    name: str  # the file name sent in the multipart part
    data: bytes = field(repr=False)
    mime: str
    sha256: str
    width: int
    height: int


@dataclass(frozen=True)
class PreparedInputs:
    images: list[PreparedFile]
    mask: PreparedFile | None
    description: str  # what preparation did, for the manifest


# ---------------------------------------------------------------- validation helpers


def resolve_source(raw: str, base_dir: Path, root: Path | None, allow_outside: bool) -> Path:
    """The file a row names. Relative paths resolve against `root` (default: the jobs file's
    folder); the resolved file, symlinks followed, must stay inside it unless allowed."""
    if raw.startswith(("http://", "https://", "data:")):
        raise SourceError(f"{raw[:60]!r}: only local file paths are supported as source images")
    folder = (root or base_dir).expanduser()
    path = Path(raw).expanduser()
    if not path.is_absolute():
        path = folder / path
    resolved = path.resolve()
    if not allow_outside and not resolved.is_relative_to(folder.resolve()):
        raise SourceError(
            f"{raw!r} resolves to {resolved}, outside {folder.resolve()}; sources must stay "
            "inside the jobs file's folder (set [inputs] sources_root or allow_outside_sources "
            "to allow it)"
        )
    if not resolved.is_file():
        raise SourceError(f"file not found: {path}")
    return resolved


def inspect_source(path: Path, max_pixels: int) -> SourceImage:
    """Read and fully decode `path` once: a truncated file or a decompression bomb is an error."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SourceError(f"{path.name} cannot be read: {exc.strerror or exc}") from None
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise SourceError(
                    f"{path.name} is {width}x{height} ({width * height:,} pixels), over the "
                    f"decompression-bomb guard of {max_pixels:,} pixels ([inputs] max_source_pixels)"
                )
            fmt = PIL_FORMATS.get(img.format or "", (img.format or "unknown").lower())
            orientation = int(img.getexif().get(ORIENTATION_TAG, 1) or 1)
            mode = img.mode
            has_alpha = mode in ALPHA_MODES or "transparency" in img.info
            img.load()
    except Image.DecompressionBombError as exc:
        raise SourceError(f"{path.name}: decompression-bomb guard: {exc}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise SourceError(
            f"{path.name} is not a readable image (truncated or corrupt): {exc}"
        ) from None
    sha = sha256_hex(data)
    return SourceImage(
        path,
        sha,
        fmt,
        width,
        height,
        len(data),
        mode,
        orientation if orientation in ORIENTATIONS else 1,
        has_alpha,
    )


def square_plan(width: int, height: int, fit: str) -> tuple[str, tuple[int, ...]] | None:
    """How to make WxH square: ("crop", box) centred, ("pad", (side, x, y)), or None if square."""
    if width == height:
        return None
    if fit == "crop":
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        return "crop", (left, top, left + side, top + side)
    if fit == "pad":
        side = max(width, height)
        return "pad", (side, (side - width) // 2, (side - height) // 2)
    raise SourceError(
        f"the image is {width}x{height} and the model needs a square; fit is 'error' "
        "(use crop or pad to have it made square)"
    )


def check_mask_shape(mask: SourceImage, image: SourceImage) -> str:
    """How the mask lines up with its image: 'same', 'stored' (drawn on the un-rotated
    pixels, so it takes the image's rotation) or 'scaled' (same shape, other resolution)."""
    mw, mh = mask.display_size
    iw, ih = image.display_size
    if (mw, mh) == (iw, ih):
        return "same"
    if image.orientation != 1 and (mw, mh) == (image.width, image.height):
        return "stored"
    if abs(mw * ih - mh * iw) <= max(iw, ih, mw, mh):  # same aspect ratio, within a pixel
        return "scaled"
    raise SourceError(
        f"the mask is {mw}x{mh} but the image is {iw}x{ih} (as displayed); their shapes "
        "cannot be matched"
    )


def check_pad_color(value: str) -> None:
    if value.lower() == "transparent":
        return
    try:
        ImageColor.getrgb(value)
    except ValueError:
        raise SourceError(
            f"pad colour {value!r} is not a colour (use a name, #rrggbb or transparent)"
        ) from None


# ---------------------------------------------------------------- preparation


def human_bytes(n: int) -> str:
    if n >= 1_000_000:
        return f"{n / 1_000_000:.1f} MB"
    return f"{max(1, round(n / 1000))} KB"


def _open(src: SourceImage, draft: tuple[int, int] | None = None) -> Image.Image:
    """Decode `src` again, refusing a file that changed since validation checked it."""
    data = src.path.read_bytes()
    if sha256_hex(data) != src.sha256:
        raise SourceError(f"{src.path.name} changed after it was checked; run again")
    img = Image.open(io.BytesIO(data))
    if draft is not None and img.format == "JPEG":
        img.draft(img.mode, draft)  # decode at 1/2, 1/4 or 1/8 scale: less memory and time
    img.load()
    return img


def _orient(img: Image.Image, orientation: int, steps: list[str] | None) -> Image.Image:
    if orientation not in ORIENTATIONS:
        return img
    method, words = ORIENTATIONS[orientation]
    if steps is not None:
        steps.append(words)
    return img.transpose(method)


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit and float greyscale scaled (not clipped) to 8 bits."""
    if img.mode == "F":
        return img.point(lambda v: v * 255).convert("L")
    return img.convert("I").point(lambda v: v * (1 / 257) + 0.5).convert("L")


MODE_LABELS = {
    "P": "palette",
    "PA": "palette+alpha",
    "1": "1-bit",
    "L": "grey",
    "LA": "grey+alpha",
    "I;16": "16-bit grey",
    "I;16B": "16-bit grey",
    "I;16L": "16-bit grey",
    "I": "32-bit grey",
    "F": "float grey",
}


def _cmyk_to_rgb(img: Image.Image) -> tuple[Image.Image, bool]:
    """CMYK through its embedded ICC profile when it has one (print colours stay right)."""
    icc = img.info.get("icc_profile")
    if icc:
        try:
            out = ImageCms.profileToProfile(
                img,
                ImageCms.ImageCmsProfile(io.BytesIO(icc)),
                ImageCms.createProfile("sRGB"),
                outputMode="RGB",
            )
            if out is not None:
                return out, True
        except (ImageCms.PyCMSError, OSError):
            pass
    return img.convert("RGB"), False


def _normalize(
    img: Image.Image, modes: tuple[str, ...], need_alpha: bool, steps: list[str]
) -> Image.Image:
    """Any mode becomes RGB or RGBA (RGBA where the source has alpha or the model needs it)."""
    source_mode = img.mode
    note = ""
    if source_mode == "CMYK":
        img, used_icc = _cmyk_to_rgb(img)
        note = " (ICC profile)" if used_icc else ""
    elif source_mode.startswith("I") or source_mode == "F":
        img = _to_8bit(img)
    has_alpha = img.mode in ALPHA_MODES or "transparency" in img.info
    target = "RGBA" if (has_alpha or need_alpha or "RGB" not in modes) else "RGB"
    if img.mode != target:
        img = img.convert(target)
    if source_mode != target:
        steps.append(f"{MODE_LABELS.get(source_mode, source_mode)} -> {target}{note}")
    return img


def _pad_fill(color: str, mode: str) -> tuple[int, ...]:
    if color.lower() == "transparent":
        return (0, 0, 0, 0)
    rgb = ImageColor.getrgb(color)[:3]
    return (*rgb, 255) if mode == "RGBA" else rgb


def _apply(img: Image.Image, ops: list[tuple], *, mask: bool, pad_color: str = "") -> Image.Image:
    """Replay geometry ops. A mask (mode L, its alpha) is resized with NEAREST so its edge
    stays hard, and its padding is "keep" (255), or "repaint" (0) when the padding is
    transparent: then the model is asked to fill it in."""
    for op, arg in ops:
        if op == "crop":
            img = img.crop(arg)
        elif op == "pad":
            side, x, y = arg
            transparent = pad_color.lower() == "transparent"
            if mask:
                fill: int | tuple[int, ...] = 0 if transparent else 255
            else:
                fill = _pad_fill(pad_color, img.mode)
            canvas = Image.new(img.mode, (side, side), fill)
            canvas.paste(img, (x, y))
            img = canvas
        elif op == "resize" and img.size != arg:
            method = Image.Resampling.NEAREST if mask else Image.Resampling.LANCZOS
            img = img.resize(arg, method, reducing_gap=None if mask else 3.0)
    return img


def _encode(img: Image.Image, fmt: str, level: int = 6) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpeg":
        img.save(buf, "JPEG", quality=95)
    elif fmt == "webp":
        img.save(buf, "WEBP", quality=95)
    else:
        img.save(buf, "PNG", compress_level=level)
    return buf.getvalue()


def _geometry(
    size: tuple[int, int], rules: InputRules, options: PrepOptions, steps: list[str]
) -> list[tuple]:
    """Crop/pad to square (where needed) and resize to the requested size (where needed)."""
    ops: list[tuple] = []
    w, h = size
    plan = square_plan(w, h, options.fit) if rules.square else None
    if plan is not None:
        op = plan[0]
        ops.append(plan)
        side = min(w, h) if op == "crop" else max(w, h)
        how = "cropped" if op == "crop" else f"padded ({options.pad_color.lower()})"
        steps.append(f"{how} {w}x{h} -> {side}x{side}")
        w = h = side
    target = parse_size(options.size) if rules.resize_to_size else None
    if target is not None and target != (w, h):
        ops.append(("resize", target))
        steps.append(f"resized to {target[0]}x{target[1]}")
    return ops


def _draft_size(
    src: SourceImage, rules: InputRules, options: PrepOptions
) -> tuple[int, int] | None:
    """For a JPEG that will be shrunk a lot: the smallest stored size that still covers the target."""
    target = parse_size(options.size) if rules.resize_to_size else None
    if target is None or src.format != "jpeg":
        return None
    w, h = src.display_size
    side = (max(w, h) if options.fit == "pad" else min(w, h)) if rules.square else min(w, h)
    factor = max(target) / side
    if factor > 0.5:
        return None
    return math.ceil(src.width * factor), math.ceil(src.height * factor)


def _output_format(src: SourceImage, mode: str, rules: InputRules) -> str:
    if src.format in rules.formats and not (src.format == "jpeg" and mode == "RGBA"):
        return src.format if src.format != "webp" else ("png" if "png" in rules.formats else "webp")
    return "png" if "png" in rules.formats else rules.formats[0]


def _squeeze(
    img: Image.Image, fmt: str, rules: InputRules, ops: list[tuple], steps: list[str]
) -> tuple[bytes, str, Image.Image]:
    """Encode under the byte limit: PNG harder, then JPEG if allowed, then smaller steps."""
    limit = rules.max_bytes
    data = _encode(img, fmt)
    if len(data) < limit:
        return data, fmt, img
    if fmt == "png":
        data = _encode(img, fmt, level=9)
        if len(data) < limit:
            steps.append("PNG at maximum compression")
            return data, fmt, img
        if "jpeg" in rules.formats and img.mode == "RGB":
            fmt, data = "jpeg", _encode(img, "jpeg")
            steps.append(f"re-encoded as JPEG to stay under {human_bytes(limit)}")
            if len(data) < limit:
                return data, fmt, img
    while len(data) >= limit:
        factor = max(0.5, min(0.95, math.sqrt(limit / len(data)) * 0.97))
        w, h = img.size
        new = (max(16, int(w * factor)), max(16, int(h * factor)))
        img = img.resize(new, Image.Resampling.LANCZOS)
        ops.append(("resize", new))
        data = _encode(img, fmt)
    steps.append(f"downscaled to {img.width}x{img.height} to stay under {human_bytes(limit)}")
    return data, fmt, img


def _extension(fmt: str) -> str:
    return "jpg" if fmt == "jpeg" else fmt


def _passes_as_is(src: SourceImage, rules: InputRules, options: PrepOptions) -> bool:
    """Nothing to do: the original bytes are sent untouched (no re-encoding loss)."""
    w, h = src.display_size
    target = parse_size(options.size) if rules.resize_to_size else None
    return (
        src.format in rules.formats
        and src.orientation == 1
        and src.mode in rules.modes
        and not (rules.square and w != h)
        and (target is None or target == (w, h))
        and src.size_bytes < rules.max_bytes
    )


@dataclass
class _Shaped:
    """An image's preparation, kept so its mask can replay the same geometry."""

    file: PreparedFile
    steps: list[str]
    working_size: tuple[int, int]  # display size at the resolution the ops apply to
    ops: list[tuple]


def _prepare_image(src: SourceImage, rules: InputRules, options: PrepOptions) -> _Shaped:
    if _passes_as_is(src, rules, options):
        data = src.path.read_bytes()
        if sha256_hex(data) != src.sha256:
            raise SourceError(f"{src.path.name} changed after it was checked; run again")
        w, h = src.display_size
        file = PreparedFile(src.path.name, data, MIME[src.format], src.sha256, w, h)
        return _Shaped(file, ["sent as is"], (w, h), [])
    steps: list[str] = []
    img = _open(src, _draft_size(src, rules, options))
    if img.size != (src.width, src.height):
        steps.append(f"decoded at {img.width}x{img.height} (JPEG draft)")
    img = _orient(img, src.orientation, steps)
    working = img.size
    pads = rules.square and options.fit == "pad" and working[0] != working[1]
    need_alpha = pads and options.pad_color.lower() == "transparent"
    img = _normalize(img, rules.modes, need_alpha, steps)
    ops = _geometry(working, rules, options, steps)
    img = _apply(img, ops, mask=False, pad_color=options.pad_color)
    data, fmt, img = _squeeze(img, _output_format(src, img.mode, rules), rules, ops, steps)
    steps.append(f"{fmt.upper()} {human_bytes(len(data))}")
    name = f"{src.path.stem}.{_extension(fmt)}"
    sha = sha256_hex(data)
    return _Shaped(
        PreparedFile(name, data, MIME[fmt], sha, img.width, img.height), steps, working, ops
    )


def _mask_alpha(img: Image.Image, repaint: str) -> tuple[Image.Image, str]:
    """The mask as an alpha channel (0 = repaint). A black-and-white or greyscale mask, or an
    alpha PNG whose alpha is all opaque (an editor's flat export), is read by brightness."""
    prefix = ""
    if img.mode in ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        alpha = rgba.getchannel("A")
        lowest, _ = alpha.getextrema()  # one band: (min, max)
        if isinstance(lowest, int | float) and lowest < 255:
            return alpha, "alpha used as is"
        prefix = "alpha all opaque, read as black-and-white: "
        grey = rgba.convert("L")
    elif img.mode.startswith("I") or img.mode == "F":
        grey = _to_8bit(img)
    else:
        grey = img.convert("L")
    if repaint == "white":
        alpha = grey.point(lambda v: 0 if v >= 128 else 255)
    else:
        alpha = grey.point(lambda v: 0 if v < 128 else 255)
    return alpha, f"{prefix}black-and-white -> alpha ({repaint} repaints)"


def _prepare_mask(
    src: SourceImage, image: SourceImage, shaped: _Shaped, rules: InputRules, options: PrepOptions
) -> tuple[PreparedFile, list[str]]:
    alignment = check_mask_shape(src, image)
    steps: list[str] = []
    img = _open(src)
    img = _orient(img, src.orientation, steps)
    if alignment == "stored":
        img = _orient(img, image.orientation, None)
        steps.append("drawn on the stored pixels: turned with its image")
    alpha, how = _mask_alpha(img, options.mask_repaint)
    if (
        how == "alpha used as is"
        and not steps
        and src.format == "png"
        and not shaped.ops
        and img.size == shaped.working_size == image.display_size
        and src.size_bytes < rules.mask_max_bytes
    ):
        data = src.path.read_bytes()
        if sha256_hex(data) != src.sha256:
            raise SourceError(f"{src.path.name} changed after it was checked; run again")
        return PreparedFile(src.path.name, data, MIME["png"], src.sha256, *img.size), ["sent as is"]
    del img
    steps.append(how)
    if alpha.size != shaped.working_size:
        steps.append(
            f"scaled {alpha.width}x{alpha.height} -> {shaped.working_size[0]}x{shaped.working_size[1]}"
        )
        alpha = alpha.resize(shaped.working_size, Image.Resampling.NEAREST)
    alpha = _apply(alpha, shaped.ops, mask=True, pad_color=options.pad_color)
    out = Image.new("RGBA", alpha.size, (0, 0, 0, 255))
    out.putalpha(alpha)
    data = _encode(out, "png")
    if len(data) >= rules.mask_max_bytes:
        data = _encode(out, "png", level=9)
    if len(data) >= rules.mask_max_bytes:
        raise SourceError(
            f"the prepared mask is {human_bytes(len(data))}; the limit is {human_bytes(rules.mask_max_bytes)}"
        )
    steps.append(f"PNG {human_bytes(len(data))}")
    sha = sha256_hex(data)
    return PreparedFile(f"{src.path.stem}.png", data, MIME["png"], sha, *out.size), steps


def prepare_inputs(
    images: Sequence[SourceImage],
    mask: SourceImage | None,
    rules: InputRules,
    options: PrepOptions,
) -> PreparedInputs:
    """The bytes to send for one row: every image prepared, the mask shaped like the first.

    Raises SourceError when a file changed since validation or cannot be prepared.
    """
    with _SLOTS:
        shaped = [_prepare_image(src, rules, options) for src in images]
        parts = [
            (f"image {i + 1}: " if len(shaped) > 1 else "") + ", ".join(s.steps)
            for i, s in enumerate(shaped)
        ]
        mask_file = None
        if mask is not None and images:
            mask_file, mask_steps = _prepare_mask(mask, images[0], shaped[0], rules, options)
            parts.append("mask: " + ", ".join(mask_steps))
    return PreparedInputs([s.file for s in shaped], mask_file, "; ".join(parts))


def prepare_job(job: ValidJob) -> PreparedInputs | None:
    """The prepared inputs of a checked edit or variation row; None for generations."""
    if job.operation == "generate" or not job.images:
        return None
    if not job.model.checked:
        return _unchecked(job.images, job.mask)
    options = job.prep or PrepOptions("", "", "", "")
    return prepare_inputs(job.images, job.mask, input_rules(job.model, job.operation), options)


def _unchecked(images: Sequence[SourceImage], mask: SourceImage | None) -> PreparedInputs:
    """A model the registry does not know: its rules are unknown, so the files go as they are."""
    files = []
    for src in [*images, *([mask] if mask else [])]:
        data = src.path.read_bytes()
        if sha256_hex(data) != src.sha256:
            raise SourceError(f"{src.path.name} changed after it was checked; run again")
        mime = MIME.get(src.format, "application/octet-stream")
        files.append(PreparedFile(src.path.name, data, mime, src.sha256, *src.display_size))
    note = "sent as is (the model is not in the registry, so its input rules are unknown)"
    return PreparedInputs(files[: len(images)], files[len(images)] if mask else None, note)


def save_prepared(out_dir: Path, stem: str, inputs: PreparedInputs) -> list[Path]:
    """Keep the exact bytes sent, for audit: prepared/<stem>_image<i>.<ext> and <stem>_mask.png.
    A file already holding the same bytes is left alone."""
    folder = out_dir / PREPARED_DIR
    try:
        folder.mkdir(exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {folder}: {exc.strerror or exc}") from None
    named = [(f"{stem}_image{i}", f) for i, f in enumerate(inputs.images)]
    if inputs.mask is not None:
        named.append((f"{stem}_mask", inputs.mask))
    written = []
    for name, file in named:
        path = folder / f"{name}.{EXTENSIONS.get(file.mime, 'bin')}"
        if file_sha256(path) != file.sha256:
            write_atomic(path, file.data)
        written.append(path)
    return written
