"""``python -m llava_patch.eval.model_vqa_loader ARGS``: LLaVA's ``llava.eval.model_vqa_loader``.

Same arguments plus ``--trust-remote-code``: without it, no Python file of a checkpoint folder runs
(see :mod:`llava_patch.tower.loading`). ``--answers-file`` may be a bare file name (LLaVA's script creates the file's
folder, and a bare name has none: it is made absolute first).
"""

import os
import sys
from typing import List

import llava_patch

ANSWERS_FLAG = "--answers-file"


def absolute_answers_file(argv: List[str]) -> List[str]:
    """``argv`` with the value of ``--answers-file`` (``--answers-file X`` or ``--answers-file=X``) made absolute."""
    result = list(argv)
    for index, arg in enumerate(result):
        if arg == ANSWERS_FLAG and index + 1 < len(result):
            result[index + 1] = os.path.abspath(os.path.expanduser(result[index + 1]))
        elif arg.startswith(ANSWERS_FLAG + "="):
            result[index] = f"{ANSWERS_FLAG}={os.path.abspath(os.path.expanduser(arg.partition('=')[2]))}"
    return result


def main() -> None:
    """Run LLaVA's ``llava.eval.model_vqa_loader`` patched (:func:`llava_patch.run_llava_script`)."""
    sys.argv[1:] = absolute_answers_file(sys.argv[1:])
    llava_patch.run_llava_script("llava.eval.model_vqa_loader")


if __name__ == "__main__":
    main()
