"""selftrain control plane: pipeline configs, stage specs, rendering to PyTorchJobs, executors, lineage.

Never imports torch or touches tensors.
"""
__version__ = "0.1.0"
