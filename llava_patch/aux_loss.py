"""The MoE tower's load-balancing loss in a LLaVA model's loss: one mechanism for LLaVA-1.5 and transformers' Llava*.

Definition: a forward that computes a loss returns ``loss + router_aux_loss_coef * mean(aux_loss)``, the mean
over the calls of the tower's encoder during that forward (a list of images, or tiles, may call it several times),
counting only the calls made while the tower trains (autograd records and some encoder weight is trainable).
The encoder's ``aux_loss`` is its own mean over its MoE layers; it leaves the encoder in its outputs, and a forward
hook on the encoder collects it (:class:`TowerAuxLoss`); the library tower keeps no copy of it.

* transformers' Llava, LlavaNext and LlavaOnevision: ``TowerAuxLoss(model)`` also hooks the model's forward, which
  adds the term to ``output.loss``; ``remove()`` uninstalls.
* LLaVA-1.5 (``llava_patch``): the tower (``registry.LlavaCLIPMoEVisionTower``) holds a
  ``TowerAuxLoss(None, encoder)``; the patched ``forward`` (:mod:`llava_patch.tower.forward`) calls
  :meth:`TowerAuxLoss.start` before LLaVA's forward and :meth:`TowerAuxLoss.add_to` on its outputs, because
  LLaVA's model computes its loss inside the call it makes.

The hooks are installed once (not per forward), so an encoder compiled with ``compile_tower`` keeps its graph.
"""

from typing import Any, List, Optional

import torch
from torch import nn

from llava_patch.hf.llava import llava_vision_tower


class TowerAuxLoss:
    """Collects the tower encoder's ``aux_loss`` over one forward and adds ``coef * mean`` to that forward's loss.

    Args:
        model: a Llava* model whose forward is hooked (its vision tower is the encoder unless ``encoder`` is
            given); ``None``: no model hook, the caller calls :meth:`start` and :meth:`add_to` around its forward.
        encoder: the MoE image encoder (a ``CLIPMoEVisionModel`` / ``SiglipMoEVisionModel``).
    """

    def __init__(self, model: Optional[nn.Module], encoder: Optional[nn.Module] = None):
        self.encoder = encoder if encoder is not None else llava_vision_tower(model)
        self.coef = float(self.encoder.config.router_aux_loss_coef)
        self.added: Optional[torch.Tensor] = None  # the term the last forward added (None: nothing added)
        self._calls: List[torch.Tensor] = []
        self._handles = [self.encoder.register_forward_hook(self._record)]
        if model is not None:
            self._handles.append(model.register_forward_pre_hook(lambda module, args: self.start()))
            self._handles.append(model.register_forward_hook(lambda module, args, output: self.add_to(output)))

    def _trains(self) -> bool:
        return torch.is_grad_enabled() and any(p.requires_grad for p in self.encoder.parameters())

    def _record(self, module: nn.Module, args: Any, output: Any) -> None:
        aux_loss = getattr(output, "aux_loss", None)
        if aux_loss is not None and self._trains():
            self._calls.append(aux_loss)

    def start(self) -> None:
        """Forget the encoder calls recorded so far: a forward begins."""
        self._calls = []
        self.added = None

    def add_to(self, output: Any) -> Any:
        """``output`` with ``coef * mean`` of the encoder calls since :meth:`start` added to its loss (a
        ``ModelOutput``'s ``loss``, or the leading scalar of a tuple); unchanged when there is no loss, no call
        made while the tower trained, or ``coef`` is 0."""
        calls, self._calls = self._calls, []
        if not calls or not self.coef:
            return output
        term = self.coef * torch.stack([aux.float() for aux in calls]).mean()
        if isinstance(output, tuple):  # return_dict=False: the loss, when present, is the leading scalar
            if not output or not isinstance(output[0], torch.Tensor) or output[0].dim() != 0:
                return output
            self.added = term
            return (output[0] + term.to(output[0]),) + output[1:]
        if getattr(output, "loss", None) is None:
            return output
        self.added = term
        output.loss = output.loss + term.to(output.loss)
        return output

    def remove(self) -> None:
        """Uninstall the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
