"""Evaluation: CLIP retrieval and zero-shot accuracy, sample quality metrics, model statistics."""
