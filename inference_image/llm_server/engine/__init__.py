"""Model loading, adapters and generation; knows nothing of HTTP."""
