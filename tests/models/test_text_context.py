"""Long-CLIP text stretching: the table maths, short texts unchanged, 248 tokens accepted, the command."""

import pytest
import torch
from transformers import AutoTokenizer, CLIPConfig, CLIPModel

from mllm_encoder import CLIPMoEConfig, CLIPMoEModel
from mllm_encoder.checkpoint import default_image_processor, save_checkpoint
from mllm_encoder.cli import main
from mllm_encoder.conversion.tokenizer import write_clip_tokenizer
from mllm_encoder.loading import load_clip_moe
from mllm_encoder.text_context import stretch_position_embeddings, stretch_text_context

TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


def _model_77(seed: int = 0) -> CLIPMoEModel:
    torch.manual_seed(seed)
    config = CLIPMoEConfig(
        vision_config=dict(image_size=32, patch_size=8, **TOWER),
        text_config=dict(vocab_size=49408, max_position_embeddings=77, eos_token_id=49407, **TOWER),
        projection_dim=16,
    )
    return CLIPMoEModel(config).eval()


def test_stretched_table_is_long_clip_interpolation():
    table = torch.randn(77, 8)
    out = stretch_position_embeddings(table, 248, keep=20)
    assert out.shape == (248, 8)
    torch.testing.assert_close(out[:20], table[:20], rtol=0, atol=0)
    torch.testing.assert_close(out[20::4][:57], table[20:])  # every 4th row is an original row
    torch.testing.assert_close(out[21], 0.75 * table[20] + 0.25 * table[21])
    torch.testing.assert_close(out[22], 0.5 * table[20] + 0.5 * table[21])
    torch.testing.assert_close(out[243], 0.25 * table[75] + 0.75 * table[76])
    slope = table[76] - table[75]  # the last 3 rows continue the last pair's slope
    for r in (1, 2, 3):
        torch.testing.assert_close(out[244 + r], table[76] + r / 4 * slope)
    with pytest.raises(ValueError, match="positions"):
        stretch_position_embeddings(table, 77)
    with pytest.raises(ValueError, match="keep"):
        stretch_position_embeddings(table, 248, keep=76)


def test_short_texts_keep_their_embedding_and_248_tokens_fit():
    model = _model_77()
    stretched = stretch_text_context(model, 248)
    assert stretched.config.text_config.max_position_embeddings == 248
    assert model.config.text_config.max_position_embeddings == 77  # the source is untouched
    ids = torch.randint(1, 49000, (3, 20))
    ids[:, -1] = 49407
    with torch.no_grad():
        before = model.get_text_features(input_ids=ids)
        after = stretched.get_text_features(input_ids=ids)
        padded = torch.cat([ids, torch.zeros(3, 228, dtype=torch.long)], dim=1)  # padded to 248
        mask = torch.cat([torch.ones(3, 20), torch.zeros(3, 228)], dim=1).long()
        after_padded = stretched.get_text_features(input_ids=padded, attention_mask=mask)
        long_ids = torch.randint(1, 49000, (2, 248))
        long_ids[:, -1] = 49407
        assert stretched.get_text_features(input_ids=long_ids).shape == (2, 16)
        longer = torch.randint(1, 49000, (3, 40))
        longer[:, -1] = 49407
        changed = stretched.get_text_features(input_ids=longer) - model.get_text_features(input_ids=longer)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
    torch.testing.assert_close(after_padded, before, rtol=0, atol=1e-5)
    assert changed.abs().max() > 1e-4  # positions past 20 are really new
    with pytest.raises(ValueError, match="max_position_embeddings"):
        stretched.get_text_features(input_ids=torch.ones(1, 249, dtype=torch.long))


def test_stretch_text_command_writes_a_complete_checkpoint(tmp_path):
    tokenizer = write_clip_tokenizer(tmp_path / "tok", context_length=77)
    model = _model_77()
    src = save_checkpoint(model, tmp_path / "src", default_image_processor(32), tokenizer)
    hf = CLIPModel(CLIPConfig(**model.config.to_dict()))  # an HF CLIP directory as source works too
    hf.load_state_dict(model.state_dict(), strict=False)
    hf.save_pretrained(tmp_path / "hf")
    default_image_processor(32).save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    for source in (src, tmp_path / "hf"):
        out = tmp_path / f"out-{source.name}"
        main(["stretch-text", str(source), str(out), "--positions", "248"])
        reloaded = load_clip_moe(str(out)).eval()
        assert reloaded.config.text_config.max_position_embeddings == 248
        assert AutoTokenizer.from_pretrained(out).model_max_length == 248
        expected = stretch_text_context(model, 248).state_dict()
        for name, value in reloaded.state_dict().items():
            torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=name)


def test_stretch_text_never_writes_over_its_input(tmp_path, capsys):
    tokenizer = write_clip_tokenizer(tmp_path / "tok", context_length=77)
    src = save_checkpoint(_model_77(), tmp_path / "src", default_image_processor(32), tokenizer)
    before = (src / "model.safetensors").read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        main(["stretch-text", str(src), str(src)])
    assert exit_info.value.code == 1 and "is the input" in capsys.readouterr().err
    assert (src / "model.safetensors").read_bytes() == before
