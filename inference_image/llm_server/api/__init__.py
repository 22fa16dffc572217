"""HTTP layer: routes, schemas, errors, auth, metrics. Never imports torch."""
