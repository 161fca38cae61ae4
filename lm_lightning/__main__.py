"""Entry point: ``python -m lm_lightning {fit,validate,test,predict,export,report,evaluate} ...``."""

from lm_lightning.cli import main

if __name__ == "__main__":
    main()
