"""AdamW as PyTorch defines it (decoupled weight decay, bias-corrected moments), in graph mode.

MindSpore's ``nn.AdamWeightDecay`` has no bias correction and its kernels reject 0-d parameters (NanoDet's
per-level scales); nanodet's recipe is torch's AdamW, so we implement exactly that - on MindSpore's fused
``AdamWeightDecay`` kernel (one op per weight instead of a dozen), with the bias correction folded into its
step size, epsilon and decay (Loshchilov & Hutter 2019, Algorithm 2; torch.optim.AdamW):

    w * (1 - lr wd) - lr (m / b1) / (sqrt(v / b2) + eps)
      = w - lr' (m / (sqrt(v) + eps') + wd' w),   lr' = lr sqrt(b2) / b1,  eps' = eps sqrt(b2),  wd' = wd lr / lr'

with b1 = 1 - beta1^t, b2 = 1 - beta2^t. 0-d weights keep the element-wise formula. In CPU training with the
``adamw_ema`` kernel on the same update runs on every tensor, 0-d ones included, as one C++ op (the
``adamw_update`` part of :mod:`msdet.train_ops`, :class:`msdet.kernels.adamw_ema.AdamWUpdate`).

Every optimizer here is called as ``optimizer(gradients, grad_scale)``: the gradients are used multiplied by the
0-d ``grad_scale`` (the clipping factor, :func:`clip_factor`). The C++ AdamW multiplies inside its one op; the
others multiply each tensor first (a ``Mul`` per tensor, ~460 kernels a step, which the C++ path saves).
"""
from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

from msdet import train_ops

_adamw = ops.MultitypeFuncGraph("adamw")


def _adamw_elementwise(lr, beta1, beta2, eps, bias1, bias2, weight_decay, param, m, v, grad):
    grad = grad.astype(param.dtype)
    m_new = beta1 * m + (1.0 - beta1) * grad
    v_new = beta2 * v + (1.0 - beta2) * grad * grad
    denom = ops.sqrt(v_new / bias2) + eps
    update = (m_new / bias1) / denom
    new_param = param * (1.0 - lr * weight_decay) - lr * update
    ops.assign(m, m_new)
    ops.assign(v, v_new)
    ops.assign(param, new_param)
    return True


@_adamw.register("Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor",
                 "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Bool")
def _adamw_fused(lr, beta1, beta2, eps, bias1, bias2, lr_f, eps_f, decay_f, weight_decay, param, m, v, grad,
                 fused):
    if fused:
        _FUSED(param, m, v, lr_f, beta1, beta2, eps_f, weight_decay * decay_f, grad.astype(param.dtype))
        return True
    return _adamw_elementwise(lr, beta1, beta2, eps, bias1, bias2, weight_decay, param, m, v, grad)


_FUSED = ops.AdamWeightDecay()


class AdamW(nn.Cell):
    """``groups``: [{"params": [...], "weight_decay": float}]; ``lr_per_step`` is indexed by the global step.
    ``self(gradients)`` returns the incremented step, which depends on every update (order reads of the
    weights after the step by it: the C++ update writes them unseen by the graph)."""

    def __init__(self, groups: list[dict], lr_per_step: np.ndarray, beta1: float = 0.9, beta2: float = 0.999,
                 eps: float = 1e-8) -> None:
        super().__init__(auto_prefix=False)
        params, decays = [], []
        for group in groups:
            params += list(group["params"])
            decays += [Tensor(float(group["weight_decay"]), ms.float32)] * len(group["params"])
        self.parameters = ParameterTuple(params)
        self.weight_decays = tuple(decays)
        self.moments1 = self.parameters.clone(prefix="adam_m", init="zeros")
        self.moments2 = self.parameters.clone(prefix="adam_v", init="zeros")
        self.global_step = Parameter(Tensor(0, ms.int32), name="global_step", requires_grad=False)
        self.learning_rate = Tensor(np.asarray(lr_per_step, np.float32))
        self.last_index = len(lr_per_step) - 1
        self.beta1 = Tensor(beta1, ms.float32)
        self.beta2 = Tensor(beta2, ms.float32)
        self.eps = Tensor(eps, ms.float32)
        #: MindSpore's fused kernel takes weights of at least one dimension
        self.fused = tuple(p.ndim > 0 for p in params)
        self.hyper_map = ops.HyperMap()
        self.fast = train_ops.make("adamw_update")
        self.decay_vector = Tensor(np.array([float(d) for d in decays], np.float32))

    def construct(self, gradients: tuple, grad_scale: Tensor) -> Tensor:
        index = ops.minimum(self.global_step, self.last_index)
        lr = self.learning_rate[index]
        step = (self.global_step + 1).astype(ms.float32)
        bias1 = 1.0 - ops.pow(self.beta1, step)
        bias2 = 1.0 - ops.pow(self.beta2, step)
        root2 = ops.sqrt(bias2)
        lr_f = lr * root2 / bias1
        eps_f = self.eps * root2
        decay_f = bias1 / root2
        if self.fast is not None:
            hyper = ops.stack([lr_f, self.beta1, self.beta2, eps_f, decay_f, grad_scale.astype(ms.float32)])
            updated = self.fast(hyper, self.decay_vector, self.parameters, self.moments1, self.moments2, gradients)
        else:
            updated = self.hyper_map(
                ops.partial(_adamw, lr, self.beta1, self.beta2, self.eps, bias1, bias2, lr_f, eps_f, decay_f),
                self.weight_decays, self.parameters, self.moments1, self.moments2,
                scale_gradients(gradients, grad_scale), self.fused)
        return ops.depend(ops.assign_add(self.global_step, Tensor(1, ms.int32)), updated)


_scale = ops.MultitypeFuncGraph("scale")


@_scale.register("Tensor", "Tensor")
def _scale_one(factor, grad):
    return grad * factor.astype(grad.dtype)


_square_sum = ops.MultitypeFuncGraph("square_sum")


@_square_sum.register("Tensor")
def _square_sum_one(t):
    return ops.reduce_sum(ops.square(t.astype(ms.float32)))


class SquareSum(nn.Cell):
    """``sum_i sum(t_i ** 2)`` over a tuple of tensors, a 0-d float32: one op (the ``square_sum`` part of
    :mod:`msdet.train_ops`, float32 tensors) when built while a kernel provides it, else per-tensor ``Square`` +
    ``ReduceSum`` and an ``AddN``."""

    def __init__(self) -> None:
        super().__init__()
        op = train_ops.make("square_sum")
        self.fast = op is not None
        if self.fast:
            self.op = op
        self.hyper_map = ops.HyperMap()

    def construct(self, tensors: tuple) -> Tensor:
        if self.fast:
            return self.op(*tensors)
        return ops.addn(self.hyper_map(_square_sum, tensors))


def clip_factor(gradients: tuple, max_norm: float, square_sum: nn.Cell) -> Tensor:
    """The 0-d factor min(1, max_norm / (global L2 norm + 1e-6)) that clips the gradients as torch's
    clip_grad_norm_ (1.0 for ``max_norm`` 0: no clipping); ``square_sum`` is a :class:`SquareSum` (built once,
    outside the graph). The optimizers take it as their ``grad_scale``.

    No branch on the norm: a branch on a tensor value makes the graph wait for the norm on the host (control
    flow), and multiplying by the clamped factor 1.0 changes no bit.
    """
    if max_norm <= 0:
        return Tensor(1.0, ms.float32)
    total = ops.sqrt(square_sum(gradients))
    return ops.minimum(max_norm / (total + 1e-6), 1.0)


def scale_gradients(gradients: tuple, factor: Tensor) -> tuple:
    """Every gradient times the 0-d ``factor``, each keeping its shape (``ops.clip_by_global_norm`` would turn 0-d
    gradients into shape [1])."""
    return ops.HyperMap()(ops.partial(_scale, factor), gradients)


class Momentum(nn.Momentum):
    """``nn.Momentum`` called as the optimizers here are: ``self(gradients, grad_scale)``."""

    def construct(self, gradients: tuple, grad_scale: Tensor) -> Tensor:
        return super().construct(scale_gradients(gradients, grad_scale))
