"""Networks: backbones, necks, heads. Pure MindSpore cells; no losses, no data."""
