"""The built-in SYNTHETIC CLIP-like world: the project's default data.

**This is SYNTHETIC data, not a real model.** No image was seen and no network was run: every
"embedding" here is drawn from a seeded random generator whose geometry is calibrated to what is
published about CLIP ViT-B/32 features, so that the index, the scores and the benchmarks have a
deterministic, offline pool to work on. Numbers measured on it say how the code behaves on data
with CLIP-like geometry; they say nothing about any real data set or model.

The world
---------
* A vocabulary of a few hundred everyday English concepts (things: animals, foods, vehicles,
  household objects, devices, clothing, toys and sports gear, people, nature, buildings; scenes;
  attributes: colours and other properties), plus a few category words ("animal", "food",
  "vehicle", "person", ...). Concepts are drawn with Zipf-like frequencies (``frequencies``; the rank
  order is a seeded permutation, so each seed is a different world).
* Each sample has 1 to 3 concepts (at most one scene and one attribute) and a caption written from
  templates ("a photo of a red bus on the street", "two dogs playing in a park", ...).
* Geometry. Each concept ``c`` has a shared direction ``g_c`` (hierarchical: concepts of one category
  share a category direction, and a category word *is* that direction) and per-modality directions
  ``e^m_c = sqrt(r) g_c + sqrt(1 - r) h^m_c`` (``h`` modality specific), so the image and text
  directions of one concept have cosine about ``r``. A raw embedding of modality ``m`` is::

      u = scale * ( sqrt(w_mean) mu_m            # the modality's common direction (cone + gap)
                  + sqrt(w_concept) C_m           # unit mixture of the sample's concept directions
                  + sqrt(w_instance) z            # per-sample detail shared by image and caption
                  + sqrt(w_template) t            # text only: caption-template style
                  + sqrt(w_noise) n_m )           # anisotropic, modality-specific noise

  ``mu_image`` and ``mu_text`` have cosine ``gap_cos`` (the modality gap), ``scale`` is log-normal
  around ~10 (CLIP's raw feature norms are of that order), so raw norms vary from sample to sample.
  Calibrated targets (measured in ``tests/test_synthetic.py``): matched image-text cosine about 0.3,
  at least 0.1 above random pairs; mean intra-modality cosine 0.3-0.7 (the narrow cone); image and
  text clouds linearly separable; raw clouds off the origin, ``||mean|| / sqrt(trace(cov))`` about 1
  (the "double ellipsoid").
* ``geometry="flat"`` weakens the concept structure (more noise), ``"clustered"`` strengthens it;
  only ``"calibrated"`` (the default) is calibrated.
* Heavy-tailed worlds (``Tails``, ``TAIL_PRESETS``): the calibrated geometry plus one of the ways
  web-scale pools depart from it, so that per-sample KL and the softmax's effective support are
  heavy-tailed. ``"mixture"``: each image's and caption's noise level is drawn from a scale mixture
  (log-normal), so some samples are very generic and some very specific. ``"duplicates"``: a share
  of the images come in clusters of near-identical images (power-law cluster sizes, up to a few
  hundred) with captions written anew for each. ``"templates"``: a share of the captions are generic
  ("image", "a photo", ...), with one fixed text embedding per string that matches many images
  weakly. ``"hubs"``: a few images and captions are pulled toward the centre of the other
  modality's cloud (Pareto strengths), so they are close to many queries. ``"heavy"``: all four at
  once, each milder. Their extra draws come from their own streams (``[seed, 2, block]`` per block,
  ``[seed, 3]`` for the world), so the main stream, and the three worlds above, are unchanged.

Determinism: sample ``i`` depends only on ``(seed, i)`` (and, for its vectors, on ``dim`` and
``geometry``): samples are generated in fixed blocks of ``BLOCK_SIZE`` rows from
``np.random.default_rng([seed, 1, block])`` and sliced, so any batch size yields the same rows.
Captions, concepts and uids do not depend on ``dim``, nor on ``geometry`` except in the
``duplicates`` / ``heavy`` worlds (a duplicate's concepts are its cluster's, its caption is drawn
for them) and the ``templates`` / ``heavy`` worlds (generic captions; ``concepts`` keeps what the
image shows).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass, field
from typing import Iterator

import numpy as np
import pyarrow as pa

from clip_density_index.indexer.errors import InvalidParameter
from clip_density_index.indexer.source import Batch, Part, SourceInfo

WORLD_VERSION = 1  # bump when generation changes, so manifests can tell worlds apart
BLOCK_SIZE = 4096  # rows per generator block; fixed, so rows do not depend on the batch size
MODEL_NAME = "synthetic-clip-world"
LOGIT_SCALE = 100.0
GEOMETRIES = ("calibrated", "flat", "clustered", "mixture", "duplicates", "templates", "hubs", "heavy")

# --------------------------------------------------------------------------------------------
# Vocabulary (literal). Category -> (kind, cohesion, words). The first word of a thing category
# listed in CATEGORY_WORDS is its category word. Words must be distinct in singular and plural
# form, and must not occur in the caption templates below (tests check both).
# --------------------------------------------------------------------------------------------
THING, SCENE, ATTRIBUTE = 0, 1, 2
KIND_NAMES = ("thing", "scene", "attribute")

VOCABULARY: dict[str, tuple[int, float, list[str]]] = {
    "animal": (THING, 0.55, [
        "animal", "dog", "cat", "horse", "cow", "sheep", "pig", "goat", "chicken", "duck", "goose",
        "rabbit", "mouse", "hamster", "bird", "parrot", "owl", "eagle", "pigeon", "fish", "shark",
        "dolphin", "whale", "turtle", "frog", "snake", "lizard", "elephant", "giraffe", "zebra",
        "lion", "tiger", "bear", "wolf", "fox", "deer", "monkey", "squirrel", "butterfly", "bee",
        "spider", "penguin", "camel", "kangaroo",
    ]),
    "food": (THING, 0.55, [
        "food", "pizza", "burger", "sandwich", "salad", "soup", "pasta", "rice", "bread", "cake",
        "cookie", "donut", "pie", "cheese", "egg", "apple", "banana", "orange", "lemon",
        "strawberry", "grape", "watermelon", "pineapple", "cherry", "tomato", "carrot", "potato",
        "broccoli", "corn", "mushroom", "avocado", "steak", "sushi", "taco", "noodle", "coffee",
        "tea", "juice", "wine", "beer", "chocolate", "pancake", "sausage", "cupcake", "pepper",
        "onion",
    ]),
    "vehicle": (THING, 0.55, [
        "vehicle", "car", "bus", "truck", "bicycle", "motorcycle", "train", "tram", "airplane",
        "helicopter", "boat", "ship", "taxi", "van", "tractor", "scooter", "ambulance", "jeep",
        "yacht", "canoe", "limousine",
    ]),
    "household": (THING, 0.45, [
        "furniture", "chair", "table", "sofa", "bed", "lamp", "desk", "shelf", "cabinet", "mirror",
        "clock", "vase", "pillow", "blanket", "rug", "curtain", "door", "window", "fireplace",
        "bathtub", "sink", "toilet", "refrigerator", "oven", "microwave", "stove", "kettle", "cup",
        "mug", "plate", "bowl", "bottle", "glass", "fork", "knife", "spoon", "pan", "pot",
        "basket", "box", "bag", "umbrella", "book", "candle", "teapot", "towel", "key", "wallet",
        "toothbrush", "bucket",
    ]),
    "electronics": (THING, 0.5, [
        "device", "phone", "laptop", "computer", "keyboard", "television", "camera", "speaker",
        "tablet", "monitor", "remote", "robot", "drone", "radio", "watch", "headphone",
    ]),
    "clothing": (THING, 0.5, [
        "clothing", "shirt", "dress", "jacket", "hat", "shoe", "boot", "scarf", "glove", "coat",
        "sweater", "skirt", "backpack", "helmet", "uniform", "sock",
    ]),
    "toy_sport": (THING, 0.4, [
        "toy", "ball", "kite", "surfboard", "skateboard", "ski", "snowboard", "racket", "tent",
        "guitar", "piano", "violin", "drum", "trumpet", "balloon", "doll", "puzzle", "frisbee",
    ]),
    "people": (THING, 0.6, [
        "person", "man", "woman", "child", "boy", "girl", "baby", "family", "chef", "soldier",
        "doctor", "player", "student", "couple",
    ]),
    "nature": (THING, 0.45, [
        "plant", "tree", "flower", "rose", "tulip", "sunflower", "grass", "leaf", "cactus", "rock",
        "cloud", "rainbow", "moon", "star", "sun", "waterfall", "palm",
    ]),
    "building": (THING, 0.5, [
        "building", "house", "bridge", "tower", "castle", "church", "temple", "lighthouse",
        "skyscraper", "fountain", "statue", "fence", "bench", "sign", "barn", "windmill",
    ]),
    "scene": (SCENE, 0.3, [
        "park", "beach", "street", "kitchen", "forest", "city", "office", "bedroom", "garden",
        "mountain", "lake", "river", "desert", "farm", "restaurant", "market", "airport", "field",
        "road", "highway", "harbor", "island", "jungle", "cave", "stadium", "classroom", "library",
        "museum", "bathroom", "ocean", "sky", "snow", "countryside", "village", "playground",
        "zoo", "supermarket", "cafe", "studio", "backyard", "meadow", "valley", "canyon",
        "station", "hospital",
    ]),
    "colour": (ATTRIBUTE, 0.4, [
        "red", "blue", "green", "yellow", "white", "black", "pink", "purple", "brown", "gray",
        "golden", "silver",
    ]),
    "property": (ATTRIBUTE, 0.2, [
        "small", "large", "tiny", "huge", "old", "vintage", "modern", "wooden", "metal", "plastic",
        "shiny", "fluffy", "wet", "dirty", "broken", "colorful", "striped", "spotted", "cute",
        "beautiful", "dark", "bright", "rusty", "frozen", "glowing",
    ]),
}
# Category words: their direction is (almost) the category direction itself, so a prompt such as
# "a photo of food" is close to every food.
CATEGORY_WORDS = {"animal", "food", "vehicle", "furniture", "device", "clothing", "toy", "person",
                  "plant", "building"}
UNCOUNTABLE = {"food", "soup", "pasta", "rice", "bread", "cheese", "broccoli", "corn", "sushi",
               "coffee", "tea", "juice", "wine", "beer", "chocolate", "salad", "furniture",
               "clothing", "grass"}
IRREGULAR_PLURALS = {  # where the suffix rules in ``plural`` would be wrong
    "mouse": "mice", "goose": "geese", "sheep": "sheep", "fish": "fish", "deer": "deer",
    "person": "people", "man": "men", "woman": "women", "child": "children", "knife": "knives",
    "leaf": "leaves", "cactus": "cacti", "shelf": "shelves", "wolf": "wolves", "scarf": "scarves",
    "potato": "potatoes", "tomato": "tomatoes",
}
# Scene -> how it follows a thing ("in", "on", "at", "by"); "the" means only "the" fits ("the sky").
SCENE_PREPOSITIONS = {
    "beach": "on", "street": "on", "mountain": "on", "farm": "on", "road": "on", "highway": "on",
    "island": "on", "market": "at", "airport": "at", "playground": "at", "zoo": "at",
    "station": "at", "lake": "by", "river": "by",
}
THE_ONLY_SCENES = {"sky", "snow", "countryside", "ocean"}

# Template pieces (none of these words may be a concept surface form).
_VERBS = {
    "animal": ["playing", "sitting", "running", "sleeping", "standing", "resting", "walking"],
    "people": ["smiling", "walking", "standing", "sitting", "playing", "posing", "laughing"],
    "vehicle": ["parked", "driving", "waiting", "moving"],
}
_COUNT_WORDS = ["two", "three", "several", "many", "a group of"]
_MASS_PREFIX = ["", "some ", "fresh ", "delicious ", "homemade "]
_ONE_PREFIX = ["a photo of {}", "{}", "a close-up photo of {}", "an image of {}", "{}, stock photo",
               "a picture of {}", "close up of {}", "a blurry photo of {}"]
_ONE_VERB = ["{} {}", "a picture of {} {}", "a photo of {} {}"]
_SCENE_WITH = ["{} {}", "a photo of {} {}", "an image of {} {}", "a blurry photo of {} {}"]
_SCENE_WITH_VERB = ["{} {} {}", "a photo of {} {} {}"]
_TWO = ["{} and {}", "{} next to {}", "a photo of {} with {}", "{} with {}", "an image of {} and {}"]
_THREE = ["{}, {} and {}", "a photo of {}, {} and {}", "{} with {} and {}"]
_SCENE_ONLY = ["a view of {}", "a photo of {}", "{} on a sunny day", "a wide shot of {}",
               "{} at dusk", "landscape photo of {}"]
_ATTR_SCENE = ["a photo of {} {} {}", "{} {} {}", "a wide shot of {} {} {}"]
_ATTR_ONLY = ["abstract {} background", "a {} pattern", "{} texture", "close up of a {} surface"]
# Template ids (text-style directions): offsets of the template families above.
_FAMILIES = [_ONE_PREFIX, _ONE_VERB, _SCENE_WITH, _SCENE_WITH_VERB, _TWO, _THREE, _SCENE_ONLY,
             _ATTR_SCENE, _ATTR_ONLY]
_FAMILY_OFFSET = np.cumsum([0] + [len(f) for f in _FAMILIES]).tolist()
N_TEMPLATES = _FAMILY_OFFSET[-1]

_FOODS = frozenset(VOCABULARY["food"][2])
_TOKEN = re.compile(r"[a-z]+")


def plural(word: str) -> str:
    """English plural of a vocabulary word (irregulars listed, then the usual suffix rules)."""
    if word in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[word]
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return word + "es"
    if word.endswith("y") and word[-2:-1] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def _article(word: str) -> str:
    """'a' or 'an' for the word that follows."""
    if word.startswith(("uni", "use", "eu")):
        return "a"
    return "an" if word[0] in "aeiou" else "a"


# --------------------------------------------------------------------------------------------
# Geometry presets.
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Geometry:
    """Weights (shares of the squared norm) of the parts of a raw embedding, per modality.

    Attributes:
        w_mean_image, w_mean_text: common modality direction (sets the cone and the gap).
        w_concept: the concept mixture (sets how clustered the world is).
        w_instance: per-sample detail shared by a sample's image and caption.
        w_template: caption-template style (text only).
        alignment: cosine between the image and text directions of one concept (``r``).
        gap_cos: cosine between the image and text common directions.
        category_scale: multiplies every category cohesion (how close concepts of a category are).
        weight_jitter: log-normal sigma of the per-sample, per-modality weight of each concept.
        spectrum_power: noise variance of the k-th (shuffled) axis is proportional to
            ``(k + 8) ** -spectrum_power`` (anisotropic: ellipsoids, not spheres).

    The noise share is what is left: ``1 - w_mean - w_concept - w_instance (- w_template)``. Random
    cross-modal cosines fluctuate by about ``sqrt(w_noise_image * w_noise_text / dim)``, so at small
    ``dim`` noise, not concepts, dominates the softmax over ``100 * cos`` (calibrated for ~512).
    """

    w_mean_image: float
    w_mean_text: float
    w_concept: float
    w_instance: float
    w_template: float
    alignment: float
    gap_cos: float
    category_scale: float
    weight_jitter: float
    spectrum_power: float

    def noise(self, modality: str) -> float:
        """Share of the squared norm left to noise for ``modality``."""
        w_mean = self.w_mean_image if modality == "image" else self.w_mean_text
        w_tpl = self.w_template if modality == "text" else 0.0
        return 1.0 - w_mean - self.w_concept - self.w_instance - w_tpl


GEOMETRY_PRESETS: dict[str, Geometry] = {
    "calibrated": Geometry(w_mean_image=0.42, w_mean_text=0.38, w_concept=0.28, w_instance=0.03,
                           w_template=0.02, alignment=0.5, gap_cos=0.3, category_scale=1.0,
                           weight_jitter=0.25, spectrum_power=1.0),
    "flat": Geometry(w_mean_image=0.42, w_mean_text=0.38, w_concept=0.06, w_instance=0.03,
                     w_template=0.01, alignment=0.5, gap_cos=0.3, category_scale=0.5,
                     weight_jitter=0.25, spectrum_power=0.5),
    "clustered": Geometry(w_mean_image=0.42, w_mean_text=0.38, w_concept=0.5, w_instance=0.04,
                          w_template=0.02, alignment=0.8, gap_cos=0.3, category_scale=1.0,
                          weight_jitter=0.15, spectrum_power=1.0),
}


@dataclass(frozen=True)
class Tails:
    """Heavy-tailed departures layered on a base geometry; all zero is the base world, bit for bit.

    Attributes:
        noise_sigma: log-normal sigma of a per-sample, per-modality multiplier (median 1) of the
            noise: large multipliers give generic vectors (flat softmax, KL near 0), small ones
            specific vectors (peaked softmax, KL near log N).
        noise_corr: correlation of the log multipliers of a sample's image and its caption.
        dup_fraction: share of each block's samples that sit in near-duplicate image clusters (the
            first sample of a cluster is its source; the others copy its concepts and instance
            detail, and their images are the source image re-encoded: cosine ~0.98 to it).
        dup_alpha: cluster sizes s follow ``P(s) ~ s ** -dup_alpha`` on ``[2, dup_max]``.
        dup_max: the largest cluster.
        dup_jitter: std of a duplicate's perturbation, relative to the image noise.
        template_fraction: share of captions replaced by a generic caption (``GENERIC_CAPTIONS``,
            Zipf-weighted), whose text embedding is one fixed vector per string: the text cloud's
            common direction plus the frequency-weighted centre of the concept directions, so it
            matches many images weakly and its own image no better than others.
        hub_fraction: share of images, and of captions, that are hubs.
        hub_strength: median squared weight of a hub's pull toward the centre of the other
            modality's cloud (the unscaled vector has squared norm ~1); strengths are Pareto with
            shape ``hub_shape``, capped at ``4 * hub_strength``.
        hub_shape: Pareto shape of the hub strengths.
    """

    noise_sigma: float = 0.0
    noise_corr: float = 0.0
    dup_fraction: float = 0.0
    dup_alpha: float = 2.0
    dup_max: int = 256
    dup_jitter: float = 0.25
    template_fraction: float = 0.0
    hub_fraction: float = 0.0
    hub_strength: float = 0.0
    hub_shape: float = 1.5

    def active(self) -> bool:
        return bool(self.noise_sigma or self.dup_fraction or self.template_fraction or self.hub_fraction)


# Heavy-tailed worlds: (base geometry, tails). The base worlds have no entry (no tails).
TAIL_PRESETS: dict[str, tuple[str, Tails]] = {
    "mixture": ("calibrated", Tails(noise_sigma=1.0, noise_corr=0.5)),
    "duplicates": ("calibrated", Tails(dup_fraction=0.3, dup_alpha=1.5)),
    "templates": ("calibrated", Tails(template_fraction=0.1)),
    "hubs": ("calibrated", Tails(hub_fraction=0.01, hub_strength=0.005)),
    "heavy": ("calibrated", Tails(noise_sigma=0.7, noise_corr=0.5, dup_fraction=0.15, dup_alpha=1.5,
                                  template_fraction=0.05, hub_fraction=0.005, hub_strength=0.005)),
}
# Generic captions of the templates worlds (no concept word; most frequent first).
GENERIC_CAPTIONS = ("image", "a photo", "photo", "untitled", "picture", "stock photo", "an image",
                    "thumbnail", "a picture of something", "no description available", "img",
                    "photo of a thing")
GENERIC_PULL = 0.02  # share of a generic caption's squared norm along the image cloud's centre
# Concept weight in a sample's mixture, by kind (the subject dominates, attributes are faint).
KIND_WEIGHT = np.array([1.0, 0.6, 0.45])
ZIPF_EXPONENT = 1.0
INSTANCE_RANK = 64
CONCEPTS_PER_SAMPLE = ((1, 2, 3), (0.35, 0.4, 0.25))
RAW_SCALE = {"image": (10.0, 0.12), "text": (9.0, 0.10)}  # log-normal (median, sigma) of the scale


@dataclass
class _TailDraws:
    """A block's draws for the heavy-tailed worlds (None / empty: the world has no such tail)."""

    generic: np.ndarray | None = None  # rows whose caption is generic
    kind: np.ndarray | None = None  # which generic caption each has
    noise_mult: np.ndarray | None = None  # (2, B) noise multipliers, image and text
    hubs: dict = field(default_factory=dict)  # modality -> (rows, pull strengths)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


class SyntheticWorld:
    """A seeded SYNTHETIC CLIP-like world: concepts, captions and raw image / text embeddings.

    Args:
        seed: non-negative integer; the whole world (concept ranks, directions, samples) follows it.
        dim: embedding dimension (the calibration is for dims of a few hundred; >= 8 accepted).
        geometry: "calibrated" (default, CLIP ViT-B/32-like numbers), "flat" (weak concept
            clusters, more noise), "clustered" (strong concept clusters), or a heavy-tailed world
            on the calibrated geometry: "mixture", "duplicates", "templates", "hubs", "heavy"
            (``TAIL_PRESETS``, ``Tails``).

    Attributes:
        concepts: the vocabulary, in a fixed literal order.
        frequencies: Zipf-like sampling weight of each concept (sums to 1).
        kinds: per concept, 0 = thing, 1 = scene, 2 = attribute.
        categories: per concept, its category name ("animal", "food", "scene", ...).

    Raises:
        InvalidParameter: for a negative seed, a dimension below 8 or an unknown geometry.
    """

    def __init__(self, seed: int = 0, dim: int = 512, geometry: str = "calibrated"):
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
            raise InvalidParameter(f"synthetic world seed must be a non-negative integer, got {seed!r}")
        if not isinstance(dim, (int, np.integer)) or isinstance(dim, bool) or dim < 8:
            raise InvalidParameter(f"synthetic world dim must be an integer >= 8, got {dim!r}")
        if geometry not in GEOMETRIES:
            raise InvalidParameter(
                f"unknown synthetic geometry {geometry!r}; choose one of {', '.join(GEOMETRIES)}")
        self.seed = int(seed)
        self.dim = int(dim)
        self.geometry = geometry
        base, self._tails = TAIL_PRESETS.get(geometry, (geometry, Tails()))
        self._g = GEOMETRY_PRESETS[base]

        cohesion = self._init_vocabulary()
        self._init_geometry(cohesion)
        self._block_cache: dict[int, tuple[pa.Table, np.ndarray, np.ndarray]] = {}

    def _init_vocabulary(self) -> np.ndarray:
        """The concepts, their categories and kinds in the vocabulary's literal order; returns each
        concept's cohesion with its category."""
        self.concepts: list[str] = []
        self.categories: list[str] = []
        kinds, cohesion = [], []
        for cat, (kind, coh, words) in VOCABULARY.items():
            for w in words:
                self.concepts.append(w)
                self.categories.append(cat)
                kinds.append(kind)
                cohesion.append(0.95 if w in CATEGORY_WORDS else coh)
        self.kinds = np.array(kinds, dtype=np.int8)
        self._kind_list = kinds  # per-row caption code reads plain ints
        self.concept_index = {c: i for i, c in enumerate(self.concepts)}
        self._surface = _surface_forms(self.concepts)
        return np.array(cohesion)

    def _init_geometry(self, cohesion: np.ndarray) -> None:
        """Concept frequencies and every direction of the world, from the world stream ``[seed, 0]``
        (draws in a fixed order: the world depends on it)."""
        V, D = len(self.concepts), self.dim
        rng = np.random.default_rng([self.seed, 0])  # world stream (samples use [seed, 1, block])
        ranks = rng.permutation(V)
        zipf = 1.0 / (ranks + 1.0) ** ZIPF_EXPONENT
        self.frequencies = zipf / zipf.sum()

        # Hierarchical shared directions g_c, then per-modality directions e^m_c.
        cat_names = list(VOCABULARY)
        cat_dirs = _unit_rows(rng.standard_normal((len(cat_names), D)))
        cat_of = np.array([cat_names.index(c) for c in self.categories])
        coh = np.clip(cohesion * self._g.category_scale, 0.0, 0.99)
        own = _unit_rows(rng.standard_normal((V, D)))
        shared = _unit_rows(np.sqrt(coh)[:, None] * cat_dirs[cat_of] + np.sqrt(1 - coh)[:, None] * own)
        r = self._g.alignment
        dirs = {}
        for m in ("image", "text"):
            spec = _unit_rows(rng.standard_normal((V, D)))
            dirs[m] = _unit_rows(np.sqrt(r) * shared + np.sqrt(1 - r) * spec)
        # Modality means with cosine gap_cos.
        a, b = _unit_rows(rng.standard_normal((2, D)))
        b = _unit_rows(b - (a @ b) * a)
        gc = self._g.gap_cos
        means = {"image": a, "text": gc * a + np.sqrt(1 - gc * gc) * b}
        # Anisotropic noise: a power-law spectrum on independently shuffled axes per modality.
        spectrum = (np.arange(D) + 8.0) ** -self._g.spectrum_power
        spectrum /= spectrum.sum()
        noise_std = {m: np.sqrt(spectrum[rng.permutation(D)]) for m in ("image", "text")}
        templates = _unit_rows(rng.standard_normal((N_TEMPLATES, D)))
        # Per-sample detail shared by image and caption lives in a random INSTANCE_RANK-dim
        # subspace (cheap to draw); E||z||^2 = w_instance.
        rank = min(INSTANCE_RANK, D)
        basis = np.linalg.qr(rng.standard_normal((D, rank)))[0].T

        f32 = np.float32
        # Concept direction tables with a zero row at index V (the "no concept" slot).
        self._dirs = {m: np.vstack([dirs[m], np.zeros((1, D))]).astype(f32) for m in dirs}
        self._mean_part = {m: (np.sqrt(self._w_mean(m)) * means[m]).astype(f32) for m in means}
        self._noise_std = {m: (np.sqrt(self._g.noise(m)) * noise_std[m]).astype(f32) for m in means}
        self._templates = (np.sqrt(self._g.w_template) * templates).astype(f32)
        self._instance_basis = (np.sqrt(self._g.w_instance / rank) * basis).astype(f32)
        if self._tails.active():
            self._init_tails(dirs, means)

    def _init_tails(self, dirs: dict[str, np.ndarray], means: dict[str, np.ndarray]) -> None:
        """World-level parts of the heavy-tailed worlds (own stream ``[seed, 3]``)."""
        rng = np.random.default_rng([self.seed, 3])
        D, f32 = self.dim, np.float32
        # Centre of each modality's cloud: common direction + frequency-weighted concept centre.
        centre = {m: _unit_rows(self.frequencies @ dirs[m]) for m in dirs}
        cloud = {m: _unit_rows(np.sqrt(self._w_mean(m)) * means[m] + np.sqrt(self._g.w_concept) * centre[m])
                 for m in dirs}
        # A hub of modality m is pulled toward the other modality's cloud.
        self._hub_dir = {"image": cloud["text"].astype(f32), "text": cloud["image"].astype(f32)}
        # Generic captions: the common text direction, a weak pull toward the image cloud (they
        # match every image a little better than a random caption does) and a direction of their own.
        own = _unit_rows(rng.standard_normal((len(GENERIC_CAPTIONS), D)))
        w_own = max(1.0 - self._w_mean("text") - GENERIC_PULL, 0.0)
        gen = (np.sqrt(self._w_mean("text")) * means["text"] + np.sqrt(GENERIC_PULL) * cloud["image"]
               + np.sqrt(w_own) * own)
        self._generic = (_unit_rows(gen) * RAW_SCALE["text"][0]).astype(f32)
        p = 1.0 / np.arange(1, len(GENERIC_CAPTIONS) + 1)
        self._generic_p = p / p.sum()

    def __getstate__(self) -> dict:
        """Copied without its cache of generated blocks (a Ray build sends the world to workers)."""
        return {**self.__dict__, "_block_cache": {}}

    # ----------------------------------------------------------------------------------------
    def _w_mean(self, modality: str) -> float:
        return self._g.w_mean_image if modality == "image" else self._g.w_mean_text

    def params(self) -> dict:
        """JSON-able description of the world (stored in the index manifest)."""
        return {
            "generator": "clip-density-index built-in synthetic CLIP-like world",
            "synthetic": True,
            "note": "SYNTHETIC data: seeded random vectors with CLIP-like geometry, not a real model",
            "world_version": WORLD_VERSION,
            "seed": self.seed,
            "dim": self.dim,
            "geometry": self.geometry,
            "geometry_params": asdict(self._g),
            **({"tails": asdict(self._tails)} if self._tails.active() else {}),
            "n_concepts": len(self.concepts),
            "zipf_exponent": ZIPF_EXPONENT,
            "concepts_per_sample": {"counts": list(CONCEPTS_PER_SAMPLE[0]),
                                    "probabilities": list(CONCEPTS_PER_SAMPLE[1])},
            "kind_weights": dict(zip(KIND_NAMES, KIND_WEIGHT.tolist())),
            "raw_scale": {m: {"median": s[0], "log_sigma": s[1]} for m, s in RAW_SCALE.items()},
            "block_size": BLOCK_SIZE,
            "logit_scale": LOGIT_SCALE,
        }

    # ----------------------------------------------------------------------------------------
    def concepts_in(self, text: str) -> list[str]:
        """Known concepts mentioned in ``text``, in order of first mention, without repeats.

        Matching is by whole lower-cased words; singular and plural forms ("dog", "dogs",
        "people", "knives") both map to the concept.

        Args:
            text: any text, e.g. a caption or a prompt.

        Returns:
            The concept names found (possibly empty).
        """
        found: list[str] = []
        for tok in _TOKEN.findall(str(text).lower()):
            c = self._surface.get(tok)
            if c is None:
                c = _strip_plural(tok, self._surface)
            if c is not None and c not in found:
                found.append(c)
        return found

    def encode_prompt(self, text: str) -> np.ndarray:
        """Raw text embedding of a free-text prompt, built the way caption embeddings are built.

        The prompt is parsed into known concepts (``concepts_in``); its embedding is the text
        modality's common direction plus the weighted mixture of their text directions, without
        noise (so it is deterministic), scaled to the median raw text norm. Other words are ignored.

        Args:
            text: the prompt, e.g. "a photo of a dog".

        Returns:
            ``(dim,)`` float32 raw (unnormalised) text embedding.

        Raises:
            InvalidParameter: if the prompt names no known concept.
        """
        found = self.concepts_in(text)
        if not found:
            examples = ", ".join(repr(c) for c in ("dog", "pizza", "bus", "beach", "red", "food"))
            raise InvalidParameter(
                f"prompt {text!r} contains no concept known to the synthetic world; use words such "
                f"as {examples} ({len(self.concepts)} concepts in all: SyntheticWorld.concepts)")
        idx = np.array([self.concept_index[c] for c in found])
        w = KIND_WEIGHT[self.kinds[idx]][:, None]
        mix = _unit_rows((w * self._dirs["text"][idx].astype(np.float64)).sum(0))
        u = self._mean_part["text"].astype(np.float64) + np.sqrt(self._g.w_concept) * mix
        u = _unit_rows(u) * RAW_SCALE["text"][0]
        return u.astype(np.float32)

    # ----------------------------------------------------------------------------------------
    def sample(self, start: int, count: int) -> tuple[pa.Table, np.ndarray, np.ndarray]:
        """Samples ``[start, start + count)`` of the world.

        Args:
            start: index of the first sample (>= 0).
            count: number of samples (>= 0).

        Returns:
            ``(meta, image_raw, text_raw)``: a pyarrow table with columns ``uid`` (32 lowercase hex
            digits), ``caption``, ``concepts`` (list<string>) and ``synthetic`` (always True), and
            two ``(count, dim)`` float32 arrays of raw embeddings. Identical for any split of the
            range into calls.

        Raises:
            InvalidParameter: for a negative start or count.
        """
        if start < 0 or count < 0:
            raise InvalidParameter(f"sample range needs start >= 0 and count >= 0, got start={start}, "
                                   f"count={count}")
        if count == 0:
            return _empty_meta(), np.zeros((0, self.dim), np.float32), np.zeros((0, self.dim), np.float32)
        metas = []
        images = np.empty((count, self.dim), np.float32)
        texts = np.empty((count, self.dim), np.float32)
        stop = start + count
        for block in range(start // BLOCK_SIZE, (stop - 1) // BLOCK_SIZE + 1):
            meta, image, text = self._block(block)
            lo = max(start - block * BLOCK_SIZE, 0)
            hi = min(stop - block * BLOCK_SIZE, BLOCK_SIZE)
            at = block * BLOCK_SIZE + lo - start
            metas.append(meta.slice(lo, hi - lo))
            images[at:at + hi - lo] = image[lo:hi]
            texts[at:at + hi - lo] = text[lo:hi]
        meta = pa.concat_tables(metas) if len(metas) > 1 else metas[0]
        return meta, images, texts

    def _block(self, block: int) -> tuple[pa.Table, np.ndarray, np.ndarray]:
        """One full block of ``BLOCK_SIZE`` rows (the last two blocks are cached)."""
        if block in self._block_cache:
            return self._block_cache[block]
        out = self._generate_block(block)
        if len(self._block_cache) >= 2:
            self._block_cache.pop(next(iter(self._block_cache)))
        self._block_cache[block] = out
        return out

    def _generate_block(self, block: int) -> tuple[pa.Table, np.ndarray, np.ndarray]:
        """One block from its streams: ``rng`` ``[seed, 1, block]`` (concepts, choices, scales,
        vectors) and, for the heavy-tailed worlds, ``trng`` ``[seed, 2, block]``. The helpers draw in
        a fixed order; the world depends on it."""
        B = BLOCK_SIZE
        rng = np.random.default_rng([self.seed, 1, block])
        slots = self._draw_slots(rng)
        choices = rng.integers(0, 1 << 30, size=(B, 6))
        jitter = rng.lognormal(0.0, self._g.weight_jitter, size=(2, B, 3))
        scale = {m: RAW_SCALE[m][0] * rng.lognormal(0.0, RAW_SCALE[m][1], size=B) for m in ("image", "text")}
        # Heavy-tailed worlds: their own stream, so the main one (and the base worlds) are unchanged.
        t = self._tails
        trng = np.random.default_rng([self.seed, 2, block]) if t.active() else None
        src = None  # each row's duplicate-cluster source (itself when not a duplicate)
        if t.dup_fraction:
            src = self._duplicate_sources(trng, B)
            slots = slots[src]
            jitter[0] = jitter[0][src]  # a duplicate image shows its source's concepts, as strongly

        captions, concept_lists, tpl = self._captions(slots, choices)  # strings only: no draws
        tails = self._draw_tails(trng)
        if tails.generic is not None:
            for i, k in zip(tails.generic.tolist(), tails.kind.tolist()):
                captions[i] = GENERIC_CAPTIONS[k]
        out = self._vectors(rng, slots, jitter, scale, src, tpl, tails)
        if src is not None:
            self._reencode_duplicates(trng, out, src, scale["image"])
        if tails.generic is not None:
            out["text"][tails.generic] = self._generic[tails.kind]  # one fixed embedding per generic string
        first = block * B
        uids = [hashlib.md5(f"synthetic:{self.seed}:{i}".encode()).hexdigest()
                for i in range(first, first + B)]
        meta = pa.table({
            "uid": pa.array(uids, pa.string()),
            "caption": pa.array(captions, pa.string()),
            "concepts": pa.array(concept_lists, pa.list_(pa.string())),
            "synthetic": pa.array(np.ones(B, dtype=bool), pa.bool_()),
        })
        return meta, out["image"], out["text"]

    def _draw_slots(self, rng: np.random.Generator) -> np.ndarray:
        """(B, 3) concept ids of each sample (-1: empty slot): up to 3 distinct Zipf draws, at most
        one scene and one attribute."""
        B, V = BLOCK_SIZE, len(self.concepts)
        cand = rng.choice(V, size=(B, 8), p=self.frequencies)
        k = rng.choice(CONCEPTS_PER_SAMPLE[0], size=B, p=CONCEPTS_PER_SAMPLE[1])
        rows = np.arange(B)
        rest = cand[:, 1:]
        m1 = rest != cand[:, :1]
        c1 = rest[rows, m1.argmax(1)]
        m2 = m1 & (rest != c1[:, None])
        c2 = rest[rows, m2.argmax(1)]
        slots = np.stack([cand[:, 0], np.where(m1.any(1) & (k >= 2), c1, -1),
                          np.where(m2.any(1) & (k >= 3), c2, -1)], axis=1)
        for j in (1, 2):
            kind_j = np.where(slots[:, j] >= 0, self.kinds[slots[:, j]], -1)
            for i in range(j):
                kind_i = np.where(slots[:, i] >= 0, self.kinds[slots[:, i]], -1)
                clash = (kind_j == kind_i) & (kind_j != THING) & (kind_j >= 0)
                slots[clash, j] = -1
        return slots

    def _draw_tails(self, trng: np.random.Generator | None) -> "_TailDraws":
        """A block's generic captions, noise multipliers and hubs (whichever the world has)."""
        t, B = self._tails, BLOCK_SIZE
        draws = _TailDraws()
        if t.template_fraction:
            draws.generic = np.flatnonzero(trng.random(B) < t.template_fraction)
            draws.kind = trng.choice(len(GENERIC_CAPTIONS), size=len(draws.generic), p=self._generic_p)
        if t.noise_sigma:
            shared = np.sqrt(t.noise_corr) * trng.standard_normal(B)
            own = np.sqrt(1.0 - t.noise_corr) * trng.standard_normal((2, B))
            draws.noise_mult = np.exp(t.noise_sigma * (shared + own)).astype(np.float32)
        if t.hub_fraction:
            for m in ("image", "text"):
                rows = np.flatnonzero(trng.random(B) < t.hub_fraction)
                strength = t.hub_strength * (trng.pareto(t.hub_shape, len(rows)) + 1.0) / 2.0 ** (1.0 / t.hub_shape)
                draws.hubs[m] = (rows, np.sqrt(np.minimum(strength, 4.0 * t.hub_strength)).astype(np.float32))
        return draws

    def _vectors(self, rng: np.random.Generator, slots: np.ndarray, jitter: np.ndarray,
                 scale: dict[str, np.ndarray], src: np.ndarray | None, tpl: np.ndarray,
                 tails: "_TailDraws") -> dict[str, np.ndarray]:
        """Raw image and text vectors of a block (vectorised); the instance part z is shared by a
        sample's image and caption."""
        B, D = BLOCK_SIZE, self.dim
        z = rng.standard_normal((B, self._instance_basis.shape[0]), dtype=np.float32) @ self._instance_basis
        if src is not None:
            z = z[src]
        kw = np.where(slots >= 0, KIND_WEIGHT[self.kinds[slots]], 0.0)
        out = {}
        for mi, m in enumerate(("image", "text")):
            w = (kw * jitter[mi]).astype(np.float32)
            mix = np.einsum("bk,bkd->bd", w, self._dirs[m][slots])  # slot -1 -> the zero row
            mix *= (np.float32(np.sqrt(self._g.w_concept))
                    / np.sqrt(np.einsum("bd,bd->b", mix, mix)))[:, None]
            x = rng.standard_normal((B, D), dtype=np.float32)
            x *= self._noise_std[m]
            if tails.noise_mult is not None:
                x *= tails.noise_mult[mi][:, None]
            x += mix
            x += z
            x += self._mean_part[m]
            if m == "text":
                x += self._templates[tpl]
            if m in tails.hubs:
                rows, pull = tails.hubs[m]
                x[rows] += pull[:, None] * self._hub_dir[m]
            x *= scale[m].astype(np.float32)[:, None]
            out[m] = x
        return out

    def _reencode_duplicates(self, trng: np.random.Generator, out: dict[str, np.ndarray], src: np.ndarray,
                             scale: np.ndarray) -> None:
        """A duplicate's image is its source's, re-encoded: rescaled a little, slightly perturbed."""
        dup = np.flatnonzero(src != np.arange(BLOCK_SIZE))
        s = src[dup]
        pert = trng.standard_normal((len(dup), self.dim), dtype=np.float32)
        pert *= self._noise_std["image"] * np.float32(self._tails.dup_jitter)
        ratio = trng.lognormal(0.0, 0.02, size=len(dup)).astype(np.float32)
        out["image"][dup] = (out["image"][s] * ratio[:, None] + pert * scale[s].astype(np.float32)[:, None])

    def _duplicate_sources(self, rng: np.random.Generator, B: int) -> np.ndarray:
        """Near-duplicate clusters of one block: each row's source row (itself outside clusters).

        Cluster sizes are power-law on ``[2, dup_max]``; they fill ``dup_fraction`` of the block; the
        rows of a cluster are random positions in the block.
        """
        t = self._tails
        support = np.arange(2, t.dup_max + 1)
        p = support.astype(np.float64) ** -t.dup_alpha
        target = int(round(t.dup_fraction * B))
        sizes = rng.choice(support, size=max(target // 2, 1), p=p / p.sum())
        ends = np.cumsum(sizes)
        sizes = sizes[: np.searchsorted(ends, target, side="right")]  # clusters that fit in full
        perm = rng.permutation(B)
        src = np.arange(B)
        at = 0
        for size in sizes.tolist():
            members = perm[at:at + size]
            src[members] = members[0]
            at += size
        return src

    def _captions(self, slots: np.ndarray, choices: np.ndarray) -> tuple[list[str], list[list[str]], np.ndarray]:
        """Caption strings, concept lists (in caption order) and template ids for one block."""
        captions: list[str] = []
        lists: list[list[str]] = []
        tpl = np.empty(len(slots), dtype=np.int64)
        for row, (s, r) in enumerate(zip(slots.tolist(), choices.tolist())):
            things, attr, scene = self._roles(s)
            order: list[str] = []
            if things:
                text, fam, fi = self._things_caption(things, attr, scene, r, order)
            elif scene is not None:
                text, fam, fi = self._scene_caption(scene, attr, r, order)
            else:
                order.append(self.concepts[attr])
                fam, fi = 8, r[0] % len(_ATTR_ONLY)
                text = _ATTR_ONLY[fi].format(self.concepts[attr])
            if r[5] % 4 == 0:
                text = text[0].upper() + text[1:]
            captions.append(text)
            lists.append(order)
            tpl[row] = _FAMILY_OFFSET[fam] + fi
        return captions, lists, tpl

    def _roles(self, slots: list[int]) -> tuple[list[int], int | None, int | None]:
        """(things, attribute, scene) of a sample's concept slots (-1: empty)."""
        things, attr, scene = [], None, None
        for c in slots:
            if c < 0:
                continue
            kind = self._kind_list[c]
            if kind == THING:
                things.append(c)
            elif kind == SCENE:
                scene = c
            else:
                attr = c
        return things, attr, scene

    def _things_caption(self, things: list[int], attr: int | None, scene: int | None, r: list[int],
                        order: list[str]) -> tuple[str, int, int]:
        """(caption, template family, template) of a sample showing things (the first one with the
        attribute), maybe in a scene; ``order`` gets the concepts in caption order."""
        concepts, cats = self.concepts, self.categories
        phrases = []
        for j, c in enumerate(things):
            a = concepts[attr] if (j == 0 and attr is not None) else None
            if a is not None:
                order.append(a)
            order.append(concepts[c])
            phrases.append(_thing_phrase(concepts[c], a, r[1] if j == 0 else r[1] % 7))
        cat = cats[things[0]]
        verbs = _VERBS.get(cat if cat in ("animal", "people", "vehicle") else "", None)
        if scene is not None:
            order.append(concepts[scene])
            sp = _scene_phrase(concepts[scene], r[3])
            if len(things) > 1:
                fam, fi = 4, r[0] % len(_TWO)
                return _TWO[fi].format(*phrases) + " " + sp, fam, fi
            if verbs and r[2] % 2 == 0:
                fam, fi = 3, r[0] % len(_SCENE_WITH_VERB)
                return _SCENE_WITH_VERB[fi].format(phrases[0], verbs[r[4] % len(verbs)], sp), fam, fi
            fam, fi = 2, r[0] % len(_SCENE_WITH)
            return _SCENE_WITH[fi].format(phrases[0], sp), fam, fi
        if len(things) == 1:
            if verbs and r[2] % 3 == 0:
                fam, fi = 1, r[0] % len(_ONE_VERB)
                return _ONE_VERB[fi].format(phrases[0], verbs[r[4] % len(verbs)]), fam, fi
            fam, fi = 0, r[0] % len(_ONE_PREFIX)
            return _ONE_PREFIX[fi].format(phrases[0]), fam, fi
        if len(things) == 2:
            fam, fi = 4, r[0] % len(_TWO)
            return _TWO[fi].format(*phrases), fam, fi
        fam, fi = 5, r[0] % len(_THREE)
        return _THREE[fi].format(*phrases), fam, fi

    def _scene_caption(self, scene: int, attr: int | None, r: list[int], order: list[str]) -> tuple[str, int, int]:
        """(caption, template family, template) of a sample showing only a scene (maybe with an
        attribute); ``order`` gets the concepts in caption order."""
        sw = self.concepts[scene]
        if attr is not None:
            a = self.concepts[attr]
            order += [a, sw]
            fi = r[0] % len(_ATTR_SCENE)
            return _ATTR_SCENE[fi].format(_article(a), a, sw), 7, fi
        order.append(sw)
        fi = r[0] % len(_SCENE_ONLY)
        art = "the" if (sw in THE_ONLY_SCENES or r[3] % 2) else _article(sw)
        return _SCENE_ONLY[fi].format(f"{art} {sw}"), 6, fi


def _thing_phrase(word: str, attr: str | None, r: int) -> str:
    """'a red bus', 'two dogs', 'some fresh rice', ... for one thing (with an optional attribute)."""
    head = f"{attr} {word}" if attr else word
    if word in UNCOUNTABLE:
        prefixes = _MASS_PREFIX if word in _FOODS else _MASS_PREFIX[:2]
        return prefixes[r % len(prefixes)] + head
    c = r % 12
    if c < 8:
        return f"{_article(head)} {head}"
    many = f"{attr} {plural(word)}" if attr else plural(word)
    return f"{_COUNT_WORDS[(c - 8) + (r // 12) % 2]} {many}"


def _scene_phrase(scene: str, r: int) -> str:
    """'in a park', 'on the beach', 'in the sky', ... following a thing."""
    prep = SCENE_PREPOSITIONS.get(scene, "in")
    art = "the" if (scene in THE_ONLY_SCENES or r % 2) else _article(scene)
    return f"{prep} {art} {scene}"


def _surface_forms(concepts: list[str]) -> dict[str, str]:
    """Map every singular and plural form to its concept; refuse ambiguous vocabularies."""
    forms: dict[str, str] = {}
    for c in concepts:
        for f in (c, plural(c)):
            if forms.get(f, c) != c:
                raise RuntimeError(f"synthetic vocabulary: form {f!r} names both {forms[f]!r} and {c!r}")
            forms[f] = c
    return forms


def _strip_plural(token: str, forms: dict[str, str]) -> str | None:
    """Fallback for plurals the rules did not list ("cactuses", "tomatos")."""
    for suffix, repl in (("ies", "y"), ("ves", "f"), ("es", ""), ("s", "")):
        if token.endswith(suffix) and len(token) > len(suffix) + 1:
            c = forms.get(token[: -len(suffix)] + repl)
            if c is not None:
                return c
    return None


def _empty_meta() -> pa.Table:
    return pa.table({
        "uid": pa.array([], pa.string()),
        "caption": pa.array([], pa.string()),
        "concepts": pa.array([], pa.list_(pa.string())),
        "synthetic": pa.array([], pa.bool_()),
    })


class SyntheticSource:
    """``indexer.source.Source`` over the first ``n`` samples of a ``SyntheticWorld``.

    SYNTHETIC data: ``info.synthetic`` is True and the manifest records the world's parameters.

    Args:
        n: number of samples (>= 1).
        seed: world seed.
        dim: embedding dimension.
        geometry: one of ``GEOMETRIES`` ("calibrated", "flat", "clustered", or a heavy-tailed world:
            "mixture", "duplicates", "templates", "hubs", "heavy"; see ``TAIL_PRESETS``).

    Raises:
        InvalidParameter: for n < 1 or an invalid world parameter.
    """

    def __init__(self, n: int = 100_000, seed: int = 0, dim: int = 512, geometry: str = "calibrated"):
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
            raise InvalidParameter(f"synthetic source needs n >= 1 samples, got {n!r}")
        self.n = int(n)
        self.world = SyntheticWorld(seed=seed, dim=dim, geometry=geometry)
        self.info = SourceInfo(
            source="synthetic", n=self.n, dim=self.world.dim, raw_known=True,
            logit_scale=LOGIT_SCALE, model=MODEL_NAME, pretrained=None, synthetic=True,
            extra=self.world.params(),
        )

    def batches(self, batch_size: int) -> Iterator[Batch]:
        """Yield the pool in order, ``batch_size`` rows at a time (the last batch may be shorter).

        Args:
            batch_size: rows per batch (>= 1).

        Yields:
            ``Batch`` with ``origin="synthetic"`` and ``row_offset`` = index of its first sample.
        """
        yield from self._rows(0, self.n, batch_size)

    def parts(self) -> list[Part]:
        """The pool in parts of one generator block (``BLOCK_SIZE`` rows), read on their own by a
        Ray build (``indexer.parallel``)."""
        return [Part(i, start, min(BLOCK_SIZE, self.n - start))
                for i, start in enumerate(range(0, self.n, BLOCK_SIZE))]

    def read_part(self, part: Part, batch_size: int) -> Iterator[Batch]:
        """The batches of one part: the same rows ``batches`` yields there."""
        yield from self._rows(part.start, part.start + part.rows, batch_size)

    def _rows(self, start: int, stop: int, batch_size: int) -> Iterator[Batch]:
        if batch_size < 1:
            raise InvalidParameter(f"batch_size must be >= 1, got {batch_size!r}")
        for first in range(start, stop, batch_size):
            meta, image, text = self.world.sample(first, min(batch_size, stop - first))
            yield Batch(meta=meta, image=image, text=text, origin="synthetic", row_offset=first)
