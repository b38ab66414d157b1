"""Query-based segmentation models (Mask2Former manner) for PartDistillation."""
