"""Model loading and the bundled model pair."""
