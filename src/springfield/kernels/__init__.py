"""Native kernels springfield calls from JAX (built on first use; XLA is the fallback)."""
