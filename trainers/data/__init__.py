"""Datasets, WebDataset shards, importers/exporters. Modules here import numpy/PIL, not torch, at module level."""
