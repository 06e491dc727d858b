"""Router fits: each router's logits fitted by least squares to the log output error its tokens keep.

Gate ``e`` buys slice ``e+1``, which removes nearly all of the error ``err_e`` left at ``e`` slices (the next
slice's error is about 16 times smaller). A router whose logit ``e`` predicts ``log err_e`` therefore ranks
(token, slice) pairs by the error each removes, and a threshold on those scores spends a layer's bits where they
remove the most output error.

:func:`fit_routers` is the fit. The block calibration runs it on a block's layers against the full-precision
weight (``mobiquant.calibration.block.fit_routers_to_errors``); :func:`refit_routers` runs it again on an
assembled model whose weights changed after its blocks were calibrated (the end-to-end stage trains every group's
scale and zero and the row gains, so the errors the blocks' routers learnt are no longer the layers' errors).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from mobiquant.calibration.config import ROUTER_FIT_LR, ROUTER_FIT_STEPS, ROUTER_FIT_TOKENS
from mobiquant.layers import MoBiLinear, MoBiRouter

# The most input elements (float32) one batched fit copies together: 1 GiB.
ROUTER_BATCH_ELEMENTS = 2**28


def fit_routers(routers: Sequence[MoBiRouter], xs: Sequence[torch.Tensor], errors: Sequence[torch.Tensor],
                progress: str | None = None) -> list[float]:
    """Fit each router's logits on its tokens ``x`` to ``log errors`` (``[tokens, K-1]``), centred: logit 0, the
    training mask's cut, sits in the middle of the range (the errors fall with ``e``, so the fitted logits already
    respect the nesting). Full-batch Adam from the router's current weights. Returns each fit's mean squared error
    over its targets' variance (0 is a perfect ranking, 1 no better than a constant).

    Routers of one shape, token count, device and dtype are fitted together: their weights stacked, their products
    batched, each with its own loss (the sum of the losses gives each router its own gradient, and Adam works per
    element), so each fit is the one it would be alone. A fit is some ten small steps per Adam step whatever its
    size, so on a GPU one batched fit costs about what one router's does. A batch holds at most
    ``ROUTER_BATCH_ELEMENTS`` input elements (a copy of its tokens). ``progress``: a bar with that label.
    """
    residuals = [0.0] * len(routers)
    groups: dict[tuple, list[list[int]]] = {}
    for index, (router, x) in enumerate(zip(routers, xs, strict=True)):
        weight = router.fc1.weight
        key = (*weight.shape, router.fc2.out_features, len(x), weight.device, weight.dtype, router.fc2.weight.dtype)
        batches = groups.setdefault(key, [[]])
        if batches[-1] and (len(batches[-1]) + 1) * x.numel() > ROUTER_BATCH_ELEMENTS:
            batches.append([])
        batches[-1].append(index)
    with tqdm(total=len(routers), desc=progress, unit="router", disable=progress is None, leave=False) as bar:
        for indices in (batch for batches in groups.values() for batch in batches):
            fitted = _fit_stacked([routers[i] for i in indices], torch.stack([xs[i] for i in indices]),
                                  torch.stack([errors[i] for i in indices]))
            for index, residual in zip(indices, fitted, strict=True):
                residuals[index] = residual
            bar.update(len(indices))
    return residuals


def _fit_stacked(routers: list[MoBiRouter], x: torch.Tensor, errors: torch.Tensor) -> list[float]:
    """The fits of routers of one shape on ``x`` ``[routers, tokens, in]`` to ``errors`` ``[routers, tokens, K-1]``,
    as :class:`MoBiRouter`'s forward computes, batched; the fitted weights are copied into the routers."""
    target = errors.clamp_min(1e-30).log()
    target = target - target.mean(dim=(1, 2), keepdim=True)
    names = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "norm_weight")
    stacked = {name: torch.stack([router.get_parameter(name).detach() for router in routers]).requires_grad_(True)
               for name in names}
    x = x.float()
    # The router's input normalisation does not depend on its weights: once for every step.
    mean_square = torch.linalg.vector_norm(x, dim=-1, keepdim=True).pow(2) / x.shape[-1] + 1e-6
    inverse_rms, log_mean_square = torch.rsqrt(mean_square), mean_square.log()
    activation = routers[0].act
    optimizer = torch.optim.Adam(stacked.values(), lr=ROUTER_FIT_LR)
    with torch.enable_grad():
        for _step in range(ROUTER_FIT_STEPS):
            projected = torch.bmm(x, stacked["fc1.weight"].float().transpose(1, 2))
            hidden = torch.addcmul(stacked["fc1.bias"].float()[:, None], projected, inverse_rms)
            fc2_weight = stacked["fc2.weight"]
            logits = torch.baddbmm(stacked["fc2.bias"][:, None], activation(hidden).to(fc2_weight.dtype),
                                   fc2_weight.transpose(1, 2)).float()
            prediction = logits + stacked["norm_weight"].float()[:, None] * log_mean_square
            losses = (prediction - target).pow(2).mean(dim=(1, 2))
            optimizer.zero_grad(set_to_none=True)
            losses.sum().backward()
            optimizer.step()
    with torch.no_grad():
        for index, router in enumerate(routers):
            for name in names:
                router.get_parameter(name).copy_(stacked[name][index])
    variances = target.flatten(1).var(dim=1).double().clamp_min(1e-12)
    return (losses.detach().double() / variances).tolist()


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
    reached = [name for name in layers if seen[name]]
    xs = {name: torch.cat(seen.pop(name)) for name in reached}
    errors = {name: errors_kept(layers[name], xs[name]) for name in tqdm(
        reached, desc="router refit: errors", unit="layer", disable=not progress, leave=False)}
    residuals = fit_routers([layers[name].router for name in reached], [xs[name] for name in reached],
                            [errors[name] for name in reached], "router refit" if progress else None)
    return dict(zip(reached, residuals, strict=True))
