"""Speed and memory benchmarks of training, data, evaluation, export and the DVC pipeline (``make bench``).

:mod:`msdet.bench.stats` summarises repeated runs and prints the table, :mod:`msdet.bench.sections` holds
the measurements (each run in a child process), :mod:`msdet.bench.runner` runs them all and assembles
``metrics/bench.json``.
"""
