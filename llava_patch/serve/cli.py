"""``python -m llava_patch.serve.cli ARGS``: LLaVA's ``llava.serve.cli``.

Same arguments plus ``--trust-remote-code``: without it, no Python file of a checkpoint folder runs
(see :mod:`llava_patch.tower.loading`).
"""

import llava_patch


def main() -> None:
    """Run LLaVA's ``llava.serve.cli`` patched (:func:`llava_patch.run_llava_script`)."""
    llava_patch.run_llava_script("llava.serve.cli")


if __name__ == "__main__":
    main()
