"""``python -m llava_patch.serve.cli ARGS``: LLaVA's ``llava.serve.cli``.

Same arguments plus ``--trust-remote-code``: without it, no Python file of a checkpoint folder runs
(see :mod:`llava_patch.loading`).
"""

import runpy
import sys

import llava_patch
from llava_patch.loading import pop_trust_remote_code_flag, trust_remote_code


def main() -> None:
    """Patch LLaVA, then run its script as ``__main__`` under the user's remote-code choice."""
    llava_patch.apply()
    sys.argv[1:], trusted = pop_trust_remote_code_flag(sys.argv[1:])
    with trust_remote_code(trusted):
        runpy.run_module("llava.serve.cli", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
