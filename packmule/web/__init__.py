"""The dashboard (``packmule web``, the ``packmule[web]`` extra): runs, one run, workers, tubes.

Pages read through :mod:`packmule.overview`, like the command line. Each
page's live part is an HTML fragment the page fetches again every second
(``static/packmule.js``, 20 lines), so progress moves without a reload.
"""
