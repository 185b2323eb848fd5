"""Allow ``python -m capsgan_toolkit``."""

from capsgan_toolkit.cli.main import main

if __name__ == "__main__":  # pragma: no cover
    main()
