"""Data layer: the embedded synthetic set, COCO reading and download, MindRecord, transforms, pipelines."""
