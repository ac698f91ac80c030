"""`python -m app`: the service as Cloud Run runs it (app/server.py).

pydantic looks for plugins (the entry points of every installed distribution) when it builds its
first model: about 6 ms of every cold start, for plugins this service does not use. Set before
anything imports pydantic; an explicit PYDANTIC_DISABLE_PLUGINS wins.
"""

import os

os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")

from app.server import main  # after the setting above

if __name__ == "__main__":
    main()
