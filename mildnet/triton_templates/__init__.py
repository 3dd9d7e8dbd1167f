"""The thin ``model.py`` shells of the Triton Python models, shipped inside the package so an installed wheel
can export. ``mildnet export`` copies ``<template>.py`` into each version folder as ``model.py``; nothing
imports these modules in this interpreter (they need Triton's ``triton_python_backend_utils``)."""
