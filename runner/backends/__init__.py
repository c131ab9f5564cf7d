"""How requests travel: one module per way (``sync``: the synchronous API through a worker
pool). Each implements ``engine.Backend`` and keeps its books only through ``engine.Books``."""
