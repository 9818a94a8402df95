"""``gradcam``: Captum's ``LayerGradCam`` on the last ResNet stage with a usable spatial size.

Not efficient (no completeness property): its values are a ranking of the players, and the
result reports no local-accuracy residual for it.
"""

from __future__ import annotations

import numpy as np
import torch

from worker.methods.base import (
    Attribution,
    MethodContext,
    all_hidden,
    model_image,
    per_superpixel,
    probabilities_of,
    require_autograd,
)

#: Grad-CAM needs a spatial map: the last stage with an output at least this many pixels a side.
GRADCAM_MIN_SIDE = 4
GRADCAM_CANDIDATES = ("layer4", "layer3", "layer2", "layer1")


def gradcam_layer(model: torch.nn.Module, side: int) -> tuple[str, int]:
    """(name, output side) of the last ResNet stage whose output is at least :data:`GRADCAM_MIN_SIDE` a side.

    Probed with one forward pass at the model's input size: the ``cpu`` profile's network
    sees 32 px, its layer4 output is 1×1 (a constant map) and layer2's 4×4 is the last usable
    one; the ``paper`` network upsamples to 224 inside and its layer4 is 7×7. With none large
    enough, the largest output.
    """
    net = getattr(model, "net", model)
    names = [n for n in GRADCAM_CANDIDATES if hasattr(net, n)]
    sizes: dict[str, int] = {}
    hooks = [
        getattr(net, n).register_forward_hook(lambda _m, _i, out, n=n: sizes.__setitem__(n, min(out.shape[-2:])))
        for n in names
    ]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, side, side, device=next(model.parameters()).device))
    finally:
        for hook in hooks:
            hook.remove()
    usable = [n for n in names if sizes.get(n, 0) >= GRADCAM_MIN_SIDE]
    name = usable[0] if usable else max(names, key=lambda n: sizes.get(n, 0))
    return name, int(sizes[name])


def attribute(ctx: MethodContext) -> Attribution:
    """Captum's ``LayerGradCam`` for every class's probability, upsampled to 32×32 (bilinear).

    The sign is kept (``relu_attributions=False``): positive = the stage's features push the
    class's probability up (red in the heatmap), negative = down (blue). The usual ReLU would
    hide the evidence against a class, which the per-superpixel values and the deletion curve
    use. No completeness property, so no convergence to check: ``converged`` is None.
    """
    from captum.attr import LayerAttribution, LayerGradCam

    model = require_autograd(ctx, "gradcam")
    x = model_image(ctx)
    side = int(x.shape[-1])
    name, layer_side = gradcam_layer(model, side)
    layer = getattr(getattr(model, "net", model), name)
    classes = ctx.f.classes
    cam = LayerGradCam(probabilities_of(model), layer)
    attr = cam.attribute(x.expand(classes, -1, -1, -1).contiguous(), target=list(range(classes)),
                         relu_attributions=False)
    maps = LayerAttribution.interpolate(attr.detach(), (side, side), interpolate_mode="bilinear")
    maps = maps[:, 0].double().cpu().numpy()  # (C, 32, 32)
    return Attribution(
        phi=per_superpixel(maps, ctx.f.A.cpu().numpy()),
        base=all_hidden(ctx),
        fx=ctx.f.fx(),
        # nothing sampled, nothing approximated: one gradient computes Grad-CAM exactly as defined
        convergence={"converged": True, "criterion": "deterministic: one gradient, nothing sampled"},
        pixel_maps=maps.astype(np.float32),
        coalitions=0,
        extra={"gradcam_layer": name, "gradcam_layer_side": layer_side, "gradient_evaluations": classes},
    )
