"""The embedded dataset "shapes": one coloured shape on a greyish background.

Every record is generated on the fly from ``(seed, split, index)``, so the dataset ships no
files, needs no download and is identical on every machine. A record shows one shape from
``SHAPES`` painted in one colour from ``COLOURS`` at a random position and size, on a
low-chroma background: a tinted grey of random brightness, with a gentle gradient and light
noise of random strength (from none to slight). Shapes are drawn at 4x resolution and
box-downsampled, which anti-aliases their edges.

Squares are axis-aligned and triangles are upright (apex up, horizontal base): the
orientation is fixed so that a shape's name alone describes it. The side of a square, the
diameter of a circle and the base of a triangle cover 35%-65% of the image side, and every
shape lies fully inside the image.

The label is ``shape_index * len(COLOURS) + colour_index``; the caption names the colour,
the shape and, for about two thirds of the records, where the centre of the shape's bounding
box lies on a 3x3 grid ("a red circle at the top left"). The remaining third omit the
position ("a red circle"), so short prompts stay in-distribution.
"""

from __future__ import annotations

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

# Saturated and far apart in hue, so that a colour survives imperfect generation.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 190, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 210, 30),
    "magenta": (210, 40, 200),
    "cyan": (30, 200, 210),
}

NUM_CLASSES: int = len(SHAPES) * len(COLOURS)

# Position phrases on a 3x3 grid, row-major from the top left.
POSITIONS: tuple[str, ...] = (
    "at the top left",
    "at the top",
    "at the top right",
    "on the left",
    "in the center",
    "on the right",
    "at the bottom left",
    "at the bottom",
    "at the bottom right",
)

SUPPORTED_IMAGE_SIZES: tuple[int, ...] = (32, 64, 128, 256)
DEFAULT_NUM_EXAMPLES: dict[str, int] = {"train": 50_000, "validation": 1_000}

# Each split draws from its own random stream, so train and validation never share a record.
_SPLIT_STREAMS: dict[str, int] = {"train": 0, "validation": 1}
_SUPERSAMPLING = 4
_MIN_SIZE_FRACTION, _MAX_SIZE_FRACTION = 0.35, 0.65
_CAPTION_WITHOUT_POSITION_PROBABILITY = 1 / 3
_EDGE_MARGIN_FRACTION = 1 / 32

_COLOUR_NAMES = tuple(COLOURS)
_COLOUR_VALUES = np.array(list(COLOURS.values()), dtype=np.float32)


def describe_label(label: int) -> tuple[str, str]:
    """Returns the ``(shape, colour)`` names of a class label.

    Args:
        label: A class label in ``[0, NUM_CLASSES)``.

    Raises:
        ValueError: If the label is out of range.
    """
    if not 0 <= int(label) < NUM_CLASSES:
        raise ValueError(f"label must be in [0, {NUM_CLASSES}), got {label}.")
    shape_index, colour_index = divmod(int(label), len(COLOURS))
    return SHAPES[shape_index], _COLOUR_NAMES[colour_index]


def label_of(shape: str, colour: str) -> int:
    """Returns the class label of a shape name and a colour name."""
    return SHAPES.index(shape) * len(COLOURS) + _COLOUR_NAMES.index(colour)


def caption_vocabulary() -> list[str]:
    """Returns every word a caption can contain, sorted."""
    words = {"a", *SHAPES, *COLOURS}
    for phrase in POSITIONS:
        words.update(phrase.split())
    return sorted(words)


def class_prompts() -> list[tuple[str, int]]:
    """Returns ``("a {colour} {shape}", label)`` for every colour and shape, in label order."""
    prompts = []
    for label in range(NUM_CLASSES):
        shape, colour = describe_label(label)
        prompts.append((f"a {colour} {shape}", label))
    return prompts


def _position_index(center_x: float, center_y: float, image_size: int) -> int:
    """Returns the 3x3 grid cell (row-major) holding a point given in pixels."""
    column = min(int(3 * center_x / image_size), 2)
    row = min(int(3 * center_y / image_size), 2)
    return 3 * row + column


def _shape_coverage(
    shape: str, center_x: float, center_y: float, size: float, image_size: int
) -> np.ndarray:
    """Returns the fraction of each pixel covered by the shape, float32 (H, W).

    The shape is rasterised at ``_SUPERSAMPLING`` times the resolution and box-downsampled.
    Positions and sizes are in output pixels.
    """
    # Sub-pixel centres in output-pixel units; offsets broadcast as a column (y) and a row (x).
    coordinates = (np.arange(image_size * _SUPERSAMPLING, dtype=np.float32) + 0.5) / _SUPERSAMPLING
    offset_y = (coordinates - center_y)[:, None]
    offset_x = (coordinates - center_x)[None, :]
    half = size / 2
    if shape == "circle":
        inside = offset_y**2 + offset_x**2 <= half**2
    elif shape == "square":
        inside = (np.abs(offset_y) <= half) & (np.abs(offset_x) <= half)
    else:  # Upright equilateral triangle, centred on its bounding box.
        height = size * np.sqrt(3) / 2
        depth_below_apex = offset_y + height / 2
        inside = (
            (depth_below_apex >= 0)
            & (depth_below_apex <= height)
            & (np.abs(offset_x) <= depth_below_apex * (half / height))
        )
    return _box_downsample(inside)


def _box_downsample(fine_mask: np.ndarray) -> np.ndarray:
    """Returns the mean of each ``_SUPERSAMPLING``-square block of a boolean mask, float32."""
    # Summing strided slices is several times faster than a reshape-and-mean here.
    counts = fine_mask.view(np.uint8)
    rows = sum(counts[offset::_SUPERSAMPLING] for offset in range(_SUPERSAMPLING))
    cells = sum(rows[:, offset::_SUPERSAMPLING] for offset in range(_SUPERSAMPLING))
    return cells.astype(np.float32) / _SUPERSAMPLING**2


def render_example(rng: np.random.Generator, image_size: int) -> tuple[np.ndarray, int, str]:
    """Draws one record from a random generator.

    Every choice except the background noise is drawn before any array, in fractions of the
    image size, so a generator seeded alike gives the same scene at every image size.

    Args:
        rng: The generator all choices are drawn from.
        image_size: Height and width of the image in pixels.

    Returns:
        ``(image, label, caption)``: a uint8 (H, W, 3) image, its class label and caption.
    """
    label = int(rng.integers(NUM_CLASSES))
    shape, colour = describe_label(label)
    size_fraction = rng.uniform(_MIN_SIZE_FRACTION, _MAX_SIZE_FRACTION)
    center_fractions = rng.uniform(0, 1, size=2)
    brightness, tint = rng.uniform(70, 190), rng.uniform(-8, 8, size=3)
    gradient_strength, gradient_angle = rng.uniform(0, 30), rng.uniform(0, 2 * np.pi)
    noise_std = rng.uniform(0, 4)
    with_position = rng.random() >= _CAPTION_WITHOUT_POSITION_PROBABILITY

    size = size_fraction * image_size
    # The centre keeps the whole shape inside the image, with a margin for anti-aliased edges.
    margin = image_size * _EDGE_MARGIN_FRACTION
    low, high = size / 2 + margin, image_size - size / 2 - margin
    center_x, center_y = low + center_fractions * (high - low)
    ramp = np.linspace(-1, 1, image_size, dtype=np.float32)
    gradient = gradient_strength * (
        np.cos(gradient_angle) * ramp[None, :] + np.sin(gradient_angle) * ramp[:, None]
    )
    noise = rng.normal(0, noise_std, size=(image_size, image_size)).astype(np.float32)
    background = (brightness + gradient + noise)[:, :, None] + tint.astype(np.float32)

    coverage = _shape_coverage(shape, center_x, center_y, size, image_size)[:, :, None]
    image = background * (1 - coverage) + _COLOUR_VALUES[_COLOUR_NAMES.index(colour)] * coverage
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    caption = f"a {colour} {shape}"
    if with_position:
        caption += " " + POSITIONS[_position_index(center_x, center_y, image_size)]
    return image, label, caption


class ShapesSource:
    """A grain random-access source over the procedural "shapes" dataset.

    Records are ``{"image": uint8 (H, W, 3), "label": int32 scalar, "caption": str}`` and
    depend only on ``(seed, split, index)``.

    Attributes:
        split: "train" or "validation".
        image_size: Height and width of every image.
        num_examples: Number of records.
        seed: Seed of the random streams.
    """

    def __init__(
        self,
        split: str = "train",
        image_size: int = 32,
        num_examples: int | None = None,
        seed: int = 0,
    ):
        """Initialises the source.

        Args:
            split: "train" or "validation"; the two draw from disjoint random streams.
            image_size: One of ``SUPPORTED_IMAGE_SIZES``.
            num_examples: Number of records; defaults to 50,000 for "train" and 1,000 for
                "validation".
            seed: Seed of the random streams.

        Raises:
            ValueError: If the split, image size or number of examples is not allowed.
        """
        if split not in DEFAULT_NUM_EXAMPLES:
            raise ValueError(f"split must be one of {sorted(DEFAULT_NUM_EXAMPLES)}, got {split!r}.")
        if image_size not in SUPPORTED_IMAGE_SIZES:
            raise ValueError(
                f"image_size must be one of {SUPPORTED_IMAGE_SIZES}, got {image_size}."
            )
        if num_examples is None:
            num_examples = DEFAULT_NUM_EXAMPLES[split]
        if num_examples <= 0:
            raise ValueError(f"num_examples must be positive, got {num_examples}.")
        self.split = split
        self.image_size = image_size
        self.num_examples = num_examples
        self.seed = seed

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict[str, np.ndarray | str]:
        index = int(index)
        if not 0 <= index < self.num_examples:
            raise IndexError(f"index {index} out of range for {self.num_examples} records.")
        rng = np.random.default_rng((self.seed, _SPLIT_STREAMS[self.split], index))
        image, label, caption = render_example(rng, self.image_size)
        return {"image": image, "label": np.int32(label), "caption": caption}

    def __repr__(self) -> str:
        return (
            f"ShapesSource(split={self.split!r}, image_size={self.image_size}, "
            f"num_examples={self.num_examples}, seed={self.seed})"
        )
