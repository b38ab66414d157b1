"""PASS (Gao et al., "Large-scale Unsupervised Semantic Segmentation"): the library behind the LUSS stages.

- ``model``: the timm backbone, SwAV heads, the pixel-to-pixel and deep-to-shallow heads (sec. 4.2), the
  pixel-attention module (eq. 6), the segmentation head (sec. 4.4) and the representation model file.
- ``multicrop``: multi-crop views with the overlap grids the pixel-to-pixel alignment samples.
- ``losses``: Sinkhorn-Knopp codes, the SwAV swapped-prediction loss, P2P (eq. 2) and D2S (eq. 4).
- ``labels``: attention-pooled image embeddings and the pixel-label rule of sec. 4.3 (eq. 7).
- ``kmeans``: k-means at dataset scale: faiss trained on a sample, empty clusters re-seeded, assignment in blocks.
- ``predict``: label maps of a split for evaluation (fine-tuned head, label rule, distance matching).
"""
