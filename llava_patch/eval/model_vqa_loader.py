"""``python -m llava_patch.eval.model_vqa_loader ARGS``: LLaVA's ``llava.eval.model_vqa_loader`` (same arguments)."""

import runpy


def main() -> None:
    """Patch LLaVA, then run its script as ``__main__``."""
    import llava_patch

    llava_patch.apply()
    runpy.run_module("llava.eval.model_vqa_loader", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
