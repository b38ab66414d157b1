"""Visual concept discovery: per prototype, its own segments ranked by cosine similarity (faiss), as an HTML page."""
from __future__ import annotations

import numpy as np

from trainers.evaluation.concepts import SegmentIndex, write_concepts_html


def test_each_prototype_retrieves_only_its_own_segments_most_similar_first(tmp_path):
    protos = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    index = SegmentIndex(2)
    # image a: prototype 0 on the left half with embedding (1, 0.1); prototype 1 on the right with (0.2, 1)
    assign = np.array([[0, 1], [0, 1]])
    emb = np.stack([np.array([[1.0, 0.2], [1.0, 0.2]]), np.array([[0.1, 1.0], [0.1, 1.0]])])
    index.add_image("a", assign, emb)
    # image b: everything prototype 0, embedding (1, 0.9): less similar to prototype 0 than image a's segment
    index.add_image("b", np.zeros((2, 2), dtype=int), np.stack([np.ones((2, 2)), np.full((2, 2), 0.9)]))
    top = index.top_segments(protos, k=5)
    assert [s.key for _, s in top[0]] == ["a", "b"] and top[0][0][0] > top[0][1][0]
    assert [s.key for _, s in top[1]] == ["a"] and top[1][0][1].mask.tolist() == [[False, True], [False, True]]

    images = {"a": np.zeros((8, 8, 3), np.uint8), "b": np.full((8, 8, 3), 200, np.uint8)}
    write_concepts_html(tmp_path / "concepts.html", top, images, "test")
    page = (tmp_path / "concepts.html").read_text()
    assert page.count("<h3>prototype") == 2 and page.count("<img") == 3
