"""`python -m openkd` and `accelerate launch -m openkd`: guarded so vLLM workers can re-import."""

from openkd.cli import main

if __name__ == "__main__":
    main()
