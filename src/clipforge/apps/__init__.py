"""Tools built on CLIP: embed a collection, index it, search it, serve it."""
