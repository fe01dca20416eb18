"""Scripts around the library (benchmarks, diagnostics, the results
reproduction), run as `python tools/<name>.py` from the repository root.

Not installed with the package; `tools.common` is their shared start-up and
`tools.results` the code behind tools/reproduce.py.
"""
