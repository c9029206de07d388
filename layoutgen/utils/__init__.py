"""Small shared utilities: atomic file writes and checkpoint (de)serialisation."""
