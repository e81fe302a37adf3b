"""Post-processing to detections, COCO evaluation, plots."""
