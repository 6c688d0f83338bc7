"""Feature extraction with bad samples, empty data, and concurrent writers of the training state."""

import multiprocessing

import numpy as np
import pytest
import torch
from dmu_helpers import TensorPairs

from mllm_encoder.data import BadSampleFractionError, ImageTextCollator
from mllm_encoder.dmu.features import extract_features, load_features
from mllm_encoder.dmu.run_state import latest_training_state, load_training_state, save_training_state


class MeanEncoder(torch.nn.Module):
    """Image feature: the per-channel pixel mean; text feature: the mean token id (exact, checkable)."""

    def get_image_features(self, pixel_values):
        return pixel_values.mean(dim=(2, 3))

    def get_text_features(self, input_ids, attention_mask):
        return input_ids.float().mean(dim=1, keepdim=True)


class WithBad(torch.utils.data.Dataset):
    def __init__(self, pairs, bad):
        self.pairs, self.bad = pairs, set(bad)

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, index):
        return None if index in self.bad else self.pairs[index]


def test_an_all_bad_batch_is_skipped(tmp_path):
    pairs = TensorPairs(n=12)
    dataset = WithBad(pairs, bad=range(4))  # the whole first batch of 4
    collator = ImageTextCollator(max_bad_fraction=0.5, dataset=dataset)
    extract_features(MeanEncoder(), dataset, collator, tmp_path, batch_size=4)
    features = load_features(tmp_path)
    assert features["index"].tolist() == list(range(4, 12)) and collator.num_bad == 4
    expected = torch.nn.functional.normalize(pairs.pixels[4:].mean(dim=(2, 3)), dim=1)
    assert features["image"].dtype == np.float16
    np.testing.assert_allclose(features["image"], expected.numpy(), rtol=1e-3, atol=1e-3)


def test_all_bad_samples_give_the_bad_sample_error(tmp_path):
    dataset = WithBad(TensorPairs(n=8), bad=range(8))
    collator = ImageTextCollator(max_bad_fraction=0.1, dataset=dataset)
    extract_features(MeanEncoder(), dataset, collator, tmp_path, batch_size=4)
    with pytest.raises(BadSampleFractionError, match="8 of 8 samples were bad"):
        collator.check(final=True)
    with pytest.raises(ValueError, match="feature files hold no sample: every training sample was bad"):
        load_features(tmp_path)


def test_an_empty_training_set_is_refused(tmp_path):
    with pytest.raises(ValueError, match="the training set is empty"):
        extract_features(MeanEncoder(), WithBad([], bad=()), ImageTextCollator(), tmp_path)


def _save_repeatedly(ckpt_dir, seed):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    for _ in range(15):
        save_training_state(ckpt_dir, 2, model, optimizer, [{"loss": float(seed)}])


@pytest.mark.slow
@pytest.mark.multiprocess
def test_concurrent_writers_of_one_training_state_do_not_crash(tmp_path):
    context = multiprocessing.get_context("fork")
    writers = [context.Process(target=_save_repeatedly, args=(tmp_path, seed)) for seed in (1, 2)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=120)
    assert [writer.exitcode for writer in writers] == [0, 0]
    latest = latest_training_state(tmp_path)
    model = torch.nn.Linear(4, 4)
    step, history = load_training_state(latest, model, torch.optim.AdamW(model.parameters()))
    assert step == 2 and history[0]["loss"] in (1.0, 2.0)
    assert [path.name for path in tmp_path.iterdir()] == ["step_00000002"]
