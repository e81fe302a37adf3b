"""Target assignment: anchor IoU matching (EfficientDet) and the dynamic soft-label assigner (NanoDet-Plus)."""
