"""Box operations: anchors/priors, box coders, IoU, NMS."""
