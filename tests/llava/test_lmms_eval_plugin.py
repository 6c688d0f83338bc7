"""The lmms-eval plug-in ``clip_moe_llava``: found through the entry point as lmms-eval finds it, answering local
requests with tiny checkpoints. lmms-eval itself is an optional extra that ``make setup`` does not install; where
it is absent, a minimal stand-in of the three lmms-eval modules the plug-in imports takes its place."""

import abc
import dataclasses
import importlib
import importlib.metadata
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import transformers
from PIL import Image

import llava_patch.integrations

MODULE = "llava_patch.integrations.lmms_eval_model"
REPO_ROOT = Path(__file__).resolve().parents[2]


def _stand_in_modules():
    """``lmms_eval.api.model.lmms``, ``lmms_eval.api.instance.Instance`` and ``ModelManifest``, as in 0.7.x."""

    class CacheHook:
        def add_partial(self, attr, req, res):
            pass

    class lmms(abc.ABC):  # noqa: N801  (lmms-eval's name)
        is_simple = True

        def __init__(self):
            self._rank, self._world_size = 0, 1
            self.cache_hook, self.task_dict = CacheHook(), {}

        @property
        def rank(self):
            return self._rank

        @property
        def world_size(self):
            return self._world_size

        @abc.abstractmethod
        def loglikelihood(self, requests): ...

        @abc.abstractmethod
        def generate_until(self, requests): ...

        @abc.abstractmethod
        def generate_until_multi_round(self, requests): ...

    @dataclasses.dataclass
    class Instance:
        request_type: str
        arguments: tuple
        idx: int
        metadata: dict = dataclasses.field(default_factory=dict)

        @property
        def args(self):
            return self.arguments

    @dataclasses.dataclass(frozen=True)
    class ModelManifest:
        model_id: str
        simple_class_path: str = None
        chat_class_path: str = None
        aliases: tuple = ()

    modules = {name: types.ModuleType(name) for name in
               ("lmms_eval", "lmms_eval.api", "lmms_eval.api.model", "lmms_eval.api.instance", "lmms_eval.models",
                "lmms_eval.models.registry_v2")}  # fmt: skip
    modules["lmms_eval.api.model"].lmms = lmms
    modules["lmms_eval.api.instance"].Instance = Instance
    modules["lmms_eval.models.registry_v2"].ModelManifest = ModelManifest
    return modules


@pytest.fixture
def lmms_eval_api(monkeypatch):
    """lmms-eval's modules (the real ones when installed), with the plug-in module imported afresh against them."""
    try:
        import lmms_eval.api.instance  # noqa: F401
        import lmms_eval.api.model  # noqa: F401
        import lmms_eval.models.registry_v2  # noqa: F401
    except ImportError:
        for name, module in _stand_in_modules().items():
            monkeypatch.setitem(sys.modules, name, module)
    sys.modules.pop(MODULE, None)
    yield types.SimpleNamespace(
        lmms=sys.modules["lmms_eval.api.model"].lmms,
        Instance=sys.modules["lmms_eval.api.instance"].Instance,
        ModelManifest=sys.modules["lmms_eval.models.registry_v2"].ModelManifest,
        real="lmms_eval.utils" in sys.modules,
    )
    sys.modules.pop(MODULE, None)
    if hasattr(llava_patch.integrations, "lmms_eval_model"):
        delattr(llava_patch.integrations, "lmms_eval_model")


def resolve_through_entry_point(api, name="clip_moe_llava"):
    """What lmms-eval's ``ModelRegistryV2`` does: load the group's entry points, coerce, import the class path."""
    if api.real:
        from lmms_eval.models.registry_v2 import ModelRegistryV2

        registry = ModelRegistryV2()
        failures = registry.load_entrypoint_manifests() or ()  # 0.7.x raises on a failure, later versions list them
        assert not [f for f in failures if "clip_moe" in f.source], failures
        return registry.get_manifest(name), registry.get_model_class(name)
    (entry_point,) = [ep for ep in importlib.metadata.entry_points(group="lmms_eval.models") if ep.name == name]
    payload = entry_point.load()
    manifests = payload() if callable(payload) else payload
    (manifest,) = [m for m in manifests if isinstance(m, api.ModelManifest) and m.model_id == name]
    module_name, class_name = manifest.simple_class_path.rsplit(".", 1)
    return manifest, getattr(importlib.import_module(module_name), class_name)


def test_entry_point_resolves_to_the_model_class(lmms_eval_api, tmp_path):
    manifest, model_class = resolve_through_entry_point(lmms_eval_api)
    assert manifest.model_id == "clip_moe_llava" and manifest.simple_class_path == f"{MODULE}.CLIPMoELlava"
    assert issubclass(model_class, lmms_eval_api.lmms) and model_class.is_simple is True
    expected = r"\(expected a local checkpoint directory as clip_moe_llava's pretrained=\)"
    with pytest.raises(ValueError, match=f"^/nonexistent/checkpoint: no such directory {expected}$"):
        model_class(pretrained="/nonexistent/checkpoint")
    with pytest.raises(ValueError, match=f"^{tmp_path}: no config.json {expected}$"):
        model_class(pretrained=str(tmp_path))
    (tmp_path / "config.json").write_text("[]")
    with pytest.raises(ValueError, match="config.json: expected a JSON object, found list"):
        model_class(pretrained=str(tmp_path))
    with pytest.raises(ValueError, match="clip_moe_llava: unknown model_args conv_mode"):
        model_class(pretrained="/nonexistent/checkpoint", conv_mode="vicuna_v1")


def test_package_and_cli_work_without_lmms_eval_and_never_import_llava_patch():
    code = (
        "import sys; sys.modules['lmms_eval'] = None\n"  # any import of lmms_eval now fails
        "import mllm_encoder, mllm_encoder.cli\n"
        "try:\n    mllm_encoder.cli.main(['eval', 'pope', '--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "assert 'llava_patch' not in sys.modules, 'mllm_encoder imported llava_patch'\n"
        "print('OK')\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and result.stdout.rstrip().endswith("OK"), result.stderr[-3000:]
    assert "--protocol" in result.stdout


def local_requests(api, model, contexts, images, gen_kwargs):
    """lmms-eval ``generate_until`` Instances over a local task whose docs hold the images."""
    model.task_dict = {"local_yes_no": {"test": [{"image": image} for image in images]}}
    doc_to_visual = lambda doc: [doc["image"]]  # noqa: E731
    return [
        api.Instance(
            "generate_until",
            (context, dict(gen_kwargs), doc_to_visual, doc_id, "local_yes_no", "test"),
            doc_id,
            {"task": "local_yes_no", "doc_id": doc_id, "repeats": 1},
        )
        for doc_id, context in enumerate(contexts)
    ]


def local_images(tmp_path):
    paths = []
    for index, (size, color) in enumerate(
        [((40, 30), (200, 30, 30)), ((30, 90), (30, 200, 60)), ((64, 64), (40, 60, 220))]
    ):
        paths.append(tmp_path / f"{index}.png")
        Image.new("RGB", size, color).save(paths[-1])
    return paths


needs_llava_next = pytest.mark.skipif(
    not hasattr(transformers, "LlavaNextForConditionalGeneration"),
    reason=f"transformers {transformers.__version__} has no LlavaNextForConditionalGeneration (added in 4.39)",
)


def _anyres_checkpoint(llava_workdir, tmp_path, kind: str):
    """A tiny HF LLaVA-NeXT / OneVision with the CLIP-MoE tower (seed 0), saved with its processor; the model,
    its processor and the checkpoint folder."""
    from llava_patch.hf.llava_next import build_anyres_llava

    torch.manual_seed(0)
    model, processor = build_anyres_llava(llava_workdir / "clipmoe", llava_workdir / "llm", kind=kind)
    checkpoint = tmp_path / f"{kind}-clip-moe"
    model.save_pretrained(checkpoint)
    processor.save_pretrained(checkpoint)
    return model, processor, checkpoint


@needs_llava_next
def test_generate_until_with_an_hf_llava_next_checkpoint(lmms_eval_api, llava_workdir, tmp_path):
    model, processor, checkpoint = _anyres_checkpoint(llava_workdir, tmp_path, "llava_next")
    _, model_class = resolve_through_entry_point(lmms_eval_api)
    lm = model_class(pretrained=str(checkpoint), device="cpu", dtype="float32")
    images = [Image.open(path).convert("RGB") for path in local_images(tmp_path)]
    contexts = [f"Is there a {thing} in the image?\nAnswer the question using a single word or phrase." for thing in
                ("dog", "cat", "car")]  # fmt: skip
    answers = lm.generate_until(local_requests(lmms_eval_api, lm, contexts, images, {"max_new_tokens": 4, "until": []}))
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
    model.eval()
    for context, image, answer in zip(contexts, images, answers):  # the same answer by hand
        prompt = f"{lm.backend.prompt(context, 1)}"
        assert prompt.endswith(f"USER: <image>\n{context} ASSISTANT:")
        inputs = processor(images=[image], text=prompt, return_tensors="pt")
        with torch.no_grad():
            output = model.generate(
                **inputs, max_new_tokens=4, do_sample=False, pad_token_id=processor.tokenizer.eos_token_id
            )
        expected = processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        assert answer == expected.strip()


def test_generate_until_with_a_llava_v15_checkpoint(lmms_eval_api, tiny_llava_dir, tmp_path):
    from llava_patch.integrations.answerer import LlavaAnswerer

    _, model_class = resolve_through_entry_point(lmms_eval_api)
    lm = model_class(pretrained=str(tiny_llava_dir), device="cpu")
    paths = local_images(tmp_path)
    images = [Image.open(path).convert("RGB") for path in paths]
    contexts = ["What color is the image?", "Is it red? Answer yes or no."]
    gen_kwargs = {"max_new_tokens": 8, "temperature": 0, "until": ["\n\n\n"]}
    answers = lm.generate_until(local_requests(lmms_eval_api, lm, contexts, images[:2], gen_kwargs))
    answerer = LlavaAnswerer(str(tiny_llava_dir), str(tmp_path), device="cpu", max_new_tokens=8)
    expected = [answerer({"image": path.name, "text": text}) for path, text in zip(paths, contexts)]
    assert answers == expected


def test_generation_settings_and_stop_strings(lmms_eval_api):
    module = importlib.import_module(MODULE)
    settings, until = module.generation_settings({"until": "\n", "max_new_tokens": 16, "temperature": 0, "top_p": 0.9})
    assert settings == {"max_new_tokens": 16, "num_beams": 1, "do_sample": False} and until == ["\n"]
    settings, _ = module.generation_settings({"do_sample": True, "temperature": 0.7, "top_p": 0.9})
    assert settings == {"max_new_tokens": 128, "num_beams": 1, "do_sample": True, "temperature": 0.7, "top_p": 0.9}
    assert module.cut_at_stop_strings("Yes.\n\nUSER: more", ["\n\n", "", "USER:"]) == "Yes."


@needs_llava_next
@pytest.mark.parametrize("kind", ["llava_next", "llava_onevision"])
def test_batched_answers_equal_one_at_a_time_with_anyres_images_of_different_sizes(
    lmms_eval_api, llava_workdir, tmp_path, kind
):
    if kind == "llava_onevision" and not hasattr(transformers, "LlavaOnevisionForConditionalGeneration"):
        pytest.skip(f"transformers {transformers.__version__} has no LlavaOnevisionForConditionalGeneration")
    _, _, checkpoint = _anyres_checkpoint(llava_workdir, tmp_path, kind)
    _, model_class = resolve_through_entry_point(lmms_eval_api)
    images = [Image.open(path).convert("RGB") for path in local_images(tmp_path)]  # three sizes, three ratios
    contexts = ["Is there a dog?", "What color is the shape in this picture? Describe it.", "Is it a car?"]
    gen_kwargs = {"max_new_tokens": 6, "until": []}
    answers = {}
    for batch_size in (1, 3):
        lm = model_class(pretrained=str(checkpoint), device="cpu", dtype="float32", batch_size=batch_size)
        answers[batch_size] = lm.generate_until(local_requests(lmms_eval_api, lm, contexts, images, gen_kwargs))
    assert answers[3] == answers[1] and len(set(answers[1])) > 1, answers


def test_batched_answers_with_a_llava_v15_checkpoint(lmms_eval_api, tiny_llava_dir, tmp_path):
    _, model_class = resolve_through_entry_point(lmms_eval_api)
    images = [Image.open(path).convert("RGB") for path in local_images(tmp_path)]
    contexts = ["What color is the image?", "Is it red? Answer yes or no.", "Describe the shape."]
    gen_kwargs = {"max_new_tokens": 6, "temperature": 0, "until": []}
    answers = {}
    for batch_size in (1, 2):
        lm = model_class(pretrained=str(tiny_llava_dir), device="cpu", batch_size=batch_size)
        answers[batch_size] = lm.generate_until(local_requests(lmms_eval_api, lm, contexts, images, gen_kwargs))
    assert answers[2] == answers[1], answers
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 'auto'"):
        model_class(pretrained=str(tiny_llava_dir), device="cpu", batch_size="auto")


def loglikelihood_requests(api, model, contexts, continuations, images):
    """lmms-eval ``loglikelihood`` Instances: (context, continuation, doc_to_visual, doc_id, task, split)."""
    model.task_dict = {"local_choice": {"test": [{"image": image} for image in images]}}
    doc_to_visual = lambda doc: [doc["image"]]  # noqa: E731
    return [
        api.Instance(
            "loglikelihood",
            (context, continuation, doc_to_visual, doc_id, "local_choice", "test"),
            doc_id,
            {"task": "local_choice", "doc_id": doc_id, "repeats": 1},
        )
        for doc_id, (context, continuation) in enumerate(zip(contexts, continuations))
    ]


def summed_logprobs(logits, continuation_ids):
    """The continuation's log-probability summed from the logits by hand, and whether each token is the argmax."""
    total, greedy = 0.0, True
    start = logits.shape[1] - len(continuation_ids)
    for offset, token in enumerate(continuation_ids.tolist()):
        row = logits[0, start + offset - 1].double()
        total += float(row[token] - torch.logsumexp(row, dim=0))
        greedy = greedy and int(row.argmax()) == token
    return total, greedy


@needs_llava_next
def test_loglikelihood_equals_log_probabilities_summed_from_the_logits(lmms_eval_api, llava_workdir, tmp_path):
    model, processor, checkpoint = _anyres_checkpoint(llava_workdir, tmp_path, "llava_next")
    _, model_class = resolve_through_entry_point(lmms_eval_api)
    lm = model_class(pretrained=str(checkpoint), device="cpu", dtype="float32")
    images = [Image.open(path).convert("RGB") for path in local_images(tmp_path)]
    contexts = ["Is there a dog?", "Which color is it? A. red B. green", "Is it a car?"]
    continuations = [" Yes", " A", " No, there is not."]
    results = lm.loglikelihood(loglikelihood_requests(lmms_eval_api, lm, contexts, continuations, images))
    model.eval()
    for context, continuation, image, (logprob, greedy) in zip(contexts, continuations, images, results):
        inputs = processor(images=[image], text=lm.backend.prompt(context, 1), return_tensors="pt")
        ids = processor.tokenizer(continuation, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        inputs["input_ids"] = torch.cat([inputs["input_ids"], ids[None]], dim=1)
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        with torch.no_grad():
            logits = model(**inputs).logits
        expected, expected_greedy = summed_logprobs(logits, ids)
        assert logprob == pytest.approx(expected, abs=1e-4) and logprob < 0 and greedy == expected_greedy
    assert len({round(r[0], 3) for r in results}) == 3


def test_loglikelihood_with_a_llava_v15_checkpoint(lmms_eval_api, tiny_llava_dir, tmp_path):
    from llava_patch.integrations.answerer import LlavaAnswerer

    _, model_class = resolve_through_entry_point(lmms_eval_api)
    lm = model_class(pretrained=str(tiny_llava_dir), device="cpu")
    images = [Image.open(path).convert("RGB") for path in local_images(tmp_path)][:2]
    contexts, continuations = ["Is it red?", "What color is it?"], [" Yes", " It is green."]
    results = lm.loglikelihood(loglikelihood_requests(lmms_eval_api, lm, contexts, continuations, images))
    a = LlavaAnswerer(str(tiny_llava_dir), str(tmp_path), device="cpu")
    for context, continuation, image, (logprob, greedy) in zip(contexts, continuations, images, results):
        prompt = a.mm_utils.tokenizer_image_token(a.build_prompt(context), a.tokenizer, -200, return_tensors="pt")
        ids = a.tokenizer(continuation, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        pixels = a.mm_utils.process_images([image], a.image_processor, a.model.config)
        with torch.no_grad():
            logits = a.model(input_ids=torch.cat([prompt, ids])[None], images=pixels, image_sizes=[image.size]).logits
        expected, expected_greedy = summed_logprobs(logits, ids)
        assert logprob == pytest.approx(expected, abs=1e-4) and logprob < 0 and greedy == expected_greedy


def test_the_documented_install_lines_are_what_make_test_lmms_runs():
    script = (REPO_ROOT / "scripts" / "setup_lmms_env.sh").read_text().splitlines()
    docs = (REPO_ROOT / "docs" / "evaluation.md").read_text().splitlines()
    installs = [line for line in script if line.startswith("pip install")]
    assert len(installs) == 3 and all(line in docs for line in installs), installs
    assert [line for line in docs if line.startswith("pip install")][-3:] == installs
    makefile = (REPO_ROOT / "Makefile").read_text()
    assert "bash scripts/setup_lmms_env.sh .venv-lmms" in makefile and "test_lmms_eval_run.py" in makefile
