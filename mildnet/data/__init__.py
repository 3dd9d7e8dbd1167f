"""Catalogues, triplets, datasets and transforms: everything between a user's images and a training batch."""
from .catalogue import CatalogueError, CatalogueItem, grocery_catalogue, load_catalogue

__all__ = ["CatalogueError", "CatalogueItem", "grocery_catalogue", "load_catalogue"]
