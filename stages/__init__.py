"""Thin DVC stage scripts: each reads its params.yaml section, calls msdet, writes its outputs."""
import os

# MindSpore's INFO/WARNING logging drowns the progress bars; errors still show. Override with GLOG_v=1.
os.environ.setdefault("GLOG_v", "3")
