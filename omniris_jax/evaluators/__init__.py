"""Evaluators: each scores a model's parameters on some data and writes what it found."""
