"""Make the registry's torchvision importable on a CPU-only torch.

PyPI's torchvision wheels are built against CUDA torch: on the CPU build of torch
their C++ extension cannot load (it links ``libtorch_cuda.so``), which torchvision
tolerates, except that ``torchvision/_meta_registrations.py`` registers fake
kernels for ``torchvision::nms``/``qnms`` unconditionally and import fails with
``operator torchvision::nms does not exist``. timm and open_clip only need
torchvision's pure-Python transforms, so this script guards those two
registrations behind ``torchvision.extension._has_ops()``. Detection ops
(nms, roi_align, ...) then raise torchvision's own "Couldn't load custom C++ ops"
error if called. Idempotent; does nothing when torchvision already imports.

Usage: ``python scripts/patch_torchvision.py`` with the target environment's python.
"""

import importlib.util
import pathlib
import subprocess
import sys

GUARD = "_register_fake_if_ops"
HELPER = f'''

def {GUARD}(qualname):
    """Patched by mllm-encoder's setup: register a fake kernel only when the C++ ops loaded."""
    if torchvision.extension._has_ops():
        return torch.library.register_fake(qualname)
    return lambda fn: fn
'''


def torchvision_imports() -> bool:
    result = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True, text=True)
    if result.returncode != 0 and "torchvision::" not in result.stderr:
        sys.exit(f"torchvision fails to import for another reason:\n{result.stderr}")
    return result.returncode == 0


def main() -> None:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or torchvision_imports():
        return
    path = pathlib.Path(spec.origin).parent / "_meta_registrations.py"
    source = path.read_text()
    marker = "import torchvision.extension  # noqa: F401\n"
    if GUARD not in source:
        if marker not in source:
            sys.exit(f"unexpected layout of {path}; cannot patch")
        source = source.replace(marker, marker + HELPER, 1)
        source = source.replace("@torch.library.register_fake(", f"@{GUARD}(")
        path.write_text(source)
    if not torchvision_imports():
        sys.exit(f"patched {path} but torchvision still fails to import")
    print(f"patched {path} (torchvision C++ ops unavailable on this CPU-only torch)")


if __name__ == "__main__":
    main()
