"""The search page: drop a photo, see the matching catalogue items (``mildnet ui``).

:mod:`.app` is the web app (Starlette) in front of Triton's ``similar`` model, :mod:`.files` serves catalogue
images safely, :mod:`.catalogue` summarises the index, :mod:`.server` runs it with uvicorn, ``static/`` is the
page itself (plain HTML, CSS and JavaScript: no build step, nothing from a CDN).
"""
