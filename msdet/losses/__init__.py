"""Loss functions (focal, quality focal, distribution focal, GIoU, Huber)."""
