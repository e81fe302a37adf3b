"""Training engine shared by both detectors: train step, schedules, EMA, checkpoints, distributed."""
