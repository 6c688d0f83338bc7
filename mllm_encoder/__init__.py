"""mllm-encoder: CLIP-MoE, a plug-in Mixture-of-Experts vision encoder for multimodal LLMs.

Importing the package registers the CLIP-MoE, SigLIP-MoE and SigLIP 2-MoE configs and models with transformers'
``AutoConfig`` and ``AutoModel``, so ``AutoModel.from_pretrained(dir)`` loads either family's checkpoint.
"""

from transformers import AutoConfig, AutoModel

from mllm_encoder.configuration_clip_moe import CLIPMoEConfig, CLIPMoETextConfig, CLIPMoEVisionConfig
from mllm_encoder.configuration_siglip_moe import (
    Siglip2MoEConfig,
    Siglip2MoETextConfig,
    Siglip2MoEVisionConfig,
    SiglipMoEConfig,
    SiglipMoETextConfig,
    SiglipMoEVisionConfig,
)
from mllm_encoder.families import FAMILIES
from mllm_encoder.modeling_clip_moe import (
    CLIPMoEModel,
    CLIPMoEPreTrainedModel,
    CLIPMoETextModel,
    CLIPMoEVisionModel,
)
from mllm_encoder.modeling_siglip_moe import (
    Siglip2MoEModel,
    Siglip2MoETextModel,
    Siglip2MoEVisionModel,
    SiglipMoEModel,
    SiglipMoEPreTrainedModel,
    SiglipMoETextModel,
    SiglipMoEVisionModel,
)
from mllm_encoder.outputs import CLIPMoEOutput, MoEModelOutputWithPooling, SiglipMoEOutput

__version__ = "0.1.0"

for _family in FAMILIES.values():
    for _config, _model in _family.pairs():
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
    "Siglip2MoEConfig",
    "Siglip2MoEModel",
    "Siglip2MoETextConfig",
    "Siglip2MoETextModel",
    "Siglip2MoEVisionConfig",
    "Siglip2MoEVisionModel",
    "SiglipMoEConfig",
    "SiglipMoEModel",
    "SiglipMoEOutput",
    "SiglipMoEPreTrainedModel",
    "SiglipMoETextConfig",
    "SiglipMoETextModel",
    "SiglipMoEVisionConfig",
    "SiglipMoEVisionModel",
]
