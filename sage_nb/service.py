"""``python -m sage_nb.service``: the box service (see :mod:`sage_nb.server.box.service`)."""

from sage_nb.server.box.service import main

if __name__ == "__main__":
    main()
