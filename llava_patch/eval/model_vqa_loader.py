"""``python -m llava_patch.eval.model_vqa_loader ARGS``: LLaVA's ``llava.eval.model_vqa_loader``.

Same arguments plus ``--trust-remote-code``: without it, no Python file of a checkpoint folder runs
(see :mod:`llava_patch.loading`).
"""

import llava_patch


def main() -> None:
    """Run LLaVA's ``llava.eval.model_vqa_loader`` patched (:func:`llava_patch.run_llava_script`)."""
    llava_patch.run_llava_script("llava.eval.model_vqa_loader")


if __name__ == "__main__":
    main()
