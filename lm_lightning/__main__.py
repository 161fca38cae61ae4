"""Entry point: ``python -m lm_lightning {fit,validate,test,predict,export,evaluate} ...``."""

from lm_lightning.cli import main

if __name__ == "__main__":
    main()
