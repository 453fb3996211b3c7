"""``python -m unbleed`` (and ``accelerate launch -m unbleed sweep …``): the command line."""

from .cli import main

if __name__ == "__main__":
    main()
