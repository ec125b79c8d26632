"""Random weights from one seeded generator, for tests, benchmarks and the --random-weights demo."""

from __future__ import annotations

import torch

from ..noise import randn_tensor


@torch.no_grad()
def randomize_(model: torch.nn.Module, generator: torch.Generator, layer_scale: float = 0.1,
               token_std: float = 1.0) -> torch.nn.Module:
    """Fill every parameter of ``model`` in place from ``generator`` (never the global RNG), so a seed always
    gives the same model: biases 0, LayerScale gammas ``layer_scale``, other vectors (norm weights) 1, token and
    position tables (3-d parameters, nn.Embedding weights) N(0, token_std^2), matrices and kernels N(0, 1 / fan_in). Parameters on the meta device are first given CPU storage (buffers
    are left as they are: build with accelerate's ``init_empty_weights`` to keep them real)."""
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.is_meta:
                module.register_parameter(name, torch.nn.Parameter(torch.empty(param.shape), param.requires_grad))
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    for name, param in model.named_parameters():
        if name.endswith("bias"):
            param.zero_()
        elif name.endswith("gamma"):
            param.fill_(layer_scale)
        elif param.dim() == 1:
            param.fill_(1.0)
        elif param.dim() == 3 or id(param) in embeddings:  # tokens, positions
            param.copy_(randn_tensor(param.shape, generator) * token_std)
        else:
            param.copy_(randn_tensor(param.shape, generator) / param[0].numel() ** 0.5)
    return model
