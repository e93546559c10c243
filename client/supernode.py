"""``python -m client.supernode``: Flower's SuperNode with fedsilo's patches (see ``runtime.flower.supernode``)."""

from runtime.flower.supernode import main

if __name__ == "__main__":
    main()
