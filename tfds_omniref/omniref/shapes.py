"""Procedural OmniRIS scenes ('shapes'): the embedded dataset that needs no download.

Every example follows the OmniRIS data contract (features.py) and exercises what the real OmniRef exercises:
text, visual and omni prompts; one-vs-one, one-vs-many, many-vs-one, many-vs-many and no-target settings; mask,
box and scribble spatial prompts. A scene has several flat shapes (the categories: circle, square, ...) with
attributes (colour, size, position) on a textured background, and always a category with two or more instances
(same-category distractors), so that:
  * a visual prompt (a reference instance of a category in ANOTHER image) refers to every instance of its
    category in the target, as in OmniRef; category alone identifies visual referents;
  * a text prompt can pick one of several same-category instances by colour, size or position ("the red
    circle", "the leftmost square"), all of them ("every triangle"), several ("the star and the blue circle"),
    or something absent (no target): attributes need text, which is what makes omni prompts useful;
  * an omni example pairs a text and a visual prompt by the paper's Step IV rules (Sec. 4.2): multi-target when
    they refer to different categories, or to one category whose instances they jointly cover; single-target
    when both refer to the same instance and it is the only one of its category; no-target when both are absent.

Everything is plain numpy (vectorised rasterisation) and a pure function of (config, split, index): the same
seed gives byte-identical examples, the splits use distinct seed streams (no example is in two splits), and
examples can be generated in any order or in parallel. The TFDS builder (`omniref_dataset_builder.py`) stores
these examples; the pipeline and tests may also call `generate_example` directly.

Preview a few examples:  python -m tfds_omniref.omniref.shapes --preview /tmp/shapes.png --split omni_test
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Any, Sequence

import numpy as np

from omniris_jax.data import prompts

# The shape kinds are the categories; `category_ids` are indices into this tuple.
# (Kinds that blur into a disc at small sizes, such as hexagons, are left out: the category must be visible.)
CATEGORY_NAMES = ("circle", "square", "triangle", "star", "diamond", "ring", "cross", "heart")
_PLURALS = {name: name + ("es" if name.endswith("ss") else "s") for name in CATEGORY_NAMES}
# Saturated colours that stand out from the muted backgrounds; the names are the words of the text prompts.
COLOURS = {
    "red": (215, 38, 38),
    "green": (34, 170, 60),
    "blue": (40, 90, 225),
    "yellow": (240, 205, 30),
    "purple": (145, 60, 200),
    "orange": (245, 125, 25),
    "cyan": (30, 200, 215),
}
_COLOUR_NAMES = tuple(COLOURS)
# Two well-separated size classes (radius as a fraction of the image side), so "small"/"big" are unambiguous.
_RADIUS_FRACTIONS = {"small": (0.075, 0.095), "big": (0.125, 0.155)}

SPLITS = ("train", "text_test", "visual_test", "omni_test")
MODALITIES = ("text", "visual", "omni")
SETTINGS = ("one_vs_one", "one_vs_many", "many_vs_one", "many_vs_many", "no_target")
PROMPT_TYPES = ("none", "mask", "box", "scribble")
# How many target instances an example refers to; each test split has one third of each.
TARGET_KINDS = ("single", "multi", "none")

_SPLIT_CODES = {"train": 1, "text_test": 2, "visual_test": 3, "omni_test": 4}
_TEST_SPLIT_MODALITY = {"text_test": "text", "visual_test": "visual", "omni_test": "omni"}
# image_id = split code * _ID_STRIDE + 2 * index (+1 for the reference image), unique over all splits.
_ID_STRIDE = 10_000_000
_MIN_IMAGE_SIZE = 64
_MAX_OBJECTS = 8
_MAX_ATTEMPTS = 200


@dataclasses.dataclass(frozen=True)
class ShapesConfig:
  """Generator parameters; every combination that passes validation builds (checked in __post_init__).

  Attributes:
    image_size: side of the square target and reference images, in pixels (>= 64 so small shapes stay visible).
    num_train: examples in `train` (cycles through all 3 modalities x 3 target kinds; >= 9).
    num_text_test: examples in `text_test` (a multiple of 3: single / multi / no-target thirds).
    num_visual_test: examples in `visual_test` (a multiple of 3).
    num_omni_test: examples in `omni_test` (a multiple of 3).
    min_objects: fewest shapes in a target scene (>= 3: a referent, a same-category distractor and another).
    max_objects: most shapes in a target scene (<= 8, so they fit without overlapping).
    seed: base seed; with the split and the example index it fixes every pixel.
  """

  image_size: int = 128
  num_train: int = 3000
  num_text_test: int = 300
  num_visual_test: int = 300
  num_omni_test: int = 300
  min_objects: int = 3
  max_objects: int = 6
  seed: int = 0

  def __post_init__(self):
    if self.image_size < _MIN_IMAGE_SIZE:
      raise ValueError(f"ShapesConfig {self.image_size=} must be at least {_MIN_IMAGE_SIZE}: smaller images "
                       "leave small shapes only a few pixels wide.")
    if self.num_train < 9:
      raise ValueError(f"ShapesConfig {self.num_train=} must be at least 9 so that train holds every "
                       "modality x target kind (3 x 3).")
    for name in ("num_text_test", "num_visual_test", "num_omni_test"):
      value = getattr(self, name)
      if value < 3 or value % 3:
        raise ValueError(f"ShapesConfig {name}={value} must be a positive multiple of 3: each test split is one "
                         "third single-target, one third multi-target, one third no-target.")
    if not 3 <= self.min_objects <= self.max_objects <= _MAX_OBJECTS:
      raise ValueError(f"ShapesConfig needs 3 <= {self.min_objects=} <= {self.max_objects=} <= {_MAX_OBJECTS}.")
    if max(self.split_sizes().values()) * 2 >= _ID_STRIDE:
      raise ValueError(f"ShapesConfig split sizes {self.split_sizes()} must stay below {_ID_STRIDE // 2} so "
                       "image ids stay unique across splits.")

  def split_sizes(self) -> dict[str, int]:
    """Number of examples per split name."""
    return {"train": self.num_train, "text_test": self.num_text_test, "visual_test": self.num_visual_test,
            "omni_test": self.num_omni_test}


@dataclasses.dataclass(frozen=True)
class SceneObject:
  """One shape: its category, attribute words and geometry (pixels; centre (cy, cx), bounding radius)."""

  category: int
  colour: str
  size: str
  cy: float
  cx: float
  radius: float
  angle: float


@dataclasses.dataclass(frozen=True)
class Layout:
  """The objects of a scene before it is painted: enough to plan prompts, cheap to reject."""

  objects: tuple[SceneObject, ...]

  def instances_of(self, category: int) -> list[int]:
    """Indices of the objects of `category`."""
    return [i for i, obj in enumerate(self.objects) if obj.category == category]

  def categories(self) -> set[int]:
    """The categories present in the scene."""
    return {obj.category for obj in self.objects}


@dataclasses.dataclass(frozen=True)
class Scene(Layout):
  """A painted layout: the uint8 image (S, S, 3) and the disjoint instance masks (N, S, S) bool."""

  image: np.ndarray
  instance_masks: np.ndarray

  def union_mask(self, indices: Sequence[int]) -> np.ndarray:
    """The (S, S) bool union of the instance masks at `indices` (all False when empty)."""
    if not indices:
      return np.zeros(self.instance_masks.shape[1:], bool)
    return self.instance_masks[list(indices)].any(axis=0)


# ======================================================================================================
# Rasterisation
# ======================================================================================================


def _regular_polygon(u: np.ndarray, v: np.ndarray, sides: int) -> np.ndarray:
  """Inside a regular polygon of circumradius 1 with a vertex pointing up (image v grows downwards)."""
  r = np.hypot(u, v)
  sector = 2 * math.pi / sides
  alpha = np.mod(np.arctan2(v, u) + math.pi / 2, sector)
  return r * np.cos(alpha - sector / 2) <= math.cos(math.pi / sides)


def _star(u: np.ndarray, v: np.ndarray, points: int = 5, inner: float = 0.45) -> np.ndarray:
  """Inside a star of outer radius 1: fold the angle into one half-spike, test against its straight edge."""
  r = np.hypot(u, v)
  sector = 2 * math.pi / points
  alpha = np.mod(np.arctan2(v, u) + math.pi / 2, sector)
  beta = np.minimum(alpha, sector - alpha)  # 0 at an outer vertex, sector/2 at an inner vertex
  px, py = r * np.cos(beta), r * np.sin(beta)
  # The edge from the outer vertex (1, 0) to the inner vertex; the origin (cross product ey > 0) is inside.
  ex, ey = inner * math.cos(sector / 2) - 1.0, inner * math.sin(sector / 2)
  return ex * py - ey * (px - 1.0) >= 0.0


def _shape_mask(category: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Membership of normalised local coordinates (u right, v down; the shape fits the unit disc)."""
  name = CATEGORY_NAMES[category]
  if name == "circle":
    return u * u + v * v <= 0.85
  if name == "square":
    return np.maximum(np.abs(u), np.abs(v)) <= 0.68
  if name == "triangle":
    # Scaled and moved down so the triangle's box (not its centroid) is centred and its corners stay in the disc.
    return _regular_polygon(u / 0.88, (v - 0.22) / 0.88, 3)
  if name == "star":
    return _star(u, v)
  if name == "diamond":
    return np.abs(u) / 0.62 + np.abs(v) <= 1.0  # elongated, so it never looks like a rotated square
  if name == "ring":
    radius_squared = u * u + v * v
    return (radius_squared <= 0.85) & (radius_squared >= 0.3)
  if name == "cross":
    arm, half_width = 0.92, 0.3
    return (((np.abs(u) <= half_width) & (np.abs(v) <= arm)) | ((np.abs(v) <= half_width) & (np.abs(u) <= arm)))
  if name == "heart":
    x, y = u * 1.25, -v * 1.25 + 0.15
    return (x * x + y * y - 1.0) ** 3 - x * x * y ** 3 <= 0.0
  raise ValueError(f"unknown category {category=}")


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
  """A muted textured background (stripes, checks, smooth blotches or a gradient), float (S, S, 3)."""
  coords = np.arange(size, dtype=np.float32) / size
  yy, xx = coords[:, None], coords[None, :]  # broadcast to (S, S) in the texture formulas
  base = (rng.uniform(55, 150) + rng.normal(0, 12, size=3)).astype(np.float32)
  amplitude = rng.uniform(12, 30)
  kind = int(rng.integers(4))
  if kind == 0:
    theta = rng.uniform(0, math.pi)
    texture = np.sin(2 * math.pi * rng.uniform(4, 12) * (xx * math.cos(theta) + yy * math.sin(theta))
                     + rng.uniform(0, 2 * math.pi))
  elif kind == 1:
    cells = rng.uniform(4, 10)
    texture = np.where((np.floor(xx * cells) + np.floor(yy * cells)) % 2 == 0, 1.0, -1.0)
  elif kind == 2:
    coarse = rng.uniform(-1, 1, size=(5, 5)).astype(np.float32)
    # Bilinear upsampling of a 5x5 grid as two (S, 5) interpolation matrices: texture = W @ coarse @ W.T.
    position = np.linspace(0, 4, size, dtype=np.float32)
    weights = np.maximum(0, 1 - np.abs(position[:, None] - np.arange(5, dtype=np.float32)[None, :]))
    texture = weights @ coarse @ weights.T
  else:
    theta = rng.uniform(0, 2 * math.pi)
    texture = 2 * ((xx - 0.5) * math.cos(theta) + (yy - 0.5) * math.sin(theta))
  tint = (amplitude * rng.uniform(0.6, 1.0, size=3)).astype(np.float32)
  texture = np.broadcast_to(texture, (size, size)).astype(np.float32)
  return base[None, None, :] + texture[:, :, None] * tint[None, None, :]


def render_scene(rng: np.random.Generator, layout: Layout, size: int) -> Scene:
  """Paints the layout's objects on a textured background; returns the image and the visible instance masks."""
  objects = layout.objects
  image = _background(rng, size)
  masks = np.zeros((len(objects), size, size), bool)
  for index, obj in enumerate(objects):
    top, bottom = max(int(obj.cy - obj.radius) - 1, 0), min(int(obj.cy + obj.radius) + 2, size)
    left, right = max(int(obj.cx - obj.radius) - 1, 0), min(int(obj.cx + obj.radius) + 2, size)
    yy, xx = np.mgrid[top:bottom, left:right].astype(np.float32)
    dy, dx = (yy + 0.5 - obj.cy) / obj.radius, (xx + 0.5 - obj.cx) / obj.radius
    cos, sin = math.cos(obj.angle), math.sin(obj.angle)
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy
    inside = _shape_mask(obj.category, u, v)
    colour = np.asarray(COLOURS[obj.colour], np.float32) + rng.normal(0, 8, size=3)
    # A soft highlight towards the upper left gives the flat shapes some shading.
    shade = 1.05 - 0.18 * np.clip(np.hypot(u + 0.35, v + 0.35), 0, 1.6)
    window = image[top:bottom, left:right]
    window[inside] = (colour[None, None, :] * shade[:, :, None])[inside]
    masks[index, top:bottom, left:right] = inside
    masks[:index, top:bottom, left:right] &= ~inside  # later shapes occlude earlier ones (keeps masks disjoint)
  return Scene(tuple(objects), np.clip(image, 0, 255).astype(np.uint8), masks)


# ======================================================================================================
# Scene layout
# ======================================================================================================


def _place(rng: np.random.Generator, placed: list[SceneObject], category: int, colour: str, size_word: str,
           image_size: int) -> SceneObject | None:
  """Finds a position where the new shape does not touch the placed ones; None when there is no room."""
  gap = max(2.0, 0.03 * image_size)
  for word in (size_word, "small"):  # a big shape that does not fit is tried again small
    low, high = _RADIUS_FRACTIONS[word]
    for _ in range(60):
      radius = rng.uniform(low, high) * image_size
      cy, cx = rng.uniform(radius + 1, image_size - 1 - radius, size=2)
      if all(math.hypot(cy - o.cy, cx - o.cx) >= radius + o.radius + gap for o in placed):
        return SceneObject(category, colour, word, float(cy), float(cx), float(radius),
                           float(rng.uniform(-0.25, 0.25)))
  return None


def sample_layout(rng: np.random.Generator, config: ShapesConfig, *, focus_category: int | None = None,
                  focus_count: int | None = None, focus_size: str | None = None) -> Layout:
  """A random scene with `focus_count` instances of `focus_category` (default: a random category, 2-3 times).

  Target scenes use the default, so every target has same-category distractors; reference scenes ask for
  exactly one big instance of the prompted category (OmniRef's references are "obvious visual instances").
  The other categories appear once or twice each.
  """
  for _ in range(_MAX_ATTEMPTS):
    num_objects = int(rng.integers(config.min_objects, config.max_objects + 1))
    focus = int(rng.integers(len(CATEGORY_NAMES))) if focus_category is None else focus_category
    count = int(rng.integers(2, min(3, num_objects) + 1)) if focus_count is None else focus_count
    others = [c for c in rng.permutation(len(CATEGORY_NAMES)).tolist() if c != focus]
    categories = [focus] * count
    while len(categories) < num_objects and others:
      categories += [others.pop()] * min(num_objects - len(categories), int(rng.choice([1, 1, 2])))
    objects: list[SceneObject] = []
    for position, category in enumerate(categories):
      siblings = [o.colour for o in objects if o.category == category]
      # Usually a new colour among same-category shapes (so colour words pick one), sometimes a repeat (so
      # size and position words are needed).
      fresh = [c for c in _COLOUR_NAMES if c not in siblings]
      colour = str(rng.choice(fresh if fresh and rng.random() < 0.75 else _COLOUR_NAMES))
      size_word = str(rng.choice(("small", "big")))
      if position < count and focus_size is not None:
        size_word = focus_size
      obj = _place(rng, objects, category, colour, size_word, config.image_size)
      if obj is not None:
        objects.append(obj)
    placed_focus = sum(o.category == focus for o in objects)
    if len(objects) >= config.min_objects and placed_focus == count:
      return Layout(tuple(objects))
  raise RuntimeError(f"Could not lay out {config.max_objects} shapes in a {config.image_size}px image after "
                     f"{_MAX_ATTEMPTS} attempts; lower max_objects or raise image_size.")


# ======================================================================================================
# Text prompts
# ======================================================================================================


@dataclasses.dataclass(frozen=True)
class Expression:
  """A text prompt and the scene objects it refers to (empty for no target)."""

  text: str
  referents: tuple[int, ...]


def _extreme(scene: Layout, siblings: list[int], key, margin: float) -> int | None:
  """The sibling with the smallest `key`, if it beats the runner-up by `margin` pixels (else ambiguous)."""
  ordered = sorted(siblings, key=lambda i: key(scene.objects[i]))
  if len(ordered) >= 2 and key(scene.objects[ordered[1]]) - key(scene.objects[ordered[0]]) >= margin:
    return ordered[0]
  return None


def single_expressions(scene: Layout, size: int) -> list[Expression]:
  """Every expression that picks exactly one object: by category, colour, size or position among its kind."""
  expressions = []
  margin = 0.15 * size  # position words only where the difference is plain to see
  for category in sorted(scene.categories()):
    name = CATEGORY_NAMES[category]
    siblings = scene.instances_of(category)
    if len(siblings) == 1:
      only = siblings[0]
      expressions += [Expression(f"the {name}", (only,)),
                      Expression(f"the {scene.objects[only].colour} {name}", (only,))]
      continue
    for attribute in ("colour", "size"):
      for index in siblings:
        word = getattr(scene.objects[index], attribute)
        if sum(getattr(scene.objects[i], attribute) == word for i in siblings) == 1:
          expressions.append(Expression(f"the {word} {name}", (index,)))
    two = len(siblings) == 2
    for phrase, key in (("the leftmost {}" if not two else "the {} on the left", lambda o: o.cx),
                        ("the rightmost {}" if not two else "the {} on the right", lambda o: -o.cx),
                        ("the topmost {}" if not two else "the upper {}", lambda o: o.cy),
                        ("the lowest {}" if not two else "the lower {}", lambda o: -o.cy)):
      index = _extreme(scene, siblings, key, margin)
      if index is not None:
        expressions.append(Expression(phrase.format(name), (index,)))
  return expressions


def multi_expressions(scene: Layout, size: int) -> list[Expression]:
  """Expressions that refer to two or more objects: whole categories, attribute groups, conjunctions."""
  expressions = []
  for category in sorted(scene.categories()):
    siblings = tuple(scene.instances_of(category))
    if len(siblings) >= 2:
      plural = _PLURALS[CATEGORY_NAMES[category]]
      expressions += [Expression(f"every {CATEGORY_NAMES[category]}", siblings),
                      Expression(f"all the {plural}", siblings)]
      for attribute in ("colour", "size"):
        for word in sorted({getattr(scene.objects[i], attribute) for i in siblings}):
          group = tuple(i for i in siblings if getattr(scene.objects[i], attribute) == word)
          if len(group) >= 2 and len(group) < len(siblings):
            expressions.append(Expression(f"the {word} {plural}", group))
  for colour in _COLOUR_NAMES:
    group = tuple(i for i, o in enumerate(scene.objects) if o.colour == colour)
    if len(group) >= 2:
      expressions.append(Expression(f"every {colour} shape", group))
  singles = single_expressions(scene, size)
  for first in singles:
    for second in singles:
      if first.referents[0] < second.referents[0]:
        expressions.append(Expression(f"{first.text} and {second.text}", first.referents + second.referents))
  return expressions


def absent_single_expressions(scene: Layout) -> list[Expression]:
  """Expressions worded like `single_expressions` whose referent is not in the scene: a present category in an
  absent colour or size, or an absent category by name, colour or position."""
  expressions = []
  present = scene.categories()
  for category, name in enumerate(CATEGORY_NAMES):
    instances = [scene.objects[i] for i in scene.instances_of(category)]
    colours = {obj.colour for obj in instances}
    expressions += [Expression(f"the {colour} {name}", ()) for colour in _COLOUR_NAMES if colour not in colours]
    if category in present:
      sizes = {obj.size for obj in instances}
      expressions += [Expression(f"the {size} {name}", ()) for size in ("small", "big") if size not in sizes]
    else:
      expressions += [Expression(f"the {name}", ())]
      expressions += [Expression(phrase.format(name), ()) for phrase in (
          "the leftmost {}", "the rightmost {}", "the topmost {}", "the lowest {}",
          "the {} on the left", "the {} on the right", "the upper {}", "the lower {}")]
  return expressions


def absent_multi_expressions(scene: Layout) -> list[Expression]:
  """Expressions worded like `multi_expressions` that refer to nothing in the scene: an absent category or
  colour group, or two absent referents joined by "and"."""
  expressions = []
  present = scene.categories()
  for category, name in enumerate(CATEGORY_NAMES):
    plural = _PLURALS[name]
    if category not in present:
      expressions += [Expression(f"every {name}", ()), Expression(f"all the {plural}", ())]
    colours = {scene.objects[i].colour for i in scene.instances_of(category)}
    expressions += [Expression(f"the {colour} {plural}", ()) for colour in _COLOUR_NAMES if colour not in colours]
  scene_colours = {obj.colour for obj in scene.objects}
  expressions += [Expression(f"every {colour} shape", ()) for colour in _COLOUR_NAMES if colour not in scene_colours]
  singles = absent_single_expressions(scene)
  half = len(singles) // 2
  for first, second in zip(singles[:half], singles[half:]):  # a fixed sample of pairs, not all n**2 of them
    if first.text.split()[-1] != second.text.split()[-1]:
      expressions.append(Expression(f"{first.text} and {second.text}", ()))
  return expressions


def absent_expressions(scene: Layout) -> list[Expression]:
  """Every no-target expression `_plan` draws from: `absent_single_expressions` + `absent_multi_expressions`."""
  return absent_single_expressions(scene) + absent_multi_expressions(scene)


# How often a single-target-like no-target prompt is worded by each attribute, about as often as the
# single-target prompts are (position words include "the <category>" of an absent category).
_ABSENT_SINGLE_WORDING = (("position", 0.45), ("colour", 0.4), ("size", 0.15))


def _wording(expression: Expression) -> str:
  """'colour', 'size' or 'position': the attribute word of a single-target-like expression."""
  words = expression.text.split()
  if len(words) == 3 and words[1] in COLOURS:
    return "colour"
  if len(words) == 3 and words[1] in ("small", "big"):
    return "size"
  return "position"


# The wording templates of the text prompts, as `expression_template` names them.
TEMPLATES = ("conjunction", "group", "colour", "size", "position", "category")
_POSITION_WORDS = ("leftmost", "rightmost", "topmost", "lowest", "left", "right", "upper", "lower")


def expression_template(text: str) -> str:
  """The template a generated text prompt was worded by, one of `TEMPLATES`: "the X and the Y" (conjunction),
  "every triangle" / "all the stars" / "the red circles" / "every blue shape" (group), "the red circle"
  (colour), "the big circle" (size), "the leftmost square" / "the star on the right" (position), "the heart"
  (category). For breaking results down by wording (`benchmarks/text_groups.py`)."""
  words = text.split()
  if " and " in text:
    return "conjunction"
  if words[0] in ("every", "all") or words[-1] in _PLURALS.values():
    return "group"
  if any(word in _POSITION_WORDS for word in words):
    return "position"
  if len(words) == 3 and words[1] in COLOURS:
    return "colour"
  if len(words) == 3 and words[1] in ("small", "big"):
    return "size"
  if len(words) == 2 and words[1] in CATEGORY_NAMES:
    return "category"
  raise ValueError(f"{text!r} is worded by none of the shapes templates {TEMPLATES}")


def _pick_absent(rng: np.random.Generator, scene: Layout) -> Expression | None:
  """A no-target expression worded like a targeted one, so that the wording alone cannot tell that the
  referent is absent. Half are worded like a single-target prompt: by position, colour or size about as often
  as those are, three in four colour ones naming a present category in a wrong colour. Half are worded like a
  multi-target prompt: three in four joined by "and", as the multi-target prompts are."""
  if rng.random() < 0.5:
    singles = absent_single_expressions(scene)
    wordings = [(name, weight) for name, weight in _ABSENT_SINGLE_WORDING
                if any(_wording(e) == name for e in singles)]
    weights = np.array([weight for _, weight in wordings])
    wording = wordings[int(rng.choice(len(wordings), p=weights / weights.sum()))][0]
    return _pick(rng, [e for e in singles if _wording(e) == wording], lambda e: _hard_negative(scene, e))
  return _pick(rng, absent_multi_expressions(scene), lambda e: " and " in e.text)


def _pick(rng: np.random.Generator, expressions: Sequence[Expression], preferred=None) -> Expression | None:
  """A random expression, from those satisfying `preferred` three times out of four when there are any."""
  if preferred is not None:
    favourites = [e for e in expressions if preferred(e)]
    if favourites and rng.random() < 0.75:
      expressions = favourites
  if not expressions:
    return None
  return expressions[int(rng.integers(len(expressions)))]


def _has_distractor(scene: Layout, expression: Expression) -> bool:
  """True when a referent has a same-category sibling, so the words (not the category) must do the work."""
  return any(len(scene.instances_of(scene.objects[i].category)) >= 2 for i in expression.referents)


def _hard_negative(scene: Layout, expression: Expression) -> bool:
  """True for an absent referent whose category is present (only a colour or size word makes it absent)."""
  return any(CATEGORY_NAMES[c] in expression.text for c in scene.categories())


# ======================================================================================================
# Examples
# ======================================================================================================


def example_kind(config: ShapesConfig, split: str, index: int) -> tuple[str, str, str | None]:
  """(modality, target kind, fixed prompt type or None) of example `index` of `split`.

  Test splits cycle single / multi / none so each is exactly one third, and the visual prompt type cycles every
  three examples so every (target kind, prompt type) pair appears. Train cycles all 9 (modality, target kind)
  pairs and draws the prompt type at random.
  """
  sizes = config.split_sizes()
  if split not in sizes:
    raise ValueError(f"{split=} must be one of {SPLITS}.")
  if not 0 <= index < sizes[split]:
    raise ValueError(f"{index=} is outside split {split!r} of {sizes[split]} examples.")
  if split == "train":
    return MODALITIES[index % 3], TARGET_KINDS[(index // 3) % 3], None
  modality = _TEST_SPLIT_MODALITY[split]
  prompt_type = "none" if modality == "text" else PROMPT_TYPES[1 + (index // 3) % 3]
  return modality, TARGET_KINDS[index % 3], prompt_type


def _reference(rng: np.random.Generator, config: ShapesConfig, category: int) -> dict[str, np.ndarray]:
  """A new scene holding one instance of `category`, with its mask, box and scribble prompts."""
  layout = sample_layout(rng, config, focus_category=category, focus_count=1, focus_size="big")
  scene = render_scene(rng, layout, config.image_size)
  ref_mask = scene.instance_masks[scene.instances_of(category)[0]].astype(np.uint8)[:, :, None]
  return {"ref_image": scene.image, "ref_mask": ref_mask, "ref_box": prompts.box_from_mask(ref_mask),
          "ref_scribble": prompts.scribble_from_mask(ref_mask, rng)}


def _plan(rng: np.random.Generator, scene: Layout, modality: str, target: str,
          size: int) -> tuple[Expression | None, int | None] | None:
  """Chooses the text expression and/or visual category for the requested kind; None if this scene can't."""
  present = scene.categories()
  absent = [c for c in range(len(CATEGORY_NAMES)) if c not in present]
  singles_in_scene = [c for c in sorted(present) if len(scene.instances_of(c)) == 1]
  multiples_in_scene = [c for c in sorted(present) if len(scene.instances_of(c)) >= 2]
  if modality == "text":
    if target == "single":
      chosen = _pick(rng, single_expressions(scene, size), lambda e: _has_distractor(scene, e))
    elif target == "multi":
      chosen = _pick(rng, multi_expressions(scene, size), lambda e: " and " in e.text)
    else:
      chosen = _pick_absent(rng, scene)
    return None if chosen is None else (chosen, None)

  if modality == "visual":
    pool = {"single": singles_in_scene, "multi": multiples_in_scene, "none": absent}[target]
    return None if not pool else (None, int(rng.choice(pool)))

  # Omni: the paper's Step IV rules.
  if target == "single":  # both prompts refer to one instance, the only one of its category
    if not singles_in_scene:
      return None
    category = int(rng.choice(singles_in_scene))
    only = scene.instances_of(category)[0]
    text = _pick(rng, [e for e in single_expressions(scene, size) if e.referents == (only,)])
    return text, category
  if target == "none":  # both referents absent
    return _pick_absent(rng, scene), int(rng.choice(absent))
  # Multi: different categories, or one category whose instances the two prompts jointly cover.
  if multiples_in_scene and rng.random() < 0.4:
    category = int(rng.choice(multiples_in_scene))
    siblings = set(scene.instances_of(category))
    text = _pick(rng, [e for e in single_expressions(scene, size) if set(e.referents) <= siblings])
    return text, category
  category = int(rng.choice(sorted(present)))
  text_pool = [e for e in single_expressions(scene, size) + multi_expressions(scene, size)
               if all(scene.objects[i].category != category for i in e.referents)]
  text = _pick(rng, text_pool)
  return None if text is None else (text, category)


def _setting(modality: str, num_instances: int) -> str:
  """The OmniRIS setting: prompts (one for text/visual, two for omni) x target instances."""
  if num_instances == 0:
    return "no_target"
  prompts_word = "many" if modality == "omni" else "one"
  return f"{prompts_word}_vs_{'one' if num_instances == 1 else 'many'}"


def generate_example_and_scene(config: ShapesConfig, split: str, index: int,
                               config_name: str = "shapes") -> tuple[dict[str, Any], Scene]:
  """Example `index` of `split` (see `generate_example`) and the target scene behind it, for tests and tools."""
  modality, target, prompt_type = example_kind(config, split, index)
  rng = np.random.default_rng(np.random.SeedSequence([config.seed, _SPLIT_CODES[split], index]))
  size = config.image_size
  for _ in range(_MAX_ATTEMPTS):
    layout = sample_layout(rng, config)
    plan = _plan(rng, layout, modality, target, size)
    if plan is not None and (modality == "visual" or plan[0] is not None):
      break
  else:
    raise RuntimeError(f"No scene for a {modality}/{target} example after {_MAX_ATTEMPTS} attempts "
                       f"({split=}, {index=}); raise max_objects.")
  expression, visual_category = plan
  scene = render_scene(rng, layout, size)

  image_id = _SPLIT_CODES[split] * _ID_STRIDE + 2 * index
  text_referents = expression.referents if expression is not None else ()
  visual_referents = tuple(scene.instances_of(visual_category)) if visual_category is not None else ()
  union = sorted(set(text_referents) | set(visual_referents))
  example = {
      "id": f"{config_name}/{split}/{index:06d}",
      "image_id": image_id,
      "image": scene.image,
      "text": expression.text if expression is not None else "",
      "text_mask": scene.union_mask(text_referents).astype(np.uint8)[:, :, None],
      "visual_mask": scene.union_mask(visual_referents).astype(np.uint8)[:, :, None],
      "mask": scene.union_mask(union).astype(np.uint8)[:, :, None],
      "no_target": not union,
      "modality": modality,
      "setting": _setting(modality, len(union)),
      "category_ids": np.asarray(sorted({scene.objects[i].category for i in union}), np.int64),
  }
  if visual_category is None:
    placeholder = np.zeros((1, 1, 1), np.uint8)
    example.update(ref_image=np.zeros((1, 1, 3), np.uint8), ref_image_id=-1, ref_mask=placeholder,
                   ref_box=placeholder, ref_scribble=placeholder, ref_category_id=-1, prompt_type="none")
  else:
    example.update(_reference(rng, config, visual_category))
    example.update(ref_image_id=image_id + 1, ref_category_id=visual_category,
                   prompt_type=prompt_type or str(rng.choice(PROMPT_TYPES[1:])))
  expected = {"single": 1, "multi": 2, "none": 0}[target]
  if min(len(union), 2) != expected:  # a planning bug, not bad input
    raise AssertionError(f"{split}/{index}: planned {target} but got {len(union)} instances")
  return example, scene


def generate_example(config: ShapesConfig, split: str, index: int, config_name: str = "shapes") -> dict[str, Any]:
  """Example `index` of `split` as numpy values under the feature names of `features.omniris_features()`.

  Images are uint8 (S, S, 3), masks uint8 (S, S, 1) of 0/1, reference fields are 1x1 zero placeholders (and
  `ref_image_id`/`ref_category_id` -1) without a visual prompt; `modality`, `setting` and `prompt_type` are
  their names (TFDS stores their indices); `category_ids` is an int64 array of indices into CATEGORY_NAMES.
  `config_name` only prefixes the example id.
  """
  return generate_example_and_scene(config, split, index, config_name)[0]


def generate_split(config: ShapesConfig, split: str, config_name: str = "shapes"):
  """Yields every example of `split` in index order."""
  for index in range(config.split_sizes()[split]):
    yield generate_example(config, split, index, config_name)


def category_map(scene: Scene) -> np.ndarray:
  """(S, S) uint8: 0 on the background, 1 + the category index on each object of the scene."""
  labels = np.zeros(scene.instance_masks.shape[1:], np.uint8)
  for obj, mask in zip(scene.objects, scene.instance_masks):
    labels[mask] = obj.category + 1
  return labels


# The most train examples a generated source can address (image ids of a split must stay below _ID_STRIDE).
MAX_GENERATED_TRAIN = _ID_STRIDE // 2 - 1


class GeneratedTrainSource:
  """Train examples made on demand: a random-access source (`len`, `[i]`) for grain, never stored.

  A fixed train split of a few thousand scenes is memorised within a few epochs (the training loss falls while
  the test metrics stay at "segment every object"); the generator can instead draw a new scene for every step.
  Element i is train example `index(i)` of a ShapesConfig with `num_train=length`, so the first elements are
  the stored train split's own examples and every element is a pure function of (config, i); records come in
  the form `tfds.data_source` gives (label indices, bytes text), so the pipeline cannot tell the two apart.
  Test splits use their own seed streams: no generated example is a test example.

  Args:
    config: the generator parameters of the dataset config (its `num_train` is replaced by `length`).
    modalities: keep only examples of these modalities (train cycles text, visual, omni); None keeps all.
    length: train examples to address before the numbering ends (at most MAX_GENERATED_TRAIN).
    config_name: prefixes the example ids.
    category_maps: also give each record a `category_map` (S, S) uint8 of the target scene: 0 on the
      background, 1 + the category index on every object (dense labels for an auxiliary scene-parsing loss;
      the stored splits have none).
  """

  def __init__(self, config: ShapesConfig, modalities: Sequence[str] | None = None,
               length: int = MAX_GENERATED_TRAIN, config_name: str = "shapes", category_maps: bool = False):
    if not 9 <= length <= MAX_GENERATED_TRAIN:
      raise ValueError(f"GeneratedTrainSource {length=} must be in [9, {MAX_GENERATED_TRAIN}].")
    modalities = tuple(MODALITIES if not modalities else modalities)
    unknown = [m for m in modalities if m not in MODALITIES]
    if unknown or len(set(modalities)) != len(modalities):
      raise ValueError(f"GeneratedTrainSource modalities={modalities} must be distinct names from {MODALITIES}.")
    self.config = dataclasses.replace(config, num_train=length)
    self.config_name = config_name
    self.category_maps = category_maps
    # Train example j has modality MODALITIES[j % 3]: the k-th kept example is 3 * (k // n) + offsets[k % n].
    self._offsets = sorted(MODALITIES.index(m) for m in modalities)
    self._length = (length // 3) * len(self._offsets) + sum(o < length % 3 for o in self._offsets)

  def __len__(self) -> int:
    return self._length

  def index(self, i: int) -> int:
    """The train example number behind element `i`."""
    if not 0 <= i < self._length:
      raise IndexError(f"GeneratedTrainSource index {i} is outside [0, {self._length}).")
    per_cycle = len(self._offsets)
    return 3 * (i // per_cycle) + self._offsets[i % per_cycle]

  def __getitem__(self, i: int) -> dict[str, Any]:
    from tfds_omniref.omniref import features  # pylint: disable=g-import-not-at-top  (imports TFDS)
    example, scene = generate_example_and_scene(self.config, "train", self.index(int(i)), self.config_name)
    record = features.as_decoded(example)
    if self.category_maps:
      record["category_map"] = category_map(scene)
    return record

  def __repr__(self) -> str:
    kept = tuple(MODALITIES[o] for o in self._offsets)
    return f"GeneratedTrainSource({self.config_name}, modalities={kept}, len={self._length})"


def main(argv: Sequence[str] | None = None) -> None:
  """Command line: render a preview grid of generated examples to a PNG."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--preview", required=True, help="output PNG path")
  parser.add_argument("--split", default="omni_test", choices=SPLITS)
  parser.add_argument("--count", type=int, default=9, help="number of examples (from index --start)")
  parser.add_argument("--start", type=int, default=0)
  parser.add_argument("--image_size", type=int, default=128)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  from omniris_jax.data import visualize  # matplotlib is only needed here  # pylint: disable=g-import-not-at-top

  config = ShapesConfig(image_size=args.image_size, seed=args.seed)
  examples = [generate_example(config, args.split, i) for i in range(args.start, args.start + args.count)]
  visualize.render_preview(examples, args.preview)
  print(f"wrote {args.preview}")


if __name__ == "__main__":
  main()
