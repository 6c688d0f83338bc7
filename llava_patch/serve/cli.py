"""``python -m llava_patch.serve.cli ARGS``: LLaVA's command-line chat ``llava.serve.cli`` (same arguments)."""

import runpy


def main() -> None:
    """Patch LLaVA, then run its script as ``__main__``."""
    import llava_patch

    llava_patch.apply()
    runpy.run_module("llava.serve.cli", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
