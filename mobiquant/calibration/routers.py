"""Router fits: each router's logits fitted by least squares to the log output error its tokens keep.

Gate ``e`` buys slice ``e+1``, which removes nearly all of the error ``err_e`` left at ``e`` slices (the next
slice's error is about 16 times smaller). A router whose logit ``e`` predicts ``log err_e`` therefore ranks
(token, slice) pairs by the error each removes, and a threshold on those scores spends a layer's bits where they
remove the most output error.

:func:`fit_router` is the fit. The block calibration runs it on a block's layers against the full-precision
weight (``mobiquant.calibration.block.fit_routers_to_errors``); :func:`refit_routers` runs it again on an
assembled model whose weights changed after its blocks were calibrated (the end-to-end stage trains every group's
scale and zero and the row gains, so the errors the blocks' routers learnt are no longer the layers' errors).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from mobiquant.calibration.config import ROUTER_FIT_LR, ROUTER_FIT_STEPS, ROUTER_FIT_TOKENS
from mobiquant.layers import MoBiLinear, MoBiRouter


def fit_router(router: MoBiRouter, x: torch.Tensor, errors: torch.Tensor) -> float:
    """Fit ``router``'s logits on the tokens ``x`` to ``log errors`` (``[tokens, K-1]``), centred: logit 0, the
    training mask's cut, sits in the middle of the range (the errors fall with ``e``, so the fitted logits already
    respect the nesting). Full-batch Adam from the router's current weights; its parameters' ``requires_grad`` flags
    are left as they were. Returns the mean squared fit error over the targets' variance (0 is a perfect ranking,
    1 no better than a constant)."""
    target = errors.clamp_min(1e-30).log()
    target = target - target.mean()
    flags = [p.requires_grad for p in router.parameters()]
    router.requires_grad_(True)
    optimizer = torch.optim.Adam(router.parameters(), lr=ROUTER_FIT_LR)
    with torch.enable_grad():
        for _step in range(ROUTER_FIT_STEPS):
            loss = F.mse_loss(router(x), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    for p, flag in zip(router.parameters(), flags, strict=True):
        p.requires_grad_(flag)
    return float(loss.detach()) / max(float(target.var()), 1e-12)


def errors_kept(layer: MoBiLinear, x: torch.Tensor) -> torch.Tensor:
    """``[tokens, K-1]``: column e-1 is ``||x (W_e - W_K)^T||^2``, the output error a token keeps at e slices
    against the most the layer holds (``K`` its stored slices; the full-precision weight is not part of a
    checkpoint, and ``W_K``'s own error is a slice finer than ``W_{K-1}``'s)."""
    with torch.no_grad():
        finest = layer.dense_weight(layer.stored_slices, torch.float32)
        return torch.stack([(x @ (layer.dense_weight(e, torch.float32) - finest).T).pow(2).sum(dim=-1)
                            for e in range(1, layer.stored_slices)], dim=-1)


def refit_routers(model: nn.Module, samples: torch.Tensor, batch_size: int, seed: int,
                  progress: bool = True) -> dict[str, float]:
    """Fit every router of the assembled ``model`` anew to its layer's current weights; each fit's residual.

    The model runs the calibration windows ``samples`` at every slice it holds, ``batch_size`` windows a pass
    (on the model's device), and each layer keeps ``ROUTER_FIT_TOKENS`` of its input tokens, drawn from ``seed``, as
    the block calibration does; each router is then fitted, starting from its current weights, to the errors
    :func:`errors_kept` on those tokens. A layer no token reached (an expert the calibration text never routes to)
    keeps its router.
    """
    layers = {name: module for name, module in model.named_modules()
              if isinstance(module, MoBiLinear) and module.router is not None}
    if not layers:
        return {}
    generator = torch.Generator().manual_seed(seed)
    per_batch = max(1, math.ceil(ROUTER_FIT_TOKENS / math.ceil(len(samples) / batch_size)))
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in layers}

    def keep_sample(name: str) -> Callable[..., None]:
        def hook(module: MoBiLinear, args: tuple) -> None:
            tokens = args[0].detach().reshape(-1, module.in_features)
            if len(tokens):
                pick = torch.randperm(len(tokens), generator=generator, device=generator.device)[:per_batch]
                seen[name].append(tokens[pick.to(tokens.device)].float())

        return hook

    settings = {name: layer.uniform_slices for name, layer in layers.items()}
    handles = [layer.register_forward_pre_hook(keep_sample(name)) for name, layer in layers.items()]
    device = next(model.parameters()).device
    try:
        for layer in layers.values():
            layer.uniform_slices = layer.stored_slices
        with torch.no_grad():
            for batch in samples.split(batch_size):
                model(batch.to(device))
    finally:
        for handle in handles:
            handle.remove()
        for name, layer in layers.items():
            layer.uniform_slices = settings[name]
    residuals = {}
    for name, layer in tqdm(layers.items(), desc="router refit", unit="layer", disable=not progress):
        if seen[name]:
            x = torch.cat(seen[name])
            residuals[name] = fit_router(layer.router, x, errors_kept(layer, x))
    return residuals
