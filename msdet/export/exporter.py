"""Export a detector's inference network to MINDIR / ONNX and prove the files compute what the network does.

An exported file is only kept when, loaded back (MINDIR through ``mindspore.load`` + ``nn.GraphCell``,
ONNX through onnxruntime) and run on real preprocessed images one at a time, its raw outputs and its
decoded detections match the in-memory network's (``msdet.export.verify``). Everything lands in ``out_dir``
at once (written beside it, then renamed), so a failed or interrupted export never leaves a
valid-looking file.

MINDIR is the primary format (what MindSpore deploys): if it cannot be written or fails its check, the
export fails and ``out_dir`` is left as it was. ONNX is secondary: its failure is recorded in the report
and the verified formats are still written, unless ``strict`` (or ONNX is the only format asked for).

``out_dir`` holds ``model.mindir``, ``model.onnx`` (when it passed) and ``export_report.json`` (file sizes,
measured differences per format, batch-1 latencies, input/output names and shapes, failures and why).
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from msdet.atomic import atomic_path
from msdet.config import EXPORT_FORMATS
from msdet.export.verify import Postprocess, Tolerances, verify

FORMATS = EXPORT_FORMATS
PRIMARY = EXPORT_FORMATS[0]
FILE_NAMES = {"MINDIR": "model.mindir", "ONNX": "model.onnx"}
REPORT_NAME = "export_report.json"


class ExportError(RuntimeError):
    """The network could not be exported, or an exported file could not be loaded or run."""


class ExportMismatch(ExportError):
    """An exported file computes something other than the in-memory network."""


Outputs = tuple  # tuple of np.ndarray, one per network output


def _as_numpy_outputs(out: Any) -> Outputs:
    items = out if isinstance(out, (tuple, list)) else (out,)
    return tuple(np.asarray(o.asnumpy() if hasattr(o, "asnumpy") else o) for o in items)


def _first_line(exc: BaseException) -> str:
    """MindSpore errors carry pages of C++ trace; the first meaningful line says what went wrong."""
    for line in str(exc).splitlines():
        line = line.strip()
        if line and not line.startswith("-"):
            return f"{type(exc).__name__}: {line}"
    return type(exc).__name__


class ExportedModel:
    """An exported MINDIR or ONNX file, loaded for batch-1 inference: ``run(image [1,3,S,S]) -> outputs``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ExportError(f"{self.path}: exported model file not found")
        suffix = self.path.suffix.lower()
        if suffix == ".mindir":
            self.format = "MINDIR"
            self.input_names, self.input_shapes = mindir_inputs(self.path)
            self._run = self._load_mindir()
        elif suffix == ".onnx":
            self.format = "ONNX"
            self._run = self._load_onnx()
        else:
            raise ExportError(f"{self.path}: unknown model format '{self.path.suffix}' (expected .mindir or .onnx)")

    def _load_mindir(self) -> Callable[[np.ndarray], Outputs]:
        import mindspore as ms
        from mindspore import nn

        try:
            cell = nn.GraphCell(ms.load(str(self.path)))
        except Exception as exc:
            raise ExportError(f"{self.path}: not a loadable MINDIR file ({_first_line(exc)})") from exc
        return lambda x: _as_numpy_outputs(cell(ms.Tensor(x)))

    def _load_onnx(self) -> Callable[[np.ndarray], Outputs]:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        try:
            session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ExportError(f"{self.path}: onnxruntime cannot load it ({_first_line(exc)})") from exc
        self.input_names = [i.name for i in session.get_inputs()]
        self.input_shapes = [list(i.shape) for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]
        name = self.input_names[0]
        return lambda x: tuple(session.run(None, {name: x}))

    @property
    def input_size(self) -> int | None:
        """S of the [1, 3, S, S] input, None when the file does not fix it."""
        shape = self.input_shapes[0] if self.input_shapes else []
        return int(shape[-1]) if len(shape) == 4 and isinstance(shape[-1], int) else None

    def run(self, image: np.ndarray) -> Outputs:
        try:
            return self._run(np.ascontiguousarray(image, dtype=np.float32))
        except Exception as exc:
            raise ExportError(f"{self.path}: running it on input {tuple(image.shape)} failed "
                              f"({_first_line(exc)})") from exc


def mindir_inputs(path: str | Path) -> tuple[list[str], list[list[int]]]:
    """Input names and shapes stored in a MINDIR file (its graph inputs, parameters excluded)."""
    from mindspore.train import mind_ir_pb2

    model = mind_ir_pb2.ModelProto()
    try:
        model.ParseFromString(Path(path).read_bytes())
    except Exception as exc:
        raise ExportError(f"{path}: not a MINDIR file ({_first_line(exc)})") from exc
    names, shapes = [], []
    for inp in model.graph.input:
        names.append(inp.name.rsplit(":", 1)[-1])
        shapes.append([int(d) for d in inp.tensor[0].dims] if inp.tensor else [])
    if not names:
        raise ExportError(f"{path}: not a MINDIR file (no graph inputs)")
    return names, shapes


def load_exported(path: str | Path) -> ExportedModel:
    return ExportedModel(path)


def _latency_ms(fn: Callable[[np.ndarray], Any], image: np.ndarray, repeats: int) -> float:
    """Median wall time of ``repeats`` batch-1 calls after one warm-up call (which also compiles)."""
    fn(image)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(image)
        times.append(time.perf_counter() - t0)
    return round(1000.0 * statistics.median(times), 3)


def _describe(outputs: Outputs, names: Sequence[str] | None = None) -> list[dict]:
    return [{"name": names[k] if names and k < len(names) else f"output_{k}", "shape": list(o.shape),
             "dtype": str(o.dtype)} for k, o in enumerate(outputs)]


def _normalise_formats(formats: Sequence[str]) -> list[str]:
    out = []
    for f in formats:
        f = str(f).upper()
        if f not in FORMATS:
            raise ExportError(f"unknown export format '{f}': expected one of {', '.join(FORMATS)}")
        if f not in out:
            out.append(f)
    if not out:
        raise ExportError("no export format asked for")
    return out


def _write(cell: Any, fmt: str, target: Path, size: int, input_name: str, output_names: list[str]) -> None:
    """Export ``cell`` at input [1, 3, size, size] to ``target``; ONNX gets readable input/output names."""
    import mindspore as ms
    import mindspore.onnx

    example = ms.Tensor(np.zeros((1, 3, size, size), np.float32))
    if fmt == "ONNX":
        mindspore.onnx.export(cell, example, file_name=str(target), input_names=[input_name],
                              output_names=output_names)
    else:
        ms.export(cell, example, file_name=str(target.with_suffix("")), file_format=fmt)
    if not target.is_file():
        raise ExportError(f"MindSpore wrote no {target.name}")
    os.chmod(target, 0o644)  # mindspore.export leaves it read-only


def _required(fmt: str, formats: Sequence[str], strict: bool) -> bool:
    """A format whose failure fails the export: the primary one, any under ``strict``, or the only one."""
    return fmt == PRIMARY or strict or list(formats) == [fmt]


def export_model(detector: Any, network: Any, out_dir: str | Path, formats: Sequence[str] = FORMATS, *,
                 check_inputs: np.ndarray, tolerances: Tolerances, postprocess: Postprocess, strict: bool = False,
                 latency_repeats: int = 10, extra: dict | None = None,
                 extend: Callable[[Path, Any, dict], dict] | None = None) -> dict:
    """Export ``detector.inference_cell(network)`` at batch 1 and verify every file; returns the report.

    check_inputs: float32 [N, 3, S, S] preprocessed images (S = detector.input_size), run one at a time.
    A required format (see :func:`_required`) that cannot be exported, loaded or run raises
    :class:`ExportError`, one that computes something else :class:`ExportMismatch`; either leaves ``out_dir``
    as it was. Another format's failure is recorded in the report (``exported: false``, ``reason``, and
    the measured ``check`` when it got that far). ``extra`` is merged into the report. ``extend(folder, cell,
    report)``, called last with the staging folder, writes further artifacts there (they land with the rest,
    or nothing does when it raises); its dict is merged into the report.
    """
    import mindspore as ms

    formats = _normalise_formats(formats)
    size = int(detector.input_size)
    check_inputs = np.ascontiguousarray(check_inputs, dtype=np.float32)
    if check_inputs.ndim != 4 or check_inputs.shape[1:] != (3, size, size) or len(check_inputs) == 0:
        raise ExportError(f"check_inputs must be float32 [N, 3, {size}, {size}] with N >= 1, "
                          f"got shape {check_inputs.shape}")
    if latency_repeats < 1:
        raise ExportError(f"latency_repeats must be at least 1, got {latency_repeats}")

    cell = detector.inference_cell(network)
    cell.set_train(False)
    run_network = lambda x: _as_numpy_outputs(cell(ms.Tensor(x)))  # noqa: E731
    images = [check_inputs[i:i + 1] for i in range(len(check_inputs))]
    reference = [run_network(x) for x in images]
    input_name = next(iter(inspect.signature(cell.construct).parameters), "image")
    output_names = list(getattr(detector, "output_names", None) or [f"output_{k}" for k in range(len(reference[0]))])
    if len(output_names) != len(reference[0]):
        raise ExportError(f"detector names {len(output_names)} outputs, the network gives {len(reference[0])}")
    report: dict[str, Any] = {
        "model": getattr(detector, "name", type(detector).__name__),
        "input_size": size,
        "num_classes": int(getattr(detector, "num_classes", 0)),
        **detector.weights_meta(),
        "input": {"name": input_name, "shape": [1, 3, size, size], "dtype": "float32"},
        "outputs": _describe(reference[0], output_names),
        "num_check_images": len(images),
        "tolerances": dataclasses.asdict(tolerances),
        "postprocess": dataclasses.asdict(postprocess),
        "strict": strict,
        "latency_repeats": latency_repeats,
        "network_latency_ms": _latency_ms(run_network, images[0], latency_repeats),
        **(extra or {}),
        "formats": {},
    }
    out_dir = Path(out_dir)
    with atomic_path(out_dir, replaces=REPORT_NAME) as tmp:
        tmp.mkdir()
        for fmt in formats:
            final = out_dir / FILE_NAMES[fmt]
            target = tmp / FILE_NAMES[fmt]
            required = _required(fmt, formats, strict)
            try:
                _write(cell, fmt, target, size, input_name, output_names)
                model = load_exported(target)
                got = [model.run(x) for x in images]
            except Exception as exc:
                if required:
                    raise ExportError(f"{final}: {fmt} export failed ({_first_line(exc)})") from exc
                target.unlink(missing_ok=True)
                report["formats"][fmt] = {"exported": False, "reason": _first_line(exc)}
                continue
            verdict = verify(detector, reference, got, output_names, tolerances, postprocess)
            check = {"raw": verdict.raw, "decoded": verdict.decoded}
            if not verdict.ok:
                reason = f"does not compute what the network does: {verdict.problems[0]}"
                if required:
                    raise ExportMismatch(f"{final}: {reason}")
                target.unlink()
                report["formats"][fmt] = {"exported": False, "reason": reason, "problems": verdict.problems,
                                          "check": check}
                continue
            report["formats"][fmt] = {
                "exported": True,
                "file": target.name,
                "size_bytes": target.stat().st_size,
                "check": check,
                "latency_ms": _latency_ms(model.run, images[0], latency_repeats),
                "inputs": [{"name": n, "shape": s} for n, s in zip(model.input_names, model.input_shapes)],
                "outputs": _describe(got[0], getattr(model, "output_names", None)),
            }
        if extend is not None:
            report.update(extend(tmp, cell, report))
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    return report
