"""Evaluation of trained models: encoders (probes, retrieval, collapse) and reasoners."""
