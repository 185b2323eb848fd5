"""Allow ``python -m capsgan_toolkit``."""

from capsgan_toolkit.cli import main

if __name__ == "__main__":  # pragma: no cover
    main()
