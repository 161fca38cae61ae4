"""Entry point: ``python -m lm_lightning {fit,validate,test,predict,export} ...``."""

import sys


def main() -> None:
    """Dispatch ``export`` to the checkpoint exporter and everything else to LightningCLI."""
    if len(sys.argv) > 1 and sys.argv[1] == "export":
        from jsonargparse import auto_cli

        from lm_lightning.model.module import export_checkpoint

        print(auto_cli(export_checkpoint, args=sys.argv[2:]))
        return
    from lm_lightning.cli import cli_main

    cli_main()


if __name__ == "__main__":
    main()
