"""springfield: train, evaluate and serve image classifiers with JAX and Flax NNX."""

__version__ = "0.1.0"
