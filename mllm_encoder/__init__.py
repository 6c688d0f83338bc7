"""mllm-encoder: CLIP-MoE, a plug-in Mixture-of-Experts vision encoder for multimodal LLMs.

Importing the package registers the CLIP-MoE configs and models with transformers' ``AutoConfig`` and
``AutoModel``, so ``AutoModel.from_pretrained(dir)`` loads a CLIP-MoE checkpoint.
"""

from transformers import AutoConfig, AutoModel

from mllm_encoder.configuration_clip_moe import CLIPMoEConfig, CLIPMoETextConfig, CLIPMoEVisionConfig
from mllm_encoder.modeling_clip_moe import (
    CLIPMoEModel,
    CLIPMoEPreTrainedModel,
    CLIPMoETextModel,
    CLIPMoEVisionModel,
)
from mllm_encoder.outputs import CLIPMoEOutput, MoEModelOutputWithPooling

__version__ = "0.1.0"

for _config, _model in (
    (CLIPMoEConfig, CLIPMoEModel),
    (CLIPMoEVisionConfig, CLIPMoEVisionModel),
    (CLIPMoETextConfig, CLIPMoETextModel),
):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModel.register(_config, _model, exist_ok=True)

__all__ = [
    "CLIPMoEConfig",
    "CLIPMoEModel",
    "CLIPMoEOutput",
    "CLIPMoEPreTrainedModel",
    "CLIPMoETextConfig",
    "CLIPMoETextModel",
    "CLIPMoEVisionConfig",
    "CLIPMoEVisionModel",
    "MoEModelOutputWithPooling",
]
