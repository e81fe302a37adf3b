"""Exponential moving average of all network weights (BN statistics included), updated in graph mode.

Both official recipes evaluate and release the EMA copy. The decay ramps up as nanodet's
``ExpMovingAverager`` does, ``decay * (1 - exp(-step / ramp_steps))``, so early, noisy weights fade fast.
"""
from __future__ import annotations

from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

_update = ops.MultitypeFuncGraph("ema_update")


@_update.register("Tensor", "Tensor", "Tensor")
def _update_one(decay: Tensor, shadow: Parameter, source: Parameter) -> Tensor:
    return ops.assign(shadow, shadow * decay + source * (1.0 - decay))


class EMA(nn.Cell):
    """Holds shadow copies named ``ema.<param name>``; ``self(step)`` updates them after a step."""

    PREFIX = "ema"

    def __init__(self, network: nn.Cell, decay: float, ramp_steps: float = 2000.0) -> None:
        super().__init__(auto_prefix=False)
        self.sources = ParameterTuple(network.get_parameters())
        self.shadows = self.sources.clone(prefix=self.PREFIX, init="same")
        self.decay = decay
        self.ramp_steps = float(ramp_steps)
        self.hyper_map = ops.HyperMap()

    def construct(self, step: Tensor) -> Tensor:
        decay = self.decay * (1.0 - ops.exp(-step / self.ramp_steps))
        self.hyper_map(ops.partial(_update, decay), self.shadows, self.sources)
        return decay

    def copy_to_network(self) -> None:
        """Put the averaged weights into the network (the caller keeps the live ones if it needs them)."""
        for src, sh in zip(self.sources, self.shadows):
            src.set_data(Tensor(sh.asnumpy()))
