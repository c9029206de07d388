"""Model definitions: the autoencoder stack, its components, datasets and losses.

Import the concrete classes from their modules, e.g. ``from layoutgen.models.autoencoder import Autoencoder``.
"""
