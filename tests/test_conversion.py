"""Converted weights reproduce the source models: a reference OpenAI-layout CLIP-MoE written here,
open_clip's own CLIP, and timm's own ViT."""

import collections

import pytest
import torch
from torch import nn

from mllm_encoder import CLIPMoEModel, CLIPMoEVisionModel
from mllm_encoder.conversion import convert_openai_clip, convert_timm_clip_vit
from mllm_encoder.conversion.convert import convert_checkpoint, read_state_dict
from mllm_encoder.loading import load_clip_moe

WIDTH, HEADS, EMBED = 64, 1, 24  # heads = width // 64, as the converter assumes


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


def mlp(width):
    return nn.Sequential(
        collections.OrderedDict(c_fc=nn.Linear(width, 4 * width), gelu=QuickGELU(), c_proj=nn.Linear(4 * width, width))
    )


class ReferenceBlock(nn.Module):
    """OpenAI's residual block; with ``num_experts`` it is the released CLIP-MoE's MoE block."""

    def __init__(self, width, num_experts=0, top_k=2, causal_length=None):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, HEADS, batch_first=True)
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.top_k = top_k
        if num_experts:
            self.experts = nn.ModuleList([mlp(width) for _ in range(num_experts)])
            self.gate = nn.Linear(width, num_experts, bias=False)
        else:
            self.mlp = mlp(width)
        self.causal_length = causal_length

    def ffn(self, x):
        if not hasattr(self, "experts"):
            return self.mlp(x)
        probs = torch.softmax(self.gate(x), dim=-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for slot in range(self.top_k):
            for e, expert in enumerate(self.experts):
                out = out + (chosen[..., slot] == e).unsqueeze(-1) * weights[..., slot, None] * expert(x)
        return out

    def forward(self, x):
        mask = None
        if self.causal_length:
            n = x.shape[1]
            mask = torch.full((n, n), float("-inf")).triu(1)
        x = x + self.attn(*[self.ln_1(x)] * 3, need_weights=False, attn_mask=mask)[0]
        return x + self.ffn(self.ln_2(x))


class ReferenceOpenAICLIPMoE(nn.Module):
    """A tiny CLIP(-MoE) in the OpenAI / Long-CLIP layout, the last ``moe_last`` blocks MoE."""

    def __init__(self, num_experts=4, moe_last=2, context=24, long_clip=True, vocab=49408):
        super().__init__()
        layers = 3
        self.visual = nn.Module()
        self.visual.conv1 = nn.Conv2d(3, WIDTH, 8, 8, bias=False)
        self.visual.class_embedding = nn.Parameter(torch.randn(WIDTH))
        self.visual.positional_embedding = nn.Parameter(torch.randn(17, WIDTH) * 0.1)
        self.visual.ln_pre, self.visual.ln_post = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)
        self.visual.transformer = nn.Module()
        experts = [num_experts if i >= layers - moe_last else 0 for i in range(layers)]
        self.visual.transformer.resblocks = nn.ModuleList([ReferenceBlock(WIDTH, e) for e in experts])
        self.visual.proj = nn.Parameter(torch.randn(WIDTH, EMBED) * 0.1)
        self.token_embedding = nn.Embedding(vocab, WIDTH)
        self.positional_embedding = nn.Parameter(torch.randn(context, WIDTH) * 0.1)
        if long_clip:
            self.positional_embedding_res = nn.Parameter(torch.randn(context, WIDTH) * 0.1)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList([ReferenceBlock(WIDTH, e, causal_length=context) for e in experts])
        self.ln_final = nn.LayerNorm(WIDTH)
        self.text_projection = nn.Parameter(torch.randn(WIDTH, EMBED) * 0.1)
        self.logit_scale = nn.Parameter(torch.tensor(4.6))
        for param in self.parameters():  # non-trivial LayerNorms and biases
            if param.dim() == 1 and param.shape[0] != EMBED:
                param.data.normal_(1.0 if param.abs().sum() == param.numel() else 0.0, 0.1)

    def encode_image(self, pixel_values):
        v = self.visual
        x = v.conv1(pixel_values).flatten(2).transpose(1, 2)
        x = torch.cat([v.class_embedding.expand(x.shape[0], 1, -1), x], 1) + v.positional_embedding
        x = v.ln_pre(x)
        for block in v.transformer.resblocks:
            x = block(x)
        return v.ln_post(x[:, 0]) @ v.proj

    def encode_text(self, text):
        positions = self.positional_embedding
        if hasattr(self, "positional_embedding_res"):
            short = torch.zeros(positions.shape[0], 1)
            short[:20] = 1
            positions = positions * short + self.positional_embedding_res * (1 - short)
        x = self.token_embedding(text) + positions[: text.shape[1]]
        for block in self.transformer.resblocks:
            x = block(x)
        x = self.ln_final(x)
        return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.text_projection


def sample_inputs(context=24):
    torch.manual_seed(11)
    text = torch.randint(1, 49000, (3, context))
    for row, eot in enumerate((23, 12, 5)):
        text[row, eot] = 49407
        text[row, eot + 1 :] = 0
    return torch.randn(2, 3, 32, 32), text


@pytest.mark.parametrize("long_clip", [True, False])
def test_official_clip_moe_conversion_reproduces_the_reference(long_clip):
    torch.manual_seed(0)
    reference = ReferenceOpenAICLIPMoE(long_clip=long_clip).eval()
    config, state_dict = convert_openai_clip(reference.state_dict(), top_k=2)
    assert config.vision_config.moe_layers == [1, 2] and config.vision_config.num_experts == 4
    assert config.text_config.max_position_embeddings == 24 and config.vision_config.image_size == 32
    model = CLIPMoEModel(config).eval()
    model.load_state_dict(state_dict, strict=True)
    pixel_values, text = sample_inputs()
    with torch.no_grad():
        torch.testing.assert_close(
            model.get_image_features(pixel_values), reference.encode_image(pixel_values), atol=1e-4, rtol=0
        )
        torch.testing.assert_close(model.get_text_features(text), reference.encode_text(text), atol=1e-4, rtol=0)


def test_conversion_rejects_unconverted_tensors():
    state_dict = ReferenceOpenAICLIPMoE(num_experts=0, moe_last=0, long_clip=False).state_dict()
    state_dict["visual.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="visual.extra.weight"):
        convert_openai_clip(state_dict)


def test_open_clip_model_converts_exactly(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    reference = open_clip.model.CLIP(
        embed_dim=EMBED,
        vision_cfg=open_clip.model.CLIPVisionCfg(layers=2, width=WIDTH, patch_size=8, image_size=32),
        text_cfg=open_clip.model.CLIPTextCfg(context_length=16, vocab_size=49408, width=WIDTH, heads=HEADS, layers=2),
        quick_gelu=True,
    ).eval()
    torch.save({"state_dict": {"module." + k: v for k, v in reference.state_dict().items()}}, tmp_path / "oc.pt")
    convert_checkpoint(tmp_path / "oc.pt", tmp_path / "converted", "openai")
    model = load_clip_moe(tmp_path / "converted").eval()
    assert isinstance(model, CLIPMoEModel) and model.config.vision_config.num_experts == 1
    text = open_clip.get_tokenizer("ViT-B-32", context_length=16)(["a striped red circle", "a dog"])
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            model.get_image_features(pixel_values), reference.encode_image(pixel_values), atol=1e-4, rtol=0
        )
        torch.testing.assert_close(model.get_text_features(text), reference.encode_text(text), atol=1e-4, rtol=0)
    from mllm_encoder.checkpoint import load_processors

    _, tokenizer = load_processors(tmp_path / "converted")
    ids = tokenizer(["a striped red circle"], padding="max_length", max_length=16, return_tensors="pt").input_ids
    assert ids[0, :6].tolist() == text[0, :6].tolist()


def timm_reference():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.models.vision_transformer.VisionTransformer(
        img_size=32,
        patch_size=8,
        embed_dim=WIDTH,
        depth=2,
        num_heads=HEADS,
        pre_norm=True,
        norm_layer=nn.LayerNorm,
        act_layer="quick_gelu",
        num_classes=EMBED,
        global_pool="token",
    ).eval()


def test_timm_clip_vit_converts_exactly(tmp_path):
    reference = timm_reference()
    config, state_dict = convert_timm_clip_vit(reference.state_dict())
    model = CLIPMoEVisionModel(config).eval()
    model.load_state_dict(state_dict, strict=True)
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = reference.forward_features(pixel_values)
        pooled = reference.forward_head(features, pre_logits=True)
        ours = model(pixel_values, output_hidden_states=True)
        torch.testing.assert_close(ours.pooler_output, pooled, atol=1e-4, rtol=0)
        block_out = reference.blocks[0](reference.norm_pre(reference._pos_embed(reference.patch_embed(pixel_values))))
        torch.testing.assert_close(ours.hidden_states[1], block_out, atol=1e-4, rtol=0)


def test_timm_conversion_with_upcycling_through_files(tmp_path):
    from safetensors.torch import save_file

    reference = timm_reference()
    save_file(reference.state_dict(), str(tmp_path / "vit.safetensors"))
    convert_checkpoint(tmp_path / "vit.safetensors", tmp_path / "moe", "timm", top_k=2, num_experts=4)
    model = load_clip_moe(tmp_path / "moe").eval()
    assert isinstance(model, CLIPMoEVisionModel) and model.config.moe_layer_indices == [0, 1]
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        pooled = reference.forward_head(reference.forward_features(pixel_values), pre_logits=True)
        torch.testing.assert_close(model(pixel_values).pooler_output, pooled, atol=1e-4, rtol=0)


def test_read_state_dict_refuses_pickled_code(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"x": Evil()}))
    with pytest.raises(ValueError, match="weights-only"):
        read_state_dict(tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="no weights found"):
        read_state_dict(tmp_path / "missing")
