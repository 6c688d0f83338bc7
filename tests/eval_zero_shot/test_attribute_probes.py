"""Linear probes and caption-swap accuracy on hand-made embeddings (known answers)."""

import pytest
import torch

from mllm_encoder.eval.caption_swap import caption_swap_accuracy
from mllm_encoder.eval.linear_probe import linear_probe_accuracy


def test_linear_probe_reads_a_linear_attribute_and_not_noise():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(600, 16, generator=generator)
    labels = (features[:, 3] - 0.5 * features[:, 7] > 0).long()  # linearly separable
    assert linear_probe_accuracy(features[:400], labels[:400], features[400:], labels[400:]) > 93.0
    classes = torch.randint(0, 3, (600,), generator=generator)
    shifted = features.clone()
    shifted[:, :3] += 3 * torch.nn.functional.one_hot(classes, 3)  # one direction per class
    assert linear_probe_accuracy(shifted[:400], classes[:400], shifted[400:], classes[400:], num_classes=3) > 90.0
    noise = torch.randint(0, 2, (600,), generator=generator)
    assert 35.0 < linear_probe_accuracy(features[:400], noise[:400], features[400:], noise[400:]) < 65.0
    with pytest.raises(ValueError, match="train_features"):
        linear_probe_accuracy(features[:10], labels[:9], features, labels)


def test_caption_swap_accuracy_counts_strict_wins_only():
    images = torch.eye(3)
    options = torch.stack(
        [
            torch.stack([torch.eye(3)[0], torch.eye(3)[1]]),  # image 0 matches option 0
            torch.stack([torch.eye(3)[1], torch.eye(3)[0]]),  # image 1 matches option 0
            torch.stack([torch.eye(3)[2], torch.eye(3)[2]]),  # image 2 ties: a miss whatever the label
        ]
    )
    assert caption_swap_accuracy(images, options, torch.tensor([0, 0, 1])) == pytest.approx(200 / 3)
    assert caption_swap_accuracy(images, options, torch.tensor([0, 1, 0])) == pytest.approx(100 / 3)
    with pytest.raises(ValueError, match="option_embeds"):
        caption_swap_accuracy(images, options[:2], torch.tensor([0, 0]))
