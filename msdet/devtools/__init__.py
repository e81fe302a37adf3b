"""Developer tools: the stage-deps generator and checker (also the training code fingerprint)."""
