import sys

from .cli import main

if __name__ == "__main__":  # DataLoader workers started with spawn import this module as __mp_main__
    sys.exit(main())
