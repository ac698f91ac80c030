"""Where the service keeps what it must remember: claims and done marks of single emails
(claims.py), digest windows and rate periods (windows.py), behind one Protocol each, with one
module per backend and concern, and the plumbing each backend shares (sqlite.py, firestore.py).
factory.py opens a backend from IDEMPOTENCY_STORE. Nothing here imports the pipeline or the rules:
the delivery wing uses the stores, never the other way round."""
