"""Dense self-supervised representations (SlotCon, Leopart; PASS writes the same file): timm backbones that give a
feature map per image, their losses, the representation model file and the label-free segmentations evaluated on them.

- :mod:`trainers.dense.io`: the representation file ``selftrain-representation/1`` (one reader, one writer);
- :mod:`trainers.dense.backbone`: a timm CNN or ViT as a dense feature extractor (and a ViT's CLS attention);
- :mod:`trainers.dense.views`: two augmented views with their crop boxes, and the inverse augmentation (RoIAlign);
- :mod:`trainers.dense.slotcon`, :mod:`trainers.dense.leopart`: the models and losses of the two methods;
- :mod:`trainers.dense.community`: merging over-clustered parts into objects by community detection (Leopart);
- :mod:`trainers.dense.segmentation`: a split's dense features, k-means / prototype label maps, scored against ground truth.
"""
