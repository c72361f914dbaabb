"""Sentence embeddings for `/v1/embeddings`: a sentence-transformers folder run with transformers."""
