"""Code the tests share; no test module imports another test module. See tests/README.md for the layout."""
