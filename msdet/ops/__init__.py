"""Box operations (anchors/priors, coders, IoU, NMS) and the C++ kernels of CPU training (native.py)."""
