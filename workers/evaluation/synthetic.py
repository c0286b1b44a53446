"""A seeded synthetic world with ground truth: coloured shapes on textured grey backgrounds.

Each scene is generated on the fly from its seed (same seed, same scene, bit for bit) and comes with
its class map, instance map and the list of its objects, all in the picture's displayed
orientation. What a scene holds:

- **Objects.** 2 to 5 by default: discs, rectangles (aspect 0.6 to 1, any rotation) and triangles
  (equilateral, any rotation), each painted in one colour of `COLOURS` (workers/models/tiny_colour.py,
  the vocabulary `tiny-colour` knows) with a small brightness jitter per object and per-pixel noise.
  An object's size is the diameter of its bounding circle, uniform in 12 % to 50 % of the picture's
  shorter side: a 12 % object spans ~7.7 cells of the 64-cell latent grid at 512 px. A scene often
  has several instances of one colour (`repeat`), never touching each other; objects of different
  colours are often placed touching (`touching`: the later one overlaps the earlier one, which
  keeps at least 60 % of its area visible).
- **Background.** Neutral grey (level 105 to 150, tint within +-3 per channel) with low-contrast
  texture: smooth noise (+-12) or stripes (+-8, period 5 % to 15 % of the shorter side, any angle),
  and per-pixel noise.
- **Any size**, square or not, up to 12 MP and beyond; `Scene.jpeg(orientation)` writes the picture
  as a JPEG whose pixels are stored rotated or mirrored and whose EXIF orientation tag undoes that,
  so a reader that honours EXIF sees `Scene.image` (and the maps stay right).

Class ids: 0 is background, k is `CLASS_NAMES[k - 1]` (the colour words in `COLOURS` order).
Instance ids: 0 is background, i is `Scene.objects[i - 1]`.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from workers.models.tiny_colour import COLOURS

CLASS_NAMES = tuple(COLOURS)
SHAPES = ("disc", "rectangle", "triangle")
SIZE_RANGE = (0.12, 0.5)  # bounding-circle diameter / shorter side
MIN_VISIBLE = 0.6  # share of an object's area that stays visible when another overlaps it
TEXTURE_SIDE = 256  # backgrounds are drawn at this shorter side, then resized smoothly
PLACEMENT_TRIES = 60
EXIF_ORIENTATION = 0x0112
# For each EXIF orientation, the operation that turns the displayed picture into the stored one
# (the inverse of what ImageOps.exif_transpose applies on reading).
_STORE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


@dataclass(frozen=True)
class SceneObject:
    colour: str  # a COLOURS word
    shape: str  # one of SHAPES
    centre: tuple[float, float]  # (x, y) in pixels
    size: float  # bounding-circle diameter as a fraction of the shorter side
    angle: float  # radians
    aspect: float  # rectangle height / width (1 for other shapes)


@dataclass(frozen=True)
class Scene:
    image: np.ndarray  # (H, W, 3) uint8 RGB, displayed orientation
    classes: np.ndarray  # (H, W) uint8: 0 background, k = CLASS_NAMES[k - 1]
    instances: np.ndarray  # (H, W) uint8: 0 background, i = objects[i - 1]
    objects: tuple[SceneObject, ...]
    seed: int

    @property
    def present(self) -> list[str]:
        """The colour words with visible pixels, in CLASS_NAMES order."""
        ids = set(np.unique(self.classes).tolist()) - {0}
        return [name for k, name in enumerate(CLASS_NAMES, start=1) if k in ids]

    def jpeg(self, orientation: int = 1, quality: int = 95) -> bytes:
        """The picture as JPEG bytes with EXIF orientation `orientation` (1..8); read with EXIF
        honoured (ImageOps.exif_transpose), it shows `image`."""
        if orientation not in range(1, 9):
            raise ValueError(f"EXIF orientation is 1..8, got {orientation}")
        picture = Image.fromarray(self.image)
        if orientation != 1:
            picture = picture.transpose(_STORE[orientation])
        exif = Image.Exif()
        exif[EXIF_ORIENTATION] = orientation
        buffer = io.BytesIO()
        picture.save(buffer, format="JPEG", quality=quality, exif=exif.tobytes())
        return buffer.getvalue()


def shape_polygon(obj: SceneObject, short_side: int) -> list[tuple[float, float]] | None:
    """The outline of a rectangle or triangle, (x, y) vertices; None for a disc."""
    radius = obj.size * short_side / 2
    cx, cy = obj.centre
    if obj.shape == "disc":
        return None
    if obj.shape == "triangle":
        corners = [(radius * math.cos(a), radius * math.sin(a)) for a in (0.0, 2 * math.pi / 3, 4 * math.pi / 3)]
    else:
        half_w = radius / math.sqrt(1 + obj.aspect**2)  # half-diagonal = radius
        half_h = half_w * obj.aspect
        corners = [(-half_w, -half_h), (half_w, -half_h), (half_w, half_h), (-half_w, half_h)]
    cos, sin = math.cos(obj.angle), math.sin(obj.angle)
    return [(cx + x * cos - y * sin, cy + x * sin + y * cos) for x, y in corners]


def shape_mask(obj: SceneObject, short_side: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """The object's pixels inside box (x0, y0, x1, y1): bool (y1 - y0, x1 - x0)."""
    x0, y0, x1, y1 = box
    canvas = Image.new("L", (x1 - x0, y1 - y0), 0)
    draw = ImageDraw.Draw(canvas)
    polygon = shape_polygon(obj, short_side)
    if polygon is None:
        radius = obj.size * short_side / 2
        cx, cy = obj.centre[0] - x0, obj.centre[1] - y0
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=1)
    else:
        draw.polygon([(x - x0, y - y0) for x, y in polygon], fill=1)
    return np.asarray(canvas, dtype=bool)


def bounding_box(obj: SceneObject, short_side: int, width: int, height: int) -> tuple[int, int, int, int]:
    radius = obj.size * short_side / 2
    cx, cy = obj.centre
    return (
        max(0, math.floor(cx - radius) - 1),
        max(0, math.floor(cy - radius) - 1),
        min(width, math.ceil(cx + radius) + 2),
        min(height, math.ceil(cy + radius) + 2),
    )


def background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Neutral grey with low-contrast smooth noise or stripes: (H, W, 3) uint8."""
    scale = TEXTURE_SIDE / min(height, width)
    small_h, small_w = max(1, round(height * scale)), max(1, round(width * scale))
    level = rng.uniform(105, 150) + rng.uniform(-3, 3, size=3)
    if rng.random() < 0.5:
        coarse = rng.uniform(-12, 12, size=(8, max(1, round(8 * small_w / small_h))))
        field = np.asarray(Image.fromarray(coarse.astype(np.float32)).resize((small_w, small_h), Image.BICUBIC))
    else:
        period = rng.uniform(0.05, 0.15) * TEXTURE_SIDE
        angle = rng.uniform(0, math.pi)
        y, x = np.mgrid[0:small_h, 0:small_w]
        field = 8 * np.sin(2 * math.pi * (x * math.cos(angle) + y * math.sin(angle)) / period)
    small = np.clip(level + field[..., None], 0, 255).astype(np.uint8)
    return np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC))


def _candidate(rng: np.random.Generator, colour: str, width: int, height: int, short: int, sizes) -> SceneObject:
    shape = SHAPES[rng.integers(len(SHAPES))]
    size = rng.uniform(*sizes)
    radius = size * short / 2
    centre = (rng.uniform(radius, width - radius), rng.uniform(radius, height - radius))
    aspect = rng.uniform(0.6, 1.0) if shape == "rectangle" else 1.0
    return SceneObject(colour, shape, centre, size, rng.uniform(0, 2 * math.pi), aspect)


def _moved(obj: SceneObject, centre: tuple[float, float]) -> SceneObject:
    return SceneObject(obj.colour, obj.shape, centre, obj.size, obj.angle, obj.aspect)


def _inside(obj: SceneObject, short: int, width: int, height: int) -> bool:
    radius = obj.size * short / 2
    x, y = obj.centre
    return radius <= x <= width - radius and radius <= y <= height - radius


class _Canvas:
    """The instance map being drawn, with each object's drawn area (for the visibility rule)."""

    def __init__(self, height: int, width: int):
        self.ids = np.zeros((height, width), np.uint8)
        self.objects: list[SceneObject] = []
        self.areas: list[int] = []
        self.short = min(height, width)

    def overlap(self, obj: SceneObject) -> tuple[np.ndarray, tuple, np.ndarray]:
        """(mask in its box, box, the ids under the mask)."""
        box = bounding_box(obj, self.short, self.ids.shape[1], self.ids.shape[0])
        mask = shape_mask(obj, self.short, box)
        under = self.ids[box[1] : box[3], box[0] : box[2]][mask]
        return mask, box, under

    def fits(self, obj: SceneObject, partner: int | None) -> tuple[bool, tuple | None]:
        """Whether obj may be drawn: touching only `partner` (id) if given, nothing otherwise; no
        object of its colour within a gap; the partner keeps MIN_VISIBLE of its area."""
        if not _inside(obj, self.short, self.ids.shape[1], self.ids.shape[0]):
            return False, None
        gap = 0.04 * self.short
        for other in self.objects:
            if other.colour == obj.colour:
                reach = (other.size + obj.size) * self.short / 2 + gap
                if math.dist(other.centre, obj.centre) < reach:
                    return False, None
        mask, box, under = self.overlap(obj)
        hit = set(np.unique(under).tolist()) - {0}
        if partner is None:
            return not hit, (mask, box)
        if hit != {partner}:
            return False, None
        left = int(np.count_nonzero(self.ids == partner)) - int(np.count_nonzero(under == partner))
        return left >= MIN_VISIBLE * self.areas[partner - 1], (mask, box)

    def draw(self, obj: SceneObject, mask: np.ndarray, box: tuple) -> None:
        self.objects.append(obj)
        self.areas.append(int(mask.sum()))
        region = self.ids[box[1] : box[3], box[0] : box[2]]
        region[mask] = len(self.objects)


def _touching(canvas: _Canvas, obj: SceneObject, partner: int, rng: np.random.Generator) -> tuple | None:
    """obj moved next to object `partner` until it overlaps it (from tangent bounding circles,
    closer in steps of 5 %); (object, mask, box) or None."""
    other = canvas.objects[partner - 1]
    direction = rng.uniform(0, 2 * math.pi)
    reach = (other.size + obj.size) * canvas.short / 2
    for factor in np.arange(1.0, 0.45, -0.05):
        centre = (
            other.centre[0] + factor * reach * math.cos(direction),
            other.centre[1] + factor * reach * math.sin(direction),
        )
        moved = _moved(obj, centre)
        ok, drawn = canvas.fits(moved, partner)
        if ok:
            return moved, *drawn
        if drawn is None and _inside(moved, canvas.short, canvas.ids.shape[1], canvas.ids.shape[0]):
            _, _, under = canvas.overlap(moved)
            if set(np.unique(under).tolist()) - {0, partner}:
                return None  # would reach a third object
    return None


def _choose_colour(rng: np.random.Generator, used: list[str], palette: tuple[str, ...], repeat: float) -> str:
    fresh = [c for c in palette if c not in used]
    if used and (not fresh or rng.random() < repeat):
        return used[rng.integers(len(used))]
    return fresh[rng.integers(len(fresh))]


def _place_objects(rng, canvas: _Canvas, count: int, palette, sizes, repeat: float, touching: float) -> None:
    height, width = canvas.ids.shape
    used: list[str] = []
    for _ in range(count):
        colour = _choose_colour(rng, used, palette, repeat)
        for _ in range(PLACEMENT_TRIES):
            obj = _candidate(rng, colour, width, height, canvas.short, sizes)
            partners = [i for i, o in enumerate(canvas.objects, start=1) if o.colour != colour]
            if partners and rng.random() < touching:
                placed = _touching(canvas, obj, partners[rng.integers(len(partners))], rng)
            else:
                ok, drawn = canvas.fits(obj, None)
                placed = (obj, *drawn) if ok else None
            if placed is not None:
                canvas.draw(*placed)
                used.append(colour)
                break


def _paint(rng: np.random.Generator, canvas: _Canvas) -> np.ndarray:
    height, width = canvas.ids.shape
    table = np.zeros((len(canvas.objects) + 1, 3), np.int16)
    for i, obj in enumerate(canvas.objects, start=1):
        table[i] = np.clip(np.array(COLOURS[obj.colour]) + rng.integers(-6, 7), 0, 255)
    picture = background(rng, height, width).astype(np.int16)
    inside = canvas.ids > 0
    picture[inside] = table[canvas.ids[inside]]
    picture += rng.integers(-3, 4, size=(height, width, 1), dtype=np.int16)
    return np.clip(picture, 0, 255).astype(np.uint8)


def make_scene(
    seed: int,
    height: int = 512,
    width: int = 512,
    *,
    objects: tuple[int, int] = (2, 5),
    palette: tuple[str, ...] = CLASS_NAMES,
    sizes: tuple[float, float] = SIZE_RANGE,
    repeat: float = 0.35,
    touching: float = 0.4,
) -> Scene:
    """One scene of size (height, width) from its seed.

    objects: (fewest, most) objects tried; fewer are placed when the picture is full. palette: the
    colours to draw from. sizes: the range of object sizes (bounding-circle diameter / shorter
    side). repeat: the chance that an object takes a colour already used (another
    instance of that class). touching: the chance that an object is placed overlapping one of
    another colour.
    """
    if height < 16 or width < 16:
        raise ValueError(f"a scene needs at least 16 x 16 pixels, got {height} x {width}")
    rng = np.random.default_rng(seed)
    canvas = _Canvas(height, width)
    count = int(rng.integers(objects[0], objects[1] + 1))
    _place_objects(rng, canvas, count, palette, sizes, repeat, touching)
    image = _paint(rng, canvas)
    lookup = np.array([0] + [CLASS_NAMES.index(o.colour) + 1 for o in canvas.objects], np.uint8)
    return Scene(image, lookup[canvas.ids], canvas.ids, tuple(canvas.objects), seed)
