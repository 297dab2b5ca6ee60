"""Parallelism: process groups, tensor-parallel layers, their checkpoint reader and launcher."""
