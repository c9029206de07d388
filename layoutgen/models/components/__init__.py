"""Reusable model components: the base model, building blocks and output heads."""
