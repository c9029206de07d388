"""Training loops, experiment configs and the images they write."""
