"""Merging over-clustered parts into objects by community detection (Leopart's fully unsupervised setting).

Nodes are the clusters; two clusters are linked when they appear in the same images more often than chance: the edge
weight is their positive pointwise mutual information of image-level presence, so a cluster present everywhere (the
background) links to nothing in particular. Communities come from networkx's Louvain modularity maximisation, and
each community becomes one predicted segment label. No label is read.
"""
from __future__ import annotations

import networkx as nx
import numpy as np


class Cooccurrence:
    """Image-level presence counts of ``k`` cluster labels: ``pairs[i, j]`` images holding both, ``images`` in total."""

    def __init__(self, k: int):
        self.k, self.images = k, 0
        self.pairs = np.zeros((k, k), dtype=np.int64)

    def add(self, labels: np.ndarray) -> None:
        present = np.zeros(self.k, dtype=np.int64)
        present[np.unique(np.asarray(labels))] = 1
        self.pairs += np.outer(present, present)
        self.images += 1

    def merge(self, other: "Cooccurrence") -> None:
        self.pairs += other.pairs
        self.images += other.images

    def ppmi(self) -> np.ndarray:
        """Positive pointwise mutual information of every pair (zero on the diagonal and for unseen clusters)."""
        n = max(1, self.images)
        p = np.diag(self.pairs) / n
        with np.errstate(divide="ignore", invalid="ignore"):
            pmi = np.log((self.pairs / n) / np.outer(p, p))
        pmi = np.nan_to_num(pmi, nan=0.0, posinf=0.0, neginf=0.0)
        np.fill_diagonal(pmi, 0.0)
        return np.maximum(pmi, 0.0)


def communities(cooc: Cooccurrence, resolution: float = 1.0, seed: int = 0) -> np.ndarray:
    """Cluster -> community id (0..M-1, largest community first); isolated clusters are their own community."""
    weights = cooc.ppmi()
    g = nx.Graph()
    g.add_nodes_from(range(cooc.k))
    rows, cols = np.nonzero(np.triu(weights, 1))
    g.add_weighted_edges_from((int(i), int(j), float(weights[i, j])) for i, j in zip(rows, cols))
    found = nx.algorithms.community.louvain_communities(g, weight="weight", resolution=resolution, seed=seed)
    mapping = np.zeros(cooc.k, dtype=np.int64)
    for c, members in enumerate(sorted(found, key=lambda s: (-len(s), min(s)))):
        mapping[list(members)] = c
    return mapping


def merge_rows(counts: np.ndarray, mapping: np.ndarray) -> np.ndarray:
    """A confusion matrix of clusters [k, n_gt] -> of communities [M, n_gt] (pixels relabelled by ``mapping``)."""
    out = np.zeros((int(mapping.max()) + 1, counts.shape[1]), dtype=counts.dtype)
    np.add.at(out, mapping, counts)
    return out
