"""``python -m mllm_encoder`` runs the ``clip-moe`` command line."""

from mllm_encoder.cli import main

if __name__ == "__main__":
    main()
