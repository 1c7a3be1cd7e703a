"""spp: prune large language models, then fine-tune them with SPP without losing the sparsity."""

__version__ = "0.1.0"
