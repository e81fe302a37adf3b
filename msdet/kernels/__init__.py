"""The native CPU training layer: C++ kernels for MindSpore's CPU "aot" ``Custom`` ops, optional and portable.

One module per kernel (``<name>.py`` with its ``<name>.cc``, sharing ``aot.h``, ``parallel.h`` and ``isa.h``):
each holds a :class:`~msdet.kernels.library.KernelLibrary` (``LIBRARY``, compiled with g++ at first use by
:mod:`msdet.kernels.build`) and the replacements it provides (``REPLACEMENTS``: the parts of
:mod:`msdet.train_ops` a training graph builds from it). :mod:`msdet.kernels.layer` switches them on for a
model's training. Only training imports the kernel modules; evaluation, export, inference and conversion never
do (so they compile nothing, and their stages' code deps name no kernel source).
"""
