"""`attnseg evaluate synthetic`: every method on held-out synthetic scenes, through the API (issue 14).

The scenes are the seeded world of `workers/evaluation/synthetic.py`; the scores are those of
`metrics.py` (docs/methods.md section 4), computed on the label maps the Python client decodes from
the API's RLE masks at the picture's size, so the whole chain (upload, decode, working size, model,
method, labels at picture size, RLE, client) is what is measured. A method's jobs are submitted
together and then read back; its seconds per scene are the wall time over the scenes.

- unsupervised (DiffSeg): segments matched to the scene's colour classes (Hungarian, per scene).
- selfcross: each colour word present in the scene is a class; mIoU over the colour classes and
  background.
- oneshot, oneshot_2x2: a model trained on one scene's colour parts segments the held-out scenes
  with 1 and 2x2 crops; colours it was not trained on are background there.
- referring: concepts whose vector is a colour word's embedding (`tiny_colour.colour_embedding`,
  so only a tiny-colour worker can read them), imported through /concepts/import under names that
  say nothing of the colour; each scene's queries `a <identifier>` name two of its objects, all of
  class "shape" and each of its own colour (Mug19 protocol, docs/methods.md 4.5). The queries leave
  the class word out: the span of `<identifier> shape` would add "shape"'s attention, which in
  tiny-colour covers every colour alike, to the concept's (docs/methods.md 2.4.5 step 3).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from safetensors.torch import save

from attnseg.client import Client, Result
from workers.evaluation.evaluate import plain as json_value
from workers.evaluation.metrics import ConfusionScore, PartIoUScore, ReferringScore, UnsupervisedScore
from workers.evaluation.synthetic import CLASS_NAMES, SIZE_RANGE, Scene, make_scene
from workers.methods.referring import assign_queries, instance_labels
from workers.models.tiny_colour import colour_embedding
from workers.models.tiny_random import ARCHITECTURES

METHODS = ("unsupervised", "selfcross", "oneshot", "oneshot_2x2", "referring")
CLASS_WORD = "shape"  # tiny-colour's generic word: its cross-attention covers every coloured object
QUERIES_PER_SCENE = 2
TRAIN_SEED_OFFSET = 1_000_000  # the one-shot training scene's seed, away from the held-out ones
CONCEPT_PREFIX = "hue"  # concept identifiers hue-1 ... hue-8, in a seeded order of the colours
# Referring is also scored per band of the queried object's size (fraction of the shorter side): the
# small objects are where it fails (bench/RESULTS.md).
SIZE_BANDS = (0.15, 0.18, 0.22)


def class_ids(names: Sequence[str]) -> np.ndarray:
    """Label id -> class id lookup for a result labelled 0 = background, i = names[i - 1]: (len + 1,)."""
    return np.array([0] + [CLASS_NAMES.index(name) + 1 for name in names], np.int64)


def scenes(count: int, seed: int, height: int, width: int, **options) -> list[Scene]:
    """`count` scenes with seeds seed, seed + 1, ...; options go to make_scene."""
    return [make_scene(seed + index, height, width, **options) for index in range(count)]


def timed(run: Callable[[], dict], count: int) -> dict:
    started = time.perf_counter()
    scores = run()
    return {**scores, "scenes": count, "seconds_per_scene": (time.perf_counter() - started) / max(count, 1)}


def plain(scores: dict) -> dict:
    """Scores as JSON values (arrays as lists, NaN as None)."""
    return {key: json_value(value) for key, value in scores.items()}


def score_unsupervised(client: Client, world: list[Scene], resolution: int) -> dict:
    """DiffSeg's segments against each scene's colour classes: Hungarian-matched mIoU, pixel accuracy."""
    jobs = [client.segment_unsupervised(scene.image, resolution=resolution, seed=scene.seed) for scene in world]
    score = UnsupervisedScore(len(CLASS_NAMES) + 1)
    for scene, job in zip(world, jobs):
        score.add(job.result().label_map(), scene.classes)
    return plain(score.result())


def score_text(client: Client, world: list[Scene], resolution: int, method: str = "selfcross") -> dict:
    """Each scene's colour words as classes; confusion over all colour classes and background."""
    jobs = [
        client.segment_text(scene.image, scene.present, method, resolution=resolution, seed=scene.seed)
        for scene in world
    ]
    score = ConfusionScore(len(CLASS_NAMES) + 1)
    for scene, job in zip(world, jobs):
        score.add(class_ids(scene.present)[job.result().label_map()], scene.classes)
    result = score.result()
    del result["confusion"]
    return plain(result)


def part_truth(scene: Scene, parts: Sequence[str]) -> np.ndarray:
    """The scene's classes as part ids: 0 background (and colours that are not parts), i = parts[i - 1]."""
    lookup = np.zeros(len(CLASS_NAMES) + 1, np.int64)
    for index, name in enumerate(parts, start=1):
        lookup[CLASS_NAMES.index(name) + 1] = index
    return lookup[scene.classes]


def training_scene(seed: int, height: int, width: int) -> Scene:
    """The one-shot training scene: one object of each colour (as many as fit), away from the held-out seeds."""
    return make_scene(seed + TRAIN_SEED_OFFSET, height, width, objects=(len(CLASS_NAMES),) * 2, repeat=0.0)


def train_parts(client: Client, scene: Scene, resolution: int, epochs: int):
    """A one-shot model of the scene's colours (parts named by their colour words), trained."""
    parts = scene.present
    model = client.train_oneshot(
        scene.image, part_truth(scene, parts).astype(np.uint8), parts, epochs=epochs, resolution=resolution, seed=0
    )
    return model.wait()


def score_oneshot(client: Client, model, world: list[Scene], crops_per_side: int) -> dict:
    """The model's parts on the held-out scenes: per-part IoU over the scenes where a part occurs."""
    parts = model.labels[1:]
    jobs = [model.segment(scene.image, crops_per_side=crops_per_side, seed=scene.seed) for scene in world]
    score = PartIoUScore(len(parts) + 1)
    for scene, job in zip(world, jobs):
        score.add(job.result().label_map(), part_truth(scene, parts))
    return {**plain(score.result()), "parts": ["background", *parts]}


def concept_file(identifier: str, word: str) -> bytes:
    """diffusers' learned_embeds.safetensors: `<identifier>` -> (1, D) tiny-colour's embedding of `word`."""
    width = ARCHITECTURES["tiny-colour"]["text"]["hidden_size"]
    return save({f"<{identifier}>": colour_embedding(word, width)[None].contiguous()})


def colour_concepts(client: Client, seed: int) -> dict[str, str]:
    """Colour word -> identifier of a ready concept meaning it. The identifiers (hue-<seed>-1, ...) follow
    a seeded order of the colours and say nothing of them; one already imported under that name (the
    same seed gives the same file) is used as it is."""
    order = np.random.default_rng(seed).permutation(len(CLASS_NAMES))
    identifiers = {CLASS_NAMES[k]: f"{CONCEPT_PREFIX}-{seed}-{rank}" for rank, k in enumerate(order, start=1)}
    ours = set(identifiers.values())
    existing = {c.state.identifier for c in client.concepts(limit=500) if c.state.identifier in ours}
    for word, identifier in identifiers.items():
        if identifier not in existing:
            client.import_concept(identifier, CLASS_WORD, concept_file(identifier, word)).wait()
    return identifiers


def referring_queries(scene: Scene, identifiers: dict[str, str]) -> list[tuple[str, int]]:
    """Up to QUERIES_PER_SCENE (query, ground-truth instance id) pairs: objects drawn by the scene's seed,
    each named by its colour's concept. The scene's colours must be distinct (make_scene repeat=0)."""
    picks = np.random.default_rng(scene.seed).permutation(len(scene.objects))[:QUERIES_PER_SCENE]
    return [(f"a <{identifiers[scene.objects[i].colour]}>", int(i) + 1) for i in picks]


def read_referring(result: Result, queries: int) -> tuple[np.ndarray, list[int | None], list[int | None]]:
    """A referring result as the protocol reads it: the instance map ((H, W) -1 background, 0..K-1), each
    query's best instance alone and the joint assignment, recomputed from the reported instance_scores
    by the worker's own functions (the labels number the chosen instances first)."""
    scores = torch.tensor(result.raw["instance_scores"], dtype=torch.float64).reshape(queries, -1)
    count = scores.shape[1]
    chosen = assign_queries(scores)
    label_of = instance_labels(torch.arange(count), chosen, count).tolist()
    labels = result.label_map()
    instance_map = np.full(labels.shape, -1, np.int64)
    for instance, label in enumerate(label_of):
        instance_map[labels == label] = instance
    best = [int(row.argmax()) if count else None for row in scores]
    return instance_map, best, chosen


def score_referring(client: Client, world: list[Scene], identifiers: dict[str, str], resolution: int) -> dict:
    """mIoU, bf_acc and af_acc of the scenes' concept queries (class "shape")."""
    asked = [referring_queries(scene, identifiers) for scene in world]
    jobs = [
        client.segment_referring(scene.image, CLASS_WORD, [q for q, _ in pairs], resolution=resolution, seed=scene.seed)
        for scene, pairs in zip(world, asked)
    ]
    score = ReferringScore()
    bands = [ReferringScore() for _ in range(len(SIZE_BANDS) + 1)]
    for scene, pairs, job in zip(world, asked, jobs):
        instance_map, best, chosen = read_referring(job.result(), len(pairs))
        targets = [target for _, target in pairs]
        score.add(instance_map, best, chosen, scene.instances, targets)
        for query, target in enumerate(targets):
            band = bands[int(np.searchsorted(SIZE_BANDS, scene.objects[target - 1].size, side="right"))]
            band.add(instance_map, best[query : query + 1], chosen[query : query + 1], scene.instances, [target])
    edges = ("", *(f"{edge:g}" for edge in SIZE_BANDS), "")
    by_size = {f"{low}-{high}": plain(band.result()) for low, high, band in zip(edges, edges[1:], bands)}
    return {**plain(score.result()), "by_size": {name: s for name, s in by_size.items() if s["queries"]}}


def object_sizes(world: list[Scene]) -> dict:
    """Objects per scene and their visible areas as fractions of the picture."""
    areas = np.concatenate([np.bincount(s.instances.ravel())[1:] / s.instances.size for s in world])
    return {
        "per_scene": len(areas) / len(world),
        "area_min": float(areas.min()),
        "area_median": float(np.median(areas)),
        "area_max": float(areas.max()),
    }


def evaluate_synthetic(
    client: Client,
    count: int,
    *,
    seed: int,
    height: int,
    width: int,
    resolution: int,
    epochs: int,
    methods: Sequence[str] = METHODS,
    sizes: tuple[float, float] = SIZE_RANGE,
) -> dict:
    """Each method of `methods` on `count` scenes (seeds seed, seed + 1, ...): its scores and seconds
    per scene. Referring scenes are drawn with distinct colours (one object per colour). sizes: the
    objects' bounding-circle diameters as fractions of the shorter side."""
    world = scenes(count, seed, height, width, sizes=sizes)
    out = {"scenes": count, "seed": seed, "size": [height, width], "resolution": resolution, "sizes": list(sizes)}
    out["objects"] = object_sizes(world)
    scores = out["methods"] = {}
    if "unsupervised" in methods:
        scores["unsupervised"] = timed(lambda: score_unsupervised(client, world, resolution), count)
    if "selfcross" in methods:
        scores["selfcross"] = timed(lambda: score_text(client, world, resolution), count)
    if {"oneshot", "oneshot_2x2"} & set(methods):
        started = time.perf_counter()
        model = train_parts(client, training_scene(seed, height, width), resolution, epochs)
        training = {"epochs": epochs, "train_iou": model.metrics.get("train_iou"), "train_seconds": 0.0}
        training["train_seconds"] = time.perf_counter() - started
        for name, crops in (("oneshot", 1), ("oneshot_2x2", 2)):
            if name in methods:
                scores[name] = {**timed(lambda c=crops: score_oneshot(client, model, world, c), count), **training}
    if "referring" in methods:
        distinct = scenes(count, seed, height, width, repeat=0.0, sizes=sizes)
        identifiers = colour_concepts(client, seed)
        scores["referring"] = timed(lambda: score_referring(client, distinct, identifiers, resolution), count)
    return out


def table(result: dict) -> str:
    """The scores as a plain-text table, one method a line."""
    lines = [f"{'method':<14}{'scenes':>7}{'mIoU':>8}  {'s/scene':>8}  more"]
    for name, s in result["methods"].items():
        if name == "referring":
            more = f"bf_acc {s['bf_acc']:.3f}  af_acc {s['af_acc']:.3f}  bf_miou {s['bf_miou']:.3f}"
            more += f"  ({s['queries']} queries, {s['unfound']} of their objects in no instance)"
            bands = ", ".join(f"{name}: {b['af_acc']:.2f} of {b['queries']}" for name, b in s["by_size"].items())
            more += f"; af_acc by object size / shorter side: {bands}"
        elif name.startswith("oneshot"):
            more = f"trained {s['epochs']} epochs in {s['train_seconds']:.0f} s, train IoU {s['train_iou']:.3f}"
        else:
            more = f"pixel accuracy {s['pixel_accuracy']:.3f}"
        lines.append(f"{name:<14}{s['scenes']:>7}{s['miou']:>8.3f}  {s['seconds_per_scene']:>8.2f}  {more}")
    o = result["objects"]
    lines.append(
        f"objects: {o['per_scene']:.1f} per scene, visible area {100 * o['area_min']:.2f} % to "
        f"{100 * o['area_max']:.1f} % of the picture (median {100 * o['area_median']:.1f} %); "
        f"pictures {result['size'][1]}x{result['size'][0]} at resolution {result['resolution']}"
    )
    return "\n".join(lines)
