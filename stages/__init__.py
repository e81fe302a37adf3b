"""Thin DVC stage scripts: read params.yaml, call the msdet library, write the stage outputs."""
