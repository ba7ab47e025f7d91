"""Low-rank adapters (LoRA-style) for working memory: small deltas on a frozen core's linear layers.

`add_adapters` wraps every `nn.Linear` of a module in `LoRALinear` (base weights frozen, a rank-r
delta B·A that starts at zero, so an untrained adapter changes nothing); `adapter_state` keeps only
the deltas, which is all a ticket stores: megabytes of core stay untouched and shared.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class LoRALinear(nn.Module):
    """`base(x) + scale · x Aᵀ Bᵀ` with `base` frozen."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.rank, self.scale = rank, alpha / rank
        self.lora_a = nn.Parameter(torch.randn(rank, base.in_features) / base.in_features**0.5)
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + (x @ self.lora_a.T @ self.lora_b.T) * self.scale


def add_adapters(model: nn.Module, rank: int = 4, alpha: float = 8.0) -> list[str]:
    """Freeze `model` and wrap its linear layers with adapters; returns the wrapped layers' names."""
    model.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, child_name, LoRALinear(child, rank, alpha))
                wrapped.append(f"{name}.{child_name}" if name else child_name)
    return wrapped


def adapter_state(model: nn.Module) -> dict[str, Tensor]:
    """Only the adapters' weights."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".lora_" in k}


def load_adapter(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Put saved adapter weights into a model already wrapped by `add_adapters` with the same rank."""
    missing = [k for k in state if k not in model.state_dict()]
    if missing:
        raise ValueError(f"adapter does not fit this model (e.g. {missing[0]}); was it trained on another core?")
    model.load_state_dict(state, strict=False)


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
