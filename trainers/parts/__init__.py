"""Part mining and class-level part clustering (PartDistillation sec. 4.2 and 4.3).

``kmeans``: batched k-means over the pixels of many instance masks at once (mining, k=4, cosine).
``class_clusters``: per-object-class clustering of candidate part features spilled to disk (k=8) and
the density scores of eq. 2.
"""
