"""maescale: cluster-scale Masked Autoencoder pretraining of Vision Transformers."""

__version__ = "0.1.0"
