"""Each detector bundles its network, loss, target assignment and decoding behind one interface."""
