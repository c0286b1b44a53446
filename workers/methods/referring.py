"""Personalized referring segmentation (From Text to Mask, section 5.3; docs/methods.md 2.4).

Find *my* mug among mugs: (1) SelfCross with "a photo including <class>." gives the object area;
(2) spectral clustering of the self-attention inside that area separates the instances; (3)
SelfCross with each query ("a <my-mug> mug with cola": the span is `<identifier> <class>`) gives
its attribution map; (4) each instance gets the mean attribution of each query; one query takes its
best instance, several are assigned jointly (Hungarian). Pure steps first (grids are square, a
(Q, ...) map has Q = g * g positions in row-major order), then `segment_referring`::

    out = segment_referring(sd, rgb_uint8, "mug", ["<my-mug> mug"], concepts={"my-mug": concept})
    out.labels  # (H, W): 0 background, 1 + query index, then the other instances
"""

from __future__ import annotations

import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.linalg import eigh
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import SpectralClustering

from attnseg.concept_files import IDENTIFIER
from attnseg.defaults import REFERRING, RESOLUTION, SEED, TEXT
from workers.methods import diffseg, label_maps
from workers.methods.passes import clean_latents, vector_counts
from workers.methods.prompts import Prompt, build_prompt, prompt_from_pieces
from workers.methods.selfcross import background_score, selfcross_draw, selfcross_pass
from workers.methods.timing import Timer
from workers.models.concept import Concept
from workers.models.stable_diffusion import StableDiffusion

Report = Callable[[str, float], None]


# --- pure steps ------------------------------------------------------------------------------


def object_area(sc: torch.Tensor, threshold: float = TEXT.background_threshold) -> torch.Tensor:
    """Where the class beats SelfCross's background: sc > (2 * threshold - sc)^2.

    sc: (g, g) the class's SelfCross map in [0, 1]. Returns bool (g, g).
    """
    return sc > background_score(sc[None], threshold)[0]


def symmetric_affinity(self_attn: torch.Tensor, area: torch.Tensor) -> np.ndarray:
    """The self-attention among the area's positions, symmetrised: (S + S^T) / 2 restricted to it.

    self_attn: (Q, Q) rows = queries; area: bool (Q,). Returns float64 (N, N), N = area.sum().
    """
    inside = self_attn.double()[area][:, area]
    return ((inside + inside.T) / 2).cpu().numpy()


def eigengap_count(affinity: np.ndarray, max_count: int = REFERRING.max_instances) -> int:
    """Number of clusters by the largest gap in the normalised Laplacian's smallest eigenvalues.

    affinity: (N, N) symmetric, non-negative. L = I - D^-1/2 A D^-1/2 has eigenvalues
    0 = l_0 <= l_1 <= ...; k = argmax over 1..max_count of l_k - l_{k-1} (von Luxburg 2007, 8.3).
    Returns 1..min(max_count, N).
    """
    count = affinity.shape[0]
    if count < 2:
        return 1
    degree = affinity.sum(1)
    scale = 1 / np.sqrt(np.maximum(degree, np.finfo(np.float64).tiny))
    laplacian = np.eye(count) - scale[:, None] * affinity * scale[None, :]
    top = min(max_count, count - 1)
    values = eigh(laplacian, eigvals_only=True, subset_by_index=[0, top])
    return int(np.argmax(np.diff(values))) + 1


def spectral_instances(
    self_attn: torch.Tensor, area: torch.Tensor, *, max_instances: int = REFERRING.max_instances, seed: int = SEED
) -> torch.Tensor:
    """Instances inside the object area: spectral clustering of its self-attention.

    self_attn: (Q, Q); area: bool (Q,). Returns long (Q,): -1 outside the area, 0..k-1 inside, the
    instances numbered by their first position in row-major order. An empty area gives all -1.
    """
    instances = torch.full(area.shape, -1, dtype=torch.long)
    positions = torch.nonzero(area.cpu()).flatten()
    if len(positions) == 0:
        return instances
    affinity = symmetric_affinity(self_attn, area.to(self_attn.device))
    count = eigengap_count(affinity, max_instances)
    if count == 1:
        instances[positions] = 0
        return instances
    clustering = SpectralClustering(
        n_clusters=count, affinity="precomputed", assign_labels="cluster_qr", random_state=seed
    )
    with warnings.catch_warnings():
        # Instances that never attend to each other make a disconnected graph: the ideal case.
        warnings.filterwarnings("ignore", message="Graph is not fully connected")
        labels = clustering.fit_predict(affinity)
    _, first = np.unique(labels, return_index=True)
    order = {label: rank for rank, label in enumerate(labels[np.sort(first)])}  # renumber by first position
    instances[positions] = torch.tensor([order[label] for label in labels])
    return instances


def instance_scores(attributions: torch.Tensor, instances: torch.Tensor, count: int) -> torch.Tensor:
    """Mean attribution of each query over each instance.

    attributions: (M, Q) query maps; instances: (Q,) -1 or 0..count-1. Returns (M, count); (M, 0)
    when no instance was found.
    """
    if count == 0:
        return attributions.new_zeros(attributions.shape[0], 0)
    instances = instances.to(attributions.device)
    onehot = torch.nn.functional.one_hot(instances.clamp_min(0), count).float() * (instances >= 0)[:, None]
    return (attributions.float() @ onehot) / onehot.sum(0).clamp_min(1)


def assign_queries(scores: torch.Tensor) -> list[int | None]:
    """Each query's instance from (M, K) scores: one query takes its best; several are assigned
    jointly, maximising the total (Hungarian); with more queries than instances some get None."""
    if scores.shape[1] == 0:
        return [None] * scores.shape[0]
    if scores.shape[0] == 1:
        return [int(scores[0].argmax())]
    rows, columns = linear_sum_assignment(scores.double().cpu().numpy(), maximize=True)
    chosen: list[int | None] = [None] * scores.shape[0]
    for row, column in zip(rows, columns):
        chosen[row] = int(column)
    return chosen


def instance_labels(instances: torch.Tensor, chosen: list[int | None], count: int) -> torch.Tensor:
    """Output label of each instance: 1 + query index for chosen ones, then the others in order
    (M + 1, M + 2, ...). instances: (...) -1..count-1, any shape. Returns (...) long, 0 outside."""
    label_of = {}
    for query, instance in enumerate(chosen):
        if instance is not None:
            label_of[instance] = query + 1
    others = [instance for instance in range(count) if instance not in label_of]
    for rank, instance in enumerate(others):
        label_of[instance] = len(chosen) + 1 + rank
    table = torch.tensor([0] + [label_of[i] for i in range(count)])
    return table[instances + 1]


def query_span(query: str, class_word: str) -> tuple[int, int]:
    """Character span of what a query refers to: `<identifier>` with the class word right after it,
    else the identifier alone, else the class word (first whole-word match, any case), else all."""
    identifier = IDENTIFIER.search(query)
    if identifier:
        after = re.match(rf"\s+{re.escape(class_word)}\b", query[identifier.end() :], re.IGNORECASE)
        return identifier.start(), identifier.end() + (after.end() if after else 0)
    word = re.search(rf"\b{re.escape(class_word)}\b", query, re.IGNORECASE)
    return (word.start(), word.end()) if word else (0, len(query))


def query_prompt(tokenizer, query: str, class_word: str, counts: dict[str, int]) -> Prompt:
    """The query as the prompt, its one class span the `query_span`; identifiers expanded."""
    query = " ".join(query.split())
    start, end = query_span(query, class_word)
    pieces = [(query[:start], None), (query[start:end], 0), (query[end:], None)]
    return prompt_from_pieces(tokenizer, pieces, [query], 1, counts)


# --- end to end ------------------------------------------------------------------------------


@dataclass
class ReferringSegmentation:
    labels: np.ndarray  # (H, W) narrowest int: 0 background, 1 + query index, then other instances
    scores: dict[int, float]  # query label -> its mean attribution over its instance
    instance_scores: list[list[float]]  # (M, K) every query's mean attribution on every instance
    instances: int  # K, instances found in the object area
    instance_map: np.ndarray  # (H, W) int64: -1 background, 0..K-1 the instances
    assignment: list[int | None]  # each query's instance (joint when several queries)
    timings_ms: dict[str, float] = field(default_factory=dict)


def concept_groups(prompts: list[Prompt], concepts: dict[str, Concept]) -> dict[str | None, list[int]]:
    """Prompt indices per UNet pass: prompts naming a concept with attention weights need that
    concept's pass; the others share the plain pass (key None)."""
    groups: dict[str | None, list[int]] = {}
    for index, prompt in enumerate(prompts):
        weighted = [name for name in prompt.concept_positions if concepts[name].kv]
        groups.setdefault(weighted[0] if weighted else None, []).append(index)
    return groups


def check_queries(queries: list[str]) -> None:
    """ValueError unless there are 1..max_queries queries, each naming at most one concept."""
    if not 1 <= len(queries) <= REFERRING.max_queries:
        raise ValueError(f"give 1 to {REFERRING.max_queries} queries, got {len(queries)}")
    for query in queries:
        if len(set(IDENTIFIER.findall(query))) > 1:
            raise ValueError(f"query {query!r} names more than one concept")


def class_instances(
    sd: StableDiffusion,
    latents: torch.Tensor,
    class_word: str,
    *,
    timestep: int,
    seed: int,
    max_instances: int,
    timer: Timer,
) -> torch.Tensor:
    """Steps (1) and (2): the class's SelfCross object area on latents (1, 4, R, R), split into
    instances by spectral clustering of the self-attention. Returns (Q,) as `spectral_instances`."""
    started = time.perf_counter()
    area_prompt = build_prompt(sd.tokenizer, [class_word])
    store = selfcross_pass(sd, latents, [area_prompt], timestep, seed)
    sc_class = selfcross_draw(store, [area_prompt], TEXT.gate_threshold)[0]
    self_attn = store.mean("self", sc_class.shape[-1])[0]
    started = timer("unet", started)
    instances = spectral_instances(self_attn, object_area(sc_class).flatten(), max_instances=max_instances, seed=seed)
    timer("cluster", started)
    return instances


def query_attributions(
    sd: StableDiffusion,
    latents: torch.Tensor,
    prompts: list[Prompt],
    concepts: dict[str, Concept],
    *,
    timestep: int,
    seed: int,
    report: Report,
) -> torch.Tensor:
    """Step (3): each query prompt's SelfCross map on latents (1, 4, R, R), one pass per concept
    group (`concept_groups`). Returns (M, Q), the queries in order."""
    attributions = [None] * len(prompts)
    groups = concept_groups(prompts, concepts)
    for done, members in enumerate(groups.values()):
        report("queries", 0.3 + 0.5 * done / len(groups))
        group = [prompts[i] for i in members]
        used = {identifier: concepts[identifier] for prompt in group for identifier in prompt.concept_positions}
        store = selfcross_pass(sd, latents, group, timestep, seed, concepts=used)
        for index, sc in zip(members, selfcross_draw(store, group, TEXT.gate_threshold)):
            attributions[index] = sc.flatten()
    return torch.stack(attributions)


def referring_labels(
    instances: torch.Tensor, attributions: torch.Tensor, size: tuple[int, int]
) -> ReferringSegmentation:
    """Step (4) and the labels at size (H, W): instances (Q,) on the self layer's grid, attributions (M, Q)."""
    count = int(instances.max()) + 1
    scores = instance_scores(attributions, instances, count)
    chosen = assign_queries(scores)
    # Instances (and the outside) as one-hot channels, upsampled bilinearly to the image and argmaxed.
    channels = torch.nn.functional.one_hot(instances + 1, count + 1).T.float().to(attributions.device)
    instance_map = diffseg.proposals_to_labels(channels, size) - 1
    labels = instance_labels(instance_map.cpu(), chosen, count)
    query_scores = {
        query + 1: float(scores[query, instance]) for query, instance in enumerate(chosen) if instance is not None
    }
    return ReferringSegmentation(
        label_maps.to_numpy(labels), query_scores, scores.tolist(), count, instance_map.cpu().numpy(), chosen
    )


def segment_referring(
    sd: StableDiffusion,
    image: np.ndarray,
    class_word: str,
    queries: list[str],
    *,
    concepts: dict[str, Concept] | None = None,
    max_instances: int = REFERRING.max_instances,
    timestep: int = REFERRING.timestep,
    resolution: int = RESOLUTION,
    seed: int = SEED,
    report: Report | None = None,
) -> ReferringSegmentation:
    """Segment the instances of `class_word` in an RGB uint8 image (H, W, 3) and find each query's.

    queries: 1..max_queries texts, each with at most one `<identifier>` of `concepts`. Every pass is
    SelfCross (docs/methods.md 2.2) at `timestep` with noise from `seed` (the VOC gate and background).
    Raises ValueError for bad arguments or an unknown identifier, PromptTooLongError for a query
    that does not fit the text encoder.
    """
    check_queries(queries)
    concepts, report, timer = concepts or {}, report or (lambda stage, fraction: None), Timer()
    started = time.perf_counter()
    prompts = [query_prompt(sd.tokenizer, query, class_word, vector_counts(concepts)) for query in queries]
    report("encoding", 0.05)
    latents = clean_latents(sd, image, resolution)
    started = timer("latent", started)
    report("attention", 0.1)
    instances = class_instances(
        sd, latents, class_word, timestep=timestep, seed=seed, max_instances=max_instances, timer=timer
    )
    started = time.perf_counter()
    attributions = query_attributions(sd, latents, prompts, concepts, timestep=timestep, seed=seed, report=report)
    started = timer("queries", started)
    report("assigning", 0.85)
    out = referring_labels(instances, attributions, tuple(image.shape[:2]))
    timer("label", started)
    out.timings_ms = timer.ms
    return out
