"""Reading official PyTorch checkpoints without PyTorch and converting them to our MindSpore models."""
